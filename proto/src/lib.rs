//! The holdfast wire contract, shared by the broker, the daemon library and any
//! third-party daemon: control messages on the broker's Unix socket, and the
//! layout of the shared memory (rings and slot buffers) a daemon maps.
//!
//! This crate does no I/O. Every decoder checks lengths and values and returns
//! a typed error; nothing here can panic on input.
#![cfg_attr(
    not(test),
    deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)
)]

pub mod control;
pub mod error;
pub mod handoff;
pub mod report;
pub mod shm;
pub mod upgrade;
pub mod wire;

pub use control::{
    Attach, Attached, DaemonState, DaemonStatus, DirectTerms, ExportAdd, ExportKind, ExportStatus,
    FuseTerms, Hello, MAX_DIRECT_CONNS, METRICS_CHUNK, Mode, Reply, Request, STATUS_BATCH,
    SupervisorStatus, UblkTerms,
};
pub use error::{ErrorCode, ErrorReply};
pub use handoff::{HandoffOutcome, HandoffPhase, HandoffProgress, HandoffReport, HandoffRequest};
pub use report::{Figure, FigureKind, Figures};
pub use upgrade::UpgradeReport;
pub use wire::DecodeError;

use std::time::Duration;

/// JSON (`holdfastctl ... --json`) spells an enum the way logs and tables
/// do: its `name()`.
#[cfg(feature = "serde")]
mod serde_names {
    macro_rules! by_name {
        ($($t:ty),*) => {$(
            impl serde::Serialize for $t {
                fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                    s.serialize_str(self.name())
                }
            }
        )*};
    }
    by_name!(
        crate::Mode,
        crate::DaemonState,
        crate::HandoffPhase,
        crate::HandoffOutcome
    );
}

/// The control protocol version this crate speaks. A broker answers a HELLO
/// with another version with [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u16 = 5;

/// Environment variable naming the broker's control socket, read by
/// `holdfast-daemon` and `holdfastctl` when `--socket` is not given.
pub const SOCKET_ENV: &str = "HOLDFAST_SOCKET";

/// Environment variable that makes `holdfast-daemon` join a handoff as the
/// successor (`=1`), set by `holdfastctl handoff --exec` and the broker's
/// supervisor.
pub const SUCCESSOR_ENV: &str = "HOLDFAST_SUCCESSOR";

/// Largest control message either side sends or accepts, in bytes. A
/// STATUS_OK of [`STATUS_BATCH`] exports fits.
pub const MAX_MESSAGE_LEN: usize = 128 * 1024;

/// Most exports one broker serves; bounds the status reply.
pub const MAX_EXPORTS: usize = 256;

/// Longest export or fd-store name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Longest device path in a status (`/dev/loop7`, `/dev/ublkb0`), in bytes.
pub const MAX_DEVICE_LEN: usize = 32;

/// Longest human-readable text (error messages, frontend names), in bytes.
pub const MAX_TEXT_LEN: usize = 1024;

/// Capability bits exchanged in HELLO.
pub mod caps {
    /// The peer understands ATTACH with `takeover`.
    pub const TAKEOVER: u64 = 1 << 0;
    /// The peer uses the broker's fd store.
    pub const FDSTORE: u64 = 1 << 1;
    /// The peer speaks the planned-handoff messages.
    pub const HANDOFF: u64 = 1 << 2;
    /// The peer takes REPORT ([`crate::report`]): a daemon sends it only
    /// to a broker that announced this.
    pub const REPORT: u64 = 1 << 3;
    /// Everything this version of the crate knows.
    pub const ALL: u64 = TAKEOVER | FDSTORE | HANDOFF | REPORT;
}

/// Checks an export or fd-store name: 1 to [`MAX_NAME_LEN`] bytes of
/// `[A-Za-z0-9._-]`, not `.` or `..`. Names become file names under the
/// mount point, so nothing else is accepted.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name {name:?} must be 1 to {MAX_NAME_LEN} bytes long"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("name {name:?} is reserved"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "name {name:?} contains {c:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("vol0").is_ok());
        assert!(validate_name("a.b-c_d").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("..").is_err());
        assert!(validate_name("a/b").is_err());
        assert!(validate_name(&"x".repeat(MAX_NAME_LEN + 1)).is_err());
    }
}

/// Parses a duration bound: seconds (`30`, `2.5`), or with a unit (`500ms`,
/// `30s`, `5m`); `0`, `off` or `forever` mean no bound.
pub fn parse_bound(s: &str) -> Result<Option<Duration>, String> {
    let t = s.trim();
    if matches!(t, "0" | "off" | "forever" | "none") {
        return Ok(None);
    }
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (examples: 30, 500ms, 5m, forever)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    const MAX: Duration = Duration::from_secs(365 * 86_400);
    match Duration::try_from_secs_f64(v * scale) {
        Ok(d) if d <= MAX => Ok((!d.is_zero()).then_some(d)),
        _ => Err(format!("{s:?} is too large (at most a year; use forever)")),
    }
}

/// Parses a duration that must be given: like [`parse_bound`], but `0`
/// and `forever` are refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    parse_bound(s)?
        .ok_or_else(|| format!("{s:?}: give a positive duration (examples: 30s, 500ms, 2m)"))
}

/// Parses a size: a number with an optional binary suffix (K, M, G, T, with
/// or without "iB"/"B"); `256MiB`, `1G`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 4096, 256MiB, 1G)"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown size suffix {suffix:?} (use K, M, G or T)"
            ));
        }
    };
    n.checked_mul(1u64 << shift)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?} is zero or too large"))
}

#[cfg(test)]
mod size_tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2tb"), Ok(2 << 40));
        assert!(parse_size("").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
