//! The cachefiles ondemand frontend: the broker holds /dev/cachefiles (it
//! opens once only, and closing it unbinds the cache), the anonymous fd of
//! every open cache object and the object table. Kernel requests become
//! requests of one blob export:
//!
//! * OPEN: the blob's name (the cookie key) goes to the daemon as an
//!   [`Op::Open`]; its size comes back and the broker writes `copen`.
//! * READ: split into slot-sized [`Op::Read`]s of the blob; the broker
//!   writes each part's data into the object's anonymous fd and, when every
//!   part is in, issues `CACHEFILES_IOC_READ_COMPLETE`.
//! * CLOSE: the broker closes the object's fd and tells the daemon.
//!
//! A new daemon of the export is sent an OPEN for every open object before
//! anything else ([`Reopen`]), then the replays. The broker's own restart
//! keeps the /dev/cachefiles fd (re-exec, or systemd's fd store) and writes
//! `restore`: the kernel then re-sends what was read and not answered, and
//! re-opens the objects whose fds died with the old broker (their state goes
//! CLOSE → REOPENING → OPEN). kmod-notes/cachefiles.md has the protocol.
#![cfg_attr(
    not(test),
    deny(clippy::arithmetic_side_effects, clippy::indexing_slicing)
)]

pub mod sys;

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use holdfast_proto::shm::Op;
use parking_lot::Mutex;
use rustix::fs::{Mode, OFlags};

use crate::export::Export;
use crate::frontends::{Origin, Outcome, Reopen, ReplySink, SlotData, Target};
use crate::inflight::Data;
use crate::warn;
use holdfast_proto::shm::Ask;

/// The device (Documentation/filesystems/caching/cachefiles.rst).
pub const DEVICE: &str = "/dev/cachefiles";

/// Longest blob name sent to a daemon. Cookie keys are short (erofs: the
/// fsid or device id); the kernel caps a whole message at 1 KiB.
const MAX_BLOB_NAME: usize = sys::MSG_MAX_SIZE;

/// Direct I/O alignment for writes into the cache file: cachefiles writes
/// through to the backing file with IOCB_DIRECT (fs/cachefiles/io.c), and a
/// page covers every logical block size.
const CACHE_ALIGN: usize = 4096;

/// Where an object in the table is, in the kernel's terms (`enum
/// cachefiles_object_state`, 6.8+). An object not in the table is CLOSE
/// for the broker: never opened, closed, or its fd died with a previous
/// broker (then the kernel moves it to REOPENING on its next read and
/// sends a new OPEN, which enters it here again under a new number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ObjectState {
    /// OPEN received, `copen` not written yet (the daemon has the request).
    Opening,
    /// `copen` written with the blob's size: READs come.
    Open { size: u64 },
}

/// One cache object the kernel opened.
struct Object {
    /// The blob's name (the cookie key).
    name: Vec<u8>,
    /// The anonymous fd the kernel installed for it; closing it closes the
    /// object. Shared with reads in progress.
    fd: Arc<OwnedFd>,
    state: ObjectState,
}

struct Inner {
    dev: OwnedFd,
    export: Arc<Export>,
    objects: Mutex<BTreeMap<u32, Object>>,
}

/// The cachefiles frontend of one broker: one cache, one blob export.
pub struct Cachefiles {
    inner: Arc<Inner>,
}

/// How a cache was obtained.
pub enum Device {
    /// Opened and bound here.
    Bound,
    /// Inherited from the previous broker (re-exec or systemd's fd store);
    /// `restore` was written.
    Restored,
}

impl Cachefiles {
    /// Binds a cache in ondemand mode on `dir` (a directory on a real file
    /// system) with `tag`, or, given `inherited`, takes over a bound cache
    /// and has the kernel re-send what was not answered.
    pub fn start(
        export: Arc<Export>,
        dir: &Path,
        tag: &str,
        inherited: Option<OwnedFd>,
    ) -> Result<(Self, Device), String> {
        let (dev, how) = match inherited {
            Some(fd) => {
                check_device(&fd)?;
                command(&fd, sys::RESTORE)
                    .map_err(|e| format!("{DEVICE}: restore: {e} (needs Linux 6.8 or later)"))?;
                (fd, Device::Restored)
            }
            None => (bind(dir, tag)?, Device::Bound),
        };
        let inner = Arc::new(Inner {
            dev,
            export: export.clone(),
            objects: Mutex::new(BTreeMap::new()),
        });
        let weak: Weak<dyn Reopen> = Arc::downgrade(&(inner.clone() as Arc<dyn Reopen>));
        export.set_reopen(weak);
        let reader = inner.clone();
        std::thread::Builder::new()
            .name("holdfast-cachefiles".into())
            .spawn(move || reader.read_loop())
            .map_err(|e| format!("cannot start the cachefiles thread: {e}"))?;
        Ok((Self { inner }, how))
    }

    /// The held /dev/cachefiles, to pass on across a re-exec or to
    /// systemd's fd store.
    pub fn device_fd(&self) -> &OwnedFd {
        &self.inner.dev
    }
}

/// Opens /dev/cachefiles and binds it in ondemand mode.
fn bind(dir: &Path, tag: &str) -> Result<OwnedFd, String> {
    let dev = rustix::fs::open(DEVICE, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty()).map_err(
        |e| match e {
            rustix::io::Errno::NOENT | rustix::io::Errno::NODEV | rustix::io::Errno::NXIO => {
                format!(
                    "{DEVICE}: {e}: this kernel has no cachefiles (load the cachefiles module, \
                     built with CONFIG_CACHEFILES_ONDEMAND)"
                )
            }
            rustix::io::Errno::BUSY => format!(
                "{DEVICE} is already open (it opens once only): stop cachefilesd or the other \
                 broker first"
            ),
            e => format!("{DEVICE}: {e}"),
        },
    )?;
    let dir_text = dir
        .to_str()
        .filter(|d| !d.contains(['\n', ' ']))
        .ok_or_else(|| format!("cache directory {}: not a plain path", dir.display()))?;
    for cmd in sys::bind_commands(dir_text, tag) {
        command(&dev, &cmd).map_err(|e| match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) if cmd.starts_with("bind") => format!(
                "{DEVICE}: {cmd}: {e}: the cache directory {} must be on a file system with \
                 extended attributes and direct I/O (ext4, xfs; not tmpfs), and the kernel \
                 needs CONFIG_CACHEFILES_ONDEMAND",
                dir.display()
            ),
            // 6.12 without CONFIG_CACHEFILES_ONDEMAND says EOPNOTSUPP;
            // kernels whose cachefiles lost the mode (7.3: ondemand.c is
            // gone) take no argument to bind at all.
            Some(libc::EINVAL) if cmd == "bind ondemand" => format!(
                "{DEVICE}: {cmd}: {e}: this kernel's cachefiles has no on-demand mode (it was \
                 removed upstream; Linux 7.3 has none), so the broker cannot be its cache daemon. \
                 Use a kernel whose cachefiles has CONFIG_CACHEFILES_ONDEMAND (up to 6.x)"
            ),
            _ => format!("{DEVICE}: {cmd}: {e}"),
        })?;
    }
    Ok(dev)
}

/// Checks that an inherited fd is /dev/cachefiles.
fn check_device(fd: &OwnedFd) -> Result<(), String> {
    let got = rustix::fs::fstat(fd).map_err(|e| format!("inherited cachefiles fd: {e}"))?;
    let want = rustix::fs::stat(DEVICE).map_err(|e| format!("{DEVICE}: {e}"))?;
    let is_char = got.st_mode & libc::S_IFMT == libc::S_IFCHR;
    if !is_char || got.st_rdev != want.st_rdev {
        return Err(format!(
            "the inherited fd {} is not {DEVICE}",
            fd.as_raw_fd()
        ));
    }
    Ok(())
}

/// Writes one command to /dev/cachefiles.
fn command(dev: &OwnedFd, cmd: &str) -> io::Result<()> {
    let n = rustix::io::write(dev, cmd.as_bytes())?;
    if n != cmd.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
    }
    Ok(())
}

impl Inner {
    fn read_loop(self: Arc<Self>) {
        let mut buf = vec![0u8; sys::MSG_MAX_SIZE];
        loop {
            match crate::sys::poll_readable(&[self.dev.as_fd()], Duration::from_secs(1)) {
                Ok(r) if r.first() == Some(&true) => {}
                Ok(_) => continue,
                Err(e) => {
                    warn!("{DEVICE}: poll: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            let n = match rustix::io::read(&self.dev, &mut buf) {
                Ok(n) => n,
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => continue,
                Err(e) => {
                    warn!("{DEVICE}: read: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            // 0: the request was taken back (its object closed meanwhile).
            let Some(msg) = buf.get(..n).filter(|m| !m.is_empty()) else {
                continue;
            };
            match sys::parse(msg) {
                Ok(m) => self.handle(m),
                Err(e) => warn!("{DEVICE}: {e}; ignored"),
            }
        }
    }

    fn handle(self: &Arc<Self>, msg: sys::Message) {
        match msg {
            sys::Message::Open {
                msg_id,
                object_id,
                cookie_key,
                fd,
                ..
            } => self.open(msg_id, object_id, cookie_key, fd),
            sys::Message::Read {
                msg_id,
                object_id,
                off,
                len,
            } => self.read(msg_id, object_id, off, len),
            sys::Message::Close { object_id, .. } => self.close(object_id),
        }
    }

    fn open(self: &Arc<Self>, msg_id: u32, object: u32, name: Vec<u8>, fd: i32) {
        if fd < 0 {
            warn!("cachefiles OPEN {msg_id} for object {object} carries fd {fd}; failed");
            return self.copen_error(msg_id, libc::EBADF);
        }
        // SAFETY: the kernel installed `fd` in this process for this OPEN;
        // nothing else knows it, so it is ours to own and close.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // Installed without O_CLOEXEC: a daemon the broker starts must not
        // inherit it.
        if let Err(e) = rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC) {
            warn!("cachefiles object {object}: cannot set FD_CLOEXEC: {e}");
        }
        if name.len() > MAX_BLOB_NAME.min(self.export.slot_size() as usize) {
            return self.copen_error(msg_id, libc::ENAMETOOLONG);
        }
        let len = name.len() as u64;
        self.objects.lock().insert(
            object,
            Object {
                name: name.clone(),
                fd: Arc::new(fd),
                state: ObjectState::Opening,
            },
        );
        let sink = Arc::new(Reply {
            inner: self.clone(),
            what: What::Open { msg_id, object },
        });
        self.export.submit_blob(
            Ask {
                op: Op::Open,
                object,
                offset: 0,
                len,
            },
            Origin { sink, tag: 0 },
            Data::Heap(name.into_boxed_slice()),
        );
    }

    fn read(self: &Arc<Self>, msg_id: u32, object: u32, off: u64, len: u64) {
        let found = self
            .objects
            .lock()
            .get(&object)
            .and_then(|o| match o.state {
                ObjectState::Open { size } => Some((o.fd.clone(), size)),
                ObjectState::Opening => None,
            });
        let Some((fd, size)) = found else {
            warn!("cachefiles READ {msg_id} names object {object}, which is not open; ignored");
            return;
        };
        // The kernel rounds reads to pages; the blob ends where it ends.
        let end = off.saturating_add(len).min(size);
        let slot = u64::from(self.export.slot_size());
        let parts = end.saturating_sub(off).div_ceil(slot);
        let job = Arc::new(ReadJob {
            msg_id,
            fd,
            left: AtomicU32::new(u32::try_from(parts).unwrap_or(u32::MAX)),
            failed: AtomicBool::new(false),
        });
        if parts == 0 || u32::try_from(parts).is_err() {
            return job.finish(object);
        }
        let mut at = off;
        while at < end {
            let n = end.saturating_sub(at).min(slot);
            let sink = Arc::new(Reply {
                inner: self.clone(),
                what: What::Read {
                    job: job.clone(),
                    object,
                    offset: at,
                },
            });
            self.export.submit_blob(
                Ask {
                    op: Op::Read,
                    object,
                    offset: at,
                    len: n,
                },
                Origin { sink, tag: 0 },
                Data::None,
            );
            at = at.saturating_add(n);
        }
    }

    fn close(self: &Arc<Self>, object: u32) {
        // Dropping the fd closes the object on the kernel's side.
        if self.objects.lock().remove(&object).is_none() {
            return;
        }
        let sink = Arc::new(Reply {
            inner: self.clone(),
            what: What::Close,
        });
        self.export.submit_blob(
            Ask {
                op: Op::Close,
                object,
                offset: 0,
                len: 0,
            },
            Origin { sink, tag: 0 },
            Data::None,
        );
    }

    /// Fails OPEN `msg_id` with `errno` (positive).
    fn copen_error(&self, msg_id: u32, errno: i32) {
        self.copen(msg_id, i64::from(errno).saturating_neg());
    }

    fn copen(&self, msg_id: u32, size_or_errno: i64) {
        let cmd = sys::copen(msg_id, size_or_errno);
        if let Err(e) = command(&self.dev, &cmd) {
            // The kernel dropped the request (its object was closed).
            warn!("{DEVICE}: {cmd}: {e}");
        }
    }
}

impl Reopen for Inner {
    fn reopens(&self) -> Vec<(Ask, Origin, Data)> {
        let objects = self.objects.lock();
        objects
            .iter()
            .filter_map(|(&object, o)| {
                let ObjectState::Open { size } = o.state else {
                    // Its OPEN is still in the export's table: replayed.
                    return None;
                };
                let ask = Ask {
                    op: Op::Open,
                    object,
                    offset: 0,
                    len: o.name.len() as u64,
                };
                let sink = Arc::new(Reopened { object, size });
                let data = Data::Heap(o.name.clone().into_boxed_slice());
                Some((ask, Origin { sink, tag: 0 }, data))
            })
            .collect()
    }
}

/// The answer to an OPEN sent again to a new daemon: the kernel already
/// has the size; a different one means the blob changed under a mount.
struct Reopened {
    object: u32,
    size: u64,
}

impl ReplySink for Reopened {
    fn complete(&self, _tag: u64, _op: Op, outcome: Outcome<'_>) {
        let got = match outcome {
            Outcome::Done { data, .. } => blob_size(data.as_ref()),
            Outcome::Failed(_) => None,
        };
        if got != Some(self.size) {
            warn!(
                "cachefiles object {}: the daemon now answers {got:?} for a blob the kernel \
                 has open with {} bytes; its reads may fail",
                self.object, self.size
            );
        }
    }
}

/// One kernel READ, split into parts; answered when the last part is in.
struct ReadJob {
    msg_id: u32,
    fd: Arc<OwnedFd>,
    left: AtomicU32,
    failed: AtomicBool,
}

impl ReadJob {
    /// Tells the kernel the read is done. Data that did not arrive is not
    /// in the cache file, so the kernel fails the reader's I/O.
    fn finish(&self, object: u32) {
        // SAFETY: CACHEFILES_IOC_READ_COMPLETE takes the message id as its
        // argument value, not a pointer.
        let r = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                sys::IOC_READ_COMPLETE as libc::c_ulong,
                libc::c_ulong::from(self.msg_id),
            )
        };
        if r < 0 {
            warn!(
                "cachefiles object {object}: READ_COMPLETE {}: {}",
                self.msg_id,
                io::Error::last_os_error()
            );
        }
    }

    fn part_done(&self, object: u32, ok: bool) {
        if !ok {
            self.failed.store(true, Ordering::SeqCst);
        }
        if self.left.fetch_sub(1, Ordering::SeqCst) == 1 {
            if self.failed.load(Ordering::SeqCst) {
                warn!(
                    "cachefiles object {object}: READ {} failed; the reader gets an error",
                    self.msg_id
                );
            }
            self.finish(object);
        }
    }
}

/// What a request to the daemon was for.
enum What {
    Open {
        msg_id: u32,
        object: u32,
    },
    Read {
        job: Arc<ReadJob>,
        object: u32,
        offset: u64,
    },
    Close,
}

/// The way back to the kernel for one request.
struct Reply {
    inner: Arc<Inner>,
    what: What,
}

/// The blob size a daemon wrote at the start of an OPEN's slot buffer.
fn blob_size(data: Option<&SlotData<'_>>) -> Option<u64> {
    let d = data.filter(|d| d.len == size_of::<u64>())?;
    let size: [u8; 8] = d.region.read(d.offset)?;
    Some(u64::from_le_bytes(size)).filter(|s| i64::try_from(*s).is_ok())
}

impl ReplySink for Reply {
    fn complete(&self, _tag: u64, _op: Op, outcome: Outcome<'_>) {
        let inner = &self.inner;
        match (&self.what, outcome) {
            (What::Open { msg_id, object }, outcome) => {
                let size = match outcome {
                    Outcome::Done { data, .. } => blob_size(data.as_ref()).ok_or(libc::EIO),
                    Outcome::Failed(errno) => Err(errno),
                };
                match size {
                    Ok(size) => {
                        if let Some(o) = inner.objects.lock().get_mut(object) {
                            o.state = ObjectState::Open { size };
                        }
                        inner.copen(*msg_id, size as i64);
                    }
                    Err(errno) => {
                        // The object fails to open: give its fd back.
                        let gone = inner.objects.lock().remove(object);
                        warn!(
                            "cachefiles object {object} ({}): the daemon failed the OPEN: {}",
                            gone.map(|o| String::from_utf8_lossy(&o.name).into_owned())
                                .unwrap_or_default(),
                            io::Error::from_raw_os_error(errno)
                        );
                        inner.copen_error(*msg_id, errno);
                    }
                }
            }
            (
                What::Read {
                    job,
                    object,
                    offset,
                },
                Outcome::Done { data, .. },
            ) => {
                let ok = data.is_some_and(|d| write_part(&job.fd, &d, *offset).is_ok());
                job.part_done(*object, ok);
            }
            (What::Read { job, object, .. }, Outcome::Failed(_)) => job.part_done(*object, false),
            (What::Close, _) => {}
        }
    }
}

/// Writes a read's data from its slot into the cache file at `offset`,
/// padded with zeroes to the direct I/O alignment (only a blob's last part
/// can be short; the padding lies past the blob's end).
fn write_part(fd: &OwnedFd, d: &SlotData<'_>, offset: u64) -> io::Result<()> {
    let padded = d.len.div_ceil(CACHE_ALIGN).saturating_mul(CACHE_ALIGN);
    let pad = padded.saturating_sub(d.len);
    let zero = vec![0u8; pad];
    let tail = d.offset.checked_add(d.len);
    tail.and_then(|t| d.region.copy_in(t, &zero))
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let ptr = d
        .region
        .ptr(d.offset, padded)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut done = 0usize;
    while done < padded {
        let at = i64::try_from(offset.saturating_add(done as u64))
            .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: `ptr..ptr + padded` is inside the mapped data area.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                ptr.add(done).cast(),
                padded.saturating_sub(done),
                at,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        match usize::try_from(n) {
            Ok(0) | Err(_) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(n) => done = done.saturating_add(n),
        }
    }
    Ok(())
}
