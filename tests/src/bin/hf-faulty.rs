//! hf-faulty: a daemon that attaches and restores like a real one, then
//! answers the first request it gets with a bad completion written straight
//! into shared memory, and waits (to be fenced by the broker).
//!
//! Modes: slot-out-of-range, unknown-seq, wrong-epoch (a later epoch),
//! old-epoch (the previous daemon's epoch), result-too-long, bad-errno,
//! tail-overrun; and no-restore, which never sends RESTORE (so only an
//! operator's `holdfastctl restore` starts dispatch) and then answers its
//! first request correctly.
//!
//! With `--successor` it joins as a handoff successor (PREPARE, READY, and
//! RESTORE once activated) instead of attaching.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use holdfast_daemon::client::Connection;
use holdfast_proto::shm::Completion;
use holdfast_proto::{Reply, Request};

fn main() {
    let mut socket = None;
    let mut export = None;
    let mut mode = String::new();
    let mut successor = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--socket" => socket = args.next(),
            "--export" => export = args.next(),
            "--mode" => mode = args.next().unwrap(),
            "--successor" => successor = true,
            other => panic!("hf-faulty: unknown argument {other}"),
        }
    }
    let mut conn = Connection::connect(socket.unwrap().as_ref()).unwrap();
    conn.hello().unwrap();
    let export = export.unwrap();
    let att = if successor {
        let att = conn.prepare(&export, false).unwrap();
        conn.send(&Request::Ready).unwrap();
        match conn.recv().unwrap() {
            (Reply::Activate, _) => {}
            other => panic!("hf-faulty: expected ACTIVATE, got {other:?}"),
        }
        att
    } else {
        conn.attach(&export, false, false).unwrap()
    };
    if mode != "no-restore" {
        conn.restore().unwrap();
    }
    eprintln!("hf-faulty: attached, waiting for a request");
    let end = Instant::now() + Duration::from_secs(60);
    while att.submission_tail() == 0 {
        assert!(Instant::now() < end, "no request arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = att.submission(0);
    att.set_submission_head(1);
    let good = Completion {
        seq: s.seq,
        epoch: s.epoch,
        slot: s.slot,
        result: i32::try_from(s.len).unwrap(),
    };
    let bad = match mode.as_str() {
        "no-restore" => good,
        "slot-out-of-range" => Completion {
            slot: 60_000,
            ..good
        },
        "unknown-seq" => Completion {
            seq: s.seq + 1_000_000,
            ..good
        },
        "wrong-epoch" => Completion {
            epoch: s.epoch + 1,
            ..good
        },
        "old-epoch" => Completion {
            epoch: s.epoch - 1,
            ..good
        },
        "result-too-long" => Completion {
            result: good.result + 1,
            ..good
        },
        "bad-errno" => Completion {
            result: -100_000,
            ..good
        },
        "tail-overrun" => {
            att.publish_completions(1000);
            eprintln!("hf-faulty: injected {mode}");
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        other => panic!("hf-faulty: unknown mode {other}"),
    };
    att.put_completion(0, &bad);
    att.publish_completions(1);
    eprintln!("hf-faulty: injected {mode}: {bad:?}");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
