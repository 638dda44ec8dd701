//! FUSE (include/uapi/linux/fuse.h; struct layouts from the `fuse-abi`
//! crate, protocol 7.40): the device (`sys`), typed requests (`request`),
//! and the file system a volume export is (`Volume`): one regular file,
//! the root itself, of the export's size. `Volume` answers metadata from
//! the geometry alone and hands data requests, checked against the size,
//! back to its caller for a backend.

pub mod request;
pub mod sys;

use fuse_abi::linux::{
    FATTR_GID, FATTR_MODE, FATTR_SIZE, FATTR_UID, FOPEN_DIRECT_IO, FOPEN_NOFLUSH,
    FOPEN_PARALLEL_DIRECT_WRITES, FUSE_ASYNC_DIO, FUSE_ASYNC_READ, FUSE_BIG_WRITES,
    FUSE_DIRECT_IO_ALLOW_MMAP, FUSE_HAS_RESEND, FUSE_INIT_EXT, FUSE_KERNEL_VERSION, FUSE_MAX_PAGES,
    FUSE_ROOT_ID, fuse_attr, fuse_attr_out, fuse_init_out, fuse_kstatfs, fuse_open_out,
    fuse_statfs_out, fuse_write_out,
};
use holdfast_proto::shm::Op;
use zerocopy::IntoBytes;

use self::request::FuseOp;

/// The FUSE minor version implemented here (fuse-abi's headers).
pub const FUSE_MINOR: u32 = 40;
/// The oldest kernel protocol minor served (7.28, Linux 4.20: max_pages).
pub const OLDEST_MINOR: u32 = 28;
/// Attributes never change behind the kernel's back: cache them a day.
const ATTR_VALID_SECS: u64 = 86_400;

/// fallocate(2) modes, include/uapi/linux/falloc.h.
const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
const FALLOC_FL_ZERO_RANGE: u32 = 0x10;

/// What INIT told about the kernel: its protocol minor and the flags it
/// offered (flags2 in the high half).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Init {
    pub minor: u32,
    pub flags: u64,
}

impl Init {
    /// The kernel re-sends read, unanswered requests on FUSE_NOTIFY_RESEND
    /// (7.40, Linux 6.9).
    pub fn can_resend(&self) -> bool {
        self.flags & FUSE_HAS_RESEND != 0
    }
}

/// Why FUSE_NOTIFY_RESEND must not be relied on in the kernel of release
/// `release` (uname -r), if so: 6.9.0 to 6.9.3 put a re-sent request back
/// on the pending list still marked sent, and an interrupt of it can then
/// oops the kernel (CVE-2024-38626, fixed in 6.9.4 and 6.10 by "fuse:
/// clear FR_SENT when re-adding requests into pending list").
pub fn resend_flaw(release: &str) -> Option<String> {
    let mut parts = release.split(['.', '-', '+']);
    let mut num = || parts.next().and_then(|p| p.parse::<u32>().ok());
    let (major, minor, patch) = (num()?, num()?, num().unwrap_or(0));
    ((major, minor) == (6, 9) && patch < 4).then(|| {
        format!("Linux {release} re-sends FUSE requests unsafely (CVE-2024-38626, fixed in 6.9.4)")
    })
}

/// How to answer one request of a volume's file system.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// No reply: the kernel expects none (FORGET, INTERRUPT).
    Silent,
    /// An error reply with this (positive) errno.
    Error(i32),
    /// A success reply without a body.
    Empty,
    Attr(fuse_attr_out),
    Open(fuse_open_out),
    Statfs(fuse_statfs_out),
    /// INIT's reply, and what the kernel said in it.
    Init(fuse_init_out, Init),
    /// A WRITE's reply (`Answer::wrote`).
    Wrote(fuse_write_out),
    /// For the backend: `op` over `[offset, offset + len)`, within the
    /// volume and at most one request's worth of bytes (`len` is 0 for a
    /// flush).
    Data {
        op: Op,
        offset: u64,
        len: u64,
    },
}

impl Answer {
    /// A WRITE's reply: `size` bytes written.
    pub fn wrote(size: u32) -> Self {
        Self::Wrote(fuse_write_out { size, padding: 0 })
    }

    /// The reply to send: its errno (positive; 0 for success) and body.
    /// None for no reply (`Silent`) and for a request still to be done
    /// (`Data`), whose reply comes from the backend.
    pub fn reply(&self) -> Option<(i32, &[u8])> {
        Some(match self {
            Self::Silent | Self::Data { .. } => return None,
            Self::Error(errno) => (*errno, &[]),
            Self::Empty => (0, &[]),
            Self::Attr(a) => (0, a.as_bytes()),
            Self::Open(o) => (0, o.as_bytes()),
            Self::Statfs(st) => (0, st.as_bytes()),
            Self::Init(out, _) => (0, out.as_bytes()),
            Self::Wrote(w) => (0, w.as_bytes()),
        })
    }
}

/// The file system of one volume export: its geometry, fixed for the
/// connection's life.
#[derive(Debug, Clone, Copy)]
pub struct Volume {
    /// Bytes.
    size: u64,
    /// Largest READ or WRITE, in bytes (the slot buffer's size).
    max_io: u32,
    /// How many requests the kernel may have outstanding in the background.
    max_background: u16,
    /// The file's times: seconds since the epoch.
    started: u64,
}

impl Volume {
    pub fn new(size: u64, max_io: u32, max_background: u16, started: u64) -> Self {
        Self {
            size,
            max_io,
            max_background,
            started,
        }
    }

    /// How to answer `op`, sent for node `nodeid`. WRITE has its own
    /// [`Volume::write`]: its data is not in `op`.
    pub fn answer(&self, nodeid: u64, op: &FuseOp<'_>) -> Answer {
        if nodeid != FUSE_ROOT_ID && !matches!(op, FuseOp::Init { .. } | FuseOp::Forget) {
            return Answer::Error(libc::ENOENT);
        }
        match *op {
            FuseOp::Init {
                major,
                minor,
                max_readahead,
                flags,
            } => self.init(major, minor, max_readahead, flags),
            FuseOp::Forget | FuseOp::Interrupt => Answer::Silent,
            // The root is a file: nothing to look up or list.
            FuseOp::Lookup { .. } | FuseOp::Opendir | FuseOp::Readdir { .. } => {
                Answer::Error(libc::ENOTDIR)
            }
            FuseOp::Getattr => Answer::Attr(self.attr()),
            FuseOp::Setattr(s) => {
                // The size and owner are fixed; time updates are accepted
                // (and ignored) so that ordinary tools work.
                let resize = s.valid & FATTR_SIZE != 0 && s.size != self.size;
                if resize || s.valid & (FATTR_MODE | FATTR_UID | FATTR_GID) != 0 {
                    Answer::Error(libc::EPERM)
                } else {
                    Answer::Attr(self.attr())
                }
            }
            // No FLUSH on close(2): writes are write-through (completed by a
            // daemon before write(2) returns), and close promises no
            // durability; fsync does, and is forwarded. A forwarded FLUSH
            // would make every close, including the close-on-exec in any
            // forked child, wait for a daemon: while none is attached, a
            // process holding a written fd could not even exec the
            // replacement daemon. See kmod-notes/fuse.md.
            //
            // Direct I/O for every open (FOPEN_DIRECT_IO): the export is a
            // volume, cached by whoever uses it (a file system on its block
            // device caches, the loop device does direct I/O), not again
            // in the file's page cache. It also allows parallel direct
            // writes (FOPEN_PARALLEL_DIRECT_WRITES, which needs
            // FOPEN_DIRECT_IO since Linux 6.9): without it the kernel holds
            // the inode lock across each synchronous O_DIRECT write, so
            // writers of the file take turns (BENCHMARKS.md has the
            // figures). Shared mmap works on such files on Linux 6.18 (the
            // kernel switches the inode to cached mode while mapped); older
            // kernels need FUSE_DIRECT_IO_ALLOW_MMAP, negotiated in INIT.
            FuseOp::Open { .. } => Answer::Open(fuse_open_out {
                open_flags: FOPEN_NOFLUSH | FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES,
                ..Default::default()
            }),
            FuseOp::Destroy
            | FuseOp::Release
            | FuseOp::Releasedir
            | FuseOp::Fsyncdir
            | FuseOp::Access => Answer::Empty,
            FuseOp::Statfs => Answer::Statfs(self.statfs()),
            FuseOp::Read { offset, size } => {
                let left = self.size.saturating_sub(offset);
                let len = left.min(u64::from(size)).min(u64::from(self.max_io));
                self.data(Op::Read, offset, len)
            }
            FuseOp::Flush | FuseOp::Fsync { .. } => Answer::Data {
                op: Op::Flush,
                offset: 0,
                len: 0,
            },
            FuseOp::Fallocate {
                offset,
                length,
                mode,
            } => match fallocate_op(mode, offset, length, self.size) {
                Ok((op, len)) => self.data(op, offset, len),
                Err(errno) => Answer::Error(errno),
            },
            FuseOp::Write { offset, size } => self.write(nodeid, offset, size),
            FuseOp::Unsupported(_) => Answer::Error(libc::ENOSYS),
        }
    }

    /// How to answer a WRITE of `size` bytes at `offset` to node `nodeid`.
    /// A WRITE that would grow the file is refused (ENOSPC); an empty one
    /// is answered at once.
    pub fn write(&self, nodeid: u64, offset: u64, size: u32) -> Answer {
        if nodeid != FUSE_ROOT_ID {
            return Answer::Error(libc::ENOENT);
        }
        if size > self.max_io {
            return Answer::Error(libc::EINVAL);
        }
        match offset.checked_add(u64::from(size)) {
            Some(end) if end > self.size => Answer::Error(libc::ENOSPC),
            Some(_) if size == 0 => Answer::wrote(0),
            Some(_) => Answer::Data {
                op: Op::Write,
                offset,
                len: u64::from(size),
            },
            _ => Answer::Error(libc::ENOSPC),
        }
    }

    /// A data request, or an empty answer when there is nothing to do (a
    /// READ at or past the end, a FALLOCATE clipped to nothing).
    fn data(&self, op: Op, offset: u64, len: u64) -> Answer {
        if len == 0 {
            Answer::Empty
        } else {
            Answer::Data { op, offset, len }
        }
    }

    fn init(&self, major: u32, minor: u32, max_readahead: u32, flags: u64) -> Answer {
        if major != FUSE_KERNEL_VERSION || minor < OLDEST_MINOR {
            return Answer::Error(libc::EPROTO);
        }
        let want = u64::from(
            FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES | FUSE_ASYNC_DIO | FUSE_INIT_EXT,
        ) | FUSE_DIRECT_IO_ALLOW_MMAP;
        let agreed = flags & want;
        let out = fuse_init_out {
            major: FUSE_KERNEL_VERSION,
            minor: FUSE_MINOR,
            max_readahead: max_readahead.min(self.max_io),
            // FUSE_INIT_EXT: the high 32 bits go in flags2.
            flags: (agreed & u64::from(u32::MAX)) as u32,
            flags2: (agreed >> 32) as u32,
            max_background: self.max_background,
            congestion_threshold: self.max_background.saturating_mul(3) / 4,
            max_write: self.max_io,
            time_gran: 1,
            max_pages: u16::try_from(self.max_io / 4096).unwrap_or(u16::MAX),
            ..Default::default()
        };
        Answer::Init(out, Init { minor, flags })
    }

    fn attr(&self) -> fuse_attr_out {
        let t = self.started;
        fuse_attr_out {
            attr_valid: ATTR_VALID_SECS,
            attr_valid_nsec: 0,
            dummy: 0,
            attr: fuse_attr {
                ino: FUSE_ROOT_ID,
                size: self.size,
                blocks: self.size.div_ceil(512),
                atime: t,
                mtime: t,
                ctime: t,
                mode: libc::S_IFREG | 0o600,
                nlink: 1,
                blksize: 4096,
                ..Default::default()
            },
        }
    }

    fn statfs(&self) -> fuse_statfs_out {
        fuse_statfs_out {
            st: fuse_kstatfs {
                blocks: self.size / 4096,
                files: 1,
                bsize: 4096,
                namelen: holdfast_proto::MAX_NAME_LEN as u32,
                frsize: 4096,
                ..Default::default()
            },
        }
    }
}

/// Maps a FALLOCATE to an op and a length within the volume. Ranges past
/// the end are clipped when the size is kept, refused when it would grow.
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
    fn resend_is_refused_where_it_is_unsafe() {
        for bad in ["6.9.0", "6.9.3-arch1-1", "6.9"] {
            assert!(
                resend_flaw(bad).is_some_and(|w| w.contains("CVE-2024-38626")),
                "{bad}"
            );
        }
        for good in [
            "6.9.4",
            "6.10.0",
            "6.12.57+deb13-amd64",
            "6.18.0",
            "7.3.4+deb13-amd64",
            "x",
        ] {
            assert_eq!(resend_flaw(good), None, "{good}");
        }
    }
    use fuse_abi::linux::fuse_setattr_in;

    fn vol() -> Volume {
        Volume::new(1 << 20, 4096, 64, 1_700_000_000)
    }

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

    #[test]
    fn reads_and_writes_are_checked_against_the_volume() {
        let v = vol();
        let read = |offset, size| v.answer(FUSE_ROOT_ID, &FuseOp::Read { offset, size });
        let data = |op, offset, len| Answer::Data { op, offset, len };
        // Clipped to the largest request, and to the end.
        assert_eq!(read(0, 1 << 16), data(Op::Read, 0, 4096));
        assert_eq!(
            read((1 << 20) - 512, 4096),
            data(Op::Read, (1 << 20) - 512, 512)
        );
        assert_eq!(read(1 << 20, 4096), Answer::Empty);
        assert_eq!(read(u64::MAX, 4096), Answer::Empty);
        assert_eq!(v.write(FUSE_ROOT_ID, 0, 4096), data(Op::Write, 0, 4096));
        assert_eq!(v.write(FUSE_ROOT_ID, 0, 8192), Answer::Error(libc::EINVAL));
        assert_eq!(
            v.write(FUSE_ROOT_ID, (1 << 20) - 1, 2),
            Answer::Error(libc::ENOSPC)
        );
        assert_eq!(
            v.write(FUSE_ROOT_ID, u64::MAX, 1),
            Answer::Error(libc::ENOSPC)
        );
        assert_eq!(v.write(2, 0, 1), Answer::Error(libc::ENOENT));
        assert_eq!(v.write(FUSE_ROOT_ID, 1 << 20, 0), Answer::wrote(0));
        assert_eq!(
            Answer::wrote(7).reply(),
            Some((0, &[7u8, 0, 0, 0, 0, 0, 0, 0][..]))
        );
        assert_eq!(Answer::Error(libc::EIO).reply(), Some((libc::EIO, &[][..])));
        assert_eq!(Answer::Silent.reply(), None);
        assert_eq!(
            v.answer(FUSE_ROOT_ID, &FuseOp::Fsync { datasync: true }),
            data(Op::Flush, 0, 0)
        );
    }

    #[test]
    fn metadata_is_answered_from_the_geometry() {
        let v = vol();
        let Answer::Attr(a) = v.answer(FUSE_ROOT_ID, &FuseOp::Getattr) else {
            panic!("getattr")
        };
        assert_eq!((a.attr.size, a.attr.blocks), (1 << 20, 2048));
        assert_eq!(a.attr.mode, libc::S_IFREG | 0o600);
        let grow = fuse_setattr_in {
            valid: FATTR_SIZE,
            size: 2 << 20,
            ..Default::default()
        };
        assert_eq!(
            v.answer(FUSE_ROOT_ID, &FuseOp::Setattr(grow)),
            Answer::Error(libc::EPERM)
        );
        assert_eq!(
            v.answer(FUSE_ROOT_ID, &FuseOp::Lookup { name: b"x" }),
            Answer::Error(libc::ENOTDIR)
        );
        assert_eq!(v.answer(5, &FuseOp::Getattr), Answer::Error(libc::ENOENT));
        assert_eq!(v.answer(5, &FuseOp::Forget), Answer::Silent);
        assert_eq!(
            v.answer(FUSE_ROOT_ID, &FuseOp::Unsupported(9999)),
            Answer::Error(libc::ENOSYS)
        );
    }

    #[test]
    fn init_agrees_only_to_what_both_sides_know() {
        let v = vol();
        let init = |major, minor, flags| {
            v.answer(
                0,
                &FuseOp::Init {
                    major,
                    minor,
                    max_readahead: 1 << 20,
                    flags,
                },
            )
        };
        let offered = u64::from(FUSE_ASYNC_READ | FUSE_INIT_EXT) | FUSE_HAS_RESEND | (1 << 40);
        let Answer::Init(out, said) = init(7, 45, offered) else {
            panic!("init")
        };
        assert_eq!(
            said,
            Init {
                minor: 45,
                flags: offered
            }
        );
        assert!(said.can_resend());
        assert_eq!(out.flags, FUSE_ASYNC_READ | FUSE_INIT_EXT);
        assert_eq!(out.flags2, 0);
        assert_eq!(
            (out.max_readahead, out.max_write, out.max_pages),
            (4096, 4096, 1)
        );
        assert_eq!(init(7, 27, offered), Answer::Error(libc::EPROTO));
        assert_eq!(init(8, 45, offered), Answer::Error(libc::EPROTO));
    }
}
