//! Frontends turn kernel requests into slots of an export's in-flight table
//! and complete them to the kernel when a daemon answers. One file (or
//! folder) per kernel interface.

pub mod cachefiles;
pub mod fuse;
pub mod ublk;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use holdfast_proto::shm::{DataLayout, Op};

use crate::inflight::Data;
use crate::shm::SharedRegion;

/// Where a request came from, so that exactly one reply goes back there.
#[derive(Clone)]
pub struct Origin {
    pub sink: Arc<dyn ReplySink>,
    /// The frontend's own request id (FUSE: the request's `unique`).
    pub tag: u64,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Origin({})", self.tag)
    }
}

/// Bytes of a slot buffer holding a read's result.
pub struct SlotData<'a> {
    pub region: &'a SharedRegion,
    pub offset: usize,
    pub len: usize,
}

/// How a request ended.
pub enum Outcome<'a> {
    /// Success; `data` holds a read's bytes.
    Done {
        len: u64,
        data: Option<SlotData<'a>>,
    },
    /// Failure with a positive errno.
    Failed(i32),
}

/// A frontend's way back to the kernel. Called once per request.
pub trait ReplySink: Send + Sync {
    fn complete(&self, tag: u64, op: Op, outcome: Outcome<'_>);
}

/// Where a frontend's requests go: an export, which hands them to its
/// daemon through the in-flight table, or (in the benchmark's in-process
/// baseline) a backend called in place. A frontend reads each request's
/// data straight into a slot buffer of the target's data area.
pub trait Target: Send + Sync + 'static {
    fn name(&self) -> &str;
    /// Bytes.
    fn size(&self) -> u64;
    fn block_size(&self) -> u32;
    /// Where the slot buffers are in the data area.
    fn layout(&self) -> DataLayout;
    /// The data area holding the slot buffers.
    fn data(&self) -> &SharedRegion;
    /// Largest request, in bytes: each slot buffer's size.
    fn slot_size(&self) -> u32 {
        self.layout().slot_size()
    }
    fn slot_count(&self) -> u32 {
        self.layout().slot_count()
    }
    /// Byte offset of a slot's buffer in the data area.
    fn slot_offset(&self, slot: u32) -> Option<usize> {
        self.layout().slot_offset(slot)
    }
    /// Takes a free slot for a frontend to read a request into.
    fn take_slot(&self) -> Option<u32>;
    /// Returns a slot taken with [`Target::take_slot`] and not used.
    fn release_slot(&self, slot: u32);
    /// Adds a request; its reply goes to `origin`, exactly once.
    fn submit(&self, op: Op, offset: u64, len: u64, origin: Origin, data: Data);
    /// Adds a write whose data is in the frontend's private memory.
    fn submit_write(&self, offset: u64, origin: Origin, bytes: &[u8]);
    /// Names the frontend that can lend its queue to direct-mode daemons
    /// (kept as long as the target: a removed export's lent descriptors
    /// are still taken back through it).
    fn set_lender(&self, _lender: Arc<dyn Lender>) {}
}

/// Who holds a block device or an export's file open, in words a person
/// can act on: a mount or another exclusive holder of `device` (an
/// exclusive open fails with EBUSY), and processes with `device` or one of
/// `files` open, from /proc/PID/fd. Only the links are read: stat(2) on
/// another process's files could block on a hung mount. Empty if none.
pub fn holders(device: Option<&Path>, files: &[PathBuf]) -> Vec<String> {
    let mut found = Vec::new();
    let mut targets = files.to_vec();
    if let Some(d) = device {
        let excl = rustix::fs::open(
            d,
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::EXCL
                | rustix::fs::OFlags::CLOEXEC
                | rustix::fs::OFlags::NONBLOCK,
            rustix::fs::Mode::empty(),
        );
        if matches!(excl, Err(e) if e == rustix::io::Errno::BUSY) {
            found.push(format!("{} is mounted or held exclusively", d.display()));
        }
        targets.push(d.to_path_buf());
    }
    let me = std::process::id().to_string();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let pid = p.file_name();
        let pid = pid.to_string_lossy();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let hit = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .find(|l| targets.iter().any(|t| t == l));
        if let Some(path) = hit {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            found.push(format!(
                "pid {pid} ({}) has {} open",
                comm.trim(),
                path.display()
            ));
        }
    }
    found
}

/// Writes back what is dirty above block device `device` while its daemon
/// still serves: every file system mounted from it (syncfs(2)), then the
/// device's own page cache and write cache (fsync(2) on it). Returns how
/// many file systems were synced. A device's removal writes back too, but
/// may fail that writeback (ublk on 6.12 aborts it), and nothing would be
/// left to serve it then.
pub fn sync_above(device: &Path) -> io::Result<usize> {
    let rdev = rustix::fs::stat(device)?.st_rdev;
    let want = format!("{}:{}", rustix::fs::major(rdev), rustix::fs::minor(rdev));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut synced = 0;
    for mount in mountinfo.lines().filter_map(|l| mount_of(l, &want)) {
        let dir = rustix::fs::open(
            mount.as_str(),
            rustix::fs::OFlags::RDONLY
                | rustix::fs::OFlags::DIRECTORY
                | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        rustix::fs::syncfs(&dir)?;
        synced += 1;
    }
    let dev = std::fs::File::open(device)?;
    dev.sync_all()?;
    Ok(synced)
}

/// The mount point of a /proc/self/mountinfo line whose device (its third
/// field, MAJOR:MINOR) is `dev`, with the kernel's octal escapes (`\040`
/// for a space) undone.
pub(crate) fn mount_of(line: &str, dev: &str) -> Option<String> {
    let mut fields = line.split(' ');
    if fields.nth(2)? != dev {
        return None;
    }
    let escaped = fields.nth(1)?.as_bytes();
    let mut out = Vec::with_capacity(escaped.len());
    let mut i = 0;
    while i < escaped.len() {
        let octal = escaped
            .get(i + 1..i + 4)
            .filter(|_| escaped[i] == b'\\')
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match octal {
            Some(b) => {
                out.push(b);
                i += 4;
            }
            None => {
                out.push(escaped[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// A frontend whose kernel queue direct-mode daemons read themselves, on
/// descriptors it lends them, while the broker keeps custody: a reference
/// to each lent descriptor for as long as its daemon may read (so that
/// what it read outlives it), and the kernel's re-send of what a daemon
/// read and did not answer. The export calls these in order: `lend` at
/// ATTACH; `park`, then `resend`, then `serve_by`, before the daemon reads;
/// `resend`, then `unpark`, once it is gone. (ublk: the kernel holds what
/// a dead server read, and re-issues it itself; only `serve_by` acts.)
/// When a daemon that begins serving a lent queue is the kernel's server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// From its RESTORE.
    Now,
    /// Once the kernel says so (the frontend calls `Export::served`).
    Later,
}

pub trait Lender: Send + Sync {
    /// What a daemon needs to serve the queue, or why it cannot be lent
    /// now (the kernel has not initialised it, or cannot re-send).
    fn terms(&self) -> Result<holdfast_proto::DirectTerms, String>;
    /// New descriptors of the queue for one daemon.
    fn lend(&self) -> io::Result<Vec<std::os::fd::OwnedFd>>;
    /// Stops the frontend's own readers, each after the request it holds;
    /// returns once none reads.
    fn park(&self) -> io::Result<()>;
    /// Has the kernel queue again every request read and not answered.
    fn resend(&self) -> io::Result<()>;
    /// Lets the frontend's readers read again.
    fn unpark(&self);
    /// Whether the request of origin tag `tag` was re-sent by the kernel
    /// (a lost daemon, or a previous broker, had read it).
    fn is_resent(&self, tag: u64) -> bool;
    /// Requests the kernel waits on the queue's readers for, where it says
    /// (FUSE: /sys/fs/fuse/connections/N/waiting): a direct-mode daemon
    /// that answers none of them while there are some is hung.
    fn waiting(&self) -> Option<u64>;
    /// The queue is daemon `pid`'s from its RESTORE on: tells the kernel
    /// where its device's server is (ublk: START_DEV, or a recovery);
    /// nothing where the kernel need not know. Called once per daemon that
    /// begins serving (attached, revived, or an activated successor), not
    /// for one that serves already. [`Serving::Later`]: the kernel takes
    /// `pid` as its server only once it has fetched the queue, after its
    /// RESTORED; the frontend then calls [`Export::served`].
    ///
    /// [`Export::served`]: crate::export::Export::served
    fn serve_by(&self, _pid: u32) -> io::Result<Serving> {
        Ok(Serving::Now)
    }
    /// A planned handoff stops dispatching to the current daemon `pid`:
    /// where the kernel can, it stops handing it requests too (ublk:
    /// QUIESCE_DEV), so what the daemon holds when it is told to drain is
    /// all it gets. Called under the export's lock: bounded, and it must
    /// not call into the export.
    fn quiesce(&self, _pid: u32) {}
    /// Whether only a direct-mode daemon can serve the export: the broker
    /// has no reader of its own on this queue.
    fn direct_only(&self) -> bool {
        false
    }
}

/// A blob frontend (cachefiles), which a new daemon must tell about every
/// open blob before it gets anything else: a blob's reads name it only by
/// number.
pub trait Reopen: Send + Sync {
    /// An [`Op::Open`](holdfast_proto::shm::Op::Open) per open blob, with
    /// its name as data and an origin that expects no reply to the kernel.
    /// Called under the export's lock: must not call into the export.
    fn reopens(&self) -> Vec<(holdfast_proto::shm::Ask, Origin, Data)>;
}

#[cfg(test)]
mod tests {
    #[test]
    fn mount_points_from_mountinfo() {
        let line = "36 35 259:3 / /mnt/with\\040space rw,relatime shared:1 - ext4 /dev/ublkb0 rw";
        assert_eq!(
            super::mount_of(line, "259:3").as_deref(),
            Some("/mnt/with space")
        );
        assert_eq!(super::mount_of(line, "259:4"), None);
        assert_eq!(super::mount_of("36 35", "259:3"), None);
        let odd = "1 2 8:1 / /a\\9x rw - ext4 /dev/sda1 rw";
        assert_eq!(super::mount_of(odd, "8:1").as_deref(), Some("/a\\9x"));
    }
}
