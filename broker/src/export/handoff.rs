//! The planned handoff of an export from its daemon to a successor
//! (kmod-notes/handoff.md). Every step runs under the export's lock; the
//! session threads carry the notices (QUIESCE, ACTIVATE, REVIVE, DETACHED)
//! to their daemons, and the watchdog enforces the bounds.
//!
//! ```text
//! Waiting ──PREPARE──▶ Preparing ──READY──▶ Quiescing ──QUIESCED──▶ Activating ──RESTORE──▶ done
//!    │                    │ (dry run: done)     │ drain bound: fence old,   │          │
//!    │                    │                     │ replay its requests       │          │ (the kernel's
//!    └── timeout ─────────┴── successor lost ───┴───────────────────────────┘          ▼  server later)
//!                         aborted, old revived                                     Serving ──served──▶ done
//! ```
//!
//! Serving is for a queue the kernel gives its new server only once that
//! server has fetched it, after its RESTORED (ublk in direct mode): the
//! stall ends there, not at RESTORE.

use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_proto::{
    DaemonState, ErrorCode, ErrorReply, HandoffOutcome, HandoffPhase, HandoffProgress,
    HandoffReport,
};

use super::{Export, Grant, Notice, Session, State, millis, request_fence, update_waiting};
use crate::frontends::Serving;
use crate::sys::pidfd::Pidfd;
use crate::{info, warn};

/// What an operator asked for.
#[derive(Debug, Clone, Copy)]
pub struct HandoffParams {
    pub dry_run: bool,
    /// For the successor to attach and send READY, counted from HANDOFF.
    pub ready_timeout: Duration,
    /// For the old daemon to drain, and for the successor to RESTORE after
    /// ACTIVATE: both are inside the stall.
    pub drain_timeout: Duration,
}

/// A running handoff.
pub(super) struct Handoff {
    id: u64,
    pub(super) phase: HandoffPhase,
    params: HandoffParams,
    from_pid: u32,
    from_epoch: u64,
    to_pid: u32,
    to_epoch: u64,
    started: Instant,
    /// When the current phase times out.
    deadline: Instant,
    prepared_at: Option<Instant>,
    ready_at: Option<Instant>,
    quiesce_at: Option<Instant>,
    drain: Option<Duration>,
    replayed: u32,
    fenced: bool,
    /// What the frontend said of the successor as the kernel's server
    /// before its RESTORE was through (`Export::served`).
    served: Option<Result<(), String>>,
}

impl Handoff {
    pub(super) fn progress(&self) -> HandoffProgress {
        HandoffProgress {
            phase: self.phase,
            dry_run: self.params.dry_run,
            elapsed_ms: millis(self.started.elapsed()),
        }
    }
}

/// Why a QUIESCED was not accepted.
pub enum QuiescedError {
    /// Not asked for (a race with REVIVE, or a confused daemon): answered
    /// with an error, nothing else changes.
    Refused(ErrorReply),
    /// The daemon claims to be drained with requests still in flight: a
    /// protocol violation, so it is fenced.
    Violation(String),
}

fn micros(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn since(t: Option<Instant>, now: Instant) -> Option<Duration> {
    t.map(|t| now.saturating_duration_since(t))
}

impl Export {
    /// HANDOFF: arms a handoff of the active daemon; a successor may now
    /// PREPARE. Returns the handoff's id and the daemon's pid and epoch.
    pub fn begin_handoff(&self, params: HandoffParams) -> Result<(u64, u32, u64), ErrorReply> {
        let mut st = self.state.lock();
        self.check_available(&st)?;
        let (pid, epoch) = match st.session.as_ref() {
            Some(s) if s.state == DaemonState::Active => (s.pidfd.pid(), s.epoch),
            other => {
                let what = other.map_or("no daemon".to_owned(), |s| {
                    format!("its daemon pid {} is {}", s.pidfd.pid(), s.state.name())
                });
                return Err(ErrorReply::new(
                    ErrorCode::BadState,
                    format!(
                        "export {}: nothing to hand off ({what}); a daemon started normally restores it",
                        self.name
                    ),
                ));
            }
        };
        let now = Instant::now();
        st.next_handoff = st.next_handoff.saturating_add(1);
        let id = st.next_handoff;
        st.handoff = Some(Handoff {
            id,
            phase: HandoffPhase::Waiting,
            params,
            from_pid: pid,
            from_epoch: epoch,
            to_pid: 0,
            to_epoch: 0,
            started: now,
            deadline: now.checked_add(params.ready_timeout).unwrap_or(now),
            prepared_at: None,
            ready_at: None,
            quiesce_at: None,
            drain: None,
            replayed: 0,
            fenced: false,
            served: None,
        });
        info!(
            "{}: handoff {id}{} armed: daemon pid {pid} (epoch {epoch}); waiting up to {:?} for a successor",
            self.name,
            if params.dry_run { " (dry run)" } else { "" },
            params.ready_timeout
        );
        Ok((id, pid, epoch))
    }

    /// PREPARE: attaches `pidfd` as the successor of the armed handoff,
    /// in direct mode if it can (`direct`) and the export allows it.
    pub fn prepare(&self, pidfd: Arc<Pidfd>, direct: bool) -> Result<Grant, ErrorReply> {
        let mut st = self.state.lock();
        match st.handoff.as_ref().map(|h| h.phase) {
            Some(HandoffPhase::Waiting) => {}
            Some(phase) => {
                return Err(ErrorReply::new(
                    ErrorCode::Busy,
                    format!(
                        "export {}: the running handoff has a successor already ({})",
                        self.name,
                        phase.name()
                    ),
                ));
            }
            None => {
                return Err(ErrorReply::new(
                    ErrorCode::BadState,
                    format!(
                        "export {}: no handoff is waiting for a successor; run `holdfastctl handoff {}` \
                         first, or start this daemon without --successor",
                        self.name, self.name
                    ),
                ));
            }
        }
        let lent = self.lend(direct)?;
        let (session, grant) = self.new_session(&mut st, pidfd, DaemonState::Preparing, lent)?;
        st.successor = Some(session);
        if let Some(h) = st.handoff.as_mut() {
            h.phase = HandoffPhase::Preparing;
            h.to_pid = grant.pid;
            h.to_epoch = grant.epoch;
            h.prepared_at = Some(Instant::now());
        }
        info!(
            "{}: successor pid {} attached (epoch {}), warming up",
            self.name, grant.pid, grant.epoch
        );
        Ok(grant)
    }

    /// READY from the successor of `epoch`: stops dispatch and quiesces the
    /// current daemon (or, in a dry run, releases the successor).
    pub fn ready(&self, epoch: u64) -> Result<(), ErrorReply> {
        let mut st = self.state.lock();
        let st = &mut *st;
        let (Some(succ), Some(h)) = (st.successor.as_mut(), st.handoff.as_mut()) else {
            return Err(not_successor(epoch));
        };
        if succ.epoch != epoch || succ.state != DaemonState::Preparing {
            return Err(not_successor(epoch));
        }
        let now = Instant::now();
        h.ready_at = Some(now);
        succ.state = DaemonState::Ready;
        if h.params.dry_run {
            succ.link.notify(Notice::Release);
            self.finish(
                st,
                HandoffOutcome::DryRun,
                "dry run: the successor warmed up and was released".into(),
            );
            return Ok(());
        }
        h.phase = HandoffPhase::Quiescing;
        h.quiesce_at = Some(now);
        h.deadline = now.checked_add(h.params.drain_timeout).unwrap_or(now);
        match st.session.as_mut() {
            Some(cur) if cur.state == DaemonState::Active => {
                // From here on nothing is dispatched: new requests queue.
                cur.state = DaemonState::Quiescing;
                if let Some(lender) = self.lender() {
                    lender.quiesce(cur.pidfd.pid());
                }
                cur.link.notify(Notice::Quiesce);
                info!(
                    "{}: successor ready; quiescing daemon pid {} (bound {:?})",
                    self.name,
                    cur.pidfd.pid(),
                    h.params.drain_timeout
                );
            }
            // Detaching or being fenced: its session's end activates.
            Some(_) => {}
            // Lost while the successor warmed up.
            None => self.activate_successor(st),
        }
        Ok(())
    }

    /// QUIESCED from the current daemon of `epoch`.
    pub fn quiesced(&self, epoch: u64) -> Result<(), QuiescedError> {
        let mut st = self.state.lock();
        let st = &mut *st;
        let Some(cur) = st.session.as_mut().filter(|s| s.epoch == epoch) else {
            return Err(QuiescedError::Refused(self.no_longer(epoch)));
        };
        if cur.state != DaemonState::Quiescing {
            return Err(QuiescedError::Refused(ErrorReply::new(
                ErrorCode::BadState,
                format!(
                    "QUIESCED was not asked for (the daemon is {})",
                    cur.state.name()
                ),
            )));
        }
        let held = st.inflight.dispatched(epoch);
        if held > 0 {
            return Err(QuiescedError::Violation(format!(
                "QUIESCED with {held} requests not completed"
            )));
        }
        cur.state = DaemonState::Quiesced;
        if let Some(h) = st.handoff.as_mut() {
            h.drain = since(h.quiesce_at, Instant::now());
        }
        self.activate_successor(st);
        Ok(())
    }

    /// RESTORE from the activated successor: it becomes the export's daemon
    /// and the old one is released. `resent`: replays the kernel re-sent
    /// for a direct successor (`hand_over`); `serving`: whether it is the
    /// kernel's server yet.
    pub(super) fn promote(
        &self,
        st: &mut State,
        resent: u32,
        serving: Serving,
    ) -> Result<u32, ErrorReply> {
        let activated = st
            .successor
            .as_ref()
            .is_some_and(|s| s.state == DaemonState::Activating);
        let Some(mut new) = st.successor.take().filter(|_| activated) else {
            return Err(ErrorReply::new(
                ErrorCode::BadState,
                "a successor restores only after ACTIVATE",
            ));
        };
        new.state = DaemonState::Active;
        let (pid, epoch) = (new.pidfd.pid(), new.epoch);
        // A direct daemon answered all it read before QUIESCED: its lent
        // descriptors close here, empty.
        if let Some(old) = st.session.replace(new) {
            st.stats.retire(&old);
            old.link.notify(Notice::Release);
        }
        self.settle_lending(st);
        self.resend_opens(st);
        let replays = u32::try_from(st.inflight.queued_replays())
            .unwrap_or(u32::MAX)
            .saturating_add(resent);
        info!("{}: daemon pid {pid} (epoch {epoch}) took over", self.name);
        if let Some(h) = st.handoff.as_mut() {
            h.replayed = h.replayed.saturating_add(resent);
            match h.served.take() {
                None if serving == Serving::Later => {
                    let now = Instant::now();
                    h.phase = HandoffPhase::Serving;
                    h.deadline = now.checked_add(h.params.drain_timeout).unwrap_or(now);
                }
                served => self.finish(st, HandoffOutcome::Completed, not_served(served)),
            }
        }
        self.dispatch(st);
        update_waiting(st);
        Ok(replays)
    }

    /// The frontend's word that daemon `pid` is (or, `Err`, could not be
    /// made) the kernel's server of the queue it restored with
    /// [`Serving::Later`]: a handoff to it ends here.
    pub fn served(&self, pid: u32, result: Result<(), String>) {
        let mut st = self.state.lock();
        let Some(h) = st.handoff.as_mut().filter(|h| h.to_pid == pid) else {
            return;
        };
        match h.phase {
            HandoffPhase::Serving => {
                self.finish(&mut st, HandoffOutcome::Completed, not_served(Some(result)));
            }
            // Before its RESTORE was through (a kernel that refused at once).
            HandoffPhase::Activating => h.served = Some(result),
            _ => {}
        }
    }

    /// Sends ACTIVATE to the ready successor.
    fn activate_successor(&self, st: &mut State) {
        let (Some(succ), Some(h)) = (st.successor.as_mut(), st.handoff.as_mut()) else {
            return;
        };
        let now = Instant::now();
        h.phase = HandoffPhase::Activating;
        h.deadline = now.checked_add(h.params.drain_timeout).unwrap_or(now);
        succ.state = DaemonState::Activating;
        succ.link.notify(Notice::Activate);
    }

    /// The successor's session ended (lost, or released after a dry run).
    pub(super) fn successor_ended(&self, st: &mut State, gone: Option<Session>, lost: bool) {
        // Only the running handoff's own successor ends it: a successor a
        // dry run released may leave after the next handoff was armed.
        let epoch = gone.as_ref().map(|s| s.epoch);
        if st
            .handoff
            .as_ref()
            .is_none_or(|h| Some(h.to_epoch) != epoch)
        {
            return;
        }
        let why = gone
            .as_ref()
            .and_then(|s| s.lost_why.clone())
            .unwrap_or_else(|| "it left".into());
        let pid = gone.as_ref().map_or(0, |s| s.pidfd.pid());
        let what = if lost { "was lost" } else { "detached" };
        self.abort(st, format!("the successor pid {pid} {what}: {why}"));
    }

    /// The current daemon's session ended while a handoff ran.
    pub(super) fn current_ended(
        &self,
        st: &mut State,
        gone: Option<Session>,
        lost: bool,
        reclaimed: usize,
    ) {
        let Some(h) = st.handoff.as_mut() else {
            return;
        };
        let pid = gone.as_ref().map_or(0, |s| s.pidfd.pid());
        match h.phase {
            HandoffPhase::Waiting => {
                let what = if lost { "was lost" } else { "detached" };
                self.abort(
                    st,
                    format!("daemon pid {pid} {what} before a successor attached"),
                );
            }
            // The successor is activated when it is READY.
            HandoffPhase::Preparing => {}
            HandoffPhase::Quiescing => {
                h.fenced = lost;
                h.replayed = u32::try_from(reclaimed).unwrap_or(u32::MAX);
                h.drain = since(h.quiesce_at, Instant::now());
                self.activate_successor(st);
            }
            // It had drained and released its lease already.
            HandoffPhase::Activating => {}
            // The successor, promoted, before the kernel took it.
            HandoffPhase::Serving => {
                let why = gone
                    .and_then(|s| s.lost_why)
                    .unwrap_or_else(|| "it left".into());
                self.finish(
                    st,
                    HandoffOutcome::Completed,
                    format!("the successor pid {pid} ended before the kernel had it serve: {why}"),
                );
            }
        }
    }

    /// Enforces the handoff's bounds (from the watchdog).
    pub(super) fn check_handoff(&self, st: &mut State, now: Instant) {
        let Some(h) = st.handoff.as_ref().filter(|h| now > h.deadline) else {
            return;
        };
        let (phase, p) = (h.phase, h.params);
        let target = match phase {
            HandoffPhase::Waiting => {
                self.abort(
                    st,
                    format!("no successor attached within {:?}", p.ready_timeout),
                );
                return;
            }
            HandoffPhase::Preparing => st.successor.as_mut().map(|s| {
                (
                    s,
                    format!("the successor did not send READY within {:?}", p.ready_timeout),
                )
            }),
            HandoffPhase::Quiescing => st.session.as_mut().map(|s| {
                (
                    s,
                    format!(
                        "the daemon did not drain within {:?}; fencing it and replaying its requests",
                        p.drain_timeout
                    ),
                )
            }),
            HandoffPhase::Activating => st.successor.as_mut().map(|s| {
                (
                    s,
                    format!(
                        "the successor did not restore within {:?} of ACTIVATE",
                        p.drain_timeout
                    ),
                )
            }),
            HandoffPhase::Serving => st.session.as_mut().map(|s| {
                (
                    s,
                    format!(
                        "the kernel did not take the successor as its server within {:?} of its RESTORE",
                        p.drain_timeout
                    ),
                )
            }),
        };
        if let Some((s, why)) = target.filter(|(s, _)| s.state != DaemonState::Fencing) {
            warn!(
                "{}: handoff: daemon pid {} (epoch {}) declared lost: {why}",
                self.name,
                s.pidfd.pid(),
                s.epoch
            );
            s.lost_why = Some(why);
            request_fence(s);
        }
    }

    /// Ends the running handoff unsuccessfully: a successor that is still
    /// attached is fenced, and a quiesced daemon is revived.
    fn abort(&self, st: &mut State, reason: String) {
        if let Some(s) = st
            .successor
            .as_mut()
            .filter(|s| s.state != DaemonState::Fencing)
        {
            s.lost_why = Some(format!("handoff aborted: {reason}"));
            request_fence(s);
        }
        if let Some(cur) = st
            .session
            .as_mut()
            .filter(|s| matches!(s.state, DaemonState::Quiescing | DaemonState::Quiesced))
        {
            // It takes its lease back and sends RESTORE; until then its
            // requests wait.
            cur.state = DaemonState::Attached;
            cur.link.notify(Notice::Revive);
            info!(
                "{}: reviving daemon pid {} (epoch {})",
                self.name,
                cur.pidfd.pid(),
                cur.epoch
            );
        }
        self.finish(st, HandoffOutcome::Aborted, reason);
    }

    /// Aborts handoff `id` if it is still waiting for its successor (the
    /// operator gave up, or the successor could not be started).
    pub fn cancel_handoff(&self, id: u64, reason: &str) {
        let mut st = self.state.lock();
        if st
            .handoff
            .as_ref()
            .is_some_and(|h| h.id == id && h.phase == HandoffPhase::Waiting)
        {
            self.abort(&mut st, reason.to_owned());
        }
    }

    /// Records the end of the running handoff and wakes its operator.
    fn finish(&self, st: &mut State, outcome: HandoffOutcome, reason: String) {
        let Some(h) = st.handoff.take() else {
            return;
        };
        let now = Instant::now();
        let mut reason = reason;
        if reason.is_empty() && h.fenced {
            reason = format!(
                "the old daemon was fenced while draining; {} requests replayed",
                h.replayed
            );
        }
        let report = HandoffReport {
            outcome,
            reason,
            from_pid: h.from_pid,
            from_epoch: h.from_epoch,
            to_pid: h.to_pid,
            to_epoch: h.to_epoch,
            warmup_us: micros(
                h.ready_at
                    .zip(h.prepared_at)
                    .map(|(r, p)| r.saturating_duration_since(p)),
            ),
            drain_us: micros(h.drain),
            stall_us: micros(
                since(h.ready_at, now).filter(|_| outcome == HandoffOutcome::Completed),
            ),
            total_us: micros(Some(now.saturating_duration_since(h.started))),
            replayed: h.replayed,
            fenced: h.fenced,
        };
        let line = format!(
            "{}: handoff {} {}: pid {} -> {}, warm-up {} us, drain {} us, stall {} us, {} replayed{}{}",
            self.name,
            h.id,
            outcome.name(),
            report.from_pid,
            report.to_pid,
            report.warmup_us,
            report.drain_us,
            report.stall_us,
            report.replayed,
            if report.reason.is_empty() { "" } else { ": " },
            report.reason
        );
        if outcome == HandoffOutcome::Aborted {
            warn!("{line}");
        } else {
            info!("{line}");
        }
        st.stats.handoffs.count(outcome);
        if outcome == HandoffOutcome::Completed {
            st.stats
                .stall
                .observe(Duration::from_micros(report.stall_us));
        }
        st.last_handoff = Some((h.id, report));
        self.changed.notify_all();
    }

    /// Waits until handoff `id` ends and returns its report; `gone` tells
    /// whether the operator hung up, which cancels a handoff that has no
    /// successor yet.
    pub fn wait_handoff(&self, id: u64, gone: impl Fn() -> bool) -> Option<HandoffReport> {
        loop {
            {
                let mut st = self.state.lock();
                if let Some((done, report)) = &st.last_handoff
                    && *done == id
                {
                    return Some(report.clone());
                }
                if st.handoff.as_ref().is_none_or(|h| h.id != id) {
                    return None;
                }
                let _ = self.changed.wait_for(&mut st, Duration::from_millis(100));
            }
            if gone() {
                self.cancel_handoff(
                    id,
                    "the operator's connection closed before a successor attached",
                );
            }
        }
    }
}

/// The report's reason for a successor the kernel refused as its server.
fn not_served(served: Option<Result<(), String>>) -> String {
    match served {
        Some(Err(e)) => format!("the kernel did not take the successor as its server: {e}"),
        _ => String::new(),
    }
}

fn not_successor(epoch: u64) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::BadState,
        format!("READY is for a preparing handoff successor; epoch {epoch} is not one"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportConfig;

    fn params(dry_run: bool) -> HandoffParams {
        HandoffParams {
            dry_run,
            ready_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(5),
        }
    }

    /// A successor a dry run released whose session ends only after the
    /// next handoff was armed must not abort that handoff (seen once in a
    /// dozen runs of the supervised upgrade test, under load).
    #[test]
    fn released_successor_ending_late_spares_the_next_handoff() {
        let export = Export::new(&ExportConfig {
            name: "vol0".into(),
            kind: holdfast_proto::ExportKind::Volume,
            size: 1 << 20,
            block_size: 512,
            slot_count: 8,
            slot_size: 4096,
            heap_limit: 1 << 20,
            direct: false,
        })
        .unwrap();
        // Every "daemon" here is this test process.
        let me = || Arc::new(Pidfd::open(std::process::id()).unwrap());
        let current = export
            .attach(me(), false, false, Duration::from_secs(1))
            .unwrap();
        export.restore(current.epoch).unwrap();

        export.begin_handoff(params(true)).unwrap();
        let released = export.prepare(me(), false).unwrap();
        export.ready(released.epoch).unwrap();
        assert!(
            export.status("fuse", None).handoff.is_none(),
            "dry run ended"
        );

        export.begin_handoff(params(false)).unwrap();
        export.end_session(released.epoch, false);
        let status = export.status("fuse", None);
        assert!(
            status.handoff.is_some(),
            "the new handoff was aborted: {status:?}"
        );
        assert!(
            status
                .last_handoff
                .is_some_and(|r| r.outcome == HandoffOutcome::DryRun)
        );
    }
}
