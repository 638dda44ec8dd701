//! REPORT: the figures a daemon's backend keeps about itself (for s3: the
//! log, the uploads, the read cache), sent about once a second while the
//! daemon is attached, to a broker that announced [`crate::caps::REPORT`].
//! The broker shows the latest in `holdfastctl status` and in metrics.
//!
//! Each figure is a known kind and a u64. A figure this crate does not know
//! is skipped when decoding, so a newer daemon may report more than an
//! older broker shows; a kind given twice is malformed.

use crate::wire::{DecodeError, Reader, Writer};

/// Most figures in one REPORT.
pub const MAX_FIGURES: usize = 32;

/// What a figure measures. The wire number never changes meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Figure {
    /// Bytes in the write-ahead log (not yet uploaded, or being uploaded).
    LogBytes = 1,
    /// The log's bound: past it, writes wait for uploads.
    LogLimitBytes = 2,
    /// Bytes of chunks the running checkpoint has yet to upload.
    UploadBacklogBytes = 3,
    /// Milliseconds since the last checkpoint finished (S3 is that far
    /// behind the log). The broker ages it by the time since the report.
    CheckpointAgeMs = 4,
    /// Reads served from the read cache without a fetch (a counter).
    CacheHits = 5,
    /// Reads that fetched from the store (a counter).
    CacheMisses = 6,
}

/// Whether a figure only grows (a Prometheus counter) or goes up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FigureKind {
    Gauge,
    Counter,
}

impl Figure {
    pub const ALL: [Figure; 6] = [
        Self::LogBytes,
        Self::LogLimitBytes,
        Self::UploadBacklogBytes,
        Self::CheckpointAgeMs,
        Self::CacheHits,
        Self::CacheMisses,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|f| *f as u8 == v)
    }

    /// Its name in `status` and its JSON.
    pub fn name(self) -> &'static str {
        match self {
            Self::LogBytes => "log_bytes",
            Self::LogLimitBytes => "log_limit_bytes",
            Self::UploadBacklogBytes => "upload_backlog_bytes",
            Self::CheckpointAgeMs => "checkpoint_age_ms",
            Self::CacheHits => "cache_hits",
            Self::CacheMisses => "cache_misses",
        }
    }

    /// One line for a metric's HELP.
    pub fn help(self) -> &'static str {
        match self {
            Self::LogBytes => "Bytes in the backend's write-ahead log.",
            Self::LogLimitBytes => "The backend's log bound; past it, writes wait for uploads.",
            Self::UploadBacklogBytes => "Bytes of chunks the running checkpoint has yet to upload.",
            Self::CheckpointAgeMs => "Time since the backend's last checkpoint finished.",
            Self::CacheHits => "Reads served from the backend's read cache.",
            Self::CacheMisses => "Reads the backend fetched from its store.",
        }
    }

    pub fn kind(self) -> FigureKind {
        match self {
            Self::CacheHits | Self::CacheMisses => FigureKind::Counter,
            _ => FigureKind::Gauge,
        }
    }

    /// A time elapsed at the moment of the report: it grows between
    /// reports.
    pub fn is_age(self) -> bool {
        self == Self::CheckpointAgeMs
    }
}

/// A backend's figures: at most one value per figure, in figure order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Figures {
    values: Vec<(Figure, u64)>,
}

impl Figures {
    /// Sets `figure` to `value`, replacing an earlier value.
    pub fn set(&mut self, figure: Figure, value: u64) -> &mut Self {
        match self.values.binary_search_by_key(&figure, |(f, _)| *f) {
            Ok(i) => {
                if let Some(v) = self.values.get_mut(i) {
                    v.1 = value;
                }
            }
            Err(i) => self.values.insert(i, (figure, value)),
        }
        self
    }

    pub fn get(&self, figure: Figure) -> Option<u64> {
        self.values
            .iter()
            .find(|(f, _)| *f == figure)
            .map(|(_, v)| *v)
    }

    pub fn iter(&self) -> impl Iterator<Item = (Figure, u64)> + '_ {
        self.values.iter().copied()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The figures `elapsed` after they were reported: ages grow by it.
    pub fn aged(&self, elapsed: std::time::Duration) -> Self {
        let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        let values = self
            .values
            .iter()
            .map(|&(f, v)| (f, if f.is_age() { v.saturating_add(ms) } else { v }))
            .collect();
        Self { values }
    }

    /// A count (u8), then each figure's number (u8) and value (u64).
    pub(crate) fn put(&self, w: &mut Writer) {
        let n = self.values.len().min(MAX_FIGURES);
        w.u8(u8::try_from(n).unwrap_or(0));
        for (f, v) in self.values.iter().take(n) {
            w.u8(*f as u8).u64(*v);
        }
    }

    pub(crate) fn get_from(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let n = usize::from(r.u8("figures.count")?);
        if n > MAX_FIGURES {
            return Err(DecodeError::TooLong {
                field: "figures",
                len: n,
                max: MAX_FIGURES,
            });
        }
        let mut figures = Self::default();
        for _ in 0..n {
            let id = r.u8("figure.kind")?;
            let value = r.u64("figure.value")?;
            let Some(f) = Figure::from_u8(id) else {
                continue;
            };
            if figures.get(f).is_some() {
                return Err(DecodeError::BadValue {
                    field: "figure.kind",
                    value: u64::from(id),
                });
            }
            figures.set(f, value);
        }
        Ok(figures)
    }
}

/// In JSON, an object of figure names and values.
#[cfg(feature = "serde")]
impl serde::Serialize for Figures {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.values.len()))?;
        for (f, v) in &self.values {
            m.serialize_entry(f.name(), v)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(f: &Figures) -> Result<Figures, DecodeError> {
        let mut w = Writer::new();
        f.put(&mut w);
        let buf = w.finish();
        let mut r = Reader::new(&buf);
        Figures::get_from(&mut r)
    }

    #[test]
    fn figures_round_trip_in_order() {
        let mut f = Figures::default();
        f.set(Figure::CacheMisses, 3)
            .set(Figure::LogBytes, 4096)
            .set(Figure::LogBytes, 8192);
        assert_eq!(round_trip(&f), Ok(f.clone()));
        let all: Vec<_> = f.iter().collect();
        assert_eq!(all, [(Figure::LogBytes, 8192), (Figure::CacheMisses, 3)]);
    }

    #[test]
    fn unknown_figures_are_skipped_and_duplicates_refused() {
        let mut w = Writer::new();
        w.u8(3).u8(200).u64(1).u8(1).u64(2).u8(6).u64(3);
        let buf = w.finish();
        let f = Figures::get_from(&mut Reader::new(&buf));
        assert_eq!(f.map(|f| f.iter().count()), Ok(2));
        let mut w = Writer::new();
        w.u8(2).u8(1).u64(1).u8(1).u64(2);
        let buf = w.finish();
        assert!(Figures::get_from(&mut Reader::new(&buf)).is_err());
        let mut w = Writer::new();
        w.u8(MAX_FIGURES as u8 + 1);
        let buf = w.finish();
        assert!(Figures::get_from(&mut Reader::new(&buf)).is_err());
    }

    #[test]
    fn ages_grow_and_the_rest_stay() {
        let mut f = Figures::default();
        f.set(Figure::CheckpointAgeMs, 100).set(Figure::LogBytes, 7);
        let aged = f.aged(std::time::Duration::from_millis(250));
        assert_eq!(aged.get(Figure::CheckpointAgeMs), Some(350));
        assert_eq!(aged.get(Figure::LogBytes), Some(7));
    }
}
