//! Direct mode's side of an export: lending the frontend's queue to a
//! daemon that reads it itself, handing it over at RESTORE and taking it
//! back when the daemon is gone (kmod-notes/fuse.md, "Direct mode"), and
//! what such a daemon publishes of its progress.

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use holdfast_proto::{DaemonState, DirectTerms, ErrorCode, ErrorReply, Mode};

use super::{Export, Session, State, Stats, update_waiting};
use crate::frontends::Serving;
use crate::{info, warn};

impl Stats {
    /// Counts what a direct-mode daemon whose session ends did.
    pub(super) fn retire(&mut self, s: &Session) {
        if s.mode == Mode::Direct {
            let p = s.progress();
            self.completed = self.completed.saturating_add(p.answered);
            self.rejected = self.rejected.saturating_add(p.refused);
        }
    }
}

/// A direct-mode daemon's progress (`Session::progress`).
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Progress {
    pub(super) busy: u64,
    pub(super) oldest: u64,
    pub(super) answered: u64,
    pub(super) refused: u64,
}

impl Session {
    /// How long a direct-mode daemon has kept a request: the oldest one a
    /// reader holds, or, while the kernel waits on `waiting` requests, how
    /// long it has answered none (a daemon that stopped reading holds
    /// nothing).
    pub(super) fn direct_age(
        &mut self,
        now: Instant,
        mono_ns: u64,
        waiting: Option<u64>,
    ) -> Option<Duration> {
        let p = self.progress();
        let held = (p.oldest != 0).then(|| Duration::from_nanos(mono_ns.saturating_sub(p.oldest)));
        let idle = waiting.is_some_and(|w| w == 0);
        match self.watch {
            Some((answered, _)) if answered == p.answered && !idle => {}
            _ => self.watch = Some((p.answered, now)),
        }
        let stalled = self
            .watch
            .filter(|_| waiting.is_some_and(|w| w > 0))
            .map(|(_, since)| now.saturating_duration_since(since));
        held.max(stalled)
    }

    /// Direct mode: what the daemon's readers published, summed; `busy` is
    /// how many hold a request and `oldest` the earliest time one took its
    /// request (CLOCK_MONOTONIC ns, 0 for none). Untrusted: status figures,
    /// and an age that can only have the daemon declared lost sooner.
    pub(super) fn progress(&self) -> Progress {
        let mut p = Progress::default();
        for r in (0..self.meters).filter_map(|i| self.rings.reader_progress(i)) {
            if r.busy_since_ns != 0 {
                p.busy = p.busy.saturating_add(1);
                p.oldest = match p.oldest {
                    0 => r.busy_since_ns,
                    o => o.min(r.busy_since_ns),
                };
            }
            p.answered = p.answered.saturating_add(r.answered);
            p.refused = p.refused.saturating_add(r.refused);
        }
        p
    }
}

impl Export {
    /// Direct mode's terms and descriptors for a daemon that joins, if it
    /// `can` serve in direct mode; None where it gets relay mode (the
    /// export does not allow direct mode, or its frontend cannot lend its
    /// queue now). Refused where the frontend has no relay mode (ublk in
    /// direct mode) and the daemon cannot, or the queue cannot be lent.
    pub(super) fn lend(
        &self,
        can: bool,
    ) -> Result<Option<(DirectTerms, Vec<OwnedFd>)>, ErrorReply> {
        let Some(lender) = self.lender().filter(|_| self.direct) else {
            return Ok(None);
        };
        let only = lender.direct_only();
        if !can && only {
            return Err(ErrorReply::new(
                ErrorCode::BadState,
                format!(
                    "export {} is served in direct mode only (the broker does not read its \
                     queue); start the daemon without --relay",
                    self.name
                ),
            ));
        }
        if !can {
            return Ok(None);
        }
        let terms = match lender.terms() {
            Ok(t) => t,
            Err(why) if only => {
                return Err(ErrorReply::new(
                    ErrorCode::BadState,
                    format!("export {}: its queue cannot be lent: {why}", self.name),
                ));
            }
            Err(why) => {
                info!("{}: serving in relay mode: {why}", self.name);
                return Ok(None);
            }
        };
        let fds = lender.lend().map_err(|e| {
            ErrorReply::new(
                ErrorCode::Internal,
                format!("export {}: cannot lend its queue: {e}", self.name),
            )
        })?;
        Ok(Some((terms, fds)))
    }

    /// RESTORE of a direct-mode daemon (`epoch`, or whichever is attached):
    /// hands it the queue (`take_queue`), then, if it is to start serving
    /// (attached, revived or an activated successor; not one that serves
    /// already), has the frontend tell the kernel (`Lender::serve_by`).
    /// Returns the replays the kernel re-sent, and when the daemon serves.
    pub(super) fn hand_over(&self, epoch: Option<u64>) -> Result<(u32, Serving), ErrorReply> {
        let resent = self.take_queue(epoch)?;
        let server = {
            let st = self.state.lock();
            let s = match epoch {
                Some(e) => st.daemon(e),
                None => st.session.as_ref(),
            };
            s.filter(|s| s.mode == Mode::Direct)
                .filter(|s| matches!(s.state, DaemonState::Attached | DaemonState::Activating))
                .map(|s| s.pidfd.pid())
        };
        let Some((pid, lender)) = server.zip(self.lender()) else {
            return Ok((resent, Serving::Now));
        };
        let serving = lender.serve_by(pid).map_err(|e| {
            ErrorReply::new(
                ErrorCode::Internal,
                format!(
                    "export {}: cannot give its queue to pid {pid}: {e}",
                    self.name
                ),
            )
        })?;
        Ok((resent, serving))
    }

    /// A direct-mode daemon that is still to get the queue (`epoch`, or
    /// whichever is attached): parks the frontend's readers,
    /// has the kernel re-send what they read, and forgets it here, so that
    /// the daemon gets it. Returns how many of those a lost daemon had had
    /// (replays). Called with `custody` held, without `state`: a parking
    /// reader may be submitting.
    fn take_queue(&self, epoch: Option<u64>) -> Result<u32, ErrorReply> {
        {
            let mut st = self.state.lock();
            // The attached daemon, or an activated handoff successor (whose
            // predecessor, if direct, had the queue: then lending goes on).
            let attached = st
                .session
                .as_ref()
                .filter(|s| s.state == DaemonState::Attached);
            let successor = st
                .successor
                .as_ref()
                .filter(|s| s.state == DaemonState::Activating);
            let due = attached
                .or(successor)
                .is_some_and(|s| s.mode == Mode::Direct && epoch.is_none_or(|e| e == s.epoch));
            if !due || st.lending {
                return Ok(0);
            }
            st.lending = true;
            // A reader waiting for heap room goes on to park.
            self.changed.notify_all();
        }
        let lender = self.lender();
        let parked = lender.as_ref().map_or_else(
            || Err(io::Error::other("the frontend is gone")),
            |l| l.park(),
        );
        let resent = parked.and_then(|()| lender.as_ref().map_or(Ok(()), |l| l.resend()));
        let mut st = self.state.lock();
        if let Err(e) = resent {
            // Nothing was re-sent (a reader did not park), or the
            // connection is gone: the readers keep what they read.
            st.lending = false;
            drop(st);
            if let Some(l) = lender {
                l.unpark();
            }
            return Err(ErrorReply::new(
                ErrorCode::Internal,
                format!(
                    "export {}: cannot hand the FUSE connection to the daemon: {e}",
                    self.name
                ),
            ));
        }
        // The kernel re-sends each of these with a new unique: a reply to
        // the old one would be refused, so none is sent. Those the kernel
        // had re-sent already were a lost daemon's: replayed.
        let forgotten = st.inflight.take_queued();
        let resent = lender.map_or(0, |l| {
            forgotten
                .iter()
                .filter(|f| l.is_resent(f.origin.tag))
                .count()
        });
        st.stats.replayed = st.stats.replayed.saturating_add(resent as u64);
        update_waiting(&mut st);
        self.changed.notify_all();
        Ok(u32::try_from(resent).unwrap_or(u32::MAX))
    }

    /// Ends lending where the export's daemon does not read the queue
    /// (any more): a RESTORE that did not go through after `hand_over`, or
    /// a relay successor after a direct daemon.
    pub(super) fn settle_lending(&self, st: &mut State) {
        let reads = st
            .session
            .as_ref()
            .is_some_and(|s| s.mode == Mode::Direct && s.state != DaemonState::Attached);
        if !reads {
            self.take_back(st);
        }
    }

    /// Waits, until `deadline`, for a released direct-mode daemon to give
    /// the kernel's queue back (its session ended: it stopped reading, or
    /// it was fenced). Whether it did.
    pub fn wait_taken_back(&self, deadline: Instant) -> bool {
        let mut st = self.state.lock();
        while st.lending {
            if self.changed.wait_until(&mut st, deadline).timed_out() {
                return !st.lending;
            }
        }
        true
    }

    /// Ends direct mode's lending: the kernel re-sends what the daemon
    /// (gone or stopped) read and did not answer, the frontend's readers
    /// read again, and the next daemon gets it. The lent descriptors are
    /// closed by the caller afterwards, with nothing left on them.
    pub(super) fn take_back(&self, st: &mut State) {
        if !std::mem::take(&mut st.lending) {
            return;
        }
        let Some(lender) = self.lender() else { return };
        if let Err(e) = lender.resend() {
            warn!(
                "{}: FUSE_NOTIFY_RESEND failed ({e}): what the daemon held is not re-sent",
                self.name
            );
        }
        lender.unpark();
    }
}
