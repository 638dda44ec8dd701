//! `--supervise CMD`: run a daemon command line and run it again whenever it
//! exits: at once if it had got as far as RESTORE (it was healthy and was
//! killed or crashed while serving), with a growing back-off if it keeps
//! failing before that (a bad command line, a missing backend).
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

use holdfast_proto::SUCCESSOR_ENV;
use parking_lot::Mutex;
use rustix::process::Signal;

use crate::sys::{self, pidfd::Pidfd};
use crate::{info, warn};

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
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

pub struct Supervisor {
    /// What it starts; a successor started from another command line
    /// (`upgrade --cmd`) replaces it once that successor is supervised.
    cmd: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    children: Arc<Mutex<Children>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    hooks: Arc<Hooks>,
    /// The export its daemons serve, once one has attached.
    export: Arc<Mutex<Option<String>>>,
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
            cmd: Arc::new(Mutex::new(cmd)),
            stop: Arc::new(AtomicBool::new(false)),
            children: Arc::new(Mutex::new(Children {
                current,
                successors: Vec::new(),
            })),
            thread: Mutex::new(None),
            hooks: Arc::new(hooks),
            export: Arc::default(),
        };
        s.resume()?;
        Ok(s)
    }

    /// The command line.
    pub fn cmd(&self) -> String {
        self.cmd.lock().clone()
    }

    /// (Re)starts the thread that restarts the daemon when it exits.
    pub fn resume(&self) -> std::io::Result<()> {
        self.stop.store(false, Ordering::SeqCst);
        let (stop, children, cmd) = (self.stop.clone(), self.children.clone(), self.cmd.clone());
        let (hooks, export) = (self.hooks.clone(), self.export.clone());
        let t = std::thread::Builder::new()
            .name("holdfast-supervise".into())
            .spawn(move || run(&cmd, &stop, &children, &hooks, &export))?;
        *self.thread.lock() = Some(t);
        Ok(())
    }

    /// Stops restarting, leaving the daemons running (for an upgrade: the
    /// next broker supervises them).
    pub fn suspend(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    /// The pid of the supervised daemon, if one runs.
    pub fn current_pid(&self) -> Option<u32> {
        self.children.lock().current.as_ref().map(Daemon::pid)
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
        self.children.lock().successors.push(d);
        Ok(pid)
    }

    /// Stops restarting; asks every daemon to detach (SIGTERM), and kills
    /// those that have not exited within `grace`.
    pub fn shutdown(&self, grace: Duration) {
        self.suspend();
        let mut c = self.children.lock();
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

fn run(
    command: &Mutex<String>,
    stop: &AtomicBool,
    children: &Mutex<Children>,
    hooks: &Hooks,
    export: &Mutex<Option<String>>,
) {
    let mut backoff = MIN_BACKOFF;
    let mut waiting_for = None;
    // The last supervised daemon: the broker may not have seen it go yet.
    let mut last = None;
    while !stop.load(Ordering::SeqCst) {
        let cmd = command.lock().clone();
        let cmd = cmd.as_str();
        // Asked without the children's lock, so that no lock of the
        // broker's is ever taken under it.
        let vacant = children.lock().current.is_none();
        match vacant.then(|| vacancy(hooks, export)) {
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
                sleep_unless_stopped(TICK, stop);
                continue;
            }
            Some(Vacancy::Start) | None => waiting_for = None,
        }
        let pidfd = {
            let mut c = children.lock();
            if c.current.is_none() {
                match Daemon::spawn(cmd, false) {
                    Ok(d) => {
                        info!("supervise: started daemon pid {}: {cmd}", d.pid());
                        c.current = Some(d);
                    }
                    Err(e) => {
                        drop(c);
                        warn!("supervise: cannot start {cmd:?}: {e}");
                        sleep_unless_stopped(backoff, stop);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
            }
            c.current.as_ref().map(|d| d.pidfd.clone())
        };
        match &pidfd {
            Some(p) => {
                let _ = sys::poll_readable(&[p.as_fd()], TICK);
            }
            None => std::thread::sleep(TICK),
        }
        let mut c = children.lock();
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
        if let Some(name) = (hooks.export_of)(cur.pid()) {
            *export.lock() = Some(name);
        }
        let Some(old) = c.current.take() else {
            continue;
        };
        if stop.load(Ordering::SeqCst) {
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
                *command.lock() = new.clone();
                (hooks.changed)(cmd, &new);
            }
            continue;
        }
        drop(c);
        last = Some(old.pid());
        backoff = if (hooks.healthy)(old.pid()) {
            MIN_BACKOFF
        } else {
            (backoff * 2).min(MAX_BACKOFF)
        };
        info!(
            "supervise: daemon pid {} exited ({status}) after {:.1}s; restarting in {backoff:?}",
            old.pid(),
            old.started.elapsed().as_secs_f64()
        );
        sleep_unless_stopped(backoff, stop);
    }
}

fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20).min(end - Instant::now()));
    }
}
