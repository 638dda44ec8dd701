//! The control connection to a broker: HELLO, ATTACH or PREPARE, RESTORE,
//! DETACH, the handoff messages and the fd store, over SOCK_SEQPACKET with descriptors in SCM_RIGHTS.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use holdfast_proto::control::attach_fds;
use holdfast_proto::{
    Attach, ErrorCode, Hello, MAX_MESSAGE_LEN, PROTOCOL_VERSION, Reply, Request, caps,
};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::Error;
use crate::rings::Attachment;

/// ATTACHED's descriptors, with direct mode's FUSE descriptors.
const MAX_FDS: usize = attach_fds::COUNT + holdfast_proto::MAX_DIRECT_CONNS as usize;

/// A connection to the broker's control socket.
pub struct Connection {
    sock: OwnedFd,
    buf: Vec<u8>,
    /// What this daemon put in the fd store, to put there again for a
    /// broker that did not keep it (one restarted without its record).
    deposits: Vec<(String, OwnedFd)>,
    /// What the broker said it speaks, in its HELLO.
    broker_caps: u64,
}

impl Connection {
    /// Connects to the broker's socket (no HELLO yet).
    pub fn connect(path: &Path) -> Result<Self, Error> {
        let ctx = |e: io::Error| Error::io(format!("cannot connect to {}", path.display()), e);
        let sock = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| ctx(e.into()))?;
        let addr = SocketAddrUnix::new(path).map_err(|e| ctx(e.into()))?;
        rustix::net::connect(&sock, &addr).map_err(|e| ctx(e.into()))?;
        Ok(Self {
            sock,
            buf: vec![0u8; MAX_MESSAGE_LEN],
            deposits: Vec::new(),
            broker_caps: 0,
        })
    }

    /// The socket, to poll for broker messages and EOF.
    pub fn socket(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Sends raw bytes as one message (tests use this for malformed input).
    pub fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), Error> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(Error::Protocol(
                "too many descriptors for one message".into(),
            ));
        }
        rustix::net::sendmsg(
            &self.sock,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
        .map_err(|e| Error::io("cannot send to the broker", e.into()))?;
        Ok(())
    }

    /// Receives one reply (blocking), with any descriptors it carries.
    pub fn recv(&mut self) -> Result<(Reply, Vec<OwnedFd>), Error> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = rustix::net::recvmsg(
            &self.sock,
            &mut [IoSliceMut::new(&mut self.buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
        .map_err(|e| Error::io("cannot receive from the broker", e.into()))?;
        let mut fds = Vec::new();
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = m {
                fds.extend(rights);
            }
        }
        if msg.bytes == 0 {
            return Err(Error::BrokerGone);
        }
        let bytes = self.buf.get(..msg.bytes).unwrap_or_default();
        let reply = Reply::decode(bytes)
            .map_err(|e| Error::Protocol(format!("bad message from the broker: {e}")))?;
        Ok((reply, fds))
    }

    /// Sends a request and waits for its reply; an ERROR reply is an `Err`.
    pub fn call(
        &mut self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Reply, Vec<OwnedFd>), Error> {
        self.send_raw(&req.encode(), fds)?;
        match self.recv()? {
            (Reply::Error(e), _) => Err(Error::Broker(e)),
            ok => Ok(ok),
        }
    }

    /// HELLO with this crate's protocol version.
    pub fn hello(&mut self) -> Result<(), Error> {
        let req = Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            caps: caps::ALL,
            pid: std::process::id(),
        });
        match self.call(&req, &[])? {
            (Reply::Hello { caps, .. }, _) => {
                self.broker_caps = caps;
                Ok(())
            }
            (other, _) => Err(unexpected("HELLO", &other)),
        }
    }

    /// Whether the broker announced capability `cap` (`caps::*`).
    pub fn broker_has(&self, cap: u64) -> bool {
        self.broker_caps & cap != 0
    }

    /// ATTACH to `export`; with `takeover`, the broker fences the current
    /// daemon first. `direct`: this daemon can serve in direct mode (the
    /// broker says which mode it gets).
    pub fn attach(
        &mut self,
        export: &str,
        takeover: bool,
        direct: bool,
    ) -> Result<Attachment, Error> {
        let req = Request::Attach(Attach {
            export: export.to_owned(),
            takeover,
            direct,
        });
        match self.call(&req, &[])? {
            (Reply::Attached(a), fds) => Attachment::new(a, fds),
            (other, _) => Err(unexpected("ATTACH", &other)),
        }
    }

    /// PREPARE: attach to `export` as the successor in a handoff;
    /// `direct` as for [`Self::attach`].
    pub fn prepare(&mut self, export: &str, direct: bool) -> Result<Attachment, Error> {
        let req = Request::Prepare {
            export: export.to_owned(),
            direct,
        };
        match self.call(&req, &[])? {
            (Reply::Attached(a), fds) => Attachment::new(a, fds),
            (other, _) => Err(unexpected("PREPARE", &other)),
        }
    }

    /// Sends a request whose answer (if any) comes later, read with
    /// [`Self::recv`].
    pub fn send(&self, req: &Request) -> Result<(), Error> {
        self.send_raw(&req.encode(), &[])
    }

    /// RESTORE: the broker starts dispatching, replays first. Returns how
    /// many requests are replayed.
    pub fn restore(&mut self) -> Result<u32, Error> {
        match self.call(&Request::Restore, &[])? {
            (Reply::Restored { replayed }, _) => Ok(replayed),
            (other, _) => Err(unexpected("RESTORE", &other)),
        }
    }

    /// Deposits `fd` in the broker's fd store of the attached export.
    pub fn fd_put(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), Error> {
        let req = Request::FdPut {
            name: name.to_owned(),
        };
        match self.call(&req, &[fd])? {
            (Reply::FdStored, _) => {
                let dup = fd
                    .try_clone_to_owned()
                    .map_err(|e| Error::io("cannot duplicate a deposited descriptor", e))?;
                self.deposits.retain(|(n, _)| n != name);
                self.deposits.push((name.to_owned(), dup));
                Ok(())
            }
            (other, _) => Err(unexpected("FD_PUT", &other)),
        }
    }

    /// After attaching to a new broker: puts what `old` deposited into
    /// this broker's fd store unless it has it already (it keeps the store
    /// across its own restart when it can).
    pub fn redeposit(&mut self, old: Connection) -> Result<(), Error> {
        for (name, fd) in old.deposits {
            if self.fd_get(&name)?.is_none() {
                self.fd_put(&name, fd.as_fd())?;
            } else {
                self.deposits.push((name, fd));
            }
        }
        Ok(())
    }

    /// Fetches a descriptor from the fd store; `None` if nothing is stored.
    pub fn fd_get(&mut self, name: &str) -> Result<Option<OwnedFd>, Error> {
        let req = Request::FdGet {
            name: name.to_owned(),
        };
        match self.call(&req, &[]) {
            Ok((Reply::Fd, mut fds)) if fds.len() == 1 => Ok(fds.pop()),
            Ok((other, _)) => Err(unexpected("FD_GET", &other)),
            Err(Error::Broker(e)) if e.code == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn unexpected(what: &str, reply: &Reply) -> Error {
    Error::Protocol(format!("unexpected reply to {what}: {reply:?}"))
}
