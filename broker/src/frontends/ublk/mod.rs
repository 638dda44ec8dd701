//! The ublk frontend: the broker owns a ublk device per export. In relay
//! mode it also serves the device's queue, so daemons never open
//! /dev/ublkcN and a daemon crash is invisible to the kernel; in direct
//! mode (`custody`) the daemon serves the queue and the broker keeps the
//! control side. Relay mode: each tag's io buffer is a slot of the
//! export's data area, pinned to the tag: the kernel copies a write's data
//! straight into the slot the daemon reads, and a read's data from the
//! slot the daemon wrote, with no copy in the broker.
//!
//! One queue, served by one thread, which must be the thread that issues
//! every FETCH and COMMIT of that queue (the driver checks). Completions
//! reach it through a mailbox and an eventfd polled on its ring.
//!
//! Devices are created with USER_RECOVERY | USER_RECOVERY_REISSUE: if the
//! broker process dies, the kernel keeps the device (QUIESCED) and re-issues
//! what was in flight to the next server. The device's id is recorded in a
//! file next to the control socket, so that the next broker (restarted
//! after a crash, or an upgrade) finds the device again and becomes its
//! server (`UblkDevice::start_or_recover`).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_kernel::ublk::queue::{Event, Queue as UblkQueue};
use holdfast_kernel::ublk::sys::{self, Control, DevInfo, IoDesc};
use holdfast_kernel::ublk::{params, parse};
use holdfast_proto::shm::Op;
use parking_lot::Mutex;

use super::{Origin, Outcome, ReplySink, Target};
use crate::export::Export;
use crate::inflight::Data;
use crate::{info, warn};

mod custody;

/// `user_data` of the mailbox's poll on the queue ring (at or above
/// `USER_DATA_BASE`: not a tag).
const WAKE: u64 = u64::MAX;
/// Most tags the broker gives a queue (and slots it pins for them).
const MAX_DEPTH: u32 = 128;
/// How long to wait for /dev/ublkcN to appear after ADD_DEV.
const CDEV_WAIT: Duration = Duration::from_secs(5);
/// How long a recovery waits for a device to be QUIESCED (the kernel
/// notices its dead server) and for START_USER_RECOVERY to stop failing
/// with EBUSY (the dead server's /dev/ublkcN is still being closed).
const RECOVER_WAIT: Duration = Duration::from_secs(10);
/// How long `export rm` waits for STOP_DEV and DEL_DEV.
const REMOVE_WAIT: Duration = Duration::from_secs(5);
/// How long a broker's stop waits for the writeback above a device, and
/// then for STOP_DEV and DEL_DEV (a daemon serves both).
const STOP_SYNC_WAIT: Duration = Duration::from_secs(60);
const STOP_WAIT: Duration = Duration::from_secs(30);

/// A ublk device serving one export.
pub struct UblkDevice {
    pub dev_id: u32,
    /// The file holding `dev_id` for the next broker.
    record: PathBuf,
}

impl UblkDevice {
    /// The block device's path.
    pub fn path(&self) -> PathBuf {
        format!("/dev/ublkb{}", self.dev_id).into()
    }

    /// Adds a device for `export`. In relay mode, starts its queue thread
    /// and then the device: starting waits for the kernel's first reads
    /// (the partition table), which wait for a daemon, so it runs in the
    /// background. In direct mode, the first daemon's RESTORE starts it.
    pub fn start(export: &Arc<Export>, record: PathBuf, direct: bool) -> io::Result<Self> {
        let depth = (export.slot_count() / 2).min(MAX_DEPTH);
        let depth16 = u16::try_from(depth).unwrap_or(0);
        if depth16 == 0 || (!direct && !export.pin_slots(depth)) {
            return Err(io::Error::other(
                "cannot pin slots for the ublk tags (use --slots 4 or more)",
            ));
        }
        let mut ctl = Control::open().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot open /dev/ublk-control (is ublk_drv loaded?): {e}"),
            )
        })?;
        let features = ctl.features()?;
        features.check()?;
        info!(
            "{}: ublk driver features {:#x} ({})",
            export.name(),
            features.0,
            sys::Features::names(features.0)
        );
        // A direct-mode handoff begins with QUIESCE_DEV where the driver
        // has it (custody.rs); the device must be added with the flag.
        let quiesce = if direct && features.has(sys::F_QUIESCE) {
            sys::F_QUIESCE
        } else {
            0
        };
        let info = ctl.add(&DevInfo {
            nr_hw_queues: 1,
            queue_depth: depth16,
            max_io_buf_bytes: export.slot_size(),
            dev_id: u32::MAX,
            flags: sys::Features::NEEDED | quiesce,
            ..DevInfo::default()
        })?;
        let dev_id = info.dev_id;
        let started = Self::set_params(&mut ctl, export, dev_id)
            .and_then(|()| {
                if direct {
                    custody::lend(export, &info, false);
                    Ok(())
                } else {
                    serve(export, dev_id, depth16)
                }
            })
            .and_then(|()| std::fs::write(&record, format!("{dev_id}\n")));
        if let Err(e) = started {
            let _ = ctl.delete(dev_id);
            return Err(e);
        }
        if !direct {
            let name = export.name().to_owned();
            std::thread::Builder::new()
                .name(format!("ublk-start-{name}"))
                .spawn(move || {
                    match Control::open().and_then(|mut c| c.start(dev_id, std::process::id())) {
                        Ok(()) => info!("{name}: block device /dev/ublkb{dev_id} started"),
                        Err(e) => warn!("{name}: cannot start ublk device {dev_id}: {e}"),
                    }
                })?;
        }
        Ok(Self { dev_id, record })
    }

    /// Takes over the device a previous broker left for `export`, if
    /// `record` names one that still exists, else adds a new one. A record
    /// of a device that is gone (deleted, or the machine rebooted) is
    /// removed, with a line in the log.
    pub fn start_or_recover(
        export: &Arc<Export>,
        record: PathBuf,
        direct: bool,
    ) -> io::Result<Self> {
        let Ok(text) = std::fs::read_to_string(&record) else {
            return Self::start(export, record, direct);
        };
        let recorded: Option<u32> = text.trim().parse().ok();
        let exists = recorded.map(|id| Control::open().and_then(|mut c| c.info(id)).map(drop));
        match (recorded, exists) {
            (Some(id), Some(Ok(()))) if direct => custody::adopt(export, id, record),
            (Some(id), Some(Ok(()))) => Self::recover(export, id, record),
            (Some(id), Some(Err(e))) if e.raw_os_error() == Some(libc::ENODEV) => {
                info!(
                    "{}: ublk device {id} of {} is gone; removed the stale record",
                    export.name(),
                    record.display()
                );
                let _ = std::fs::remove_file(&record);
                Self::start(export, record, direct)
            }
            (Some(_), Some(Err(e))) => Err(e),
            _ => {
                info!(
                    "{}: {} does not hold a device id; removed it",
                    export.name(),
                    record.display()
                );
                let _ = std::fs::remove_file(&record);
                Self::start(export, record, direct)
            }
        }
    }

    /// Becomes the server of the device `dev_id` a previous broker left
    /// for `export`: waits for the kernel to quiesce it (it does once the
    /// old server's /dev/ublkcN is closed), starts user recovery, fetches
    /// every tag, ends recovery. The kernel then re-issues the requests
    /// the old broker held.
    fn recover(export: &Arc<Export>, dev_id: u32, record: PathBuf) -> io::Result<Self> {
        // The kernel re-issues the old broker's flushes, and a write it
        // acknowledged may still be only in a daemon's page cache.
        export.assume_dirty();
        let mut ctl = Control::open()?;
        let end = Instant::now() + RECOVER_WAIT;
        let info = quiesced(&mut ctl, dev_id, end)?;
        let depth = u32::from(info.queue_depth);
        if info.nr_hw_queues != 1
            || info.max_io_buf_bytes > export.slot_size()
            || !export.pin_slots(depth)
        {
            return Err(misfit(dev_id, &info));
        }
        let resumed = start_recovery(&mut ctl, dev_id, end)?;
        crate::fault::crash_at("ublk-recovery-started");
        if resumed {
            warn!(
                "{}: ublk device {dev_id}: a recovery was cut short before its queue was ready \
                 (START_USER_RECOVERY: EINVAL); going on from where it stopped",
                export.name()
            );
        }
        serve(export, dev_id, info.queue_depth).map_err(|e| {
            if resumed {
                unrecoverable(dev_id, "serving its queue after a recovery cut short", &e)
            } else {
                e
            }
        })?;
        ctl.end_recovery(dev_id, std::process::id())
            .map_err(|e| io::Error::new(e.kind(), format!("END_USER_RECOVERY: {e}")))?;
        info!("{}: ublk device {dev_id} recovered", export.name());
        Ok(Self { dev_id, record })
    }

    fn set_params(ctl: &mut Control, export: &Arc<Export>, dev_id: u32) -> io::Result<()> {
        ctl.set_params(
            dev_id,
            &params(export.size(), export.block_size(), export.slot_size()),
        )
    }

    /// Stops and deletes the device (`export rm`). Requests still waiting
    /// for a daemon keep the stop waiting, so this runs in the background,
    /// bounded; a device left behind keeps its record, so the next broker
    /// finds it.
    pub fn remove(&self) {
        self.stop_and_delete(REMOVE_WAIT);
    }

    /// The device at a broker's stop (SIGTERM), before its daemon is
    /// detached. With a daemon serving, what is dirty above the device is
    /// written back through it first (a mounted file system's pages: the
    /// stop's own writeback fails on 6.12, which aborts requests once
    /// STOP_DEV has quiesced the device), then the device is stopped and
    /// deleted. With none, or if the writeback does not finish, nothing is
    /// stopped: the broker's exit leaves the device QUIESCED, its requests
    /// waiting, and the next broker recovers it from the record.
    pub fn stop(&self, export: &Export) {
        let (name, id) = (export.name().to_owned(), self.dev_id);
        let leave = |why: &str| {
            warn!(
                "{name}: ublk device {id} left for the next broker ({why}); its requests wait, \
                 and a broker started on this socket recovers it"
            );
        };
        if !export.serving() {
            return leave("no daemon serves it, so what is dirty above it cannot be written back");
        }
        let dev = self.path();
        match within(STOP_SYNC_WAIT, move || super::sync_above(&dev)) {
            Some(Ok(n)) => info!("{name}: ublk device {id}: wrote back {n} file systems on it"),
            // Never started (no /dev/ublkbN): nothing above it.
            Some(Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Some(Err(e)) => return leave(&format!("writing back what is above it failed: {e}")),
            None => return leave(&format!("writeback did not finish in {STOP_SYNC_WAIT:?}")),
        }
        self.stop_and_delete(STOP_WAIT);
    }

    /// STOP_DEV, then DEL_DEV, for up to `bound`. A stopped device is dead
    /// (nothing to recover), so its record goes then, even if DEL_DEV waits
    /// on (until the device's last holder, a lazily unmounted file system
    /// say, lets go of it).
    fn stop_and_delete(&self, bound: Duration) {
        let (id, record) = (self.dev_id, self.record.clone());
        let done = within(bound, move || {
            let mut c = Control::open()?;
            c.stop(id)?;
            let _ = std::fs::remove_file(&record);
            c.delete(id)
        });
        match done {
            Some(Ok(())) => {}
            Some(Err(e)) => warn!("ublk device {id}: cannot stop and delete it: {e}"),
            None if self.record.exists() => warn!(
                "ublk device {id}: not stopped within {bound:?} (requests are waiting); left to \
                 the kernel"
            ),
            None => info!(
                "ublk device {id}: stopped; the kernel deletes it once its last holder closes it"
            ),
        }
    }
}

/// Why a QUIESCED device cannot be recovered, in words an operator can
/// act on. On 6.12, a server that dies after START_USER_RECOVERY with only
/// some tags fetched cannot have those FETCHes cancelled (the queue has no
/// daemon yet), so its /dev/ublkcN stays open: EBUSY for good. One that
/// died after mapping the descriptors (a broker before 2026-12 mapped them
/// first) leaves its memory as the device's: the next mmap is EINVAL.
/// Only stopping or deleting the device ends either.
fn unrecoverable(dev_id: u32, step: &str, e: &io::Error) -> io::Error {
    let why = match e.raw_os_error() {
        Some(libc::EBUSY) => format!(
            "/dev/ublkc{dev_id} is still held open {RECOVER_WAIT:?} after its broker died, by \
             another process or by the remains of a recovery cut short"
        ),
        _ => "a recovery was cut short where the driver cannot take it up again".to_owned(),
    };
    io::Error::new(
        e.kind(),
        format!(
            "ublk device {dev_id} cannot be recovered: {step}: {e} ({why}). Its requests \
             cannot be served again: delete the device (ublksrv's `ublk del -n {dev_id}`, or \
             reboot), then start the broker again to make a new one"
        ),
    )
}

/// Waits, until `end`, for device `dev_id` to be QUIESCED: the kernel
/// quiesces it once its server's /dev/ublkcN is closed.
fn quiesced(ctl: &mut Control, dev_id: u32, end: Instant) -> io::Result<DevInfo> {
    loop {
        let info = ctl.info(dev_id)?;
        if info.state == sys::STATE_QUIESCED {
            return Ok(info);
        }
        if Instant::now() >= end {
            return Err(io::Error::other(format!(
                "ublk device {dev_id} is in state {} (not QUIESCED: is its server still running?)",
                info.state
            )));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// START_USER_RECOVERY on a QUIESCED device, again while it is EBUSY (the
/// dead server's /dev/ublkcN is still being closed), until `end`. Whether
/// a recovery cut short is being taken up (EINVAL: a server started one
/// and died before its FETCHes, on 6.12; serving the queue finishes it).
fn start_recovery(ctl: &mut Control, dev_id: u32, end: Instant) -> io::Result<bool> {
    loop {
        match ctl.start_recovery(dev_id) {
            Ok(()) => return Ok(false),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(true),
            Err(e) => return Err(unrecoverable(dev_id, "START_USER_RECOVERY", &e)),
        }
    }
}

/// A recorded device whose shape is not the export's.
fn misfit(dev_id: u32, info: &DevInfo) -> io::Error {
    io::Error::other(format!(
        "ublk device {dev_id} ({} queues, {} tags of {} bytes) does not fit this export's slots; \
         start the broker with the --slots and --slot-size it was started with",
        info.nr_hw_queues, info.queue_depth, info.max_io_buf_bytes
    ))
}

/// Runs `f` on a thread of its own for up to `bound`: `None` if it has not
/// finished by then (it is left running), else what it returned.
fn within<T: Send + 'static>(
    bound: Duration,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> Option<io::Result<T>> {
    let done = match std::thread::Builder::new().spawn(f) {
        Ok(t) => t,
        Err(e) => return Some(Err(e)),
    };
    let end = Instant::now() + bound;
    while !done.is_finished() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !done.is_finished() {
        return None;
    }
    Some(
        done.join()
            .unwrap_or_else(|_| Err(io::Error::other("the thread failed"))),
    )
}

/// Opens /dev/ublkcN and starts the queue thread, which fetches every tag.
fn serve(export: &Arc<Export>, dev_id: u32, depth: u16) -> io::Result<()> {
    let ring = UblkQueue::open(dev_id, depth, 4, CDEV_WAIT)?;
    let queue = Queue::new(export.clone(), ring)?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("ublk-{}", export.name()))
        .spawn(move || queue.run(&ready_tx))?;
    ready_rx
        .recv_timeout(CDEV_WAIT)
        .map_err(|_| io::Error::other("the ublk queue thread did not start"))?
}

/// Completions for the queue thread: (tag, result) and a wake-up.
struct Mailbox {
    done: Mutex<Vec<(u16, i32)>>,
    wake: OwnedFd,
}

impl ReplySink for Mailbox {
    fn complete(&self, tag: u64, op: Op, outcome: Outcome<'_>) {
        let result = match outcome {
            Outcome::Done { len, .. } if op.uses_buffer() => {
                i32::try_from(len).unwrap_or(-libc::EIO)
            }
            Outcome::Done { .. } => 0,
            Outcome::Failed(errno) => errno.saturating_neg(),
        };
        self.done
            .lock()
            .push((u16::try_from(tag).unwrap_or(u16::MAX), result));
        crate::sys::kick(self.wake.as_fd());
    }
}

/// One queue: the kernel side (shared crate) and the mailbox.
struct Queue {
    export: Arc<Export>,
    ring: UblkQueue,
    mailbox: Arc<Mailbox>,
}

impl Queue {
    fn new(export: Arc<Export>, ring: UblkQueue) -> io::Result<Self> {
        Ok(Self {
            export,
            ring,
            mailbox: Arc::new(Mailbox {
                done: Mutex::new(Vec::new()),
                wake: crate::sys::eventfd()?,
            }),
        })
    }

    /// The buffer of tag `tag`: its pinned slot.
    fn buffer(&self, tag: u16) -> u64 {
        let slot = u32::from(tag);
        self.export
            .slot_offset(slot)
            .and_then(|off| {
                self.export
                    .data()
                    .ptr(off, self.export.slot_size() as usize)
            })
            .map_or(0, |p| p as u64)
    }

    fn push_wake(&mut self) -> io::Result<()> {
        self.ring.poll(self.mailbox.wake.as_fd(), WAKE)
    }

    /// Fetches every tag, then maps the descriptors (the order
    /// `UblkQueue::submit_fetches` says why), then serves. Tag buffers live as long as the export's data area,
    /// which this queue holds.
    fn run(mut self, ready: &std::sync::mpsc::Sender<io::Result<()>>) {
        crate::sys::set_io_flusher();
        let depth = self.ring.depth();
        let fetched = (0..depth)
            .try_for_each(|tag| {
                // The driver refuses a FETCH without a buffer (6.12).
                let refused = tag == 0 && crate::fault::at("ublk-fetch-refused");
                let addr = if refused { 0 } else { self.buffer(tag) };
                self.ring.fetch(tag, addr)
            })
            .and_then(|()| self.push_wake())
            .and_then(|()| self.ring.submit_fetches())
            .and_then(|()| {
                crate::fault::crash_at("ublk-fetched");
                self.ring.map()
            });
        let failed = fetched.is_err();
        let _ = ready.send(fetched);
        if failed {
            return;
        }
        let mut aborted = 0u16;
        let mut events = Vec::new();
        while aborted < depth {
            if let Err(e) = self.ring.wait(&mut events) {
                warn!("{}: ublk queue: {e}; the queue stops", self.export.name());
                return;
            }
            for event in events.drain(..) {
                let step = match event {
                    Event::User { .. } => self.commit_done(),
                    Event::Request { tag, desc } => self.request(&desc, tag),
                    Event::Aborted { .. } => {
                        aborted = aborted.saturating_add(1);
                        Ok(())
                    }
                    Event::Refused { tag, result } => {
                        warn!(
                            "{}: ublk tag {tag}: command failed ({result}); the tag is lost",
                            self.export.name()
                        );
                        aborted = aborted.saturating_add(1);
                        Ok(())
                    }
                };
                if let Err(e) = step {
                    warn!("{}: ublk queue: {e}", self.export.name());
                }
            }
        }
        info!("{}: ublk queue stopped", self.export.name());
    }

    /// Commits the completions in the mailbox (and fetches the tags again).
    fn commit_done(&mut self) -> io::Result<()> {
        crate::sys::drain(self.mailbox.wake.as_fd());
        let done = std::mem::take(&mut *self.mailbox.done.lock());
        for (tag, result) in done {
            if tag < self.ring.depth() {
                let addr = self.buffer(tag);
                self.ring.commit(tag, result, addr)?;
            }
        }
        self.push_wake()
    }

    /// A request arrived in tag `tag`: checks its descriptor and hands it to
    /// the export, or fails it at once.
    fn request(&mut self, desc: &IoDesc, tag: u16) -> io::Result<()> {
        match parse(desc, self.export.size(), self.export.slot_size()) {
            Ok((op, offset, len)) => {
                let data = if op.uses_buffer() {
                    Data::Slot(u32::from(tag))
                } else {
                    Data::None
                };
                let origin = Origin {
                    sink: self.mailbox.clone(),
                    tag: u64::from(tag),
                };
                self.export.submit(op, offset, len, origin, data);
                Ok(())
            }
            Err(errno) => {
                let addr = self.buffer(tag);
                self.ring.commit(tag, errno.saturating_neg(), addr)
            }
        }
    }
}
