//! An export: one volume the kernel sees (through a frontend) and one daemon
//! serves. It owns the data area, the in-flight table and the record of the
//! attached daemon, all under one lock that is never held across a syscall
//! that can block (replies to the kernel are written after it is released).
//! A planned handoff's state machine is in `handoff`; direct mode's
//! lending of the frontend's queue to a daemon in `direct`.

mod direct;
mod handoff;

pub use handoff::{HandoffParams, QuiescedError};

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_proto::shm::{DataLayout, FLAG_REPLAYED, Op, RingLayout};
use holdfast_proto::{
    Attached, DaemonState, DaemonStatus, DirectTerms, ErrorCode, ErrorReply, ExportKind,
    ExportStatus, Figures, HandoffReport, MAX_NAME_LEN, Mode,
};
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::frontends::{Lender, Origin, Outcome, Reopen, SlotData, Target};
use crate::inflight::{Data, Done, Failed, Inflight, Priority};
use crate::metrics;
use crate::shm::{RingViolation, Rings, SharedRegion};
use crate::sys::{self, pidfd::Pidfd};
use crate::{info, warn};
use holdfast_proto::shm::Ask;

/// Most descriptors one export's fd store holds.
pub const MAX_STORED_FDS: usize = 16;

/// Shape and limits of an export, fixed when it is created.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub name: String,
    pub kind: ExportKind,
    pub size: u64,
    pub block_size: u32,
    pub slot_count: u32,
    pub slot_size: u32,
    /// Most bytes of write data held in private memory while every slot is
    /// taken; past it, the frontend waits (back-pressure).
    pub heap_limit: usize,
    /// Daemons that can serve the kernel's queue themselves do
    /// ([`Mode::Direct`]), where the frontend can lend it.
    pub direct: bool,
}

#[derive(Default)]
struct Stats {
    replayed: u64,
    completed: u64,
    failed: u64,
    lost: u64,
    rejected: u64,
    handoffs: metrics::Handoffs,
    stall: metrics::Histogram,
    latency: metrics::Histogram,
}

/// What the broker tells a daemon unasked, through its session thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    Quiesce,
    Activate,
    Revive,
    /// DETACHED: the daemon is released (handed off, or a dry run's
    /// successor) and its session ends without a fence.
    Release,
}

/// The export's line to one session thread: a wake-up and the notices to
/// send.
pub struct Link {
    wake: OwnedFd,
    notices: Mutex<Vec<Notice>>,
}

impl Link {
    fn new() -> io::Result<Self> {
        Ok(Self {
            wake: sys::eventfd()?,
            notices: Mutex::new(Vec::new()),
        })
    }

    /// Readable when the session thread should look at its export.
    pub fn wake_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    fn kick(&self) {
        sys::kick(self.wake.as_fd());
    }

    fn notify(&self, n: Notice) {
        self.notices.lock().push(n);
        self.kick();
    }

    /// The notices to send, oldest first.
    pub fn take(&self) -> Vec<Notice> {
        std::mem::take(&mut *self.notices.lock())
    }
}

/// The broker's record of a daemon attached to an export.
struct Session {
    epoch: u64,
    pidfd: Arc<Pidfd>,
    state: DaemonState,
    rings: Arc<Rings>,
    sq_tail: u32,
    /// The broker's write end of the submission kick pipe.
    submit_kick: OwnedFd,
    link: Arc<Link>,
    /// Why it was declared lost, for the handoff report.
    lost_why: Option<String>,
    mode: Mode,
    /// In direct mode, the broker's references to the descriptors lent to
    /// the daemon: what the daemon read stays on their processing lists,
    /// for FUSE_NOTIFY_RESEND, however the daemon ends. Held, never read.
    _lent: Vec<OwnedFd>,
    /// Direct mode: how many progress records the daemon publishes.
    meters: usize,
    /// Direct mode: the daemon's answers when last seen to change, or the
    /// kernel to wait on nothing, and when (`direct_age`).
    watch: Option<(u64, Instant)>,
    /// The backend's figures as the daemon last reported them, and when.
    report: Option<(Instant, Figures)>,
}

impl Session {
    fn status(&self) -> DaemonStatus {
        DaemonStatus {
            pid: self.pidfd.pid(),
            epoch: self.epoch,
            state: self.state,
            mode: self.mode,
        }
    }
}

struct State {
    inflight: Inflight,
    /// The export's daemon: the one requests are dispatched to.
    session: Option<Session>,
    /// A handoff's successor, until it restores and becomes `session`.
    successor: Option<Session>,
    handoff: Option<handoff::Handoff>,
    /// The last handoff that ended, with its id.
    last_handoff: Option<(u64, HandoffReport)>,
    next_handoff: u64,
    last_epoch: u64,
    stats: Stats,
    /// Descriptors daemons deposited, by name, each with the number it is
    /// kept under for the broker's own restart.
    fdstore: BTreeMap<String, (u64, OwnedFd)>,
    /// Since when requests have been queued with no active daemon.
    waiting_since: Option<Instant>,
    /// Removed by the operator: nothing attaches, every request fails.
    removed: bool,
    /// A request that changes data (write, discard, ...) was ever submitted.
    modified: bool,
    /// What is known of the fd store's past, for a miss in it.
    fd_history: FdHistory,
    /// A direct-mode daemon serves the kernel's queue: from its RESTORE
    /// until its session ends, the frontend's own readers are parked.
    lending: bool,
}

/// Whether an fd-store name a daemon asks for and the store lacks was
/// never stored, or was lost with a previous broker (a `mem` daemon must
/// not start afresh on a device whose users hold its old contents).
#[derive(Debug, Clone, PartialEq, Eq)]
enum FdHistory {
    /// The store began with this broker: a miss was never stored.
    Own,
    /// Taken over with a record of the store: these names were not passed
    /// on.
    Recorded(BTreeSet<String>),
    /// The device was taken over with no record of the store (a ublk
    /// recovery after the broker died): any miss may be a loss.
    Unknown,
}

/// What a daemon gets for a successful ATTACH. The session thread keeps the
/// rest.
pub struct Grant {
    pub reply: Attached,
    pub epoch: u64,
    pub pid: u32,
    pub rings: Arc<Rings>,
    pub rings_fd: OwnedFd,
    /// The broker's read end of the completion kick pipe.
    pub complete_kick: OwnedFd,
    /// The daemon's ends of the kick pipes (submission read end,
    /// completion write end), to send with ATTACHED and then close, so that
    /// the broker never holds the daemon's ends.
    pub daemon_kicks: Option<(OwnedFd, OwnedFd)>,
    pub link: Arc<Link>,
    /// Direct mode: duplicates of the lent descriptors, to send with
    /// ATTACHED (after the [`attach_fds`](holdfast_proto::control::attach_fds)).
    pub lent: Vec<OwnedFd>,
}

/// Why a daemon's session must end with a fence.
#[derive(Debug)]
pub enum Violation {
    Ring(RingViolation),
    Completion(crate::inflight::Rejected),
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Ring(v) => v.fmt(f),
            Self::Completion(r) => r.fmt(f),
        }
    }
}

pub struct Export {
    pub name: String,
    pub kind: ExportKind,
    pub size: u64,
    pub block_size: u32,
    layout: DataLayout,
    heap_limit: usize,
    data_fd: OwnedFd,
    data: SharedRegion,
    state: Mutex<State>,
    changed: Condvar,
    /// A blob export's frontend: what a new daemon must be told first.
    reopen: Mutex<Option<std::sync::Weak<dyn Reopen>>>,
    /// Whether daemons that can get direct mode.
    direct: bool,
    /// The frontend that lends its queue to direct-mode daemons.
    lender: Mutex<Option<Arc<dyn Lender>>>,
    /// Taken around handing the queue to a direct-mode daemon and taking
    /// it back, so that the frontend's readers are parked and unparked in
    /// order. Taken before `state`.
    custody: Mutex<()>,
}

impl Export {
    pub fn new(cfg: &ExportConfig) -> io::Result<Self> {
        let layout = DataLayout::new(cfg.slot_count, cfg.slot_size).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "bad slot geometry {} x {} bytes",
                    cfg.slot_count, cfg.slot_size
                ),
            )
        })?;
        let data_fd = sys::sealed_memfd(&format!("holdfast-data-{}", cfg.name), layout.byte_len())?;
        let data = SharedRegion::map(&data_fd, layout.byte_len())?;
        Ok(Self {
            name: cfg.name.clone(),
            kind: cfg.kind,
            size: cfg.size,
            block_size: cfg.block_size,
            layout,
            heap_limit: cfg.heap_limit,
            data_fd,
            data,
            state: Mutex::new(State {
                inflight: Inflight::new(cfg.slot_count),
                session: None,
                successor: None,
                handoff: None,
                last_handoff: None,
                next_handoff: 0,
                last_epoch: 0,
                stats: Stats::default(),
                fdstore: BTreeMap::new(),
                waiting_since: None,
                removed: false,
                modified: false,
                fd_history: FdHistory::Own,
                lending: false,
            }),
            changed: Condvar::new(),
            reopen: Mutex::new(None),
            direct: cfg.direct,
            lender: Mutex::new(None),
            custody: Mutex::new(()),
        })
    }

    /// Names the frontend whose open blobs every new daemon is told about
    /// (as OPENs sent before anything else) when it starts serving.
    pub fn set_reopen(&self, frontend: std::sync::Weak<dyn Reopen>) {
        *self.reopen.lock() = Some(frontend);
    }

    fn lender(&self) -> Option<Arc<dyn Lender>> {
        self.lender.lock().clone()
    }

    /// Adds a request on a blob of a blob export.
    pub fn submit_blob(&self, ask: Ask, origin: Origin, data: Data) {
        let mut st = self.state.lock();
        if st.removed {
            drop(st);
            return origin
                .sink
                .complete(origin.tag, ask.op, Outcome::Failed(libc::EIO));
        }
        st.inflight.submit_ask(ask, Priority::Normal, origin, data);
        self.dispatch(&mut st);
        update_waiting(&mut st);
    }

    /// Queues the frontend's OPENs again, before every other request: the
    /// daemon that is about to get requests has not seen them. Those a lost
    /// daemon did not answer are dropped first: this set replaces them.
    fn resend_opens(&self, st: &mut State) {
        st.inflight.drop_queued_first();
        let frontend = self
            .reopen
            .lock()
            .as_ref()
            .and_then(std::sync::Weak::upgrade);
        for (ask, origin, data) in frontend.map(|f| f.reopens()).unwrap_or_default() {
            st.inflight.submit_ask(ask, Priority::First, origin, data);
        }
    }

    pub fn data_fd(&self) -> &OwnedFd {
        &self.data_fd
    }

    /// Pins slots `0..n` to the frontend for good (see `Inflight::pin`).
    pub fn pin_slots(&self, n: u32) -> bool {
        self.state.lock().inflight.pin(n)
    }
}

impl Target for Export {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn layout(&self) -> DataLayout {
        self.layout
    }

    fn data(&self) -> &SharedRegion {
        &self.data
    }

    /// Takes a free slot for a frontend to read a request into.
    fn take_slot(&self) -> Option<u32> {
        self.state.lock().inflight.take_slot()
    }

    /// Returns a slot taken with [`Target::take_slot`] and not used.
    fn release_slot(&self, slot: u32) {
        let mut st = self.state.lock();
        st.inflight.release(slot);
        // A queued request may have been waiting for a slot.
        self.dispatch(&mut st);
    }

    /// Adds a request from a frontend and dispatches it if a daemon is active.
    fn submit(&self, op: Op, offset: u64, len: u64, origin: Origin, data: Data) {
        let mut st = self.state.lock();
        if st.removed {
            if let Data::Slot(slot) = data {
                st.inflight.release(slot);
            }
            drop(st);
            return origin
                .sink
                .complete(origin.tag, op, Outcome::Failed(libc::EIO));
        }
        if op == Op::Flush && !st.modified {
            // Nothing was ever written through this export, so there is
            // nothing to make durable. This also answers the fsync the loop
            // driver sends when it attaches, before any daemon is there.
            drop(st);
            let done = Outcome::Done { len: 0, data: None };
            return origin.sink.complete(origin.tag, op, done);
        }
        st.modified |= op != Op::Read;
        st.inflight.submit(op, offset, len, origin, data);
        self.dispatch(&mut st);
        update_waiting(&mut st);
    }

    fn set_lender(&self, frontend: Arc<dyn Lender>) {
        *self.lender.lock() = Some(frontend);
    }

    /// Adds a write whose data is in private memory: copied into a free slot
    /// if there is one, else held in private memory (waiting for room under
    /// the heap limit first).
    fn submit_write(&self, offset: u64, origin: Origin, bytes: &[u8]) {
        // Held data must fit a slot when it is dispatched (see `dispatch`).
        if bytes.len() > self.layout.slot_size() as usize {
            origin
                .sink
                .complete(origin.tag, Op::Write, Outcome::Failed(libc::EINVAL));
            return;
        }
        let len = bytes.len() as u64;
        let mut st = self.state.lock();
        if st.removed {
            drop(st);
            return origin
                .sink
                .complete(origin.tag, Op::Write, Outcome::Failed(libc::EIO));
        }
        st.modified = true;
        let data = match st.inflight.take_slot() {
            Some(slot) => {
                let copied = self
                    .layout
                    .slot_offset(slot)
                    .and_then(|off| self.data.copy_in(off, bytes));
                if copied.is_none() {
                    // Cannot happen with a request length checked against
                    // the slot size; fail safe rather than lose the write.
                    st.inflight.release(slot);
                    drop(st);
                    origin
                        .sink
                        .complete(origin.tag, Op::Write, Outcome::Failed(libc::EIO));
                    return;
                }
                Data::Slot(slot)
            }
            None => {
                // A direct-mode daemon taking the queue over needs every
                // reader parked; what this one read is forgotten then, and
                // re-sent by the kernel.
                while !st.removed
                    && !st.lending
                    && st.inflight.heap_bytes() > 0
                    && st.inflight.heap_bytes().saturating_add(bytes.len()) > self.heap_limit
                {
                    self.changed.wait(&mut st);
                }
                if st.removed {
                    // Removed (`export rm --force`) while this writer
                    // waited: nothing would ever answer it.
                    drop(st);
                    return origin
                        .sink
                        .complete(origin.tag, Op::Write, Outcome::Failed(libc::EIO));
                }
                Data::Heap(bytes.into())
            }
        };
        st.inflight.submit(Op::Write, offset, len, origin, data);
        self.dispatch(&mut st);
        update_waiting(&mut st);
    }
}

impl Export {
    /// Writes every dispatchable queued request to the active daemon's ring.
    fn dispatch(&self, st: &mut State) {
        let Some(s) = st.session.as_mut() else {
            return;
        };
        if s.state != DaemonState::Active || s.mode == Mode::Direct {
            return;
        }
        let now = Instant::now();
        let start = s.sq_tail;
        let mut heap_freed = false;
        let (layout, data) = (self.layout, &self.data);
        let to_heap = |slot: u32, len: u64| {
            let off = layout.slot_offset(slot)?;
            data.copy_out(off, usize::try_from(len).ok()?)
                .map(Vec::into_boxed_slice)
        };
        while let Some(d) = st.inflight.next_dispatch(s.epoch, now, to_heap) {
            if let Some(h) = d.heap {
                heap_freed = true;
                // Cannot fail: the slot is the table's and held data is at
                // most a slot long (checked in `submit_write`, and stolen
                // slots are copied out whole).
                let _ = self
                    .layout
                    .slot_offset(d.entry.slot)
                    .and_then(|off| self.data.copy_in(off, &h));
            }
            if d.entry.flags & FLAG_REPLAYED != 0 {
                st.stats.replayed = st.stats.replayed.saturating_add(1);
            }
            s.rings.put_submission(s.sq_tail, &d.entry);
            s.sq_tail = s.sq_tail.wrapping_add(1);
        }
        if s.sq_tail != start && s.rings.publish_submissions(s.sq_tail) {
            sys::kick(s.submit_kick.as_fd());
        }
        if heap_freed {
            self.changed.notify_all();
        }
    }

    /// ATTACH: makes the caller the export's daemon. A busy export is
    /// refused unless `takeover`, or unless its daemon is already gone; then
    /// the current daemon is fenced first and its requests reclaimed. A
    /// daemon that can serve `direct` gets direct mode where the export
    /// allows it and its frontend can lend the queue now.
    pub fn attach(
        &self,
        pidfd: Arc<Pidfd>,
        takeover: bool,
        direct: bool,
        fence_timeout: Duration,
    ) -> Result<Grant, ErrorReply> {
        // Before any fencing: a daemon the export refuses fences nobody.
        let lent = self.lend(direct)?;
        let mut st = self.state.lock();
        self.check_available(&st)?;
        if let Some(cur) = st.session.as_mut() {
            let gone = cur.pidfd.is_gone();
            if !takeover && !gone {
                return Err(ErrorReply::new(
                    ErrorCode::Busy,
                    format!(
                        "export {} is served by daemon pid {} (epoch {}, {}); \
                         attach with takeover (holdfast-daemon --takeover) to fence it and replace it",
                        self.name,
                        cur.pidfd.pid(),
                        cur.epoch,
                        cur.state.name()
                    ),
                ));
            }
            if !gone {
                info!(
                    "{}: takeover by pid {}: fencing daemon pid {} (epoch {})",
                    self.name,
                    pidfd.pid(),
                    cur.pidfd.pid(),
                    cur.epoch
                );
            }
            request_fence(cur);
            let fenced = cur.epoch;
            let deadline = sys::deadline(fence_timeout);
            while let Some(s) = st.session.as_ref() {
                if s.epoch != fenced {
                    // Another daemon took over first.
                    return Err(ErrorReply::new(
                        ErrorCode::Busy,
                        format!(
                            "export {}: daemon pid {} attached first (epoch {})",
                            self.name,
                            s.pidfd.pid(),
                            s.epoch
                        ),
                    ));
                }
                if self.changed.wait_until(&mut st, deadline).timed_out() {
                    return Err(ErrorReply::new(
                        ErrorCode::FenceFailed,
                        format!(
                            "export {}: the previous daemon was not gone within {fence_timeout:?} of SIGKILL; try again",
                            self.name
                        ),
                    ));
                }
            }
        }
        let (session, grant) = self.new_session(&mut st, pidfd, DaemonState::Attached, lent)?;
        info!(
            "{}: daemon pid {} attached in {} mode, epoch {}, {} requests pending",
            self.name,
            grant.pid,
            session.mode.name(),
            grant.epoch,
            st.inflight.queued()
        );
        st.session = Some(session);
        Ok(grant)
    }

    /// Shared memory, kick pipes and a new epoch for a daemon.
    fn new_session(
        &self,
        st: &mut State,
        pidfd: Arc<Pidfd>,
        state: DaemonState,
        lent: Option<(DirectTerms, Vec<OwnedFd>)>,
    ) -> Result<(Session, Grant), ErrorReply> {
        let internal = |e: io::Error| {
            ErrorReply::new(
                ErrorCode::Internal,
                format!("export {}: cannot set up shared memory: {e}", self.name),
            )
        };
        let layout = RingLayout::new(self.layout.slot_count())
            .ok_or_else(|| internal(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let rings_fd =
            sys::sealed_memfd(&format!("holdfast-rings-{}", self.name), layout.byte_len())
                .map_err(internal)?;
        let rings = Arc::new(Rings::map(&rings_fd, layout).map_err(internal)?);
        let (daemon_submit, submit_kick) = sys::kick_pipe().map_err(internal)?;
        let (complete_kick, daemon_complete) = sys::kick_pipe().map_err(internal)?;
        let link = Arc::new(Link::new().map_err(internal)?);
        let (terms, lent) = lent.unzip();
        let lent = lent.unwrap_or_default();
        let sent = lent
            .iter()
            .map(OwnedFd::try_clone)
            .collect::<io::Result<Vec<_>>>()
            .map_err(internal)?;
        st.last_epoch = st.last_epoch.saturating_add(1);
        let epoch = st.last_epoch;
        let pid = pidfd.pid();
        let session = Session {
            epoch,
            pidfd,
            state,
            rings: rings.clone(),
            sq_tail: 0,
            submit_kick,
            link: link.clone(),
            lost_why: None,
            mode: if terms.is_some() {
                Mode::Direct
            } else {
                Mode::Relay
            },
            meters: terms.as_ref().map_or(0, |t| t.meters() as usize),
            _lent: lent,
            watch: None,
            report: None,
        };
        let grant = Grant {
            reply: Attached {
                kind: self.kind,
                size: self.size,
                block_size: self.block_size,
                slot_count: self.layout.slot_count(),
                slot_size: self.layout.slot_size(),
                epoch,
                pending: u32::try_from(st.inflight.queued()).unwrap_or(u32::MAX),
                direct: terms,
            },
            epoch,
            pid,
            rings,
            rings_fd,
            complete_kick,
            daemon_kicks: Some((daemon_submit, daemon_complete)),
            link,
            lent: sent,
        };
        Ok((session, grant))
    }

    /// Runs `f` if `epoch` is the export's daemon (not a successor).
    fn with_session<T>(
        &self,
        epoch: u64,
        f: impl FnOnce(&mut MutexGuard<'_, State>) -> Result<T, ErrorReply>,
    ) -> Result<T, ErrorReply> {
        let mut st = self.state.lock();
        if st.session.as_ref().is_none_or(|s| s.epoch != epoch) {
            return Err(self.no_longer(epoch));
        }
        f(&mut st)
    }

    fn no_longer(&self, epoch: u64) -> ErrorReply {
        ErrorReply::new(
            ErrorCode::NotAttached,
            format!(
                "this connection (epoch {epoch}) is not the daemon of export {}",
                self.name
            ),
        )
    }

    /// RESTORE from the daemon of `epoch`: starts dispatching, replays
    /// first. From an activated successor, this ends its handoff.
    pub fn restore(&self, epoch: u64) -> Result<u32, ErrorReply> {
        let _custody = self.custody.lock();
        let (resent, serving) = self.hand_over(Some(epoch))?;
        let mut st = self.state.lock();
        let restored = if st.successor.as_ref().is_some_and(|s| s.epoch == epoch) {
            self.promote(&mut st, resent, serving)
        } else if st.session.as_ref().is_none_or(|s| s.epoch != epoch) {
            Err(self.no_longer(epoch))
        } else {
            self.activate(&mut st).map(|n| n.saturating_add(resent))
        };
        if restored.is_err() {
            // What `hand_over` parked, if no daemon reads now.
            self.settle_lending(&mut st);
        }
        let replays = restored?;
        info!(
            "{}: epoch {epoch} restored, replaying {replays} requests",
            self.name
        );
        Ok(replays)
    }

    /// Moves the attached daemon to Active and dispatches; returns how many
    /// replays were queued.
    fn activate(&self, st: &mut MutexGuard<'_, State>) -> Result<u32, ErrorReply> {
        let Some(s) = st.session.as_mut() else {
            return Err(self.not_attached());
        };
        match s.state {
            // The kernel re-sends what was queued (`hand_over`).
            DaemonState::Attached if s.mode == Mode::Direct => {
                s.state = DaemonState::Active;
                return Ok(0);
            }
            DaemonState::Attached => {
                s.state = DaemonState::Active;
                self.resend_opens(st);
            }
            DaemonState::Active => {}
            other => {
                return Err(ErrorReply::new(
                    ErrorCode::BadState,
                    format!(
                        "export {}: the daemon is {}, it cannot be restored",
                        self.name,
                        other.name()
                    ),
                ));
            }
        }
        let replays = u32::try_from(st.inflight.queued_replays()).unwrap_or(u32::MAX);
        self.dispatch(st);
        update_waiting(st);
        Ok(replays)
    }

    fn not_attached(&self) -> ErrorReply {
        ErrorReply::new(
            ErrorCode::NotAttached,
            format!(
                "no daemon is attached to export {}; start one, or use --fail-pending",
                self.name
            ),
        )
    }

    /// The operator's restore: activate the attached daemon (replaying), or
    /// fail every pending request with EIO. Returns (replayed, failed).
    pub fn operator_restore(&self, fail_pending: bool) -> Result<(u32, u32), ErrorReply> {
        if fail_pending && self.lender().is_some_and(|l| l.direct_only()) {
            return Err(ErrorReply::new(
                ErrorCode::BadState,
                format!(
                    "export {}: its pending requests wait in the kernel (direct mode on ublk), \
                     which the broker cannot fail; start a daemon, or remove the export",
                    self.name
                ),
            ));
        }
        if fail_pending {
            let failed = {
                let mut st = self.state.lock();
                let failed = st.inflight.take_queued();
                st.stats.failed = st.stats.failed.saturating_add(failed.len() as u64);
                update_waiting(&mut st);
                // Heap bytes were freed: wake writers waiting for room.
                self.changed.notify_all();
                failed
            };
            let n = u32::try_from(failed.len()).unwrap_or(u32::MAX);
            warn!(
                "{}: operator failed {n} pending requests with EIO",
                self.name
            );
            fail_all(failed);
            return Ok((0, n));
        }
        let _custody = self.custody.lock();
        let (resent, _) = self.hand_over(None)?;
        let mut st = self.state.lock();
        let activated = self.activate(&mut st);
        if activated.is_err() {
            self.settle_lending(&mut st);
        }
        let replays = activated?.saturating_add(resent);
        info!(
            "{}: operator restore, replaying {replays} requests",
            self.name
        );
        Ok((replays, 0))
    }

    /// DETACH from the daemon of `epoch`: no more dispatches to it.
    pub fn begin_detach(&self, epoch: u64) -> Result<(), ErrorReply> {
        self.with_session(epoch, |st| {
            if let Some(s) = st.session.as_mut() {
                let refused = match s.state {
                    DaemonState::Fencing => Some("the daemon is being fenced"),
                    DaemonState::Quiescing | DaemonState::Quiesced => Some(
                        "a handoff is draining this daemon; it is released when its successor takes over",
                    ),
                    _ => None,
                };
                if let Some(why) = refused {
                    return Err(ErrorReply::new(ErrorCode::BadState, why));
                }
                s.state = DaemonState::Detaching;
            }
            Ok(())
        })
    }

    /// Whether the daemon of `epoch` has no request in flight (in direct
    /// mode: none that its readers say they hold).
    pub fn drained(&self, epoch: u64) -> bool {
        let st = self.state.lock();
        let holds = st
            .daemon(epoch)
            .filter(|s| s.mode == Mode::Direct)
            .is_some_and(|s| s.progress().busy > 0);
        st.inflight.dispatched(epoch) == 0 && !holds
    }

    /// Whether something (the watchdog, a takeover) asked to fence `epoch`.
    pub fn fence_requested(&self, epoch: u64) -> bool {
        self.state
            .lock()
            .daemon(epoch)
            .is_some_and(|s| s.state == DaemonState::Fencing)
    }

    /// Reads and applies the completions the daemon of `epoch` published.
    /// Valid completions before an invalid one are still applied.
    pub fn reap(&self, epoch: u64, rings: &Rings, head: &mut u32) -> Result<usize, Violation> {
        let mut done = Vec::new();
        let mut violation = None;
        {
            let mut st = self.state.lock();
            match rings.completions_ready(*head) {
                Err(v) => violation = Some(Violation::Ring(v)),
                Ok(ready) => {
                    for _ in 0..ready {
                        let c = rings.completion(*head);
                        match st.inflight.complete(epoch, &c) {
                            Ok(d) => done.push(d),
                            Err(r) => {
                                st.stats.rejected = st.stats.rejected.saturating_add(1);
                                violation = Some(Violation::Completion(r));
                                break;
                            }
                        }
                        *head = head.wrapping_add(1);
                    }
                    rings.set_completion_head(*head);
                }
            }
        }
        let n = done.len();
        if n > 0 {
            for d in &done {
                self.reply(d);
            }
            let now = Instant::now();
            let mut st = self.state.lock();
            for d in &done {
                st.inflight.release(d.slot);
                st.stats
                    .latency
                    .observe(now.saturating_duration_since(d.arrived));
            }
            st.stats.completed = st.stats.completed.saturating_add(n as u64);
            self.dispatch(&mut st);
        }
        match violation {
            Some(v) => Err(v),
            None => Ok(n),
        }
    }

    fn reply(&self, d: &Done) {
        let outcome = match d.result {
            Err(errno) => Outcome::Failed(errno),
            Ok(len) => Outcome::Done {
                len,
                // What the daemon left in the slot: a read's data, an
                // OPEN's blob size.
                data: match d.op {
                    Op::Read => usize::try_from(len).ok(),
                    Op::Open => Some(size_of::<u64>()),
                    _ => None,
                }
                .and_then(|n| {
                    Some(SlotData {
                        region: &self.data,
                        offset: self.layout.slot_offset(d.slot)?,
                        len: n,
                    })
                }),
            },
        };
        d.origin.sink.complete(d.origin.tag, d.op, outcome);
    }

    /// Ends the session of `epoch`. When `lost`, the daemon must already be
    /// fenced (gone): its dispatched requests are queued again for replay.
    pub fn end_session(&self, epoch: u64, lost: bool) {
        let _custody = self.custody.lock();
        let mut st = self.state.lock();
        if lost {
            st.stats.lost = st.stats.lost.saturating_add(1);
        }
        if st.successor.as_ref().is_some_and(|s| s.epoch == epoch) {
            let gone = st.successor.take();
            self.successor_ended(&mut st, gone, lost);
            self.changed.notify_all();
            return;
        }
        if st.session.as_ref().is_none_or(|s| s.epoch != epoch) {
            return;
        }
        let reclaimed = st.inflight.reclaim(epoch);
        let gone = st.session.take();
        if let Some(s) = &gone {
            st.stats.retire(s);
        }
        // Before a successor can attach: nothing of the daemon's is left
        // on the lent descriptors when they close with `gone`.
        self.take_back(&mut st);
        let failed = if st.removed {
            let f = st.inflight.take_queued();
            st.stats.failed = st.stats.failed.saturating_add(f.len() as u64);
            f
        } else {
            Vec::new()
        };
        update_waiting(&mut st);
        info!(
            "{}: epoch {epoch} ended ({}), {reclaimed} requests to replay, {} pending",
            self.name,
            if lost { "daemon lost" } else { "detached" },
            st.inflight.queued()
        );
        self.current_ended(&mut st, gone, lost, reclaimed);
        self.changed.notify_all();
        drop(st);
        fail_all(failed);
    }

    /// Removes the export: nothing can attach any more, its daemon and any
    /// successor are released (DETACHED), and requests still queued, or
    /// submitted or given back later, fail with EIO. Refused while a
    /// handoff runs.
    pub fn remove(&self) -> Result<(), ErrorReply> {
        let failed = {
            let mut st = self.state.lock();
            self.check_available(&st)?;
            st.removed = true;
            for s in [st.session.as_ref(), st.successor.as_ref()]
                .into_iter()
                .flatten()
            {
                s.link.notify(Notice::Release);
            }
            let failed = st.inflight.take_queued();
            st.stats.failed = st.stats.failed.saturating_add(failed.len() as u64);
            update_waiting(&mut st);
            self.changed.notify_all();
            failed
        };
        info!(
            "{}: removed; {} pending requests failed with EIO",
            self.name,
            failed.len()
        );
        fail_all(failed);
        Ok(())
    }

    /// Refuses what needs the export as it is: not removed, and no
    /// handoff running.
    fn check_available(&self, st: &State) -> Result<(), ErrorReply> {
        if st.removed {
            return Err(ErrorReply::new(
                ErrorCode::NoSuchExport,
                format!("export {} was removed", self.name),
            ));
        }
        if let Some(h) = &st.handoff {
            return Err(ErrorReply::new(
                ErrorCode::Busy,
                format!(
                    "export {}: a handoff is running ({}); wait for it to end",
                    self.name,
                    h.phase.name()
                ),
            ));
        }
        Ok(())
    }

    /// Marks the daemon of `epoch` lost and kills it (the session thread
    /// then waits until it is gone and ends the session).
    pub fn declare_lost(&self, epoch: u64, why: &str) {
        let mut st = self.state.lock();
        if let Some(s) = st.daemon_mut(epoch) {
            if s.state != DaemonState::Fencing {
                warn!(
                    "{}: daemon pid {} (epoch {epoch}) declared lost: {why}",
                    self.name,
                    s.pidfd.pid()
                );
                s.lost_why = Some(why.to_owned());
            }
            request_fence(s);
        }
    }

    /// Applies the request-age and daemon-wait bounds (called periodically;
    /// `mono_ns` is `now` as CLOCK_MONOTONIC ns, the clock of a direct-mode
    /// daemon's progress).
    pub fn check_bounds(
        &self,
        now: Instant,
        mono_ns: u64,
        request_timeout: Option<Duration>,
        daemon_wait: Option<Duration>,
    ) {
        let mut failed = Vec::new();
        // Read before the lock: a file of the kernel's.
        let waiting = self.direct.then(|| self.lender()?.waiting()).flatten();
        {
            let mut st = self.state.lock();
            self.check_handoff(&mut st, now);
            let st = &mut *st;
            let age = match st.session.as_mut() {
                Some(s) if s.mode == Mode::Direct && s.state == DaemonState::Active => {
                    s.direct_age(now, mono_ns, waiting)
                }
                Some(s) if s.mode == Mode::Direct => None,
                Some(_) => st
                    .inflight
                    .oldest_dispatch()
                    .map(|at| now.saturating_duration_since(at)),
                None => None,
            };
            if let (Some(limit), Some(age), Some(s)) = (request_timeout, age, st.session.as_mut())
                && age > limit
                && s.state != DaemonState::Fencing
            {
                warn!(
                    "{}: daemon pid {} (epoch {}) declared lost: a request has waited {:.1}s (bound {:?})",
                    self.name,
                    s.pidfd.pid(),
                    s.epoch,
                    age.as_secs_f64(),
                    limit
                );
                request_fence(s);
            }
            if let (Some(limit), Some(since)) = (daemon_wait, st.waiting_since)
                && now.saturating_duration_since(since) > limit
            {
                failed = st.inflight.take_queued();
                st.stats.failed = st.stats.failed.saturating_add(failed.len() as u64);
                update_waiting(st);
                self.changed.notify_all();
                warn!(
                    "{}: no daemon within the wait bound ({limit:?}): failing {} pending requests with EIO",
                    self.name,
                    failed.len()
                );
            }
        }
        fail_all(failed);
    }

    /// Stores a descriptor for the daemon of `epoch`, kept as number `id`.
    /// Only regular files (memfds are) are kept: closing one never blocks,
    /// and a socket or a file on a FUSE mount could block the broker when
    /// it is replaced.
    pub fn fd_put(&self, epoch: u64, name: &str, fd: OwnedFd, id: u64) -> Result<(), ErrorReply> {
        check_fd_name(name)?;
        let is_file = rustix::fs::fstat(&fd)
            .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_file());
        if !is_file {
            return Err(ErrorReply::new(
                ErrorCode::Malformed,
                "the fd store keeps regular files and memfds only",
            ));
        }
        let replaced = self.with_session(epoch, |st| {
            if !st.fdstore.contains_key(name) && st.fdstore.len() >= MAX_STORED_FDS {
                return Err(ErrorReply::new(
                    ErrorCode::LimitReached,
                    format!(
                        "export {}: the fd store holds {MAX_STORED_FDS} descriptors already",
                        self.name
                    ),
                ));
            }
            if let FdHistory::Recorded(lost) = &mut st.fd_history {
                lost.remove(name);
            }
            Ok(st.fdstore.insert(name.to_owned(), (id, fd)))
        })?;
        // Closed here, outside the lock.
        drop(replaced);
        Ok(())
    }

    /// A duplicate of a stored descriptor, for the daemon of `epoch` (or
    /// a handoff's successor, which warms up from it).
    pub fn fd_get(&self, epoch: u64, name: &str) -> Result<OwnedFd, ErrorReply> {
        check_fd_name(name)?;
        let st = self.state.lock();
        if st.daemon(epoch).is_none() {
            return Err(self.no_longer(epoch));
        }
        let (_, fd) = st
            .fdstore
            .get(name)
            .ok_or_else(|| self.fd_miss(&st.fd_history, name))?;
        fd.try_clone()
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, format!("cannot duplicate: {e}")))
    }

    /// The reply to FD_GET of a name the store lacks.
    fn fd_miss(&self, history: &FdHistory, name: &str) -> ErrorReply {
        let why = match history {
            FdHistory::Recorded(lost) if lost.contains(name) => {
                "the previous broker kept it, but it was not passed on"
            }
            FdHistory::Unknown => {
                "its device was taken over from a broker that died, whose fd store died with it"
            }
            FdHistory::Own | FdHistory::Recorded(_) => {
                return ErrorReply::new(
                    ErrorCode::NotFound,
                    format!("export {}: no descriptor stored as {name:?}", self.name),
                );
            }
        };
        ErrorReply::new(
            ErrorCode::Lost,
            format!(
                "export {}: the descriptor stored as {name:?} is lost ({why}): what it held \
                 is gone, and the device's users still hold what they read of it. Remove the \
                 export and add it again to start it empty",
                self.name
            ),
        )
    }

    /// What outlives the broker: the last epoch granted, and duplicates
    /// of the fd store's descriptors (name, kept number, descriptor).
    pub fn custody(&self) -> (u64, Vec<(String, u64, OwnedFd)>) {
        let st = self.state.lock();
        let stored = st
            .fdstore
            .iter()
            .filter_map(|(name, (id, fd))| Some((name.clone(), *id, fd.try_clone().ok()?)))
            .collect();
        (st.last_epoch, stored)
    }

    /// Takes over what a previous broker left for this export: epochs go
    /// on above `last_epoch`, and the fd store holds `stored` again. Its
    /// data may have been written, so a flush is never answered here.
    /// `recorded` names what the previous broker's fd store held; those
    /// missing from `stored` are lost.
    pub fn adopt(
        &self,
        last_epoch: u64,
        recorded: &[(String, u64)],
        stored: Vec<(String, u64, OwnedFd)>,
    ) {
        self.assume_dirty();
        let mut st = self.state.lock();
        st.last_epoch = st.last_epoch.max(last_epoch);
        let lost = recorded
            .iter()
            .filter(|(name, _)| !stored.iter().any(|(s, _, _)| s == name))
            .map(|(name, _)| name.clone());
        st.fd_history = FdHistory::Recorded(lost.collect());
        for (name, id, fd) in stored.into_iter().take(MAX_STORED_FDS) {
            st.fdstore.insert(name, (id, fd));
        }
    }

    /// The export's device was served by another broker before (taken
    /// over by a restart or a ublk recovery): anything may have been
    /// written, so every flush goes to a daemon.
    pub fn assume_dirty(&self) {
        let mut st = self.state.lock();
        st.modified = true;
        if st.fd_history == FdHistory::Own {
            st.fd_history = FdHistory::Unknown;
        }
    }

    /// Whether a daemon is active (restored and receiving requests).
    pub fn serving(&self) -> bool {
        self.state
            .lock()
            .session
            .as_ref()
            .is_some_and(|s| s.state == DaemonState::Active)
    }

    /// Why the broker cannot be replaced now, if a handoff runs here.
    pub fn handoff_running(&self) -> Option<String> {
        let st = self.state.lock();
        st.handoff.as_ref().map(|h| {
            format!(
                "export {}: a handoff is running ({}); wait for it to end",
                self.name,
                h.phase.name()
            )
        })
    }

    /// The pid of the export's daemon (in any state), if it has one.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.state.lock().session.as_ref().map(|s| s.pidfd.pid())
    }

    /// The figures `status` does not show: handoffs by result and the
    /// stall and latency histograms.
    pub fn histograms(&self) -> (metrics::Handoffs, metrics::Histogram, metrics::Histogram) {
        let st = self.state.lock();
        (st.stats.handoffs, st.stats.stall, st.stats.latency)
    }

    /// REPORT: the backend's figures from the daemon of `epoch`, kept
    /// while its session lasts.
    pub fn report(&self, epoch: u64, figures: Figures) {
        let mut st = self.state.lock();
        let st = &mut *st;
        let session = [st.session.as_mut(), st.successor.as_mut()]
            .into_iter()
            .flatten()
            .find(|s| s.epoch == epoch);
        if let Some(s) = session {
            s.report = Some((Instant::now(), figures));
        }
    }

    /// The serving daemon's figures, their ages as of now.
    fn figures(st: &State) -> Figures {
        st.session
            .as_ref()
            .and_then(|s| s.report.as_ref())
            .map(|(at, f)| f.aged(at.elapsed()))
            .unwrap_or_default()
    }

    pub fn status(&self, frontend: &str, device: Option<String>) -> ExportStatus {
        let lender = self.lender().filter(|_| self.direct);
        let lendable = lender.as_ref().is_some_and(|l| l.terms().is_ok());
        let waiting = lender.and_then(|l| l.waiting());
        let st = self.state.lock();
        let daemon = st.session.as_ref().map(Session::status);
        // A direct-mode daemon's requests are its own: what the kernel
        // waits on it for, or else what its readers hold.
        let session = st.session.as_ref();
        let direct = session
            .filter(|s| s.mode == Mode::Direct)
            .map(Session::progress);
        let inflight = match (session, direct) {
            (Some(_), Some(p)) => waiting.unwrap_or(p.busy),
            (Some(s), None) => st.inflight.dispatched(s.epoch) as u64,
            (None, _) => 0,
        };
        let direct = direct.unwrap_or_default();
        ExportStatus {
            name: self.name.clone(),
            size: self.size,
            frontend: frontend.to_owned(),
            device,
            block_size: self.block_size,
            mode: if lendable { Mode::Direct } else { Mode::Relay },
            daemon,
            inflight: u32::try_from(inflight).unwrap_or(u32::MAX),
            pending: u32::try_from(st.inflight.queued()).unwrap_or(u32::MAX),
            replayed: st.stats.replayed,
            completed: st.stats.completed.saturating_add(direct.answered),
            failed: st.stats.failed,
            daemons_lost: st.stats.lost,
            rejected_completions: st.stats.rejected.saturating_add(direct.refused),
            waiting_ms: st.waiting_since.map(|t| millis(t.elapsed())),
            successor: st.successor.as_ref().map(Session::status),
            handoff: st.handoff.as_ref().map(handoff::Handoff::progress),
            last_handoff: st.last_handoff.as_ref().map(|(_, r)| r.clone()),
            supervisor: None,
            backend: Self::figures(&st),
        }
    }
}

fn check_fd_name(name: &str) -> Result<(), ErrorReply> {
    holdfast_proto::validate_name(name).map_err(|e| {
        ErrorReply::new(
            ErrorCode::Malformed,
            format!("fd store name: {e} (at most {MAX_NAME_LEN} bytes)"),
        )
    })
}

/// Marks a session for fencing: SIGKILL through its pidfd, and wake its
/// session thread, which waits until the daemon is gone and ends it.
fn request_fence(s: &mut Session) {
    s.state = DaemonState::Fencing;
    if let Err(e) = s.pidfd.kill() {
        warn!("cannot SIGKILL daemon pid {}: {e}", s.pidfd.pid());
    }
    s.link.kick();
}

impl State {
    /// The daemon or successor of `epoch`.
    fn daemon(&self, epoch: u64) -> Option<&Session> {
        [self.session.as_ref(), self.successor.as_ref()]
            .into_iter()
            .flatten()
            .find(|s| s.epoch == epoch)
    }

    fn daemon_mut(&mut self, epoch: u64) -> Option<&mut Session> {
        [self.session.as_mut(), self.successor.as_mut()]
            .into_iter()
            .flatten()
            .find(|s| s.epoch == epoch)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn update_waiting(st: &mut State) {
    let active = st
        .session
        .as_ref()
        .is_some_and(|s| s.state == DaemonState::Active);
    if st.inflight.queued() == 0 || active {
        st.waiting_since = None;
    } else if st.waiting_since.is_none() {
        st.waiting_since = Some(Instant::now());
    }
}

fn fail_all(failed: Vec<Failed>) {
    for f in failed {
        f.origin
            .sink
            .complete(f.origin.tag, f.op, Outcome::Failed(libc::EIO));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontends::ReplySink;
    use holdfast_proto::{HandoffOutcome, HandoffPhase};

    /// Answers nothing: these tests count requests, not replies.
    struct Ignore;
    impl ReplySink for Ignore {
        fn complete(&self, _tag: u64, _op: Op, _outcome: Outcome<'_>) {}
    }
    fn origin() -> Origin {
        Origin {
            sink: Arc::new(Ignore),
            tag: 0,
        }
    }

    /// A blob frontend with one open blob.
    struct OneBlob;
    impl Reopen for OneBlob {
        fn reopens(&self) -> Vec<(Ask, Origin, Data)> {
            let name = b"img".to_vec().into_boxed_slice();
            let ask = Ask {
                op: Op::Open,
                object: 7,
                offset: 0,
                len: 3,
            };
            vec![(ask, origin(), Data::Heap(name))]
        }
    }

    /// Daemons lost one after another before they answer anything (a crash
    /// loop, or kills faster than a daemon starts) leave one re-sent OPEN
    /// and the kernel's read, not one more OPEN per loss: that backlog went
    /// out before the read and, once a daemon could no longer get through
    /// it before the next kill, the read never reached one.
    #[test]
    fn lost_daemons_leave_one_reopen_each_time() {
        let export = Export::new(&ExportConfig {
            name: "images".into(),
            kind: holdfast_proto::ExportKind::Blobs,
            size: 0,
            block_size: 512,
            slot_count: 8,
            slot_size: 4096,
            heap_limit: 1 << 20,
            direct: false,
        })
        .unwrap();
        let frontend: Arc<dyn Reopen> = Arc::new(OneBlob);
        export.set_reopen(Arc::downgrade(&frontend));
        let read = Ask {
            op: Op::Read,
            object: 7,
            offset: 0,
            len: 4096,
        };
        export.submit_blob(read, origin(), Data::None);
        // Every "daemon" here is this test process.
        let me = || Arc::new(Pidfd::open(std::process::id()).unwrap());
        for _ in 0..5 {
            let grant = export
                .attach(me(), false, false, Duration::from_secs(1))
                .unwrap();
            export.restore(grant.epoch).unwrap();
            let st = export.status("cachefiles", None);
            assert_eq!((st.inflight, st.pending), (2, 0), "{st:?}");
            export.end_session(grant.epoch, true);
            // The lost OPEN waits with the read until the next daemon's
            // fresh set replaces it.
            let st = export.status("cachefiles", None);
            assert_eq!((st.inflight, st.pending), (0, 2), "{st:?}");
        }
    }

    /// Keeps each reply's tag and errno (0 for success).
    #[derive(Default)]
    struct Replies(Mutex<Vec<(u64, i32)>>);
    impl ReplySink for Replies {
        fn complete(&self, tag: u64, _op: Op, outcome: Outcome<'_>) {
            let errno = match outcome {
                Outcome::Failed(e) => e,
                _ => 0,
            };
            self.0.lock().push((tag, errno));
        }
    }

    fn volume_config(slot_count: u32, heap_limit: usize) -> ExportConfig {
        ExportConfig {
            name: "vol".into(),
            kind: holdfast_proto::ExportKind::Volume,
            size: 1 << 20,
            block_size: 512,
            slot_count,
            slot_size: 4096,
            heap_limit,
            direct: false,
        }
    }

    fn volume(slot_count: u32, heap_limit: usize) -> Export {
        Export::new(&volume_config(slot_count, heap_limit)).unwrap()
    }

    /// A frontend that records what the export asks of it.
    struct MockLender {
        calls: Mutex<Vec<&'static str>>,
        lendable: bool,
        /// No relay mode (ublk in direct mode).
        only: bool,
        /// What `serve_by` answers.
        serving: crate::frontends::Serving,
    }

    impl Lender for MockLender {
        fn terms(&self) -> Result<DirectTerms, String> {
            self.calls.lock().push("terms");
            if !self.lendable {
                return Err("this kernel cannot re-send".into());
            }
            Ok(DirectTerms::Fuse(holdfast_proto::FuseTerms {
                minor: 45,
                flags: 0,
                max_io: 4096,
                max_background: 8,
                started: 0,
                conns: 2,
            }))
        }
        fn lend(&self) -> io::Result<Vec<OwnedFd>> {
            self.calls.lock().push("lend");
            (0..2).map(|_| sys::eventfd()).collect()
        }
        fn park(&self) -> io::Result<()> {
            self.calls.lock().push("park");
            Ok(())
        }
        fn resend(&self) -> io::Result<()> {
            self.calls.lock().push("resend");
            Ok(())
        }
        fn unpark(&self) {
            self.calls.lock().push("unpark");
        }
        fn is_resent(&self, tag: u64) -> bool {
            tag >> 63 == 1
        }
        fn waiting(&self) -> Option<u64> {
            None
        }
        fn serve_by(&self, pid: u32) -> io::Result<crate::frontends::Serving> {
            assert_eq!(pid, std::process::id());
            self.calls.lock().push("serve_by");
            Ok(self.serving)
        }
        fn quiesce(&self, pid: u32) {
            assert_eq!(pid, std::process::id());
            self.calls.lock().push("quiesce");
        }
        fn direct_only(&self) -> bool {
            self.only
        }
    }

    fn direct_volume(lendable: bool) -> (Export, Arc<MockLender>) {
        direct_volume_of(lendable, false)
    }

    fn direct_volume_of(lendable: bool, only: bool) -> (Export, Arc<MockLender>) {
        let export = Export::new(&ExportConfig {
            direct: true,
            ..volume_config(8, 1 << 20)
        })
        .unwrap();
        let lender = Arc::new(MockLender {
            calls: Mutex::new(Vec::new()),
            lendable,
            only,
            serving: if only {
                crate::frontends::Serving::Later
            } else {
                crate::frontends::Serving::Now
            },
        });
        export.set_lender(lender.clone());
        (export, lender)
    }

    /// Direct mode's states: ATTACH lends the queue; RESTORE parks the
    /// frontend's readers, has the kernel re-send what they read and
    /// forgets it unanswered (the kernel re-sends it to the daemon, with a
    /// new unique); nothing is dispatched through the rings; the session's
    /// end re-sends what the daemon held and unparks the readers.
    #[test]
    fn direct_mode_lends_the_queue_and_takes_it_back() {
        let (export, lender) = direct_volume(true);
        let replies = Arc::new(Replies::default());
        let read = |tag: u64| {
            let sink: Arc<dyn ReplySink> = replies.clone();
            export.submit(Op::Read, 0, 4096, Origin { sink, tag }, Data::None);
        };
        // Read by the frontend before any daemon: one new, one re-sent (a
        // lost daemon's).
        read(1);
        read(1 << 63 | 2);
        let me = || Arc::new(Pidfd::open(std::process::id()).unwrap());
        let grant = export
            .attach(me(), false, true, Duration::from_secs(1))
            .unwrap();
        assert_eq!(grant.reply.direct.map(|d| d.conns()), Some(2));
        assert_eq!(grant.lent.len(), 2);
        assert_eq!(*lender.calls.lock(), ["terms", "lend"]);
        assert_eq!(export.restore(grant.epoch).unwrap(), 1);
        assert_eq!(
            *lender.calls.lock(),
            ["terms", "lend", "park", "resend", "serve_by"]
        );
        let st = export.status("fuse", None);
        assert_eq!(st.daemon.map(|d| d.mode), Some(Mode::Direct));
        assert_eq!((st.pending, st.inflight, st.replayed), (0, 0, 1));
        assert!(
            replies.0.lock().is_empty(),
            "a forgotten request was answered"
        );
        // Nothing goes through the rings in direct mode.
        read(3);
        let st = export.status("fuse", None);
        assert_eq!((st.pending, st.inflight), (1, 0));
        lender.calls.lock().clear();
        export.end_session(grant.epoch, true);
        assert_eq!(*lender.calls.lock(), ["resend", "unpark"]);
        // A daemon that does not ask for direct mode is relayed.
        lender.calls.lock().clear();
        let grant = export
            .attach(me(), false, false, Duration::from_secs(1))
            .unwrap();
        assert!(grant.reply.direct.is_none() && grant.lent.is_empty());
        assert_eq!(export.restore(grant.epoch).unwrap(), 0);
        assert!(lender.calls.lock().is_empty());
        let st = export.status("fuse", None);
        assert_eq!((st.pending, st.inflight), (0, 1));
        // Detaching a relay daemon touches no lending.
        export.end_session(grant.epoch, false);
        assert!(lender.calls.lock().iter().all(|c| *c == "terms"));
    }

    /// A daemon that never restores never had the queue: its end re-sends
    /// nothing (the frontend's readers hold what they read, and a re-send
    /// under them would make each of those requests twice).
    #[test]
    fn direct_mode_without_restore_re_sends_nothing() {
        let (export, lender) = direct_volume(true);
        let me = Arc::new(Pidfd::open(std::process::id()).unwrap());
        let grant = export
            .attach(me, false, true, Duration::from_secs(1))
            .unwrap();
        export.end_session(grant.epoch, true);
        assert_eq!(*lender.calls.lock(), ["terms", "lend"]);
    }

    /// A frontend with no relay mode (ublk in direct mode): a daemon that
    /// cannot serve the queue is refused before anyone is fenced, and a
    /// direct daemon's RESTORE names it to the frontend when it is to start
    /// serving (the frontend decides what the kernel must be told).
    #[test]
    fn direct_only_frontend_refuses_relay_daemons_and_hears_of_each_restore() {
        let (export, lender) = direct_volume_of(true, true);
        let me = || Arc::new(Pidfd::open(std::process::id()).unwrap());
        let grant = export
            .attach(me(), false, true, Duration::from_secs(1))
            .unwrap();
        assert!(matches!(grant.reply.direct, Some(DirectTerms::Fuse(_))));
        let Err(refused) = export.attach(me(), true, false, Duration::from_secs(1)) else {
            panic!("a relay daemon attached")
        };
        assert_eq!(refused.code, ErrorCode::BadState);
        assert!(
            refused.text.contains("direct mode only"),
            "{}",
            refused.text
        );
        assert!(
            !export.fence_requested(grant.epoch),
            "a refused takeover fenced"
        );
        // Told at the first RESTORE, not at one of a daemon that serves.
        export.restore(grant.epoch).unwrap();
        export.restore(grant.epoch).unwrap();
        export.operator_restore(false).unwrap();
        let refused = export.operator_restore(true).unwrap_err();
        assert!(refused.text.contains("cannot fail"), "{}", refused.text);
        let told = || {
            lender
                .calls
                .lock()
                .iter()
                .filter(|c| **c == "serve_by")
                .count()
        };
        assert_eq!(told(), 1);
        // One that cannot lend now refuses a direct daemon too.
        let (export, _) = direct_volume_of(false, true);
        let Err(refused) = export.attach(me(), false, true, Duration::from_secs(1)) else {
            panic!("attached with nothing to lend")
        };
        assert!(refused.text.contains("cannot be lent"), "{}", refused.text);
    }

    /// A handoff on a queue the kernel gives its new server only once that
    /// server has fetched it (ublk in direct mode): READY has the frontend
    /// quiesce the queue, and the handoff, with its stall, ends when the
    /// frontend says the successor serves, not at its RESTORE; a refusal
    /// the frontend reports before the RESTORE is through ends it there.
    #[test]
    fn direct_handoff_ends_when_the_kernel_has_the_successor_serve() {
        let (export, lender) = direct_volume_of(true, true);
        let me = || Arc::new(Pidfd::open(std::process::id()).unwrap());
        let pid = std::process::id();
        let mut current = export
            .attach(me(), false, true, Duration::from_secs(1))
            .unwrap();
        export.restore(current.epoch).unwrap();
        let params = HandoffParams {
            dry_run: false,
            ready_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(60),
        };
        for early in [None, Some(Err("EINVAL".to_owned()))] {
            lender.calls.lock().clear();
            export.begin_handoff(params).unwrap();
            let next = export.prepare(me(), true).unwrap();
            export.ready(next.epoch).unwrap();
            assert_eq!(*lender.calls.lock(), ["terms", "lend", "quiesce"]);
            assert!(export.quiesced(current.epoch).is_ok());
            let refused = early.is_some();
            if let Some(result) = early {
                export.served(pid, result);
            }
            export.restore(next.epoch).unwrap();
            let st = export.status("fuse", None);
            if refused {
                let r = st.last_handoff.unwrap();
                assert!(st.handoff.is_none());
                assert_eq!(r.outcome, HandoffOutcome::Completed);
                assert!(r.reason.contains("EINVAL"), "{}", r.reason);
            } else {
                assert_eq!(st.handoff.map(|h| h.phase), Some(HandoffPhase::Serving));
                assert!(st.last_handoff.is_none());
                export.served(pid, Ok(()));
                let st = export.status("fuse", None);
                let r = st.last_handoff.unwrap();
                assert!(st.handoff.is_none());
                assert_eq!(
                    (r.outcome, r.reason.as_str()),
                    (HandoffOutcome::Completed, "")
                );
                assert!(r.stall_us > 0);
            }
            assert_eq!(st.daemon.map(|d| d.epoch), Some(next.epoch));
            current = next;
        }
    }

    /// Where the frontend cannot lend (a kernel without FUSE_NOTIFY_RESEND),
    /// a daemon that asks for direct mode gets relay mode.
    #[test]
    fn direct_mode_falls_back_to_relay() {
        let (export, lender) = direct_volume(false);
        let me = Arc::new(Pidfd::open(std::process::id()).unwrap());
        let grant = export
            .attach(me, false, true, Duration::from_secs(1))
            .unwrap();
        assert!(grant.reply.direct.is_none() && grant.lent.is_empty());
        assert_eq!(*lender.calls.lock(), ["terms"]);
        assert_eq!(export.status("fuse", None).mode, Mode::Relay);
    }

    /// `export rm --force` while a writer waits for heap room (no daemon,
    /// every slot and the heap full): that writer gets EIO, like the
    /// queued ones, instead of a request nothing will ever answer.
    #[test]
    fn removal_fails_writers_waiting_for_heap_room() {
        let export = Arc::new(volume(1, 4096));
        let replies = Arc::new(Replies::default());
        let write = |export: &Export, tag: u64| {
            let sink: Arc<dyn ReplySink> = replies.clone();
            export.submit_write(tag * 4096, Origin { sink, tag }, &[1; 4096]);
        };
        write(&export, 1); // a slot
        write(&export, 2); // the heap
        let waiter = {
            let (export, replies) = (export.clone(), replies.clone());
            std::thread::spawn(move || {
                let sink: Arc<dyn ReplySink> = replies;
                export.submit_write(3 * 4096, Origin { sink, tag: 3 }, &[1; 4096]);
            })
        };
        let end = Instant::now() + Duration::from_secs(5);
        while export.state.lock().inflight.heap_bytes() != 4096 || !waiter_blocked(&waiter) {
            assert!(Instant::now() < end, "the third write did not wait");
            std::thread::sleep(Duration::from_millis(10));
        }
        export.remove().unwrap();
        waiter.join().unwrap();
        let mut got = replies.0.lock().clone();
        got.sort_unstable();
        assert_eq!(got, [(1, libc::EIO), (2, libc::EIO), (3, libc::EIO)]);
    }

    /// Whether a thread is still running (blocked, here), after a moment.
    fn waiter_blocked(t: &std::thread::JoinHandle<()>) -> bool {
        std::thread::sleep(Duration::from_millis(50));
        !t.is_finished()
    }

    /// A flush on an export nothing was written through is answered at
    /// once, but not once the export is taken over from another broker
    /// (its kernel device may hold writes a daemon has not made durable):
    /// then it waits for a daemon.
    #[test]
    fn flushes_of_a_taken_over_export_reach_a_daemon() {
        let replies = Arc::new(Replies::default());
        let flush = |export: &Export, tag: u64| {
            let sink: Arc<dyn ReplySink> = replies.clone();
            export.submit(Op::Flush, 0, 0, Origin { sink, tag }, Data::None);
        };
        let fresh = volume(4, 1 << 20);
        flush(&fresh, 1);
        assert_eq!(*replies.0.lock(), [(1, 0)]);
        let taken_over = volume(4, 1 << 20);
        taken_over.assume_dirty();
        flush(&taken_over, 2);
        assert_eq!(replies.0.lock().len(), 1);
        assert_eq!(taken_over.status("ublk", None).pending, 1);
    }

    /// A name the fd store lacks was never stored, unless the export was
    /// taken over: with a record, the names it lists that were not passed
    /// on are lost; with none (a ublk recovery after the broker died),
    /// every miss is. A `mem` daemon then refuses to start on zeros.
    #[test]
    fn fd_store_misses_after_a_takeover_are_losses() {
        let me = || Arc::new(Pidfd::open(std::process::id()).unwrap());
        let memfd = || rustix::fs::memfd_create("test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let get = |export: &Export, name: &str| {
            let grant = export
                .attach(me(), false, false, Duration::from_secs(1))
                .unwrap();
            let got = export
                .fd_get(grant.epoch, name)
                .map(drop)
                .map_err(|e| e.code);
            export.end_session(grant.epoch, false);
            got
        };
        let fresh = volume(4, 1 << 20);
        assert_eq!(get(&fresh, "mem"), Err(ErrorCode::NotFound));

        let recovered = volume(4, 1 << 20);
        recovered.assume_dirty();
        assert_eq!(get(&recovered, "mem"), Err(ErrorCode::Lost));

        let adopted = volume(4, 1 << 20);
        adopted.adopt(
            3,
            &[("mem".into(), 1), ("kept".into(), 2)],
            vec![("kept".into(), 2, memfd())],
        );
        adopted.assume_dirty(); // the ublk recovery that follows
        assert_eq!(get(&adopted, "mem"), Err(ErrorCode::Lost));
        assert_eq!(get(&adopted, "kept"), Ok(()));
        assert_eq!(get(&adopted, "other"), Err(ErrorCode::NotFound));
        // Stored again (an operator's choice): found from then on.
        let grant = adopted
            .attach(me(), false, false, Duration::from_secs(1))
            .unwrap();
        adopted.fd_put(grant.epoch, "mem", memfd(), 4).unwrap();
        adopted.end_session(grant.epoch, false);
        assert_eq!(get(&adopted, "mem"), Ok(()));
    }
}
