//! The broker's own restart, under verified writers on two exports: vol0's
//! FUSE file (the writer/verifier `hf-verify`) and vol1's loop device (fio
//! write+verify passes), with the file and mem backends. Upgrades in place
//! (`holdfastctl broker upgrade`), and SIGKILLs restarted through a file
//! descriptor store by a service manager that speaks systemd's protocol.
//! No writer may see an error or a block that lost its last acknowledged
//! write, and the daemons are never restarted. Also: SIGHUP, and a second
//! broker on a live broker's socket.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use holdfast_tests::block::{check_fio_blocks, fio, fio_verify_args, require_tool};
use holdfast_tests::service::ServiceManager;
use holdfast_tests::{
    Broker, BrokerOpts, Mode, Rng, Scratch, bin, check_backing, seed, stop_writer, writer,
};

/// Bytes of each export.
const SIZE: u64 = 32 << 20;

/// The daemon command line for `export` on `backend`.
fn daemon_line(scratch: &Scratch, export: &str, backend: &str) -> String {
    format!(
        "{} --socket {} --export {export} --backend {backend}",
        bin("holdfast-daemon").display(),
        scratch.path("broker.sock").display()
    )
}

/// The active daemon of each export: (pid, epoch).
fn daemons(broker: &Broker, after: &[u64; 2]) -> [(u32, u64); 2] {
    let t = Duration::from_secs(30);
    [
        broker.wait_active("vol0", after[0], t),
        broker.wait_active("vol1", after[1], t),
    ]
}

/// Runs `rounds` of `restart` while hf-verify writes vol0's file (saving
/// the generations to `gens`) and fio passes write and verify vol1's
/// device; after each round both exports must be served again by the
/// same daemons. Checks every block of vol1 at the end (against `img1`
/// when it has a backing file) and returns the writer's report.
fn under_writers(
    scratch: &Scratch,
    broker: &mut Broker,
    img1: Option<&Path>,
    (rounds, seed): (u32, u64),
    mut restart: impl FnMut(&mut Broker, u32),
) -> serde_json::Value {
    require_tool("fio", "fio");
    let first = daemons(broker, &[0, 0]);
    let dev = broker.device("vol1");
    let mut w = writer(
        scratch,
        &broker.file("vol0"),
        4,
        seed,
        Some(&scratch.path("gens")),
    );
    let running = AtomicBool::new(true);
    // A round that panics ends the fio passes too (the scope waits for
    // them before the panic goes on).
    struct Stop<'a>(&'a AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(false, Ordering::SeqCst);
        }
    }
    let passes = std::thread::scope(|s| {
        let fio_passes = s.spawn(|| {
            let mut pass = 0u64;
            while running.load(Ordering::SeqCst) || pass == 0 {
                let args = fio_verify_args(&dev, SIZE, seed.wrapping_add(pass));
                fio(
                    scratch,
                    &format!("pass{pass}"),
                    &args,
                    Duration::from_secs(300),
                );
                pass += 1;
            }
            pass
        });
        let stop = Stop(&running);
        let mut rng = Rng::new(seed);
        let mut now = first;
        for i in 0..rounds {
            std::thread::sleep(Duration::from_millis(rng.range(20, 120)));
            assert!(w.is_running(), "writer died:\n{}", w.log_text());
            restart(broker, i);
            let next = daemons(broker, &[now[0].1, now[1].1]);
            for (export, (a, b)) in ["vol0", "vol1"].iter().zip(first.iter().zip(&next)) {
                assert_eq!(
                    a.0,
                    b.0,
                    "{export}: its daemon changed at round {i}\n{}",
                    broker.proc.log_text()
                );
            }
            now = next;
        }
        drop(stop);
        fio_passes.join().unwrap()
    });
    let report = stop_writer(&mut w);
    for export in ["vol0", "vol1"] {
        let st = broker.status(export);
        assert_eq!(st["failed"], 0, "{export}: {st}");
        assert_eq!(st["rejected_completions"], 0, "{export}: {st}");
    }
    check_fio_blocks(&dev, img1, SIZE, 4096);
    eprintln!("{rounds} rounds over {passes} fio passes; writer: {report}");
    report
}

/// Writes `bytes` at the start of an export's file (its size is fixed:
/// no truncation).
fn put(file: &Path, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(bytes, 0).unwrap();
}

// Direct-mode daemons stop reading when the broker goes, and attach to
// the next one; the new broker re-sends what they had not answered.
holdfast_tests::both_modes!(
    upgrades_under_verified_writers,
    direct_upgrades_under_verified_writers,
    upgrades_in
);

fn upgrades_in(mode: Mode) {
    let scratch = Scratch::new(
        &format!("upgrades-{}", mode.name()),
        Duration::from_secs(600),
    );
    let img1 = scratch.path("vol1.img");
    let (vol0, vol1) = (mode.export("32MiB"), mode.export("32MiB,block"));
    let opts = BrokerOpts::new(&[("vol0", &vol0), ("vol1", &vol1)])
        .arg("--supervise")
        .arg(&daemon_line(&scratch, "vol0", "mem"));
    let mut broker = Broker::start(&scratch, opts);
    let _d1 = broker.daemon(&scratch, "vol1", &format!("file:{}", img1.display()), &[]);
    let pid = broker.proc.pid();
    let mut resent = 0;
    under_writers(
        &scratch,
        &mut broker,
        Some(&img1),
        (50, seed()),
        |broker, i| {
            let out = broker.ctl(&["broker", "upgrade", "--json"]);
            assert!(
                out.status.success(),
                "upgrade {i}: {out:?}\n{}",
                broker.proc.log_text()
            );
            let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(r["old_pid"], pid, "{r}");
            assert_eq!(r["new_pid"], pid, "{r}");
            assert_eq!(r["reattached"], 2, "{r}");
            assert_eq!(r["missing"].as_array().map(Vec::len), Some(0), "{r}");
            resent += r["resent"].as_u64().unwrap();
        },
    );
    eprintln!("requests re-sent across 50 upgrades: {resent}");
    // A direct daemon answers what it read before it attaches again; what
    // the new broker's workers read meanwhile is new, not re-sent.
    if mode == Mode::Relay {
        assert!(resent > 0, "no upgrade hit a request in flight");
    }
    assert!(broker.proc.is_running());
}

// A broker killed under direct-mode daemons: they stop reading when it
// goes, attach to the next one, which re-sends what they had not answered.
holdfast_tests::both_modes!(
    sigkills_restarted_through_an_fd_store,
    direct_sigkills_restarted_through_an_fd_store,
    sigkills_in
);

fn sigkills_in(mode: Mode) {
    let deadline = Duration::from_secs(600);
    let scratch = Scratch::new(&format!("sigkills-{}", mode.name()), deadline);
    let img0 = scratch.path("vol0.img");
    let (vol0, vol1) = (mode.export("32MiB"), mode.export("32MiB,block"));
    let opts = BrokerOpts::new(&[("vol0", &vol0), ("vol1", &vol1)])
        .arg("--supervise")
        .arg(&daemon_line(
            &scratch,
            "vol0",
            &format!("file:{}", img0.display()),
        ));
    let mut sm = ServiceManager::new(
        &scratch,
        &bin("holdfast-broker"),
        Broker::args(&scratch, &opts),
        deadline,
    );
    let proc = sm.start(&scratch);
    let mut broker = Broker::started(&scratch, &opts, proc);
    sm.wait_ready(1, Duration::from_secs(15));
    let d1 = broker.daemon(&scratch, "vol1", "mem", &[]);
    broker.wait_active("vol1", 0, Duration::from_secs(10));
    let stored = sm.stored();
    for want in [
        "listen",
        "state.",
        "fuse.vol0.",
        "fuse.vol1.",
        "store.vol1.",
    ] {
        assert!(
            stored.iter().any(|n| n.starts_with(want)),
            "no {want} in the fd store: {stored:?}"
        );
    }
    let kills = 20;
    let gens = scratch.path("gens");
    let seed = seed();
    under_writers(&scratch, &mut broker, None, (kills, seed), |broker, i| {
        broker.proc.kill();
        broker.proc = sm.start(&scratch);
        sm.wait_ready(i + 2, Duration::from_secs(30));
    });
    let resent = (1..=kills)
        .map(|i| holdfast_tests::read_text(&scratch.path(&format!("broker-{i}.log"))))
        .filter(|log| log.contains("the kernel re-sends what was read"))
        .count();
    eprintln!("restarts that found requests re-sent by the kernel: {resent} of {kills}");
    // A direct daemon answers what it read itself (see upgrades_in).
    if mode == Mode::Relay {
        assert!(resent > 0, "no SIGKILL hit a request in flight");
    }
    let (ready, _, _, status, refused) = sm.counts();
    assert_eq!(ready, kills + 1);
    assert_eq!(
        refused, 0,
        "notifications from processes other than the main one"
    );
    assert!(status.starts_with("serving"), "{status}");
    // Each restart removed the record before it from the store.
    let states = sm
        .stored()
        .iter()
        .filter(|n| n.starts_with("state."))
        .count();
    assert_eq!(states, 1, "{:?}", sm.stored());
    drop(d1);
    // The supervised vol0 daemon detaches at the broker's SIGTERM; then its
    // backing file holds every acknowledged write.
    broker.stop();
    check_backing(&scratch, &img0, &gens, seed);
    let (_, _, stopping, _, _) = sm.counts();
    assert_eq!(stopping, 1);
    assert!(
        sm.stored().is_empty(),
        "a stop leaves nothing: {:?}",
        sm.stored()
    );
}

#[test]
fn sighup_leaves_the_broker_serving() {
    let scratch = Scratch::new("sighup", Duration::from_secs(60));
    let mut broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", "4MiB")]));
    let _d = broker.daemon(&scratch, "vol0", "mem", &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    broker.proc.signal(libc::SIGHUP);
    std::thread::sleep(Duration::from_millis(300));
    assert!(broker.proc.is_running(), "{}", broker.proc.log_text());
    put(&broker.file("vol0"), b"still here");
    assert_eq!(
        &std::fs::read(broker.file("vol0")).unwrap()[..10],
        b"still here"
    );
    assert!(broker.proc.log_text().contains("SIGHUP ignored"));
}

#[test]
fn a_second_broker_on_a_live_socket_is_refused() {
    let scratch = Scratch::new("second", Duration::from_secs(60));
    let opts = BrokerOpts::new(&[("vol0", "4MiB")]);
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", "4MiB")]));
    let out = Command::new(bin("holdfast-broker"))
        .args(Broker::args(&scratch, &opts))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("broker pid {} is serving", broker.proc.pid())),
        "{err}"
    );
    // The first one still answers on its socket.
    let st = broker.status("vol0");
    assert_eq!(st["name"], "vol0");
}

/// An `execve` cannot be taken back, so an upgrade to a binary that is not
/// a broker able to read this one's record is refused, and the broker
/// serves on. (The refusals for exports that cannot be kept, such as FUSE
/// on a kernel without FUSE_NOTIFY_RESEND, are unit tests of the broker.)
#[test]
fn an_upgrade_to_a_binary_that_cannot_take_over_is_refused() {
    let scratch = Scratch::new("bad-upgrade", Duration::from_secs(60));
    // The broker runs from a copy, which is then replaced by something else.
    let copy = scratch.path("holdfast-broker");
    std::fs::copy(bin("holdfast-broker"), &copy).unwrap();
    let opts = BrokerOpts::new(&[("vol0", "4MiB")]);
    let mut cmd = Command::new(&copy);
    cmd.args(Broker::args(&scratch, &opts));
    let proc = scratch.spawn(&mut cmd, "broker.log");
    let broker = Broker::started(&scratch, &opts, proc);
    let _d = broker.daemon(&scratch, "vol0", "mem", &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    std::fs::remove_file(&copy).unwrap();
    std::fs::write(&copy, "#!/bin/sh\necho not a broker\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = broker.ctl(&["broker", "upgrade"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not a broker that can take over"), "{err}");
    put(&broker.file("vol0"), b"serving on");
    // Nothing was handed over: the same broker and daemon serve on.
    assert_eq!(broker.status("vol0")["daemon"]["epoch"], 1);
    let log = broker.proc.log_text();
    assert!(log.contains("upgrade failed, this broker goes on"), "{log}");
    assert!(log.contains("action=broker-upgrade: requested"), "{log}");
}
