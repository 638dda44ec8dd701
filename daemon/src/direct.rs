//! Direct mode (FUSE): the daemon reads and answers the export's FUSE
//! connection itself, through descriptors its holder (the broker) gives it
//! and keeps a reference to, so that a dead daemon's requests stay on the
//! kernel's processing lists for the holder's FUSE_NOTIFY_RESEND. One
//! reader thread per descriptor runs each request on the backend in place:
//! the path of an in-process FUSE server, without the broker's hop. What
//! the file system answers comes from holdfast-kernel's `Volume`, the code
//! the broker's relay mode answers with.
//!
//! The holder answers INIT before it hands the connection over; a reader
//! that sees one refuses it.

use std::borrow::Cow;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use holdfast_kernel::fuse::request::{self, FuseOp, HEAD_LEN, IN_HEADER_LEN, MAX_ARGS_LEN};
use holdfast_kernel::fuse::{Answer, Volume, sys};
use holdfast_proto::shm::Op;

use crate::backends::{self, Backend};

/// How long `stop` waits for the readers to finish what they hold.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// What the readers did, for status and tests.
#[derive(Debug, Default)]
pub struct Counters {
    /// Requests answered (with success or an error).
    pub answered: AtomicU64,
    /// Of those, requests the kernel re-sent (a dead server had read them).
    pub resent: AtomicU64,
    /// Replies the kernel refused (the request was re-sent meanwhile, or
    /// interrupted).
    pub refused: AtomicU64,
}

/// A FUSE connection served in direct mode.
pub struct Direct {
    readers: Vec<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
    counters: Arc<Counters>,
}

impl Direct {
    /// Serves the connection through `devs`, one reader each, answering
    /// from `volume` and `backend`; each request's data is at most
    /// `max_io` bytes (INIT's max_write and max_readahead).
    pub fn start(
        devs: Vec<OwnedFd>,
        volume: Volume,
        max_io: u32,
        backend: Arc<dyn Backend>,
        read_delay: Duration,
    ) -> io::Result<Self> {
        sys::install_interrupt()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut direct = Self {
            readers: Vec::with_capacity(devs.len()),
            stopping,
            counters,
        };
        for (i, dev) in devs.into_iter().enumerate() {
            let r = Reader {
                dev,
                volume,
                body: vec![0u8; max_io as usize],
                backend: backend.clone(),
                counters: direct.counters.clone(),
                read_delay,
            };
            let stopping = direct.stopping.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("fuse-direct-{i}"))
                .spawn(move || r.run(&stopping));
            match spawned {
                Ok(t) => direct.readers.push(t),
                Err(e) => {
                    direct.stop();
                    return Err(e);
                }
            }
        }
        Ok(direct)
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The counters, to read after `stop`.
    pub fn counters_handle(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Stops reading: each reader answers the request it holds and exits.
    /// What the kernel has not handed out stays queued for the next
    /// server. Returns false if a reader was still busy after a bound
    /// (its backend call hangs); it is left running.
    pub fn stop(mut self) -> bool {
        self.stop_readers()
    }

    fn stop_readers(&mut self) -> bool {
        self.stopping.store(true, Ordering::SeqCst);
        let end = Instant::now() + STOP_WAIT;
        let mut all = true;
        for t in std::mem::take(&mut self.readers) {
            // A signal that lands before the reader enters read(2) is
            // lost: send it until the reader is gone.
            while !t.is_finished() && Instant::now() < end {
                // SAFETY: the thread has not been joined, so its pthread_t
                // is valid.
                unsafe { sys::interrupt(t.as_pthread_t()) };
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                all = false;
            }
        }
        all
    }
}

impl Drop for Direct {
    fn drop(&mut self) {
        self.stop_readers();
    }
}

/// One reader: its descriptor and buffers.
struct Reader {
    dev: OwnedFd,
    volume: Volume,
    /// A request's data (a WRITE's, a READ's answer); written to once so
    /// that its pages are mapped in: a read of /dev/fuse that faults on a
    /// page gives up at a pending SIGKILL, and the kernel then fails the
    /// request with EIO instead of leaving it to be re-sent.
    body: Vec<u8>,
    backend: Arc<dyn Backend>,
    counters: Arc<Counters>,
    /// `--read-delay-ms`: a test's way to have reads in flight.
    read_delay: Duration,
}

impl Reader {
    fn run(mut self, stopping: &AtomicBool) {
        self.body.fill(1);
        let mut head = [0u8; HEAD_LEN];
        while !stopping.load(Ordering::SeqCst) {
            let len = self.body.len();
            // SAFETY: `body` is this reader's own buffer of `len` bytes.
            let n = unsafe {
                sys::read_request(self.dev.as_fd(), &mut head, self.body.as_mut_ptr(), len)
            };
            match n {
                Ok(n) => self.serve(&head, n),
                Err(e) => match e.raw_os_error() {
                    // A signal (to stop?), or a request interrupted before
                    // it was read.
                    Some(libc::EINTR | libc::ENOENT | libc::EAGAIN) => {}
                    // The connection is gone (unmounted, aborted).
                    Some(libc::ENODEV) => break,
                    _ => {
                        crate::log(&format!(
                            "direct: reading /dev/fuse failed: {e}; reader stops"
                        ));
                        break;
                    }
                },
            }
        }
    }

    /// Serves one request of `n` bytes: its head in `head`, the rest at the
    /// start of `self.body`.
    fn serve(&mut self, head: &[u8; HEAD_LEN], n: usize) {
        let Some(h) = request::header(head) else {
            return;
        };
        let unique = h.unique;
        if request::is_resent(unique) {
            self.counters.resent.fetch_add(1, Ordering::Relaxed);
        }
        let body_len = n.saturating_sub(HEAD_LEN);
        if h.len as usize != n {
            return self.reply(unique, &Answer::Error(libc::EIO));
        }
        if request::is_write(h.opcode) {
            let args = head.get(IN_HEADER_LEN..).unwrap_or_default();
            let answer = match request::parse(h.opcode, args) {
                Ok(FuseOp::Write { offset, size }) if size as usize == body_len => {
                    self.volume.write(h.nodeid, offset, size)
                }
                _ => Answer::Error(libc::EINVAL),
            };
            return self.data(unique, answer);
        }
        let args_len = n.saturating_sub(IN_HEADER_LEN);
        if args_len > MAX_ARGS_LEN {
            if !request::is_no_reply(h.opcode) {
                self.reply(unique, &Answer::Error(libc::ENOSYS));
            }
            return;
        }
        // Arguments past the head (names, INIT) follow in the body: copied
        // together only then, not for every READ.
        let in_head = head.get(IN_HEADER_LEN..n.min(HEAD_LEN)).unwrap_or_default();
        let args: Cow<'_, [u8]> = if body_len == 0 {
            Cow::Borrowed(in_head)
        } else {
            let mut v = in_head.to_vec();
            v.extend_from_slice(self.body.get(..body_len).unwrap_or_default());
            Cow::Owned(v)
        };
        let answer = match request::parse(h.opcode, &args) {
            // INIT is the holder's, answered before the connection was
            // handed over.
            Ok(FuseOp::Init { .. }) => Answer::Error(libc::EPROTO),
            Ok(op) => self.volume.answer(h.nodeid, &op),
            Err(_) if request::is_no_reply(h.opcode) => Answer::Silent,
            Err(_) => Answer::Error(libc::EINVAL),
        };
        self.data(unique, answer)
    }

    /// Runs a data request on the backend and replies; replies to any
    /// other answer as it is.
    fn data(&mut self, unique: u64, answer: Answer) {
        let Answer::Data { op, offset, len } = answer else {
            return self.reply(unique, &answer);
        };
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        // The data ops carry `len` bytes in the body; the others none.
        let buf = if op.uses_buffer() {
            self.body.get_mut(..n)
        } else {
            None
        };
        if op == Op::Read && !self.read_delay.is_zero() {
            std::thread::sleep(self.read_delay);
        }
        let done = backends::run(&*self.backend, backends::Ask::volume(op, offset, len), buf);
        match (done, op) {
            (Err(e), _) => {
                let errno = e.raw_os_error().filter(|&e| e > 0).unwrap_or(libc::EIO);
                self.reply(unique, &Answer::Error(errno));
            }
            (Ok(done), Op::Read) => {
                let data = self.body.get(..done).unwrap_or_default();
                send(self.dev.as_fd(), unique, 0, data, &self.counters);
            }
            (Ok(done), Op::Write) => {
                self.reply(unique, &Answer::wrote(u32::try_from(done).unwrap_or(0)));
            }
            (Ok(_), _) => self.reply(unique, &Answer::Empty),
        }
    }

    fn reply(&self, unique: u64, answer: &Answer) {
        if let Some((errno, body)) = answer.reply() {
            send(self.dev.as_fd(), unique, errno, body, &self.counters);
        }
    }
}

/// Writes a reply and counts it.
fn send(dev: BorrowedFd<'_>, unique: u64, errno: i32, body: &[u8], counters: &Counters) {
    let iov = [libc::iovec {
        iov_base: body.as_ptr().cast_mut().cast(),
        iov_len: body.len(),
    }];
    let pieces = if body.is_empty() { &[][..] } else { &iov[..] };
    // SAFETY: `body` is borrowed for the call.
    match unsafe { sys::reply(dev, unique, errno, pieces) } {
        Ok(()) => {
            counters.answered.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT)) => {
            counters.refused.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV)) => {}
        Err(e) => crate::log(&format!(
            "direct: FUSE reply to request {unique} failed: {e}"
        )),
    }
}
