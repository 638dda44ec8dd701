//! Block devices: a loop device over an export's file, checked with the
//! tools users trust (fio's verify, mkfs.ext4, fsck.ext4) across daemon
//! crashes and handoffs, and with an oracle of our own reading every block.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use holdfast_proto::HandoffOutcome;
use holdfast_tests::block::{
    Mounted, check_fio_device, fio, fio_crc32c, fio_verify_args, require_tool,
};
use holdfast_tests::{
    AlignedBuf, Broker, BrokerOpts, Mode, Proc, Rng, Scratch, handoff_report, open_direct,
    read_text, seed,
};

fn sysfs(dev: &Path, attr: &str) -> String {
    let name = dev.file_name().unwrap().to_string_lossy().into_owned();
    read_text(&Path::new("/sys/block").join(name).join(attr))
        .trim()
        .to_owned()
}

fn ctl_ok(broker: &Broker, args: &[&str]) -> String {
    let out = broker.ctl(args);
    assert!(out.status.success(), "holdfastctl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// holdfastctl's exit status and stderr.
fn ctl_err(broker: &Broker, args: &[&str]) -> (i32, String) {
    let out = broker.ctl(args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

holdfast_tests::both_modes!(
    block_device_round_trip_discard_and_export_add_rm,
    direct_block_device_round_trip_discard_and_export_add_rm,
    block_basics_in
);

fn block_basics_in(mode: Mode) {
    let scratch = Scratch::new("block-basics", Duration::from_secs(120));
    let size = mode.export("64MiB,block");
    let broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", &size)])
            .arg("--block-size")
            .arg("4096"),
    );
    let img = scratch.path("vol0.img");
    let _d = broker.daemon(&scratch, "vol0", &format!("file:{}", img.display()), &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));

    let dev = broker.device("vol0");
    assert_eq!(broker.status("vol0")["block_size"], 4096);
    assert_eq!(sysfs(&dev, "queue/logical_block_size"), "4096");
    assert_eq!(sysfs(&dev, "loop/dio"), "1", "direct I/O is off");
    assert_eq!(sysfs(&dev, "size"), (64u64 << 20 >> 9).to_string());
    assert_ne!(sysfs(&dev, "queue/discard_max_bytes"), "0");
    let table = ctl_ok(&broker, &["status"]);
    assert!(table.contains(dev.to_str().unwrap()), "{table}");

    // A round trip of 3 MiB at an odd 4 KiB offset, through the device;
    // the backing file holds the same bytes.
    let f = open_direct(&dev);
    let mut w = AlignedBuf::new(3 << 20);
    Rng::new(seed()).fill(&mut w);
    f.write_all_at(&w, 4096 * 77).unwrap();
    f.sync_all().unwrap();
    let mut r = AlignedBuf::new(3 << 20);
    f.read_exact_at(&mut r, 4096 * 77).unwrap();
    assert!(w[..] == r[..], "read back differs");
    let mut on_disk = vec![0u8; 3 << 20];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut on_disk, 4096 * 77)
        .unwrap();
    assert!(on_disk[..] == w[..], "backing file differs");

    // Discard reaches the daemon as a punched hole: zeros, blocks freed.
    let blocks_before = std::fs::metadata(&img).unwrap();
    let out = Command::new("blkdiscard")
        .args([
            "-o",
            &(4096 * 77).to_string(),
            "-l",
            &(2u64 << 20).to_string(),
        ])
        .arg(&dev)
        .output()
        .unwrap();
    assert!(out.status.success(), "blkdiscard: {out:?}");
    f.read_exact_at(&mut r, 4096 * 77).unwrap();
    assert!(
        r[..2 << 20].iter().all(|&b| b == 0),
        "discarded range reads non-zero"
    );
    assert!(
        r[2 << 20..] == w[2 << 20..],
        "data past the discard changed"
    );
    use std::os::unix::fs::MetadataExt;
    let blocks_after = std::fs::metadata(&img).unwrap().blocks();
    assert!(
        blocks_after + (2 << 20) / 512 <= blocks_before.blocks(),
        "no hole punched: {} -> {blocks_after} blocks",
        blocks_before.blocks()
    );
    drop(f);

    // An export added at run time, with its own block device.
    let mut add = vec!["export", "add", "vol1", "16MiB", "--block"];
    if mode == Mode::Relay {
        add.push("--relay");
    }
    let out = ctl_ok(&broker, &add);
    assert!(out.contains("/dev/loop"), "{out}");
    let img1 = scratch.path("vol1.img");
    let _d1 = broker.daemon(&scratch, "vol1", &format!("file:{}", img1.display()), &[]);
    broker.wait_active("vol1", 0, Duration::from_secs(10));
    for name in ["vol0", "vol1"] {
        assert_eq!(broker.status(name)["daemon"]["mode"], mode.name());
    }
    let dev1 = broker.device("vol1");
    assert_eq!(sysfs(&dev1, "size"), (16u64 << 20 >> 9).to_string());
    let f1 = open_direct(&dev1);
    f1.write_all_at(&w[..1 << 20], 0).unwrap();

    // Bad requests get clear errors.
    let (code, err) = ctl_err(&broker, &["export", "add", "vol1", "16MiB"]);
    assert!(code == 1 && err.contains("exists already"), "{err}");
    let (code, err) = ctl_err(&broker, &["export", "add", "vol2", "1000"]);
    assert!(code == 1 && err.contains("4096-byte blocks"), "{err}");
    let (code, err) = ctl_err(&broker, &["export", "rm", "nope"]);
    assert!(code == 1 && err.contains("no export named"), "{err}");
    if !Path::new("/dev/ublk-control").exists() {
        // No ublk in this kernel: a clear error, and nothing left behind.
        let (code, err) = ctl_err(
            &broker,
            &["export", "add", "vol3", "16MiB", "--frontend", "ublk"],
        );
        assert!(code == 1 && err.contains("ublk_drv"), "{err}");
        let (code, err) = ctl_err(&broker, &["export", "rm", "vol3"]);
        assert!(code == 1 && err.contains("no export named"), "{err}");
    }
    for bad in [
        &[
            "export",
            "add",
            "vol3",
            "1M",
            "--block",
            "--frontend",
            "ublk",
        ][..],
        &["export", "add", "vol3", "1M", "--frontend", "nbd"],
        &["export", "add", "vol3", "1M", "--direct", "--relay"],
        &["status", "--relay"],
        &["export", "add", "vol2"],
        &["export", "add", "a/b", "1M"],
        &["export", "rm", "vol1", "--block"],
        &["status", "--force"],
        &["export", "list"],
    ] {
        let (code, err) = ctl_err(&broker, bad);
        assert_eq!(code, 2, "{bad:?}: {err}");
    }

    // Removal is refused while the device is open, and names who has it.
    let (code, err) = ctl_err(&broker, &["export", "rm", "vol1"]);
    assert!(
        code == 1 && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    drop(f1);
    ctl_ok(&broker, &["export", "rm", "vol1"]);
    assert!(
        !Path::new("/sys/block")
            .join(dev1.file_name().unwrap())
            .join("loop")
            .exists()
            || sysfs(&dev1, "loop/backing_file").is_empty(),
        "{} still attached",
        dev1.display()
    );
    assert!(!broker.file("vol1").exists());
    let (code, err) = ctl_err(&broker, &["status"]);
    assert_eq!(code, 0, "{err}");

    // Forced removal while open: the holder's I/O fails, nothing hangs.
    let f = open_direct(&dev);
    ctl_ok(&broker, &["export", "rm", "vol0", "--force"]);
    let e = f.read_exact_at(&mut r[..4096], 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    drop(f);
}

/// Starts a daemon for vol0 on the file `img`.
fn daemon(broker: &Broker, scratch: &Scratch, img: &Path) -> Proc {
    broker.daemon(scratch, "vol0", &format!("file:{}", img.display()), &[])
}

/// Runs fio write+verify passes over vol0's block device until `replace`
/// has replaced the daemon `rounds` times while fio ran, then checks every
/// block with our own oracle. `replace` gets the current daemon and leaves
/// the next one in its place.
fn fio_across(
    name: &str,
    mode: Mode,
    rounds: u32,
    replace: impl Fn(&Broker, &Scratch, &mut Proc),
) -> serde_json::Value {
    require_tool("fio", "fio");
    let scratch = Scratch::new(&format!("{name}-{}", mode.name()), Duration::from_secs(600));
    let size: u64 = 64 << 20;
    let export = mode.export("64MiB,block");
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", &export)]));
    let img = scratch.path("vol0.img");
    let mut current = daemon(&broker, &scratch, &img);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    let dev = broker.device("vol0");
    let seed = seed();

    let running = AtomicBool::new(true);
    let passes = std::thread::scope(|s| {
        let fio_passes = s.spawn(|| {
            let mut pass = 0u64;
            while running.load(Ordering::SeqCst) || pass == 0 {
                let args = fio_verify_args(&dev, size, seed.wrapping_add(pass));
                let r = fio(
                    &scratch,
                    &format!("pass{pass}"),
                    &args,
                    Duration::from_secs(300),
                );
                eprintln!(
                    "fio pass {pass}: {} writes, {} verify reads",
                    r["jobs"][0]["write"]["total_ios"], r["jobs"][0]["read"]["total_ios"]
                );
                pass += 1;
            }
            pass
        });
        let mut rng = Rng::new(seed);
        for _ in 0..rounds {
            std::thread::sleep(Duration::from_millis(rng.range(20, 150)));
            replace(&broker, &scratch, &mut current);
        }
        running.store(false, Ordering::SeqCst);
        fio_passes.join().unwrap()
    });
    let status = broker.status("vol0");
    eprintln!("{name}: {rounds} daemon replacements over {passes} fio passes; {status}");
    assert_eq!(status["failed"], 0, "{status}");
    assert_eq!(status["rejected_completions"], 0, "{status}");
    check_fio_device(&dev, &img, size, 4096);
    status
}

holdfast_tests::both_modes!(
    fio_verify_across_daemon_kills,
    direct_fio_verify_across_daemon_kills,
    fio_across_kills
);

#[test]
fn fio_verify_across_handoffs() {
    fio_across_handoffs(Mode::Relay, 20);
}

#[test]
fn direct_fio_verify_across_handoffs() {
    fio_across_handoffs(Mode::Direct, 10);
}

fn fio_across_kills(mode: Mode) {
    let status = fio_across("fio-kills", mode, 20, |broker, scratch, current| {
        let before = broker.status("vol0");
        let epoch = before["daemon"]["epoch"].as_u64().unwrap();
        current.kill();
        eprintln!("killed with {} requests in flight", before["inflight"]);
        *current = daemon(broker, scratch, &scratch.path("vol0.img"));
        broker.wait_active("vol0", epoch, Duration::from_secs(20));
    });
    assert_eq!(status["daemons_lost"], 20, "{status}");
    assert!(
        status["replayed"].as_u64().unwrap() > 0,
        "no kill hit a request: {status}"
    );
}

fn fio_across_handoffs(mode: Mode, rounds: u32) {
    fio_across("fio-handoffs", mode, rounds, |broker, scratch, current| {
        let (mut conn, _) = broker.arm_handoff("vol0", false, 0);
        let backend = format!("file:{}", scratch.path("vol0.img").display());
        let cmd = broker.daemon_cmd("vol0", &backend, &["--successor"]);
        let successor = broker.daemon_with(scratch, cmd, "vol0");
        let report = handoff_report(&mut conn);
        assert_eq!(report.outcome, HandoffOutcome::Completed, "{report:?}");
        let old = current.wait_timeout(Duration::from_secs(10));
        assert!(
            old.is_some_and(|s| s.success()),
            "old daemon: {old:?}\n{}",
            current.log_text()
        );
        *current = successor;
    });
}

/// Writes files of random sizes under `dir` until `stop` (and at least
/// `min` files), fsyncing every third; returns each file's path and
/// checksum.
fn write_tree(
    dir: &Path,
    seed: u64,
    min: usize,
    stop: &AtomicBool,
) -> Vec<(std::path::PathBuf, u32)> {
    let mut rng = Rng::new(seed);
    let mut files = Vec::new();
    while files.len() < min || !stop.load(Ordering::SeqCst) {
        let i = files.len();
        let sub = dir.join(format!("d{}", i % 16));
        std::fs::create_dir_all(&sub).unwrap();
        let path = sub.join(format!("f{i}"));
        let mut data = vec![0u8; rng.range(1, 256 << 10) as usize];
        rng.fill(&mut data);
        std::fs::write(&path, &data).unwrap();
        if i % 3 == 0 {
            std::fs::File::open(&path).unwrap().sync_all().unwrap();
        }
        files.push((path, fio_crc32c(&data)));
    }
    files
}

#[test]
fn ext4_across_daemon_kills() {
    require_tool("mkfs.ext4", "e2fsprogs");
    let scratch = Scratch::new("ext4", Duration::from_secs(300));
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", "256MiB,block")]));
    let img = scratch.path("vol0.img");
    let mut current = daemon(&broker, &scratch, &img);
    let mut epoch = broker.wait_active("vol0", 0, Duration::from_secs(10)).1;
    let dev = broker.device("vol0");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&dev)
        .output()
        .unwrap();
    assert!(out.status.success(), "mkfs.ext4: {out:?}");

    let fs = Mounted::new(&dev, &scratch.path("fs"), "ext4");
    let seed = seed();
    let stop = AtomicBool::new(false);
    let kills = 5;
    let files = std::thread::scope(|s| {
        let writer = s.spawn(|| write_tree(&fs.dir, seed, 200, &stop));
        let mut rng = Rng::new(seed);
        for _ in 0..kills {
            std::thread::sleep(Duration::from_millis(rng.range(50, 300)));
            current.kill();
            current = daemon(&broker, &scratch, &img);
            epoch = broker.wait_active("vol0", epoch, Duration::from_secs(20)).1;
        }
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap()
    });
    let status = broker.status("vol0");
    eprintln!(
        "{} files written across {kills} kills; {status}",
        files.len()
    );
    assert_eq!(status["daemons_lost"], kills);
    assert_eq!(status["failed"], 0, "{status}");
    fs.unmount();

    let fsck = Command::new("fsck.ext4")
        .arg("-fn")
        .arg(&dev)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "fsck.ext4 -fn: {}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    let fs = Mounted::new(&dev, &scratch.path("fs"), "ext4");
    for (path, sum) in &files {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            fio_crc32c(&data),
            *sum,
            "{} has the wrong contents",
            path.display()
        );
    }
    fs.unmount();
}
