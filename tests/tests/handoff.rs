//! Planned handoff: a successor daemon takes an export over from the
//! running one under continuous verified O_DIRECT writes. The writer must
//! see no error and every block its last acknowledged write; each old
//! daemon must exit 0; failures at every step must leave the old daemon
//! serving.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use holdfast_daemon::fault::Point;
use holdfast_proto::{HandoffOutcome, HandoffReport};
use holdfast_tests::{
    AlignedBuf, Broker, BrokerOpts, Mode, Proc, Scratch, bin, check_backing, handoff_report,
    open_direct, seed, stop_writer, write_in_thread, writer,
};

/// A daemon started as a successor, with `HOLDFAST_FAULT=fault` if given.
fn successor(
    broker: &Broker,
    scratch: &Scratch,
    export: &str,
    backend: &str,
    fault: Option<Point>,
) -> Proc {
    let mut cmd = broker.daemon_cmd(export, backend, &["--successor"]);
    if let Some(p) = fault {
        cmd.env(holdfast_daemon::fault::ENV, p.name());
    }
    broker.daemon_with(scratch, cmd, export)
}

/// One handoff of `export` to a new successor; returns the report and the
/// successor.
fn handoff(
    broker: &Broker,
    scratch: &Scratch,
    export: &str,
    backend: &str,
    fault: Option<Point>,
    drain_ms: u32,
) -> (HandoffReport, Proc) {
    let (mut conn, _) = broker.arm_handoff(export, false, drain_ms);
    let next = successor(broker, scratch, export, backend, fault);
    let report = handoff_report(&mut conn);
    (report, next)
}

fn assert_completed(r: &HandoffReport, broker: &Broker) {
    assert_eq!(
        r.outcome,
        HandoffOutcome::Completed,
        "{r:?}\nbroker log:\n{}",
        broker.proc.log_text()
    );
}

/// Waits for a daemon that was handed off to exit, and checks it exited 0.
fn assert_exits_cleanly(old: &mut Proc) {
    let status = old
        .wait_timeout(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("old daemon still running:\n{}", old.log_text()));
    assert!(status.success(), "old daemon: {status}\n{}", old.log_text());
}

/// Detaches `daemon` cleanly, then checks the backing file `img` against
/// the generations a writer saved in `state`.
fn detach_and_check(daemon: &mut Proc, scratch: &Scratch, img: &Path, state: &Path, seed: u64) {
    daemon.signal(libc::SIGTERM);
    assert_exits_cleanly(daemon);
    check_backing(scratch, img, state, seed);
}

fn sequential_handoffs(name: &str, backend: &str, count: u32, mode: Mode) {
    let scratch = Scratch::new(name, Duration::from_secs(300));
    let size = mode.export("32MiB");
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", &size)]));
    let backend = backend.replace('@', scratch.dir.to_str().unwrap());
    let mut daemon = broker.daemon(&scratch, "vol0", &backend, &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    let state = scratch.path("gens");
    let seed = seed();
    let mut writer = writer(&scratch, &broker.file("vol0"), 4, seed, Some(&state));
    std::thread::sleep(Duration::from_millis(200));
    let mut stalls = Vec::new();
    for _ in 0..count {
        let (r, next) = handoff(&broker, &scratch, "vol0", &backend, None, 0);
        assert_completed(&r, &broker);
        assert_eq!(r.from_pid, daemon.pid());
        assert_eq!(r.to_pid, next.pid());
        assert!(!r.fenced, "{r:?}");
        stalls.push(r.stall_us);
        assert_exits_cleanly(&mut daemon);
        daemon = next;
        assert!(writer.is_running(), "writer died:\n{}", writer.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let report = stop_writer(&mut writer);
    let status = broker.status("vol0");
    stalls.sort_unstable();
    eprintln!(
        "writer: {report}\nbroker: {status}\nstall us: median {} max {}",
        stalls[stalls.len() / 2],
        stalls[stalls.len() - 1]
    );
    assert_eq!(status["daemon"]["pid"], daemon.pid());
    assert_eq!(status["daemon"]["mode"], mode.name());
    assert_eq!(status["daemons_lost"], 0);
    assert_eq!(status["failed"], 0);
    assert_eq!(status["rejected_completions"], 0);
    assert_eq!(status["last_handoff"]["outcome"], "completed");

    if let Some(img) = backend.strip_prefix("file:") {
        detach_and_check(&mut daemon, &scratch, img.as_ref(), &state, seed);
    }
}

#[test]
fn fifty_handoffs_under_verified_writes_file() {
    sequential_handoffs("handoff-file", "file:@/vol0.img", 50, Mode::Relay);
}

#[test]
fn handoffs_under_verified_writes_mem() {
    sequential_handoffs("handoff-mem", "mem", 20, Mode::Relay);
}

#[test]
fn direct_fifty_handoffs_under_verified_writes_file() {
    sequential_handoffs("direct-handoff-file", "file:@/vol0.img", 50, Mode::Direct);
}

#[test]
fn direct_handoffs_under_verified_writes_mem() {
    sequential_handoffs("direct-handoff-mem", "mem", 20, Mode::Direct);
}

holdfast_tests::both_modes!(fault_grid, direct_fault_grid, fault_grid_in);

/// Every injection point, each followed by verified I/O and a further
/// successful handoff.
fn fault_grid_in(mode: Mode) {
    let scratch = Scratch::new(
        &format!("handoff-faults-{}", mode.name()),
        Duration::from_secs(300),
    );
    let size = mode.export("32MiB");
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", &size)]));
    let backend = format!("file:{}", scratch.path("vol0.img").display());
    let mut daemon = broker.daemon(&scratch, "vol0", &backend, &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    let state = scratch.path("gens");
    let seed = seed();
    let mut writer = writer(&scratch, &broker.file("vol0"), 4, seed, Some(&state));
    std::thread::sleep(Duration::from_millis(200));

    for point in [
        Point::SuccessorAfterPrepare,
        Point::SuccessorAfterReady,
        Point::SuccessorAfterActivate,
    ] {
        let (r, mut failed) = handoff(&broker, &scratch, "vol0", &backend, Some(point), 0);
        assert_eq!(
            r.outcome,
            HandoffOutcome::Aborted,
            "{point:?}: {r:?} (a daemon built without its fault-injection feature ignores \
             HOLDFAST_FAULT: `cargo build --workspace` builds it so; run the tests with \
             `cargo test --workspace`, which rebuilds it)"
        );
        assert!(r.reason.contains("successor"), "{point:?}: {r:?}");
        let status = failed.wait_timeout(Duration::from_secs(10)).unwrap();
        assert!(!status.success(), "{point:?}: the successor did not crash");
        // The old daemon serves on (revived if it had quiesced).
        let s = broker.wait_status("vol0", Duration::from_secs(10), "revived", |s| {
            s["daemon"]["state"] == "active" && s["successor"].is_null()
        });
        assert_eq!(s["daemon"]["pid"], daemon.pid(), "{point:?}");
        assert!(daemon.is_running());
        std::thread::sleep(Duration::from_millis(150));
        assert!(writer.is_running(), "writer died:\n{}", writer.log_text());
        // A further handoff succeeds.
        let (r, next) = handoff(&broker, &scratch, "vol0", &backend, None, 0);
        assert_completed(&r, &broker);
        assert_exits_cleanly(&mut daemon);
        daemon = next;
    }

    // The predecessor crashes on QUIESCE with requests in flight: first
    // hand off to a daemon that carries the fault, then away from it.
    let point = Point::PredecessorDuringQuiesce;
    let (r, next) = handoff(&broker, &scratch, "vol0", &backend, Some(point), 0);
    assert_completed(&r, &broker);
    assert_exits_cleanly(&mut daemon);
    let mut doomed = next;
    std::thread::sleep(Duration::from_millis(150));
    let (r, next) = handoff(&broker, &scratch, "vol0", &backend, None, 0);
    assert_completed(&r, &broker);
    assert!(r.fenced, "{r:?}");
    let status = doomed.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(!status.success(), "the predecessor did not crash");
    daemon = next;
    std::thread::sleep(Duration::from_millis(150));
    let (r, next) = handoff(&broker, &scratch, "vol0", &backend, None, 0);
    assert_completed(&r, &broker);
    assert_exits_cleanly(&mut daemon);
    daemon = next;

    std::thread::sleep(Duration::from_millis(150));
    let report = stop_writer(&mut writer);
    let status = broker.status("vol0");
    eprintln!("writer: {report}\nbroker: {status}");
    assert_eq!(status["failed"], 0);
    assert_eq!(status["rejected_completions"], 0);
    detach_and_check(
        &mut daemon,
        &scratch,
        &scratch.path("vol0.img"),
        &state,
        seed,
    );
}

holdfast_tests::both_modes!(
    drain_bound_fences_and_other_export_keeps_going,
    direct_drain_bound_fences_and_other_export_keeps_going,
    drain_bound_in
);

/// A hung old daemon is fenced at the drain bound and its requests are
/// replayed to the successor (in direct mode, re-sent by the kernel);
/// meanwhile another export keeps serving.
fn drain_bound_in(mode: Mode) {
    let scratch = Scratch::new(
        &format!("handoff-drain-{}", mode.name()),
        Duration::from_secs(120),
    );
    let size = mode.export("32MiB");
    let broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", &size), ("vol1", &size)]),
    );
    let b0 = format!("file:{}", scratch.path("vol0.img").display());
    let b1 = format!("file:{}", scratch.path("vol1.img").display());
    let mut d0 = broker.daemon(&scratch, "vol0", &b0, &[]);
    let _d1 = broker.daemon(&scratch, "vol1", &b1, &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    broker.wait_active("vol1", 0, Duration::from_secs(10));
    let state = scratch.path("gens");
    let seed = seed();
    let mut w0 = writer(&scratch, &broker.file("vol0"), 4, seed, Some(&state));

    // vol1: a counting writer of our own.
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let w1 = {
        let (f, done, stop) = (
            open_direct(&broker.file("vol1")),
            done.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || {
            let mut b = AlignedBuf::new(4096);
            b.fill(0x5a);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                f.write_all_at(&b, (i % 4096) * 4096).unwrap();
                done.fetch_add(1, Ordering::SeqCst);
                i += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));

    d0.signal(libc::SIGSTOP);
    std::thread::sleep(Duration::from_millis(50));
    let before = done.load(Ordering::SeqCst);
    let (r, next) = handoff(&broker, &scratch, "vol0", &b0, None, 1500);
    let during = done.load(Ordering::SeqCst) - before;
    assert_completed(&r, &broker);
    assert!(r.fenced, "{r:?}");
    assert!(r.drain_us >= 1_500_000, "{r:?}");
    // A relay daemon holds what the broker sent it. A direct daemon whose
    // readers were all waiting in read() at SIGSTOP holds nothing: the
    // writers' requests wait in the kernel's queue for the successor,
    // which is not a replay.
    if mode == Mode::Relay {
        assert!(r.replayed >= 1, "the stopped daemon held no request: {r:?}");
    }
    let status = d0.wait_timeout(Duration::from_secs(10)).unwrap();
    assert!(
        !status.success(),
        "the hung daemon was not killed: {status}"
    );
    assert!(
        during >= 20,
        "vol1 completed only {during} writes while vol0 stalled for {} ms",
        r.drain_us / 1000
    );
    eprintln!(
        "vol1 writes during vol0's {} ms drain: {during}; report {r:?}",
        r.drain_us / 1000
    );
    stop.store(true, Ordering::SeqCst);
    w1.join().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    stop_writer(&mut w0);
    let mut d = next;
    detach_and_check(&mut d, &scratch, &scratch.path("vol0.img"), &state, seed);
}

/// After a handoff, a completion carrying the previous daemon's epoch is
/// rejected: the new daemon is fenced and the request replayed.
#[test]
fn completion_from_the_previous_epoch_is_rejected() {
    let scratch = Scratch::new("handoff-epoch", Duration::from_secs(60));
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", "32MiB")]));
    let backend = format!("file:{}", scratch.path("vol0.img").display());
    let mut d0 = broker.daemon(&scratch, "vol0", &backend, &[]);
    let (_, e0) = broker.wait_active("vol0", 0, Duration::from_secs(10));
    let (mut conn, _) = broker.arm_handoff("vol0", false, 0);
    let mut faulty = broker.faulty(&scratch, "vol0", "old-epoch", &["--successor"]);
    let r = handoff_report(&mut conn);
    assert_completed(&r, &broker);
    assert_eq!(r.from_epoch, e0);
    assert_exits_cleanly(&mut d0);

    let write = write_in_thread(&broker, "vol0", 8192, 0xab);
    let s = broker.wait_status("vol0", Duration::from_secs(10), "rejection", |s| {
        s["rejected_completions"] == 1 && s["daemon"].is_null()
    });
    assert_eq!(s["daemons_lost"], 1);
    assert!(faulty.wait_timeout(Duration::from_secs(10)).is_some());
    assert!(
        broker
            .proc
            .log_text()
            .contains(&format!("carries epoch {e0}")),
        "{}",
        broker.proc.log_text()
    );
    // The write waits for, and is replayed to, a good daemon.
    let mut d = broker.daemon(&scratch, "vol0", &backend, &[]);
    write.join().unwrap().unwrap();
    let mut b = AlignedBuf::new(4096);
    open_direct(&broker.file("vol0"))
        .read_exact_at(&mut b, 8192)
        .unwrap();
    assert!(b.iter().all(|&x| x == 0xab));
    d.signal(libc::SIGTERM);
    assert_exits_cleanly(&mut d);
}

// `holdfastctl handoff`: --exec, --dry-run, and the errors a user meets.
holdfast_tests::both_modes!(
    holdfastctl_handoff,
    direct_holdfastctl_handoff,
    holdfastctl_handoff_in
);

fn holdfastctl_handoff_in(mode: Mode) {
    let scratch = Scratch::new(
        &format!("handoff-ctl-{}", mode.name()),
        Duration::from_secs(120),
    );
    let size = mode.export("32MiB");
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", &size)]));
    let img = scratch.path("vol0.img");
    let backend = format!("file:{}", img.display());
    let mut d0 = broker.daemon(&scratch, "vol0", &backend, &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let exec = format!(
        "{} --export vol0 --backend {backend} >>{} 2>&1",
        bin("holdfast-daemon").display(),
        scratch.path("exec.log").display()
    );

    // A dry run warms a successor up and leaves the daemon serving.
    let out = broker.ctl(&["handoff", "vol0", "--dry-run", "--exec", &exec]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("dry-run"), "{}", text(&out));
    assert_eq!(broker.status("vol0")["daemon"]["pid"], d0.pid());
    assert_eq!(broker.status("vol0")["last_handoff"]["outcome"], "dry-run");

    // Errors: no such export, nothing started in time, a successor that
    // fails to start, a successor that is not expected.
    let out = broker.ctl(&["handoff", "nosuch"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no export named"), "{}", text(&out));
    let out = broker.ctl(&["handoff", "vol0", "--timeout", "0.3"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no successor attached within"),
        "{}",
        text(&out)
    );
    let out = broker.ctl(&["handoff", "vol0", "--exec", "exit 3"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("exited before it attached"),
        "{}",
        text(&out)
    );
    broker.wait_status("vol0", Duration::from_secs(5), "cancelled", |s| {
        s["handoff"].is_null()
    });
    let out = broker
        .daemon_cmd("vol0", &backend, &["--successor"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("no handoff is waiting for a successor"),
        "{}",
        text(&out)
    );
    let out = broker.ctl(&["upgrade", "vol0"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not supervised"), "{}", text(&out));
    for bad in [
        &["handoff"][..],
        &["handoff", "vol0", "--timeout", "x"],
        &["handoff", "vol0", "--drain-timeout", "0"],
        &["upgrade", "vol0", "--exec", "true"],
        &["status", "--dry-run"],
    ] {
        let out = broker.ctl(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out));
    }
    assert_eq!(broker.status("vol0")["daemon"]["pid"], d0.pid());

    // The real thing.
    let w = write_in_thread(&broker, "vol0", 0, 0x11);
    w.join().unwrap().unwrap();
    let out = broker.ctl(&["handoff", "vol0", "--exec", &exec, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["outcome"], "completed", "{report}");
    assert_eq!(report["from_pid"], d0.pid());
    assert_exits_cleanly(&mut d0);
    let s = broker.status("vol0");
    assert_eq!(s["daemon"]["pid"], report["to_pid"]);
    assert_eq!(s["daemon"]["state"], "active");
    let mut b = AlignedBuf::new(4096);
    open_direct(&broker.file("vol0"))
        .read_exact_at(&mut b, 0)
        .unwrap();
    assert!(b.iter().all(|&x| x == 0x11));
    // The successor (holdfastctl's child, now an orphan) exits when the
    // broker goes away.
}

// In supervise mode, `holdfastctl upgrade` and SIGHUP to the daemon hand
// the export off to a fresh copy of the supervised command line.
holdfast_tests::both_modes!(
    supervised_upgrade_and_sighup,
    direct_supervised_upgrade_and_sighup,
    supervised_upgrade_in
);

fn supervised_upgrade_in(mode: Mode) {
    let scratch = Scratch::new(
        &format!("handoff-supervised-{}", mode.name()),
        Duration::from_secs(120),
    );
    let size = mode.export("32MiB");
    let img = scratch.path("vol0.img");
    let socket = scratch.path("broker.sock");
    let cmd = format!(
        "{} --socket {} --export vol0 --backend file:{} 2>>{}",
        bin("holdfast-daemon").display(),
        socket.display(),
        img.display(),
        scratch.path("supervised.log").display()
    );
    let mut broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", &size)])
            .arg("--supervise")
            .arg(&cmd),
    );
    let (pid0, e0) = broker.wait_active("vol0", 0, Duration::from_secs(10));
    let state = scratch.path("gens");
    let seed = seed();
    let mut writer = writer(&scratch, &broker.file("vol0"), 4, seed, Some(&state));
    std::thread::sleep(Duration::from_millis(200));

    // On failure, the broker's log says why.
    let out = broker.ctl(&["upgrade", "vol0", "--dry-run"]);
    assert!(
        out.status.success(),
        "{out:?}\nbroker log:\n{}",
        broker.proc.log_text()
    );
    let out = broker.ctl(&["upgrade", "vol0"]);
    assert!(
        out.status.success(),
        "{out:?}\nbroker log:\n{}",
        broker.proc.log_text()
    );
    let (pid1, e1) = broker.wait_active("vol0", e0, Duration::from_secs(10));
    assert_ne!(pid1, pid0);
    std::thread::sleep(Duration::from_millis(200));

    // SIGHUP to the supervised daemon (through a pidfd: the pid is the
    // broker's child, and the pidfd cannot name a reused pid).
    holdfast_tests::signal_pid(pid1, rustix::process::Signal::HUP).unwrap();
    let s = broker.wait_status("vol0", Duration::from_secs(10), "SIGHUP handoff", |s| {
        s["daemon"]["epoch"].as_u64().unwrap_or(0) > e1 && s["daemon"]["state"] == "active"
    });
    assert_eq!(s["last_handoff"]["outcome"], "completed", "{s}");
    assert_eq!(s["last_handoff"]["from_pid"], pid1);
    std::thread::sleep(Duration::from_millis(200));

    // The new daemon is supervised: killing it restarts it.
    let (pid2, e2) = broker.wait_active("vol0", e1, Duration::from_secs(1));
    holdfast_tests::signal_pid(pid2, rustix::process::Signal::KILL).unwrap();
    let (pid3, _) = broker.wait_active("vol0", e2, Duration::from_secs(10));
    assert_ne!(pid3, pid2);
    std::thread::sleep(Duration::from_millis(200));
    let report = stop_writer(&mut writer);
    eprintln!("writer: {report}\nbroker: {}", broker.status("vol0"));
    broker.stop();
    check_backing(&scratch, &img, &state, seed);
}

/// A supervised export handed off with `--exec` to a daemon the
/// supervisor did not start: the supervisor leaves it serving (no restarts
/// refused as busy), starts its own command again once that daemon is
/// killed, and stops for good once the export is removed.
#[test]
fn supervisor_leaves_an_exec_successor_alone_and_stops_with_its_export() {
    let scratch = Scratch::new("handoff-supervised-exec", Duration::from_secs(120));
    let img = scratch.path("vol0.img");
    let socket = scratch.path("broker.sock");
    let daemon = |log: &str| {
        format!(
            "{} --socket {} --export vol0 --backend file:{} --reconnect-timeout 2 2>>{}",
            bin("holdfast-daemon").display(),
            socket.display(),
            img.display(),
            scratch.path(log).display()
        )
    };
    let broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", "32MiB")])
            .arg("--supervise")
            .arg(&daemon("supervised.log")),
    );
    let log = || broker.proc.log_text();
    let started = || log().matches("supervise: started daemon pid").count();
    let (pid0, e0) = broker.wait_active("vol0", 0, Duration::from_secs(10));
    let out = broker.ctl(&["handoff", "vol0", "--exec", &daemon("exec.log")]);
    assert!(out.status.success(), "{out:?}\nbroker log:\n{}", log());
    let (pid1, e1) = broker.wait_active("vol0", e0, Duration::from_secs(10));
    assert_ne!(pid1, pid0);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(broker.status("vol0")["daemon"]["pid"], pid1);
    assert_eq!(
        started(),
        1,
        "the supervisor started another daemon:\n{}",
        log()
    );
    assert!(
        log().contains(&format!("supervise: pid {pid1} serves the export")),
        "{}",
        log()
    );

    // The other daemon killed: the supervisor's command serves again.
    holdfast_tests::signal_pid(pid1, rustix::process::Signal::KILL).unwrap();
    let (pid2, _) = broker.wait_active("vol0", e1, Duration::from_secs(10));
    assert!(
        log().contains(&format!("supervise: started daemon pid {pid2}")),
        "{}",
        log()
    );

    // The export removed: its daemon detaches and is not started again.
    let out = broker.ctl(&["export", "rm", "vol0"]);
    assert!(out.status.success(), "{out:?}\nbroker log:\n{}", log());
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while !log().contains("export vol0 was removed; no longer running") {
        assert!(std::time::Instant::now() < end, "{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(started(), 2, "{}", log());
}
