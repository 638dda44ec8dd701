//! The I/O loop: the main thread consumes the submission ring and watches
//! the control socket and signals; worker threads run requests against the
//! backend and publish completions.

use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use holdfast_proto::Reply;
use holdfast_proto::shm::{Completion, Op, Submission};
use parking_lot::Mutex;
use rustix::event::{PollFd, PollFlags, Timespec};

use crate::backends::Backend;
use crate::client::Connection;
use crate::rings::Attachment;
use crate::{Error, log};

/// How long the main loop sleeps between checks when idle.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Signals that ask the daemon to detach and exit.
const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// Blocks SIGTERM and SIGINT in this thread (and the threads it starts
/// later) and returns a signalfd that reports them. Call before starting
/// threads.
pub fn stop_signals() -> Result<OwnedFd, Error> {
    // SAFETY: plain libc calls on a local sigset; signalfd returns a new fd.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&raw mut set, s);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
        if rc != 0 {
            return Err(Error::io(
                "pthread_sigmask",
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        let fd = libc::signalfd(-1, &raw const set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(Error::io("signalfd", std::io::Error::last_os_error()));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Runs one request against the backend; returns the completion result.
fn execute(att: &Attachment, backend: &dyn Backend, s: &Submission) -> i32 {
    let Some((op, buf)) = att.check(s) else {
        return -libc::EINVAL;
    };
    let result = match (op, buf) {
        (Op::Read, Some((ptr, len))) => {
            // SAFETY: the broker hands a slot's buffer to exactly one
            // request at a time and does not touch it until completion.
            let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
            backend.read(s.offset, buf).map(|()| len)
        }
        (Op::Write, Some((ptr, len))) => {
            // SAFETY: as above.
            let buf = unsafe { std::slice::from_raw_parts(ptr, len) };
            backend.write(s.offset, buf).map(|()| len)
        }
        (Op::Flush, _) => backend.flush().map(|()| 0),
        (Op::Discard, _) => backend.discard(s.offset, s.len).map(|()| 0),
        (Op::WriteZeroes, _) => backend.write_zeroes(s.offset, s.len).map(|()| 0),
        (Op::Allocate, _) => backend.allocate(s.offset, s.len).map(|()| 0),
        _ => return -libc::EINVAL,
    };
    match result {
        Ok(n) => i32::try_from(n).unwrap_or(-libc::EIO),
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    }
}

/// Serves requests until the broker confirms a DETACH (after SIGTERM or
/// SIGINT: returns `Ok`) or goes away (returns `Err(BrokerGone)`).
pub fn serve(
    mut conn: Connection,
    att: Attachment,
    backend: Arc<dyn Backend>,
    workers: usize,
    signals: OwnedFd,
) -> Result<(), Error> {
    let att = Arc::new(att);
    let entries = att.geometry.slot_count;
    let (tx, rx) = crossbeam_channel::bounded::<Submission>(entries as usize);
    let completion_tail = Arc::new(Mutex::new(0u32));
    let mut threads = Vec::new();
    for i in 0..workers.max(1) {
        let (rx, att, backend, tail) = (
            rx.clone(),
            att.clone(),
            backend.clone(),
            completion_tail.clone(),
        );
        let t = std::thread::Builder::new()
            .name(format!("holdfast-io{i}"))
            .spawn(move || {
                for s in rx {
                    let result = execute(&att, backend.as_ref(), &s);
                    let c = Completion {
                        seq: s.seq,
                        epoch: s.epoch,
                        slot: s.slot,
                        result,
                    };
                    let mut tail = tail.lock();
                    att.put_completion(*tail, &c);
                    *tail = tail.wrapping_add(1);
                    att.publish_completions(*tail);
                }
            })
            .map_err(|e| Error::io("cannot start a worker thread", e))?;
        threads.push(t);
    }
    drop(rx);

    let mut head = 0u32;
    let mut detaching = false;
    let outcome = loop {
        let tail = att.submission_tail();
        if tail.wrapping_sub(head) > entries {
            break Err(Error::Protocol(format!(
                "submission tail {tail} is more than {entries} past head {head}"
            )));
        }
        while head != tail {
            let s = att.submission(head);
            head = head.wrapping_add(1);
            if tx.send(s).is_err() {
                break;
            }
        }
        att.set_submission_head(head);
        // Ask to be woken, then look again before sleeping.
        att.set_submission_wakeup(true);
        if att.submission_tail() != head {
            att.set_submission_wakeup(false);
            continue;
        }
        let mut fds = [
            PollFd::from_borrowed_fd(att.submit_kick(), PollFlags::IN),
            PollFd::from_borrowed_fd(conn.socket(), PollFlags::IN),
            PollFd::from_borrowed_fd(signals.as_fd(), PollFlags::IN),
        ];
        let timeout = Timespec {
            tv_sec: IDLE_POLL.as_secs() as i64,
            tv_nsec: 0,
        };
        let _ = rustix::event::poll(&mut fds, Some(&timeout));
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| {
                f.revents()
                    .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
            })
            .collect();
        att.set_submission_wakeup(false);
        if ready[0] {
            // Empty the kick pipe (non-blocking); the ring itself says what to do.
            let mut b = [0u8; 512];
            while let Ok(1..) = rustix::io::read(att.submit_kick(), &mut b) {}
        }
        if ready[2] {
            let mut b = [0u8; 128];
            let _ = rustix::io::read(signals.as_fd(), &mut b);
            if !detaching {
                log("signal received: detaching (finishing requests in flight)");
                detaching = true;
                if let Err(e) = conn.send_detach() {
                    break Err(e);
                }
            }
        }
        if ready[1] {
            match conn.recv() {
                Ok((Reply::Detached, _)) => break Ok(()),
                Ok((Reply::Error(e), _)) => log(&format!("broker: {e}")),
                Ok((other, _)) => log(&format!("unexpected message from the broker: {other:?}")),
                Err(e) => break Err(e),
            }
        }
    };
    drop(tx);
    for t in threads {
        let _ = t.join();
    }
    outcome
}
