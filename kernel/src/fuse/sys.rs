//! The FUSE device (/dev/fuse, Documentation/filesystems/fuse.rst) and the
//! mount(2) call that binds a connection to a mount point. Struct layouts
//! come from the `fuse-abi` crate (include/uapi/linux/fuse.h, 7.40).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use fuse_abi::linux::fuse_out_header;
use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, UnmountFlags};

/// `FUSE_DEV_IOC_CLONE` = `_IOR(229, 0, uint32_t)` (include/uapi/linux/fuse.h,
/// Linux 4.2): attaches a fresh /dev/fuse open to an existing connection so
/// that several threads read requests, each with its own processing queue.
const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;

/// `FUSE_NOTIFY_RESEND` (include/uapi/linux/fuse.h, protocol 7.40, Linux
/// 6.9): the kernel moves every request read and not answered on any of
/// the connection's descriptors back to its pending queue, each with
/// `FUSE_UNIQUE_RESEND` (bit 63) set in its unique, so that a reply to the
/// old unique no longer matches. A kernel without it answers EINVAL.
const FUSE_NOTIFY_RESEND: i32 = fuse_abi::linux::fuse_notify_code::FUSE_NOTIFY_RESEND as i32;

/// Opens /dev/fuse.
pub fn open_dev() -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        "/dev/fuse",
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// A new /dev/fuse descriptor serving the same connection as `dev`.
/// Replies must be written to the descriptor the request was read from.
pub fn clone_dev(dev: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let clone = open_dev()?;
    let mut src: u32 = u32::try_from(dev.as_raw_fd()).unwrap_or(u32::MAX);
    // SAFETY: the ioctl reads one u32 from the pointer we pass.
    let rc = unsafe { libc::ioctl(clone.as_raw_fd(), FUSE_DEV_IOC_CLONE, &raw mut src) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(clone)
}

/// Mounts the connection `dev` on the regular file `mountpoint` (mount(2)
/// with the "fuse" type and the options in fuse.rst): the file system's
/// root is itself a regular file, `0600` and root's, and the kernel checks
/// permissions (`default_permissions`). A mount point and the root it gets
/// must both be files or both directories (graft_tree in fs/namespace.c).
pub fn mount(dev: BorrowedFd<'_>, mountpoint: &Path, max_read: u32) -> io::Result<()> {
    let opts = format!(
        "fd={},rootmode=100600,user_id=0,group_id=0,allow_other,default_permissions,max_read={max_read}",
        dev.as_raw_fd()
    );
    let target = CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "mount point contains NUL"))?;
    let data = CString::new(opts).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    rustix::mount::mount(
        "holdfast",
        target.as_c_str(),
        "fuse.holdfast",
        MountFlags::NOSUID | MountFlags::NODEV,
        Some(data.as_c_str()),
    )?;
    Ok(())
}

/// Detaches the mount (MNT_DETACH): open files keep working until closed.
pub fn unmount(mountpoint: &Path) -> io::Result<()> {
    Ok(rustix::mount::unmount(mountpoint, UnmountFlags::DETACH)?)
}

/// If `mountpoint` is a dead FUSE mount (its server gone: ENOTCONN), detach
/// it so a new one can take its place.
pub fn clear_stale_mount(mountpoint: &Path) {
    if let Err(e) = std::fs::metadata(mountpoint)
        && e.raw_os_error() == Some(libc::ENOTCONN)
    {
        let _ = unmount(mountpoint);
    }
}

/// Reads one request: the first `head.len()` bytes into `head`, the rest into
/// `body_len` bytes at `body`. `body` may point into shared memory, which is
/// why it is a raw pointer and not a slice.
///
/// # Safety
/// `body` must be valid for writes of `body_len` bytes for the whole call.
pub unsafe fn read_request(
    dev: BorrowedFd<'_>,
    head: &mut [u8],
    body: *mut u8,
    body_len: usize,
) -> io::Result<usize> {
    let iov = [
        libc::iovec {
            iov_base: head.as_mut_ptr().cast(),
            iov_len: head.len(),
        },
        libc::iovec {
            iov_base: body.cast(),
            iov_len: body_len,
        },
    ];
    // SAFETY: both iovecs are valid for writes (caller's contract for body).
    let n = unsafe { libc::readv(dev.as_raw_fd(), iov.as_ptr(), 2) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Asks the kernel to re-send what the connection's readers took and did
/// not answer (see [`FUSE_NOTIFY_RESEND`]). A notification is a reply
/// header with unique 0 and the code in `error`, here without a body.
pub fn notify_resend(dev: BorrowedFd<'_>) -> io::Result<()> {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    let n = rustix::io::write(dev, &header)?;
    if n != header.len() {
        return Err(io::Error::other("short write of FUSE_NOTIFY_RESEND"));
    }
    Ok(())
}

/// Most pieces of a reply body (`reply`).
pub const MAX_BODY_PIECES: usize = 4;

/// Writes the reply to request `unique`: a header with `errno` (positive;
/// 0 for success), then the `body` pieces. The kernel answers ENOENT for a
/// request it no longer waits for (interrupted, or re-sent under a new
/// unique) and ENODEV once the connection is gone.
///
/// # Safety
/// Every iovec of `body` must be valid for reads for the whole call.
pub unsafe fn reply(
    dev: BorrowedFd<'_>,
    unique: u64,
    errno: i32,
    body: &[libc::iovec],
) -> io::Result<()> {
    if body.len() > MAX_BODY_PIECES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many reply pieces",
        ));
    }
    let len = body.iter().try_fold(size_of::<fuse_out_header>(), |a, v| {
        a.checked_add(v.iov_len)
    });
    let len = len
        .and_then(|l| u32::try_from(l).ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "reply too long"))?;
    let header = fuse_out_header {
        len,
        error: errno.saturating_neg(),
        unique,
    };
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MAX_BODY_PIECES + 1];
    iov[0] = libc::iovec {
        iov_base: (&raw const header).cast_mut().cast(),
        iov_len: size_of::<fuse_out_header>(),
    };
    iov[1..=body.len()].copy_from_slice(body);
    let count = libc::c_int::try_from(body.len() + 1).unwrap_or(1);
    // SAFETY: the header lives on this stack frame; the body pieces are
    // valid for reads (caller's contract).
    let n = unsafe { libc::writev(dev.as_raw_fd(), iov.as_ptr(), count) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The signal that interrupts a reader blocked in read(2) on /dev/fuse, so
/// that it can stop or park: with [`install_interrupt`]'s handler, which
/// does nothing and is installed without SA_RESTART, the read returns
/// EINTR. SIGURG is ignored by default and used for nothing else here.
pub const INTERRUPT_SIGNAL: libc::c_int = libc::SIGURG;

extern "C" fn on_interrupt(_: libc::c_int) {}

/// Installs the handler of [`INTERRUPT_SIGNAL`] (once per process; again
/// is the same handler).
pub fn install_interrupt() -> io::Result<()> {
    // SAFETY: a zeroed sigaction with a handler that touches nothing is a
    // valid argument; no SA_RESTART, so that read(2) returns EINTR.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&raw mut sa.sa_mask);
        libc::sigaction(INTERRUPT_SIGNAL, &raw const sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Interrupts `thread`'s blocking read (a signal that lands before the
/// read begins is lost: callers repeat until the thread says it stopped).
///
/// # Safety
/// `thread` must be a live thread of this process (not exited, or joined).
pub unsafe fn interrupt(thread: libc::pthread_t) {
    // SAFETY: the caller's contract; the handler does nothing.
    unsafe { libc::pthread_kill(thread, INTERRUPT_SIGNAL) };
}

/// The FUSE control file system (fs/fuse/control.c): a directory per
/// connection, named by its device number, with the count of requests the
/// kernel waits on the server for in `waiting`.
pub const CONNECTIONS: &str = "/sys/fs/fuse/connections";

/// Requests connection `id` waits on its server for (sent and not
/// answered, or queued to be read), mounting the control file system first
/// if it is not.
pub fn waiting(id: u32) -> io::Result<u64> {
    let path = Path::new(CONNECTIONS).join(id.to_string()).join("waiting");
    let text = match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            mount_connections()?;
            std::fs::read_to_string(&path)?
        }
        r => r?,
    };
    text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {text:?}", path.display()),
        )
    })
}

/// Mounts the control file system on [`CONNECTIONS`] (mount(2), type
/// "fusectl"), where it is not.
fn mount_connections() -> io::Result<()> {
    let dir = Path::new(CONNECTIONS);
    // Mounted already when it lists a connection (one is: ours).
    if std::fs::read_dir(dir)?.next().is_some() {
        return Ok(());
    }
    rustix::mount::mount(
        "fusectl",
        dir,
        "fusectl",
        rustix::mount::MountFlags::empty(),
        None,
    )?;
    Ok(())
}
