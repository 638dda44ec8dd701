//! hf-direct: the daemon library's direct mode (`holdfast_daemon::direct`)
//! on FUSE descriptors it inherited from its holder (the test, standing in
//! for the broker), serving a file backend: direct mode's daemon side on
//! a real kernel without a broker (`tests/tests/direct.rs`; the broker's
//! own lending is tested through holdfast-daemon).
//!
//! Usage: hf-direct --fds FD,FD... --size BYTES --max-io BYTES
//!        --started SECS --backend file:PATH
//! Prints `ready`, then its counters as a JSON line whenever they change
//! (so that a SIGKILLed instance has said what it saw); on SIGTERM stops
//! reading, answers what it holds and prints them once more.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use holdfast_daemon::backends::{self, BackendSpec};
use holdfast_daemon::direct::{self, Direct, Meter};
use holdfast_kernel::fuse::Volume;

fn counters(meters: &[Meter]) -> String {
    let c = direct::total(meters);
    format!(
        r#"{{"answered":{},"resent":{},"refused":{}}}"#,
        c.answered, c.resent, c.refused
    )
}

fn run() -> Result<(), String> {
    use lexopt::prelude::*;
    let (mut fds, mut backend) = (Vec::new(), None);
    let (mut size, mut max_io, mut started) = (0u64, 0u32, 0u64);
    let mut p = lexopt::Parser::from_env();
    let text = |p: &mut lexopt::Parser| -> Result<String, String> {
        p.value()
            .map_err(|e| e.to_string())?
            .into_string()
            .map_err(|v| format!("{v:?} is not UTF-8"))
    };
    let num = |t: String| t.parse::<u64>().map_err(|e| format!("{t}: {e}"));
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("fds") => {
                for f in text(&mut p)?.split(',') {
                    fds.push(f.parse::<i32>().map_err(|e| format!("{f}: {e}"))?);
                }
            }
            Long("size") => size = num(text(&mut p)?)?,
            Long("max-io") => {
                max_io = u32::try_from(num(text(&mut p)?)?).map_err(|e| e.to_string())?;
            }
            Long("started") => started = num(text(&mut p)?)?,
            Long("backend") => backend = Some(text(&mut p)?.parse::<BackendSpec>()?),
            other => return Err(other.unexpected().to_string()),
        }
    }
    let Some(BackendSpec::File(path)) = backend else {
        return Err("--backend file:PATH is required".into());
    };
    if fds.is_empty() || size == 0 || max_io == 0 {
        return Err("--fds, --size and --max-io are required".into());
    }
    let backend = backends::file::open(&path, size).map_err(|e| e.to_string())?;
    // SAFETY: the holder passed these descriptors open, for us alone.
    let devs = fds
        .iter()
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    let signals = [libc::SIGTERM, libc::SIGINT];
    holdfast_broker::sys::block_signals(&signals).map_err(|e| e.to_string())?;
    let max_background = 64;
    let volume = Volume::new(size, max_io, max_background, started);
    let direct = Direct::start(
        devs,
        volume,
        max_io,
        Arc::new(backend),
        Duration::ZERO,
        Vec::new(),
    )
    .map_err(|e| e.to_string())?;
    println!("ready");
    let mut said = String::new();
    while holdfast_broker::sys::wait_signal(&signals, Duration::from_millis(10)).is_none() {
        let now = counters(&direct.meters());
        if now != said {
            println!("{now}");
            said = now;
        }
    }
    let meters = direct.meters();
    if direct.stop().len() != fds.len() {
        return Err("a reader did not finish".into());
    }
    println!("{}", counters(&meters));
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hf-direct: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
