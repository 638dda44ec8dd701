//! The FUSE frontend: one mount on which every export is a regular file of
//! the export's size. The broker answers metadata itself and turns READ,
//! WRITE, FSYNC, FLUSH and FALLOCATE into requests of the export's in-flight
//! table.
//!
//! Several worker threads each read from their own clone of the /dev/fuse
//! connection. A worker reads each request with readv into an 80-byte
//! private head (header plus WRITE arguments) and a slot buffer it reserved
//! beforehand, so a WRITE's data lands in shared memory with no copy. When
//! the reserved slot belongs to another export than the request's, or no
//! slot was free, the data is copied once.

mod request;
mod sys;

use std::borrow::Cow;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use fuse_abi::linux::{
    FATTR_GID, FATTR_MODE, FATTR_SIZE, FATTR_UID, FOPEN_NOFLUSH, FUSE_ASYNC_DIO, FUSE_ASYNC_READ,
    FUSE_BIG_WRITES, FUSE_KERNEL_VERSION, FUSE_MAX_PAGES, FUSE_PARALLEL_DIROPS, FUSE_ROOT_ID,
    fuse_attr, fuse_attr_out, fuse_dirent, fuse_entry_out, fuse_init_out, fuse_kstatfs,
    fuse_open_out, fuse_out_header, fuse_statfs_out, fuse_write_out,
};
use holdfast_proto::shm::Op;
use zerocopy::{Immutable, IntoBytes};

use self::request::{FuseOp, HEAD_LEN, IN_HEADER_LEN, MAX_ARGS_LEN};
use super::{Origin, Outcome, ReplySink};
use crate::export::Export;
use crate::inflight::Data;
use crate::{info, warn};

/// Node ids: 1 is the root directory; export `i` is `FIRST_EXPORT_NODE + i`.
const FIRST_EXPORT_NODE: u64 = 2;
/// The FUSE minor version this frontend implements (fuse-abi's headers).
const FUSE_MINOR: u32 = 40;
/// Attributes never change behind the kernel's back: cache them a day.
const ATTR_VALID_SECS: u64 = 86_400;

/// fallocate(2) modes, include/uapi/linux/falloc.h.
const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
const FALLOC_FL_ZERO_RANGE: u32 = 0x10;

/// A running FUSE frontend.
pub struct FuseFrontend {
    mountpoint: PathBuf,
}

impl FuseFrontend {
    /// Mounts `exports` at `mountpoint` and starts `workers` threads.
    pub fn start(mountpoint: &Path, exports: Vec<Arc<Export>>, workers: usize) -> io::Result<Self> {
        let slot_size = exports.first().map_or(1 << 20, |e| e.slot_size());
        let max_background = exports
            .first()
            .map_or(64, |e| u16::try_from(e.slot_count()).unwrap_or(u16::MAX));
        sys::clear_stale_mount(mountpoint);
        let dev = sys::open_dev()?;
        sys::mount(dev.as_fd(), mountpoint, slot_size)?;
        let fs = Arc::new(Fs {
            exports,
            slot_size,
            max_background,
            started: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            initialized: AtomicBool::new(false),
        });
        let mut devs = vec![dev];
        for _ in 1..workers.max(1) {
            let first = devs.first().map(|d| d.as_fd());
            match first.map(sys::clone_dev) {
                Some(Ok(d)) => devs.push(d),
                Some(Err(e)) => {
                    warn!("cannot clone the FUSE connection ({e}); running fewer workers");
                    break;
                }
                None => break,
            }
        }
        let n = devs.len();
        for (i, dev) in devs.into_iter().enumerate() {
            let fs = fs.clone();
            let chan = Arc::new(Channel { dev });
            std::thread::Builder::new()
                .name(format!("holdfast-fuse{i}"))
                .spawn(move || fs.worker(&chan))?;
        }
        info!(
            "FUSE frontend mounted at {} with {n} workers",
            mountpoint.display()
        );
        Ok(Self {
            mountpoint: mountpoint.to_owned(),
        })
    }

    /// Detaches the mount.
    pub fn unmount(&self) {
        if let Err(e) = sys::unmount(&self.mountpoint) {
            warn!("cannot unmount {}: {e}", self.mountpoint.display());
        }
    }
}

/// One /dev/fuse clone; replies go to the clone the request came from.
struct Channel {
    dev: OwnedFd,
}

impl Channel {
    fn origin(self: &Arc<Self>, unique: u64) -> Origin {
        Origin {
            sink: self.clone(),
            tag: unique,
        }
    }

    /// Writes a reply: the header, then `body` pieces.
    fn send(&self, unique: u64, error: i32, body: &[libc::iovec]) {
        let len: usize = body.iter().fold(size_of::<fuse_out_header>(), |a, v| {
            a.saturating_add(v.iov_len)
        });
        let header = fuse_out_header {
            len: u32::try_from(len).unwrap_or(u32::MAX),
            error: error.saturating_neg(),
            unique,
        };
        let mut iov = Vec::with_capacity(body.len().saturating_add(1));
        iov.push(libc::iovec {
            iov_base: (&raw const header).cast_mut().cast(),
            iov_len: size_of::<fuse_out_header>(),
        });
        iov.extend_from_slice(body);
        // SAFETY: the header lives on this stack frame and the callers' body
        // pieces are valid for the duration of the call.
        match unsafe { sys::write_reply(self.dev.as_fd(), &iov) } {
            Ok(()) => {}
            // The request was interrupted or the connection aborted.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => {}
            Err(e) => warn!("FUSE reply to request {unique} failed: {e}"),
        }
    }

    fn error(&self, unique: u64, errno: i32) {
        self.send(unique, errno, &[]);
    }

    fn ok<T: IntoBytes + Immutable>(&self, unique: u64, value: &T) {
        self.bytes(unique, value.as_bytes());
    }

    fn bytes(&self, unique: u64, bytes: &[u8]) {
        let iov = libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        };
        let body = [iov];
        self.send(unique, 0, if bytes.is_empty() { &[] } else { &body });
    }
}

impl ReplySink for Channel {
    fn complete(&self, unique: u64, op: Op, outcome: Outcome<'_>) {
        match outcome {
            Outcome::Failed(errno) => self.error(unique, errno),
            Outcome::Done { len, data } => match op {
                Op::Read => {
                    match data.and_then(|d| d.region.ptr(d.offset, d.len).map(|p| (p, d.len))) {
                        Some((ptr, n)) => self.send(
                            unique,
                            0,
                            &[libc::iovec {
                                iov_base: ptr.cast(),
                                iov_len: n,
                            }],
                        ),
                        None => self.error(unique, libc::EIO),
                    }
                }
                Op::Write => self.ok(
                    unique,
                    &fuse_write_out {
                        size: u32::try_from(len).unwrap_or(0),
                        padding: 0,
                    },
                ),
                _ => self.bytes(unique, &[]),
            },
        }
    }
}

/// A worker's buffers: the private head, and the body buffer its next
/// request is read into (a reserved slot, or private memory).
struct Worker {
    head: [u8; HEAD_LEN],
    private: Vec<u8>,
    slots: Slots,
}

#[derive(Clone, Copy)]
struct Slots {
    /// A slot (export index, slot) reserved to read into.
    reserved: Option<(usize, u32)>,
    /// The export to reserve a slot on: the one the last data request was for.
    preferred: usize,
}

struct Fs {
    exports: Vec<Arc<Export>>,
    slot_size: u32,
    max_background: u16,
    started: u64,
    initialized: AtomicBool,
}

impl Fs {
    fn export(&self, nodeid: u64) -> Option<(usize, &Arc<Export>)> {
        let i = usize::try_from(nodeid.checked_sub(FIRST_EXPORT_NODE)?).ok()?;
        self.exports.get(i).map(|e| (i, e))
    }

    fn worker(&self, chan: &Arc<Channel>) {
        let mut w = Worker {
            head: [0u8; HEAD_LEN],
            private: vec![0u8; self.slot_size as usize],
            slots: Slots {
                reserved: None,
                preferred: 0,
            },
        };
        loop {
            let s = &mut w.slots;
            if s.reserved.map(|(e, _)| e) != Some(s.preferred) {
                self.release(s);
                s.reserved = self
                    .exports
                    .get(s.preferred)
                    .and_then(|e| e.take_slot())
                    .map(|slot| (s.preferred, slot));
            }
            let body = self.body_ptr(&mut w);
            // SAFETY: `body` is a slot buffer of `slot_size` bytes in a live
            // mapping, or the worker's private buffer of the same size.
            let n = unsafe {
                sys::read_request(chan.dev.as_fd(), &mut w.head, body, self.slot_size as usize)
            };
            match n {
                Ok(n) => self.handle(chan, &mut w, n),
                Err(e) => match e.raw_os_error() {
                    // Interrupted before we read it / signal / retry.
                    Some(libc::ENOENT | libc::EINTR | libc::EAGAIN) => {}
                    // Unmounted: the connection is gone.
                    Some(libc::ENODEV) => break,
                    _ => {
                        warn!("reading /dev/fuse failed: {e}; worker stops");
                        break;
                    }
                },
            }
        }
        self.release(&mut w.slots);
    }

    fn release(&self, slots: &mut Slots) {
        if let Some((e, s)) = slots.reserved.take()
            && let Some(x) = self.exports.get(e)
        {
            x.release_slot(s);
        }
    }

    fn body_ptr(&self, w: &mut Worker) -> *mut u8 {
        w.slots
            .reserved
            .and_then(|(e, s)| {
                let x = self.exports.get(e)?;
                x.data().ptr(x.slot_offset(s)?, self.slot_size as usize)
            })
            .unwrap_or_else(|| {
                w.slots.reserved = None;
                w.private.as_mut_ptr()
            })
    }

    /// Copies `len` bytes of the body the request was read into.
    fn body_copy(&self, w: &Worker, len: usize) -> Vec<u8> {
        match w.slots.reserved {
            Some((e, s)) => self
                .exports
                .get(e)
                .and_then(|x| x.data().copy_out(x.slot_offset(s)?, len))
                .unwrap_or_default(),
            None => w.private.get(..len).map(<[u8]>::to_vec).unwrap_or_default(),
        }
    }

    fn handle(&self, chan: &Arc<Channel>, w: &mut Worker, n: usize) {
        let Some(h) = request::header(&w.head) else {
            warn!("FUSE request of {n} bytes is shorter than its header; ignored");
            return;
        };
        if h.len as usize != n {
            warn!(
                "FUSE request {} says {} bytes, {n} were read; failing it",
                h.unique, h.len
            );
            chan.error(h.unique, libc::EIO);
            return;
        }
        let body_len = n.saturating_sub(HEAD_LEN);
        if h.opcode == fuse_abi::linux::fuse_opcode::FUSE_WRITE as u32 {
            let args = w.head.get(IN_HEADER_LEN..).unwrap_or_default();
            return match request::parse(h.opcode, args) {
                Ok(FuseOp::Write { offset, size }) if size as usize == body_len => {
                    self.write(chan, w, h.nodeid, h.unique, offset, size);
                }
                _ => chan.error(h.unique, libc::EINVAL),
            };
        }
        let args_len = n.saturating_sub(IN_HEADER_LEN);
        if args_len > MAX_ARGS_LEN {
            if !request::is_no_reply(h.opcode) {
                chan.error(h.unique, libc::ENOSYS);
            }
            return;
        }
        let in_head = w
            .head
            .get(IN_HEADER_LEN..n.min(HEAD_LEN))
            .unwrap_or_default();
        let args: Cow<'_, [u8]> = if body_len == 0 {
            Cow::Borrowed(in_head)
        } else {
            let mut v = in_head.to_vec();
            v.extend_from_slice(&self.body_copy(w, body_len));
            Cow::Owned(v)
        };
        match request::parse(h.opcode, &args) {
            Ok(op) => self.op(chan, &mut w.slots, h.nodeid, h.unique, op),
            Err(e) => {
                warn!("{e}");
                if !request::is_no_reply(h.opcode) {
                    chan.error(h.unique, libc::EINVAL);
                }
            }
        }
    }

    fn write(
        &self,
        chan: &Arc<Channel>,
        w: &mut Worker,
        nodeid: u64,
        unique: u64,
        offset: u64,
        size: u32,
    ) {
        let Some((i, export)) = self.export(nodeid) else {
            return chan.error(
                unique,
                if nodeid == FUSE_ROOT_ID {
                    libc::EISDIR
                } else {
                    libc::ENOENT
                },
            );
        };
        if offset
            .checked_add(u64::from(size))
            .is_none_or(|end| end > export.size)
        {
            return chan.error(unique, libc::ENOSPC);
        }
        if size == 0 {
            return chan.ok(
                unique,
                &fuse_write_out {
                    size: 0,
                    padding: 0,
                },
            );
        }
        let origin = chan.origin(unique);
        match w.slots.reserved {
            Some((e, slot)) if e == i => {
                w.slots.reserved = None;
                export.submit(Op::Write, offset, u64::from(size), origin, Data::Slot(slot));
            }
            Some(_) => {
                let bytes = self.body_copy(w, size as usize);
                export.submit_write(offset, origin, &bytes);
            }
            None => {
                let bytes = w.private.get(..size as usize).unwrap_or_default();
                export.submit_write(offset, origin, bytes);
            }
        }
        w.slots.preferred = i;
    }

    fn op(&self, chan: &Arc<Channel>, w: &mut Slots, nodeid: u64, unique: u64, op: FuseOp<'_>) {
        let export = self.export(nodeid);
        let is_root = nodeid == FUSE_ROOT_ID;
        match op {
            FuseOp::Init {
                major,
                minor,
                max_readahead,
                flags,
            } => self.init(chan, unique, major, minor, max_readahead, flags),
            FuseOp::Destroy => chan.bytes(unique, &[]),
            FuseOp::Forget | FuseOp::Interrupt => {}
            FuseOp::Lookup { name } => {
                let found = is_root
                    .then(|| self.exports.iter().position(|e| e.name.as_bytes() == name))
                    .flatten();
                match found {
                    Some(i) => {
                        let node = FIRST_EXPORT_NODE.saturating_add(i as u64);
                        chan.ok(
                            unique,
                            &fuse_entry_out {
                                nodeid: node,
                                generation: 1,
                                entry_valid: ATTR_VALID_SECS,
                                attr_valid: ATTR_VALID_SECS,
                                entry_valid_nsec: 0,
                                attr_valid_nsec: 0,
                                attr: self.attr(node),
                            },
                        );
                    }
                    None => chan.error(unique, libc::ENOENT),
                }
            }
            FuseOp::Getattr => self.reply_attr(chan, unique, nodeid),
            FuseOp::Setattr(s) => {
                // Exports have a fixed size and owner; time updates are
                // accepted (and ignored) so that ordinary tools work.
                let resize =
                    s.valid & FATTR_SIZE != 0 && export.is_none_or(|(_, e)| s.size != e.size);
                if resize || s.valid & (FATTR_MODE | FATTR_UID | FATTR_GID) != 0 {
                    chan.error(unique, libc::EPERM);
                } else {
                    self.reply_attr(chan, unique, nodeid);
                }
            }
            FuseOp::Open { .. } => match export {
                // No FLUSH on close(2): writes are write-through (completed
                // by a daemon before write(2) returns), and close promises no
                // durability; fsync does, and is forwarded. A forwarded FLUSH
                // would make every close, including the close-on-exec in any
                // forked child, wait for a daemon: while none is attached, a
                // process holding a written fd could not even exec the
                // replacement daemon. See kmod-notes/fuse.md.
                Some(_) => chan.ok(
                    unique,
                    &fuse_open_out {
                        open_flags: FOPEN_NOFLUSH,
                        ..Default::default()
                    },
                ),
                None => chan.error(unique, if is_root { libc::EISDIR } else { libc::ENOENT }),
            },
            FuseOp::Opendir => {
                if is_root {
                    chan.ok(unique, &fuse_open_out::default());
                } else {
                    chan.error(unique, libc::ENOTDIR);
                }
            }
            FuseOp::Readdir { offset, size } => self.readdir(chan, unique, offset, size),
            FuseOp::Release | FuseOp::Releasedir | FuseOp::Fsyncdir | FuseOp::Access => {
                chan.bytes(unique, &[]);
            }
            FuseOp::Statfs => self.statfs(chan, unique),
            FuseOp::Read { offset, size } => {
                let Some((i, e)) = export else {
                    return chan.error(unique, if is_root { libc::EISDIR } else { libc::ENOENT });
                };
                let left = e.size.saturating_sub(offset);
                let len = left.min(u64::from(size)).min(u64::from(self.slot_size));
                if len == 0 {
                    return chan.bytes(unique, &[]);
                }
                let data = match w.reserved {
                    Some((r, slot)) if r == i => {
                        w.reserved = None;
                        Data::Slot(slot)
                    }
                    _ => Data::None,
                };
                w.preferred = i;
                e.submit(Op::Read, offset, len, chan.origin(unique), data);
            }
            FuseOp::Flush | FuseOp::Fsync { .. } => match export {
                Some((_, e)) => e.submit(Op::Flush, 0, 0, chan.origin(unique), Data::None),
                None => chan.bytes(unique, &[]),
            },
            FuseOp::Fallocate {
                offset,
                length,
                mode,
            } => {
                let Some((_, e)) = export else {
                    return chan.error(unique, libc::ENODEV);
                };
                match fallocate_op(mode, offset, length, e.size) {
                    Ok((op, len)) if len > 0 => {
                        e.submit(op, offset, len, chan.origin(unique), Data::None)
                    }
                    Ok(_) => chan.bytes(unique, &[]),
                    Err(errno) => chan.error(unique, errno),
                }
            }
            FuseOp::Write { .. } => chan.error(unique, libc::EINVAL),
            FuseOp::Unsupported(_) => chan.error(unique, libc::ENOSYS),
        }
    }

    fn init(
        &self,
        chan: &Channel,
        unique: u64,
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u64,
    ) {
        if major != FUSE_KERNEL_VERSION || minor < 28 {
            warn!("kernel FUSE protocol {major}.{minor} is too old (7.28 or later needed)");
            return chan.error(unique, libc::EPROTO);
        }
        let want = u64::from(
            FUSE_ASYNC_READ
                | FUSE_BIG_WRITES
                | FUSE_MAX_PAGES
                | FUSE_PARALLEL_DIROPS
                | FUSE_ASYNC_DIO,
        );
        let out = fuse_init_out {
            major: FUSE_KERNEL_VERSION,
            minor: FUSE_MINOR,
            max_readahead: max_readahead.min(self.slot_size),
            flags: u32::try_from(flags & want).unwrap_or(0),
            max_background: self.max_background,
            congestion_threshold: self.max_background.saturating_mul(3) / 4,
            max_write: self.slot_size,
            time_gran: 1,
            max_pages: u16::try_from(self.slot_size / 4096).unwrap_or(u16::MAX),
            ..Default::default()
        };
        chan.ok(unique, &out);
        if !self.initialized.swap(true, Ordering::SeqCst) {
            info!("FUSE connection initialised (kernel protocol {major}.{minor})");
        }
    }

    fn attr(&self, nodeid: u64) -> fuse_attr {
        let t = self.started;
        let mut a = fuse_attr {
            ino: nodeid,
            atime: t,
            mtime: t,
            ctime: t,
            blksize: 4096,
            ..Default::default()
        };
        match self.export(nodeid) {
            Some((_, e)) => {
                a.size = e.size;
                a.blocks = e.size.div_ceil(512);
                a.mode = libc::S_IFREG | 0o600;
                a.nlink = 1;
            }
            None => {
                a.mode = libc::S_IFDIR | 0o755;
                a.nlink = 2;
            }
        }
        a
    }

    fn reply_attr(&self, chan: &Channel, unique: u64, nodeid: u64) {
        if nodeid != FUSE_ROOT_ID && self.export(nodeid).is_none() {
            return chan.error(unique, libc::ENOENT);
        }
        chan.ok(
            unique,
            &fuse_attr_out {
                attr_valid: ATTR_VALID_SECS,
                attr_valid_nsec: 0,
                dummy: 0,
                attr: self.attr(nodeid),
            },
        );
    }

    fn readdir(&self, chan: &Channel, unique: u64, offset: u64, size: u32) {
        let mut entries: Vec<(u64, &[u8], u32)> = vec![
            (FUSE_ROOT_ID, b".", libc::DT_DIR.into()),
            (FUSE_ROOT_ID, b"..", libc::DT_DIR.into()),
        ];
        for (i, e) in self.exports.iter().enumerate() {
            entries.push((
                FIRST_EXPORT_NODE.saturating_add(i as u64),
                e.name.as_bytes(),
                libc::DT_REG.into(),
            ));
        }
        let mut out = Vec::new();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (idx, (ino, name, kind)) in entries.iter().enumerate().skip(start) {
            let dirent = fuse_dirent {
                ino: *ino,
                off: idx as u64 + 1,
                namelen: u32::try_from(name.len()).unwrap_or(0),
                type_: *kind,
                name: Default::default(),
            };
            let entry_len = (size_of::<fuse_dirent>() + name.len()).next_multiple_of(8);
            if out.len() + entry_len > size as usize {
                break;
            }
            out.extend_from_slice(dirent.as_bytes());
            out.extend_from_slice(name);
            out.resize(out.len().next_multiple_of(8), 0);
        }
        chan.bytes(unique, &out);
    }

    fn statfs(&self, chan: &Channel, unique: u64) {
        let blocks: u64 = self.exports.iter().map(|e| e.size / 4096).sum();
        chan.ok(
            unique,
            &fuse_statfs_out {
                st: fuse_kstatfs {
                    blocks,
                    bfree: 0,
                    bavail: 0,
                    files: self.exports.len() as u64,
                    ffree: 0,
                    bsize: 4096,
                    namelen: holdfast_proto::MAX_NAME_LEN as u32,
                    frsize: 4096,
                    ..Default::default()
                },
            },
        );
    }
}

/// Maps a FALLOCATE to an op and a length within the export. Ranges past the
/// end are clipped when the size is kept, refused when it would grow.
fn fallocate_op(mode: u32, offset: u64, length: u64, size: u64) -> Result<(Op, u64), i32> {
    let op = match mode & !FALLOC_FL_KEEP_SIZE {
        0 => Op::Allocate,
        FALLOC_FL_PUNCH_HOLE if mode & FALLOC_FL_KEEP_SIZE != 0 => Op::Discard,
        FALLOC_FL_ZERO_RANGE => Op::WriteZeroes,
        _ => return Err(libc::EOPNOTSUPP),
    };
    let end = offset.checked_add(length).ok_or(libc::EFBIG)?;
    if end > size && mode & FALLOC_FL_KEEP_SIZE == 0 {
        return Err(libc::ENOSPC);
    }
    Ok((op, end.min(size).saturating_sub(offset)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallocate_modes() {
        let k = FALLOC_FL_KEEP_SIZE;
        assert_eq!(fallocate_op(0, 0, 10, 100), Ok((Op::Allocate, 10)));
        assert_eq!(fallocate_op(0, 90, 20, 100), Err(libc::ENOSPC));
        assert_eq!(
            fallocate_op(k | FALLOC_FL_PUNCH_HOLE, 90, 20, 100),
            Ok((Op::Discard, 10))
        );
        assert_eq!(
            fallocate_op(FALLOC_FL_PUNCH_HOLE, 0, 1, 100),
            Err(libc::EOPNOTSUPP)
        );
        assert_eq!(
            fallocate_op(FALLOC_FL_ZERO_RANGE, 0, 8, 100),
            Ok((Op::WriteZeroes, 8))
        );
        assert_eq!(
            fallocate_op(k | FALLOC_FL_ZERO_RANGE, 200, 8, 100),
            Ok((Op::WriteZeroes, 0))
        );
        assert_eq!(fallocate_op(k, u64::MAX, 2, 100), Err(libc::EFBIG));
        assert_eq!(fallocate_op(0x8, 0, 1, 100), Err(libc::EOPNOTSUPP));
    }
}
