//! `--supervise CMD`: run a daemon command line and run it again whenever it
//! exits: at once if it had got as far as RESTORE (it was healthy and was
//! killed or crashed while serving), with a growing back-off if it keeps
//! failing before that (a bad command line, a missing backend).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::sys::pidfd::Pidfd;
use crate::{info, warn};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Tells whether a daemon pid got as far as RESTORE.
pub type Healthy = Box<dyn Fn(u32) -> bool + Send>;

pub struct Supervisor {
    stop: Arc<AtomicBool>,
    child: Arc<Mutex<Option<Pidfd>>>,
    thread: Option<JoinHandle<()>>,
}

impl Supervisor {
    /// Starts supervising `cmd`, run as `/bin/sh -c "exec CMD"` so that the
    /// daemon itself is the supervised child.
    pub fn start(cmd: String, healthy: Healthy) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let child = Arc::new(Mutex::new(None));
        let thread = {
            let stop = stop.clone();
            let child = child.clone();
            std::thread::Builder::new()
                .name("holdfast-supervise".into())
                .spawn(move || run(&cmd, &stop, &child, &healthy))?
        };
        Ok(Self {
            stop,
            child,
            thread: Some(thread),
        })
    }

    /// Stops restarting; asks the daemon to detach (SIGTERM), and kills it
    /// if it has not exited within `grace`.
    pub fn shutdown(mut self, grace: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(p) = self.child.lock().as_ref() {
            let _ = p.signal(rustix::process::Signal::TERM);
            if !p.wait_gone(grace) {
                let _ = p.kill();
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(cmd: &str, stop: &AtomicBool, current: &Mutex<Option<Pidfd>>, healthy: &Healthy) {
    let mut backoff = MIN_BACKOFF;
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        let spawned = Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("exec {cmd}"))
            .stdin(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                warn!("supervise: cannot start {cmd:?}: {e}");
                sleep_unless_stopped(backoff, stop);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        // The child is not reaped until wait() below, so its pid is ours.
        *current.lock() = Pidfd::open(child.id()).ok();
        info!("supervise: started daemon pid {}: {cmd}", child.id());
        let status = child.wait();
        *current.lock() = None;
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let ran = started.elapsed();
        backoff = if healthy(child.id()) {
            MIN_BACKOFF
        } else {
            (backoff * 2).min(MAX_BACKOFF)
        };
        match status {
            Ok(s) => info!(
                "supervise: daemon pid {} exited ({s}) after {:.1}s; restarting in {backoff:?}",
                child.id(),
                ran.as_secs_f64()
            ),
            Err(e) => warn!("supervise: waiting for the daemon failed: {e}"),
        }
        sleep_unless_stopped(backoff, stop);
    }
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}
