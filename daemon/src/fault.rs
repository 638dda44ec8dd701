//! Fault injection for the handoff tests: with `HOLDFAST_FAULT=POINT` the
//! daemon SIGKILLs itself at that point of a handoff. It acts only in builds
//! with the `fault-injection` cargo feature, which the tests turn on (as a
//! dev-dependency feature, so `cargo build --release` leaves it out); other
//! builds ignore the variable, and say so.

/// The environment variable naming the point.
pub const ENV: &str = "HOLDFAST_FAULT";

/// Where a daemon can be made to crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// A successor, right after ATTACHED (before READY).
    SuccessorAfterPrepare,
    /// A successor, right after sending READY.
    SuccessorAfterReady,
    /// A successor, right after ACTIVATE (before it takes the lease).
    SuccessorAfterActivate,
    /// The old daemon, on QUIESCE, with its requests still in flight.
    PredecessorDuringQuiesce,
    /// Direct mode on ublk: a write has reached the backend and is not
    /// committed to the kernel yet (the next server gets it again).
    UblkWriteBeforeCommit,
}

impl Point {
    pub const ALL: [Self; 5] = [
        Self::SuccessorAfterPrepare,
        Self::SuccessorAfterReady,
        Self::SuccessorAfterActivate,
        Self::PredecessorDuringQuiesce,
        Self::UblkWriteBeforeCommit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::SuccessorAfterPrepare => "successor-after-prepare",
            Self::SuccessorAfterReady => "successor-after-ready",
            Self::SuccessorAfterActivate => "successor-after-activate",
            Self::PredecessorDuringQuiesce => "predecessor-during-quiesce",
            Self::UblkWriteBeforeCommit => "ublk-write-before-commit",
        }
    }
}

/// Checks `HOLDFAST_FAULT` at start-up: an unknown point is an error.
pub fn check_env() -> Result<(), String> {
    let Some(v) = std::env::var_os(ENV) else {
        return Ok(());
    };
    let v = v.to_string_lossy();
    if !Point::ALL.iter().any(|p| p.name() == v) {
        let names: Vec<&str> = Point::ALL.iter().map(|p| p.name()).collect();
        return Err(format!("{ENV}={v}: expected one of {}", names.join(", ")));
    }
    if !cfg!(feature = "fault-injection") {
        crate::log(&format!(
            "{ENV} is ignored: this build has no fault injection (cargo feature fault-injection)"
        ));
    }
    Ok(())
}

/// Crashes here if `HOLDFAST_FAULT` names `point` (and it is compiled in).
pub fn inject(point: Point) {
    if cfg!(feature = "fault-injection") && std::env::var_os(ENV).is_some_and(|v| v == point.name())
    {
        crate::log(&format!("fault injection: crashing at {}", point.name()));
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}
