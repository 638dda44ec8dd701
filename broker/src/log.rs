//! Minimal logging to stderr: one line per event, with a monotonic time
//! since the broker started, so a journal or a test log shows the order.
//! When stderr is the journal's stream (systemd sets `JOURNAL_STREAM`,
//! systemd.exec(5)), each line begins with its syslog priority (`<6>`
//! info, `<4>` warning, `<3>` error), which journald takes as the entry's
//! priority (`SyslogLevelPrefix=`, on by default): `journalctl -p warning`
//! then shows the warnings alone.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();
static JOURNAL: OnceLock<bool> = OnceLock::new();

/// syslog(3) priorities.
pub const ERR: u8 = 3;
pub const WARNING: u8 = 4;
pub const INFO: u8 = 6;

/// Seconds since the first log line.
pub fn uptime() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

/// The prefix of a line of `priority`: `<N>` for the journal, else none.
pub fn prefix(priority: u8) -> &'static str {
    if !*JOURNAL.get_or_init(stderr_is_journal) {
        return "";
    }
    match priority {
        ERR => "<3>",
        WARNING => "<4>",
        _ => "<6>",
    }
}

/// Whether fd 2 is the stream `JOURNAL_STREAM` names: a daemon whose stderr
/// was redirected elsewhere inherits the variable, and must not prefix.
fn stderr_is_journal() -> bool {
    let Some(named) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    names(&named.to_string_lossy(), st.st_dev, st.st_ino)
}

/// Whether `DEV:INODE` (decimal, as systemd writes it) is `dev`, `ino`.
fn names(stream: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = stream.split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        eprintln!(
            "{}[{:10.3}] holdfast-broker: {}",
            $crate::log::prefix($crate::log::INFO),
            $crate::log::uptime(),
            format_args!($($arg)*)
        )
    };
}

#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => {
        eprintln!(
            "{}[{:10.3}] holdfast-broker: warning: {}",
            $crate::log::prefix($crate::log::WARNING),
            $crate::log::uptime(),
            format_args!($($arg)*)
        )
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn journal_stream_names_a_device_and_inode() {
        assert!(super::names("8:1234", 8, 1234));
        for other in [
            "8:1235", "9:1234", "8", "8:", ":1234", "8:1234:1", "x:1234", "",
        ] {
            assert!(!super::names(other, 8, 1234), "{other:?}");
        }
    }
}
