//! The operator's view and levers: `holdfastctl status` (table and JSON),
//! `holdfastctl restore` and `--fail-pending`, the daemon-wait bound, and
//! what a program sees while no daemon is attached.

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use holdfast_tests::{
    AlignedBuf, Broker, BrokerOpts, Mode, Scratch, bin, open_direct, write_in_thread,
};

holdfast_tests::both_modes!(
    status_table_and_json,
    direct_status_table_and_json,
    status_in
);

fn status_in(mode: Mode) {
    let scratch = Scratch::new(
        &format!("ctl-status-{}", mode.name()),
        Duration::from_secs(60),
    );
    let (vol0, vol1) = (mode.export("256MiB"), mode.export("1GiB"));
    let broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", &vol0), ("vol1", &vol1)]),
    );
    let d = broker.daemon(&scratch, "vol0", "mem", &[]);
    let (pid, epoch) = broker.wait_active("vol0", 0, Duration::from_secs(10));
    assert_eq!(pid, d.pid());
    assert_eq!(epoch, 1);

    let out = broker.ctl(&["status"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("EXPORT")
            && lines[0].contains("MODE")
            && lines[0].contains("PENDING")
            && lines[0].contains("REPLAYED")
    );
    assert!(lines[1].contains(mode.name()) && lines[2].contains(mode.name()));
    assert!(
        lines[1].starts_with("vol0") && lines[1].contains("256MiB") && lines[1].contains("active")
    );
    assert!(lines[1].contains(&pid.to_string()));
    assert!(
        lines[2].starts_with("vol1") && lines[2].contains("1GiB") && lines[2].contains("no daemon")
    );

    let s = broker.status("vol0");
    assert_eq!(s["size"], 256u64 << 20);
    assert_eq!(s["frontend"], "fuse");
    assert_eq!(s["daemon"]["state"], "active");
    assert_eq!(
        (&s["mode"], &s["daemon"]["mode"]),
        (&mode.name().into(), &mode.name().into())
    );
    for k in [
        "inflight",
        "pending",
        "replayed",
        "completed",
        "failed",
        "daemons_lost",
    ] {
        assert!(s[k].is_u64(), "{k} missing: {s}");
    }
    assert!(broker.status("vol1")["daemon"].is_null());

    // Usage errors are clear and exit 2.
    let out = broker.ctl(&["restart"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unrecognized subcommand"));
    let out = broker.ctl(&["restore", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no export named \"nope\""));
    let out = Command::new(bin("holdfastctl"))
        .args(["--socket", "/nonexistent/socket", "status"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect to /nonexistent/socket"));
}

holdfast_tests::both_modes!(
    restore_fail_pending_fails_waiting_requests,
    direct_restore_fail_pending_fails_waiting_requests,
    fail_pending_in
);

fn fail_pending_in(mode: Mode) {
    let scratch = Scratch::new(
        &format!("ctl-fail-{}", mode.name()),
        Duration::from_secs(60),
    );
    let size = mode.export("4MiB");
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", &size)]));
    let write = write_in_thread(&broker, "vol0", 0, 1);
    broker.wait_status("vol0", Duration::from_secs(10), "a pending request", |s| {
        s["pending"] == 1
    });

    // With no daemon, an operator restore has nothing to replay to.
    let out = broker.ctl(&["restore", "vol0"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no daemon is attached"),
        "{out:?}"
    );
    assert!(!write.is_finished());

    let out = broker.ctl(&["restore", "vol0", "--fail-pending"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("failed 1 pending"));
    let err = write.join().unwrap().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    let s = broker.status("vol0");
    assert_eq!(
        (s["pending"].as_u64(), s["failed"].as_u64()),
        (Some(0), Some(1)),
        "{s}"
    );
}

holdfast_tests::both_modes!(
    daemon_wait_bound_fails_pending_requests,
    direct_daemon_wait_bound_fails_pending_requests,
    daemon_wait_in
);

fn daemon_wait_in(mode: Mode) {
    let scratch = Scratch::new(
        &format!("ctl-wait-{}", mode.name()),
        Duration::from_secs(60),
    );
    let size = mode.export("4MiB");
    let broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", &size)])
            .arg("--daemon-wait")
            .arg("500ms"),
    );
    let started = Instant::now();
    let err = write_in_thread(&broker, "vol0", 0, 1)
        .join()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(broker.status("vol0")["failed"], 1);
}

// In direct mode the broker holds what the kernel sent before the daemon
// came, and hands it over (the kernel re-sends it to the daemon).
holdfast_tests::both_modes!(
    requests_wait_for_a_daemon_by_default,
    direct_requests_wait_for_a_daemon_by_default,
    wait_for_a_daemon
);

fn wait_for_a_daemon(mode: Mode) {
    let scratch = Scratch::new(
        &format!("ctl-forever-{}", mode.name()),
        Duration::from_secs(60),
    );
    let size = mode.export("4MiB");
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", &size)]));
    let write = write_in_thread(&broker, "vol0", 0, 9);
    std::thread::sleep(Duration::from_secs(2));
    assert!(!write.is_finished(), "the write did not wait for a daemon");
    let s = broker.status("vol0");
    assert!(s["waiting_ms"].as_u64().unwrap() >= 1500, "{s}");

    // A program holding a written fd can still fork and exec while no
    // daemon is attached (close-on-exec must not wait for one).
    let started = Instant::now();
    let st = Command::new("/bin/true").status().unwrap();
    assert!(st.success());
    assert!(started.elapsed() < Duration::from_secs(5));

    let _d = broker.daemon(&scratch, "vol0", "mem", &[]);
    write.join().unwrap().unwrap();
    assert_eq!(broker.status("vol0")["daemon"]["mode"], mode.name());
    let f = open_direct(&broker.file("vol0"));
    let mut b = AlignedBuf::new(4096);
    f.read_exact_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|&x| x == 9));
}

// In direct mode, the export serves this relay-only daemon in relay mode.
holdfast_tests::both_modes!(
    operator_restore_starts_a_daemon_that_never_restores,
    direct_operator_restore_starts_a_daemon_that_never_restores,
    operator_restore_in
);

fn operator_restore_in(mode: Mode) {
    let scratch = Scratch::new(
        &format!("ctl-restore-{}", mode.name()),
        Duration::from_secs(60),
    );
    let size = mode.export("4MiB");
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", &size)]));
    let _faulty = broker.faulty(&scratch, "vol0", "no-restore", &[]);
    broker.wait_status("vol0", Duration::from_secs(10), "an attached daemon", |s| {
        s["daemon"]["state"] == "attached"
    });
    let write = write_in_thread(&broker, "vol0", 0, 3);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!write.is_finished(), "dispatched before RESTORE");
    assert_eq!(broker.status("vol0")["pending"], 1);

    let out = broker.ctl(&["restore", "vol0"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("restored"));
    write.join().unwrap().unwrap();
    assert_eq!(broker.status("vol0")["daemon"]["state"], "active");
}

// In direct mode the daemon then gets the 64 requests the broker held.
holdfast_tests::both_modes!(
    an_export_without_a_daemon_does_not_stall_another,
    direct_an_export_without_a_daemon_does_not_stall_another,
    without_a_daemon_no_stall
);

fn without_a_daemon_no_stall(mode: Mode) {
    // The kernel limits background requests (with FUSE_ASYNC_DIO, every
    // O_DIRECT request) per FUSE connection; each export has its own.
    let scratch = Scratch::new(
        &format!("ctl-isolation-{}", mode.name()),
        Duration::from_secs(90),
    );
    let size = mode.export("4MiB");
    let broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", &size), ("vol1", &size)]),
    );
    let _d1 = broker.daemon(&scratch, "vol1", "mem", &[]);
    broker.wait_active("vol1", 0, Duration::from_secs(10));
    // O_DIRECT reads: unlike O_DIRECT writes, they do not queue behind the
    // inode lock, so all of them reach the connection's background limit.
    let stuck: Vec<_> = (0..80u64)
        .map(|i| {
            let f = open_direct(&broker.file("vol0"));
            std::thread::spawn(move || {
                let mut b = AlignedBuf::new(4096);
                f.read_exact_at(&mut b, i * 4096)
            })
        })
        .collect();
    broker.wait_status("vol0", Duration::from_secs(10), "vol0 saturated", |s| {
        s["pending"].as_u64().unwrap_or(0) >= 64
    });
    let started = Instant::now();
    for i in 0..100u64 {
        write_in_thread(&broker, "vol1", i * 4096, 5)
            .join()
            .unwrap()
            .unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "vol1 stalled behind vol0: {:?}",
        started.elapsed()
    );
    let _d0 = broker.daemon(&scratch, "vol0", "mem", &[]);
    for w in stuck {
        w.join().unwrap().unwrap();
    }
}

/// `export rm --force` while a daemon holds a request: the daemon finishes
/// it first (the writer gets its answer, not EIO), or, if it does not within
/// the broker's bound, it is fenced before the request fails. Failed while
/// the daemon could still run it, the write could land after the kernel
/// reused its buffer. Relay mode; direct mode's is below.
#[test]
fn removal_drains_or_fences_the_daemon_first() {
    let scratch = Scratch::new("ctl-rm-inflight", Duration::from_secs(90));
    let size = Mode::Relay.export("4MiB");
    let broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", &size), ("vol1", &size)]),
    );
    let dispatched = |name: &str| {
        broker.wait_status(name, Duration::from_secs(10), "a request in flight", |s| {
            s["inflight"] == 1
        })
    };
    let rm = |name: &str| {
        let out = broker.ctl(&["export", "rm", name, "--force"]);
        assert!(out.status.success(), "{out:?}");
    };

    // Drained: the stopped daemon holds the write, the export is removed,
    // the daemon goes on and answers it.
    let backend = format!("file:{}", scratch.path("vol0.img").display());
    let mut d0 = broker.daemon(&scratch, "vol0", &backend, &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    d0.signal(libc::SIGSTOP);
    let write = write_in_thread(&broker, "vol0", 0, 7);
    dispatched("vol0");
    rm("vol0");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !write.is_finished(),
        "the write failed while its daemon held it"
    );
    d0.signal(libc::SIGCONT);
    write.join().unwrap().unwrap();
    let status = d0
        .wait_timeout(Duration::from_secs(10))
        .expect("daemon exits");
    assert!(status.success(), "{status}:\n{}", d0.log_text());
    assert_eq!(
        std::fs::read(scratch.path("vol0.img")).unwrap()[..4096],
        [7; 4096]
    );

    // Fenced: a daemon that does not finish is killed first, then the
    // write fails.
    let backend = format!("file:{}", scratch.path("vol1.img").display());
    let mut d1 = broker.daemon(&scratch, "vol1", &backend, &[]);
    broker.wait_active("vol1", 0, Duration::from_secs(10));
    d1.signal(libc::SIGSTOP);
    let write = write_in_thread(&broker, "vol1", 0, 9);
    dispatched("vol1");
    rm("vol1");
    let e = write.join().unwrap().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        !d1.is_running(),
        "the write failed before its daemon was fenced"
    );
    assert!(
        broker
            .proc
            .log_text()
            .contains("released with requests it did not finish"),
        "{}",
        broker.proc.log_text()
    );
}

/// `export rm --force` of an export a direct-mode daemon serves: the
/// daemon is told at once, stops reading and answers what it holds; the
/// removal ends once it has closed the connection (the kernel's queue is
/// the broker's again), so users' I/O fails from then on, none of it
/// answered by a daemon that was released. One whose reader holds a
/// request and does not finish is fenced first, and only then does the
/// kernel re-send the request, to the broker, which fails it.
#[test]
fn direct_removal_releases_or_fences_the_daemon_first() {
    use std::os::unix::fs::FileExt;
    let scratch = Scratch::new("ctl-rm-direct", Duration::from_secs(90));
    let size = Mode::Direct.export("4MiB");
    let broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", &size), ("vol1", &size)]),
    );
    let rm = |name: &str| {
        let out = broker.ctl(&["export", "rm", name, "--force"]);
        assert!(out.status.success(), "{out:?}");
    };

    // Serving: released, the daemon exits 0, and the next write fails.
    let backend = format!("file:{}", scratch.path("vol0.img").display());
    let mut d0 = broker.daemon(&scratch, "vol0", &backend, &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    let f = open_direct(&broker.file("vol0"));
    let mut b = AlignedBuf::new(4096);
    b.fill(7);
    f.write_all_at(&b, 0).unwrap();
    rm("vol0");
    let status = d0
        .wait_timeout(Duration::from_secs(10))
        .expect("daemon exits");
    assert!(status.success(), "{status}:\n{}", d0.log_text());
    assert!(
        d0.log_text().contains("detached by the broker"),
        "{}",
        d0.log_text()
    );
    let e = f.write_all_at(&b, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    drop(f);
    assert_eq!(
        std::fs::read(scratch.path("vol0.img")).unwrap()[..8192],
        [[7; 4096], [0; 4096]].concat()
    );

    // Holds a read it takes 20 s over: fenced at the release bound, then
    // the read fails.
    let backend = format!("file:{}", scratch.path("vol1.img").display());
    let mut d1 = broker.daemon(&scratch, "vol1", &backend, &["--read-delay-ms", "20000"]);
    broker.wait_active("vol1", 0, Duration::from_secs(10));
    let f = open_direct(&broker.file("vol1"));
    let read = std::thread::spawn(move || {
        let mut b = AlignedBuf::new(4096);
        f.read_exact_at(&mut b, 0)
    });
    broker.wait_status("vol1", Duration::from_secs(10), "a read held", |s| {
        s["inflight"] == 1
    });
    let started = Instant::now();
    rm("vol1");
    let e = read.join().unwrap().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    assert!(
        !d1.is_running(),
        "the read failed before its daemon was fenced"
    );
    assert!(
        broker
            .proc
            .log_text()
            .contains("released with requests it did not finish"),
        "{}",
        broker.proc.log_text()
    );
}

/// Under systemd (stderr is the stream `JOURNAL_STREAM` names) every line
/// carries its syslog priority, so `journalctl -p warning` works; an
/// operator's action is logged with the caller's uid and pid.
#[test]
fn journal_lines_carry_their_priority() {
    use std::os::unix::fs::MetadataExt;
    let scratch = Scratch::new("journal", Duration::from_secs(60));
    let opts = BrokerOpts::new(&[("vol0", "32MiB")]);
    let log = scratch.path("broker.log");
    std::fs::File::create(&log).unwrap();
    let meta = std::fs::metadata(&log).unwrap();
    let mut cmd = Command::new(bin("holdfast-broker"));
    cmd.args(Broker::args(&scratch, &opts))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    // The same file, truncated: the same inode.
    let proc = scratch.spawn(&mut cmd, "broker.log");
    let mut broker = Broker::started(&scratch, &opts, proc);
    let out = broker.ctl(&["restore", "vol0", "--fail-pending"]);
    assert!(out.status.success(), "{out:?}");
    broker.stop();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("<6>[") && l.contains("ready: socket")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("<4>[") && l.contains("operator failed")),
        "{text}"
    );
    // The operator's action, with who asked.
    let uid = rustix::process::geteuid().as_raw();
    assert!(
        text.lines()
            .any(|l| l.contains(&format!("audit: uid={uid} pid="))
                && l.contains("action=restore export=vol0 fail_pending=true: accepted")),
        "{text}"
    );
    for line in text.lines() {
        assert!(
            ["<3>", "<4>", "<6>"].iter().any(|p| line.starts_with(p)),
            "a line without its priority: {line:?}"
        );
    }
}
