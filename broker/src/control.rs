//! The control socket: one thread per connection. A connection that ATTACHes
//! becomes a daemon session, and its thread then also reaps the daemon's
//! completion ring and watches the daemon's pidfd, so that a daemon loss is
//! noticed by socket EOF and by process exit, whichever comes first.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use holdfast_proto::{
    ErrorCode, HandoffRequest, MAX_MESSAGE_LEN, PROTOCOL_VERSION, Reply, Request, caps,
    control::attach_fds,
};
use rustix::net::RecvFlags;

use crate::export::{Export, Grant, Notice, QuiescedError};
use crate::sys::pidfd::Pidfd;
use crate::sys::{self, seqpacket};
use crate::{Broker, info, warn};

/// Most connections served at once; more are refused with an error.
pub const MAX_CONNECTIONS: usize = 128;
/// Consecutive bad messages after which a connection is closed.
const MAX_ERRORS: u32 = 32;
/// How long a refused peer gets to read its error before the socket closes.
const REFUSE_LINGER: Duration = Duration::from_millis(500);
/// A connection that sends no HELLO within this time is closed.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection (not a daemon session) idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often an idle session thread wakes to look at its daemon anyway.
const SESSION_TICK: Duration = Duration::from_millis(500);
/// How long a daemon released with requests in flight (its export removed)
/// has to finish them (a direct-mode daemon: to stop reading) before it is
/// fenced.
pub const RELEASE_DRAIN: Duration = Duration::from_secs(5);

/// Accepts connections until the listener fails.
pub fn serve(broker: Arc<Broker>, listener: OwnedFd) {
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let sock = match seqpacket::accept(listener.as_fd()) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!("control socket accept failed: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            // No waiting here: the accept loop must not stall.
            refuse(
                sock,
                &Reply::error(
                    ErrorCode::LimitReached,
                    format!("the broker serves {MAX_CONNECTIONS} connections already"),
                ),
                Duration::ZERO,
            );
            continue;
        }
        let broker = broker.clone();
        let count = active.clone();
        let spawned = std::thread::Builder::new()
            .name("holdfast-conn".into())
            .spawn(move || {
                Connection::new(&broker, sock).serve();
                count.fetch_sub(1, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            warn!("cannot start a connection thread: {e}");
        }
    }
}

/// Sends a final error and closes without a reset: the peer's unread
/// messages are drained first, since closing a Unix socket with unread data
/// makes the peer's receive fail with ECONNRESET before it sees the reply.
fn refuse(sock: OwnedFd, reply: &Reply, linger: Duration) {
    let _ = send(sock.as_fd(), reply, &[]);
    let _ = rustix::net::shutdown(&sock, rustix::net::Shutdown::Write);
    let end = std::time::Instant::now() + linger;
    let mut buf = [0u8; 512];
    for _ in 0..64 {
        let left = end.saturating_duration_since(std::time::Instant::now());
        let readable = sys::poll_readable(&[sock.as_fd()], left).unwrap_or_default();
        if !readable.first().copied().unwrap_or(false) {
            return;
        }
        match seqpacket::recv(sock.as_fd(), &mut buf, RecvFlags::DONTWAIT) {
            Ok(p) if p.len > 0 || p.truncated => {}
            _ => return,
        }
    }
}

/// Sends a reply; false if it could not be sent.
fn send(sock: BorrowedFd<'_>, reply: &Reply, fds: &[BorrowedFd<'_>]) -> bool {
    match seqpacket::send(sock, &reply.encode(), fds) {
        Ok(()) => true,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                warn!("cannot send reply (peer not reading?): {e}");
            }
            false
        }
    }
}

/// A received message: a request, or an error to send back.
enum Incoming {
    Eof,
    /// A non-blocking receive found nothing.
    Nothing,
    Request(Request, Vec<OwnedFd>),
    Bad(Reply),
}

struct Connection<'a> {
    broker: &'a Arc<Broker>,
    sock: OwnedFd,
    buf: Vec<u8>,
    peer_pid: u32,
    peer_uid: u32,
    errors: u32,
    /// A reply could not be sent (the peer left, or does not read).
    broken: bool,
}

/// How a daemon joins an export.
#[derive(Clone, Copy)]
enum Join {
    /// ATTACH, fencing a current daemon first with `takeover`.
    Attach { takeover: bool, direct: bool },
    /// PREPARE: as a handoff's successor.
    Successor { direct: bool },
}

/// How a daemon session ended.
enum End {
    /// DETACH completed, or released by a handoff: nothing in flight,
    /// nothing to fence.
    Detached,
    /// Lost (EOF, exit, hang, violation, takeover): fence, then replay.
    Lost(String),
}

impl<'a> Connection<'a> {
    fn new(broker: &'a Arc<Broker>, sock: OwnedFd) -> Self {
        Self {
            broker,
            sock,
            buf: vec![0u8; MAX_MESSAGE_LEN],
            peer_pid: 0,
            peer_uid: 0,
            errors: 0,
            broken: false,
        }
    }

    fn send(&mut self, reply: &Reply) {
        self.send_with(reply, &[]);
    }

    fn send_with(&mut self, reply: &Reply, fds: &[BorrowedFd<'_>]) {
        if !send(self.sock.as_fd(), reply, fds) {
            self.broken = true;
        }
    }

    fn recv(&mut self, flags: RecvFlags) -> Incoming {
        let pkt = match seqpacket::recv(self.sock.as_fd(), &mut self.buf, flags) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Incoming::Nothing,
            Err(_) => return Incoming::Eof,
        };
        if pkt.len == 0 && !pkt.truncated {
            return Incoming::Eof;
        }
        if pkt.truncated {
            return Incoming::Bad(Reply::error(
                ErrorCode::TooLarge,
                format!(
                    "message larger than {MAX_MESSAGE_LEN} bytes (or with more than {} descriptors) was dropped",
                    seqpacket::MAX_FDS
                ),
            ));
        }
        match Request::decode(self.buf.get(..pkt.len).unwrap_or_default()) {
            Ok(req) => Incoming::Request(req, pkt.fds),
            Err(holdfast_proto::DecodeError::UnsupportedVersion(v)) => Incoming::Bad(Reply::error(
                ErrorCode::UnsupportedVersion,
                format!(
                    "frame version {v} is not supported; this broker speaks protocol {PROTOCOL_VERSION}"
                ),
            )),
            Err(e) => Incoming::Bad(Reply::error(ErrorCode::Malformed, e.to_string())),
        }
    }

    /// Counts a bad message; returns false once the connection should close
    /// (after the last error was sent).
    fn bad(&mut self, reply: &Reply) -> bool {
        self.send(reply);
        self.errors = self.errors.saturating_add(1);
        self.errors < MAX_ERRORS && !self.broken
    }

    /// Ends the connection after a final error.
    fn refuse(self, reply: &Reply) {
        refuse(self.sock, reply, REFUSE_LINGER);
    }

    fn serve(mut self) {
        let cred = match seqpacket::peer_cred(self.sock.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                warn!("cannot read peer credentials: {e}");
                return;
            }
        };
        let uid = cred.uid.as_raw();
        self.peer_uid = uid;
        self.peer_pid = u32::try_from(cred.pid.as_raw_nonzero().get()).unwrap_or(0);
        if !self.broker.allow_uids.contains(&uid) {
            warn!("refused connection from uid {uid} (pid {})", self.peer_pid);
            self.refuse(&Reply::error(
                ErrorCode::NotPermitted,
                format!("uid {uid} may not use this broker; start it with --allow-uid {uid}"),
            ));
            return;
        }
        let mut hello = false;
        loop {
            // A peer that says nothing does not keep a connection forever.
            let idle = if hello { IDLE_TIMEOUT } else { HELLO_TIMEOUT };
            let readable = sys::poll_readable(&[self.sock.as_fd()], idle).unwrap_or_default();
            if !readable.first().copied().unwrap_or(false) {
                return;
            }
            let (req, fds) = match self.recv(RecvFlags::empty()) {
                Incoming::Eof => return,
                Incoming::Nothing => continue,
                Incoming::Bad(reply) => {
                    if !self.bad(&reply) {
                        return;
                    }
                    continue;
                }
                Incoming::Request(req, fds) => (req, fds),
            };
            drop(fds);
            let reply = match req {
                Request::Hello(_) if hello => {
                    Reply::error(ErrorCode::BadState, "HELLO was already sent")
                }
                Request::Hello(h) => {
                    if h.version != PROTOCOL_VERSION {
                        Reply::error(
                            ErrorCode::UnsupportedVersion,
                            format!(
                                "protocol version {} is not supported; this broker speaks {PROTOCOL_VERSION}",
                                h.version
                            ),
                        )
                    } else {
                        if h.pid != self.peer_pid {
                            info!(
                                "peer says it is pid {} but its credentials say {}; using the credentials",
                                h.pid, self.peer_pid
                            );
                        }
                        hello = true;
                        Reply::Hello {
                            version: PROTOCOL_VERSION,
                            caps: caps::ALL,
                            broker_pid: std::process::id(),
                        }
                    }
                }
                _ if !hello => Reply::error(ErrorCode::NotPermitted, "send HELLO first"),
                Request::Attach(a) => {
                    let join = Join::Attach {
                        takeover: a.takeover,
                        direct: a.direct,
                    };
                    match self.attach(&a.export, join) {
                        Ok(()) => return,
                        Err(reply) => reply,
                    }
                }
                Request::Prepare { export, direct } => {
                    match self.attach(&export, Join::Successor { direct }) {
                        Ok(()) => return,
                        Err(reply) => reply,
                    }
                }
                Request::Handoff(h) => {
                    let reply = self.operator_handoff(h);
                    if self.broken {
                        return;
                    }
                    reply
                }
                // On success the new broker answers on this connection.
                // Logged first: a broker that upgrades does not return here.
                Request::BrokerUpgrade => {
                    let (uid, pid) = (self.peer_uid, self.peer_pid);
                    info!("audit: uid={uid} pid={pid} action=broker-upgrade: requested");
                    Reply::error(ErrorCode::BadState, self.broker.request_upgrade(&self.sock))
                }
                Request::Metrics => {
                    let reply = self.metrics();
                    if self.broken {
                        return;
                    }
                    reply
                }
                Request::Status => {
                    let reply = self.status();
                    if self.broken {
                        return;
                    }
                    reply
                }
                Request::Restore
                | Request::Report(_)
                | Request::Detach
                | Request::Ready
                | Request::Quiesced
                | Request::FdPut { .. }
                | Request::FdGet { .. } => {
                    Reply::error(ErrorCode::NotAttached, "ATTACH to an export first")
                }
                other => self.common(other),
            };
            if matches!(reply, Reply::Error(_)) {
                if !self.bad(&reply) {
                    return;
                }
            } else {
                self.errors = 0;
                self.send(&reply);
                if self.broken {
                    return;
                }
            }
        }
    }

    /// Logs an operator's action, with who asked (the socket's
    /// credentials) and how it ended.
    fn audit(&self, action: std::fmt::Arguments<'_>, reply: &Reply) {
        let (uid, pid) = (self.peer_uid, self.peer_pid);
        match reply {
            Reply::Error(e) => warn!("audit: uid={uid} pid={pid} {action}: refused: {}", e.text),
            _ => info!("audit: uid={uid} pid={pid} {action}: accepted"),
        }
    }

    /// METRICS: every part of the text but the last is sent here; the
    /// last is the reply.
    fn metrics(&mut self) -> Reply {
        let text = crate::metrics::render(&self.broker.metrics());
        let mut parts = crate::metrics::chunks(&text, holdfast_proto::METRICS_CHUNK).peekable();
        while let Some(part) = parts.next() {
            let more = parts.peek().is_some();
            let reply = Reply::MetricsText {
                text: part.to_owned(),
                more,
            };
            if !more {
                return reply;
            }
            self.send(&reply);
            if self.broken {
                break;
            }
        }
        Reply::MetricsText {
            text: String::new(),
            more: false,
        }
    }

    /// STATUS: every batch of exports but the last is sent here; the last
    /// is the reply.
    fn status(&mut self) -> Reply {
        let all = self.broker.status();
        let mut batches = all.chunks(holdfast_proto::STATUS_BATCH).peekable();
        while let Some(batch) = batches.next() {
            let reply = Reply::Status {
                exports: batch.to_vec(),
                more: batches.peek().is_some(),
            };
            if batches.peek().is_none() {
                return reply;
            }
            self.send(&reply);
            if self.broken {
                break;
            }
        }
        Reply::Status {
            exports: Vec::new(),
            more: false,
        }
    }

    /// Requests any session may send.
    fn common(&self, req: Request) -> Reply {
        match req {
            Request::OperatorRestore {
                export,
                fail_pending,
            } => {
                let reply = match self
                    .broker
                    .find(&export)
                    .and_then(|e| e.operator_restore(fail_pending))
                {
                    Ok((replayed, failed)) => Reply::OperatorRestored { replayed, failed },
                    Err(err) => Reply::Error(err),
                };
                let action =
                    format_args!("action=restore export={export} fail_pending={fail_pending}");
                self.audit(action, &reply);
                reply
            }
            Request::ExportAdd(a) => {
                let reply = match self.broker.add_export(&a) {
                    Ok((status, kept)) => Reply::ExportAdded {
                        status: Box::new(status),
                        kept,
                    },
                    Err(err) => Reply::Error(err),
                };
                let action =
                    format_args!("action=export-add export={} daemon={:?}", a.name, a.daemon);
                self.audit(action, &reply);
                reply
            }
            Request::ExportRemove { name, force } => {
                let reply = match self.broker.remove_export(&name, force) {
                    Ok(kept) => Reply::ExportRemoved { kept },
                    Err(err) => Reply::Error(err),
                };
                let action = format_args!("action=export-rm export={name} force={force}");
                self.audit(action, &reply);
                reply
            }
            Request::Hello(_) => Reply::error(ErrorCode::BadState, "HELLO was already sent"),
            Request::Attach(_) | Request::Prepare { .. } => {
                Reply::error(ErrorCode::BadState, "this connection is attached already")
            }
            other => Reply::error(
                ErrorCode::BadState,
                format!("{} is not valid here", other.name()),
            ),
        }
    }

    /// HANDOFF from an operator: arms it, says so, and answers with the
    /// report when it ends.
    fn operator_handoff(&mut self, req: HandoffRequest) -> Reply {
        let export = match self.broker.find(&req.export) {
            Ok(e) => e.clone(),
            Err(e) => return Reply::Error(e),
        };
        let started = self.broker.start_handoff(&export, &req);
        let reply = started
            .as_ref()
            .map_or_else(|e| Reply::Error(e.clone()), |(_, a)| a.clone());
        let action = format_args!(
            "action=handoff export={} dry_run={} spawn={} cmd={:?}",
            req.export, req.dry_run, req.spawn, req.cmd
        );
        self.audit(action, &reply);
        let id = match started {
            Ok((id, armed)) => {
                self.send(&armed);
                id
            }
            Err(e) => return Reply::Error(e),
        };
        let sock = self.sock.as_fd();
        match export.wait_handoff(id, || seqpacket::hung_up(sock)) {
            Some(report) => Reply::HandoffDone(report),
            None => Reply::error(ErrorCode::Internal, "the handoff ended without a report"),
        }
    }

    /// ATTACH or PREPARE; on success runs the daemon session until it ends.
    fn attach(&mut self, name: &str, join: Join) -> Result<(), Reply> {
        let export = self.broker.find(name).map_err(Reply::Error)?;
        let pidfd = Pidfd::of_peer(self.sock.as_fd(), self.peer_pid).map_err(|e| {
            Reply::error(
                ErrorCode::Internal,
                format!(
                    "cannot open a pidfd for pid {}, so it could not be fenced: {e}",
                    self.peer_pid
                ),
            )
        })?;
        let pidfd = Arc::new(pidfd);
        let granted = match join {
            Join::Attach { takeover, direct } => {
                export.attach(pidfd.clone(), takeover, direct, self.broker.fence_timeout)
            }
            Join::Successor { direct } => export.prepare(pidfd.clone(), direct),
        };
        let mut grant = granted.map_err(Reply::Error)?;
        if export.kind == holdfast_proto::ExportKind::Volume {
            // This thread reaps the daemon's completions: a volume's
            // writeback waits on it.
            sys::set_io_flusher();
        }
        // The new epoch is on record before the daemon hears of it.
        self.broker.persist();
        // The daemon's pipe ends are sent, then closed here: the broker
        // never holds them.
        if let Some((submit, complete)) = grant.daemon_kicks.take() {
            let mut fds = vec![
                grant.rings_fd.as_fd(),
                export.data_fd().as_fd(),
                submit.as_fd(),
                complete.as_fd(),
            ];
            debug_assert_eq!(fds.len(), attach_fds::COUNT);
            // Direct mode: the lent FUSE descriptors follow.
            fds.extend(grant.lent.iter().map(AsFd::as_fd));
            let reply = Reply::Attached(grant.reply).encode();
            if let Err(e) = seqpacket::send(self.sock.as_fd(), &reply, &fds) {
                warn!("{}: cannot send ATTACHED: {e}", export.name);
            }
        }
        let end = self.session(&export, &grant, &pidfd);
        match end {
            End::Detached => export.end_session(grant.epoch, false),
            End::Lost(why) => {
                export.declare_lost(grant.epoch, &why);
                self.fence(&export, &pidfd);
                export.end_session(grant.epoch, true);
            }
        }
        Ok(())
    }

    /// Waits until the lost daemon is gone, however long that takes: a
    /// request is never replayed while the daemon that held it could act.
    fn fence(&self, export: &Export, pidfd: &Pidfd) {
        loop {
            match pidfd.fence(self.broker.fence_timeout) {
                Ok(()) => return,
                Err(e) => warn!("{}: fencing: {e}; still waiting", export.name),
            }
        }
    }

    fn session(&mut self, export: &Arc<Export>, g: &Grant, pidfd: &Pidfd) -> End {
        let epoch = g.epoch;
        let mut head = 0u32;
        let mut detaching = false;
        // Released (its export removed) at this deadline: the daemon
        // finishes what it holds first, or is fenced before any of it
        // fails. Failed unfenced, a write it still runs would land after
        // the kernel reused the request's buffer (ublk pins them): the
        // next request's bytes at this one's offset.
        let mut releasing = None;
        // A direct-mode daemon reads the kernel's queue itself: released,
        // it is told at once (it stops reading and answers what it holds)
        // and is done when it closes the connection, not when it holds
        // nothing for a moment (it could read the next request).
        let direct = g.reply.direct.is_some();
        loop {
            // Ask to be woken, then look once more before sleeping, so a
            // completion published in between is not missed.
            g.rings.set_completion_wakeup(true);
            if let Err(v) = export.reap(epoch, &g.rings, &mut head) {
                return End::Lost(format!("protocol violation: {v}"));
            }
            let waits = [
                self.sock.as_fd(),
                g.complete_kick.as_fd(),
                g.link.wake_fd(),
                pidfd.as_fd(),
            ];
            let ready = sys::poll_readable(&waits, SESSION_TICK).unwrap_or_default();
            g.rings.set_completion_wakeup(false);
            let is = |i: usize| ready.get(i).copied().unwrap_or(false);
            // Told it is released, a direct-mode daemon stops reading and
            // closes its side (its socket, pipes and process end together):
            // done, if none of its readers was left holding a request.
            let told = direct && releasing.is_some();
            let released = || told && export.drained(epoch);
            if is(1) && !sys::drain(g.complete_kick.as_fd()) {
                if released() {
                    return End::Detached;
                }
                // Polling a pipe with no writer would spin.
                return End::Lost("the daemon closed its completion kick pipe".into());
            }
            if is(2) {
                sys::drain(g.link.wake_fd());
                for notice in g.link.take() {
                    let reply = match notice {
                        Notice::Quiesce => Reply::Quiesce,
                        Notice::Activate => Reply::Activate,
                        Notice::Revive => Reply::Revive,
                        Notice::Release => {
                            if releasing.is_none() && direct {
                                self.send(&Reply::Detached);
                            }
                            releasing.get_or_insert_with(|| sys::deadline(RELEASE_DRAIN));
                            continue;
                        }
                    };
                    self.send(&reply);
                }
            }
            if let Err(v) = export.reap(epoch, &g.rings, &mut head) {
                return End::Lost(format!("protocol violation: {v}"));
            }
            if export.fence_requested(epoch) {
                return End::Lost("fence requested".into());
            }
            if is(3) {
                if released() {
                    return End::Detached;
                }
                return End::Lost("daemon process exited".into());
            }
            if is(0) {
                match self.recv(RecvFlags::DONTWAIT) {
                    Incoming::Nothing => {}
                    Incoming::Eof => {
                        if (detaching || releasing.is_some()) && export.drained(epoch) {
                            return End::Detached;
                        }
                        return End::Lost("control connection closed".into());
                    }
                    Incoming::Bad(reply) => {
                        if !self.bad(&reply) {
                            return End::Lost("too many malformed messages".into());
                        }
                    }
                    Incoming::Request(Request::Quiesced, _) => {
                        // Completions published before QUIESCED count.
                        if let Err(v) = export.reap(epoch, &g.rings, &mut head) {
                            return End::Lost(format!("protocol violation: {v}"));
                        }
                        match export.quiesced(epoch) {
                            Ok(()) => {}
                            Err(QuiescedError::Refused(e)) => self.send(&Reply::Error(e)),
                            Err(QuiescedError::Violation(why)) => {
                                return End::Lost(format!("protocol violation: {why}"));
                            }
                        }
                    }
                    Incoming::Request(req, fds) => {
                        match self.session_request(export, epoch, req, fds, &mut detaching) {
                            Ok(Some(reply)) => self.send(&reply),
                            Ok(None) => {}
                            Err(why) => return End::Lost(format!("protocol violation: {why}")),
                        }
                    }
                }
            }
            if self.broken {
                return End::Lost("cannot send to the daemon (not reading its socket?)".into());
            }
            if (detaching || (releasing.is_some() && !direct)) && export.drained(epoch) {
                self.send(&Reply::Detached);
                return End::Detached;
            }
            if releasing.is_some_and(|end| Instant::now() >= end) {
                return End::Lost(format!(
                    "released with requests it did not finish within {RELEASE_DRAIN:?}"
                ));
            }
        }
    }

    /// One request from a daemon; `Err` ends the session as lost.
    fn session_request(
        &mut self,
        export: &Arc<Export>,
        epoch: u64,
        req: Request,
        mut fds: Vec<OwnedFd>,
        detaching: &mut bool,
    ) -> Result<Option<Reply>, String> {
        let result = match req {
            Request::Restore => export.restore(epoch).map(|replayed| {
                self.broker.note_restored(self.peer_pid, &export.name);
                Reply::Restored { replayed }
            }),
            Request::Detach => match export.begin_detach(epoch) {
                Ok(()) => {
                    *detaching = true;
                    info!("{}: epoch {epoch} detaching", export.name);
                    return Ok(None);
                }
                Err(e) => Err(e),
            },
            Request::Ready => match export.ready(epoch) {
                Ok(()) => return Ok(None),
                Err(e) => Err(e),
            },
            // A supervised daemon asking for its own upgrade (SIGHUP): no
            // waiting here, this thread serves the daemon.
            Request::Handoff(h) => self
                .broker
                .find(&h.export)
                .and_then(|e| self.broker.start_handoff(&e, &h))
                .map(|(_, armed)| armed),
            Request::FdPut { name } => {
                if fds.len() != 1 {
                    Ok(Reply::error(
                        ErrorCode::Malformed,
                        format!("FD_PUT carries exactly one descriptor, got {}", fds.len()),
                    ))
                } else {
                    let fd = fds.remove(0);
                    let stored = export.fd_put(epoch, &name, fd, self.broker.next_id());
                    stored.map(|()| {
                        self.broker.persist();
                        Reply::FdStored
                    })
                }
            }
            Request::FdGet { name } => match export.fd_get(epoch, &name) {
                Ok(fd) => {
                    self.send_with(&Reply::Fd, &[fd.as_fd()]);
                    return Ok(None);
                }
                Err(e) => Err(e),
            },
            Request::Report(figures) => {
                export.report(epoch, figures);
                return Ok(None);
            }
            Request::Status => Ok(self.status()),
            other => Ok(self.common(other)),
        };
        Ok(Some(result.unwrap_or_else(Reply::Error)))
    }
}
