//! Minimal logging to stderr: one line per event, with a monotonic time
//! since the broker started, so a journal or a test log shows the order.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Seconds since the first log line.
pub fn uptime() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        eprintln!("[{:10.3}] holdfast-broker: {}", $crate::log::uptime(), format_args!($($arg)*))
    };
}

#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => {
        eprintln!("[{:10.3}] holdfast-broker: warning: {}", $crate::log::uptime(), format_args!($($arg)*))
    };
}
