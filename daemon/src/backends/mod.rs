//! Where a daemon keeps an export's bytes. One file per kind; every kind
//! implements [`Backend`], which is all a user implements to write their own
//! daemon on this library.

pub mod dir;
pub mod file;
pub mod mem;
#[cfg(feature = "s3")]
pub mod s3;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use holdfast_proto::shm::Ask;
use holdfast_proto::shm::Op;
use holdfast_proto::{ExportKind, Figures};
use rustix::fs::FallocateFlags;

use crate::Error;
use crate::client::Connection;
use crate::lease::Lease;

/// An export's storage. Called from several worker threads at once; each
/// call covers a range inside the export. A write is complete when the call
/// returns; it must be durable once a later `flush` returns.
///
/// A backend is opened without its lease (a handoff successor warms up
/// while its predecessor still serves); the library calls `acquire_lease`
/// before the first request, and `release_lease` when a handoff quiesces
/// this daemon.
pub trait Backend: Send + Sync {
    /// Takes the exclusive right to write, waiting up to `timeout` for a
    /// predecessor to give it up (or die). Taking a held lease is a no-op.
    fn acquire_lease(&self, timeout: Duration) -> Result<(), Error>;
    /// Every request has completed: make what a successor needs durable
    /// and give up the lease. No request arrives until `acquire_lease`.
    fn release_lease(&self) -> Result<(), Error>;
    /// Fills `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Stores `buf` at `offset`.
    fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// The daemon detached cleanly (no handoff): every request has
    /// completed and none will come. Write back what should not wait for
    /// the next daemon (the default does nothing).
    fn detach(&self) -> Result<(), Error> {
        Ok(())
    }
    /// Deallocates a range; it must read back as zeroes.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }
    /// Makes a range read back as zeroes.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = vec![0u8; 64 << 10];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64);
            self.write(offset + done, &zeroes[..n as usize])?;
            done += n;
        }
        Ok(())
    }
    /// Reserves space for a range (a hint; the default does nothing).
    fn allocate(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Whether requests usually complete within microseconds (memory, the
    /// page cache). The I/O loop then runs a request that arrives alone
    /// itself instead of waking a worker thread, which saves a thread
    /// wake-up per request at low queue depth (measured in BENCHMARKS.md);
    /// a request arriving meanwhile waits for it.
    fn quick(&self) -> bool {
        false
    }
    /// The backend's own figures, reported to the broker for `status` and
    /// metrics (none by default).
    fn figures(&self) -> Figures {
        Figures::default()
    }
    /// What the backend serves: one volume (the ops above), or named blobs
    /// (the ops below; the volume ops then fail).
    fn kind(&self) -> ExportKind {
        ExportKind::Volume
    }
    /// Blobs: opens blob `name` under the number `object` (a later open of
    /// the same number replaces it) and returns its size in bytes.
    fn open_blob(&self, _object: u32, _name: &[u8]) -> io::Result<u64> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// Blobs: fills `buf` with the bytes of blob `object` at `offset`
    /// (zeroes past its end).
    fn read_blob(&self, _object: u32, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }
    /// Blobs: forgets blob `object`.
    fn close_blob(&self, _object: u32) {}
}

/// Runs one request against `backend`: `buf` is the request's data (read
/// into, or written from) for the ops that carry data (an OPEN's: the slot
/// holding the name, which gets the size). Returns the bytes done; a data
/// op without a buffer is EINVAL.
pub fn run(backend: &dyn Backend, ask: Ask, buf: Option<&mut [u8]>) -> io::Result<usize> {
    let Ask {
        op,
        object,
        offset,
        len,
    } = ask;
    let blobs = backend.kind() == ExportKind::Blobs;
    match (op, buf) {
        (Op::Read, Some(buf)) if blobs => {
            backend.read_blob(object, offset, buf).map(|()| buf.len())
        }
        (Op::Open, Some(buf)) => {
            let name = usize::try_from(len).ok().and_then(|n| buf.get(..n));
            let name = name.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            let size = backend.open_blob(object, name)?;
            let out = buf
                .get_mut(..8)
                .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
            out.copy_from_slice(&size.to_le_bytes());
            Ok(0)
        }
        (Op::Close, _) => {
            backend.close_blob(object);
            Ok(0)
        }
        (Op::Read, Some(buf)) => backend.read(offset, buf).map(|()| buf.len()),
        (Op::Write, Some(buf)) => backend.write(offset, buf).map(|()| buf.len()),
        (Op::Flush, _) => backend.flush().map(|()| 0),
        (Op::Discard, _) => backend.discard(offset, len).map(|()| 0),
        (Op::WriteZeroes, _) => backend.write_zeroes(offset, len).map(|()| 0),
        (Op::Allocate, _) => backend.allocate(offset, len).map(|()| 0),
        _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
}

/// What `--backend` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// `file:PATH`: a local file (created sparse if missing), flushed with fdatasync.
    File(PathBuf),
    /// `mem`: a memfd kept in the broker's fd store, so it survives daemon crashes.
    Mem,
    /// `dir:PATH`: the blobs of a blob export (cachefiles), one file each.
    Dir(PathBuf),
    /// `s3://BUCKET/PREFIX`: chunk objects and a manifest in S3, with a
    /// local write-ahead log.
    #[cfg(feature = "s3")]
    S3(Box<s3::S3Config>),
}

impl FromStr for BackendSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "mem" {
            return Ok(Self::Mem);
        }
        if s.starts_with("s3://") {
            #[cfg(feature = "s3")]
            return s3::S3Config::parse(s).map(|c| Self::S3(Box::new(c)));
            #[cfg(not(feature = "s3"))]
            return Err("this holdfast-daemon was built without the s3 feature".into());
        }
        match s.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(Self::File(path.into())),
            Some(("dir", path)) if !path.is_empty() => Ok(Self::Dir(path.into())),
            _ => Err(format!(
                "unknown backend {s:?}: use file:PATH, mem, s3://BUCKET/PREFIX, or dir:PATH (blobs)"
            )),
        }
    }
}

/// What opening a backend needs: the attached connection (for the fd
/// store) and the export.
pub struct OpenContext<'a> {
    pub conn: &'a mut Connection,
    pub export: &'a str,
    pub size: u64,
    pub kind: ExportKind,
}

/// Refuses a backend that serves another kind than the export holds.
pub fn check_kind(export: &str, holds: ExportKind, serves: ExportKind) -> Result<(), Error> {
    if holds == serves {
        return Ok(());
    }
    Err(Error::Protocol(format!(
        "export {export} holds {}, and this backend serves {}: {}",
        holds.name(),
        serves.name(),
        match holds {
            ExportKind::Blobs => "serve it with --backend dir:PATH",
            ExportKind::Volume => "serve it with --backend file:PATH, mem or s3://BUCKET/PREFIX",
        }
    )))
}

impl BackendSpec {
    /// What the backend serves.
    pub fn kind(&self) -> ExportKind {
        match self {
            Self::File(_) | Self::Mem => ExportKind::Volume,
            #[cfg(feature = "s3")]
            Self::S3(_) => ExportKind::Volume,
            Self::Dir(_) => ExportKind::Blobs,
        }
    }

    /// Opens the backend (without its lease), after checking that it
    /// serves what the export holds.
    pub fn open(&self, ctx: OpenContext<'_>) -> Result<Box<dyn Backend>, Error> {
        check_kind(ctx.export, ctx.kind, self.kind())?;
        Ok(match self {
            Self::File(path) => Box::new(file::open(path, ctx.size)?),
            Self::Mem => Box::new(mem::open(ctx)?),
            Self::Dir(path) => Box::new(dir::open(path)?),
            #[cfg(feature = "s3")]
            Self::S3(cfg) => Box::new(s3::open(cfg, ctx.export, ctx.size)?),
        })
    }
}

/// Fills `buf` with `file`'s bytes at `offset`; past the end of the file
/// (a short file, a blob's last page) it reads zeroes.
pub fn read_full(file: &File, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A backend on a file descriptor (a regular file or a memfd), shared by
/// the `file` and `mem` kinds.
pub struct FdBackend {
    file: File,
    /// Whether `flush` must reach stable storage (not for memory).
    durable: bool,
    lease: Lease,
}

impl FdBackend {
    pub fn new(file: File, durable: bool, lease: Lease) -> Self {
        Self {
            file,
            durable,
            lease,
        }
    }

    fn fallocate(&self, flags: FallocateFlags, offset: u64, len: u64) -> io::Result<()> {
        Ok(rustix::fs::fallocate(&self.file, flags, offset, len)?)
    }
}

impl Backend for FdBackend {
    /// Reads and writes go through the page cache (or are a memfd's).
    fn quick(&self) -> bool {
        true
    }

    fn acquire_lease(&self, timeout: Duration) -> Result<(), Error> {
        self.lease.acquire(timeout)
    }

    /// Nothing to persist first: a successor opens the same file (or
    /// memfd) and sees every completed write through the page cache, and
    /// its own flush covers them.
    fn release_lease(&self) -> Result<(), Error> {
        self.lease.release()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        read_full(&self.file, offset, buf)
    }

    fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        if self.durable {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        // ZERO_RANGE keeps the space allocated; memfds only punch holes.
        self.fallocate(
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .or_else(|_| self.discard(offset, len))
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(FallocateFlags::KEEP_SIZE, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        assert_eq!("mem".parse(), Ok(BackendSpec::Mem));
        assert_eq!("file:/x/y".parse(), Ok(BackendSpec::File("/x/y".into())));
        assert!("file:".parse::<BackendSpec>().is_err());
        assert_eq!("dir:/b".parse(), Ok(BackendSpec::Dir("/b".into())));
        assert!("dir:".parse::<BackendSpec>().is_err());
        assert!("s3://b".parse::<BackendSpec>().is_err());
        assert!("s3:/bucket".parse::<BackendSpec>().is_err());
    }
}
