//! Bad input: malformed, truncated, oversized and wrong-version control
//! messages; ATTACH to a missing or busy export; peers with a uid that is
//! not allowed; daemons that write out-of-range slots, sequence numbers,
//! epochs, results and ring indices into shared memory. Each gets a clear
//! error, the broker keeps serving the other exports, and nothing is lost.
//!
//! The test process never ATTACHes itself: a peer that attaches and goes
//! away is fenced, i.e. killed.

use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;
use std::time::Duration;

use holdfast_daemon::Error;
use holdfast_daemon::client::Connection;
use holdfast_proto::{Attach, ErrorCode, Hello, PROTOCOL_VERSION, Reply, Request};
use holdfast_tests::{
    AlignedBuf, Broker, BrokerOpts, Mode, Scratch, bin, open_direct, seed, stop_writer,
    write_in_thread, writer,
};

fn error_of(conn: &mut Connection, bytes: &[u8]) -> ErrorCode {
    conn.send_raw(bytes, &[]).unwrap();
    match conn.recv().unwrap() {
        (Reply::Error(e), _) => {
            assert!(!e.text.is_empty());
            e.code
        }
        (other, _) => panic!("expected an error, got {other:?}"),
    }
}

fn hello(version: u16) -> Vec<u8> {
    Request::Hello(Hello {
        version,
        caps: 0,
        pid: std::process::id(),
    })
    .encode()
}

holdfast_tests::both_modes!(
    malformed_control_messages,
    direct_malformed_control_messages,
    malformed_control_messages_in
);

fn malformed_control_messages_in(mode: Mode) {
    let scratch = Scratch::new(
        &format!("bad-control-{}", mode.name()),
        Duration::from_secs(60),
    );
    let size = mode.export("4MiB");
    let broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", &size), ("vol1", &size)]),
    );
    let img = |n: &str| format!("file:{}", scratch.path(n).display());
    let _d0 = broker.daemon(&scratch, "vol0", &img("vol0.img"), &[]);
    let _d1 = broker.daemon(&scratch, "vol1", &img("vol1.img"), &[]);
    let (_, e0) = broker.wait_active("vol0", 0, Duration::from_secs(10));
    let (_, e1) = broker.wait_active("vol1", 0, Duration::from_secs(10));

    let mut c = Connection::connect(&broker.socket).unwrap();
    // Anything but HELLO first is refused.
    assert_eq!(
        error_of(&mut c, &Request::Status.encode()),
        ErrorCode::NotPermitted
    );
    assert_eq!(error_of(&mut c, b"hello, broker"), ErrorCode::Malformed);
    let h = hello(PROTOCOL_VERSION);
    for cut in [1, 7, 8, h.len() - 1] {
        assert_eq!(
            error_of(&mut c, &h[..cut]),
            ErrorCode::Malformed,
            "cut at {cut}"
        );
    }
    let mut frame = h.clone();
    frame[4] = 9;
    assert_eq!(error_of(&mut c, &frame), ErrorCode::UnsupportedVersion);
    assert_eq!(error_of(&mut c, &hello(99)), ErrorCode::UnsupportedVersion);
    assert_eq!(
        error_of(&mut c, &vec![0u8; holdfast_proto::MAX_MESSAGE_LEN + 4096]),
        ErrorCode::TooLarge
    );
    let mut unknown = Request::Status.encode();
    unknown[6] = 0x7e;
    assert_eq!(error_of(&mut c, &unknown), ErrorCode::Malformed);
    // More descriptors than any message carries.
    let f = std::fs::File::open("/dev/null").unwrap();
    let fds = [f.as_fd(); 6];
    c.send_raw(&Request::Status.encode(), &fds).unwrap();
    let r = c.recv().unwrap().0;
    assert!(
        matches!(&r, Reply::Error(e) if e.code == ErrorCode::TooLarge),
        "{r:?}"
    );

    // After HELLO: bad ATTACHes and requests out of place.
    c.send_raw(&hello(PROTOCOL_VERSION), &[]).unwrap();
    assert!(matches!(c.recv().unwrap().0, Reply::Hello { .. }));
    let attach = |export: &str| {
        Request::Attach(Attach {
            export: export.into(),
            takeover: false,
            direct: false,
        })
        .encode()
    };
    assert_eq!(error_of(&mut c, &attach("nope")), ErrorCode::NoSuchExport);
    c.send_raw(&attach("vol0"), &[]).unwrap();
    match c.recv().unwrap().0 {
        Reply::Error(e) => {
            assert_eq!(e.code, ErrorCode::Busy);
            assert!(e.text.contains("takeover"), "{}", e.text);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        error_of(&mut c, &Request::Restore.encode()),
        ErrorCode::NotAttached
    );
    assert_eq!(
        error_of(&mut c, &Request::FdGet { name: "mem".into() }.encode()),
        ErrorCode::NotAttached
    );
    assert_eq!(
        error_of(&mut c, &hello(PROTOCOL_VERSION)),
        ErrorCode::BadState
    );
    // A stream of garbage ends the connection, not the broker.
    let mut closed = None;
    for i in 0..64 {
        if c.send_raw(b"garbage", &[]).is_err() || matches!(c.recv(), Err(Error::BrokerGone)) {
            closed = Some(i);
            break;
        }
    }
    assert!(closed.is_some(), "connection never closed");

    // The broker still serves, and the daemons were not disturbed.
    for (name, epoch) in [("vol0", e0), ("vol1", e1)] {
        let f = open_direct(&broker.file(name));
        let mut b = AlignedBuf::new(4096);
        b.fill(7);
        f.write_all_at(&b, 4096).unwrap();
        b.fill(0);
        f.read_exact_at(&mut b, 4096).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        let s = broker.status(name);
        assert_eq!(s["daemon"]["epoch"], epoch, "{s}");
        assert_eq!(s["daemons_lost"], 0, "{s}");
    }
}

#[test]
fn peers_with_other_uids_are_refused() {
    let scratch = Scratch::new("bad-uid", Duration::from_secs(60));
    // World-writable socket, so that only the uid check stands in the way.
    let open = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", "1MiB")])
            .arg("--socket-mode")
            .arg("666"),
    );
    let as_nobody = |b: &Broker| {
        Command::new(bin("holdfastctl"))
            .arg("--socket")
            .arg(&b.socket)
            .arg("status")
            .uid(65534)
            .output()
            .unwrap()
    };
    std::fs::set_permissions(
        &scratch.dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let out = as_nobody(&open);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("uid 65534 may not use this broker"), "{err}");
    drop(open);

    let scratch2 = Scratch::new("bad-uid-allowed", Duration::from_secs(60));
    std::fs::set_permissions(
        &scratch2.dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let allowed = Broker::start(
        &scratch2,
        BrokerOpts::new(&[("vol0", "1MiB")])
            .arg("--socket-mode")
            .arg("666")
            .arg("--allow-uid")
            .arg("65534"),
    );
    let out = as_nobody(&allowed);
    assert!(out.status.success(), "{out:?}");

    // The default mode 0600 keeps other users out before they can connect.
    let scratch3 = Scratch::new("bad-uid-mode", Duration::from_secs(60));
    std::fs::set_permissions(
        &scratch3.dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let closed = Broker::start(&scratch3, BrokerOpts::new(&[("vol0", "1MiB")]));
    let meta = std::fs::metadata(&closed.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o600
    );
    let out = as_nobody(&closed);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
}

// In direct mode the faulty daemons (relay-only) are relayed; the good
// ones serve in direct mode around them.
holdfast_tests::both_modes!(
    faulty_daemons_are_fenced_and_their_requests_replayed,
    direct_faulty_daemons_are_fenced_and_their_requests_replayed,
    faulty_daemons_in
);

fn faulty_daemons_in(mode: Mode) {
    let scratch = Scratch::new(
        &format!("bad-shm-{}", mode.name()),
        Duration::from_secs(180),
    );
    let (vol0, vol1) = (mode.export("4MiB"), mode.export("16MiB"));
    let broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", &vol0), ("vol1", &vol1)]),
    );
    let img0 = format!("file:{}", scratch.path("vol0.img").display());
    let img1 = format!("file:{}", scratch.path("vol1.img").display());
    // vol1 is busy all along with a good daemon and a verified writer.
    let _d1 = broker.daemon(&scratch, "vol1", &img1, &[]);
    broker.wait_active("vol1", 0, Duration::from_secs(10));
    let seed = seed();
    let mut writer = writer(&scratch, &broker.file("vol1"), 2, seed, None);

    let modes = [
        "slot-out-of-range",
        "unknown-seq",
        "wrong-epoch",
        "result-too-long",
        "bad-errno",
        "tail-overrun",
    ];
    let mut epoch = 0;
    for (i, mode) in modes.iter().enumerate() {
        let mut faulty = broker.faulty(&scratch, "vol0", mode, &[]);
        epoch = broker.wait_active("vol0", epoch, Duration::from_secs(10)).1;
        let off = i as u64 * 4096;
        let write = write_in_thread(&broker, "vol0", off, i as u8 + 1);
        // The broker rejects the completion and fences the daemon.
        let st = faulty
            .wait_timeout(Duration::from_secs(20))
            .unwrap_or_else(|| {
                panic!(
                    "{mode}: faulty daemon not fenced:\n{}",
                    broker.proc.log_text()
                )
            });
        assert_eq!(st.signal(), Some(libc::SIGKILL), "{mode}: {st}");
        assert!(
            !write.is_finished(),
            "{mode}: the write completed with a bad completion"
        );
        let s = broker.status("vol0");
        assert_eq!(s["daemons_lost"], i as u64 + 1, "{mode}: {s}");
        assert_eq!(s["pending"], 1, "{mode}: {s}");
        // A good daemon gets the request replayed and completes it.
        let mut good = broker.daemon(&scratch, "vol0", &img0, &[]);
        epoch = broker.wait_active("vol0", epoch, Duration::from_secs(10)).1;
        write
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{mode}: write failed: {e}"));
        let f = open_direct(&broker.file("vol0"));
        let mut b = AlignedBuf::new(4096);
        f.read_exact_at(&mut b, off).unwrap();
        assert!(b.iter().all(|&x| x == i as u8 + 1), "{mode}: data lost");
        good.signal(libc::SIGTERM);
        assert!(
            good.wait_timeout(Duration::from_secs(10))
                .is_some_and(|s| s.success())
        );
    }
    let s = broker.status("vol0");
    // Every mode but the ring overrun is a rejected completion.
    assert_eq!(s["rejected_completions"], modes.len() as u64 - 1, "{s}");
    assert_eq!(s["failed"], 0, "{s}");

    stop_writer(&mut writer);
    assert_eq!(broker.status("vol1")["daemons_lost"], 0);
}
