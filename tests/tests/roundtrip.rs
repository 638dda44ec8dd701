//! Data round trip through broker and daemon: random writes and reads at
//! random offsets and sizes (512 B to 1 MiB, aligned and unaligned, buffered
//! and O_DIRECT), checked against an in-memory model; plus the edges of the
//! file (end of export, truncate, fallocate, fsync). In both modes.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use holdfast_tests::{AlignedBuf, Broker, BrokerOpts, Mode, Rng, Scratch, open_direct, seed};

const SIZE: u64 = 64 << 20;
const MAX_IO: u64 = 1 << 20;

fn random_io(rng: &mut Rng, direct: bool) -> (u64, usize) {
    if direct {
        let len = rng.range(1, MAX_IO / 512 + 1) * 512;
        let off = rng.range(0, (SIZE - len) / 512 + 1) * 512;
        (off, len as usize)
    } else {
        let len = rng.range(512, MAX_IO + 1);
        let off = rng.range(0, SIZE - len + 1);
        (off, len as usize)
    }
}

fn round_trip(backend: &str, daemon_args: &[&str], mode: Mode) {
    let scratch = Scratch::new("roundtrip", Duration::from_secs(120));
    let size = mode.export("64MiB");
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", &size)]));
    let backend = backend.replace("@", scratch.dir.to_str().unwrap());
    let mut daemon = broker.daemon(&scratch, "vol0", &backend, daemon_args);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    assert_eq!(broker.status("vol0")["daemon"]["mode"], mode.name());

    let path = broker.file("vol0");
    let direct = open_direct(&path);
    let buffered = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = Rng::new(seed());
    let mut abuf = AlignedBuf::new(MAX_IO as usize);

    for i in 0..300 {
        let use_direct = rng.next_u64().is_multiple_of(2);
        let (off, len) = random_io(&mut rng, use_direct);
        let range = off as usize..off as usize + len;
        if !rng.next_u64().is_multiple_of(3) {
            rng.fill(&mut abuf[..len]);
            let f: &File = if use_direct { &direct } else { &buffered };
            f.write_all_at(&abuf[..len], off).unwrap_or_else(|e| {
                panic!("op {i}: write {len} at {off} (direct={use_direct}): {e}")
            });
            model[range].copy_from_slice(&abuf[..len]);
        } else {
            let f: &File = if use_direct { &direct } else { &buffered };
            f.read_exact_at(&mut abuf[..len], off)
                .unwrap_or_else(|e| panic!("op {i}: read {len} at {off}: {e}"));
            assert!(
                abuf[..len] == model[range],
                "op {i}: read {len} at {off} (direct={use_direct}) differs from the model"
            );
        }
    }
    buffered.sync_all().unwrap();

    // Whole-export read back, in 1 MiB O_DIRECT reads.
    for off in (0..SIZE).step_by(MAX_IO as usize) {
        direct.read_exact_at(&mut abuf, off).unwrap();
        assert!(
            abuf[..] == model[off as usize..(off + MAX_IO) as usize],
            "final read at {off}"
        );
    }
    drop((direct, buffered));

    // SIGTERM: the daemon detaches cleanly and exits 0.
    daemon.signal(libc::SIGTERM);
    let status = daemon
        .wait_timeout(Duration::from_secs(10))
        .expect("daemon exits on SIGTERM");
    assert!(
        status.success(),
        "daemon exit {status}:\n{}",
        daemon.log_text()
    );
    let s = broker.status("vol0");
    assert!(s["daemon"].is_null(), "{s}");
    assert_eq!(s["daemons_lost"], 0, "{s}");

    if let Some(path) = backend.strip_prefix("file:") {
        let backing = std::fs::read(path).unwrap();
        assert!(
            backing[..SIZE as usize] == model[..],
            "backing file differs from the model"
        );
    }
}

holdfast_tests::both_modes!(
    round_trip_file_backend,
    direct_round_trip_file_backend,
    round_trip_file
);

fn round_trip_file(mode: Mode) {
    round_trip("file:@/vol0.img", &[], mode);
}

/// Relay mode's polling I/O loop (and its inline execution of lone
/// requests).
#[test]
fn round_trip_polling_daemon() {
    let args = ["--poll-us", "200", "--workers", "2"];
    round_trip("file:@/vol0.img", &args, Mode::Relay);
}

holdfast_tests::both_modes!(
    round_trip_mem_backend,
    direct_round_trip_mem_backend,
    round_trip_mem
);

fn round_trip_mem(mode: Mode) {
    round_trip("mem", &[], mode);
}

fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> std::io::Result<()> {
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

holdfast_tests::both_modes!(edges_of_an_export, direct_edges_of_an_export, edges_in);

fn edges_in(mode: Mode) {
    let scratch = Scratch::new("edges", Duration::from_secs(60));
    let size = mode.export("1MiB");
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", &size)]));
    let img = scratch.path("vol0.img");
    let _daemon = broker.daemon(&scratch, "vol0", &format!("file:{}", img.display()), &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    let path = broker.file("vol0");
    let f = open_direct(&path);
    let mut buf = AlignedBuf::new(8192);

    // Metadata comes from the file system a volume is (holdfast-kernel's
    // Volume), answered by the broker or, in direct mode, the daemon.
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 1 << 20);
    let names: Vec<_> = std::fs::read_dir(&broker.mountpoint)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["vol0".to_string()]);
    assert!(std::fs::metadata(broker.mountpoint.join("nope")).is_err());

    // A write past the end fails with ENOSPC and changes nothing.
    buf.fill(0xab);
    let err = f.write_at(&buf[..8192], (1 << 20) - 4096).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    // A read at the end returns nothing; across it, a short count.
    assert_eq!(f.read_at(&mut buf[..4096], 1 << 20).unwrap(), 0);
    assert_eq!(f.read_at(&mut buf[..8192], (1 << 20) - 4096).unwrap(), 4096);
    assert!(buf[..4096].iter().all(|&b| b == 0));

    // The size is fixed: truncation and chmod are refused.
    let plain = OpenOptions::new().write(true).open(&path).unwrap();
    assert_eq!(
        plain.set_len(0).unwrap_err().raw_os_error(),
        Some(libc::EPERM)
    );
    assert_eq!(plain.set_len(1 << 20).map_err(|e| e.raw_os_error()), Ok(()));

    // Punch hole and zero range read back as zeroes; plain allocate works.
    buf.fill(0x5a);
    f.write_all_at(&buf[..8192], 0).unwrap();
    fallocate(
        &plain,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        0,
        4096,
    )
    .unwrap();
    fallocate(&plain, libc::FALLOC_FL_ZERO_RANGE, 4096, 2048).unwrap();
    fallocate(&plain, 0, 0, 1 << 20).unwrap();
    f.read_exact_at(&mut buf[..8192], 0).unwrap();
    assert!(
        buf[..6144].iter().all(|&b| b == 0),
        "discarded range not zero"
    );
    assert!(
        buf[6144..8192].iter().all(|&b| b == 0x5a),
        "data after the range changed"
    );
    assert_eq!(
        fallocate(&plain, 0, 1 << 20, 4096)
            .unwrap_err()
            .raw_os_error(),
        Some(libc::ENOSPC)
    );

    // fsync and fdatasync reach the daemon (fdatasync on the backing file).
    plain.sync_all().unwrap();
    plain.sync_data().unwrap();
    let backing = std::fs::read(&img).unwrap();
    assert!(backing[6144..8192].iter().all(|&b| b == 0x5a));

    // Files are opened in direct I/O mode; a shared mapping still works
    // (FUSE_DIRECT_IO_ALLOW_MMAP) and its stores reach the daemon.
    let rw = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // SAFETY: a fresh shared mapping of 64 KiB of the file, unmapped below.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            65536,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            rw.as_raw_fd(),
            65536,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        std::ptr::write_bytes(p.cast::<u8>(), 0x77, 65536);
        assert_eq!(libc::msync(p, 65536, libc::MS_SYNC), 0);
        libc::munmap(p, 65536);
    }
    f.read_exact_at(&mut buf[..4096], 65536).unwrap();
    assert!(
        buf[..4096].iter().all(|&b| b == 0x77),
        "mmap store not seen"
    );
    assert_eq!(broker.status("vol0")["failed"], 0);
}

/// PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE (include/linux/sched.h): what
/// PR_SET_IO_FLUSHER sets on a task.
const IO_FLUSHER_FLAGS: u64 = 0x0008_0000 | 0x0010_0000;

/// The name and flags (fields 2 and 9 of /proc/PID/task/TID/stat) of each
/// thread of `pid` that is still there once listed.
fn thread_flags(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        // A short-lived thread may end between the listing and the read.
        let Ok(stat) = std::fs::read_to_string(task.join("stat")) else {
            continue;
        };
        // The name may hold spaces; fields after it are plain.
        let (open, close) = (stat.find('(').unwrap(), stat.rfind(')').unwrap());
        let flags = stat[close + 2..]
            .split(' ')
            .nth(6)
            .unwrap()
            .parse()
            .unwrap();
        out.push((stat[open + 1..close].to_owned(), flags));
    }
    out
}

/// Whether this process has CAP_SYS_RESOURCE (bit 24 of CapEff), which
/// PR_SET_IO_FLUSHER needs.
fn can_be_io_flusher() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|c| u64::from_str_radix(c.trim(), 16).ok())
        .unwrap();
    caps & (1 << 24) != 0
}

// A volume's writeback goes through the broker's FUSE workers and the
// daemon (in direct mode its readers), so those threads (every thread of
// the daemon) are IO flushers (prctl(2)): reclaim in them does not wait for
// the writeback they serve. Without CAP_SYS_RESOURCE (this CI's container)
// each says so in its log; the kernel-vm tests check the flags as root.
holdfast_tests::both_modes!(
    volume_threads_are_io_flushers,
    direct_volume_threads_are_io_flushers,
    io_flushers_in
);

fn io_flushers_in(mode: Mode) {
    let scratch = Scratch::new("io-flusher", Duration::from_secs(60));
    let size = mode.export("16MiB");
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", &size)]));
    let backend = format!("file:{}/vol0.img", scratch.dir.display());
    let daemon = broker.daemon(&scratch, "vol0", &backend, &["--workers", "2"]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    let capable = can_be_io_flusher();
    let want = if capable { IO_FLUSHER_FLAGS } else { 0 };
    let workers: Vec<_> = thread_flags(broker.proc.pid())
        .into_iter()
        .filter(|(name, _)| name.starts_with("fuse-vol0-"))
        .collect();
    // The daemon starts its workers (or readers) once restored, just after
    // the broker shows it active.
    let readers = |threads: &[(String, u64)]| {
        threads
            .iter()
            .filter(|(name, _)| name.starts_with("fuse-direct-"))
            .count()
    };
    let want_readers = if mode == Mode::Direct { 4 } else { 0 };
    let started = |t: &[(String, u64)]| t.len() > 2 && readers(t) == want_readers;
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let mut daemon_threads = thread_flags(daemon.pid());
    while !started(&daemon_threads) && std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
        daemon_threads = thread_flags(daemon.pid());
    }
    assert!(
        workers.len() == 4 && started(&daemon_threads),
        "{workers:?} {daemon_threads:?}"
    );
    for (name, flags) in workers.iter().chain(&daemon_threads) {
        assert_eq!(flags & IO_FLUSHER_FLAGS, want, "{name}");
    }
    for log in [broker.proc.log_text(), daemon.log_text()] {
        let warned = log.contains("PR_SET_IO_FLUSHER: Operation not permitted");
        assert_eq!(warned, !capable, "{log}");
    }
}
