//! The manifest: the one object that says what the volume is. It names the
//! chunk object that holds each chunk (chunks never written are zeroes), and
//! it is only ever replaced with a conditional write (If-Match the ETag it
//! was read with, or If-None-Match for the first). Identical bodies would
//! have identical ETags, so every write bumps `generation` and names its
//! `owner`: a daemon whose conditional write fails was superseded by another
//! daemon and must stop writing.
//!
//! The body is text, one field per line:
//!
//! ```text
//! holdfast-s3-volume 2
//! size BYTES
//! chunk-size BYTES
//! generation N
//! owner LINEAGE NONCE HOST PID
//! log LINEAGE SEGMENT    (optional: the log this manifest covers)
//! chunk INDEX KEY        (one per stored chunk, ascending; KEY is under the prefix)
//! ```
//!
//! `log` says that every record in the segments before SEGMENT of the log
//! of cache directory LINEAGE is in the chunks named here: a replay skips
//! them (a cache directory restored from an older copy, a segment whose
//! unlink was lost). Format 1, without it, is still read; a daemon that
//! reads only format 1 refuses format 2.

use std::collections::BTreeMap;
use std::fmt::Write as _;

const FORMAT: &str = "holdfast-s3-volume 2";
const FORMAT_1: &str = "holdfast-s3-volume 1";

/// Who wrote a manifest. `lineage` names a cache directory (its log):
/// daemons that follow each other on one cache directory share it.
/// `nonce` names one daemon's claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub lineage: String,
    pub nonce: String,
    pub host: String,
    pub pid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub size: u64,
    pub chunk_size: u64,
    pub generation: u64,
    pub owner: Owner,
    /// The log whose older segments the chunks hold: (lineage, the first
    /// segment they do not cover).
    pub log: Option<(String, u64)>,
    /// Chunk index → its object's key under the prefix.
    pub chunks: BTreeMap<u64, String>,
}

/// A token of the manifest (a key, a host name): printable, no spaces.
pub fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
}

impl Manifest {
    /// How many chunks the volume has.
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// The first segment of the log of `lineage` that this manifest does
    /// not cover (0: it covers none).
    pub fn covers(&self, lineage: &str) -> u64 {
        match &self.log {
            Some((l, segment)) if l == lineage => *segment,
            _ => 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let o = &self.owner;
        let mut s = format!(
            "{FORMAT}\nsize {}\nchunk-size {}\ngeneration {}\nowner {} {} {} {}\n",
            self.size, self.chunk_size, self.generation, o.lineage, o.nonce, o.host, o.pid
        );
        if let Some((lineage, segment)) = &self.log {
            let _ = writeln!(s, "log {lineage} {segment}");
        }
        for (i, key) in &self.chunks {
            let _ = writeln!(s, "chunk {i} {key}");
        }
        s.into_bytes()
    }

    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(body).map_err(|_| "the manifest is not UTF-8")?;
        let mut lines = text.lines().peekable();
        if !matches!(lines.next(), Some(FORMAT | FORMAT_1)) {
            return Err(format!("the manifest does not start with {FORMAT:?}"));
        }
        let mut field = |name: &str| -> Result<Vec<&str>, String> {
            let line = lines
                .next()
                .ok_or(format!("the manifest has no {name} line"))?;
            let mut words = line.split(' ');
            if words.next() != Some(name) {
                return Err(format!(
                    "expected the manifest's {name} line, found {line:?}"
                ));
            }
            Ok(words.collect())
        };
        let number = |name: &str, v: &[&str]| -> Result<u64, String> {
            match v {
                [n] => n
                    .parse()
                    .map_err(|_| format!("manifest {name} {n:?} is not a number")),
                _ => Err(format!("manifest {name}: expected one number")),
            }
        };
        let size = number("size", &field("size")?)?;
        let chunk_size = number("chunk-size", &field("chunk-size")?)?;
        let generation = number("generation", &field("generation")?)?;
        let owner = match field("owner")?[..] {
            [lineage, nonce, host, pid] if [lineage, nonce, host].iter().all(|t| is_token(t)) => {
                Owner {
                    lineage: lineage.into(),
                    nonce: nonce.into(),
                    host: host.into(),
                    pid: pid.parse().map_err(|_| "manifest owner: bad pid")?,
                }
            }
            _ => return Err("manifest owner: expected LINEAGE NONCE HOST PID".into()),
        };
        if size == 0 || !valid_chunk_size(chunk_size) {
            return Err(format!(
                "manifest: size {size} or chunk-size {chunk_size} is out of range"
            ));
        }
        let mut m = Self {
            size,
            chunk_size,
            generation,
            owner,
            log: None,
            chunks: BTreeMap::new(),
        };
        if let Some(log) = lines.next_if(|l| l.starts_with("log ")) {
            m.log = match log.split(' ').collect::<Vec<_>>()[..] {
                ["log", lineage, segment] if is_token(lineage) => Some((
                    lineage.into(),
                    segment.parse().map_err(|_| "manifest log: bad segment")?,
                )),
                _ => return Err(format!("manifest: bad log line {log:?}")),
            };
        }
        for line in lines {
            let (index, key) = match line.split(' ').collect::<Vec<_>>()[..] {
                ["chunk", i, key] => (i.parse::<u64>().ok(), key),
                _ => (None, ""),
            };
            let index = index
                .filter(|&i| i < m.chunk_count() && is_token(key))
                .ok_or_else(|| format!("manifest: bad chunk line {line:?}"))?;
            if m.chunks
                .last_key_value()
                .is_some_and(|(&last, _)| last >= index)
            {
                return Err(format!("manifest: chunk {index} is out of order"));
            }
            m.chunks.insert(index, key.into());
        }
        Ok(m)
    }
}

/// Where chunk objects live, under the prefix.
pub const CHUNKS: &str = "chunks/";

/// A chunk object's key: `chunks/INDEX.GENERATION.NONCE.UPLOAD` (hex).
/// GENERATION is the manifest generation the upload was made for, NONCE
/// the claim of the daemon that made it and UPLOAD counts that daemon's
/// uploads, so no two uploads share a key: an upload that finds its key
/// taken knows its own earlier attempt landed.
pub fn chunk_key(index: u64, generation: u64, nonce: &str, upload: u64) -> String {
    format!("{CHUNKS}{index:08x}.{generation:016x}.{nonce}.{upload:x}")
}

/// The generation the chunk object `key` was uploaded for, if `key` is one
/// that [`chunk_key`] makes.
pub fn chunk_generation(key: &str) -> Option<u64> {
    let hex = |s: &str| !s.is_empty() && s.len() <= 16 && s.bytes().all(|b| b.is_ascii_hexdigit());
    match key.strip_prefix(CHUNKS)?.split('.').collect::<Vec<_>>()[..] {
        [index, generation, nonce, upload]
            if hex(index) && generation.len() == 16 && hex(nonce) && hex(upload) =>
        {
            u64::from_str_radix(generation, 16).ok()
        }
        _ => None,
    }
}

/// Chunk sizes: powers of two from 64 KiB (the read cache's fill unit) to
/// 64 MiB.
pub fn valid_chunk_size(n: u64) -> bool {
    n.is_power_of_two() && (64 << 10..=64 << 20).contains(&n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            size: 10 << 20,
            chunk_size: 4 << 20,
            generation: 7,
            owner: Owner {
                lineage: "ab12".into(),
                nonce: "cd34".into(),
                host: "host-1".into(),
                pid: 42,
            },
            log: Some(("ab12".into(), 5)),
            chunks: [
                (0, "chunks/0.7.cd34".to_string()),
                (2, "chunks/2.7.cd34".into()),
            ]
            .into(),
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        assert_eq!(Manifest::parse(&m.encode()), Ok(m.clone()));
        assert_eq!(m.chunk_count(), 3);
        assert_eq!((m.covers("ab12"), m.covers("ffff")), (5, 0));
        // Format 1 (an older daemon's): no log line.
        let old = String::from_utf8(m.encode())
            .unwrap()
            .replace("holdfast-s3-volume 2", "holdfast-s3-volume 1")
            .replace("log ab12 5\n", "");
        let read = Manifest::parse(old.as_bytes()).unwrap();
        assert_eq!((read.log, read.chunks), (None, m.chunks));
    }

    #[test]
    fn chunk_keys() {
        let key = chunk_key(5, 0x1234, "00ff", 17);
        assert_eq!(key, "chunks/00000005.0000000000001234.00ff.11");
        assert_eq!(chunk_generation(&key), Some(0x1234));
        assert_ne!(key, chunk_key(5, 0x1234, "00ff", 18));
        for other in [
            "chunks/README",
            "chunks/5.1234.00ff.11",
            "chunks/00000005.0000000000001234.00ff",
            "chunks/00000005.0000000000001234.00ff.11.2",
            "chunks/00000005.000000000000123x.00ff.11",
            "other/00000005.0000000000001234.00ff.11",
        ] {
            assert_eq!(chunk_generation(other), None, "{other}");
        }
    }

    #[test]
    fn bad_manifests_are_refused() {
        let good = String::from_utf8(sample().encode()).unwrap();
        for (from, to) in [
            ("holdfast-s3-volume 2", "holdfast-s3-volume 3"),
            ("size 10485760", "size ten"),
            ("chunk-size 4194304", "chunk-size 4194305"),
            ("chunk 2 ", "chunk 3 "),
            ("chunk 2 chunks/2.7.cd34", "chunk 0 chunks/x"),
            ("chunks/0.7.cd34", "chunks/../x y"),
            ("owner ab12 cd34 host-1 42", "owner ab12"),
            ("generation 7\n", ""),
            ("log ab12 5", "log ab12 five"),
            ("log ab12 5", "log ab12"),
        ] {
            let bad = good.replace(from, to);
            assert_ne!(bad, good, "{from}");
            assert!(Manifest::parse(bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(Manifest::parse(&[0xff]).is_err());
    }
}
