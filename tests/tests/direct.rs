//! Direct mode's daemon side (`holdfast_daemon::direct`, run by
//! `hf-direct`) on a real FUSE connection, with the test as the holder the
//! broker is to be: it mounts the connection, answers INIT with the
//! `Volume` the broker's relay mode answers with, keeps a reference to
//! every descriptor it hands over, and after each SIGKILL waits until the
//! daemon is gone and writes FUSE_NOTIFY_RESEND, so that the next daemon
//! gets what the dead one had read. A verified writer must see no error
//! and no lost write; the backing file must hold every last write. Then
//! the broker as the holder (`broker_lends_the_connection_where_allowed`);
//! its crash loops in direct mode are in crash.rs.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use holdfast_kernel::fuse::request::{self, FuseOp, HEAD_LEN, IN_HEADER_LEN};
use holdfast_kernel::fuse::{Answer, Volume, sys};
use holdfast_tests::{Proc, Rng, Scratch, bin, check_backing, seed, stop_writer, writer};

const SIZE: u64 = 32 << 20;
const MAX_IO: u32 = 1 << 20;
const READERS: usize = 4;

/// The connection's holder: the mount and every descriptor. Dropped last:
/// unmounting and closing them ends the connection, so that no writer
/// waits for a daemon that will not come.
struct Holder {
    mount: PathBuf,
    devs: Vec<OwnedFd>,
}

impl Holder {
    /// Mounts a connection on `mount` and answers its INIT.
    fn mount(mount: &Path) -> Self {
        std::fs::write(mount, b"").unwrap();
        let dev = sys::open_dev().unwrap();
        sys::mount(dev.as_fd(), mount, MAX_IO).unwrap();
        let started = 1_700_000_000;
        let volume = Volume::new(SIZE, MAX_IO, 64, started);
        let mut head = [0u8; HEAD_LEN];
        let mut body = vec![0u8; MAX_IO as usize];
        // SAFETY: `body` is ours, MAX_IO bytes.
        let n = unsafe { sys::read_request(dev.as_fd(), &mut head, body.as_mut_ptr(), body.len()) }
            .unwrap();
        let h = request::header(&head).unwrap();
        let mut args = head[IN_HEADER_LEN..n.min(HEAD_LEN)].to_vec();
        args.extend_from_slice(&body[..n.saturating_sub(HEAD_LEN)]);
        let op = request::parse(h.opcode, &args).unwrap();
        assert!(matches!(op, FuseOp::Init { .. }), "first request: {op:?}");
        let answer = volume.answer(h.nodeid, &op);
        let Answer::Init(_, init) = answer else {
            panic!("INIT answered {answer:?}")
        };
        assert!(
            init.can_resend(),
            "this kernel cannot re-send FUSE requests"
        );
        let (errno, reply) = answer.reply().unwrap();
        let iov = [libc::iovec {
            iov_base: reply.as_ptr().cast_mut().cast(),
            iov_len: reply.len(),
        }];
        // SAFETY: `reply` is borrowed for the call.
        unsafe { sys::reply(dev.as_fd(), h.unique, errno, &iov) }.unwrap();
        let mut devs = vec![dev];
        for _ in 1..READERS {
            devs.push(sys::clone_dev(devs[0].as_fd()).unwrap());
        }
        Self {
            mount: mount.to_owned(),
            devs,
        }
    }

    /// Starts a daemon reading every descriptor (its own copies: ours stay
    /// open), serving `img`.
    fn daemon(&self, scratch: &Scratch, img: &Path, n: u32) -> Proc {
        let raw: Vec<i32> = self.devs.iter().map(AsRawFd::as_raw_fd).collect();
        let list = raw.iter().map(i32::to_string).collect::<Vec<_>>().join(",");
        let mut cmd = Command::new(bin("hf-direct"));
        cmd.args(["--fds", &list, "--size", &SIZE.to_string()])
            .args(["--max-io", &MAX_IO.to_string(), "--started", "1700000000"])
            .arg("--backend")
            .arg(format!("file:{}", img.display()));
        // SAFETY: fcntl is async-signal-safe; the child inherits the
        // descriptors, the parent's stay close-on-exec.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &raw {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let p = scratch.spawn(&mut cmd, &format!("direct-{n}.log"));
        let log = p.log.clone();
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while !holdfast_tests::read_text(&log).starts_with("ready") {
            assert!(
                std::time::Instant::now() < end,
                "hf-direct did not start:\n{}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        p
    }

    /// After a daemon is gone: the kernel re-queues what it had read.
    fn resend(&self) {
        sys::notify_resend(self.devs[0].as_fd()).unwrap();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = sys::unmount(&self.mount);
    }
}

/// The most re-sent requests a daemon's log reports.
fn resent(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["resent"].as_u64())
        .max()
        .unwrap_or(0)
}

#[test]
fn sigkills_under_verified_writers_lose_nothing() {
    let scratch = Scratch::new("direct-kills", Duration::from_secs(600));
    let holder = Holder::mount(&scratch.path("vol0"));
    let img = scratch.path("vol0.img");
    let gens = scratch.path("gens");
    let seed = seed();
    let mut daemon = holder.daemon(&scratch, &img, 0);
    let mut w = writer(&scratch, &holder.mount, 4, seed, Some(&gens));
    let mut rng = Rng::new(seed);
    let kills = 60;
    let mut total = 0;
    for i in 1..=kills {
        std::thread::sleep(Duration::from_millis(rng.range(20, 120)));
        assert!(w.is_running(), "writer died:\n{}", w.log_text());
        assert!(daemon.kill().is_some(), "daemon {i} did not die");
        total += resent(&daemon.log_text());
        holder.resend();
        daemon = holder.daemon(&scratch, &img, i);
    }
    let report = stop_writer(&mut w);
    daemon.signal(libc::SIGTERM);
    assert!(
        daemon
            .wait_timeout(Duration::from_secs(30))
            .is_some_and(|s| s.success())
    );
    total += resent(&daemon.log_text());
    check_backing(&scratch, &img, &gens, seed);
    eprintln!("{kills} kills, {total} requests re-sent; writer: {report}");
    assert!(total > 0, "no kill hit a request in flight");
    drop(holder);
}

#[test]
fn a_late_reply_to_a_re_sent_request_is_refused() {
    let scratch = Scratch::new("direct-late", Duration::from_secs(120));
    let holder = Holder::mount(&scratch.path("vol0"));
    let file = holder.mount.clone();
    let reader = std::thread::spawn(move || {
        use std::os::unix::fs::FileExt;
        let f = holdfast_tests::open_direct(&file);
        let mut buf = holdfast_tests::AlignedBuf::new(4096);
        f.read_exact_at(&mut buf, 0).map(|()| buf[0])
    });
    // A daemon reads the READ and stalls; the holder has it re-sent.
    let read = |holder: &Holder| {
        let mut head = [0u8; HEAD_LEN];
        let mut body = vec![0u8; MAX_IO as usize];
        loop {
            // SAFETY: `body` is ours, MAX_IO bytes.
            let n = unsafe {
                sys::read_request(
                    holder.devs[1].as_fd(),
                    &mut head,
                    body.as_mut_ptr(),
                    body.len(),
                )
            };
            let h = request::header(&head[..]).unwrap();
            let args = &head[IN_HEADER_LEN..n.unwrap().min(HEAD_LEN)];
            if let Ok(FuseOp::Read { size, .. }) = request::parse(h.opcode, args) {
                return (h.unique, size as usize);
            }
            // OPEN and the like, before the READ.
            let answer = Volume::new(SIZE, MAX_IO, 64, 0)
                .answer(h.nodeid, &request::parse(h.opcode, args).unwrap());
            if let Some((errno, reply)) = answer.reply() {
                let iov = [libc::iovec {
                    iov_base: reply.as_ptr().cast_mut().cast(),
                    iov_len: reply.len(),
                }];
                let pieces = if reply.is_empty() {
                    &iov[..0]
                } else {
                    &iov[..]
                };
                // SAFETY: `reply` is borrowed for the call.
                unsafe { sys::reply(holder.devs[1].as_fd(), h.unique, errno, pieces) }.unwrap();
            }
        }
    };
    let reply = |unique: u64, fill: u8, len: usize| {
        let data = vec![fill; len];
        let iov = [libc::iovec {
            iov_base: data.as_ptr().cast_mut().cast(),
            iov_len: len,
        }];
        // SAFETY: `data` is borrowed for the call.
        unsafe { sys::reply(holder.devs[1].as_fd(), unique, 0, &iov) }
    };
    let (first, len) = read(&holder);
    assert!(!request::is_resent(first));
    holder.resend();
    let late = reply(first, b'A', len).unwrap_err();
    assert_eq!(late.raw_os_error(), Some(libc::ENOENT), "{late}");
    let (again, len) = read(&holder);
    assert!(request::is_resent(again), "{again:#x}");
    assert_eq!(again & !(1 << 63), first);
    reply(again, b'B', len).unwrap();
    assert_eq!(reader.join().unwrap().unwrap(), b'B');
    drop(holder);
}

/// Through the broker: a daemon gets direct mode (a FUSE export's default)
/// unless the export (`,relay`) or the daemon (`--relay`) opts out; both modes serve the same
/// bytes; handoffs between the modes, both ways; `--takeover` replaces a
/// direct daemon, with the kernel re-sending what it held.
#[test]
fn broker_lends_the_connection_where_allowed() {
    use holdfast_tests::{Broker, BrokerOpts};
    let scratch = Scratch::new("direct-broker", Duration::from_secs(60));
    let broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", "16MiB"), ("vol1", "16MiB,relay")]),
    );
    let img = scratch.path("vol0.img");
    let backend = format!("file:{}", img.display());
    let mut relayed = broker.daemon(&scratch, "vol0", &backend, &["--relay"]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));
    assert_eq!(broker.status("vol0")["daemon"]["mode"], "relay");
    assert_eq!(broker.status("vol0")["mode"], "direct");
    let mut rng = Rng::new(seed());
    let mut data = vec![0u8; 1 << 20];
    rng.fill(&mut data);
    let file = broker.file("vol0");
    std::os::unix::fs::FileExt::write_all_at(
        &std::fs::OpenOptions::new().write(true).open(&file).unwrap(),
        &data,
        0,
    )
    .unwrap();
    relayed.signal(libc::SIGTERM);
    assert!(relayed.wait_timeout(Duration::from_secs(10)).is_some());

    let mut old = broker.daemon(&scratch, "vol0", &backend, &[]);
    broker.wait_active("vol0", 1, Duration::from_secs(10));
    assert_eq!(broker.status("vol0")["daemon"]["mode"], "direct");
    let read = std::fs::read(&file).unwrap();
    assert!(
        read[..data.len()] == data[..],
        "direct mode read other bytes"
    );
    // Direct to relay and back, by handoff.
    for (extra, want) in [
        (&["--successor", "--relay"][..], "relay"),
        (&["--successor"][..], "direct"),
    ] {
        let (mut conn, _) = broker.arm_handoff("vol0", false, 0);
        let next = broker.daemon(&scratch, "vol0", &backend, extra);
        let r = holdfast_tests::handoff_report(&mut conn);
        assert_eq!(
            r.outcome,
            holdfast_proto::HandoffOutcome::Completed,
            "{r:?}"
        );
        assert_eq!(broker.status("vol0")["daemon"]["mode"], want);
        let read = std::fs::read(&file).unwrap();
        assert!(
            read[..data.len()] == data[..],
            "{want} mode read other bytes"
        );
        let status = old.wait_timeout(Duration::from_secs(10));
        assert!(status.is_some_and(|s| s.success()), "{}", old.log_text());
        old = next;
    }
    let epoch = broker.status("vol0")["daemon"]["epoch"].as_u64().unwrap();

    // vol1 is relay: so is its daemon.
    let other = format!("file:{}", scratch.path("vol1.img").display());
    let _relay = broker.daemon(&scratch, "vol1", &other, &[]);
    broker.wait_active("vol1", 0, Duration::from_secs(10));
    assert_eq!(broker.status("vol1")["daemon"]["mode"], "relay");
    assert_eq!(broker.status("vol1")["mode"], "relay");

    let _next = broker.daemon(&scratch, "vol0", &backend, &["--takeover"]);
    broker.wait_active("vol0", epoch, Duration::from_secs(10));
    let read = std::fs::read(&file).unwrap();
    assert!(read[..data.len()] == data[..]);
    assert_eq!(broker.status("vol0")["daemons_lost"], 1);
    drop(old);
}
