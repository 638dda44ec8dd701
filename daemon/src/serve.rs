//! The I/O loop: the main thread consumes the submission ring and watches
//! the control socket (and the handoff notices on it) and signals; worker
//! threads run requests against the backend and publish completions. On a
//! quick backend a request that arrives alone runs in the loop itself, and
//! with `--poll-us` the loop then polls for the next one before sleeping
//! (BENCHMARKS.md has what each saves).

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use holdfast_proto::shm::{Completion, Op, Submission};
use holdfast_proto::{DirectTerms, HandoffRequest, Reply, Request, caps};
use parking_lot::Mutex;
use rustix::event::{EventfdFlags, PollFd, PollFlags, Timespec};

use crate::backends::{Ask, Backend};
use crate::client::Connection;
use crate::direct::{Direct, Meter};
use crate::fault::{self, Point};
use crate::rings::Attachment;
use crate::{Error, Options, log, ublk};

/// How long the main loop sleeps between checks when idle.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How often the backend's figures go to the broker.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Sends the backend's figures to the broker (REPORT) every
/// [`REPORT_EVERY`], if the broker takes them and the backend has any.
struct Reporter {
    backend: Arc<dyn Backend>,
    next: Option<Instant>,
}

impl Reporter {
    fn new(conn: &Connection, backend: &Arc<dyn Backend>) -> Self {
        let takes = conn.broker_has(caps::REPORT);
        Self {
            backend: backend.clone(),
            next: takes.then(Instant::now),
        }
    }

    /// A send that fails is left to the serve loop, which sees the broker
    /// gone on its socket.
    fn tick(&mut self, conn: &Connection) {
        let Some(next) = self.next else {
            return;
        };
        let now = Instant::now();
        if now < next {
            return;
        }
        self.next = Some(now + REPORT_EVERY);
        let figures = self.backend.figures();
        if !figures.is_empty() {
            let _ = conn.send(&Request::Report(figures));
        }
    }
}

/// The signals a daemon acts on: SIGTERM and SIGINT detach and exit;
/// SIGHUP asks the broker for a handoff to a fresh copy of this daemon
/// (when the broker supervises it).
pub struct Signals {
    fd: OwnedFd,
}

/// What a signal asks for.
enum Signal {
    Stop,
    Upgrade,
}

impl Signals {
    const HANDLED: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

    /// Blocks the signals in this thread (and the threads it starts later)
    /// and opens a signalfd for them. Call before starting threads.
    pub fn new() -> Result<Self, Error> {
        // SAFETY: plain libc calls on a local sigset; signalfd returns a new fd.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut set);
            for s in Self::HANDLED {
                libc::sigaddset(&raw mut set, s);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
            if rc != 0 {
                return Err(Error::io(
                    "pthread_sigmask",
                    std::io::Error::from_raw_os_error(rc),
                ));
            }
            let fd = libc::signalfd(-1, &raw const set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(Error::io("signalfd", std::io::Error::last_os_error()));
            }
            Ok(Self {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// Whether SIGTERM or SIGINT came since the last look (others are
    /// dropped): for waits outside the I/O loop.
    pub fn stop_requested(&self) -> bool {
        self.take().iter().any(|s| matches!(s, Signal::Stop))
    }

    /// Waits up to `d` for a signal; true if one asked to stop.
    pub fn wait_stop(&self, d: Duration) -> bool {
        let ready = poll(&[self.fd.as_fd()], Some(d));
        ready.first().copied().unwrap_or(false) && self.stop_requested()
    }

    /// The signals received since the last call.
    fn take(&self) -> Vec<Signal> {
        // One struct signalfd_siginfo (linux/signalfd.h) per signal; the
        // signal number is its first u32.
        let mut buf = [0u8; 128];
        let mut out = Vec::new();
        while let Ok(128) = rustix::io::read(&self.fd, &mut buf) {
            let signo = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
            out.push(if signo == libc::SIGHUP as u32 {
                Signal::Upgrade
            } else {
                Signal::Stop
            });
        }
        out
    }
}

fn poll(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> Vec<bool> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::from_borrowed_fd(*fd, PollFlags::IN))
        .collect();
    let timeout = timeout.map(|t| Timespec {
        tv_sec: t.as_secs() as i64,
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    let _ = rustix::event::poll(&mut pfds, timeout.as_ref());
    pfds.iter()
        .map(|f| {
            f.revents()
                .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
        })
        .collect()
}

/// A successor that sent READY waits here for ACTIVATE (true), or to be
/// released (a dry run) or stopped by a signal (false).
pub fn await_activate(conn: &mut Connection, signals: &Signals) -> Result<bool, Error> {
    loop {
        let ready = poll(&[conn.socket(), signals.fd.as_fd()], None);
        if ready[1] && signals.stop_requested() {
            log("signal received before activation: leaving (the handoff is aborted)");
            return Ok(false);
        }
        if ready[0] {
            match conn.recv()? {
                (Reply::Activate, _) => {
                    log("activated: taking the lease");
                    return Ok(true);
                }
                (Reply::Detached, _) => {
                    log("released by the broker (dry run): exiting");
                    return Ok(false);
                }
                (Reply::Error(e), _) => return Err(Error::Broker(e)),
                (other, _) => log(&format!("unexpected message from the broker: {other:?}")),
            }
        }
    }
}

/// Where this daemon is in a handoff that replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    /// Got QUIESCE: finishing what it has.
    Quiescing,
    /// Sent QUIESCED without its lease; waiting to be released or revived.
    Quiesced,
}

/// Runs requests and publishes their completions; shared by the worker
/// threads and the I/O loop.
struct Executor {
    att: Arc<Attachment>,
    backend: Arc<dyn Backend>,
    completion_tail: Mutex<u32>,
    /// Requests taken from the ring and not completed; the last one to
    /// complete while quiescing wakes the main loop through `drained`.
    outstanding: AtomicUsize,
    quiescing: AtomicBool,
    drained: OwnedFd,
    /// `--read-delay-ms`: a test's way to have reads in flight.
    read_delay: Duration,
}

impl Executor {
    /// Runs one request against the backend and publishes its completion.
    fn run(&self, s: &Submission) {
        let result = match self.att.check(s) {
            None => -libc::EINVAL,
            Some((op, buf)) => {
                // SAFETY: the broker hands a slot's buffer to exactly one
                // request at a time and does not touch it until completion.
                let buf = buf.map(|(ptr, len)| unsafe { std::slice::from_raw_parts_mut(ptr, len) });
                if op == Op::Read && !self.read_delay.is_zero() {
                    std::thread::sleep(self.read_delay);
                }
                let ask = Ask {
                    op,
                    object: s.object,
                    offset: s.offset,
                    len: s.len,
                };
                match crate::backends::run(self.backend.as_ref(), ask, buf) {
                    Ok(n) => i32::try_from(n).unwrap_or(-libc::EIO),
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                }
            }
        };
        let c = Completion {
            seq: s.seq,
            epoch: s.epoch,
            slot: s.slot,
            result,
        };
        {
            let mut tail = self.completion_tail.lock();
            self.att.put_completion(*tail, &c);
            *tail = tail.wrapping_add(1);
            self.att.publish_completions(*tail);
        }
        if self.outstanding.fetch_sub(1, Ordering::SeqCst) == 1
            && self.quiescing.load(Ordering::SeqCst)
        {
            let _ = rustix::io::write(&self.drained, &1u64.to_ne_bytes());
        }
    }
}

/// Watches the submission ring for up to `bound`; returns whether a
/// submission arrived.
fn poll_ring(att: &Attachment, head: u32, bound: Duration) -> bool {
    let end = std::time::Instant::now() + bound;
    while att.submission_tail() == head {
        if std::time::Instant::now() >= end {
            return false;
        }
        std::hint::spin_loop();
    }
    true
}

/// How serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The broker confirmed a DETACH (after SIGTERM or SIGINT), or removed
    /// the export.
    Detached,
    /// Released after a handoff to a successor.
    HandedOff,
    /// The broker went away (crashed, or is being upgraded). Every request
    /// this daemon was given has completed; the kernel re-sends to the next
    /// broker what the old one did not answer.
    BrokerGone {
        /// The lease was given up for a handoff that did not finish.
        lease_released: bool,
    },
}

/// Serves requests until the broker confirms a DETACH, releases this
/// daemon after a handoff, or goes away. Returns once every request taken
/// from the ring has completed (the workers are joined), so that nothing
/// of this attachment runs when the daemon attaches again.
pub fn serve(
    conn: &mut Connection,
    att: Attachment,
    backend: Arc<dyn Backend>,
    opts: &Options,
    signals: &Signals,
) -> Result<Served, Error> {
    let att = Arc::new(att);
    let entries = att.geometry.slot_count;
    let (tx, rx) = crossbeam_channel::bounded::<Submission>(entries as usize);
    let quick = backend.quick();
    let exec = Arc::new(Executor {
        att: att.clone(),
        backend: backend.clone(),
        completion_tail: Mutex::new(0),
        outstanding: AtomicUsize::new(0),
        quiescing: AtomicBool::new(false),
        drained: rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)
            .map_err(|e| Error::io("eventfd", e.into()))?,
        read_delay: opts.read_delay,
    });
    let mut threads = Vec::new();
    for i in 0..opts.workers.max(1) {
        let (rx, exec) = (rx.clone(), exec.clone());
        let t = std::thread::Builder::new()
            .name(format!("holdfast-io{i}"))
            .spawn(move || {
                for s in rx {
                    exec.run(&s);
                }
            })
            .map_err(|e| Error::io("cannot start a worker thread", e))?;
        threads.push(t);
    }
    drop(rx);

    let mut head = 0u32;
    let mut detaching = false;
    let mut phase = Phase::Serving;
    let mut reporter = Reporter::new(conn, &backend);
    let outcome = loop {
        reporter.tick(conn);
        let tail = att.submission_tail();
        if tail.wrapping_sub(head) > entries {
            break Err(Error::Protocol(format!(
                "submission tail {tail} is more than {entries} past head {head}"
            )));
        }
        // A lone request on a quick backend runs here: no worker to wake.
        let alone = tail.wrapping_sub(head) == 1 && exec.outstanding.load(Ordering::SeqCst) == 0;
        while head != tail {
            let s = att.submission(head);
            head = head.wrapping_add(1);
            exec.outstanding.fetch_add(1, Ordering::SeqCst);
            // A blob's OPEN and CLOSE run here, in ring order: a read that
            // follows an OPEN (replays after a restore do) must find it.
            let ordered = matches!(Op::from_u8(s.op), Some(Op::Open | Op::Close));
            if (quick && alone) || ordered {
                att.set_submission_head(head);
                exec.run(&s);
            } else if tx.send(s).is_err() {
                break;
            }
        }
        att.set_submission_head(head);
        if phase == Phase::Quiescing && exec.outstanding.load(Ordering::SeqCst) == 0 {
            // Everything the broker gave this daemon has completed: give
            // the backend up.
            if let Err(e) = backend.release_lease() {
                break Err(e);
            }
            phase = Phase::Quiesced;
            if conn.send(&Request::Quiesced).is_err() {
                break Ok(gone(phase, detaching));
            }
            log("quiesced: every request completed, lease released");
        }
        // At low queue depth, poll for the next request before sleeping:
        // a sleeping thread's wake-up costs more than most local requests.
        if alone && !opts.poll.is_zero() && poll_ring(&att, head, opts.poll) {
            continue;
        }
        // Ask to be woken, then look again before sleeping.
        att.set_submission_wakeup(true);
        if att.submission_tail() != head {
            att.set_submission_wakeup(false);
            continue;
        }
        let ready = poll(
            &[
                att.submit_kick(),
                conn.socket(),
                signals.fd.as_fd(),
                exec.drained.as_fd(),
            ],
            Some(IDLE_POLL),
        );
        att.set_submission_wakeup(false);
        if ready[0] {
            // Empty the kick pipe (non-blocking); the ring itself says what to do.
            let mut b = [0u8; 512];
            while let Ok(1..) = rustix::io::read(att.submit_kick(), &mut b) {}
        }
        if ready[3] {
            let mut b = [0u8; 8];
            let _ = rustix::io::read(&exec.drained, &mut b);
        }
        if ready[2] {
            let mut failed = None;
            for sig in signals.take() {
                let sent = match sig {
                    Signal::Stop if !detaching => {
                        log("signal received: detaching (finishing requests in flight)");
                        detaching = true;
                        conn.send(&Request::Detach)
                    }
                    Signal::Stop => Ok(()),
                    Signal::Upgrade => {
                        log("SIGHUP: asking the broker to hand this export off to a fresh daemon");
                        conn.send(&upgrade_request(opts))
                    }
                };
                if let Err(e) = sent {
                    failed = Some(e);
                    break;
                }
            }
            if failed.is_some() {
                break Ok(gone(phase, detaching));
            }
        }
        if ready[1] {
            let msg = match conn.recv() {
                Ok((msg, _)) => msg,
                Err(Error::Protocol(e)) => break Err(Error::Protocol(e)),
                // Closed or reset: the broker is gone.
                Err(_) => break Ok(gone(phase, detaching)),
            };
            match msg {
                Reply::Detached => {
                    if phase == Phase::Quiesced {
                        log("handed off to the successor; exiting");
                    } else if !detaching {
                        log("detached by the broker (the export was removed)");
                    }
                    break Ok(if phase == Phase::Quiesced {
                        Served::HandedOff
                    } else {
                        Served::Detached
                    });
                }
                Reply::Quiesce => {
                    fault::inject(Point::PredecessorDuringQuiesce);
                    log("QUIESCE: a successor is taking over; finishing requests in flight");
                    exec.quiescing.store(true, Ordering::SeqCst);
                    phase = Phase::Quiescing;
                }
                Reply::Revive => {
                    exec.quiescing.store(false, Ordering::SeqCst);
                    if phase == Phase::Quiesced
                        && let Err(e) = backend.acquire_lease(opts.lease_timeout)
                    {
                        break Err(e);
                    }
                    phase = Phase::Serving;
                    log("REVIVE: the successor failed; serving again");
                    if conn.send(&Request::Restore).is_err() {
                        break Ok(gone(phase, detaching));
                    }
                }
                Reply::Restored { replayed } => {
                    log(&format!("restored; {replayed} requests replayed"));
                }
                Reply::HandoffArmed { .. } => {
                    log("the broker is starting a successor");
                }
                Reply::Error(e) => log(&format!("broker: {e}")),
                other => log(&format!("unexpected message from the broker: {other:?}")),
            }
        }
    };
    drop(tx);
    for t in threads {
        let _ = t.join();
    }
    outcome
}

/// Serves an attachment in the mode the broker gave it. `queue`: a ublk
/// queue this daemon serves in direct mode, kept while the broker is away
/// (the device is served on meanwhile).
pub fn serve_attachment(
    conn: &mut Connection,
    mut att: Attachment,
    backend: Arc<dyn Backend>,
    opts: &Options,
    signals: &Signals,
    queue: &mut Option<ublk::Running>,
) -> Result<Served, Error> {
    let size = att.geometry.size;
    match att.geometry.direct {
        Some(DirectTerms::Fuse(terms)) => {
            let lent = att.take_lent();
            serve_direct(conn, terms, Arc::new(att), lent, backend, opts, signals)
        }
        Some(DirectTerms::Ublk(terms)) => {
            let geo = ublk::Geometry {
                dev_id: terms.dev_id,
                depth: terms.depth,
                buf_size: terms.buf_size,
                size,
            };
            // Its progress, where the broker reads it.
            let meter = Meter::shared(&Arc::new(att), 0).unwrap_or_else(Meter::private);
            serve_ublk(conn, geo, backend, opts, signals, queue, meter)
        }
        None => serve(conn, att, backend, opts, signals),
    }
}

/// Direct mode on a ublk export: serves the device's queue on a thread of
/// its own and watches the control socket and the signals. The queue stops
/// (answering what the workers run; the kernel re-issues the rest to the
/// next server) on a signal, QUIESCE or the export's removal, and goes on
/// while the broker is away. After a QUIESCE it opens again on REVIVE,
/// once RESTORED says the broker has begun the device's recovery.
fn serve_ublk(
    conn: &mut Connection,
    geo: ublk::Geometry,
    backend: Arc<dyn Backend>,
    opts: &Options,
    signals: &Signals,
    queue: &mut Option<ublk::Running>,
    meter: Meter,
) -> Result<Served, Error> {
    if queue.as_ref().is_some_and(|q| q.geometry() != geo) {
        log("the broker serves another ublk device now: stopping the old queue");
        stop_queue(queue);
    }
    if let Some(q) = queue.as_ref() {
        q.publish_to(meter.clone());
    }
    let start = |queue: &mut Option<ublk::Running>| -> Result<(), Error> {
        if queue.is_none() {
            let q = ublk::Running::start(geo, backend.clone(), opts.workers, meter.clone())
                .map_err(|e| Error::io("cannot serve the ublk queue", e))?;
            log(&format!(
                "direct mode: serving /dev/ublkc{} ({} tags of {} bytes)",
                geo.dev_id, geo.depth, geo.buf_size
            ));
            *queue = Some(q);
        }
        Ok(())
    };
    start(queue)?;
    let mut phase = Phase::Serving;
    let mut reporter = Reporter::new(conn, &backend);
    loop {
        reporter.tick(conn);
        let ready = poll(&[conn.socket(), signals.fd.as_fd()], Some(IDLE_POLL));
        if queue.as_ref().is_some_and(ublk::Running::finished) {
            log("the ublk device took its tags back (stopped, deleted, or quiesced for a handoff)");
            stop_queue(queue);
        }
        if ready[1] {
            for sig in signals.take() {
                match sig {
                    Signal::Stop if phase == Phase::Serving => {
                        log("signal received: detaching (answering what the queue runs)");
                        stop_queue(queue);
                        return detach(conn);
                    }
                    Signal::Stop => log("signal received while handed off: leaving once released"),
                    Signal::Upgrade => {
                        log("SIGHUP: asking the broker to hand this export off to a fresh daemon");
                        let _ = conn.send(&upgrade_request(opts));
                    }
                }
            }
        }
        if !ready[0] {
            continue;
        }
        let msg = match conn.recv() {
            Ok((msg, _)) => msg,
            Err(Error::Protocol(e)) => {
                stop_queue(queue);
                return Err(Error::Protocol(e));
            }
            Err(_) => return Ok(gone(phase, false)),
        };
        match msg {
            Reply::Detached if phase == Phase::Quiesced => {
                log("handed off to the successor; exiting");
                return Ok(Served::HandedOff);
            }
            Reply::Detached => {
                stop_queue(queue);
                log("detached by the broker (the export was removed)");
                return Ok(Served::Detached);
            }
            Reply::Quiesce => {
                fault::inject(Point::PredecessorDuringQuiesce);
                log("QUIESCE: a successor is taking over; answering what the queue runs");
                stop_queue(queue);
                backend.release_lease()?;
                phase = Phase::Quiesced;
                if conn.send(&Request::Quiesced).is_err() {
                    return Ok(gone(phase, false));
                }
                log("quiesced: the queue is closed, lease released");
            }
            Reply::Revive => {
                if phase == Phase::Quiesced {
                    backend.acquire_lease(opts.lease_timeout)?;
                }
                phase = Phase::Serving;
                log("REVIVE: the successor failed; serving again");
                if conn.send(&Request::Restore).is_err() {
                    return Ok(gone(phase, false));
                }
            }
            Reply::Restored { replayed } => {
                log(&format!("restored; {replayed} requests replayed"));
                if phase == Phase::Serving {
                    start(queue)?;
                }
            }
            Reply::HandoffArmed { .. } => log("the broker is starting a successor"),
            Reply::Error(e) => log(&format!("broker: {e}")),
            other => log(&format!("unexpected message from the broker: {other:?}")),
        }
    }
}

/// Stops a ublk queue, if it runs, and says what it did.
fn stop_queue(queue: &mut Option<ublk::Running>) {
    let Some(q) = queue.take() else { return };
    match q.stop() {
        Ok(s) => log(&format!(
            "direct mode: the ublk queue stopped after {} answers ({} failed, {} left to the next server)",
            s.served, s.failed, s.left
        )),
        Err(e) => log(&format!("direct mode: the ublk queue stopped: {e}")),
    }
}

/// Direct mode: reads the export's FUSE connection on the descriptors the
/// broker lent, one reader each, and watches the control socket and the
/// signals. Whenever it stops reading (a signal, QUIESCE, the export's
/// removal, the broker gone), the readers stop first, each after answering
/// what it holds, so that nothing of this attachment runs on once the
/// broker acts; after a QUIESCE the same descriptors serve again on REVIVE.
fn serve_direct(
    conn: &mut Connection,
    terms: holdfast_proto::FuseTerms,
    att: Arc<Attachment>,
    lent: Vec<OwnedFd>,
    backend: Arc<dyn Backend>,
    opts: &Options,
    signals: &Signals,
) -> Result<Served, Error> {
    let size = att.geometry.size;
    let volume =
        holdfast_kernel::fuse::Volume::new(size, terms.max_io, terms.max_background, terms.started);
    // Each reader's progress where the broker reads it.
    let meters: Vec<_> = (0..lent.len())
        .map(|i| Meter::shared(&att, i).unwrap_or_else(Meter::private))
        .collect();
    let start = |devs: Vec<OwnedFd>| {
        let n = devs.len();
        let d = Direct::start(
            devs,
            volume,
            terms.max_io,
            backend.clone(),
            opts.read_delay,
            meters.clone(),
        )
        .map_err(|e| Error::io("cannot start the direct-mode readers", e))?;
        log(&format!(
            "direct mode: reading the FUSE connection on {n} descriptors (kernel protocol 7.{})",
            terms.minor
        ));
        Ok::<_, Error>(d)
    };
    let mut reading = Some(start(lent)?);
    // The descriptors while quiesced.
    let mut idle = Vec::new();
    let mut phase = Phase::Serving;
    let mut reporter = Reporter::new(conn, &backend);
    let outcome = loop {
        reporter.tick(conn);
        let ready = poll(&[conn.socket(), signals.fd.as_fd()], Some(IDLE_POLL));
        if ready[1] {
            for sig in signals.take() {
                match sig {
                    Signal::Stop if phase == Phase::Serving => {
                        log("signal received: detaching (answering what the readers hold)");
                        stop_reading(&mut reading);
                        return detach(conn);
                    }
                    Signal::Stop => log("signal received while handed off: leaving once released"),
                    Signal::Upgrade => {
                        log("SIGHUP: asking the broker to hand this export off to a fresh daemon");
                        // A broker gone is seen on the socket next.
                        let _ = conn.send(&upgrade_request(opts));
                    }
                }
            }
        }
        if !ready[0] {
            continue;
        }
        let msg = match conn.recv() {
            Ok((msg, _)) => msg,
            Err(Error::Protocol(e)) => break Err(Error::Protocol(e)),
            Err(_) => break Ok(gone(phase, false)),
        };
        match msg {
            Reply::Detached if phase == Phase::Quiesced => {
                log("handed off to the successor; exiting");
                break Ok(Served::HandedOff);
            }
            Reply::Detached => {
                // The broker takes the queue back once this connection
                // closes: the readers stop first.
                stop_reading(&mut reading);
                log("detached by the broker (the export was removed)");
                break Ok(Served::Detached);
            }
            Reply::Quiesce => {
                fault::inject(Point::PredecessorDuringQuiesce);
                log("QUIESCE: a successor is taking over; answering what the readers hold");
                idle = stop_reading(&mut reading);
                backend.release_lease()?;
                phase = Phase::Quiesced;
                if conn.send(&Request::Quiesced).is_err() {
                    break Ok(gone(phase, false));
                }
                log("quiesced: every request answered, lease released");
            }
            Reply::Revive => {
                if phase == Phase::Quiesced {
                    backend.acquire_lease(opts.lease_timeout)?;
                    reading = Some(start(std::mem::take(&mut idle))?);
                }
                phase = Phase::Serving;
                log("REVIVE: the successor failed; serving again");
                if conn.send(&Request::Restore).is_err() {
                    break Ok(gone(phase, false));
                }
            }
            Reply::Restored { replayed } => log(&format!("restored; {replayed} requests replayed")),
            Reply::HandoffArmed { .. } => log("the broker is starting a successor"),
            Reply::Error(e) => log(&format!("broker: {e}")),
            other => log(&format!("unexpected message from the broker: {other:?}")),
        }
    };
    stop_reading(&mut reading);
    outcome
}

/// Stops direct mode's readers, if they run; returns their descriptors.
fn stop_reading(reading: &mut Option<Direct>) -> Vec<OwnedFd> {
    let Some(direct) = reading.take() else {
        return Vec::new();
    };
    let meters = direct.meters();
    let devs = direct.stop();
    let t = crate::direct::total(&meters);
    log(&format!(
        "direct mode: stopped after {} answers ({} re-sent requests, {} late replies refused)",
        t.answered, t.resent, t.refused
    ));
    devs
}

/// SIGHUP's request: a handoff to a fresh copy of this daemon.
fn upgrade_request(opts: &Options) -> Request {
    Request::Handoff(HandoffRequest {
        export: opts.export.clone(),
        dry_run: false,
        spawn: true,
        ready_timeout_ms: 0,
        drain_timeout_ms: 0,
        cmd: String::new(),
    })
}

/// DETACH once nothing of this daemon's runs, and waits for DETACHED.
fn detach(conn: &mut Connection) -> Result<Served, Error> {
    if conn.send(&Request::Detach).is_err() {
        return Ok(Served::Detached);
    }
    loop {
        match conn.recv() {
            Ok((Reply::Detached, _)) | Err(_) => return Ok(Served::Detached),
            Ok((Reply::Error(e), _)) => return Err(Error::Broker(e)),
            Ok(_) => {}
        }
    }
}

/// The broker went away: a daemon that was detaching is done; any other
/// attaches again.
fn gone(phase: Phase, detaching: bool) -> Served {
    if detaching {
        return Served::Detached;
    }
    Served::BrokerGone {
        lease_released: phase == Phase::Quiesced,
    }
}
