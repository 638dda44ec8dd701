//! Planned handoff: the messages' payloads and the figures a handoff reports.
//!
//! The steps (kmod-notes/handoff.md has the whole state machine):
//! the operator sends HANDOFF; a successor daemon sends PREPARE (it attaches
//! without the lease and warms up) and then READY; the broker stops
//! dispatching to the current daemon and sends it QUIESCE; that daemon
//! finishes its requests, gives up its lease and sends QUIESCED; the broker
//! sends ACTIVATE to the successor, which takes the lease and sends RESTORE;
//! the broker dispatches to it and sends DETACHED to the old daemon, which
//! exits. A failure before the successor's RESTORE sends REVIVE to the old
//! daemon instead: it takes its lease back and sends RESTORE.

use crate::wire::{DecodeError, Reader, Writer};
use crate::{MAX_NAME_LEN, MAX_TEXT_LEN};

/// Longest reason text in a handoff report, in bytes (bounds STATUS).
pub const MAX_REASON_LEN: usize = 200;

/// HANDOFF: the operator's (or a supervised daemon's) request to replace
/// an export's daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffRequest {
    pub export: String,
    /// Warm a successor up, then release it; the current daemon keeps
    /// serving throughout.
    pub dry_run: bool,
    /// The broker starts the successor itself with the command line it
    /// supervises the current daemon with (`holdfastctl upgrade`, SIGHUP).
    pub spawn: bool,
    /// How long the successor has to attach and send READY, in ms; 0 for
    /// the broker's default.
    pub ready_timeout_ms: u32,
    /// How long the old daemon has to drain (and the successor to restore
    /// after ACTIVATE), in ms; 0 for the broker's default.
    pub drain_timeout_ms: u32,
    /// With `spawn`: the command line to start the successor from instead,
    /// supervised from then on if the handoff completes (empty: the
    /// supervised one), at most [`MAX_TEXT_LEN`] bytes.
    pub cmd: String,
}

impl HandoffRequest {
    pub(crate) fn put(&self, w: &mut Writer) {
        w.str(&self.export, MAX_NAME_LEN)
            .bool(self.dry_run)
            .bool(self.spawn)
            .u32(self.ready_timeout_ms)
            .u32(self.drain_timeout_ms)
            .str(&self.cmd, MAX_TEXT_LEN);
    }

    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            export: r.str("handoff.export", MAX_NAME_LEN)?,
            dry_run: r.bool("handoff.dry_run")?,
            spawn: r.bool("handoff.spawn")?,
            ready_timeout_ms: r.u32("handoff.ready_timeout_ms")?,
            drain_timeout_ms: r.u32("handoff.drain_timeout_ms")?,
            cmd: r.str("handoff.cmd", MAX_TEXT_LEN)?,
        })
    }
}

/// Where a running handoff is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HandoffPhase {
    /// Waiting for a successor to send PREPARE.
    Waiting = 1,
    /// The successor is warming up; the current daemon serves.
    Preparing = 2,
    /// Dispatch is stopped; the old daemon is draining.
    Quiescing = 3,
    /// The successor was sent ACTIVATE and is taking the lease.
    Activating = 4,
    /// The successor restored; the kernel is yet to take it as the queue's
    /// server (ublk in direct mode: END_USER_RECOVERY).
    Serving = 5,
}

impl HandoffPhase {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Waiting,
            2 => Self::Preparing,
            3 => Self::Quiescing,
            4 => Self::Activating,
            5 => Self::Serving,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Preparing => "preparing",
            Self::Quiescing => "quiescing",
            Self::Activating => "activating",
            Self::Serving => "serving",
        }
    }
}

/// A running handoff, as STATUS shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct HandoffProgress {
    pub phase: HandoffPhase,
    pub dry_run: bool,
    /// Since the HANDOFF request, in ms.
    pub elapsed_ms: u64,
}

impl HandoffProgress {
    pub(crate) fn put(&self, w: &mut Writer) {
        w.u8(self.phase as u8)
            .bool(self.dry_run)
            .u64(self.elapsed_ms);
    }

    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let phase = r.u8("handoff.phase")?;
        Ok(Self {
            phase: HandoffPhase::from_u8(phase).ok_or(DecodeError::BadValue {
                field: "handoff.phase",
                value: u64::from(phase),
            })?,
            dry_run: r.bool("handoff.dry_run")?,
            elapsed_ms: r.u64("handoff.elapsed_ms")?,
        })
    }
}

/// How a handoff ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum HandoffOutcome {
    /// The successor serves; the old daemon was released.
    Completed = 1,
    /// A dry run: the successor warmed up and was released.
    DryRun = 2,
    /// Something failed before the successor restored; the old daemon
    /// serves (revived if it had been quiesced).
    Aborted = 3,
}

impl HandoffOutcome {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Completed,
            2 => Self::DryRun,
            3 => Self::Aborted,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::DryRun => "dry-run",
            Self::Aborted => "aborted",
        }
    }
}

/// The figures of a finished handoff. Durations are in microseconds; a
/// step that did not happen is 0.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct HandoffReport {
    pub outcome: HandoffOutcome,
    /// Why it was aborted, or what was notable (the old daemon fenced).
    pub reason: String,
    pub from_pid: u32,
    pub from_epoch: u64,
    /// The successor (0 if none attached).
    pub to_pid: u32,
    pub to_epoch: u64,
    /// The successor's PREPARE to READY.
    pub warmup_us: u64,
    /// QUIESCE to QUIESCED (or to the old daemon gone, when fenced).
    pub drain_us: u64,
    /// No dispatch: READY to the successor's RESTORE.
    pub stall_us: u64,
    /// HANDOFF to the end.
    pub total_us: u64,
    /// Requests the old daemon held that were replayed to the successor
    /// (it was fenced or crashed while draining).
    pub replayed: u32,
    /// Whether the old daemon was fenced (the drain bound passed, or it
    /// died while draining).
    pub fenced: bool,
}

impl HandoffReport {
    pub(crate) fn put(&self, w: &mut Writer) {
        w.u8(self.outcome as u8)
            .str(&self.reason, MAX_REASON_LEN)
            .u32(self.from_pid)
            .u64(self.from_epoch)
            .u32(self.to_pid)
            .u64(self.to_epoch)
            .u64(self.warmup_us)
            .u64(self.drain_us)
            .u64(self.stall_us)
            .u64(self.total_us)
            .u32(self.replayed)
            .bool(self.fenced);
    }

    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let outcome = r.u8("report.outcome")?;
        Ok(Self {
            outcome: HandoffOutcome::from_u8(outcome).ok_or(DecodeError::BadValue {
                field: "report.outcome",
                value: u64::from(outcome),
            })?,
            reason: r.str("report.reason", MAX_REASON_LEN)?,
            from_pid: r.u32("report.from_pid")?,
            from_epoch: r.u64("report.from_epoch")?,
            to_pid: r.u32("report.to_pid")?,
            to_epoch: r.u64("report.to_epoch")?,
            warmup_us: r.u64("report.warmup_us")?,
            drain_us: r.u64("report.drain_us")?,
            stall_us: r.u64("report.stall_us")?,
            total_us: r.u64("report.total_us")?,
            replayed: r.u32("report.replayed")?,
            fenced: r.bool("report.fenced")?,
        })
    }
}
