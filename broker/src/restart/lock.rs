//! One broker per control socket: an exclusive `flock` on `SOCKET.lock`,
//! held for the broker's life and across its re-exec (the descriptor is
//! passed on; a lock belongs to the open file, not to the process). Without
//! it, a second broker started on the same socket would unlink the live
//! broker's socket and take its place.

use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{FlockOperation, Mode, OFlags};

/// The held lock.
pub struct InstanceLock {
    fd: OwnedFd,
}

impl InstanceLock {
    /// The lock file of `socket`.
    pub fn path(socket: &Path) -> PathBuf {
        let mut p = socket.as_os_str().to_owned();
        p.push(".lock");
        p.into()
    }

    /// Takes the lock of `socket` (or keeps `inherited`, the one a
    /// re-executing broker passed on) and writes this pid into it. If a
    /// live broker holds it, the error names its pid.
    pub fn acquire(socket: &Path, inherited: Option<OwnedFd>) -> Result<Self, String> {
        let path = Self::path(socket);
        let fd = match inherited {
            Some(fd) => fd,
            None => rustix::fs::open(
                &path,
                OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?,
        };
        match rustix::fs::flock(&fd, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let who = holder(socket, fd).map_or_else(
                    || "another broker".to_owned(),
                    |pid| format!("broker pid {pid}"),
                );
                return Err(format!(
                    "{who} is serving {}; stop it first, or replace it in place with \
                     `holdfastctl --socket {} broker upgrade`",
                    socket.display(),
                    socket.display()
                ));
            }
            Err(e) => return Err(format!("cannot lock {}: {e}", path.display())),
        }
        let mut file = std::fs::File::from(fd);
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        if let Err(e) = written {
            return Err(format!("cannot write {}: {e}", path.display()));
        }
        Ok(Self { fd: file.into() })
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }
}

/// The pid of the broker holding the lock: the live socket's peer, else
/// what the lock file says.
fn holder(socket: &Path, lock: OwnedFd) -> Option<u32> {
    let peer = crate::sys::seqpacket::connect(socket)
        .ok()
        .and_then(|s| crate::sys::seqpacket::peer_cred(std::os::fd::AsFd::as_fd(&s)).ok())
        .and_then(|c| u32::try_from(c.pid.as_raw_nonzero().get()).ok());
    peer.or_else(|| {
        let mut text = String::new();
        std::fs::File::from(lock).read_to_string(&mut text).ok()?;
        text.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_and_named() {
        let dir = std::env::temp_dir().join(format!("holdfast-lock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("b.sock");
        let held = InstanceLock::acquire(&sock, None).unwrap();
        let err = InstanceLock::acquire(&sock, None).err().unwrap();
        assert!(
            err.contains(&format!("broker pid {}", std::process::id())),
            "{err}"
        );
        // The holder keeps it across an exec with the same open file.
        let again = InstanceLock::acquire(&sock, Some(held.fd().try_clone().unwrap()));
        assert!(again.is_ok());
        drop((held, again));
        assert!(InstanceLock::acquire(&sock, None).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
