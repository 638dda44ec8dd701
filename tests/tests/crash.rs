//! Crash restore under load: a writer/verifier process does O_DIRECT writes
//! of checksummed 4 KiB blocks while the daemon is SIGKILLed at random
//! moments and replaced. The writer must see no error, and every block must
//! hold its last acknowledged write, through the mount and, for the file
//! backend, in the backing file itself.

use std::time::Duration;

use holdfast_tests::{
    Broker, BrokerOpts, Mode, Rng, Scratch, check_backing, seed, stop_writer, writer,
};

/// Runs `kills` SIGKILL/restart cycles of a daemon on `backend` in `mode`
/// under the writer. In direct mode the kernel re-sends what a killed
/// daemon read (the broker counts those it sees as replayed).
fn crash_loop(name: &str, backend: &str, kills: u32, mode: Mode) {
    let scratch = Scratch::new(name, Duration::from_secs(300));
    let size = mode.export("32MiB");
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", &size)]));
    let backend = backend.replace("@", scratch.dir.to_str().unwrap());
    let mut daemon = broker.daemon(&scratch, "vol0", &backend, &[]);
    let (_, mut epoch) = broker.wait_active("vol0", 0, Duration::from_secs(10));
    assert_eq!(broker.status("vol0")["daemon"]["mode"], mode.name());

    let state = scratch.path("gens");
    let seed = seed();
    let mut writer = writer(&scratch, &broker.file("vol0"), 4, seed, Some(&state));
    let mut rng = Rng::new(seed);
    let mut hit_inflight = 0;
    for i in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.range(5, 120)));
        let before = broker.status("vol0");
        daemon.kill();
        // (Direct mode: the daemon's own; the broker shows none.)
        if before["inflight"].as_u64().unwrap_or(0) > 0 {
            hit_inflight += 1;
        }
        // Sometimes let requests pile up with no daemon at all.
        if i % 5 == 0 {
            std::thread::sleep(Duration::from_millis(rng.range(10, 200)));
        }
        assert!(writer.is_running(), "writer died:\n{}", writer.log_text());
        daemon = broker.daemon(&scratch, "vol0", &backend, &[]);
        epoch = broker.wait_active("vol0", epoch, Duration::from_secs(20)).1;
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = stop_writer(&mut writer);
    let status = broker.status("vol0");
    eprintln!(
        "writer: {report}\nbroker: {status}\nkills with requests in flight: {hit_inflight}/{kills}"
    );
    assert!(report["writes"].as_u64().unwrap() > u64::from(kills));
    assert_eq!(status["daemons_lost"], u64::from(kills));
    assert!(
        status["replayed"].as_u64().unwrap() > 0,
        "no kill hit a request in flight: {status}"
    );
    assert_eq!(status["failed"], 0);
    assert_eq!(status["rejected_completions"], 0);

    // Second oracle: the backing file itself, read after a clean detach.
    if let Some(img) = backend.strip_prefix("file:") {
        daemon.signal(libc::SIGTERM);
        assert!(
            daemon
                .wait_timeout(Duration::from_secs(10))
                .is_some_and(|s| s.success())
        );
        check_backing(&scratch, img.as_ref(), &state, seed);
    }
}

#[test]
fn crash_loop_file_backend() {
    crash_loop("crash-file", "file:@/vol0.img", 60, Mode::Relay);
}

#[test]
fn crash_loop_mem_backend() {
    crash_loop("crash-mem", "mem", 20, Mode::Relay);
}

#[test]
fn direct_crash_loop_file_backend() {
    crash_loop("direct-crash-file", "file:@/vol0.img", 60, Mode::Direct);
}

#[test]
fn direct_crash_loop_mem_backend() {
    crash_loop("direct-crash-mem", "mem", 20, Mode::Direct);
}

/// SIGKILL through a pidfd (`signal_pid`); a daemon already gone is fine.
fn kill_pid(pid: u32) {
    let _ = holdfast_tests::signal_pid(pid, rustix::process::Signal::KILL);
}

#[test]
fn supervised_daemon_is_restarted() {
    let scratch = Scratch::new("supervise", Duration::from_secs(180));
    let img = scratch.path("vol0.img");
    let socket = scratch.path("broker.sock");
    let cmd = format!(
        "{} --socket {} --export vol0 --backend file:{}",
        holdfast_tests::bin("holdfast-daemon").display(),
        socket.display(),
        img.display()
    );
    let mut broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", "16MiB")])
            .arg("--supervise")
            .arg(&cmd),
    );
    let (mut pid, mut epoch) = broker.wait_active("vol0", 0, Duration::from_secs(10));
    let seed = seed();
    let mut writer = writer(&scratch, &broker.file("vol0"), 2, seed, None);
    let mut rng = Rng::new(seed);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(rng.range(20, 200)));
        kill_pid(pid);
        let (p, e) = broker.wait_active("vol0", epoch, Duration::from_secs(20));
        assert_ne!(p, pid, "the supervisor did not start a new daemon");
        (pid, epoch) = (p, e);
    }
    stop_writer(&mut writer);
    let sup = &broker.status("vol0")["supervisor"];
    assert_eq!(sup["pid"], pid, "{sup}");
    assert_eq!(sup["restarts"], 10, "{sup}");
    assert_eq!(sup["cmd"], cmd.as_str(), "{sup}");
    let exit = sup["last_exit"].as_str().unwrap_or_default();
    assert!(exit.starts_with("signal 9 after "), "{sup}");
    let table = String::from_utf8_lossy(&broker.ctl(&["status"]).stdout).into_owned();
    assert!(
        table.contains(&format!("vol0: supervised: daemon pid {pid}, 10 restarts")),
        "{table}"
    );
    // SIGTERM to the broker stops the supervised daemon cleanly too.
    broker.stop();
    assert!(
        !broker.proc.log_text().contains("panicked"),
        "{}",
        broker.proc.log_text()
    );
    let alive = rustix::process::Pid::from_raw(pid as i32)
        .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok());
    assert!(alive.is_none(), "the supervised daemon outlived the broker");
}
