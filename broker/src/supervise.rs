//! `--supervise CMD`: run a daemon command line and run it again whenever it
//! exits: at once if it had got as far as RESTORE and served for a while
//! (it was healthy and was killed or crashed while serving), with a
//! growing back-off if it keeps failing before that (a bad command line, a
//! missing backend) or soon after (a crash on a request it is replayed).
//!
//! For a handoff (`holdfastctl upgrade`, SIGHUP to the daemon) the
//! supervisor starts the same command line as a successor; when the old
//! daemon exits, the successor becomes the supervised daemon instead of a
//! restart.
//!
//! A daemon that serves the supervised daemon's export by other means (a
//! `holdfastctl handoff --exec` successor, one started by hand) is left to
//! serve: the supervisor waits while the export has a daemon and starts
//! its command again once it has none; once the export is removed, it
//! stops.
//!
//! A supervised daemon outlives its broker: across an upgrade (the same
//! process, re-executed: the daemon is still its child) and across a crash
//! (the daemon is re-parented), the next broker supervises it again from
//! its pid and start time (`adopt`), and the daemon reconnects.

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use holdfast_proto::{SUCCESSOR_ENV, SupervisorStatus};
use parking_lot::Mutex;
use rustix::process::Signal;

use crate::sys::{self, pidfd::Pidfd};
use crate::{info, warn};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A daemon that restored and ran this long was healthy: the next start
/// after it exits waits no more than MIN_BACKOFF.
const STABLE: Duration = Duration::from_secs(10);
/// How often the supervisor looks at successors and the stop flag.
const TICK: Duration = Duration::from_millis(100);

/// What the supervisor asks the broker.
pub struct Hooks {
    /// Whether daemon `pid` got as far as RESTORE.
    pub healthy: Box<dyn Fn(u32) -> bool + Send + Sync>,
    /// The export daemon `pid` restored, if it did.
    pub export_of: Box<dyn Fn(u32) -> Option<String> + Send + Sync>,
    /// An export's daemon.
    pub daemon_of: Box<dyn Fn(&str) -> ExportDaemon + Send + Sync>,
    /// The supervised command line changed from the first to the second
    /// (`holdfastctl upgrade EXPORT --cmd`): keep it.
    pub changed: CommandChanged,
}

/// Called with the old and the new supervised command line.
pub type CommandChanged = Box<dyn Fn(&str, &str) + Send + Sync>;

/// An export's daemon, as the broker knows it.
pub enum ExportDaemon {
    /// There is no such export (any more).
    Removed,
    None,
    Pid(u32),
}

impl Hooks {
    /// The hooks answered by `broker`.
    pub fn of(broker: &Arc<crate::Broker>) -> Self {
        let (a, b, c, d) = (
            broker.clone(),
            broker.clone(),
            broker.clone(),
            broker.clone(),
        );
        Self {
            healthy: Box::new(move |pid| a.restored(pid)),
            export_of: Box::new(move |pid| b.export_of(pid)),
            daemon_of: Box::new(move |name| c.daemon_of(name)),
            changed: Box::new(move |old, new| d.supervised_command_changed(old, new)),
        }
    }
}

/// A daemon command line run as `/bin/sh -c "exec CMD"` (so the daemon is
/// the child itself), with stdin closed; as a handoff successor, with
/// `HOLDFAST_SUCCESSOR=1` in its environment.
pub fn shell(cmd: &str, successor: bool) -> Command {
    let mut c = Command::new("/bin/sh");
    c.arg("-c").arg(format!("exec {cmd}")).stdin(Stdio::null());
    if successor {
        c.env(SUCCESSOR_ENV, "1");
    }
    c
}

/// A supervised daemon, known by its pidfd: reaped through it, so that a
/// daemon the broker did not start itself (adopted) is handled alike.
struct Daemon {
    pidfd: Arc<Pidfd>,
    started: Instant,
    /// The command line it was started from.
    cmd: String,
}

impl Daemon {
    fn spawn(cmd: &str, successor: bool) -> std::io::Result<Self> {
        let mut child = shell(cmd, successor).spawn()?;
        // The child is not reaped until we wait for it, so its pid is ours.
        match Pidfd::open(child.id()) {
            Ok(p) => Ok(Self {
                pidfd: Arc::new(p),
                started: Instant::now(),
                cmd: cmd.to_owned(),
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// The daemon `pid` that started at `start_time`, if it still runs.
    fn adopt(pid: u32, start_time: u64, cmd: &str) -> Option<Self> {
        let pidfd = Pidfd::open(pid).ok()?;
        // Opened first, checked second: the pidfd pins the process, so a
        // matching start time and a live pidfd are the same process.
        let same = crate::sys::pidfd::start_time(pid) == Some(start_time) && !pidfd.is_gone();
        same.then(|| Self {
            pidfd: Arc::new(pidfd),
            started: Instant::now(),
            cmd: cmd.to_owned(),
        })
    }

    fn pid(&self) -> u32 {
        self.pidfd.pid()
    }
}

#[derive(Default)]
struct Children {
    current: Option<Daemon>,
    successors: Vec<Daemon>,
}

/// What `holdfastctl status` shows of a supervisor's past.
#[derive(Default)]
struct History {
    /// Daemons started after one exited or failed to start.
    restarts: u64,
    /// How the last one ended.
    last_exit: Option<String>,
    /// While backing off: when the command starts again.
    next_start: Option<Instant>,
}

/// What a supervisor and its thread share.
struct Shared {
    /// What it starts; a successor started from another command line
    /// (`upgrade --cmd`) replaces it once that successor is supervised.
    cmd: Mutex<String>,
    stop: AtomicBool,
    children: Mutex<Children>,
    hooks: Hooks,
    /// The export its daemons serve, once one has restored.
    export: Mutex<Option<String>>,
    history: Mutex<History>,
}

pub struct Supervisor {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Supervisor {
    /// Starts supervising `cmd`, run as `/bin/sh -c "exec CMD"` so that the
    /// daemon itself is the supervised child. With `adopt` (pid, start
    /// time), the daemon a previous broker supervised is supervised again
    /// instead of starting another, if it still runs.
    pub fn start(cmd: String, hooks: Hooks, adopt: Option<(u32, u64)>) -> std::io::Result<Self> {
        let current = adopt.and_then(|(pid, t)| {
            let d = Daemon::adopt(pid, t, &cmd);
            match &d {
                Some(_) => info!("supervise: daemon pid {pid} supervised again: {cmd}"),
                None => info!("supervise: daemon pid {pid} is gone; starting {cmd}"),
            }
            d
        });
        let s = Self {
            shared: Arc::new(Shared {
                cmd: Mutex::new(cmd),
                stop: AtomicBool::new(false),
                children: Mutex::new(Children {
                    current,
                    successors: Vec::new(),
                }),
                hooks,
                export: Mutex::default(),
                history: Mutex::default(),
            }),
            thread: Mutex::new(None),
        };
        s.resume()?;
        Ok(s)
    }

    /// The command line.
    pub fn cmd(&self) -> String {
        self.shared.cmd.lock().clone()
    }

    /// The export its daemons serve, once one has restored.
    pub fn export(&self) -> Option<String> {
        self.shared.export.lock().clone()
    }

    /// What `holdfastctl status` shows of it.
    pub fn status(&self) -> SupervisorStatus {
        let pid = self.current_pid();
        let h = self.shared.history.lock();
        SupervisorStatus {
            cmd: self.cmd(),
            pid,
            restarts: h.restarts,
            last_exit: h.last_exit.clone(),
            backoff_ms: h.next_start.map(|t| {
                let left = t.saturating_duration_since(Instant::now());
                u64::try_from(left.as_millis()).unwrap_or(u64::MAX)
            }),
        }
    }

    /// (Re)starts the thread that restarts the daemon when it exits.
    pub fn resume(&self) -> std::io::Result<()> {
        self.shared.stop.store(false, Ordering::SeqCst);
        let shared = self.shared.clone();
        let t = std::thread::Builder::new()
            .name("holdfast-supervise".into())
            .spawn(move || run(&shared))?;
        *self.thread.lock() = Some(t);
        Ok(())
    }

    /// Stops restarting, leaving the daemons running (for an upgrade: the
    /// next broker supervises them).
    pub fn suspend(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    /// The pid of the supervised daemon, if one runs.
    pub fn current_pid(&self) -> Option<u32> {
        self.shared
            .children
            .lock()
            .current
            .as_ref()
            .map(Daemon::pid)
    }

    /// The supervised daemon's pid and start time, for the next broker.
    pub fn current(&self) -> Option<(u32, u64)> {
        let pid = self.current_pid()?;
        Some((pid, crate::sys::pidfd::start_time(pid)?))
    }

    /// Starts the command line, or `cmd` instead, as a handoff successor;
    /// returns its pid. If it takes over, its command line is the one
    /// supervised from then on.
    pub fn spawn_successor(&self, cmd: Option<&str>) -> std::io::Result<u32> {
        let cmd = cmd.map_or_else(|| self.cmd(), str::to_owned);
        let d = Daemon::spawn(&cmd, true)?;
        let pid = d.pid();
        info!("supervise: started successor pid {pid}: {cmd}");
        self.shared.children.lock().successors.push(d);
        Ok(pid)
    }

    /// Stops restarting; asks every daemon to detach (SIGTERM), and kills
    /// those that have not exited within `grace`.
    pub fn shutdown(&self, grace: Duration) {
        self.suspend();
        let mut c = self.shared.children.lock();
        let all: Vec<Daemon> = c
            .current
            .take()
            .into_iter()
            .chain(c.successors.drain(..))
            .collect();
        for d in &all {
            let _ = d.pidfd.signal(Signal::TERM);
        }
        for d in all {
            if !d.pidfd.wait_gone(grace) {
                let _ = d.pidfd.kill();
                d.pidfd.wait_gone(grace);
            }
            let _ = d.pidfd.reap();
        }
    }
}

/// Whether to start the command now that no supervised daemon runs.
#[derive(Debug, PartialEq, Eq)]
enum Vacancy {
    Start,
    /// Another daemon serves the export (or the broker has yet to see
    /// the last one go).
    Wait(u32),
    /// The export was removed.
    Gone(String),
}

fn vacancy(hooks: &Hooks, export: &Mutex<Option<String>>) -> Vacancy {
    let Some(name) = export.lock().clone() else {
        return Vacancy::Start;
    };
    match (hooks.daemon_of)(&name) {
        ExportDaemon::Removed => Vacancy::Gone(name),
        ExportDaemon::Pid(pid) => Vacancy::Wait(pid),
        ExportDaemon::None => Vacancy::Start,
    }
}

/// The next back-off after a daemon ran for `ran`: none to speak of after
/// a daemon that served (restored) for a while; growing for one that
/// failed before it served, or crashes soon after each restore.
fn next_backoff(backoff: Duration, healthy: bool, ran: Duration) -> Duration {
    if healthy && ran >= STABLE {
        MIN_BACKOFF
    } else {
        (backoff * 2).min(MAX_BACKOFF)
    }
}

fn run(sh: &Shared) {
    let mut backoff = MIN_BACKOFF;
    let mut waiting_for = None;
    // The last supervised daemon: the broker may not have seen it go yet.
    let mut last = None;
    while !sh.stop.load(Ordering::SeqCst) {
        let cmd = sh.cmd.lock().clone();
        let cmd = cmd.as_str();
        // Asked without the children's lock, so that no lock of the
        // broker's is ever taken under it.
        let vacant = sh.children.lock().current.is_none();
        match vacant.then(|| vacancy(&sh.hooks, &sh.export)) {
            Some(Vacancy::Gone(name)) => {
                info!("supervise: export {name} was removed; no longer running {cmd}");
                return;
            }
            Some(Vacancy::Wait(pid)) => {
                if waiting_for.replace(pid) != Some(pid) && last != Some(pid) {
                    info!(
                        "supervise: pid {pid} serves the export; {cmd} starts again once it is gone"
                    );
                }
                sleep_unless_stopped(TICK, &sh.stop);
                continue;
            }
            Some(Vacancy::Start) | None => waiting_for = None,
        }
        let Some(pidfd) = current_or_start(sh, cmd, &mut backoff) else {
            continue;
        };
        let _ = sys::poll_readable(&[pidfd.as_fd()], TICK);
        learn_export(sh, pidfd.pid());
        let mut c = sh.children.lock();
        c.successors.retain(|d| match d.pidfd.reap() {
            None => true,
            Some(s) => {
                info!("supervise: successor pid {} exited ({s})", d.pid());
                false
            }
        });
        let Some(cur) = c.current.as_ref() else {
            continue;
        };
        let Some(status) = cur.pidfd.reap() else {
            continue;
        };
        let Some(old) = c.current.take() else {
            continue;
        };
        drop(c);
        // It may have restored since the last look.
        learn_export(sh, old.pid());
        let mut c = sh.children.lock();
        if sh.stop.load(Ordering::SeqCst) {
            break;
        }
        if !c.successors.is_empty() {
            let next = c.successors.remove(0);
            info!(
                "supervise: daemon pid {} exited ({status}); its successor pid {} is now supervised",
                old.pid(),
                next.pid()
            );
            let new = (next.cmd != cmd).then(|| next.cmd.clone());
            c.current = Some(next);
            drop(c);
            if let Some(new) = new {
                info!("supervise: the command line is now {new} (was {cmd})");
                *sh.cmd.lock() = new.clone();
                (sh.hooks.changed)(cmd, &new);
            }
            continue;
        }
        drop(c);
        last = Some(old.pid());
        let ran = old.started.elapsed();
        backoff = next_backoff(backoff, (sh.hooks.healthy)(old.pid()), ran);
        info!(
            "supervise: daemon pid {} exited ({status}) after {:.1}s; restarting in {backoff:?}",
            old.pid(),
            ran.as_secs_f64()
        );
        back_off(
            sh,
            format!("{status} after {:.1}s", ran.as_secs_f64()),
            backoff,
        );
    }
}

/// The supervised daemon's pidfd, started first if none runs; None if it
/// could not be started (after backing off).
fn current_or_start(sh: &Shared, cmd: &str, backoff: &mut Duration) -> Option<Arc<Pidfd>> {
    let mut c = sh.children.lock();
    if c.current.is_none() {
        match Daemon::spawn(cmd, false) {
            Ok(d) => {
                info!("supervise: started daemon pid {}: {cmd}", d.pid());
                c.current = Some(d);
                let mut h = sh.history.lock();
                if h.last_exit.is_some() {
                    h.restarts = h.restarts.saturating_add(1);
                }
            }
            Err(e) => {
                drop(c);
                warn!("supervise: cannot start {cmd:?}: {e}");
                *backoff = (*backoff * 2).min(MAX_BACKOFF);
                back_off(sh, format!("cannot start: {e}"), *backoff);
                return None;
            }
        }
    }
    c.current.as_ref().map(|d| d.pidfd.clone())
}

/// The export the supervised daemons serve, once daemon `pid` restored
/// it (asked with none of the supervisor's locks held).
fn learn_export(sh: &Shared, pid: u32) {
    if sh.export.lock().is_some() {
        return;
    }
    if let Some(name) = (sh.hooks.export_of)(pid) {
        *sh.export.lock() = Some(name);
    }
}

/// Records how the last daemon ended and waits `backoff` before the next.
fn back_off(sh: &Shared, exit: String, backoff: Duration) {
    {
        let mut h = sh.history.lock();
        h.last_exit = Some(exit);
        h.next_start = Some(Instant::now() + backoff);
    }
    sleep_unless_stopped(backoff, &sh.stop);
    sh.history.lock().next_start = None;
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_resets_only_after_a_daemon_that_served_for_a_while() {
        let long = STABLE + Duration::from_secs(1);
        let short = Duration::from_millis(300);
        assert_eq!(next_backoff(MAX_BACKOFF, true, long), MIN_BACKOFF);
        // Restored, then crashed at once, again and again: it grows.
        let mut b = MIN_BACKOFF;
        for _ in 0..10 {
            b = next_backoff(b, true, short);
        }
        assert_eq!(b, MAX_BACKOFF);
        assert_eq!(next_backoff(MIN_BACKOFF, false, long), MIN_BACKOFF * 2);
    }
}
