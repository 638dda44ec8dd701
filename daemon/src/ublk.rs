//! Serving a ublk queue from this process, the backend called in place:
//! the data path of ublk's direct mode (the broker keeps the device's
//! control side: `Running`) and the benchmark's daemon-less server
//! (`hf-ublk-baseline`: `serve`). The queue is holdfast-kernel's, the code the
//! broker runs in relay mode.
//!
//! The driver takes every command of a queue from one thread only, so the
//! queue thread reads requests and commits results. A request that came
//! alone runs on the queue thread itself when the backend is quick (no
//! wake-up at queue depth 1); the others run on workers, which hand the
//! results back through a mailbox and an eventfd the queue polls.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use holdfast_kernel::ublk::parse;
use holdfast_kernel::ublk::queue::{Event, Queue, USER_DATA_BASE};
use holdfast_kernel::ublk::sys::{IoDesc, MAX_QUEUE_DEPTH};
use holdfast_proto::shm::Op;
use memmap2::MmapMut;
use parking_lot::Mutex;

use crate::backends::{self, Ask, Backend};
use crate::direct::{Meter, monotonic_ns};

/// How long to wait for /dev/ublkcN after ADD_DEV.
const CDEV_WAIT: Duration = Duration::from_secs(5);
/// `user_data` of the mailbox's poll.
const WAKE: u64 = USER_DATA_BASE;

/// The device a queue serves, as its control side made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub dev_id: u32,
    pub depth: u16,
    /// Bytes of a tag's buffer (the device's `max_io_buf_bytes`).
    pub buf_size: u32,
    /// Bytes of the device.
    pub size: u64,
}

/// What a queue did before it stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Requests answered with success.
    pub served: u64,
    /// Requests answered with an error (the backend's, or a descriptor
    /// that failed its check).
    pub failed: u64,
    /// Requests that came after `Running::stop` and were not answered:
    /// the kernel re-issues them to the device's next server.
    pub left: u64,
}

/// The tags' buffers: one anonymous mapping, tag `t`'s at `t * size`.
struct Buffers {
    base: NonNull<u8>,
    size: usize,
    _map: MmapMut,
}

// SAFETY: the mapping lives as long as `_map`; which thread touches which
// tag's buffer is `Server`'s rule (one request per tag at a time).
unsafe impl Send for Buffers {}
// SAFETY: as for Send.
unsafe impl Sync for Buffers {}

impl Buffers {
    fn new(depth: u16, size: u32) -> io::Result<Self> {
        let size = size as usize;
        let len = size
            .checked_mul(usize::from(depth))
            .ok_or_else(|| io::Error::other("ublk buffers: depth × size overflows"))?;
        let mut map = MmapMut::map_anon(len)?;
        let base = NonNull::new(map.as_mut_ptr())
            .ok_or_else(|| io::Error::other("ublk buffers: mapped at null"))?;
        Ok(Self {
            base,
            size,
            _map: map,
        })
    }

    /// Where tag `tag`'s buffer is, for its FETCH and COMMIT.
    fn addr(&self, tag: u16) -> u64 {
        self.base.as_ptr() as u64 + (usize::from(tag) * self.size) as u64
    }

    /// Tag `tag`'s first `len` bytes.
    ///
    /// # Safety
    /// The tag holds a request (the kernel leaves its buffer alone until
    /// the COMMIT) and nobody else uses the buffer until then; `len` is
    /// within a buffer (`parse` checked it) and `tag` below the depth.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, tag: u16, len: usize) -> &mut [u8] {
        debug_assert!(len <= self.size);
        // SAFETY: the caller's promise: in the mapping, used by one at a time.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.base.as_ptr().add(usize::from(tag) * self.size),
                len.min(self.size),
            )
        }
    }
}

/// A request the queue thread hands to a worker.
#[derive(Debug, Clone, Copy)]
struct Job {
    tag: u16,
    op: Op,
    offset: u64,
    len: u64,
}

/// Completions from the workers to the queue thread.
struct Mailbox {
    done: Mutex<Vec<(u16, i32)>>,
    wake: OwnedFd,
}

impl Mailbox {
    fn post(&self, tag: u16, result: i32) {
        self.done.lock().push((tag, result));
        self.kick();
    }

    fn kick(&self) {
        let _ = rustix::io::write(&self.wake, &1u64.to_ne_bytes());
    }
}

/// Runs `job` on the backend: the bytes done, or a negative errno.
fn run(backend: &dyn Backend, buffers: &Buffers, job: Job) -> i32 {
    let buf = job.op.uses_buffer().then(|| {
        // SAFETY: the tag holds this job's request, whose thread this is
        // until the COMMIT; `parse` bounded `len` by the buffer size.
        unsafe { buffers.slice(job.tag, job.len as usize) }
    });
    let done = backends::run(backend, Ask::volume(job.op, job.offset, job.len), buf);
    if job.op == Op::Write {
        crate::fault::inject(crate::fault::Point::UblkWriteBeforeCommit);
    }
    match done {
        Ok(n) => i32::try_from(n).unwrap_or(-libc::EIO),
        Err(e) => e.raw_os_error().unwrap_or(libc::EIO).saturating_neg(),
    }
}

/// Serves the queue of device `geo` until the device stops (every tag
/// aborted), with `workers` worker threads (at least one). `ready` is
/// told once every tag is fetched, or why not: the device's control side
/// can then START_DEV (or END_USER_RECOVERY).
pub fn serve(
    geo: Geometry,
    backend: Arc<dyn Backend>,
    workers: usize,
    ready: impl FnOnce(io::Result<()>),
) -> io::Result<Stats> {
    if geo.depth == 0 || geo.depth > MAX_QUEUE_DEPTH || geo.buf_size == 0 {
        let e = io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("ublk queue of {} tags of {} bytes", geo.depth, geo.buf_size),
        );
        ready(Err(io::Error::new(e.kind(), e.to_string())));
        return Err(e);
    }
    let mut server = match Server::open(geo, backend) {
        Ok(s) => s,
        Err(e) => {
            ready(Err(io::Error::new(e.kind(), e.to_string())));
            return Err(e);
        }
    };
    ready(Ok(()));
    server.run(workers.max(1), &AtomicBool::new(false))
}

/// Where a queue publishes its progress for the broker (the attachment's
/// record, which changes when the daemon attaches to a new broker), and
/// its answers when that record became its: the record counts from there.
struct Published {
    meter: Meter,
    base: u64,
}

/// A queue served on a thread of its own (direct mode), until `stop`, or
/// until the device takes every tag back (it was stopped, or deleted).
pub struct Running {
    geo: Geometry,
    stop: Arc<AtomicBool>,
    mailbox: Arc<Mailbox>,
    progress: Progress,
    thread: JoinHandle<io::Result<Stats>>,
}

impl Running {
    /// Opens the queue, fetches every tag and serves it with `workers`
    /// threads, publishing its progress to `meter`; returns once the tags
    /// are fetched (the broker's START_DEV or END_USER_RECOVERY then
    /// completes), or why they are not.
    pub fn start(
        geo: Geometry,
        backend: Arc<dyn Backend>,
        workers: usize,
        meter: Meter,
    ) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let progress = Progress::new(meter);
        let published = progress.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ublk-queue-{}", geo.dev_id))
            .spawn(move || {
                let mut server = match Server::open(geo, backend) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                        return Err(e);
                    }
                };
                server.progress = published;
                let _ = tx.send(Ok(server.mailbox.clone()));
                server.run(workers.max(1), &flag)
            })?;
        let mailbox = match rx.recv() {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("the ublk queue thread failed")),
        };
        Ok(Self {
            geo,
            stop,
            mailbox,
            progress,
            thread,
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Publishes the queue's progress to `meter` from now on (the record
    /// of this daemon's attachment to a new broker).
    pub fn publish_to(&self, meter: Meter) {
        let base = self.progress.answers.load(Ordering::Relaxed);
        *self.progress.published.lock() = Published { meter, base };
    }

    /// Whether the queue ended by itself (the device took its tags back).
    pub fn finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stops serving: what the workers run is answered, what comes after is
    /// left to the device's next server; then /dev/ublkcN is closed, and
    /// the kernel quiesces the device. What the queue did.
    pub fn stop(self) -> io::Result<Stats> {
        self.stop.store(true, Ordering::SeqCst);
        self.mailbox.kick();
        self.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the ublk queue thread failed")))
    }
}

struct Server {
    geo: Geometry,
    queue: Queue,
    buffers: Arc<Buffers>,
    backend: Arc<dyn Backend>,
    mailbox: Arc<Mailbox>,
    stats: Stats,
    /// Requests handed to the workers and not committed yet.
    at_workers: usize,
    /// When the server took each tag's request (CLOCK_MONOTONIC ns), 0
    /// for a tag it does not hold.
    held_since: Vec<u64>,
    progress: Progress,
}

/// A queue's progress for the broker (`Running::publish_to`).
#[derive(Clone)]
struct Progress {
    published: Arc<Mutex<Published>>,
    answers: Arc<AtomicU64>,
}

impl Progress {
    fn new(meter: Meter) -> Self {
        Self {
            published: Arc::new(Mutex::new(Published { meter, base: 0 })),
            answers: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Server {
    /// Opens the queue of `geo` and fetches every tag.
    fn open(geo: Geometry, backend: Arc<dyn Backend>) -> io::Result<Self> {
        let buffers = Buffers::new(geo.depth, geo.buf_size)?;
        let queue = Queue::open(geo.dev_id, geo.depth, 4, CDEV_WAIT)?;
        let wake = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )?;
        let mut server = Self {
            geo,
            queue,
            buffers: Arc::new(buffers),
            backend,
            mailbox: Arc::new(Mailbox {
                done: Mutex::new(Vec::new()),
                wake,
            }),
            stats: Stats::default(),
            at_workers: 0,
            held_since: vec![0; usize::from(geo.depth)],
            progress: Progress::new(Meter::private()),
        };
        server.start()?;
        Ok(server)
    }

    fn start(&mut self) -> io::Result<()> {
        for tag in 0..self.geo.depth {
            let addr = self.buffers.addr(tag);
            self.queue.fetch(tag, addr)?;
        }
        self.queue.poll(self.mailbox.wake.as_fd(), WAKE)?;
        self.queue.submit_fetches()?;
        self.queue.map()
    }

    fn run(&mut self, workers: usize, stop: &AtomicBool) -> io::Result<Stats> {
        let (jobs, inbox) = crossbeam_channel::unbounded::<Job>();
        let threads: Vec<_> = (0..workers)
            .map(|i| {
                let (inbox, backend) = (inbox.clone(), self.backend.clone());
                let (buffers, mailbox) = (self.buffers.clone(), self.mailbox.clone());
                std::thread::Builder::new()
                    .name(format!("ublk-worker-{i}"))
                    .spawn(move || {
                        for job in inbox {
                            mailbox.post(job.tag, run(&*backend, &buffers, job));
                        }
                    })
            })
            .collect::<io::Result<_>>()?;
        let served = self.serve(&jobs, stop);
        drop(jobs);
        for t in threads {
            let _ = t.join();
        }
        served.map(|()| self.stats)
    }

    /// Serves until every tag is aborted, or `stop` is set and the
    /// workers' requests are committed.
    fn serve(
        &mut self,
        jobs: &crossbeam_channel::Sender<Job>,
        stop: &AtomicBool,
    ) -> io::Result<()> {
        let mut aborted = 0u16;
        let mut events = Vec::new();
        while aborted < self.geo.depth {
            let stopping = stop.load(Ordering::SeqCst);
            if stopping && self.at_workers == 0 {
                // The last COMMITs reach the kernel before the queue closes.
                return self.queue.submit();
            }
            self.queue.wait(&mut events)?;
            let alone = events.len() == 1 && self.backend.quick();
            for event in events.drain(..) {
                match event {
                    Event::User { .. } => self.commit_done()?,
                    // Re-issued by the kernel to the next server.
                    Event::Request { .. } if stopping => self.stats.left += 1,
                    Event::Request { tag, desc } => self.request(tag, &desc, alone, jobs)?,
                    Event::Aborted { .. } | Event::Refused { .. } => {
                        aborted = aborted.saturating_add(1);
                    }
                }
            }
            self.publish();
        }
        Ok(())
    }

    /// Publishes the oldest request held and the answers so far.
    fn publish(&self) {
        let oldest = self.held_since.iter().copied().filter(|&t| t != 0).min();
        let answers = self.stats.served.saturating_add(self.stats.failed);
        self.progress.answers.store(answers, Ordering::Relaxed);
        let p = self.progress.published.lock();
        p.meter
            .publish(oldest.unwrap_or(0), answers.saturating_sub(p.base));
    }

    /// Runs a request in place (`alone`) or hands it to a worker.
    fn request(
        &mut self,
        tag: u16,
        desc: &IoDesc,
        alone: bool,
        jobs: &crossbeam_channel::Sender<Job>,
    ) -> io::Result<()> {
        if let Some(t) = self.held_since.get_mut(usize::from(tag)) {
            *t = monotonic_ns();
        }
        let (op, offset, len) = match parse(desc, self.geo.size, self.geo.buf_size) {
            Ok(p) => p,
            Err(errno) => return self.commit(tag, errno.saturating_neg()),
        };
        let job = Job {
            tag,
            op,
            offset,
            len,
        };
        if alone {
            let result = run(&*self.backend, &self.buffers, job);
            return self.commit(tag, result);
        }
        if jobs.send(job).is_err() {
            return self.commit(tag, -libc::EIO);
        }
        self.at_workers += 1;
        Ok(())
    }

    fn commit(&mut self, tag: u16, result: i32) -> io::Result<()> {
        if result < 0 {
            self.stats.failed += 1;
        } else {
            self.stats.served += 1;
        }
        if let Some(t) = self.held_since.get_mut(usize::from(tag)) {
            *t = 0;
        }
        let addr = self.buffers.addr(tag);
        self.queue.commit(tag, result, addr)
    }

    fn commit_done(&mut self) -> io::Result<()> {
        let mut word = [0u8; 8];
        let _ = rustix::io::read(&self.mailbox.wake, &mut word);
        let done = std::mem::take(&mut *self.mailbox.done.lock());
        self.at_workers = self.at_workers.saturating_sub(done.len());
        for (tag, result) in done {
            self.commit(tag, result)?;
        }
        self.queue.poll(self.mailbox.wake.as_fd(), WAKE)
    }
}
