//! The write-ahead log: every write and discard is appended here (and
//! completes) before it reaches S3, and flush and FUA make it durable with
//! fsync. The log is a series of segment files; a checkpoint starts a new
//! segment, uploads the chunks the older ones touched, and deletes them once
//! a manifest naming those chunks is in S3.
//!
//! A record is a 48-byte header (little endian) and, for a write, its data:
//!
//! ```text
//! magic u32 "HFW2" | kind u8 (1 write, 2 zeroes) | 3 zero bytes
//! offset u64 | len u64 | segment u64 | flushed u64
//! crc32c u32 (header before it, the record's position u64, then data) | u32 zero
//! ```
//!
//! `flushed` is how many bytes of the segment an fsync had made durable
//! when the record was appended, so replay can tell a torn tail (never
//! flushed; a power loss may keep later pages and lose earlier ones) from
//! damage to what a flush promised. The segment number and the position in
//! the checksum tie a record to its place. Records of the older format
//! ("HFWL": a 32-byte header without segment and flushed, the checksum over
//! the header's first 24 bytes and the data) are still read, for a handoff
//! from a daemon that wrote them.
//!
//! Replay stops at the first record that does not check out in the last
//! segment. If a valid record after it says the bad one had been flushed,
//! that is damage and the log is refused; otherwise it is a torn tail,
//! moved aside to `NUMBER.torn-POS` and cut off. A bad record anywhere else
//! is corruption, and the log is refused.
//!
//! Once an fsync of the log fails, the log is failed: appends and flushes
//! return EIO until a daemon replays it again, since the kernel may have
//! dropped the pages it could not write. Data read back from the log is
//! checked against its record's checksum.
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

const MAGIC: u32 = u32::from_le_bytes(*b"HFW2");
const HEADER: u64 = 48;
/// The older format, read but no longer written.
const MAGIC_V1: u32 = u32::from_le_bytes(*b"HFWL");
const HEADER_V1: u64 = 32;
/// The longest write record replay accepts (writes come from one slot).
const MAX_DATA: u64 = 64 << 20;
/// How much of a damaged segment's tail is searched at a time for valid
/// records after the damage.
const SEARCH_WINDOW: usize = 1 << 20;

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

/// A record's header, checked but for the checksum.
struct Header {
    kind: Kind,
    offset: u64,
    len: u64,
    /// Bytes of the segment durable when it was appended (0 for "HFWL").
    flushed: u64,
    /// The header's own length.
    size: u64,
    crc: u32,
}

impl Header {
    /// Bytes of data after the header.
    fn data_len(&self) -> u64 {
        match self.kind {
            Kind::Write => self.len,
            Kind::Zeroes => 0,
        }
    }
}

struct Segment {
    number: u64,
    file: Arc<File>,
    len: u64,
    /// Bytes an fsync has made durable.
    flushed: u64,
    /// Device and inode, to tell whether the path still names this file.
    id: (u64, u64),
}

pub struct Wal {
    dir: PathBuf,
    /// Ascending; the last one takes appends.
    segments: Vec<Segment>,
    /// Bytes in all segments.
    bytes: u64,
    /// Why the log failed (an fsync error), if it did.
    failed: Option<String>,
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

fn header(kind: Kind, offset: u64, len: u64, segment: u64, flushed: u64) -> [u8; 48] {
    let mut h = [0u8; 48];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4] = kind as u8;
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h[24..32].copy_from_slice(&segment.to_le_bytes());
    h[32..40].copy_from_slice(&flushed.to_le_bytes());
    h
}

/// The checksum of a record whose header `h` (as long as its format's)
/// sits at `pos`.
fn checksum(h: &[u8], pos: u64, data: &[u8]) -> u32 {
    if h.len() as u64 == HEADER_V1 {
        crate::crc32c::checksum(&[&h[..24], data])
    } else {
        crate::crc32c::checksum(&[&h[..40], &pos.to_le_bytes(), data])
    }
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:016x}.wal"))
}

/// fsync(2), or in tests an error when one is asked for.
fn sync_data(file: &File) -> io::Result<()> {
    #[cfg(test)]
    {
        tests::SYNCS.with(|n| n.set(n.get() + 1));
        let nth = tests::FAIL_SYNC.with(|f| f.replace(f.get().saturating_sub(1)));
        if nth == 1 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
    }
    file.sync_data()
}

pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    sync_data(&File::open(dir)?)
}

/// Creates `dir` and its missing parents durably: each new entry's parent
/// is synced, so that after a power loss the directory (and the log or
/// lineage in it) is there, rather than a daemon that refuses to serve.
pub(super) fn ensure_dir(dir: &Path) -> io::Result<()> {
    let parent = match dir.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => return Ok(()),
    };
    let made = match std::fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            ensure_dir(parent)?;
            std::fs::create_dir(dir)
        }
        made => made,
    };
    match made {
        Ok(()) => sync_dir(parent),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Why a record does not check out.
fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// Reads a file from a position, for [`Read`] users that must not move a
/// shared file offset.
struct At<'a> {
    file: &'a File,
    pos: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Reads a record header of segment `segment`, with its raw bytes (as
/// long as its format's header); `Ok(None)` at a clean end.
fn read_header(
    r: &mut impl Read,
    segment: u64,
    volume_size: u64,
) -> io::Result<Option<(Header, [u8; 48])>> {
    let mut h = [0u8; 48];
    let mut got = 0;
    while got < HEADER_V1 as usize {
        match r.read(&mut h[got..HEADER_V1 as usize])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(bad("a record header is cut short")),
            n => got += n,
        }
    }
    let (size, flushed, crc) = match le32(&h, 0) {
        MAGIC_V1 => (HEADER_V1, 0, le32(&h, 24)),
        MAGIC => {
            r.read_exact(&mut h[HEADER_V1 as usize..])
                .map_err(|_| bad("a record header is cut short"))?;
            if le64(&h, 24) != segment {
                return Err(bad("a record of another segment"));
            }
            (HEADER, le64(&h, 32), le32(&h, 40))
        }
        _ => return Err(bad("bad record magic")),
    };
    let kind = match h[4] {
        1 => Kind::Write,
        2 => Kind::Zeroes,
        _ => return Err(bad("unknown record kind")),
    };
    let (offset, len) = (le64(&h, 8), le64(&h, 16));
    if offset.checked_add(len).is_none_or(|end| end > volume_size) || len == 0 {
        return Err(bad("record outside the volume"));
    }
    if kind == Kind::Write && len > MAX_DATA {
        return Err(bad("record longer than any write"));
    }
    let header = Header {
        kind,
        offset,
        len,
        flushed,
        size,
        crc,
    };
    Ok(Some((header, h)))
}

/// Reads one record at `pos` of a segment: the record, its length and the
/// bytes it says were flushed; `Ok(None)` at the segment's clean end.
fn read_record(
    r: &mut impl Read,
    pos: u64,
    segment: u64,
    volume_size: u64,
) -> io::Result<Option<(Record, u64, u64)>> {
    let Some((h, raw)) = read_header(r, segment, volume_size)? else {
        return Ok(None);
    };
    let mut data = vec![0u8; h.data_len() as usize];
    r.read_exact(&mut data)
        .map_err(|_| bad("a record's data is cut short"))?;
    if checksum(&raw[..h.size as usize], pos, &data) != h.crc {
        return Err(bad("record checksum mismatch"));
    }
    let src = Source {
        segment,
        record: pos,
        data: (h.kind == Kind::Write).then_some(pos + h.size),
    };
    let rec = Record {
        offset: h.offset,
        len: h.len,
        src,
    };
    Ok(Some((rec, h.size + h.data_len(), h.flushed)))
}

/// Reads `dst.len()` bytes of the write record at `src` (its data from
/// `src.data` on) from `file`, after checking the whole record's checksum:
/// the page cache may have dropped pages the disk never took.
pub fn read_checked(file: &File, src: Source, dst: &mut [u8]) -> io::Result<()> {
    let mut r = At {
        file,
        pos: src.record,
    };
    let (h, raw) = read_header(&mut r, src.segment, u64::MAX)?
        .ok_or_else(|| bad("a logged record is past the segment's end"))?;
    let start = src.record + h.size;
    let within = src.data.and_then(|d| d.checked_sub(start));
    let within = within
        .filter(|w| w + dst.len() as u64 <= h.data_len())
        .ok_or_else(|| bad("a logged extent is outside its record"))?;
    let whole = within == 0 && dst.len() as u64 == h.data_len();
    let mut data = if whole {
        Vec::new()
    } else {
        vec![0u8; h.data_len() as usize]
    };
    // A piece that is the whole record is read in place, without a copy.
    let buf = if whole { &mut *dst } else { &mut data[..] };
    file.read_exact_at(buf, start)?;
    if checksum(&raw[..h.size as usize], src.record, buf) != h.crc {
        return Err(bad("record checksum mismatch"));
    }
    if !whole {
        dst.copy_from_slice(&data[within as usize..within as usize + dst.len()]);
    }
    Ok(())
}

/// The highest `flushed` that a valid record in `[from, end)` of a segment
/// claims, with that record's position: a bad record before it that the
/// claim covers was flushed, so it is damage, not a torn tail.
fn flushed_claim_after(
    file: &File,
    segment: u64,
    from: u64,
    end: u64,
    volume_size: u64,
) -> io::Result<Option<(u64, u64)>> {
    let magic = MAGIC.to_le_bytes();
    let mut best: Option<(u64, u64)> = None;
    let mut window = vec![0u8; SEARCH_WINDOW];
    let mut at = from;
    while at < end {
        let n = (end - at).min(SEARCH_WINDOW as u64) as usize;
        file.read_exact_at(&mut window[..n], at)?;
        for i in (0..n).filter(|&i| window[i..n].starts_with(&magic)) {
            let pos = at + i as u64;
            let mut r = At { file, pos };
            if let Ok(Some((_, _, flushed))) = read_record(&mut r, pos, segment, volume_size)
                && best.is_none_or(|(f, _)| flushed > f)
            {
                best = Some((flushed, pos));
            }
        }
        if at + n as u64 == end {
            break;
        }
        // A magic cut by the window's end is found by the next window.
        at += (n - (magic.len() - 1)) as u64;
    }
    Ok(best)
}

/// Copies `[from, end)` of a segment to `NUMBER.torn-FROM` beside it,
/// durably, before it is cut off: what replay takes for a torn tail may be
/// an operator's to judge.
fn move_aside(dir: &Path, number: u64, file: &File, from: u64, end: u64) -> io::Result<PathBuf> {
    let path = dir.join(format!("{number:016x}.torn-{from}"));
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let mut buf = vec![0u8; SEARCH_WINDOW];
    let mut at = from;
    while at < end {
        let n = (end - at).min(SEARCH_WINDOW as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        out.write_all_at(&buf[..n], at - from)?;
        at += n as u64;
    }
    sync_data(&out)?;
    sync_dir(dir)?;
    Ok(path)
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
        Ok((Self::from_scan(dir, scan, 0)?, Replay { records, torn }))
    }

    /// Reads the log in `dir` on from where `scan` ended, oldest record
    /// first, into `apply`; returns how that went and the bytes of a torn
    /// last record cut off. With `live`, another daemon may still be
    /// appending: the read ends at the first record that does not check
    /// out (perhaps half written) and changes nothing. Otherwise the log's
    /// owner is gone: a bad record is cut off the last segment as torn
    /// (unless a later record says it was flushed), and refused as
    /// corruption anywhere else.
    pub fn scan(
        dir: &Path,
        volume_size: u64,
        scan: &mut Scan,
        live: bool,
        mut apply: impl FnMut(Record),
    ) -> io::Result<(Fit, u64)> {
        ensure_dir(dir)?;
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
                    // Known durable only once this daemon flushes.
                    flushed: 0,
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
                    Ok(Some((rec, n, _))) => {
                        apply(rec);
                        scan.records += 1;
                        seg.len += n;
                    }
                    // Maybe an append in progress: the next scan reads on
                    // from here.
                    Err(_) if live => return Ok((Fit::Continued { oldest }, 0)),
                    Err(e) if Some(number) == last => {
                        let torn = cut_torn_tail(dir, seg, volume_size, &e)?;
                        return Ok((Fit::Continued { oldest }, torn));
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
    /// not `live`). The segments before `covered` are in S3 already (the
    /// manifest says so): they are deleted, and a log left empty goes on
    /// at `covered`, whose records the manifest does not cover.
    pub fn from_scan(dir: &Path, scan: Scan, covered: u64) -> io::Result<Self> {
        let mut wal = Self {
            dir: dir.to_path_buf(),
            bytes: scan.segments.iter().map(|s| s.len).sum(),
            segments: scan.segments,
            failed: None,
        };
        let stale: Vec<u64> = wal
            .segments
            .iter()
            .map(|s| s.number)
            .filter(|&n| n < covered)
            .collect();
        if let (Some(first), Some(last)) = (stale.first(), stale.last()) {
            crate::log(&format!(
                "log {}: segments {first} to {last} are in S3 already (its manifest covers \
                 the log up to segment {covered}): deleted, not replayed",
                dir.display()
            ));
            wal.remove_before(covered)?;
        }
        if wal.segments.is_empty() {
            wal.create_segment(covered.max(1))?;
        }
        Ok(wal)
    }

    /// Marks the log failed: nothing more is appended or promised durable.
    fn fail(&mut self, what: &str, e: &io::Error) -> io::Error {
        if self.failed.is_none() {
            let why = format!("{what} failed ({e})");
            crate::log(&format!(
                "log {}: {why}: writes and flushes fail with EIO from now on; restart the \
                 daemon to replay the log from the disk",
                self.dir.display()
            ));
            self.failed = Some(why);
        }
        io::Error::from_raw_os_error(libc::EIO)
    }

    /// `Ok` unless the log has failed.
    pub fn healthy(&self) -> io::Result<()> {
        match self.failed {
            None => Ok(()),
            Some(_) => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    fn create_segment(&mut self, number: u64) -> io::Result<()> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(segment_path(&self.dir, number))?;
        let meta = file.metadata()?;
        self.segments.push(Segment {
            number,
            file: Arc::new(file),
            len: 0,
            flushed: 0,
            id: (meta.dev(), meta.ino()),
        });
        // Taken even if the directory's sync fails, so that nothing tries
        // to create it again.
        sync_dir(&self.dir).map_err(|e| self.fail("syncing the log's directory", &e))
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
        self.healthy()?;
        let seg = self.current()?;
        let at = seg.len;
        let mut h = header(kind, offset, len, seg.number, seg.flushed);
        let crc = checksum(&h, at, data);
        h[40..44].copy_from_slice(&crc.to_le_bytes());
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
            record: at,
            data: (kind == Kind::Write).then_some(at + HEADER),
        };
        self.bytes += n;
        Ok(src)
    }

    /// What a flush syncs: the current segment's file, its number and
    /// length (to fsync without holding the log, then [`Wal::synced`]).
    pub fn to_sync(&self) -> io::Result<Option<(Arc<File>, u64, u64)>> {
        self.healthy()?;
        Ok(self
            .segments
            .last()
            .map(|s| (s.file.clone(), s.number, s.len)))
    }

    /// Records how the fsync of [`Wal::to_sync`] went: what it covered is
    /// durable, or the log has failed.
    pub fn synced(&mut self, number: u64, len: u64, result: io::Result<()>) -> io::Result<()> {
        if let Err(e) = result {
            return Err(self.fail("fsync", &e));
        }
        self.healthy()?;
        if let Some(seg) = self.segments.iter_mut().find(|s| s.number == number) {
            seg.flushed = seg.flushed.max(len);
        }
        Ok(())
    }

    /// Makes the current segment durable (the caller's, outside the log's
    /// lock, with [`Wal::to_sync`] and [`Wal::synced`]).
    pub fn sync(file: &File) -> io::Result<()> {
        sync_data(file)
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
        self.healthy()?;
        let seg = self.current()?;
        let (number, len) = (seg.number, seg.len);
        let synced = sync_data(&seg.file);
        self.synced(number, len, synced)?;
        self.create_segment(number + 1)?;
        Ok(number + 1)
    }

    /// Deletes the segments before `number` (a checkpoint put them in S3),
    /// oldest first: if an unlink fails, every segment after it is still
    /// there, so a replay applies them in order and ends where the log
    /// does.
    pub fn remove_before(&mut self, number: u64) -> io::Result<()> {
        while let Some(seg) = self.segments.first().filter(|s| s.number < number) {
            match std::fs::remove_file(segment_path(&self.dir, seg.number)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.bytes -= seg.len;
            self.segments.remove(0);
        }
        sync_dir(&self.dir).map_err(|e| self.fail("syncing the log's directory", &e))
    }
}

/// Cuts a bad last record, and all after it, off the last segment as a
/// torn tail (moved aside first); refuses if a valid record after it says
/// it was flushed. Returns the bytes cut.
fn cut_torn_tail(dir: &Path, seg: &Segment, volume_size: u64, e: &io::Error) -> io::Result<u64> {
    let pos = seg.len;
    let path = segment_path(dir, seg.number);
    let size = seg.file.metadata()?.len();
    let claim = flushed_claim_after(&seg.file, seg.number, pos + 1, size, volume_size)?;
    if let Some((flushed, at)) = claim.filter(|(f, _)| *f > pos) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "log {} is damaged ({e} at byte {pos}) in what a flush made durable: the \
                 record at byte {at} says the first {flushed} bytes were flushed. Refusing to \
                 serve, since acknowledged writes would be lost; restore the log from a copy, \
                 or move it aside to serve what S3 holds (losing the writes only it has)",
                path.display()
            ),
        ));
    }
    let aside = move_aside(dir, seg.number, &seg.file, pos, size)?;
    crate::log(&format!(
        "log {}: {e} at byte {pos}: cutting off a torn tail ({} bytes, never flushed; kept \
         in {})",
        path.display(),
        size - pos,
        aside.display()
    ));
    seg.file.set_len(pos)?;
    sync_data(&seg.file)?;
    Ok(size - pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Makes this thread's Nth fsync from now (1: the next) fail with
        /// EIO.
        pub static FAIL_SYNC: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        /// How many fsyncs this thread made.
        pub static SYNCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// A flush as the backend does it.
    fn flush(wal: &mut Wal) -> io::Result<()> {
        let (file, number, len) = wal.to_sync()?.unwrap();
        let synced = Wal::sync(&file);
        wal.synced(number, len, synced)
    }

    fn flip(path: &Path, at: u64) {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 1], at).unwrap();
    }

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
            .write_all_at(&header(Kind::Write, 200, 3, 2, 0), half)
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
        let mut wal = Wal::from_scan(&d, scan, 0).unwrap();
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
        f.write_all_at(
            &header(Kind::Write, 0, 100, cut, 0),
            f.metadata().unwrap().len(),
        )
        .unwrap();
        let (recs, r) = replay(&d);
        assert_eq!((recs.len(), r.torn), (3, HEADER));

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

    /// The issue's reproduction: three writes, each flushed; one byte of
    /// the first flipped. The later records say it was flushed, so the log
    /// is refused and left as it is, not cut to nothing.
    #[test]
    fn damage_to_flushed_records_is_refused() {
        let d = dir("flushed-damage");
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        for i in 0..3u64 {
            wal.append(Kind::Write, i << 16, 1 << 16, &[i as u8 + 1; 1 << 16])
                .unwrap();
            flush(&mut wal).unwrap();
        }
        drop(wal);
        let seg = segment_path(&d, 1);
        let size = std::fs::metadata(&seg).unwrap().len();
        flip(&seg, 40);
        let err = Wal::open(&d, 1 << 20, |_| {}).err().unwrap();
        assert!(err.to_string().contains("a flush made durable"), "{err}");
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), size);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A damaged record that no later record says was flushed is a torn
    /// tail, even with a valid record after it (a power loss keeps pages
    /// in any order): cut off, and kept beside the log.
    #[test]
    fn torn_tail_is_moved_aside() {
        let d = dir("torn-aside");
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        wal.append(Kind::Write, 0, 4, b"kept").unwrap();
        flush(&mut wal).unwrap();
        let torn_at = wal.segments[0].len;
        wal.append(Kind::Write, 4, 4, b"torn").unwrap();
        wal.append(Kind::Write, 8, 4, b"late").unwrap();
        drop(wal);
        let seg = segment_path(&d, 1);
        let tail = std::fs::read(&seg).unwrap()[torn_at as usize..].to_vec();
        flip(&seg, torn_at + HEADER);
        let (recs, r) = replay(&d);
        assert_eq!(recs, [(0, 4, Some(b"kept".to_vec()))]);
        assert_eq!(r.torn, tail.len() as u64);
        let aside = std::fs::read(d.join(format!("{:016x}.torn-{torn_at}", 1))).unwrap();
        assert_eq!(aside.len(), tail.len());
        assert_eq!(aside[HEADER as usize + 1..], tail[HEADER as usize + 1..]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A failed unlink of a covered segment leaves it, and every segment
    /// after it, in the log: reads and flushes go on, and a later remove
    /// finishes the job.
    #[test]
    fn failed_unlink_keeps_every_segment() {
        let d = dir("unlink");
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        let src = wal.append(Kind::Write, 0, 3, b"one").unwrap();
        wal.rotate().unwrap();
        wal.append(Kind::Write, 3, 3, b"two").unwrap();
        let cut = wal.rotate().unwrap();
        // unlink(2) of a directory fails (EISDIR).
        let first = segment_path(&d, 1);
        let moved = d.join("moved");
        std::fs::rename(&first, &moved).unwrap();
        std::fs::create_dir(&first).unwrap();
        let bytes = wal.bytes();
        assert!(wal.remove_before(cut).is_err());
        assert_eq!((wal.segments.len(), wal.bytes()), (3, bytes));
        let mut b = [0u8; 3];
        read_checked(&wal.file(1).unwrap(), src, &mut b).unwrap();
        assert_eq!(&b, b"one");
        flush(&mut wal).unwrap();
        std::fs::remove_dir(&first).unwrap();
        std::fs::rename(&moved, &first).unwrap();
        wal.remove_before(cut).unwrap();
        assert_eq!((wal.segments.len(), wal.bytes()), (1, 0));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// One failed fsync fails the log for good: the next flush does not
    /// return 0, and nothing more is appended or rotated.
    #[test]
    fn failed_fsync_fails_the_log() {
        let d = dir("fsync");
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        wal.append(Kind::Write, 0, 3, b"one").unwrap();
        FAIL_SYNC.with(|f| f.set(1));
        let eio = Some(libc::EIO);
        assert_eq!(flush(&mut wal).err().unwrap().raw_os_error(), eio);
        assert_eq!(wal.to_sync().err().unwrap().raw_os_error(), eio);
        let append = wal.append(Kind::Write, 0, 3, b"two");
        assert_eq!(append.err().unwrap().raw_os_error(), eio);
        assert_eq!(wal.rotate().err().unwrap().raw_os_error(), eio);
        // The checkpointer's fsync (rotate) fails it as well.
        drop(wal);
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        FAIL_SYNC.with(|f| f.set(1));
        assert!(wal.rotate().is_err());
        assert_eq!(flush(&mut wal).err().unwrap().raw_os_error(), eio);
        // So does the directory's sync after a new segment; the segment is
        // kept, so nothing makes it again (EEXIST) either.
        drop(wal);
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        let before = wal.segments.len();
        FAIL_SYNC.with(|f| f.set(2));
        assert_eq!(wal.rotate().err().unwrap().raw_os_error(), eio);
        assert_eq!(wal.segments.len(), before + 1);
        assert_eq!(wal.rotate().err().unwrap().raw_os_error(), eio);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A logged record whose bytes changed on the disk reads as an error,
    /// not as data.
    #[test]
    fn reads_check_the_record() {
        let d = dir("read-check");
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        let src = wal.append(Kind::Write, 0, 8, b"abcdefgh").unwrap();
        let mut b = [0u8; 4];
        let part = Source {
            data: src.data.map(|d| d + 2),
            ..src
        };
        read_checked(&wal.file(1).unwrap(), part, &mut b).unwrap();
        assert_eq!(&b, b"cdef");
        let mut all = [0u8; 8];
        read_checked(&wal.file(1).unwrap(), src, &mut all).unwrap();
        assert_eq!(&all, b"abcdefgh");
        flip(&segment_path(&d, 1), HEADER + 7);
        assert!(read_checked(&wal.file(1).unwrap(), part, &mut b).is_err());
        assert!(read_checked(&wal.file(1).unwrap(), src, &mut all).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Records of the older format (an older daemon's log, in a handoff)
    /// replay, and this daemon appends after them.
    #[test]
    fn older_records_replay() {
        let d = dir("v1");
        std::fs::create_dir_all(&d).unwrap();
        let mut h = [0u8; 32];
        h[0..4].copy_from_slice(&MAGIC_V1.to_le_bytes());
        h[4] = Kind::Write as u8;
        h[8..16].copy_from_slice(&5u64.to_le_bytes());
        h[16..24].copy_from_slice(&3u64.to_le_bytes());
        let crc = checksum(&h, 0, b"old");
        h[24..28].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(segment_path(&d, 1), [&h[..], b"old"].concat()).unwrap();
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        wal.append(Kind::Write, 9, 3, b"new").unwrap();
        drop(wal);
        let (recs, _) = replay(&d);
        assert_eq!(
            recs,
            [(5, 3, Some(b"old".to_vec())), (9, 3, Some(b"new".to_vec()))]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Each directory made is synced in its parent (one fsync per level
    /// made), and one already there costs nothing.
    #[test]
    fn directories_are_made_durably() {
        let d = dir("ensure");
        let syncs = || SYNCS.with(|n| n.get());
        let before = syncs();
        ensure_dir(&d.join("a/b")).unwrap();
        assert!(d.join("a/b").is_dir());
        assert_eq!(syncs() - before, 3);
        let before = syncs();
        ensure_dir(&d.join("a/b")).unwrap();
        assert_eq!(syncs(), before);
        std::fs::write(d.join("file"), b"").unwrap();
        assert!(ensure_dir(&d.join("file")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Segments a manifest covers are deleted, not replayed, and a log
    /// they leave empty goes on after them (not at 1, which a later
    /// replay would skip as covered).
    #[test]
    fn covered_segments_are_skipped() {
        let d = dir("covered");
        let (mut wal, _) = Wal::open(&d, 1 << 20, |_| {}).unwrap();
        wal.append(Kind::Write, 0, 3, b"old").unwrap();
        wal.rotate().unwrap();
        wal.append(Kind::Write, 3, 3, b"new").unwrap();
        drop(wal);
        let mut scan = Scan::default();
        Wal::scan(&d, 1 << 20, &mut scan, false, |_| {}).unwrap();
        let wal = Wal::from_scan(&d, scan, 2).unwrap();
        assert_eq!(
            wal.segments.iter().map(|s| s.number).collect::<Vec<_>>(),
            [2]
        );
        drop(wal);
        let (recs, _) = replay(&d);
        assert_eq!(recs, [(3, 3, Some(b"new".to_vec()))]);

        let mut scan = Scan::default();
        Wal::scan(&d, 1 << 20, &mut scan, false, |_| {}).unwrap();
        let mut wal = Wal::from_scan(&d, scan, 7).unwrap();
        assert_eq!(
            wal.segments.iter().map(|s| s.number).collect::<Vec<_>>(),
            [7]
        );
        wal.append(Kind::Write, 6, 3, b"7th").unwrap();
        drop(wal);
        let mut scan = Scan::default();
        Wal::scan(&d, 1 << 20, &mut scan, false, |_| {}).unwrap();
        assert_eq!(scan.records, 1);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
