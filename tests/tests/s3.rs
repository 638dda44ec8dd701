//! The s3:// backend against a real S3 server (moto's, on 127.0.0.1): data
//! round trip through S3, SIGKILLs and handoffs under a verified writer, a
//! stale daemon that must not overwrite its successor's data, and the
//! store stopping in the middle of uploads. Each test's second oracle reads
//! the volume back through a daemon with an empty cache directory, so what
//! it checks came from S3.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use holdfast_tests::s3::{Moto, s3_env};
use holdfast_tests::{
    AlignedBuf, Broker, BrokerOpts, Proc, Rng, Scratch, check_backing, handoff_report, open_direct,
    seed, stop_writer, writer,
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
    moto: &Moto,
    cache: &str,
    extra: &[&str],
) -> Command {
    let cache = scratch.path(cache);
    let mut args = vec![
        "--cache-dir",
        cache.to_str().unwrap(),
        "--endpoint",
        &moto.endpoint,
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
        s3_daemon(broker, scratch, moto, cache, extra),
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
}
