//! hf-bench-failover: what a planned handoff and a crash restore cost a
//! workload, measured side by side in one run for the file and mem
//! backends, each in relay and in direct mode.
//!
//! Under load (threads doing 4 KiB O_DIRECT random writes, one at a time
//! each) it runs `holdfastctl handoff vol0 --exec CMD` repeatedly and then
//! SIGKILLs and restarts the daemon repeatedly, and reports:
//! * handoff: the largest write latency of any write that overlapped the
//!   command, the time from starting the command to the old daemon's exit,
//!   and the broker's own stall figure;
//! * crash restore: the time from SIGKILL until the last write that was
//!   in flight at the kill has completed (replayed by the next daemon),
//!   with the new daemon's start-up (spawn to restored) shown apart;
//! * broker upgrade (`holdfastctl broker upgrade`): the largest write
//!   latency of any write that overlapped the command, and the broker's
//!   own figure for the time without dispatch (exec to every daemon
//!   attached again);
//! * steady state: write latency outside those windows, for scale.
//!
//! Run as root from a release build:
//!   cargo build --release --workspace && target/release/hf-bench-failover
//! Results go to stdout (markdown) and to --out (JSON).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use holdfast_daemon::client::Connection;
use holdfast_proto::{Reply, Request};
use holdfast_tests::{AlignedBuf, Broker, BrokerOpts, Mode, Rng, Scratch, bin, open_direct};
use rustix::process::{Pid, PidfdFlags, WaitId, WaitIdOptions};

const USAGE: &str = "\
hf-bench-failover: the cost of a planned handoff, a crash restore and a
broker upgrade.

Usage: hf-bench-failover [--rounds N] [--threads N] [--out PATH]

  --rounds N    handoffs, crashes and broker upgrades per backend [default: 20]
  --threads N   writer threads [default: 4]
  --out PATH    JSON results [default: bench-failover.json]

Needs root (it mounts FUSE) and the workspace's binaries next to it
(cargo build --release --workspace).";

/// One write: start and end, in ns since the run's start.
type Op = (u64, u64);

struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<Op>>>,
}

fn ns(base: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(base).as_nanos() as u64
}

fn start_load(file: &std::path::Path, threads: u32, base: Instant) -> Load {
    let stop = Arc::new(AtomicBool::new(false));
    let threads = (0..threads)
        .map(|i| {
            let (f, stop) = (open_direct(file), stop.clone());
            std::thread::spawn(move || {
                let mut ops = Vec::new();
                let mut rng = Rng::new(u64::from(i) + 1);
                let mut b = AlignedBuf::new(4096);
                let blocks = f.metadata().unwrap().len() / 4096;
                while !stop.load(Ordering::Relaxed) {
                    rng.fill(&mut b);
                    let off = rng.range(0, blocks) * 4096;
                    let t0 = Instant::now();
                    f.write_all_at(&b, off).expect("write failed");
                    ops.push((ns(base, t0), ns(base, Instant::now())));
                }
                ops
            })
        })
        .collect();
    Load { stop, threads }
}

impl Load {
    fn finish(self) -> Vec<Op> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }
}

/// The daemon of `export` per the broker: (pid, epoch, active).
fn daemon_of(c: &mut Connection) -> (u32, u64, bool) {
    match c.call(&Request::Status, &[]).unwrap() {
        (Reply::Status { exports: e, .. }, _) => e[0].daemon.map_or((0, 0, false), |d| {
            (
                d.pid,
                d.epoch,
                d.state == holdfast_proto::DaemonState::Active,
            )
        }),
        other => panic!("status: {other:?}"),
    }
}

fn pidfd(pid: u32) -> OwnedFd {
    rustix::process::pidfd_open(Pid::from_raw(pid as i32).unwrap(), PidfdFlags::empty()).unwrap()
}

/// Waits for a child (or, as a subreaper, an orphaned grandchild) to
/// exit and reaps it; returns whether it exited 0.
fn reap(fd: &OwnedFd) -> bool {
    let status = rustix::process::waitid(WaitId::PidFd(fd.as_fd()), WaitIdOptions::EXITED)
        .unwrap()
        .unwrap();
    status.exit_status() == Some(0)
}

#[derive(Default)]
struct Figures {
    /// (window start, window end) in ns.
    windows: Vec<(u64, u64)>,
    dry_windows: Vec<(u64, u64)>,
    to_exit_us: Vec<u64>,
    stall_us: Vec<u64>,
    crash_to_io_us: Vec<u64>,
    crash_windows: Vec<(u64, u64)>,
    startup_us: Vec<u64>,
    upgrade_windows: Vec<(u64, u64)>,
    upgrade_stall_us: Vec<u64>,
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn worst_overlap(ops: &[Op], w: (u64, u64)) -> u64 {
    ops.iter()
        .filter(|(s, e)| *s < w.1 && *e > w.0)
        .map(|(s, e)| e - s)
        .max()
        .unwrap_or(0)
}

fn run_backend(name: &str, mode: Mode, rounds: u32, threads: u32) -> serde_json::Value {
    let scratch = Scratch::new(
        &format!("bench-{name}-{}", mode.name()),
        Duration::from_secs(900),
    );
    let size = mode.export("256MiB");
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", &size)]));
    let backend = match name {
        "file" => format!("file:{}", scratch.path("vol0.img").display()),
        _ => "mem".to_owned(),
    };
    let mut ctl = Connection::connect(&broker.socket).unwrap();
    ctl.hello().unwrap();
    let mut daemon = broker.daemon(&scratch, "vol0", &backend, &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    let base = Instant::now();
    let load = start_load(&broker.file("vol0"), threads, base);
    std::thread::sleep(Duration::from_millis(500));
    let mut fig = Figures::default();
    let exec = format!(
        "{} --export vol0 --backend {backend} 2>>{}",
        bin("holdfast-daemon").display(),
        scratch.path("successors.log").display()
    );

    // The first daemon is ours; later ones are holdfastctl's orphans,
    // which come to us as the subreaper. Each handoff follows a dry run:
    // the same commands and process start-ups without the switch, so the
    // two worst-write figures side by side show what the switch adds.
    for _ in 0..rounds {
        let t0 = Instant::now();
        let out = Command::new(bin("holdfastctl"))
            .args(["--socket", broker.socket.to_str().unwrap()])
            .args(["handoff", "vol0", "--dry-run", "--exec", &exec])
            .output()
            .unwrap();
        assert!(out.status.success(), "dry run failed: {out:?}");
        fig.dry_windows
            .push((ns(base, t0), ns(base, Instant::now())));
        std::thread::sleep(Duration::from_millis(100));

        let (old_pid, _, _) = daemon_of(&mut ctl);
        let old = pidfd(old_pid);
        let watch = {
            let fd = old.try_clone().unwrap();
            std::thread::spawn(move || {
                let _ = rustix::event::poll(
                    &mut [rustix::event::PollFd::new(
                        &fd,
                        rustix::event::PollFlags::IN,
                    )],
                    None,
                );
                Instant::now()
            })
        };
        let t0 = Instant::now();
        let out = Command::new(bin("holdfastctl"))
            .args(["--socket", broker.socket.to_str().unwrap()])
            .args(["handoff", "vol0", "--json", "--exec", &exec])
            .output()
            .unwrap();
        let t1 = Instant::now();
        assert!(out.status.success(), "handoff failed: {out:?}");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let exited = watch.join().unwrap();
        let clean = if old_pid == daemon.pid() {
            daemon
                .wait_timeout(Duration::from_secs(10))
                .unwrap()
                .success()
        } else {
            reap(&old)
        };
        assert!(clean, "the old daemon {old_pid} did not exit 0");
        fig.windows.push((ns(base, t0), ns(base, t1.max(exited))));
        fig.to_exit_us
            .push(exited.saturating_duration_since(t0).as_micros() as u64);
        fig.stall_us.push(report["stall_us"].as_u64().unwrap());
        std::thread::sleep(Duration::from_millis(200));
    }

    // Crash restores: the daemon now running is an orphan of holdfastctl;
    // kill it through a pidfd and start ours.
    let mut current: Option<holdfast_tests::Proc> = None;
    for _ in 0..rounds {
        let (pid, epoch, _) = daemon_of(&mut ctl);
        let fd = pidfd(pid);
        let t0 = Instant::now();
        rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL).unwrap();
        match current.take() {
            Some(mut p) if p.pid() == pid => {
                p.kill();
            }
            _ => {
                reap(&fd);
            }
        }
        let spawned = Instant::now();
        current = Some(broker.daemon(&scratch, "vol0", &backend, &[]));
        let active = loop {
            let (_, e, up) = daemon_of(&mut ctl);
            if up && e > epoch {
                break Instant::now();
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        fig.startup_us
            .push(active.saturating_duration_since(spawned).as_micros() as u64);
        fig.crash_windows
            .push((ns(base, t0), ns(base, active) + 1_000_000_000));
        std::thread::sleep(Duration::from_millis(300));
    }
    // Broker upgrades in place: the same daemon attaches again.
    drop(ctl);
    for _ in 0..rounds {
        let t0 = Instant::now();
        let out = Command::new(bin("holdfastctl"))
            .args(["--socket", broker.socket.to_str().unwrap()])
            .args(["broker", "upgrade", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "upgrade failed: {out:?}");
        fig.upgrade_windows
            .push((ns(base, t0), ns(base, Instant::now())));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        fig.upgrade_stall_us
            .push(report["stall_us"].as_u64().unwrap());
        std::thread::sleep(Duration::from_millis(300));
    }
    let ops = load.finish();
    // The writes a crash caught (in flight at the SIGKILL) complete once
    // the next daemon has replayed them: the last of them says how long
    // the crash held I/O up. (The first write to complete after the kill
    // says nothing since writes run in parallel: it may be one the dead
    // daemon had already completed.)
    for w in &fig.crash_windows {
        let caught = ops
            .iter()
            .filter(|(s, e)| *s <= w.0 && *e > w.0)
            .map(|(_, e)| *e)
            .max();
        if let Some(last) = caught {
            fig.crash_to_io_us.push((last - w.0) / 1000);
        }
    }
    let events: Vec<(u64, u64)> = fig
        .windows
        .iter()
        .chain(&fig.dry_windows)
        .chain(&fig.crash_windows)
        .chain(&fig.upgrade_windows)
        .copied()
        .collect();
    let mut steady: Vec<u64> = ops
        .iter()
        .filter(|(s, e)| !events.iter().any(|w| *s < w.1 && *e > w.0))
        .map(|(s, e)| (e - s) / 1000)
        .collect();
    let worst_in = |windows: &[(u64, u64)]| -> Vec<u64> {
        windows
            .iter()
            .map(|w| worst_overlap(&ops, *w) / 1000)
            .collect()
    };
    let mut worst = worst_in(&fig.windows);
    let mut worst_dry = worst_in(&fig.dry_windows);
    let mut worst_upgrade = worst_in(&fig.upgrade_windows);
    let p = |v: &mut Vec<u64>| {
        serde_json::json!({
            "p50": percentile(v, 0.5),
            "max": percentile(v, 1.0),
        })
    };
    serde_json::json!({
        "backend": name,
        "mode": mode.name(),
        "rounds": rounds,
        "threads": threads,
        "writes": ops.len(),
        "steady_write_us": {
            "p50": percentile(&mut steady, 0.5),
            "p99": percentile(&mut steady, 0.99),
            "max": percentile(&mut steady, 1.0),
        },
        "handoff_worst_write_us": p(&mut worst),
        "dry_run_worst_write_us": p(&mut worst_dry),
        "handoff_command_to_old_exit_us": p(&mut fig.to_exit_us),
        "handoff_broker_stall_us": p(&mut fig.stall_us),
        "crash_kill_to_caught_writes_done_us": p(&mut fig.crash_to_io_us),
        "crash_daemon_startup_us": p(&mut fig.startup_us),
        "upgrade_worst_write_us": p(&mut worst_upgrade),
        "upgrade_broker_stall_us": p(&mut fig.upgrade_stall_us),
    })
}

fn ms(v: &serde_json::Value) -> String {
    format!(
        "{:.2} / {:.2}",
        v["p50"].as_u64().unwrap() as f64 / 1000.0,
        v["max"].as_u64().unwrap() as f64 / 1000.0
    )
}

fn main() {
    let (mut rounds, mut threads) = (20u32, 4u32);
    let mut out = std::path::PathBuf::from("bench-failover.json");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--rounds" => rounds = value().parse().expect("--rounds N"),
            "--threads" => threads = value().parse().expect("--threads N"),
            "--out" => out = value().into(),
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => panic!("unknown argument {other}\n{USAGE}"),
        }
    }
    // Old daemons orphaned by holdfastctl are reaped here, not left to init.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let results: Vec<serde_json::Value> = [Mode::Relay, Mode::Direct]
        .into_iter()
        .flat_map(|m| ["file", "mem"].map(|b| (b, m)))
        .map(|(b, m)| run_backend(b, m, rounds, threads))
        .collect();
    let mut md = String::from(
        "| backend | mode | steady write p50 / p99 | handoff: worst write | dry run: worst write | handoff: command to old daemon's exit | handoff: broker stall | crash: SIGKILL to caught writes done | crash: daemon start-up | broker upgrade: worst write | broker upgrade: without dispatch |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in &results {
        let s = &r["steady_write_us"];
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} / {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["backend"].as_str().unwrap(),
            r["mode"].as_str().unwrap(),
            s["p50"].as_u64().unwrap() as f64 / 1000.0,
            s["p99"].as_u64().unwrap() as f64 / 1000.0,
            ms(&r["handoff_worst_write_us"]),
            ms(&r["dry_run_worst_write_us"]),
            ms(&r["handoff_command_to_old_exit_us"]),
            ms(&r["handoff_broker_stall_us"]),
            ms(&r["crash_kill_to_caught_writes_done_us"]),
            ms(&r["crash_daemon_startup_us"]),
            ms(&r["upgrade_worst_write_us"]),
            ms(&r["upgrade_broker_stall_us"]),
        );
    }
    md.push_str("\nAll figures in ms; pairs are median / max over the rounds.\n");
    print!("{md}");
    let json = serde_json::json!({ "results": results });
    std::fs::write(&out, format!("{json:#}\n")).unwrap();
    eprintln!("results written to {}", out.display());
}
