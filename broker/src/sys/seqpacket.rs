//! AF_UNIX SOCK_SEQPACKET sockets (unix(7)): message boundaries are kept, so
//! one packet is one control message, and descriptors travel in SCM_RIGHTS.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
    UCred,
};

/// Most descriptors a received message carries (FD_PUT passes one).
pub const MAX_FDS: usize = 4;
/// Most descriptors a sent message carries: ATTACHED's four, and in
/// direct mode the lent FUSE descriptors.
pub const MAX_SEND_FDS: usize =
    holdfast_proto::control::attach_fds::COUNT + holdfast_proto::MAX_DIRECT_CONNS as usize;

/// A received packet.
pub struct Packet {
    /// Bytes received (at most the buffer's length).
    pub len: usize,
    /// The packet was larger than the buffer and was cut.
    pub truncated: bool,
    /// Descriptors that came with it, already close-on-exec.
    pub fds: Vec<OwnedFd>,
}

fn socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Creates a listening socket at `path`, replacing a stale one, with `mode`.
pub fn listen(path: &Path, mode: u32) -> io::Result<OwnedFd> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let fd = socket()?;
    let addr = SocketAddrUnix::new(path)?;
    // Bind with a umask that leaves no access to others, then set the
    // requested mode: the socket is never briefly more open than asked.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = rustix::net::bind(&fd, &addr);
    rustix::process::umask(old);
    bound?;
    rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(mode))?;
    rustix::net::listen(&fd, 64)?;
    Ok(fd)
}

/// Accepts one connection (blocking).
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    Ok(rustix::net::accept_with(listener, SocketFlags::CLOEXEC)?)
}

/// The connecting process's pid, uid and gid (SO_PEERCRED).
pub fn peer_cred(sock: BorrowedFd<'_>) -> io::Result<UCred> {
    Ok(rustix::net::sockopt::socket_peercred(sock)?)
}

/// Sends one packet with up to [`MAX_SEND_FDS`] descriptors, without blocking:
/// a peer that does not read its replies gets EAGAIN, not a stuck broker.
pub fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SEND_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many descriptors for one message",
        ));
    }
    let sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL | SendFlags::DONTWAIT,
    )?;
    if sent != bytes.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short send"));
    }
    Ok(())
}

/// Receives one packet into `buf`. A packet of length 0 means the peer
/// closed the connection. More than [`MAX_FDS`] descriptors is reported as
/// truncation (the caller drops them, closing them).
pub fn recv(sock: BorrowedFd<'_>, buf: &mut [u8], flags: RecvFlags) -> io::Result<Packet> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(buf)],
        &mut control,
        flags | RecvFlags::CMSG_CLOEXEC | RecvFlags::TRUNC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = m {
            fds.extend(rights);
        }
    }
    Ok(Packet {
        len: msg.bytes.min(buf.len()),
        // The control buffer rounds up and may hold a few more than
        // MAX_FDS; more than MAX_FDS is refused all the same.
        truncated: msg.bytes > buf.len()
            || fds.len() > MAX_FDS
            || msg.flags.contains(ReturnFlags::TRUNC)
            || msg.flags.contains(ReturnFlags::CTRUNC),
        fds,
    })
}

/// Whether the peer has closed its end (without reading anything).
pub fn hung_up(sock: BorrowedFd<'_>) -> bool {
    let mut pfd = [rustix::event::PollFd::new(
        &sock,
        rustix::event::PollFlags::empty(),
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut pfd, Some(&zero)).is_ok()
        && pfd[0].revents().contains(rustix::event::PollFlags::HUP)
}

/// Connects to a listening socket (for holdfastctl).
pub fn connect(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket()?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn too_many_descriptors_is_truncation() {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds = [f.as_fd(); 6];
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(&a, &[IoSlice::new(b"x")], &mut control, SendFlags::empty()).unwrap();
        let mut buf = [0u8; 16];
        let p = recv(b.as_fd(), &mut buf, RecvFlags::empty()).unwrap();
        assert_eq!(p.len, 1);
        assert!(p.truncated, "{} fds received", p.fds.len());

        // Exactly MAX_FDS is fine.
        send(a.as_fd(), b"y", &[f.as_fd(); MAX_FDS]).unwrap();
        let p = recv(b.as_fd(), &mut buf, RecvFlags::empty()).unwrap();
        assert!(!p.truncated);
        assert_eq!(p.fds.len(), MAX_FDS);
    }
}
