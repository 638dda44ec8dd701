//! The write-ahead log: every write and discard is appended here (and
//! completes) before it reaches S3, and flush and FUA make it durable with
//! fsync. The log is a series of segment files; a checkpoint starts a new
//! segment, uploads the chunks the older ones touched, and deletes them once
//! a manifest naming those chunks is in S3.
//!
//! A record is a 32-byte header (little endian) and, for a write, its data:
//!
//! ```text
//! magic u32 "HFWL" | kind u8 (1 write, 2 zeroes) | 3 zero bytes
//! offset u64 | len u64 | crc32c u32 (header before it, then data) | u32 zero
//! ```
//!
//! Replay stops at the first record that does not check out in the last
//! segment (a write torn by a power loss; it was never flushed) and cuts it
//! off; anywhere else that is corruption, and the log is refused.
//!
//! Replay can be done in two steps ([`Scan`]): a handoff successor reads
//! the log while warming up, as its predecessor still appends to it, and
//! at ACTIVATE reads only what was appended since, so that the stall does
//! not grow with the log.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::extents::Source;

const MAGIC: u32 = u32::from_le_bytes(*b"HFWL");
const HEADER: u64 = 32;
/// The longest write record replay accepts (writes come from one slot).
const MAX_DATA: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Write = 1,
    Zeroes = 2,
}

/// A record, as replay finds it.
#[derive(Debug, Clone, Copy)]
pub struct Record {
    pub offset: u64,
    pub len: u64,
    pub src: Source,
}

struct Segment {
    number: u64,
    file: Arc<File>,
    len: u64,
    /// Device and inode, to tell whether the path still names this file.
    id: (u64, u64),
}

pub struct Wal {
    dir: PathBuf,
    /// Ascending; the last one takes appends.
    segments: Vec<Segment>,
    /// Bytes in all segments.
    bytes: u64,
}

/// What replay found.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct Replay {
    pub records: u64,
    /// Bytes of a torn last record cut off the end.
    pub torn: u64,
}

/// The log as far as it has been read: its segments, how far into each,
/// and how many records were read.
#[derive(Default)]
pub struct Scan {
    segments: Vec<Segment>,
    pub records: u64,
}

/// How a [`Wal::scan`] went on from an earlier one.
#[derive(Debug, PartialEq, Eq)]
pub enum Fit {
    /// It read on; records of segments before `oldest` are gone (a
    /// checkpoint put them in S3 and deleted them).
    Continued { oldest: u64 },
    /// The log is not the one the earlier scan read (a segment replaced or
    /// cut shorter): read it again from the start.
    Stale,
}

fn header(kind: Kind, offset: u64, len: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = kind as u8;
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:016x}.wal"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Why a record does not check out.
fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Reads one record at `pos` of a segment; `Ok(None)` at its clean end.
fn read_record(
    r: &mut impl Read,
    pos: u64,
    segment: u64,
    volume_size: u64,
) -> io::Result<Option<(Record, u64)>> {
    let mut h = [0u8; 32];
    let mut got = 0;
    while got < h.len() {
        match r.read(&mut h[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(bad("a record header is cut short")),
            n => got += n,
        }
    }
    if h[0..4] != MAGIC.to_le_bytes() {
        return Err(bad("bad record magic"));
    }
    let kind = match h[4] {
        1 => Kind::Write,
        2 => Kind::Zeroes,
        _ => return Err(bad("unknown record kind")),
    };
    let (offset, len) = (le64(&h, 8), le64(&h, 16));
    if offset.checked_add(len).is_none_or(|end| end > volume_size) || len == 0 {
        return Err(bad("record outside the volume"));
    }
    let data_len = match kind {
        Kind::Write if len > MAX_DATA => return Err(bad("record longer than any write")),
        Kind::Write => len,
        Kind::Zeroes => 0,
    };
    let mut data = vec![0u8; data_len as usize];
    r.read_exact(&mut data)
        .map_err(|_| bad("a record's data is cut short"))?;
    let crc = u32::from_le_bytes([h[24], h[25], h[26], h[27]]);
    if crate::crc32c::checksum(&[&h[..24], &data]) != crc {
        return Err(bad("record checksum mismatch"));
    }
    let src = Source {
        segment,
        data: (kind == Kind::Write).then_some(pos + HEADER),
    };
    Ok(Some((Record { offset, len, src }, HEADER + data_len)))
}

impl Wal {
    /// Opens (or creates) the log in `dir` and replays it, oldest first,
    /// into `apply`.
    #[cfg(test)]
    pub fn open(
        dir: &Path,
        volume_size: u64,
        apply: impl FnMut(Record),
    ) -> io::Result<(Self, Replay)> {
        let mut scan = Scan::default();
        let torn = match Self::scan(dir, volume_size, &mut scan, false, apply)? {
            (Fit::Continued { .. }, torn) => torn,
            (Fit::Stale, _) => return Err(io::Error::other("a new log changed under replay")),
        };
        let records = scan.records;
        Ok((Self::from_scan(dir, scan)?, Replay { records, torn }))
    }

    /// Reads the log in `dir` on from where `scan` ended, oldest record
    /// first, into `apply`; returns how that went and the bytes of a torn
    /// last record cut off. With `live`, another daemon may still be
    /// appending: the read ends at the first record that does not check
    /// out (perhaps half written) and changes nothing. Otherwise the log's
    /// owner is gone: a bad record is cut off the last segment as torn,
    /// and refused as corruption anywhere else.
    pub fn scan(
        dir: &Path,
        volume_size: u64,
        scan: &mut Scan,
        live: bool,
        mut apply: impl FnMut(Record),
    ) -> io::Result<(Fit, u64)> {
        std::fs::create_dir_all(dir)?;
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(n) = name
                .strip_suffix(".wal")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
            {
                numbers.push(n);
            }
        }
        numbers.sort_unstable();
        // What was read must still be there as it was, but for the oldest
        // segments, which a checkpoint deletes.
        let oldest = numbers.first().copied();
        let vanished_out_of_order = scan
            .segments
            .iter()
            .any(|s| !numbers.contains(&s.number) && oldest.is_none_or(|o| s.number > o));
        if vanished_out_of_order {
            return Ok((Fit::Stale, 0));
        }
        scan.segments.retain(|s| numbers.contains(&s.number));
        let read_up_to = scan.segments.last().map(|s| s.number);
        for seg in &scan.segments {
            let now = std::fs::metadata(segment_path(dir, seg.number))?;
            if (now.dev(), now.ino()) != seg.id || now.len() < seg.len {
                return Ok((Fit::Stale, 0));
            }
        }
        let unread_gap = numbers.iter().any(|n| {
            read_up_to.is_some_and(|l| *n < l) && !scan.segments.iter().any(|s| s.number == *n)
        });
        if unread_gap {
            return Ok((Fit::Stale, 0));
        }
        let oldest = oldest.unwrap_or(0);
        let last = numbers.last().copied();
        for number in numbers {
            if read_up_to.is_some_and(|l| number < l) {
                continue;
            }
            let path = segment_path(dir, number);
            if read_up_to != Some(number) {
                // Writable even in a live scan: the last segment takes
                // this daemon's appends once it holds the lease.
                let file = match OpenOptions::new().read(true).write(true).open(&path) {
                    Ok(f) => f,
                    // Deleted since it was listed (by a checkpoint).
                    Err(e) if live && e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                let meta = file.metadata()?;
                scan.segments.push(Segment {
                    number,
                    file: Arc::new(file),
                    len: 0,
                    id: (meta.dev(), meta.ino()),
                });
            }
            let Some(seg) = scan.segments.last_mut() else {
                break;
            };
            let mut file = &*seg.file;
            file.seek(SeekFrom::Start(seg.len))?;
            let mut r = BufReader::with_capacity(1 << 20, file);
            loop {
                let pos = seg.len;
                match read_record(&mut r, pos, number, volume_size) {
                    Ok(None) => break,
                    Ok(Some((rec, n))) => {
                        apply(rec);
                        scan.records += 1;
                        seg.len += n;
                    }
                    // Maybe an append in progress: the next scan reads on
                    // from here.
                    Err(_) if live => return Ok((Fit::Continued { oldest }, 0)),
                    Err(e) if Some(number) == last => {
                        let size = seg.file.metadata()?.len();
                        crate::log(&format!(
                            "log {}: {e} at byte {pos}: cutting off a torn last record \
                             ({} bytes; it was never flushed)",
                            path.display(),
                            size - pos
                        ));
                        seg.file.set_len(pos)?;
                        seg.file.sync_all()?;
                        return Ok((Fit::Continued { oldest }, size - pos));
                    }
                    Err(e) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!(
                                "log {} is corrupt ({e} at byte {pos}) and is not its last \
                                 segment: refusing to serve, since acknowledged writes may be \
                                 lost; move the log aside to serve what S3 holds",
                                path.display()
                            ),
                        ));
                    }
                }
            }
        }
        Ok((Fit::Continued { oldest }, 0))
    }

    /// The log that `scan` read to its end, to append to (a scan that was
    /// not `live`).
    pub fn from_scan(dir: &Path, scan: Scan) -> io::Result<Self> {
        let mut wal = Self {
            dir: dir.to_path_buf(),
            bytes: scan.segments.iter().map(|s| s.len).sum(),
            segments: scan.segments,
        };
        if wal.segments.is_empty() {
            wal.create_segment(1)?;
        }
        Ok(wal)
    }

    fn create_segment(&mut self, number: u64) -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(segment_path(&self.dir, number))?;
        sync_dir(&self.dir)?;
        let meta = file.metadata()?;
        self.segments.push(Segment {
            number,
            file: Arc::new(file),
            len: 0,
            id: (meta.dev(), meta.ino()),
        });
        Ok(())
    }

    fn current(&mut self) -> io::Result<&mut Segment> {
        self.segments
            .last_mut()
            .ok_or_else(|| io::Error::other("the log has no segment"))
    }

    /// Bytes in the log.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends a record; returns where its data is.
    pub fn append(&mut self, kind: Kind, offset: u64, len: u64, data: &[u8]) -> io::Result<Source> {
        let mut h = header(kind, offset, len);
        let crc = crate::crc32c::checksum(&[&h[..24], data]);
        h[24..28].copy_from_slice(&crc.to_le_bytes());
        let seg = self.current()?;
        let at = seg.len;
        let written = seg
            .file
            .write_all_at(&h, at)
            .and_then(|()| seg.file.write_all_at(data, at + HEADER));
        if let Err(e) = written {
            // Leave no partial record behind for the next append to follow.
            let _ = seg.file.set_len(at);
            return Err(e);
        }
        let n = HEADER + data.len() as u64;
        seg.len += n;
        let src = Source {
            segment: seg.number,
            data: (kind == Kind::Write).then_some(at + HEADER),
        };
        self.bytes += n;
        Ok(src)
    }

    /// The current segment's file, to fsync without holding the log.
    pub fn current_file(&self) -> Option<Arc<File>> {
        self.segments.last().map(|s| s.file.clone())
    }

    /// A segment's file, for reading a record's data.
    pub fn file(&self, segment: u64) -> Option<Arc<File>> {
        self.segments
            .iter()
            .find(|s| s.number == segment)
            .map(|s| s.file.clone())
    }

    /// Makes the current segment durable and starts a new one; returns its
    /// number (every record before it is in an older segment).
    pub fn rotate(&mut self) -> io::Result<u64> {
        let seg = self.current()?;
        seg.file.sync_data()?;
        let next = seg.number + 1;
        self.create_segment(next)?;
        Ok(next)
    }

    /// Deletes the segments before `number` (a checkpoint put them in S3).
    pub fn remove_before(&mut self, number: u64) -> io::Result<()> {
        let mut keep = Vec::new();
        for seg in std::mem::take(&mut self.segments) {
            if seg.number < number {
                std::fs::remove_file(segment_path(&self.dir, seg.number))?;
                self.bytes -= seg.len;
            } else {
                keep.push(seg);
            }
        }
        self.segments = keep;
        sync_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("holdfast-wal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// Offset, length and data (none for zeroes) of a replayed record.
    type Replayed = (u64, u64, Option<Vec<u8>>);

    fn replay(d: &Path) -> (Vec<Replayed>, Replay) {
        let mut recs = Vec::new();
        let (wal, r) = Wal::open(d, 1 << 20, |rec| recs.push(rec)).unwrap();
        let out = recs
            .into_iter()
            .map(|rec| {
                let data = rec.src.data.map(|at| {
                    let mut b = vec![0u8; rec.len as usize];
                    wal.file(rec.src.segment)
                        .unwrap()
                        .read_exact_at(&mut b, at)
                        .unwrap();
                    b
                });
                (rec.offset, rec.len, data)
            })
            .collect();
        (out, r)
    }

    /// A successor's two-step replay: a live scan while the owner appends
    /// (one append half written), rotates and drops a checkpointed
    /// segment; then a scan that reads on. It finds what a full replay
    /// finds, and a log replaced meanwhile is read again from the start.
    #[test]
    fn scan_in_two_steps() {
        let d = dir("two-steps");
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        wal.append(Kind::Write, 0, 3, b"old").unwrap();
        let cut = wal.rotate().unwrap();
        wal.append(Kind::Write, 100, 3, b"abc").unwrap();
        let half = wal.segments.last().unwrap().len;
        wal.segments
            .last()
            .unwrap()
            .file
            .write_all_at(&header(Kind::Write, 200, 3), half)
            .unwrap();

        let mut scan = Scan::default();
        let mut seen = Vec::new();
        let fit = Wal::scan(&d, 1 << 20, &mut scan, true, |r| seen.push(r.offset)).unwrap();
        assert_eq!(fit, (Fit::Continued { oldest: 1 }, 0));
        assert_eq!(seen, [0, 100]);

        wal.append(Kind::Write, 200, 3, b"def").unwrap();
        wal.rotate().unwrap();
        wal.append(Kind::Zeroes, 300, 10, &[]).unwrap();
        wal.remove_before(cut).unwrap();
        drop(wal);
        let fit = Wal::scan(&d, 1 << 20, &mut scan, false, |r| seen.push(r.offset)).unwrap();
        assert_eq!(fit, (Fit::Continued { oldest: cut }, 0));
        assert_eq!(seen, [0, 100, 200, 300]);
        let mut wal = Wal::from_scan(&d, scan).unwrap();
        assert_eq!(wal.bytes(), 3 * HEADER + 6);
        wal.append(Kind::Write, 400, 3, b"ghi").unwrap();
        drop(wal);
        let (recs, _) = replay(&d);
        assert_eq!(
            recs.iter().map(|r| r.0).collect::<Vec<_>>(),
            [100, 200, 300, 400]
        );

        // The log moved aside and a new one started: the scan is stale.
        let mut scan = Scan::default();
        Wal::scan(&d, 1 << 20, &mut scan, true, |_| {}).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        wal.append(Kind::Write, 0, 3, b"new").unwrap();
        let fit = Wal::scan(&d, 1 << 20, &mut scan, false, |_| {}).unwrap();
        assert_eq!(fit.0, Fit::Stale);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn append_rotate_replay_and_torn_tail() {
        let d = dir("basic");
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        wal.append(Kind::Write, 4096, 5, b"hello").unwrap();
        let cut = wal.rotate().unwrap();
        wal.append(Kind::Zeroes, 0, 8192, &[]).unwrap();
        wal.append(Kind::Write, 10, 3, b"abc").unwrap();
        assert_eq!(wal.bytes(), 3 * HEADER + 8);
        drop(wal);
        let (recs, r) = replay(&d);
        assert_eq!(r.records, 3);
        assert_eq!(recs[0], (4096, 5, Some(b"hello".to_vec())));
        assert_eq!(recs[1], (0, 8192, None));
        assert_eq!(recs[2], (10, 3, Some(b"abc".to_vec())));

        // A torn append at the end of the last segment is cut off.
        let last = segment_path(&d, cut);
        let f = OpenOptions::new().append(true).open(&last).unwrap();
        f.write_all_at(&header(Kind::Write, 0, 100), f.metadata().unwrap().len())
            .unwrap();
        let (recs, r) = replay(&d);
        assert_eq!((recs.len(), r.torn), (3, 32));

        // The same damage in an older segment is refused.
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        wal.rotate().unwrap();
        drop(wal);
        let f = OpenOptions::new().write(true).open(&last).unwrap();
        f.write_all_at(b"X", HEADER + 1).unwrap();
        let err = Wal::open(&d, 1 << 20, |_| {}).err().unwrap();
        assert!(err.to_string().contains("corrupt"), "{err}");

        // After a checkpoint the old segments go.
        std::fs::remove_dir_all(&d).unwrap();
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        wal.append(Kind::Write, 0, 1, b"x").unwrap();
        let cut = wal.rotate().unwrap();
        wal.append(Kind::Write, 1, 1, b"y").unwrap();
        wal.remove_before(cut).unwrap();
        assert_eq!(wal.bytes(), HEADER + 1);
        drop(wal);
        let (recs, _) = replay(&d);
        assert_eq!(recs, [(1, 1, Some(b"y".to_vec()))]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn records_outside_the_volume_are_refused() {
        let d = dir("bounds");
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        wal.append(Kind::Write, (1 << 20) - 1, 2, b"zz").unwrap();
        drop(wal);
        // Last segment: cut off as torn, never applied.
        let (recs, r) = replay(&d);
        assert!(recs.is_empty());
        assert_eq!(r.torn, HEADER + 2);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
