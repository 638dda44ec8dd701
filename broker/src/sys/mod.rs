//! Thin typed wrappers over the kernel interfaces the broker uses, apart
//! from the FUSE device (see `holdfast_kernel::fuse::sys`).

pub mod loopdev;
pub mod pidfd;
pub mod seqpacket;

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};
use rustix::fs::{MemfdFlags, SealFlags};

/// Marks the calling thread, and the threads it starts from now on, as
/// serving the kernel's writeback (prctl(2) PR_SET_IO_FLUSHER, Linux 5.6):
/// reclaim in it then does no I/O, so it cannot wait on the writeback it
/// serves (the loop/NBD deadlock). Only threads on a volume's request path
/// are marked: reclaim without I/O is slower under memory pressure, and a
/// cachefiles export's reads are no writeback. Without CAP_SYS_RESOURCE
/// it fails; that is said once.
pub fn set_io_flusher() {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Err(e) = rustix::process::configure_io_flusher_behavior(true)
        && !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed)
    {
        crate::warn!(
            "PR_SET_IO_FLUSHER: {e} (it needs CAP_SYS_RESOURCE): under memory pressure, \
             writeback through this broker can deadlock"
        );
    }
}

/// `now + d`, or a day from now if that overflows.
pub fn deadline(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(now)
}

/// A non-blocking, close-on-exec eventfd (eventfd(2)), for wake-ups inside
/// the broker only.
pub fn eventfd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(
        0,
        EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK,
    )?)
}

/// A wake-up channel shared with a daemon: a non-blocking pipe (pipe(2)),
/// returned as (read end, write end); each side keeps one end. Not an
/// eventfd: SCM_RIGHTS passes the open file description, which holds
/// O_NONBLOCK, so a daemon could clear it on a shared eventfd and fill the
/// counter, and the broker's next wake-up would block forever. A daemon
/// cannot touch the flags of the broker's own pipe end, and a full pipe is
/// just a wake-up already pending.
pub fn kick_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(
        rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
    )?)
}

/// Wakes the reader of a kick pipe or eventfd (8 bytes, as eventfds need).
/// A full pipe or counter (EAGAIN) is already a pending wake-up; a gone
/// reader (EPIPE) is noticed elsewhere.
pub fn kick(fd: BorrowedFd<'_>) {
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

/// Empties a kick pipe or eventfd. Returns false if the pipe's writer
/// closed its end (end of file).
pub fn drain(fd: BorrowedFd<'_>) -> bool {
    let mut buf = [0u8; 512];
    // Bounded: a peer writing as fast as we read cannot keep us here.
    for _ in 0..64 {
        match rustix::io::read(fd, &mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(_) => return true,
        }
    }
    true
}

/// A memfd of `len` bytes whose size is sealed (memfd_create(2),
/// F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL from include/uapi/linux/fcntl.h):
/// a daemon that receives it cannot truncate it under the broker, which
/// would turn the broker's next access into SIGBUS.
pub fn sealed_memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create(name, MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, len as u64)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// poll(2) on `fds` for readability; returns which are readable (or hung
/// up). EINTR counts as a timeout.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(fd, PollFlags::IN))
        .collect();
    let ts = Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    match rustix::event::poll(&mut pfds, Some(&ts)) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => return Ok(vec![false; fds.len()]),
        Err(e) => return Err(e.into()),
    }
    Ok(pfds
        .iter()
        .map(|p| {
            p.revents()
                .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
        })
        .collect())
}

/// Blocks `signals` in the calling thread (and threads it spawns later), so
/// that they can be taken with [`wait_signal`].
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    // SAFETY: plain libc calls on a local sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        for &s in signals {
            libc::sigaddset(&raw mut set, s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

/// Waits up to `timeout` for one of `signals` (which must be blocked).
pub fn wait_signal(signals: &[libc::c_int], timeout: Duration) -> Option<libc::c_int> {
    // SAFETY: plain libc calls on local values.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        for &s in signals {
            libc::sigaddset(&raw mut set, s);
        }
        let ts = libc::timespec {
            tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            tv_nsec: libc::c_long::from(timeout.subsec_nanos().min(999_999_999) as i32),
        };
        let s = libc::sigtimedwait(&raw const set, std::ptr::null_mut(), &raw const ts);
        (s > 0).then_some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn kicking_a_full_pipe_never_blocks() {
        let (read, write) = kick_pipe().unwrap();
        // What a hostile daemon can do to its own end: make it blocking.
        // The broker's end is its own open file description, still
        // non-blocking, so a full pipe just refuses more bytes.
        rustix::io::ioctl_fionbio(&read, false).unwrap();
        for _ in 0..100_000 {
            kick(write.as_fd());
        }
    }

    #[test]
    fn drain_reports_a_closed_writer() {
        let (read, write) = kick_pipe().unwrap();
        kick(write.as_fd());
        kick(write.as_fd());
        assert!(drain(read.as_fd()));
        drop(write);
        assert!(!drain(read.as_fd()));
    }
}
