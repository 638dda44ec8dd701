//! The s3:// backend against a real S3 server (moto's, on 127.0.0.1): data
//! round trip through S3, SIGKILLs and handoffs under a verified writer, a
//! stale daemon that must not overwrite its successor's data, and the
//! store stopping in the middle of uploads. Each test's second oracle reads
//! the volume back through a daemon with an empty cache directory, so what
//! it checks came from S3, and then checks that the chunk objects of
//! abandoned uploads were collected.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use holdfast_tests::prometheus::{get, parse};
use holdfast_tests::s3::{Fault, FaultProxy, Moto, s3_env};
use holdfast_tests::{
    AlignedBuf, Broker, BrokerOpts, Mode, Proc, Rng, Scratch, check_backing, handoff_report,
    open_direct, seed, stop_writer, write_in_thread, writer,
};

const BUCKET: &str = "holdfast-test";

/// A broker with export vol0 of `size`, and moto with the bucket.
fn setup(name: &str, size: &str) -> (Scratch, Moto, Broker) {
    let scratch = Scratch::new(name, Duration::from_secs(600));
    let moto = Moto::start(&scratch);
    moto.create_bucket(BUCKET);
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", size)]));
    (scratch, moto, broker)
}

/// The daemon command line for vol0 on `s3://BUCKET/prefix` with cache
/// directory `cache` (under the scratch directory).
fn s3_daemon(
    broker: &Broker,
    scratch: &Scratch,
    endpoint: &str,
    cache: &str,
    extra: &[&str],
) -> Command {
    let cache = scratch.path(cache);
    let mut args = vec![
        "--cache-dir",
        cache.to_str().unwrap(),
        "--endpoint",
        endpoint,
        "--chunk-size",
        "1MiB",
    ];
    args.extend_from_slice(extra);
    let backend = format!("s3://{BUCKET}/vol");
    let mut cmd = broker.daemon_cmd("vol0", &backend, &args);
    s3_env(&mut cmd);
    cmd
}

fn start(broker: &Broker, scratch: &Scratch, moto: &Moto, cache: &str, extra: &[&str]) -> Proc {
    broker.daemon_with(
        scratch,
        s3_daemon(broker, scratch, &moto.endpoint, cache, extra),
        "vol0",
    )
}

/// Detaches `daemon` with SIGTERM (it uploads its whole log first) and
/// checks it exits 0.
fn detach(daemon: &mut Proc) {
    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_timeout(Duration::from_secs(90))
        .unwrap_or_else(|| panic!("daemon did not detach:\n{}", daemon.log_text()));
    assert!(status.success(), "{status}:\n{}", daemon.log_text());
    assert!(
        daemon.log_text().contains("every write is in S3"),
        "{}",
        daemon.log_text()
    );
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < end, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `data` at `offset` of vol0 (O_DIRECT) and fsyncs.
fn write_at(broker: &Broker, offset: u64, data: &[u8]) {
    let f = open_direct(&broker.file("vol0"));
    let mut b = AlignedBuf::new(data.len());
    b.copy_from_slice(data);
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

fn read_at(broker: &Broker, offset: u64, len: usize) -> Vec<u8> {
    let f = open_direct(&broker.file("vol0"));
    let mut b = AlignedBuf::new(len);
    f.read_exact_at(&mut b, offset).unwrap();
    b.to_vec()
}

#[test]
fn round_trip_through_s3() {
    let (scratch, moto, broker) = setup("s3-roundtrip", "16MiB");
    let mut daemon = start(
        &broker,
        &scratch,
        &moto,
        "cache-a",
        &["--checkpoint-ms", "200"],
    );
    let (_, epoch) = broker.wait_active("vol0", 0, Duration::from_secs(30));

    // Writes across chunk boundaries, a discard, and a rewrite.
    let mut rng = Rng::new(seed());
    let mut expect = vec![0u8; 16 << 20];
    let put = |offset: usize, len: usize, rng: &mut Rng, expect: &mut Vec<u8>| {
        let mut d = vec![0u8; len];
        rng.fill(&mut d);
        write_at(&broker, offset as u64, &d);
        expect[offset..offset + len].copy_from_slice(&d);
    };
    put(0, 8192, &mut rng, &mut expect);
    put((1 << 20) - 4096, 3 * 4096, &mut rng, &mut expect);
    put(5 << 20, 1 << 20, &mut rng, &mut expect);
    put((16 << 20) - 4096, 4096, &mut rng, &mut expect);
    put(4096, 4096, &mut rng, &mut expect);
    assert_eq!(read_at(&broker, 0, 16 << 20), expect, "before any upload");

    // The checkpointer uploads within its interval: chunks 0, 1, 5 and 15.
    wait_for("chunks in S3", Duration::from_secs(30), || {
        moto.manifest(BUCKET, "vol")
            .is_some_and(|(_, c)| c.len() == 4)
    });
    assert_eq!(read_at(&broker, 0, 16 << 20), expect, "after the upload");
    let (fields, chunks) = moto.manifest(BUCKET, "vol").unwrap();
    eprintln!("manifest: {fields:?} {chunks:?}");
    for key in &chunks {
        assert_eq!(
            moto.get(BUCKET, &format!("vol/{key}")).unwrap().len(),
            1 << 20
        );
    }

    // A rewrite of a stored chunk replaces its object and deletes the old.
    put(4096, 4096, &mut rng, &mut expect);
    let gen_before = moto.generation(BUCKET, "vol");
    wait_for("the rewrite in S3", Duration::from_secs(30), || {
        moto.generation(BUCKET, "vol") > gen_before
    });
    wait_for("old chunk deleted", Duration::from_secs(10), || {
        moto.keys(BUCKET, "vol/chunks/").len() == 4
    });
    detach(&mut daemon);

    // A daemon with an empty cache directory reads it all from S3.
    let _daemon = start(&broker, &scratch, &moto, "cache-b", &[]);
    broker.wait_active("vol0", epoch, Duration::from_secs(30));
    assert_eq!(read_at(&broker, 0, 16 << 20), expect, "from S3 alone");
    backend_figures_are_reported(&broker);
}

/// The daemon's backend figures (REPORT, every second) in `status` and
/// in the metrics, after reads that fetched from S3.
fn backend_figures_are_reported(broker: &Broker) {
    wait_for("the backend's figures", Duration::from_secs(10), || {
        broker.status("vol0")["backend"]["cache_misses"].as_u64() > Some(0)
    });
    let b = &broker.status("vol0")["backend"];
    assert_eq!(b["log_limit_bytes"], 1u64 << 30, "{b}");
    for key in [
        "log_bytes",
        "upload_backlog_bytes",
        "checkpoint_age_ms",
        "cache_hits",
    ] {
        assert!(b[key].is_u64(), "{key} in {b}");
    }
    let table = String::from_utf8_lossy(&broker.ctl(&["status"]).stdout).into_owned();
    assert!(table.contains("vol0: backend: log_bytes "), "{table}");
    let metrics = String::from_utf8_lossy(&broker.ctl(&["metrics"]).stdout).into_owned();
    assert!(
        metrics.contains("# TYPE holdfast_backend_cache_misses_total counter\n"),
        "{metrics}"
    );
    let samples = parse(&metrics);
    let limit = get(
        &samples,
        "holdfast_backend_log_limit_bytes{export=\"vol0\"}",
    );
    assert_eq!(limit, (1u64 << 30) as f64);
    assert!(
        get(
            &samples,
            "holdfast_backend_cache_misses_total{export=\"vol0\"}"
        ) > 0.0
    );
    get(
        &samples,
        "holdfast_backend_checkpoint_age_seconds{export=\"vol0\"}",
    );
}

/// The second oracle: detach `daemon` (it uploads its log), then check
/// every block the writer saved in `state` through a daemon with an empty
/// cache directory, so from S3 alone.
fn check_from_s3(
    broker: &Broker,
    scratch: &Scratch,
    moto: &Moto,
    daemon: &mut Proc,
    state: &std::path::Path,
    seed: u64,
) {
    detach(daemon);
    let epoch = broker.status("vol0")["daemon"]["epoch"]
        .as_u64()
        .unwrap_or(0);
    let _fresh = start(broker, scratch, moto, "cache-check", &[]);
    broker.wait_active("vol0", epoch, Duration::from_secs(30));
    check_backing(scratch, &broker.file("vol0"), state, seed);
    // Its claim collects what abandoned checkpoints left: then the bucket
    // holds exactly the chunks the manifest names.
    wait_for("orphans collected", Duration::from_secs(30), || {
        let (_, mut named) = moto.manifest(BUCKET, "vol").unwrap();
        named.sort();
        let mut stored = moto.keys(BUCKET, "vol/chunks/");
        stored.sort();
        stored
            .iter()
            .map(|k| &k[4..])
            .eq(named.iter().map(String::as_str))
    });
}

/// Chunk objects no manifest will name (uploaded for the claimed
/// generation or before) are deleted at a claim; newer ones, which a
/// successor may be about to name, and objects of other names are kept.
#[test]
fn orphans_are_collected() {
    let (scratch, moto, broker) = setup("s3-orphans", "8MiB");
    let orphan = "vol/chunks/00000000.0000000000000001.00aa.0";
    let newer = "vol/chunks/00000001.0000000000000009.00bb.0";
    let other = "vol/chunks/notes";
    for key in [orphan, newer, other] {
        moto.put(BUCKET, key, b"x");
    }
    let daemon = start(&broker, &scratch, &moto, "cache", &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(30));
    wait_for("the orphan deleted", Duration::from_secs(30), || {
        moto.get(BUCKET, orphan).is_none()
    });
    let mut kept = moto.keys(BUCKET, "vol/chunks/");
    kept.sort();
    assert_eq!(kept, [newer, other]);
    wait_for("the log line", Duration::from_secs(10), || {
        daemon
            .log_text()
            .contains("removed 1 orphaned chunk objects")
    });
}

/// Small log and read cache (4 chunks) and frequent checkpoints, so that
/// uploads, back-pressure and evictions all happen under the writer.
const BUSY: [&str; 6] = [
    "--checkpoint-ms",
    "100",
    "--log-size",
    "4MiB",
    "--read-cache-size",
    "4MiB",
];

holdfast_tests::both_modes!(
    twenty_kills_under_verified_writer,
    direct_twenty_kills_under_verified_writer,
    kills_under_verified_writer
);

fn kills_under_verified_writer(mode: Mode) {
    let name = format!("s3-kills-{}", mode.name());
    let (scratch, moto, broker) = setup(&name, &mode.export("32MiB"));
    let mut daemon = start(&broker, &scratch, &moto, "cache", &BUSY);
    let (_, mut epoch) = broker.wait_active("vol0", 0, Duration::from_secs(30));
    let state = scratch.path("gens");
    let seed = seed();
    let mut writer = writer(&scratch, &broker.file("vol0"), 4, seed, Some(&state));
    let mut rng = Rng::new(seed);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(rng.range(50, 400)));
        daemon.kill();
        assert!(writer.is_running(), "writer died:\n{}", writer.log_text());
        daemon = start(&broker, &scratch, &moto, "cache", &BUSY);
        epoch = broker.wait_active("vol0", epoch, Duration::from_secs(30)).1;
    }
    std::thread::sleep(Duration::from_millis(500));
    let report = stop_writer(&mut writer);
    let status = broker.status("vol0");
    let generation = moto.generation(BUCKET, "vol");
    eprintln!("writer: {report}\nbroker: {status}\nmanifest generation {generation}");
    assert_eq!(status["daemons_lost"], 20);
    assert_eq!(status["failed"], 0);
    // Claims alone make 21 generations; checkpoints happened between kills.
    assert!(
        generation > 21,
        "no checkpoint landed: generation {generation}"
    );
    check_from_s3(&broker, &scratch, &moto, &mut daemon, &state, seed);
}

holdfast_tests::both_modes!(
    ten_handoffs_under_verified_writer,
    direct_ten_handoffs_under_verified_writer,
    handoffs_under_verified_writer
);

fn handoffs_under_verified_writer(mode: Mode) {
    let name = format!("s3-handoffs-{}", mode.name());
    let (scratch, moto, broker) = setup(&name, &mode.export("32MiB"));
    let mut daemon = start(&broker, &scratch, &moto, "cache", &BUSY);
    broker.wait_active("vol0", 0, Duration::from_secs(30));
    let state = scratch.path("gens");
    let seed = seed();
    let mut writer = writer(&scratch, &broker.file("vol0"), 4, seed, Some(&state));
    let mut stalls = Vec::new();
    // Log records the successors read while warming up, and at ACTIVATE.
    let (mut read_warm, mut read_now) = (0, 0);
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        let (mut conn, from) = broker.arm_handoff("vol0", false, 0);
        let mut extra = BUSY.to_vec();
        extra.push("--successor");
        let next = start(&broker, &scratch, &moto, "cache", &extra);
        let r = handoff_report(&mut conn);
        assert_eq!(
            r.outcome,
            holdfast_proto::HandoffOutcome::Completed,
            "{r:?}\nold:\n{}\nnew:\n{}",
            daemon.log_text(),
            next.log_text()
        );
        assert_eq!((r.from_pid, r.to_pid), (from, next.pid()));
        let status = daemon.wait_timeout(Duration::from_secs(30)).unwrap();
        assert!(status.success(), "{status}\n{}", daemon.log_text());
        stalls.push(r.stall_us);
        let (warm, now) = log_reads(&next.log_text());
        read_warm += warm;
        read_now += now;
        daemon = next;
        assert!(writer.is_running(), "writer died:\n{}", writer.log_text());
    }
    let report = stop_writer(&mut writer);
    let status = broker.status("vol0");
    stalls.sort_unstable();
    eprintln!(
        "writer: {report}\nbroker: {status}\nstall us: median {} max {}\n\
         log records read by successors: {read_warm} while warming up, {read_now} at ACTIVATE",
        stalls[stalls.len() / 2],
        stalls[stalls.len() - 1]
    );
    // The successors read the log while warming up, not in the stall.
    assert!(read_warm > read_now, "{read_warm} vs {read_now}");
    assert_eq!(status["daemons_lost"], 0);
    assert_eq!(status["failed"], 0);
    check_from_s3(&broker, &scratch, &moto, &mut daemon, &state, seed);
}

/// From a daemon's "claimed" line: the log records it read while warming
/// up, and when it took the lease.
fn log_reads(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .find(|l| l.contains("records read while warming up"))
        .unwrap_or_else(|| panic!("no claim in:\n{log}"));
    let (warm, rest) = line.rsplit_once('(').unwrap().1.split_once(' ').unwrap();
    let now = rest.rsplit_once(", ").unwrap().1.split(' ').next().unwrap();
    (warm.parse().unwrap(), now.parse().unwrap())
}

/// A daemon stopped (SIGSTOP) with writes in its log while a daemon on
/// another "host" (its own broker and cache directory) takes the volume
/// over and writes; resumed, the stale daemon must not replace the
/// manifest or any chunk it names, and must exit (status 3). A new daemon
/// on the stale cache directory then refuses its log.
#[test]
fn stale_daemon_cannot_overwrite() {
    let (scratch, moto, broker) = setup("s3-stale", "8MiB");
    // A short claim term: the successor takes the claim once the stopped
    // daemon has gone a term without renewing it.
    let mut stale = start(
        &broker,
        &scratch,
        &moto,
        "cache-a",
        &["--checkpoint-ms", "1500", "--claim-term-ms", "2000"],
    );
    broker.wait_active("vol0", 0, Duration::from_secs(30));
    write_at(&broker, 0, &[0xAA; 8192]);
    stale.signal(libc::SIGSTOP);

    let other = Scratch::new("s3-stale-other", Duration::from_secs(600));
    let broker_b = Broker::start(&other, BrokerOpts::new(&[("vol0", "8MiB")]));
    let mut successor = start(
        &broker_b,
        &other,
        &moto,
        "cache-b",
        &["--checkpoint-ms", "100"],
    );
    broker_b.wait_active("vol0", 0, Duration::from_secs(30));
    assert!(
        successor.log_text().contains("is claimed by"),
        "{}",
        successor.log_text()
    );
    write_at(&broker_b, 4096, &[0xBB; 4096]);
    wait_for("the successor's chunk", Duration::from_secs(30), || {
        moto.manifest(BUCKET, "vol")
            .is_some_and(|(_, c)| c.len() == 1)
    });
    let (fields, chunks) = moto.manifest(BUCKET, "vol").unwrap();
    let chunk = moto.get(BUCKET, &format!("vol/{}", chunks[0])).unwrap();

    stale.signal(libc::SIGCONT);
    let status = stale
        .wait_timeout(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("stale daemon still running:\n{}", stale.log_text()));
    assert_eq!(status.code(), Some(3), "{}", stale.log_text());
    assert!(
        stale.log_text().contains("superseded"),
        "{}",
        stale.log_text()
    );
    assert_eq!(moto.manifest(BUCKET, "vol"), Some((fields, chunks.clone())));
    assert_eq!(moto.get(BUCKET, &format!("vol/{}", chunks[0])), Some(chunk));
    // The successor's data, not the stale daemon's.
    let mut want = vec![0u8; 8192];
    want[4096..].fill(0xBB);
    assert_eq!(read_at(&broker_b, 0, 8192), want);

    // The stale cache directory's log may not be replayed over it.
    let mut again = start(&broker, &scratch, &moto, "cache-a", &[]);
    let status = again.wait_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(
        again
            .log_text()
            .contains("taken over by a daemon of another cache directory"),
        "{}",
        again.log_text()
    );
    successor.kill();
}

/// A cache directory restored from an older copy: its log holds a write
/// that S3 has since been given newer data for. The manifest says which
/// log segments its chunks cover, so the next daemon skips them instead of
/// replaying the old write over the new one.
#[test]
fn restored_cache_dir_is_not_replayed_over_newer_data() {
    let (scratch, moto, broker) = setup("s3-restored", "8MiB");
    let mut first = start(
        &broker,
        &scratch,
        &moto,
        "cache",
        &["--checkpoint-ms", "600000"],
    );
    broker.wait_active("vol0", 0, Duration::from_secs(30));
    write_at(&broker, 0, &[0x01; 4096]);
    let (cache, copy) = (scratch.path("cache"), scratch.path("cache-copy"));
    let cp = Command::new("cp").arg("-a").arg(&cache).arg(&copy).status();
    assert!(cp.unwrap().success());
    write_at(&broker, 0, &[0x02; 4096]);
    detach(&mut first);

    std::fs::remove_dir_all(&cache).unwrap();
    std::fs::rename(&copy, &cache).unwrap();
    let mut second = start(&broker, &scratch, &moto, "cache", &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(30));
    assert_eq!(read_at(&broker, 0, 4096), [0x02; 4096]);
    assert!(
        second.log_text().contains("are in S3 already"),
        "{}",
        second.log_text()
    );
    // Writes go on after the covered segments, and reach S3.
    write_at(&broker, 4096, &[0x03; 4096]);
    detach(&mut second);
    let mut third = start(&broker, &scratch, &moto, "cache-fresh", &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(30));
    let mut want = vec![0x02; 8192];
    want[4096..].fill(0x03);
    assert_eq!(read_at(&broker, 0, 8192), want);
    third.kill();
}

/// A store with quirks that are no takeover: deletes of replaced chunks
/// refused (403), PUT answers whose ETags are unquoted while If-Match
/// takes only the quoted form, and a manifest PUT applied but answered
/// 500. The daemon
/// goes on checkpointing, does not exit as superseded, and S3 holds every
/// write.
#[test]
fn store_quirks_are_no_takeover() {
    let (scratch, moto, broker) = setup("s3-quirks", "8MiB");
    let manifest_puts = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let (puts, denied) = (manifest_puts.clone(), refused.clone());
    let proxy = FaultProxy::start(&moto, move |r| {
        let path = r.path.split('?').next().unwrap_or_default();
        match r.method.as_str() {
            "DELETE" if path.contains("/chunks/") => {
                denied.fetch_add(1, Ordering::SeqCst);
                Fault::Refuse(403)
            }
            // A store that compares If-Match literally: the unquoted ETag
            // its own PUT answers gave does not match.
            "PUT"
                if path.ends_with("/manifest")
                    && r.header("if-match").is_some_and(|m| !m.starts_with('"')) =>
            {
                Fault::Refuse(412)
            }
            "PUT" if path.ends_with("/manifest") => {
                if puts.fetch_add(1, Ordering::SeqCst) == 2 {
                    Fault::ApplyThenFail
                } else {
                    Fault::UnquoteEtag
                }
            }
            _ => Fault::Pass,
        }
    });
    let mut daemon = broker.daemon_with(
        &scratch,
        s3_daemon(
            &broker,
            &scratch,
            &proxy.endpoint,
            "cache",
            &["--checkpoint-ms", "100"],
        ),
        "vol0",
    );
    broker.wait_active("vol0", 0, Duration::from_secs(30));
    let mut want = vec![0u8; 6 * 4096];
    for i in 0..6u8 {
        let at = usize::from(i) * 4096;
        want[at..at + 4096].fill(i + 1);
        write_at(&broker, at as u64, &want[at..at + 4096]);
        let generation = moto.generation(BUCKET, "vol");
        wait_for("a checkpoint", Duration::from_secs(30), || {
            moto.generation(BUCKET, "vol") > generation
        });
        assert!(daemon.is_running(), "{}", daemon.log_text());
    }
    assert!(refused.load(Ordering::SeqCst) > 0);
    assert!(manifest_puts.load(Ordering::SeqCst) > 3);
    let log = daemon.log_text();
    assert!(
        log.contains("ETag did not match") && !log.contains("superseded"),
        "{log}"
    );
    detach(&mut daemon);
    // Through moto itself, from an empty cache directory.
    let mut fresh = start(&broker, &scratch, &moto, "cache-fresh", &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(30));
    assert_eq!(read_at(&broker, 0, want.len()), want);
    fresh.kill();
}

/// A store that ignores If-Match and If-None-Match cannot keep two daemons
/// from both writing the volume: the daemon refuses it at start.
#[test]
fn store_ignoring_conditions_is_refused() {
    let (scratch, moto, broker) = setup("s3-no-conditions", "8MiB");
    let proxy = FaultProxy::start(&moto, |_| Fault::DropConditions);
    let mut daemon = broker.daemon_with(
        &scratch,
        s3_daemon(&broker, &scratch, &proxy.endpoint, "cache", &[]),
        "vol0",
    );
    let status = daemon
        .wait_timeout(Duration::from_secs(60))
        .unwrap_or_else(|| {
            panic!(
                "daemon serves a store without conditions:\n{}",
                daemon.log_text()
            )
        });
    assert_eq!(status.code(), Some(1), "{}", daemon.log_text());
    assert!(
        daemon.log_text().contains("ignores conditional writes"),
        "{}",
        daemon.log_text()
    );
    assert_eq!(moto.manifest(BUCKET, "vol"), None);
}

/// Two cache directories on one volume (the reproduction: the
/// second used to claim the volume at once while the first went on
/// acknowledging writes). The second waits while the first renews its
/// claim, and takes over at once when the first detaches cleanly.
#[test]
fn a_second_cache_dir_waits_for_the_claim() {
    let (scratch, moto, broker) = setup("s3-claim", "8MiB");
    let term = ["--claim-term-ms", "2000"];
    let mut a = start(&broker, &scratch, &moto, "cache-a", &term);
    broker.wait_active("vol0", 0, Duration::from_secs(30));
    write_at(&broker, 0, &[0xA1; 4096]);

    let other = Scratch::new("s3-claim-other", Duration::from_secs(600));
    let broker_b = Broker::start(&other, BrokerOpts::new(&[("vol0", "8MiB")]));
    let mut b = start(&broker_b, &other, &moto, "cache-b", &term);
    wait_for("the second daemon to wait", Duration::from_secs(30), || {
        b.log_text().contains("is claimed by")
    });
    // Two terms and more: the first renews, so the second still waits.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        b.is_running() && !b.log_text().contains("claimed s3://"),
        "{}",
        b.log_text()
    );
    write_at(&broker, 4096, &[0xA2; 4096]);
    assert!(a.is_running(), "{}", a.log_text());

    detach(&mut a);
    wait_for("the second daemon's claim", Duration::from_secs(10), || {
        b.log_text().contains("claimed s3://")
    });
    broker_b.wait_active("vol0", 0, Duration::from_secs(30));
    let mut want = vec![0xA1; 8192];
    want[4096..].fill(0xA2);
    assert_eq!(read_at(&broker_b, 0, 8192), want);
    b.kill();
}

/// A holder cut off from S3 stops acknowledging once its term has passed
/// without a renewal; a daemon of another cache directory then takes the
/// claim, and the first, when S3 answers again, finds it superseded and
/// exits (status 3). The write it held was never acknowledged.
#[test]
fn a_lapsed_claim_stops_acknowledging() {
    let scratch = Scratch::new("s3-lapse", Duration::from_secs(600));
    let moto = Moto::start(&scratch);
    moto.create_bucket(BUCKET);
    let mut opts = BrokerOpts::new(&[("vol0", "8MiB")]);
    opts.extra = vec!["--daemon-wait".into(), "3s".into()];
    let broker = Broker::start(&scratch, opts);
    let cut_off = Arc::new(AtomicBool::new(false));
    let cut = cut_off.clone();
    let proxy = FaultProxy::start(&moto, move |_| {
        if cut.load(Ordering::SeqCst) {
            Fault::Refuse(503)
        } else {
            Fault::Pass
        }
    });
    let args = ["--claim-term-ms", "2000", "--checkpoint-ms", "100"];
    let mut a = broker.daemon_with(
        &scratch,
        s3_daemon(&broker, &scratch, &proxy.endpoint, "cache-a", &args),
        "vol0",
    );
    broker.wait_active("vol0", 0, Duration::from_secs(30));
    write_at(&broker, 0, &[0x11; 4096]);
    wait_for("the write in S3", Duration::from_secs(30), || {
        moto.manifest(BUCKET, "vol")
            .is_some_and(|(_, c)| c.len() == 1)
    });

    cut_off.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(2500));
    let held = write_in_thread(&broker, "vol0", 4096, 0x22);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !held.is_finished(),
        "a write was acknowledged after the claim lapsed"
    );

    let other = Scratch::new("s3-lapse-other", Duration::from_secs(600));
    let broker_b = Broker::start(&other, BrokerOpts::new(&[("vol0", "8MiB")]));
    let mut b = start(
        &broker_b,
        &other,
        &moto,
        "cache-b",
        &["--claim-term-ms", "2000"],
    );
    broker_b.wait_active("vol0", 0, Duration::from_secs(30));
    assert!(b.log_text().contains("is claimed by"), "{}", b.log_text());

    cut_off.store(false, Ordering::SeqCst);
    let status = a
        .wait_timeout(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the superseded daemon still runs:\n{}", a.log_text()));
    assert_eq!(status.code(), Some(3), "{}", a.log_text());
    assert!(a.log_text().contains("superseded"), "{}", a.log_text());
    let e = held.join().unwrap().unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let mut want = vec![0x11; 8192];
    want[4096..].fill(0);
    assert_eq!(read_at(&broker_b, 0, 8192), want);
    b.kill();
}

/// The S3 server stops answering (SIGSTOP) in the middle of uploads, the
/// daemon is SIGKILLed and restarted meanwhile, and then the server
/// resumes: no acknowledged write is lost, and I/O goes on.
#[test]
fn store_stopped_mid_upload() {
    let (scratch, moto, broker) = setup("s3-stopped", "32MiB");
    let mut daemon = start(&broker, &scratch, &moto, "cache", &BUSY);
    let (_, epoch) = broker.wait_active("vol0", 0, Duration::from_secs(30));
    let state = scratch.path("gens");
    let seed = seed();
    let mut writer = writer(&scratch, &broker.file("vol0"), 4, seed, Some(&state));
    std::thread::sleep(Duration::from_millis(500));
    let generation = moto.generation(BUCKET, "vol");
    moto.pause(true);
    std::thread::sleep(Duration::from_secs(3));
    let done_while_stopped = broker.status("vol0")["completed"].as_u64().unwrap();
    daemon.kill();
    daemon = start(&broker, &scratch, &moto, "cache", &BUSY);
    std::thread::sleep(Duration::from_secs(1));
    moto.pause(false);
    broker.wait_active("vol0", epoch, Duration::from_secs(60));
    wait_for(
        "uploads after the store resumed",
        Duration::from_secs(60),
        || moto.generation(BUCKET, "vol") > generation + 1,
    );
    let status = broker.wait_status("vol0", Duration::from_secs(30), "I/O resumed", |s| {
        s["completed"].as_u64().unwrap() > done_while_stopped + 100
    });
    let report = stop_writer(&mut writer);
    eprintln!("writer: {report}\nbroker: {status}");
    assert_eq!(status["failed"], 0);
    check_from_s3(&broker, &scratch, &moto, &mut daemon, &state, seed);
}

/// Every bad S3 setting is refused with a message that says what to do.
#[test]
fn bad_settings_are_refused() {
    let (scratch, moto, broker) = setup("s3-bad", "8MiB");
    let run = |backend: &str, args: &[&str]| {
        let mut cmd = broker.daemon_cmd("vol0", backend, args);
        s3_env(&mut cmd);
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cache = scratch.path("cache");
    let cache = cache.to_str().unwrap();
    let url = format!("s3://{BUCKET}/vol");
    let ep = moto.endpoint.as_str();
    for (backend, args, code, text) in [
        (url.as_str(), vec!["--endpoint", ep], 2, "needs --cache-dir"),
        (
            "mem",
            vec!["--cache-dir", cache],
            2,
            "--cache-dir is an option of s3://",
        ),
        (
            "s3://A_B/x",
            vec!["--cache-dir", cache],
            2,
            "bucket names are 3 to 63",
        ),
        (
            "s3://bucket/a//b",
            vec!["--cache-dir", cache],
            2,
            "path segments",
        ),
        (
            url.as_str(),
            vec!["--cache-dir", cache, "--chunk-size", "3MiB"],
            2,
            "power of two",
        ),
        (
            url.as_str(),
            vec!["--cache-dir", cache, "--endpoint", "ftp://x"],
            2,
            "http://",
        ),
        (
            url.as_str(),
            vec!["--cache-dir", cache, "--uploads", "0"],
            2,
            "0 is not in 1..=256",
        ),
        (
            "s3://no-such-bucket/vol",
            vec!["--cache-dir", cache, "--endpoint", ep],
            1,
            "the bucket does not exist",
        ),
        (
            url.as_str(),
            vec!["--cache-dir", cache, "--endpoint", ep, "--log-size", "1MiB"],
            1,
            "at least 4 chunks",
        ),
    ] {
        let (got, err) = run(backend, &args);
        assert_eq!(got, Some(code), "{backend} {args:?}: {err}");
        assert!(err.contains(text), "{backend} {args:?}: {err}");
    }

    // A volume of another size, or of another chunk size.
    let mut d = start(&broker, &scratch, &moto, "cache", &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(30));
    detach(&mut d);
    let other = Scratch::new("s3-bad-other", Duration::from_secs(120));
    let small = Broker::start(&other, BrokerOpts::new(&[("vol0", "4MiB")]));
    let mut cmd = s3_daemon(&small, &other, &moto.endpoint, "cache", &[]);
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("holds a volume of 8388608 bytes"), "{err}");
    let mut cmd = broker.daemon_cmd(
        "vol0",
        &url,
        &[
            "--cache-dir",
            cache,
            "--endpoint",
            ep,
            "--chunk-size",
            "2MiB",
        ],
    );
    let out = s3_env(&mut cmd).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("has chunks of 1048576 bytes"), "{err}");
}
