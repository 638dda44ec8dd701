//! Process handles (pidfd, Linux 5.3+) used to fence daemons: a pidfd names
//! one process for its whole life, so a kill through it can never hit a
//! process that reused the pid.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};

/// `SO_PEERPIDFD` from include/uapi/asm-generic/socket.h (Linux 6.5): a pidfd
/// for the process that connected a Unix socket, free of pid-reuse races.
/// Not in rustix 1.1, hence the raw getsockopt.
const SO_PEERPIDFD: libc::c_int = 77;

/// A pidfd and the pid it was opened for.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: u32,
}

impl Pidfd {
    /// The pidfd of the peer of a connected Unix socket. Uses SO_PEERPIDFD
    /// and falls back to `pidfd_open(SO_PEERCRED pid)` on older kernels.
    pub fn of_peer(sock: BorrowedFd<'_>, peer_pid: u32) -> io::Result<Self> {
        let mut fd: libc::c_int = -1;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `fd`.
        let rc = unsafe {
            libc::getsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERPIDFD,
                (&raw mut fd).cast(),
                &raw mut len,
            )
        };
        if rc == 0 && fd >= 0 {
            // SAFETY: the kernel returned a new descriptor that we now own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            return Ok(Self { fd, pid: peer_pid });
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::ENOPROTOOPT) {
            return Err(err);
        }
        Self::open(peer_pid)
    }

    /// `pidfd_open(pid)`.
    pub fn open(pid: u32) -> io::Result<Self> {
        let raw = i32::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
        let pid_t = Pid::from_raw(raw).ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
        let fd = pidfd_open(pid_t, PidfdFlags::empty())?;
        Ok(Self { fd, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGKILL through the pidfd. A process that already exited is not an error.
    pub fn kill(&self) -> io::Result<()> {
        self.signal(Signal::KILL)
    }

    /// Sends `sig` through the pidfd. A process that already exited is not
    /// an error.
    pub fn signal(&self, sig: Signal) -> io::Result<()> {
        match pidfd_send_signal(&self.fd, sig) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::SRCH) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether the process has exited (its pidfd polls readable once the
    /// whole thread group is gone and its memory released).
    pub fn is_gone(&self) -> bool {
        self.wait_gone(Duration::ZERO)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = super::deadline(timeout);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let ts = Timespec {
                tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
            match poll(&mut fds, Some(&ts)) {
                Ok(_) if fds[0].revents().intersects(PollFlags::IN | PollFlags::HUP) => {
                    return true;
                }
                Ok(_) | Err(rustix::io::Errno::INTR) if !left.is_zero() => continue,
                _ => return false,
            }
        }
    }

    /// Reaps an exited child (waitid(P_PIDFD), Linux 5.4) and says how it
    /// ended; None while it runs. A process that is not this broker's
    /// child (one a crashed broker started) is reaped by someone else.
    pub fn reap(&self) -> Option<String> {
        use rustix::process::{WaitId, WaitIdOptions, waitid};
        match waitid(
            WaitId::PidFd(self.fd.as_fd()),
            WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
        ) {
            Ok(Some(st)) => Some(match (st.exit_status(), st.terminating_signal()) {
                (Some(code), _) => format!("exit status {code}"),
                (None, Some(sig)) => format!("signal {sig}"),
                _ => "exited".into(),
            }),
            Ok(None) => None,
            Err(rustix::io::Errno::CHILD) => self
                .is_gone()
                .then(|| "exited (not this broker's child)".into()),
            Err(e) => Some(format!("wait failed: {e}")),
        }
    }

    /// Fence: kill the process and wait until it is gone, so that it can no
    /// longer act on any request it held.
    pub fn fence(&self, timeout: Duration) -> io::Result<()> {
        self.kill()?;
        if self.wait_gone(timeout) {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "pid {} did not exit within {timeout:?} of SIGKILL (stuck in the kernel?)",
                    self.pid
                ),
            ))
        }
    }
}

/// When process `pid` started, in clock ticks since boot (/proc/PID/stat,
/// field 22): with the pid, it names one process for good.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold anything.
    let rest = stat.get(stat.rfind(')')?.checked_add(2)?..)?;
    rest.split_ascii_whitespace().nth(19)?.parse().ok()
}

impl AsFd for Pidfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
