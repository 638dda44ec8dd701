//! The broker's own upgrade: BROKER_UPGRADE from the operator, answered
//! BROKER_UPGRADED by the new broker once every daemon is back (the old one
//! passes the operator's connection on across its `execve`).

use crate::wire::{DecodeError, Reader, Writer};
use crate::{MAX_EXPORTS, MAX_NAME_LEN};

/// Longest version text in a report, in bytes.
pub const MAX_VERSION_LEN: usize = 64;

/// What a broker upgrade did. Durations are in microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct UpgradeReport {
    pub old_pid: u32,
    pub new_pid: u32,
    pub old_version: String,
    pub new_version: String,
    /// No dispatch: from the old broker's last moment to the new broker
    /// dispatching to every daemon that was serving before (or to the
    /// report's bound, when some are `missing`).
    pub stall_us: u64,
    /// FUSE requests the kernel re-sent (FUSE_NOTIFY_RESEND) because the
    /// old broker had read them and not answered.
    pub resent: u64,
    /// Daemons that attached to the new broker and restored.
    pub reattached: u32,
    /// Exports whose daemon had not come back when the report was made.
    pub missing: Vec<String>,
}

impl UpgradeReport {
    pub(crate) fn put(&self, w: &mut Writer) {
        w.u32(self.old_pid)
            .u32(self.new_pid)
            .str(&self.old_version, MAX_VERSION_LEN)
            .str(&self.new_version, MAX_VERSION_LEN)
            .u64(self.stall_us)
            .u64(self.resent)
            .u32(self.reattached);
        let n = self.missing.len().min(MAX_EXPORTS);
        w.u32(u32::try_from(n).unwrap_or(0));
        for m in self.missing.iter().take(n) {
            w.str(m, MAX_NAME_LEN);
        }
    }

    pub(crate) fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut report = Self {
            old_pid: r.u32("upgrade.old_pid")?,
            new_pid: r.u32("upgrade.new_pid")?,
            old_version: r.str("upgrade.old_version", MAX_VERSION_LEN)?,
            new_version: r.str("upgrade.new_version", MAX_VERSION_LEN)?,
            stall_us: r.u64("upgrade.stall_us")?,
            resent: r.u64("upgrade.resent")?,
            reattached: r.u32("upgrade.reattached")?,
            missing: Vec::new(),
        };
        let n = r.count("upgrade.missing", MAX_EXPORTS)?;
        for _ in 0..n {
            report.missing.push(r.str("upgrade.missing", MAX_NAME_LEN)?);
        }
        Ok(report)
    }
}
