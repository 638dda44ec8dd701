//! hf-bench-block: what the broker costs a block device, measured with fio
//! side by side in one run on three paths to the same kind of file:
//! * broker: `holdfast-broker` + `holdfast-daemon --backend file:`, the
//!   export's loop device, in relay mode (`--export NAME=SIZE,relay`):
//!   every request crosses the broker;
//! * broker-poll: the same with `holdfast-daemon --poll-us 100`, which
//!   polls for the next request after a lone one instead of sleeping;
//! * direct: the same daemon in direct mode (a FUSE export's default): it
//!   reads the export's FUSE connection itself, no broker hop;
//! * baseline: `hf-baseline`, the same FUSE frontend and loop device with
//!   the same file backend called in place (no broker hop): the limit of
//!   this design;
//! * kernel: a loop device on a plain file, no FUSE at all;
//! * s3: `holdfast-daemon --backend s3://` against moto's S3 server on
//!   127.0.0.1, in direct mode (writes complete in the local log, reads
//!   come from the read cache once the fill has been uploaded): what the
//!   S3 backend's local path costs, not what S3 costs.
//!
//! Each workload runs on the paths back to back, so the ratio
//! broker/baseline holds on a noisy machine even when absolute figures
//! drift between workloads; each run starts after sync(2), with no dirty
//! pages left by the runs before it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use holdfast_tests::block::{fio, require_tool};
use holdfast_tests::s3::{Moto, s3_env};
use holdfast_tests::{Broker, BrokerOpts, Proc, Scratch, bin};

const USAGE: &str = "\
hf-bench-block: broker (relay and direct mode) vs in-process baseline vs kernel
loop, with fio.

Usage: hf-bench-block [--runtime SECS] [--size SIZE] [--out PATH] [--markdown PATH]

  --runtime SECS   per workload and path [default: 10]
  --size SIZE      of each device, e.g. 1GiB [default: 1GiB]
  --out PATH       JSON results [default: bench-block.json]
  --markdown PATH  the tables, also printed [default: bench-block.md]

Needs root (FUSE, loop devices), fio, and the workspace's binaries next to
it (cargo build --release --workspace), and moto's S3 server
(tests/setup-moto). bench/run does all of that.";

/// A fio workload: name, rw, block size, queue depth.
const WORKLOADS: [(&str, &str, &str, u32); 6] = [
    ("4k randread qd1", "randread", "4k", 1),
    ("4k randread qd32", "randread", "4k", 32),
    ("4k randwrite qd1", "randwrite", "4k", 1),
    ("4k randwrite qd32", "randwrite", "4k", 32),
    ("1m read qd4", "read", "1m", 4),
    ("1m write qd4", "write", "1m", 4),
];

const PATHS: [&str; 6] = [
    "broker",
    "broker-poll",
    "direct",
    "baseline",
    "kernel",
    "s3",
];

#[derive(Clone, Copy, Default)]
struct Result {
    iops: f64,
    mbps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

fn parse(report: &serde_json::Value, rw: &str) -> Result {
    let dir = if rw.contains("read") { "read" } else { "write" };
    let j = &report["jobs"][0][dir];
    let pct = |k: &str| j["clat_ns"]["percentile"][k].as_f64().unwrap_or(0.0) / 1000.0;
    Result {
        iops: j["iops"].as_f64().unwrap_or(0.0),
        mbps: j["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
        p999_us: pct("99.900000"),
    }
}

/// A loop device, detached when dropped if it is still attached to a file
/// under `owner` (so never a device someone else has attached since).
struct KernelLoop(PathBuf, PathBuf);

impl KernelLoop {
    /// Buffered, not direct I/O: like the daemon's file backend, which
    /// reads and writes through the page cache.
    fn attach(file: &Path) -> Self {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=off"])
            .arg(file)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {out:?}");
        Self(
            String::from_utf8_lossy(&out.stdout).trim().into(),
            file.to_path_buf(),
        )
    }
}

impl Drop for KernelLoop {
    fn drop(&mut self) {
        let name = self.0.file_name().unwrap_or_default();
        let backing = Path::new("/sys/block").join(name).join("loop/backing_file");
        let ours = std::fs::read_to_string(backing)
            .is_ok_and(|b| Path::new(b.trim()).starts_with(&self.1));
        if ours {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).output();
        }
    }
}

/// hf-baseline, stopped with SIGTERM (it then detaches its device and
/// unmounts) when dropped; its device is detached regardless.
struct Baseline {
    proc: Proc,
    device: KernelLoop,
}

impl Drop for Baseline {
    fn drop(&mut self) {
        self.proc.signal(libc::SIGTERM);
        if self.proc.wait_timeout(Duration::from_secs(10)).is_none() {
            self.proc.kill();
        }
    }
}

/// Starts hf-baseline and waits for its device.
fn baseline(scratch: &Scratch, size: &str) -> Baseline {
    let mut cmd = Command::new(bin("hf-baseline"));
    cmd.arg("--mountpoint")
        .arg(scratch.path("baseline-mnt"))
        .arg("--export")
        .arg(format!("vol0={size},block"))
        .arg("--backend")
        .arg(format!("file:{}", scratch.path("baseline.img").display()));
    let mut p = scratch.spawn(&mut cmd, "baseline.log");
    let end = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let text = p.log_text();
        if let Some(dev) = text.lines().find_map(|l| l.strip_prefix("ready ")) {
            return Baseline {
                proc: p,
                device: KernelLoop(dev.trim().into(), scratch.path("baseline-mnt")),
            };
        }
        assert!(
            p.is_running() && std::time::Instant::now() < end,
            "hf-baseline did not come up:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn job(dev: &Path, rw: &str, bs: &str, qd: u32, runtime: u64, size: u64) -> Vec<String> {
    vec![
        format!("--filename={}", dev.display()),
        "--direct=1".into(),
        "--ioengine=io_uring".into(),
        format!("--rw={rw}"),
        format!("--bs={bs}"),
        format!("--iodepth={qd}"),
        format!("--size={size}"),
        "--time_based".into(),
        format!("--runtime={runtime}"),
        "--ramp_time=1".into(),
        "--randrepeat=0".into(),
        "--norandommap".into(),
    ]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut runtime, mut size) = (10u64, "1GiB".to_owned());
    let (mut out, mut md) = ("bench-block.json".to_owned(), "bench-block.md".to_owned());
    while let Some(a) = args.next() {
        let mut v = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--runtime" => runtime = v().parse().expect("--runtime SECS"),
            "--size" => size = v(),
            "--out" => out = v(),
            "--markdown" => md = v(),
            "-h" | "--help" => return println!("{USAGE}"),
            _ => panic!("unknown argument {a}\n{USAGE}"),
        }
    }
    require_tool("fio", "fio");
    require_tool("losetup", "util-linux");
    let bytes = holdfast_broker::config::parse_size(&size).unwrap();
    let scratch = Scratch::new("bench-block", Duration::from_secs(3600));

    // vol0 is served in relay mode by a daemon as started by default, vol1
    // by one that polls (--poll-us), vol3 and vol2 (s3) in direct mode.
    let relay = format!("{size},block,relay");
    let direct = format!("{size},block");
    let broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[
            ("vol0", &relay),
            ("vol1", &relay),
            ("vol2", &direct),
            ("vol3", &direct),
        ]),
    );
    let backend = |name: &str| format!("file:{}", scratch.path(&format!("{name}.img")).display());
    let _daemon = broker.daemon(&scratch, "vol0", &backend("vol0"), &[]);
    let _polling = broker.daemon(&scratch, "vol1", &backend("vol1"), &["--poll-us", "100"]);
    let _direct = broker.daemon(&scratch, "vol3", &backend("vol3"), &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    broker.wait_active("vol1", 0, Duration::from_secs(10));
    broker.wait_active("vol3", 0, Duration::from_secs(10));
    assert_eq!(broker.status("vol3")["daemon"]["mode"], "direct");
    // vol2 on S3, with a read cache that holds the whole device.
    let moto = Moto::start(&scratch);
    moto.create_bucket("bench");
    let cache = scratch.path("s3-cache");
    let cache_size = (bytes + (64 << 20)).to_string();
    let mut cmd = broker.daemon_cmd(
        "vol2",
        "s3://bench/vol2",
        &[
            "--cache-dir",
            cache.to_str().unwrap(),
            "--endpoint",
            &moto.endpoint,
            "--read-cache-size",
            &cache_size,
        ],
    );
    s3_env(&mut cmd);
    let _s3 = broker.daemon_with(&scratch, cmd, "vol2");
    broker.wait_active("vol2", 0, Duration::from_secs(60));
    let baseline = baseline(&scratch, &size);
    let plain = scratch.path("kernel.img");
    std::fs::File::create(&plain)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    let kernel = KernelLoop::attach(&plain);
    let devices = [
        broker.device("vol0"),
        broker.device("vol1"),
        broker.device("vol3"),
        baseline.device.0.clone(),
        kernel.0.clone(),
        broker.device("vol2"),
    ];

    // Fill every device once, so that reads read data, not holes.
    for (path, dev) in PATHS.iter().zip(&devices) {
        let mut a = job(dev, "write", "1m", 4, 0, bytes);
        a.retain(|o| {
            o != "--time_based" && !o.starts_with("--runtime") && !o.starts_with("--ramp")
        });
        fio(
            &scratch,
            &format!("fill-{path}"),
            &a,
            Duration::from_secs(600),
        );
    }

    let mut results = Vec::new();
    for (name, rw, bs, qd) in WORKLOADS {
        let row: Vec<Result> = PATHS
            .iter()
            .zip(&devices)
            .map(|(path, dev)| {
                // No run pays for an earlier one's writeback.
                // SAFETY: sync(2) has no arguments.
                unsafe { libc::sync() };
                let r = fio(
                    &scratch,
                    &format!("{}-{path}", name.replace(' ', "-")),
                    &job(dev, rw, bs, qd, runtime, bytes),
                    Duration::from_secs(runtime * 3 + 60),
                );
                parse(&r, rw)
            })
            .collect();
        let line: Vec<String> = PATHS
            .iter()
            .zip(&row)
            .map(|(p, r)| format!("{p} {:.0}", r.iops))
            .collect();
        eprintln!("{name}: IOPS {}", line.join(", "));
        results.push((name, row));
    }
    drop(kernel);
    drop(baseline);

    let (text, json) = report(&results, runtime, &size);
    print!("{text}");
    std::fs::write(&md, &text).unwrap();
    std::fs::write(&out, json).unwrap();
    eprintln!("written: {md}, {out}");
}

fn report(results: &[(&str, Vec<Result>)], runtime: u64, size: &str) -> (String, String) {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "fio, io_uring, O_DIRECT on the block device, {runtime} s per workload and path \
         (after 1 s of ramp), {size} devices filled first.\n"
    );
    let _ = writeln!(
        t,
        "| workload | path | IOPS | MB/s | p50 µs | p99 µs | p99.9 µs |\n|---|---|---|---|---|---|---|"
    );
    for (name, row) in results {
        for (path, r) in PATHS.iter().zip(row) {
            let _ = writeln!(
                t,
                "| {name} | {path} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
                r.iops, r.mbps, r.p50_us, r.p99_us, r.p999_us
            );
        }
    }
    let _ = writeln!(
        t,
        "\n| workload | broker/baseline IOPS | p50 added by the broker, µs | broker-poll/baseline IOPS | p50 added by broker-poll, µs | direct/baseline IOPS | p50 added in direct mode, µs | s3/broker IOPS |\n|---|---|---|---|---|---|---|---|"
    );
    let mut json_rows = Vec::new();
    for (name, row) in results {
        let (a, p, d, b) = (row[0], row[1], row[2], row[3]);
        let over = |x: Result| x.iops / b.iops.max(f64::MIN_POSITIVE);
        let (ratio, added) = (over(a), a.p50_us - b.p50_us);
        let (direct, direct_added) = (over(d), d.p50_us - b.p50_us);
        let s3 = row[5].iops / a.iops.max(f64::MIN_POSITIVE);
        let _ = writeln!(
            t,
            "| {name} | {ratio:.3} | {added:+.1} | {:.3} | {:+.1} | {direct:.3} | {direct_added:+.1} | {s3:.3} |",
            over(p),
            p.p50_us - b.p50_us
        );
        let paths: Vec<String> = PATHS
            .iter()
            .zip(row)
            .map(|(p, r)| {
                format!(
                    "\"{p}\":{{\"iops\":{:.1},\"mbps\":{:.2},\"p50_us\":{:.2},\"p99_us\":{:.2},\"p999_us\":{:.2}}}",
                    r.iops, r.mbps, r.p50_us, r.p99_us, r.p999_us
                )
            })
            .collect();
        json_rows.push(format!(
            "{{\"workload\":\"{name}\",{},\"broker_over_baseline_iops\":{ratio:.4},\"p50_added_us\":{added:.2},\"broker_poll_over_baseline_iops\":{:.4},\"poll_p50_added_us\":{:.2},\"direct_over_baseline_iops\":{direct:.4},\"direct_p50_added_us\":{direct_added:.2},\"s3_over_broker_iops\":{s3:.4}}}",
            paths.join(","),
            over(p),
            p.p50_us - b.p50_us
        ));
    }
    let json = format!(
        "{{\"runtime_s\":{runtime},\"size\":\"{size}\",\"results\":[{}]}}\n",
        json_rows.join(",")
    );
    (t, json)
}
