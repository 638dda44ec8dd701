//! The FUSE frontend: each export is its own FUSE connection, mounted on the
//! regular file `MOUNTPOINT/NAME`, whose root is a regular file of the
//! export's size. The broker answers metadata itself and turns READ, WRITE,
//! FSYNC and FALLOCATE into requests of the export's in-flight table.
//!
//! One connection per export keeps exports apart in the kernel too: the
//! kernel limits background requests (async direct I/O, readahead) per
//! connection, so with a shared connection one export without a daemon
//! would hold the limit and stall the others.
//!
//! Several worker threads each read from their own clone of the connection.
//! A worker reads each request with readv into an 80-byte private head
//! (header plus WRITE arguments) and a slot buffer it reserved beforehand,
//! so a WRITE's data lands in shared memory with no copy. With no slot free,
//! it reads into private memory and the data is copied once.
//!
//! In direct mode (`Lending`) the workers park while a daemon reads the
//! connection itself, on clones lent to it, and the kernel re-sends what
//! either side read and did not answer when the queue changes hands.
//!
//! The connection outlives the broker process when its descriptors do
//! (`restart`): a broker that follows adopts them ([`FuseFrontend::adopt`])
//! without a second INIT (the kernel sends it once per connection) and has
//! the kernel re-send what the old broker read and did not answer.

mod block;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuse_abi::linux::fuse_write_out;
pub use holdfast_kernel::fuse::Init;
use holdfast_kernel::fuse::request::{self, Decoded, FuseOp, HEAD_LEN};
use holdfast_kernel::fuse::{Answer, Volume, sys};
use holdfast_proto::shm::Op;
use parking_lot::{Condvar, Mutex};
use zerocopy::{Immutable, IntoBytes};

use super::{Lender, Origin, Outcome, ReplySink, Target};
use crate::inflight::Data;
use crate::restart::record::FuseRecord;
use crate::sys::loopdev::LoopDevice;
use crate::{info, warn};

/// Called once a connection's INIT is answered (the broker then keeps its
/// descriptors for its own restart).
pub type InitHook = Arc<dyn Fn() + Send + Sync>;

/// The mounted exports.
pub struct FuseFrontend {
    dir: PathBuf,
    workers: usize,
    mounts: Mutex<Vec<Mount>>,
    on_init: InitHook,
}

/// One export's mount, its connection and its block device.
struct Mount {
    name: String,
    path: PathBuf,
    device: Option<LoopDevice>,
    /// Names the mount's kept descriptors (`restart::record::names::fuse`).
    id: u64,
    /// Daemons that can may serve it in direct mode.
    direct: bool,
    /// The mounted /dev/fuse descriptor first, then its clones.
    channels: Vec<Arc<Channel>>,
    conn: Arc<ConnInfo>,
}

/// A connection's INIT, and how many re-sent requests it has delivered.
#[derive(Default)]
struct ConnInfo {
    init: OnceLock<Init>,
    resent: AtomicU64,
}

impl FuseFrontend {
    /// A frontend that mounts exports on `dir/NAME` (creating the directory
    /// and the files to mount on) with `workers` threads each.
    pub fn new(dir: &Path, workers: usize, on_init: InitHook) -> Self {
        Self {
            dir: dir.to_path_buf(),
            workers,
            mounts: Mutex::new(Vec::new()),
            on_init,
        }
    }

    /// Mounts `export` and, for `block`, attaches a loop device over it;
    /// `direct`: daemons that can may serve it in direct mode; `id` names
    /// the mount's kept descriptors. On failure nothing is left mounted.
    pub fn add<T: Target>(
        &self,
        export: &Arc<T>,
        block: bool,
        direct: bool,
        id: u64,
    ) -> io::Result<()> {
        let path = self.dir.join(export.name());
        let dev = mount_export(&path, export.slot_size()).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot mount {}: {e}", path.display()))
        })?;
        let devs = clone_devs(dev, self.workers);
        let conn = Arc::new(ConnInfo::default());
        let cid = conn_id(&path);
        let started = start_workers(devs, export, (conn.clone(), cid), self.on_init.clone());
        let channels = match started {
            Ok(s) => s,
            Err(e) => {
                let _ = sys::unmount(&path);
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let mut mount = Mount {
            name: export.name().to_owned(),
            path,
            device: None,
            id,
            direct,
            channels,
            conn,
        };
        let attached = {
            if block {
                let d = block::attach(&mount.path, export.block_size())?;
                info!(
                    "{}: block device {} (direct I/O {}, {}-byte blocks)",
                    export.name(),
                    d.path().display(),
                    if d.direct_io { "on" } else { "off" },
                    export.block_size()
                );
                mount.device = Some(d);
            }
            Ok(())
        };
        if let Err(e) = attached {
            mount.detach();
            return Err(e);
        }
        self.mounts.lock().push(mount);
        Ok(())
    }

    /// Takes over the connection a previous broker left for `export`: its
    /// descriptors `devs` (the mounted one first), its mount and block
    /// device as `rec` says. The kernel is asked to re-send what the old
    /// broker read and did not answer before any worker reads, so that no
    /// request of this broker's own is re-sent under it.
    pub fn adopt<T: Target>(
        &self,
        export: &Arc<T>,
        rec: &FuseRecord,
        devs: Vec<OwnedFd>,
    ) -> io::Result<()> {
        let first = devs
            .first()
            .ok_or_else(|| io::Error::other("no FUSE descriptor was passed on"))?;
        sys::notify_resend(first.as_fd()).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("FUSE_NOTIFY_RESEND: {e} (needs Linux 6.9 or later)"),
            )
        })?;
        let conn = Arc::new(ConnInfo::default());
        let _ = conn.init.set(Init {
            minor: rec.minor,
            flags: rec.flags,
        });
        let device = rec
            .device
            .map(|n| LoopDevice::existing(n, &rec.mount))
            .transpose()?;
        let n = devs.len();
        let cid = conn_id(&rec.mount);
        let channels = start_workers(devs, export, (conn.clone(), cid), self.on_init.clone())?;
        info!(
            "{}: took over its FUSE connection ({n} descriptors{}); the kernel re-sends what was in flight",
            export.name(),
            device
                .as_ref()
                .map(|d| format!(", block device {}", d.path().display()))
                .unwrap_or_default()
        );
        self.mounts.lock().push(Mount {
            name: export.name().to_owned(),
            path: rec.mount.clone(),
            device,
            id: rec.id,
            direct: rec.direct,
            channels,
            conn,
        });
        Ok(())
    }

    /// What the next broker needs to take export `name`'s connection over:
    /// its record and duplicates of its descriptors. None until INIT is
    /// answered, and on a kernel that cannot re-send requests (there, a
    /// kept connection would leave what the broker held unanswered for
    /// ever; letting it end fails that I/O instead).
    pub fn custody(&self, name: &str) -> Option<(FuseRecord, Vec<OwnedFd>)> {
        let mounts = self.mounts.lock();
        let m = mounts.iter().find(|m| m.name == name)?;
        let init = m.conn.init.get().filter(|i| i.can_resend())?;
        let fds: Vec<OwnedFd> = m
            .channels
            .iter()
            .filter_map(|c| c.dev.try_clone().ok())
            .collect();
        let rec = FuseRecord {
            id: m.id,
            mount: m.path.clone(),
            conns: u32::try_from(fds.len()).ok()?,
            device: m.device.as_ref().map(|d| d.number),
            minor: init.minor,
            flags: init.flags,
            direct: m.direct,
        };
        (fds.len() == m.channels.len()).then_some((rec, fds))
    }

    /// Why export `name`'s connection cannot outlive this broker, if it
    /// cannot.
    pub fn cannot_keep(&self, name: &str) -> Option<String> {
        let mounts = self.mounts.lock();
        let m = mounts.iter().find(|m| m.name == name)?;
        cannot_keep(name, m.conn.init.get())
    }

    /// Re-sent requests delivered since this broker took the connections
    /// over.
    pub fn resent(&self) -> u64 {
        self.mounts
            .lock()
            .iter()
            .map(|m| m.conn.resent.load(Ordering::Relaxed))
            .sum()
    }

    /// The block device of export `name`, if it has one.
    pub fn device(&self, name: &str) -> Option<PathBuf> {
        let mounts = self.mounts.lock();
        let m = mounts.iter().find(|m| m.name == name)?;
        m.device.as_ref().map(LoopDevice::path)
    }

    /// Who holds export `name`'s file or block device open.
    pub fn users(&self, name: &str) -> Vec<String> {
        let mounts = self.mounts.lock();
        mounts
            .iter()
            .find(|m| m.name == name)
            .map(|m| block::users(&m.path, m.device.as_ref()))
            .unwrap_or_default()
    }

    /// Detaches export `name`'s block device and mount. Whoever still has
    /// them open keeps them until they close (the export then fails their
    /// I/O); the kernel frees the device and the connection after that.
    pub fn remove(&self, name: &str) {
        let mount = {
            let mut mounts = self.mounts.lock();
            let i = mounts.iter().position(|m| m.name == name);
            i.map(|i| mounts.swap_remove(i))
        };
        if let Some(mut m) = mount {
            m.detach();
        }
    }

    /// Detaches every mount.
    pub fn unmount(&self) {
        let all = std::mem::take(&mut *self.mounts.lock());
        for mut m in all {
            m.detach();
        }
    }
}

impl Drop for FuseFrontend {
    fn drop(&mut self) {
        self.unmount();
    }
}

impl Mount {
    fn detach(&mut self) {
        if let Some(d) = self.device.take()
            && let Err(e) = d.detach()
        {
            warn!("cannot detach {}: {e}", d.path().display());
        }
        if let Err(e) = sys::unmount(&self.path) {
            warn!("cannot unmount {}: {e}", self.path.display());
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Creates the file to mount on (detaching a dead mount left there) and
/// mounts a new FUSE connection on it.
fn mount_export(path: &Path, max_read: u32) -> io::Result<OwnedFd> {
    sys::clear_stale_mount(path);
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let dev = sys::open_dev()?;
    sys::mount(dev.as_fd(), path, max_read)?;
    Ok(dev)
}

/// `dev` and `workers - 1` clones of it.
fn clone_devs(dev: OwnedFd, workers: usize) -> Vec<OwnedFd> {
    let mut devs = vec![dev];
    for _ in 1..workers.max(1) {
        let cloned = devs.first().map(|d| sys::clone_dev(d.as_fd()));
        match cloned {
            Some(Ok(d)) => devs.push(d),
            Some(Err(e)) => {
                warn!("cannot clone the FUSE connection ({e}); running fewer workers");
                break;
            }
            None => break,
        }
    }
    devs
}

/// Starts a worker thread on each of the connection's descriptors, and
/// names the connection's [`Lending`] to the export.
fn start_workers<T: Target>(
    devs: Vec<OwnedFd>,
    export: &Arc<T>,
    (conn, conn_id): (Arc<ConnInfo>, Option<u32>),
    on_init: InitHook,
) -> io::Result<Vec<Arc<Channel>>> {
    let first = devs
        .first()
        .ok_or_else(|| io::Error::other("no FUSE descriptor"))?
        .try_clone()?;
    sys::install_interrupt()?;
    let slot_size = export.slot_size();
    let export_slots = export.slot_count();
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let max_background = u16::try_from(export_slots).unwrap_or(u16::MAX);
    let parking = Arc::new(Parking::default());
    let fs = Arc::new(Fs {
        volume: Volume::new(export.size(), slot_size, max_background, started),
        export: export.clone(),
        slot_size,
        conn: conn.clone(),
        on_init,
        populated: (0..export_slots).map(|_| AtomicBool::new(false)).collect(),
        parking: parking.clone(),
    });
    let mut channels = Vec::with_capacity(devs.len());
    for (i, dev) in devs.into_iter().enumerate() {
        let fs = fs.clone();
        let chan = Arc::new(Channel { dev });
        channels.push(chan.clone());
        std::thread::Builder::new()
            .name(format!("fuse-{}-{i}", fs.export.name()))
            .spawn(move || fs.worker(&chan))?;
    }
    info!(
        "{}: FUSE serving with {} workers",
        fs.export.name(),
        channels.len()
    );
    let lending = Arc::new(Lending {
        conn_id,
        waiting_failed: AtomicBool::new(false),
        dev: first,
        conns: u32::try_from(channels.len()).unwrap_or(1),
        conn,
        parking,
        max_io: slot_size,
        max_background,
        started,
    });
    export.set_lender(lending);
    Ok(channels)
}

/// How long parking waits for the workers, each finishing the request it
/// holds: a reply to the kernel and a table insert, never I/O.
const PARK_WAIT: Duration = Duration::from_secs(10);

/// Parks a connection's workers while a direct-mode daemon reads it.
#[derive(Default)]
struct Parking {
    /// Read by every worker before each read(2); set and cleared under
    /// `state`.
    requested: AtomicBool,
    state: Mutex<Parked>,
    changed: Condvar,
}

#[derive(Default)]
struct Parked {
    /// The workers that read, to interrupt; each leaves before it exits.
    threads: Vec<libc::pthread_t>,
    /// How many of them are parked.
    parked: usize,
}

impl Parking {
    fn join(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.state.lock().threads.push(me);
    }

    fn leave(&self) {
        // SAFETY: as in `join`.
        let me = unsafe { libc::pthread_self() };
        let mut st = self.state.lock();
        st.threads.retain(|&t| t != me);
        self.changed.notify_all();
    }

    /// A worker's stop before each read: waits while parking is asked.
    fn checkpoint(&self) {
        if !self.requested.load(Ordering::Acquire) {
            return;
        }
        let mut st = self.state.lock();
        st.parked += 1;
        self.changed.notify_all();
        while self.requested.load(Ordering::Acquire) {
            self.changed.wait(&mut st);
        }
        st.parked -= 1;
    }

    fn park(&self) -> io::Result<()> {
        self.park_within(PARK_WAIT)
    }

    fn park_within(&self, bound: Duration) -> io::Result<()> {
        let end = Instant::now() + bound;
        let mut st = self.state.lock();
        self.requested.store(true, Ordering::Release);
        while st.parked < st.threads.len() {
            // A signal that lands before a worker enters read(2) is lost:
            // sent again until each is parked.
            for &t in &st.threads {
                // SAFETY: a listed thread has not exited (`leave`), and
                // cannot while the list is locked.
                unsafe { sys::interrupt(t) };
            }
            let _ = self.changed.wait_for(&mut st, Duration::from_millis(1));
            if Instant::now() >= end && st.parked < st.threads.len() {
                self.requested.store(false, Ordering::Release);
                self.changed.notify_all();
                return Err(io::Error::other(format!(
                    "{} of {} FUSE workers did not stop within {bound:?}",
                    st.threads.len() - st.parked,
                    st.threads.len()
                )));
            }
        }
        Ok(())
    }

    fn unpark(&self) {
        let _st = self.state.lock();
        self.requested.store(false, Ordering::Release);
        self.changed.notify_all();
    }
}

/// A connection's direct mode: what a daemon is lent, and the workers'
/// parking.
struct Lending {
    /// Names the connection under /sys/fs/fuse/connections.
    conn_id: Option<u32>,
    /// Reading its `waiting` failed once: not tried again.
    waiting_failed: AtomicBool,
    /// A clone of the connection: to clone for daemons, and to ask the
    /// kernel to re-send on.
    dev: OwnedFd,
    /// Descriptors lent to each daemon: one per worker.
    conns: u32,
    conn: Arc<ConnInfo>,
    parking: Arc<Parking>,
    max_io: u32,
    max_background: u16,
    started: u64,
}

impl Lender for Lending {
    fn terms(&self) -> Result<holdfast_proto::DirectTerms, String> {
        let init = self
            .conn
            .init
            .get()
            .ok_or("the kernel has not initialised its FUSE connection yet")?;
        if !init.can_resend() {
            return Err(format!(
                "this kernel's FUSE (protocol 7.{}) cannot re-send requests \
                 (FUSE_NOTIFY_RESEND, Linux 6.9 and later)",
                init.minor
            ));
        }
        if let Some(why) = kernel_resend_flaw() {
            return Err(why);
        }
        Ok(holdfast_proto::DirectTerms::Fuse(
            holdfast_proto::FuseTerms {
                minor: init.minor,
                flags: init.flags,
                max_io: self.max_io,
                max_background: self.max_background,
                started: self.started,
                conns: self.conns,
            },
        ))
    }

    fn lend(&self) -> io::Result<Vec<OwnedFd>> {
        (0..self.conns)
            .map(|_| sys::clone_dev(self.dev.as_fd()))
            .collect()
    }

    fn park(&self) -> io::Result<()> {
        self.parking.park()
    }

    fn resend(&self) -> io::Result<()> {
        sys::notify_resend(self.dev.as_fd())
    }

    fn unpark(&self) {
        self.parking.unpark();
    }

    fn is_resent(&self, tag: u64) -> bool {
        request::is_resent(tag)
    }

    fn waiting(&self) -> Option<u64> {
        let id = self.conn_id?;
        if self.waiting_failed.load(Ordering::Relaxed) {
            return None;
        }
        sys::waiting(id)
            .inspect_err(|e| {
                self.waiting_failed.store(true, Ordering::Relaxed);
                warn!(
                    "cannot read how many requests FUSE connection {id} waits on ({e}): a \
                     direct-mode daemon that stops reading is not detected"
                );
            })
            .ok()
    }
}

/// The FUSE connection mounted on `mountpoint`: its device number's minor
/// (major 0, an anonymous device), the name of its directory under
/// /sys/fs/fuse/connections. From /proc/self/mountinfo, not stat(2), which
/// would wait on the connection's server.
fn conn_id(mountpoint: &Path) -> Option<u32> {
    let want = mountpoint.to_str()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    // The last mount on the path is the one in use.
    let dev = info.lines().rev().find_map(|l| {
        let dev = l.split(' ').nth(2)?;
        (super::mount_of(l, dev)? == want).then_some(dev)
    })?;
    match dev.split_once(':')? {
        ("0", minor) => minor.parse().ok(),
        _ => None,
    }
}

/// Why this kernel's FUSE_NOTIFY_RESEND is not to be used, if so.
fn kernel_resend_flaw() -> Option<String> {
    let uname = rustix::system::uname();
    holdfast_kernel::fuse::resend_flaw(&uname.release().to_string_lossy())
}

/// One /dev/fuse clone; replies go to the clone the request came from.
struct Channel {
    dev: OwnedFd,
}

impl Channel {
    fn origin(self: &Arc<Self>, unique: u64) -> Origin {
        Origin {
            sink: self.clone(),
            tag: unique,
        }
    }

    /// Writes a reply: the header, then `body` pieces.
    fn send(&self, unique: u64, error: i32, body: &[libc::iovec]) {
        // SAFETY: the callers' body pieces are valid for the duration of
        // the call.
        match unsafe { sys::reply(self.dev.as_fd(), unique, error, body) } {
            Ok(()) => {}
            // The request was interrupted or the connection aborted.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => {}
            Err(e) => warn!("FUSE reply to request {unique} failed: {e}"),
        }
    }

    fn error(&self, unique: u64, errno: i32) {
        self.send(unique, errno, &[]);
    }

    fn ok<T: IntoBytes + Immutable>(&self, unique: u64, value: &T) {
        self.bytes(unique, value.as_bytes());
    }

    fn bytes(&self, unique: u64, bytes: &[u8]) {
        let body = [libc::iovec {
            iov_base: bytes.as_ptr().cast_mut().cast(),
            iov_len: bytes.len(),
        }];
        self.send(unique, 0, if bytes.is_empty() { &[] } else { &body });
    }
}

impl ReplySink for Channel {
    fn complete(&self, unique: u64, op: Op, outcome: Outcome<'_>) {
        match outcome {
            Outcome::Failed(errno) => self.error(unique, errno),
            Outcome::Done { len, data } => match op {
                Op::Read => {
                    match data.and_then(|d| d.region.ptr(d.offset, d.len).map(|p| (p, d.len))) {
                        Some((ptr, n)) => self.send(
                            unique,
                            0,
                            &[libc::iovec {
                                iov_base: ptr.cast(),
                                iov_len: n,
                            }],
                        ),
                        None => self.error(unique, libc::EIO),
                    }
                }
                Op::Write => self.ok(
                    unique,
                    &fuse_write_out {
                        size: u32::try_from(len).unwrap_or(0),
                        padding: 0,
                    },
                ),
                _ => self.bytes(unique, &[]),
            },
        }
    }
}

/// A worker's buffers: the private head, private memory for a body when no
/// slot is free, and the slot reserved for the next request's body.
struct Worker {
    head: [u8; HEAD_LEN],
    private: Vec<u8>,
    reserved: Option<u32>,
    /// Where a request's arguments past the head are gathered.
    args: Vec<u8>,
}

/// One export's FUSE file system.
struct Fs<T> {
    export: Arc<T>,
    slot_size: u32,
    /// The file system's answers to everything but data.
    volume: Volume,
    conn: Arc<ConnInfo>,
    on_init: InitHook,
    /// Slots whose pages this process has mapped in (`populate`).
    populated: Box<[AtomicBool]>,
    parking: Arc<Parking>,
}

impl<T: Target> Fs<T> {
    fn worker(&self, chan: &Arc<Channel>) {
        // A FUSE export is a volume: a loop device over its file, or a
        // guest's page cache, writes back through it.
        crate::sys::set_io_flusher();
        self.parking.join();
        let mut w = Worker {
            head: [0u8; HEAD_LEN],
            // Written, so that its pages are mapped in (see `populate`).
            private: vec![1u8; self.slot_size as usize],
            reserved: None,
            args: Vec::new(),
        };
        loop {
            self.parking.checkpoint();
            if w.reserved.is_none() {
                w.reserved = self.export.take_slot();
            }
            let body = self.body_ptr(&mut w);
            // SAFETY: `body` is a slot buffer of `slot_size` bytes in a live
            // mapping, or the worker's private buffer of the same size.
            let n = unsafe {
                sys::read_request(chan.dev.as_fd(), &mut w.head, body, self.slot_size as usize)
            };
            match n {
                Ok(n) => self.handle(chan, &mut w, n),
                Err(e) => match e.raw_os_error() {
                    // Interrupted before we read it / signal / retry.
                    Some(libc::ENOENT | libc::EINTR | libc::EAGAIN) => {}
                    // Unmounted: the connection is gone.
                    Some(libc::ENODEV) => break,
                    _ => {
                        warn!("reading /dev/fuse failed: {e}; worker stops");
                        break;
                    }
                },
            }
        }
        self.parking.leave();
        if let Some(s) = w.reserved.take() {
            self.export.release_slot(s);
        }
    }

    fn body_ptr(&self, w: &mut Worker) -> *mut u8 {
        let slot = w.reserved.and_then(|s| {
            self.export
                .data()
                .ptr(self.export.slot_offset(s)?, self.slot_size as usize)
        });
        match slot {
            Some(p) => {
                self.populate(w.reserved);
                p
            }
            None => {
                // Cannot happen for a slot of this export; never read into
                // a slot whose address is unknown.
                if let Some(s) = w.reserved.take() {
                    self.export.release_slot(s);
                }
                w.private.as_mut_ptr()
            }
        }
    }

    /// Maps in a slot's pages the first time this process reads into it,
    /// so that a read of /dev/fuse never faults, and the broker's own death
    /// during a read leaves the request to be re-sent rather than failed
    /// (`SharedRegion::populate`).
    fn populate(&self, slot: Option<u32>) {
        let Some(s) = slot else { return };
        let Some(flag) = self.populated.get(s as usize) else {
            return;
        };
        // A load first: after the first read, no worker writes the flag's
        // cache line again.
        if flag.load(Ordering::Relaxed) || flag.swap(true, Ordering::Relaxed) {
            return;
        }
        let populated = self
            .export
            .slot_offset(s)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
            .and_then(|off| self.export.data().populate(off, self.slot_size as usize));
        if let Err(e) = populated {
            warn!(
                "{}: cannot map in slot {s} ({e}): a broker killed while reading into it \
                 can fail that request with EIO",
                self.export.name()
            );
        }
    }

    /// Copies `len` bytes of the body the request was read into.
    /// Appends the first `len` bytes of the body the request was read
    /// into to `out`.
    fn body_append(&self, w: &Worker, len: usize, out: &mut Vec<u8>) {
        match w.reserved {
            Some(s) => {
                let off = self.export.slot_offset(s);
                let _ = off.and_then(|off| self.export.data().append_to(off, len, out));
            }
            None => out.extend_from_slice(w.private.get(..len).unwrap_or_default()),
        }
    }

    fn handle(&self, chan: &Arc<Channel>, w: &mut Worker, n: usize) {
        let mut args = std::mem::take(&mut w.args);
        // Arguments past the head are in the body buffer, which the daemon
        // can write too: copied to private memory before parsing.
        let decoded = request::decode(&w.head, n, &mut args, |len, out| {
            self.body_append(w, len, out);
        });
        if let Some(h) = decoded.header()
            && request::is_resent(h.unique)
            && self.conn.resent.fetch_add(1, Ordering::Relaxed) == 0
        {
            info!(
                "{}: the kernel re-sends what was read and not answered (by a previous broker \
                 or a direct-mode daemon)",
                self.export.name()
            );
        }
        match decoded {
            Decoded::Runt { n } => {
                warn!("FUSE request of {n} bytes is shorter than its header; ignored");
            }
            Decoded::Refused { header, errno, why } => {
                // Unsupported large requests are common enough to stay quiet.
                if errno != Some(libc::ENOSYS) {
                    warn!("{why}; refused");
                }
                if let Some(errno) = errno {
                    chan.error(header.unique, errno);
                }
            }
            Decoded::Write {
                header,
                offset,
                size,
            } => self.write(chan, w, header.nodeid, header.unique, offset, size),
            Decoded::Op { header, op } => {
                self.op(chan, &mut w.reserved, header.nodeid, header.unique, op);
            }
        }
        w.args = args;
    }

    fn write(
        &self,
        chan: &Arc<Channel>,
        w: &mut Worker,
        nodeid: u64,
        unique: u64,
        offset: u64,
        size: u32,
    ) {
        let e = &self.export;
        let answer = self.volume.write(nodeid, offset, size);
        let Answer::Data { op, offset, len } = answer else {
            return self.answer(chan, unique, answer);
        };
        let origin = chan.origin(unique);
        match w.reserved.take() {
            Some(slot) => e.submit(op, offset, len, origin, Data::Slot(slot)),
            None => {
                let bytes = w.private.get(..size as usize).unwrap_or_default();
                e.submit_write(offset, origin, bytes);
            }
        }
    }

    fn op(
        &self,
        chan: &Arc<Channel>,
        reserved: &mut Option<u32>,
        nodeid: u64,
        unique: u64,
        op: FuseOp<'_>,
    ) {
        let answer = self.volume.answer(nodeid, &op);
        if let (FuseOp::Init { major, minor, .. }, Answer::Error(_)) = (&op, &answer) {
            warn!(
                "kernel FUSE protocol {major}.{minor} is not served (7.{} or later needed)",
                holdfast_kernel::fuse::OLDEST_MINOR
            );
        }
        match answer {
            Answer::Data {
                op: Op::Read,
                offset,
                len,
            } => {
                let data = reserved.take().map_or(Data::None, Data::Slot);
                self.export
                    .submit(Op::Read, offset, len, chan.origin(unique), data);
            }
            Answer::Data { op: Op::Write, .. } => chan.error(unique, libc::EINVAL),
            Answer::Data { op, offset, len } => {
                self.export
                    .submit(op, offset, len, chan.origin(unique), Data::None);
            }
            answer => self.answer(chan, unique, answer),
        }
    }

    /// Replies to what the file system answers without a daemon.
    fn answer(&self, chan: &Channel, unique: u64, answer: Answer) {
        match answer.reply() {
            Some((errno, _)) if errno != 0 => chan.error(unique, errno),
            Some((_, body)) => chan.bytes(unique, body),
            // Data requests go to the export (`op`, `write`).
            None if matches!(answer, Answer::Data { .. }) => chan.error(unique, libc::EIO),
            None => {}
        }
        if let Answer::Init(_, init) = answer {
            self.initialised(init);
        }
    }

    fn initialised(&self, init: Init) {
        info!(
            "{}: FUSE connection initialised (kernel protocol 7.{}{})",
            self.export.name(),
            init.minor,
            if init.can_resend() {
                ", can re-send requests"
            } else {
                ""
            }
        );
        if self.conn.init.set(init).is_ok() {
            (self.on_init)();
        }
    }
}

/// Why a connection whose INIT said `init` cannot outlive the broker.
fn cannot_keep(name: &str, init: Option<&Init>) -> Option<String> {
    match init {
        None => Some(format!(
            "export {name}: the kernel has not initialised its FUSE connection yet; try again"
        )),
        Some(i) if !i.can_resend() => Some(format!(
            "export {name}: this kernel's FUSE (protocol 7.{}) cannot re-send requests \
             (FUSE_NOTIFY_RESEND, Linux 6.9 and later), so the requests this broker holds \
             would never be answered; upgrade the kernel first",
            i.minor
        )),
        Some(_) => kernel_resend_flaw().map(|why| format!("export {name}: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_abi::linux::{FUSE_ASYNC_READ, FUSE_HAS_RESEND};

    /// A worker as `Fs::worker` is to parking: a checkpoint before each
    /// blocking call (here a sleep the interrupt signal cuts short).
    fn worker(parking: Arc<Parking>, stop: Arc<AtomicBool>, rounds: Arc<AtomicU64>) {
        parking.join();
        while !stop.load(Ordering::SeqCst) {
            parking.checkpoint();
            rounds.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(2));
        }
        parking.leave();
    }

    #[test]
    fn workers_park_and_unpark() {
        sys::install_interrupt().unwrap();
        let parking = Arc::new(Parking::default());
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (p, s, r) = (parking.clone(), stop.clone(), rounds.clone());
                std::thread::spawn(move || worker(p, s, r))
            })
            .collect();
        while parking.state.lock().threads.len() < 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        parking.park().unwrap();
        // Parked: none goes round any more.
        let at = rounds.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(rounds.load(Ordering::SeqCst), at);
        assert_eq!(parking.state.lock().parked, 3);
        parking.unpark();
        let end = Instant::now() + Duration::from_secs(5);
        while rounds.load(Ordering::SeqCst) == at {
            assert!(Instant::now() < end, "the workers did not read again");
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::SeqCst);
        for t in threads {
            t.join().unwrap();
        }
        // Workers that left are not waited for.
        assert!(parking.state.lock().threads.is_empty());
        parking.park().unwrap();
        parking.unpark();
    }

    /// A worker that does not reach its checkpoint (stuck in a call that
    /// the signal does not end) fails the park within its bound, and the
    /// others are let go.
    #[test]
    fn a_worker_that_does_not_park_fails_the_park() {
        sys::install_interrupt().unwrap();
        let parking = Arc::new(Parking::default());
        let release = Arc::new(AtomicBool::new(false));
        let stuck = {
            let (p, r) = (parking.clone(), release.clone());
            std::thread::spawn(move || {
                p.join();
                while !r.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                p.leave();
            })
        };
        while parking.state.lock().threads.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let e = parking.park_within(Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("1 of 1 FUSE workers"), "{e}");
        assert!(!parking.requested.load(Ordering::SeqCst));
        release.store(true, Ordering::SeqCst);
        stuck.join().unwrap();
    }

    #[test]
    fn a_connection_is_kept_only_where_the_kernel_re_sends() {
        // Linux 6.9+ (7.40+) offers FUSE_HAS_RESEND in INIT's flags2.
        let new = Init {
            minor: 45,
            flags: FUSE_HAS_RESEND | u64::from(FUSE_ASYNC_READ),
        };
        assert!(new.can_resend());
        assert_eq!(cannot_keep("vol0", Some(&new)), None);
        // Linux 6.8 (7.39) has no FUSE_NOTIFY_RESEND: refused, saying why.
        let old = Init {
            minor: 39,
            flags: u64::from(FUSE_ASYNC_READ),
        };
        let why = cannot_keep("vol0", Some(&old)).unwrap();
        assert!(why.contains("7.39") && why.contains("Linux 6.9"), "{why}");
        let why = cannot_keep("vol0", None).unwrap();
        assert!(why.contains("not initialised"), "{why}");
    }
}
