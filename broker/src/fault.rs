//! Fault points for the tests: `HOLDFAST_FAULT=POINT` in a debug build's
//! environment makes the broker fail at POINT the way a crash or a kernel
//! refusal would, where no signal could be timed to land (between two
//! ioctls). A release build has none: `at` is false without looking.

/// Whether the test asked for a fault at `point`.
pub fn at(point: &str) -> bool {
    cfg!(debug_assertions) && std::env::var_os("HOLDFAST_FAULT").is_some_and(|v| v == point)
}

/// Ends the process at `point` if asked, as a crash would: no unwinding,
/// no cleanup, every descriptor closed by the kernel.
pub fn crash_at(point: &str) {
    if at(point) {
        crate::warn!("fault point {point}: the broker dies here (HOLDFAST_FAULT)");
        std::process::exit(86);
    }
}
