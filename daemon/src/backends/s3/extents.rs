//! The log's index: which ranges of the volume the write-ahead log holds
//! newer than S3, and where. Extents never overlap; a later write splits or
//! replaces what it covers, so a lookup finds only the newest bytes.

use std::collections::{BTreeMap, BTreeSet};

/// Where an extent's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Source {
    /// The log segment holding the record.
    pub segment: u64,
    /// The position in that segment of the record's header (whose
    /// checksum covers the extent's bytes).
    pub record: u64,
    /// The position in that segment of the extent's first byte; `None`
    /// for zeroes (a discard or write-zeroes record carries no data).
    pub data: Option<u64>,
}

impl Source {
    /// The same source, `by` bytes further in.
    fn advance(self, by: u64) -> Self {
        Self {
            segment: self.segment,
            record: self.record,
            data: self.data.map(|d| d + by),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Extent {
    end: u64,
    src: Source,
}

/// A piece of a looked-up range: from the log (`Some`) or from the chunk
/// in S3 (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub start: u64,
    pub end: u64,
    pub src: Option<Source>,
}

#[derive(Debug, Default)]
pub struct Extents {
    map: BTreeMap<u64, Extent>,
}

impl Extents {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Records that `[start, end)` now reads from `src`.
    pub fn insert(&mut self, start: u64, end: u64, src: Source) {
        if start >= end {
            return;
        }
        let before = self
            .map
            .range(..start)
            .next_back()
            .filter(|(_, e)| e.end > start)
            .map(|(&s, _)| s);
        let covered: Vec<u64> = before
            .into_iter()
            .chain(self.map.range(start..end).map(|(&s, _)| s))
            .collect();
        for s in covered {
            let Some(e) = self.map.remove(&s) else {
                continue;
            };
            if s < start {
                self.map.insert(
                    s,
                    Extent {
                        end: start,
                        src: e.src,
                    },
                );
            }
            if e.end > end {
                self.map.insert(
                    end,
                    Extent {
                        end: e.end,
                        src: e.src.advance(end - s),
                    },
                );
            }
        }
        self.map.insert(start, Extent { end, src });
    }

    /// Splits `[start, end)` into pieces, in order, that together cover it.
    pub fn pieces(&self, start: u64, end: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut at = start;
        let before = self
            .map
            .range(..start)
            .next_back()
            .filter(|(_, e)| e.end > start);
        for (&s, e) in before.into_iter().chain(self.map.range(start..end)) {
            if s > at {
                out.push(Piece {
                    start: at,
                    end: s,
                    src: None,
                });
            }
            let from = s.max(at);
            let to = e.end.min(end);
            out.push(Piece {
                start: from,
                end: to,
                src: Some(e.src.advance(from - s)),
            });
            at = to;
        }
        if at < end {
            out.push(Piece {
                start: at,
                end,
                src: None,
            });
        }
        out
    }

    /// The chunks that hold an extent from a segment before `segment`.
    pub fn chunks_before(&self, segment: u64, chunk_size: u64) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        for (&s, e) in &self.map {
            if e.src.segment < segment {
                out.extend(s / chunk_size..=(e.end - 1) / chunk_size);
            }
        }
        out
    }

    /// Forgets the extents from segments before `segment` (their bytes are
    /// in S3 now).
    pub fn drop_before(&mut self, segment: u64) {
        self.map.retain(|_, e| e.src.segment >= segment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(segment: u64, data: u64) -> Source {
        Source {
            segment,
            record: 0,
            data: Some(data),
        }
    }

    /// A byte-level model: the newest (segment, data) per byte.
    fn check(x: &Extents, model: &[Option<(u64, u64)>]) {
        let pieces = x.pieces(0, model.len() as u64);
        let mut at = 0;
        for p in pieces {
            assert_eq!(p.start, at);
            for b in p.start..p.end {
                let want = model[b as usize];
                let got = p.src.map(|s| (s.segment, s.data.unwrap() + (b - p.start)));
                assert_eq!(got, want, "byte {b}");
            }
            at = p.end;
        }
        assert_eq!(at, model.len() as u64);
    }

    #[test]
    fn newest_write_wins_against_a_byte_model() {
        let mut x = Extents::default();
        let mut model = vec![None; 200];
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut pos = 0;
        for i in 0..2000u64 {
            let a = next() % 200;
            let len = 1 + next() % 40;
            let b = (a + len).min(200);
            let seg = i / 100;
            x.insert(a, b, src(seg, pos));
            for (k, m) in model[a as usize..b as usize].iter_mut().enumerate() {
                *m = Some((seg, pos + k as u64));
            }
            pos += b - a;
            check(&x, &model);
            if i % 500 == 499 {
                x.drop_before(seg);
                for m in &mut model {
                    if m.is_some_and(|(s, _)| s < seg) {
                        *m = None;
                    }
                }
                check(&x, &model);
            }
        }
    }

    #[test]
    fn chunks_before_a_cut() {
        let mut x = Extents::default();
        x.insert(10, 30, src(1, 0));
        x.insert(95, 105, src(2, 0));
        x.insert(250, 260, src(3, 0));
        let got: Vec<u64> = x.chunks_before(3, 100).into_iter().collect();
        assert_eq!(got, [0, 1]);
        x.drop_before(3);
        assert_eq!(x.pieces(0, 300).len(), 3);
    }
}
