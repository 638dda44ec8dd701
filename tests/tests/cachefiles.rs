//! The cachefiles frontend's parts that this host can check (it has no
//! cachefiles; the kernel tests are `tests/kernel-vm/run cachefiles`): the
//! command-line errors, the daemon refusing a backend of the wrong kind,
//! and the broker refusing a re-exec that would end its FUSE exports.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use holdfast_tests::{Broker, BrokerOpts, Scratch, bin};

fn text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cachefiles_usage_errors_and_a_kernel_without_it() {
    let scratch = Scratch::new("cf-usage", Duration::from_secs(30));
    let socket = scratch.path("s.sock");
    let run = |args: &[&str]| {
        Command::new(bin("holdfast-broker"))
            .arg("--socket")
            .arg(&socket)
            .arg("--mountpoint")
            .arg(scratch.path("mnt"))
            .args(args)
            .output()
            .unwrap()
    };
    for (bad, says) in [
        ("images", "expected DIR,TAG"),
        ("cache,images", "absolute path"),
        ("/cache,", "tag"),
        ("/cache,a/b", "tag"),
    ] {
        let out = run(&["--cachefiles", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", text(&out));
        assert!(text(&out).contains(says), "{bad}: {}", text(&out));
    }
    let out = run(&["--cachefiles", "/cache,vol0", "--export", "vol0=1MiB"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out).contains("also an --export name"),
        "{}",
        text(&out)
    );

    if !Path::new("/dev/cachefiles").exists() {
        let dir = scratch.path("cache");
        std::fs::create_dir_all(&dir).unwrap();
        let out = run(&["--cachefiles", &format!("{},images", dir.display())]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            text(&out).contains("this kernel has no cachefiles"),
            "{}",
            text(&out)
        );
    }
}

#[test]
fn wrong_backend_kind_and_sigusr2_upgrade() {
    let scratch = Scratch::new("cf-kind", Duration::from_secs(30));
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", "4MiB")]));

    // A blob backend on a volume export: refused before it opens anything.
    let blobs = scratch.path("blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let out = broker
        .daemon_cmd("vol0", &format!("dir:{}", blobs.display()), &[])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("holds volume") && text(&out).contains("file:PATH, mem or s3://"),
        "{}",
        text(&out)
    );
    // `dir:` without a path is a usage error.
    let out = broker.daemon_cmd("vol0", "dir:", &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));

    // SIGUSR2 upgrades the broker in place: the same process serves on,
    // with its FUSE export kept.
    broker.proc.signal(libc::SIGUSR2);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while broker.proc.log_text().matches("ready: socket").count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            broker.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        broker
            .proc
            .log_text()
            .contains("took over its FUSE connection")
    );
    let out = broker.ctl(&["status"]);
    assert!(out.status.success(), "the broker stopped serving: {out:?}");
}
