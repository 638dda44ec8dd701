//! The service manager's notification protocol (sd_notify(3)): datagrams
//! of `KEY=VALUE` lines to `$NOTIFY_SOCKET`, descriptors in SCM_RIGHTS.
//! READY=1, STATUS=, RELOADING=1, STOPPING=1, and the fd store: FDSTORE=1
//! with FDNAME= (and FDPOLL=0, systemd 246: the broker decides when a
//! descriptor goes, not a POLLHUP), FDSTOREREMOVE=1 with FDNAME=.

use std::ffi::OsStr;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix};

/// The variable naming the service manager's socket.
pub const NOTIFY_ENV: &str = "NOTIFY_SOCKET";

/// A connection to the service manager, when the broker runs under one.
pub struct Notifier {
    sock: OwnedFd,
    addr: SocketAddrUnix,
}

impl Notifier {
    /// The service manager named by `$NOTIFY_SOCKET`, if any. The variable
    /// stays set: a re-executed broker notifies the same manager.
    pub fn from_env() -> Result<Option<Self>, String> {
        let Some(path) = std::env::var_os(NOTIFY_ENV) else {
            return Ok(None);
        };
        let addr = address(&path).map_err(|e| format!("{NOTIFY_ENV}={path:?}: {e}"))?;
        let sock = rustix::net::socket_with(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| format!("sd_notify socket: {e}"))?;
        Ok(Some(Self { sock, addr }))
    }

    /// Sends one message, with at most one descriptor.
    pub fn send(&self, msg: &str, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("no room for the descriptor"));
        }
        rustix::net::sendmsg_addr(
            &self.sock,
            &self.addr,
            &[IoSlice::new(msg.as_bytes())],
            &mut control,
            SendFlags::NOSIGNAL,
        )?;
        Ok(())
    }

    /// FDSTORE=1: the manager keeps a duplicate of `fd` as `name` and
    /// passes it to the next broker it starts. A descriptor it holds
    /// already (the same open file) is not stored twice.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.send(&format!("FDSTORE=1\nFDNAME={name}\nFDPOLL=0\n"), Some(fd))
    }

    /// FDSTOREREMOVE=1: the manager closes what it keeps as `name`.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        self.send(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), None)
    }
}

impl AsFd for Notifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// A socket path, or an abstract name starting with `@`.
fn address(path: &OsStr) -> rustix::io::Result<SocketAddrUnix> {
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddrUnix::new_abstract_name(name),
        None => SocketAddrUnix::new(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_the_descriptor_and_its_name() {
        let dir = std::env::temp_dir().join(format!("holdfast-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let rx = rustix::net::socket(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::DGRAM,
            None,
        )
        .unwrap();
        rustix::net::bind(&rx, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        let n = Notifier {
            sock: rustix::net::socket(
                rustix::net::AddressFamily::UNIX,
                rustix::net::SocketType::DGRAM,
                None,
            )
            .unwrap(),
            addr: address(path.as_os_str()).unwrap(),
        };
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        n.store("cachefiles", fd.as_fd()).unwrap();
        n.remove("fuse.vol0.1.0").unwrap();
        let mut buf = [0u8; 128];
        let flags = rustix::net::RecvFlags::empty();
        let p = crate::sys::seqpacket::recv(rx.as_fd(), &mut buf, flags).unwrap();
        assert_eq!(&buf[..p.len], b"FDSTORE=1\nFDNAME=cachefiles\nFDPOLL=0\n");
        assert_eq!(p.fds.len(), 1);
        let p = crate::sys::seqpacket::recv(rx.as_fd(), &mut buf, flags).unwrap();
        assert_eq!(&buf[..p.len], b"FDSTOREREMOVE=1\nFDNAME=fuse.vol0.1.0\n");
        assert!(p.fds.is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
