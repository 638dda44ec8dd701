//! The upgrade: the broker executes the binary now on disk in its own
//! process (same pid: its supervised daemons stay its children, systemd's
//! main pid stays), passing every kept descriptor, the record and the
//! operators' connections, which the new broker answers with the report.
//!
//! Nothing is stopped before the `execve`: if it fails, the broker goes on
//! as it was. What the old broker held when it went is re-sent by the
//! kernel to the new one; daemons see their connections close, finish what
//! they hold, and attach again.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use holdfast_proto::{Reply, UpgradeReport};

use super::monotonic_ns;
use super::record::{UpgradeRecord, names};
use crate::{Broker, info, warn};

/// How long the new broker waits for the daemons that were serving to be
/// back before it reports (it reports the missing ones).
const REPORT_WAIT: Duration = Duration::from_secs(30);
/// How long the new binary has to print its version.
const CHECK_WAIT: Duration = Duration::from_secs(10);

/// An operator's BROKER_UPGRADE, waiting for the main thread: the
/// connection (the new broker answers it) and where a failure goes.
pub struct UpgradeRequest {
    sock: OwnedFd,
    failed: mpsc::Sender<String>,
}

impl Broker {
    /// BROKER_UPGRADE from a control connection: hands it to the main
    /// thread and waits. Returns only if the upgrade failed (the old broker
    /// goes on), with why.
    pub fn request_upgrade(&self, sock: &OwnedFd) -> String {
        let sock = match sock.try_clone() {
            Ok(s) => s,
            Err(e) => return format!("cannot keep the connection for the report: {e}"),
        };
        let (failed, why) = mpsc::channel();
        self.upgrades.lock().push(UpgradeRequest { sock, failed });
        // The main thread takes signals; SIGUSR2 is the upgrade's.
        // SAFETY: signals this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGUSR2) };
        why.recv()
            .unwrap_or_else(|_| "the upgrade ended without a word".into())
    }

    /// SIGUSR2 (or an operator's request): replaces this process with the
    /// binary now on disk. Returns if it cannot, telling whoever asked.
    pub(crate) fn upgrade(&self) {
        let requests = std::mem::take(&mut *self.upgrades.lock());
        let why = self.try_upgrade(&requests);
        warn!("upgrade failed, this broker goes on: {why}");
        for r in requests {
            let _ = r.failed.send(why.clone());
        }
    }

    /// Returns only on failure.
    fn try_upgrade(&self, requests: &[UpgradeRequest]) -> String {
        if let Some(why) = self.cannot_upgrade() {
            return why;
        }
        if let Err(why) = check_binary(self.reexec.program()) {
            return why;
        }
        let serving: Vec<String> = self
            .exports()
            .iter()
            .filter(|e| e.serving())
            .map(|e| e.name.clone())
            .collect();
        info!(
            "upgrading: executing {} (exports {})",
            self.reexec.program().display(),
            self.export_names()
        );
        self.custody.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=upgrading\n",
            monotonic_ns() / 1000
        ));
        // The supervised daemons stay: the new broker supervises them.
        for s in self.supervisors.lock().iter() {
            s.suspend();
        }
        let (mut record, mut fds) = self.record(self.custody.seq().saturating_add(1));
        record.upgrade = Some(UpgradeRecord {
            old_pid: std::process::id(),
            old_version: env!("CARGO_PKG_VERSION").into(),
            stopped_ns: monotonic_ns(),
            serving,
        });
        let why = match record.to_memfd() {
            Ok(memfd) => {
                fds.push((names::RECORD.to_owned(), memfd));
                fds.extend(self.custody.last_state());
                if let Ok(l) = self.lock.fd().try_clone() {
                    fds.push((names::LOCK.to_owned(), l));
                }
                for (i, r) in requests.iter().enumerate() {
                    if let Ok(s) = r.sock.try_clone() {
                        fds.push((format!("{}{i}", names::REQUESTER_PREFIX), s));
                    }
                }
                let keep: Vec<_> = fds.iter().map(|(n, fd)| (n.clone(), fd.as_fd())).collect();
                self.reexec.exec(&keep)
            }
            Err(e) => format!("cannot write the restart record: {e}"),
        };
        // Still here: the old broker goes on.
        for s in self.supervisors.lock().iter() {
            if let Err(e) = s.resume() {
                warn!("supervise {:?}: cannot restart its thread: {e}", s.cmd());
            }
        }
        self.custody
            .notify("READY=1\nSTATUS=upgrade failed; serving on\n");
        why
    }

    /// Why this broker cannot be replaced now, if it cannot.
    fn cannot_upgrade(&self) -> Option<String> {
        self.exports().iter().find_map(|e| {
            e.handoff_running().or_else(|| {
                let fuse =
                    self.ublk_id(&e.name).is_none() && e.kind == holdfast_proto::ExportKind::Volume;
                fuse.then(|| self.frontend.cannot_keep(&e.name)).flatten()
            })
        })
    }

    /// The new broker's side: once the daemons that were serving are back
    /// (or the bound passed), reports to the operators who asked.
    pub(crate) fn finish_upgrade(
        self: &std::sync::Arc<Self>,
        upgrade: UpgradeRecord,
        requesters: Vec<(String, OwnedFd)>,
    ) {
        let broker = self.clone();
        let spawned = std::thread::Builder::new()
            .name("holdfast-upgraded".into())
            .spawn(move || {
                let report = broker.upgrade_report(&upgrade);
                info!(
                    "upgraded from pid {} ({}): {:.3} ms without dispatch, {} FUSE requests re-sent, \
                     {} daemons back{}",
                    report.old_pid,
                    report.old_version,
                    report.stall_us as f64 / 1000.0,
                    report.resent,
                    report.reattached,
                    if report.missing.is_empty() {
                        String::new()
                    } else {
                        format!(", still without a daemon: {}", report.missing.join(", "))
                    }
                );
                let msg = Reply::BrokerUpgraded(report).encode();
                for (_, sock) in requesters {
                    let _ = crate::sys::seqpacket::send(sock.as_fd(), &msg, &[]);
                }
            });
        if let Err(e) = spawned {
            warn!("cannot start the upgrade report thread: {e}");
        }
    }

    fn upgrade_report(&self, upgrade: &UpgradeRecord) -> UpgradeReport {
        let end = Instant::now() + REPORT_WAIT;
        let missing = |b: &Self| -> Vec<String> {
            upgrade
                .serving
                .iter()
                .filter(|name| b.find(name).map_or(true, |e| !e.serving()))
                .cloned()
                .collect()
        };
        let mut left = missing(self);
        while !left.is_empty() && Instant::now() < end {
            std::thread::sleep(Duration::from_micros(500));
            left = missing(self);
        }
        UpgradeReport {
            old_pid: upgrade.old_pid,
            new_pid: std::process::id(),
            old_version: upgrade.old_version.clone(),
            new_version: env!("CARGO_PKG_VERSION").into(),
            stall_us: monotonic_ns().saturating_sub(upgrade.stopped_ns) / 1000,
            resent: self.frontend.resent(),
            reattached: u32::try_from(upgrade.serving.len().saturating_sub(left.len()))
                .unwrap_or(u32::MAX),
            missing: left,
        }
    }
}

/// Runs `program --version` and checks that it is a broker that reads this
/// broker's record: an `execve` cannot be taken back.
fn check_binary(program: &std::path::Path) -> Result<(), String> {
    let mut child = std::process::Command::new(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {} --version: {e}", program.display()))?;
    let end = Instant::now() + CHECK_WAIT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} --version did not answer within {CHECK_WAIT:?}",
                    program.display()
                ));
            }
        }
    };
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut o, &mut out);
    }
    let want = format!("(restart record {})", super::record::VERSION);
    if !status.success() || !out.starts_with("holdfast-broker ") || !out.contains(&want) {
        return Err(format!(
            "{} is not a broker that can take over from this one (its --version says {:?}, \
             this broker needs one that reads restart record {})",
            program.display(),
            out.trim(),
            super::record::VERSION
        ));
    }
    Ok(())
}
