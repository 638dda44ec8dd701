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

use std::io;
use std::mem::offset_of;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::thread::JoinHandleExt;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use holdfast_kernel::fuse::request::{self, Decoded, FuseOp, HEAD_LEN};
use holdfast_kernel::fuse::{Answer, Volume, sys};
use holdfast_proto::shm::{Op, ReaderProgress};

use crate::backends::{self, Backend};
use crate::rings::Attachment;

/// How long `stop` waits for the readers to finish what they hold.
const STOP_WAIT: Duration = Duration::from_secs(30);
/// How often `stop` looks, and signals the readers again.
const STOP_POLL: Duration = Duration::from_micros(50);

/// The u64 words of a [`ReaderProgress`].
const WORDS: usize = size_of::<ReaderProgress>() / 8;
const BUSY: usize = offset_of!(ReaderProgress, busy_since_ns) / 8;
const ANSWERED: usize = offset_of!(ReaderProgress, answered) / 8;
const RESENT: usize = offset_of!(ReaderProgress, resent) / 8;
const REFUSED: usize = offset_of!(ReaderProgress, refused) / 8;

/// Where one reader publishes its [`ReaderProgress`]: its record in the
/// rings memfd the broker lent with the descriptors (which the broker reads
/// for status and to see a hung daemon), or private memory.
#[derive(Clone)]
pub struct Meter {
    words: NonNull<AtomicU64>,
    /// Keeps the memory mapped while a reader may write to it.
    _memory: Arc<dyn Send + Sync>,
}

// SAFETY: only atomics are reached through `words`, and the memory stays
// mapped as long as `_memory`.
unsafe impl Send for Meter {}
// SAFETY: as for Send.
unsafe impl Sync for Meter {}

impl Meter {
    /// A record nobody else reads.
    pub fn private() -> Self {
        let memory: Arc<[AtomicU64; WORDS]> = Arc::new(Default::default());
        Self {
            words: NonNull::from(&memory[0]),
            _memory: memory,
        }
    }

    /// Reader `i`'s record in `att`'s rings memfd (direct mode's layout,
    /// `holdfast_proto::shm::direct`).
    pub fn shared(att: &Arc<Attachment>, i: usize) -> Option<Self> {
        Some(Self {
            words: NonNull::new(att.direct_progress(i)?.cast::<AtomicU64>())?,
            _memory: att.clone(),
        })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < WORDS);
        // SAFETY: `words` points at WORDS aligned u64s that live as long
        // as `self` (`private`, `shared`).
        unsafe { &*self.words.as_ptr().add(i) }
    }

    /// Publishes a whole record (a ublk queue's: the time it took the
    /// oldest request it holds, 0 for none, and its answers so far).
    pub fn publish(&self, busy_since_ns: u64, answered: u64) {
        self.word(BUSY).store(busy_since_ns, Ordering::Release);
        self.word(ANSWERED).store(answered, Ordering::Relaxed);
    }

    fn busy(&self, since: Option<u64>) {
        self.word(BUSY).store(since.unwrap_or(0), Ordering::Release);
    }

    fn count(&self, word: usize) {
        self.word(word).fetch_add(1, Ordering::Relaxed);
    }

    pub fn read(&self) -> ReaderProgress {
        let w = |i| self.word(i).load(Ordering::Relaxed);
        ReaderProgress {
            busy_since_ns: w(BUSY),
            answered: w(ANSWERED),
            resent: w(RESENT),
            refused: w(REFUSED),
        }
    }
}

/// The sum of the readers' progress (busy: the earliest).
pub fn total(meters: &[Meter]) -> ReaderProgress {
    meters
        .iter()
        .map(Meter::read)
        .fold(ReaderProgress::default(), |a, p| {
            let busy = [a.busy_since_ns, p.busy_since_ns]
                .into_iter()
                .filter(|&t| t != 0)
                .min();
            ReaderProgress {
                busy_since_ns: busy.unwrap_or(0),
                answered: a.answered.saturating_add(p.answered),
                resent: a.resent.saturating_add(p.resent),
                refused: a.refused.saturating_add(p.refused),
            }
        })
}

/// CLOCK_MONOTONIC in ns, never 0.
pub(crate) fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let ns = u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0));
    ns.max(1)
}

/// A FUSE connection served in direct mode.
pub struct Direct {
    /// Each reader gives its descriptor back when it stops.
    readers: Vec<JoinHandle<OwnedFd>>,
    stopping: Arc<AtomicBool>,
    meters: Vec<Meter>,
}

impl Direct {
    /// Serves the connection through `devs`, one reader each, answering
    /// from `volume` and `backend`; each request's data is at most
    /// `max_io` bytes (INIT's max_write and max_readahead). Reader `i`
    /// publishes its progress to `meters[i]` (private where missing).
    pub fn start(
        devs: Vec<OwnedFd>,
        volume: Volume,
        max_io: u32,
        backend: Arc<dyn Backend>,
        read_delay: Duration,
        mut meters: Vec<Meter>,
    ) -> io::Result<Self> {
        sys::install_interrupt()?;
        meters.resize_with(devs.len(), Meter::private);
        let mut direct = Self {
            readers: Vec::with_capacity(devs.len()),
            stopping: Arc::new(AtomicBool::new(false)),
            meters,
        };
        for (i, dev) in devs.into_iter().enumerate() {
            let r = Reader {
                dev,
                volume,
                body: vec![0u8; max_io as usize],
                backend: backend.clone(),
                meter: direct.meters[i].clone(),
                args: Vec::new(),
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

    /// The readers' meters (to read after `stop` too).
    pub fn meters(&self) -> Vec<Meter> {
        self.meters.clone()
    }

    /// Stops reading: each reader answers the request it holds and exits.
    /// What the kernel has not handed out stays queued for the next
    /// server. Returns the descriptors of the readers that stopped (to
    /// serve again); a reader still busy after a bound (its backend call
    /// hangs) is left running, with its descriptor.
    pub fn stop(mut self) -> Vec<OwnedFd> {
        self.stop_readers()
    }

    fn stop_readers(&mut self) -> Vec<OwnedFd> {
        self.stopping.store(true, Ordering::SeqCst);
        let end = Instant::now() + STOP_WAIT;
        // All at once: a handoff's stall is the slowest reader's answer,
        // not their sum. A signal that lands before a reader enters
        // read(2) is lost: sent again until each is gone.
        while Instant::now() < end && self.readers.iter().any(|t| !t.is_finished()) {
            for t in self.readers.iter().filter(|t| !t.is_finished()) {
                // SAFETY: the thread has not been joined, so its pthread_t
                // is valid.
                unsafe { sys::interrupt(t.as_pthread_t()) };
            }
            std::thread::sleep(STOP_POLL);
        }
        let mut devs = Vec::with_capacity(self.readers.len());
        for t in std::mem::take(&mut self.readers) {
            if t.is_finished() {
                devs.extend(t.join().ok());
            } else {
                crate::log(&format!(
                    "direct: a reader is still busy with its backend after {STOP_WAIT:?}; left \
                     running"
                ));
            }
        }
        devs
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
    meter: Meter,
    /// Where a request's arguments past the head are gathered.
    args: Vec<u8>,
    /// `--read-delay-ms`: a test's way to have reads in flight.
    read_delay: Duration,
}

impl Reader {
    fn run(mut self, stopping: &AtomicBool) -> OwnedFd {
        self.body.fill(1);
        let mut head = [0u8; HEAD_LEN];
        while !stopping.load(Ordering::SeqCst) {
            let len = self.body.len();
            // SAFETY: `body` is this reader's own buffer of `len` bytes.
            let n = unsafe {
                sys::read_request(self.dev.as_fd(), &mut head, self.body.as_mut_ptr(), len)
            };
            match n {
                Ok(n) => {
                    self.meter.busy(Some(monotonic_ns()));
                    self.serve(&head, n);
                    self.meter.busy(None);
                }
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
        self.dev
    }

    /// Serves one request of `n` bytes: its head in `head`, the rest at the
    /// start of `self.body`.
    fn serve(&mut self, head: &[u8; HEAD_LEN], n: usize) {
        let mut args = std::mem::take(&mut self.args);
        let body = &self.body;
        let decoded = request::decode(head, n, &mut args, |len, out| {
            out.extend_from_slice(body.get(..len).unwrap_or_default());
        });
        if decoded
            .header()
            .is_some_and(|h| request::is_resent(h.unique))
        {
            self.meter.count(RESENT);
        }
        let (unique, answer) = match decoded {
            Decoded::Runt { .. } => (None, Answer::Silent),
            Decoded::Refused { header, errno, .. } => (
                Some(header.unique),
                errno.map_or(Answer::Silent, Answer::Error),
            ),
            Decoded::Write {
                header,
                offset,
                size,
            } => (
                Some(header.unique),
                self.volume.write(header.nodeid, offset, size),
            ),
            Decoded::Op { header, op } => {
                let answer = match op {
                    // INIT is the holder's, answered before the connection
                    // was handed over.
                    FuseOp::Init { .. } => Answer::Error(libc::EPROTO),
                    op => self.volume.answer(header.nodeid, &op),
                };
                (Some(header.unique), answer)
            }
        };
        self.args = args;
        if let Some(unique) = unique {
            self.data(unique, answer);
        }
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
                send(self.dev.as_fd(), unique, 0, data, &self.meter);
            }
            (Ok(done), Op::Write) => {
                self.reply(unique, &Answer::wrote(u32::try_from(done).unwrap_or(0)));
            }
            (Ok(_), _) => self.reply(unique, &Answer::Empty),
        }
    }

    fn reply(&self, unique: u64, answer: &Answer) {
        if let Some((errno, body)) = answer.reply() {
            send(self.dev.as_fd(), unique, errno, body, &self.meter);
        }
    }
}

/// Writes a reply and counts it.
fn send(dev: BorrowedFd<'_>, unique: u64, errno: i32, body: &[u8], meter: &Meter) {
    let iov = [libc::iovec {
        iov_base: body.as_ptr().cast_mut().cast(),
        iov_len: body.len(),
    }];
    let pieces = if body.is_empty() { &[][..] } else { &iov[..] };
    // SAFETY: `body` is borrowed for the call.
    match unsafe { sys::reply(dev, unique, errno, pieces) } {
        Ok(()) => meter.count(ANSWERED),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT)) => meter.count(REFUSED),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV)) => {}
        Err(e) => crate::log(&format!(
            "direct: FUSE reply to request {unique} failed: {e}"
        )),
    }
}
