//! One ublk queue as its server runs it: /dev/ublkcN, the io_uring its
//! FETCH and COMMIT_AND_FETCH commands go through, and the descriptor
//! array. Whose buffers the tags use, what a request is handed to and how
//! completions come back are the caller's (the broker's pinned slots and
//! mailbox in relay mode).
//!
//! The driver requires every command of a queue to come from one task
//! (`ubq_daemon`), so a `Queue` is used by one thread only.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::{IoUring, opcode, squeue, types};
use memmap2::{Mmap, MmapOptions};
use zerocopy::{FromBytes, IntoBytes};

use super::descs_len;
use super::sys::{self, IoCmd, IoDesc};

/// `user_data` at or above this is the caller's own (tags are < 4096).
pub const USER_DATA_BASE: u64 = 1 << 32;

/// A completion as the ring gives it: `user_data` and result.
type Cqe = (u64, i32);

/// What a completion on the queue's ring is.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    /// A request is in tag `tag`'s descriptor.
    Request { tag: u16, desc: IoDesc },
    /// The queue is going away: the tag will not be used again.
    Aborted { tag: u16 },
    /// The driver refused the tag's command (a negative errno) or said
    /// something this server does not ask for.
    Refused { tag: u16, result: i32 },
    /// The caller's own submission (`user_data` ≥ `USER_DATA_BASE`).
    User { user_data: u64, result: i32 },
}

pub struct Queue {
    cdev: OwnedFd,
    ring: IoUring,
    depth: u16,
    descs: Option<Mmap>,
    /// Completions `submit_fetches` read that were not refusals: requests
    /// that came at once (a recovery another process ends may dispatch
    /// before the FETCHes' submitter looks), for the next `wait`.
    early: Vec<Cqe>,
}

impl Queue {
    /// Opens /dev/ublkc`dev_id` (waiting up to `wait` for it to appear
    /// after ADD_DEV) with a ring for `depth` tags and `extra` submissions
    /// of the caller's.
    pub fn open(dev_id: u32, depth: u16, extra: u32, wait: Duration) -> io::Result<Self> {
        if depth == 0 || depth > sys::MAX_QUEUE_DEPTH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ublk queue depth {depth} (1 to {})", sys::MAX_QUEUE_DEPTH),
            ));
        }
        let path = format!("/dev/ublkc{dev_id}");
        let end = Instant::now() + wait;
        let cdev = loop {
            match rustix::fs::open(
                path.as_str(),
                rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
            ) {
                Ok(fd) => break fd,
                Err(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(io::Error::new(e.kind(), format!("{path}: {e}"))),
            }
        };
        let entries = u32::from(depth).saturating_mul(2).saturating_add(extra);
        Ok(Self {
            cdev,
            ring: IoUring::new(entries)?,
            depth,
            descs: None,
            early: Vec::new(),
        })
    }

    pub fn depth(&self) -> u16 {
        self.depth
    }

    /// Queues FETCH_REQ for `tag` with its buffer at `addr` (the driver
    /// refuses a FETCH without one).
    pub fn fetch(&mut self, tag: u16, addr: u64) -> io::Result<()> {
        self.push_io(sys::IO_FETCH_REQ, tag, 0, addr)
    }

    /// Queues COMMIT_AND_FETCH_REQ: `result` (bytes done, or a negative
    /// errno) for the request in `tag`, which then waits for the next one.
    pub fn commit(&mut self, tag: u16, result: i32, addr: u64) -> io::Result<()> {
        self.push_io(sys::IO_COMMIT_AND_FETCH_REQ, tag, result, addr)
    }

    fn push_io(&mut self, op: u32, tag: u16, result: i32, addr: u64) -> io::Result<()> {
        if tag >= self.depth {
            return Err(io::Error::other(format!(
                "ublk tag {tag} of a queue of {}",
                self.depth
            )));
        }
        let cmd = IoCmd {
            q_id: 0,
            tag,
            result,
            addr,
        };
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(cmd.as_bytes());
        let sqe = opcode::UringCmd16::new(types::Fd(self.cdev.as_raw_fd()), op)
            .cmd(bytes)
            .build()
            .user_data(u64::from(tag));
        // SAFETY: a queue command carries only the buffer address, whose
        // memory the caller keeps for as long as the tag is fetched.
        unsafe { self.push(&sqe) }
    }

    /// Queues a poll for `fd` to be readable, completing as
    /// `Event::User { user_data, .. }` (`user_data` at or above
    /// `USER_DATA_BASE`): how a server's other threads wake the queue's
    /// (an eventfd).
    pub fn poll(&mut self, fd: BorrowedFd<'_>, user_data: u64) -> io::Result<()> {
        if user_data < USER_DATA_BASE {
            return Err(io::Error::other(format!(
                "user_data {user_data:#x} of a poll is a tag's"
            )));
        }
        let sqe = opcode::PollAdd::new(
            types::Fd(fd.as_raw_fd()),
            u32::try_from(libc::POLLIN).unwrap_or(1),
        )
        .build()
        .user_data(user_data);
        // SAFETY: a poll points at no memory (the ring holds a reference
        // to the file).
        unsafe { self.push(&sqe) }
    }

    /// Queues a submission.
    ///
    /// # Safety
    /// Whatever memory `sqe` points at must stay valid until it completes.
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> io::Result<()> {
        // SAFETY: the caller's promise, passed on.
        if unsafe { self.ring.submission().push(sqe) }.is_err() {
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(sqe) }
                .map_err(|_| io::Error::other("the ublk queue ring is full"))?;
        }
        Ok(())
    }

    /// Submits what is queued (the COMMITs before a server closes the
    /// queue), without waiting.
    pub fn submit(&mut self) -> io::Result<()> {
        self.ring.submit().map(drop)
    }

    /// Submits the FETCHes queued for every tag and fails if the driver
    /// refused any: a refusal completes at once, while an accepted FETCH
    /// completes only with a request, and START_DEV or END_USER_RECOVERY
    /// would then wait forever for the refused tag (ublk_mark_io_ready).
    /// Then `map`: in this order, a server that dies during a recovery
    /// leaves the device recoverable (6.12: kmod-notes/ublk.md, "A recovery
    /// cut short").
    pub fn submit_fetches(&mut self) -> io::Result<()> {
        self.ring.submit()?;
        let (refused, early): (Vec<Cqe>, Vec<Cqe>) = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .partition(|&(ud, res)| ud < USER_DATA_BASE && res < 0);
        self.early.extend(early);
        match refused.first() {
            None => Ok(()),
            Some(&(tag, res)) => Err(io::Error::other(format!(
                "the driver refused FETCH_REQ for {} of {} tags (tag {tag}: {}); the device \
                 cannot start",
                refused.len(),
                self.depth,
                io::Error::from_raw_os_error(res.saturating_neg())
            ))),
        }
    }

    /// Maps the descriptor array (after `submit_fetches`).
    pub fn map(&mut self) -> io::Result<()> {
        self.descs = Some(self.map_descs()?);
        Ok(())
    }

    fn map_descs(&self) -> io::Result<Mmap> {
        let len = descs_len(self.depth, rustix::param::page_size());
        // SAFETY: a read-only shared mapping of the driver's descriptor
        // array; the kernel writes it, we only read (and check) entries.
        let descs = unsafe {
            MmapOptions::new()
                .len(len)
                .offset(sys::CMD_BUF_OFFSET)
                .populate()
                .map(self.cdev.as_raw_fd())
        };
        descs.map_err(|e| io::Error::new(e.kind(), format!("mapping the descriptors: {e}")))
    }

    /// Submits what is queued, waits for at least one completion and
    /// returns what came (interrupted waits are retried).
    pub fn wait(&mut self, events: &mut Vec<Event>) -> io::Result<()> {
        let want = usize::from(self.early.is_empty());
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let mut cqes = std::mem::take(&mut self.early);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        events.extend(cqes.into_iter().map(|(ud, res)| self.event(ud, res)));
        Ok(())
    }

    fn event(&self, user_data: u64, result: i32) -> Event {
        let Ok(tag) = u16::try_from(user_data) else {
            return Event::User { user_data, result };
        };
        match result {
            sys::IO_RES_OK => Event::Request {
                tag,
                desc: self.desc(tag),
            },
            sys::IO_RES_ABORT => Event::Aborted { tag },
            result => Event::Refused { tag, result },
        }
    }

    /// Tag `tag`'s descriptor as the kernel wrote it (a default one, a
    /// read of nothing, if out of range or before `map`).
    fn desc(&self, tag: u16) -> IoDesc {
        let at = usize::from(tag).saturating_mul(size_of::<IoDesc>());
        self.descs
            .as_ref()
            .and_then(|d| d.get(at..at.saturating_add(size_of::<IoDesc>())))
            .and_then(|b| IoDesc::read_from_bytes(b).ok())
            .unwrap_or_default()
    }
}
