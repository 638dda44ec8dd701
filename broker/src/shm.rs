//! The broker's view of shared memory. A daemon can write any byte of these
//! mappings at any time, so the broker never forms a Rust reference to them:
//! it reads and writes through raw pointers (volatile copies, atomics, or
//! syscalls given the address), with every offset bounds-checked here.
//! Its own ring positions (submission tail, completion head) live in
//! private memory and are only ever written to the mapping, never read back.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use holdfast_proto::shm::{Completion, NEED_WAKEUP, RingLayout, Submission, offsets};
use memmap2::{MmapOptions, MmapRaw};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// A MAP_SHARED mapping of a broker-owned, size-sealed memfd.
pub struct SharedRegion {
    map: MmapRaw,
}

impl SharedRegion {
    /// Maps `len` bytes of `fd`; the memfd must be at least that large and
    /// sealed against shrinking (see `sys::sealed_memfd`).
    pub fn map(fd: &OwnedFd, len: usize) -> io::Result<Self> {
        let map = MmapOptions::new().len(len).map_raw(fd.as_raw_fd())?;
        Ok(Self { map })
    }

    /// Address of `[offset, offset + len)`, or `None` if out of range.
    pub fn ptr(&self, offset: usize, len: usize) -> Option<*mut u8> {
        let end = offset.checked_add(len)?;
        if end > self.map.len() {
            return None;
        }
        // SAFETY: offset is within the mapping (checked above).
        Some(unsafe { self.map.as_mut_ptr().add(offset) })
    }

    fn atomic(&self, offset: usize) -> Option<&AtomicU32> {
        if !offset.is_multiple_of(align_of::<AtomicU32>()) {
            return None;
        }
        let p = self.ptr(offset, size_of::<AtomicU32>())?;
        // SAFETY: in range and aligned; atomics are the one sound way to
        // share a word with another process, and the mapping outlives `self`.
        Some(unsafe { AtomicU32::from_ptr(p.cast()) })
    }

    /// Copies a `T` out of the mapping.
    pub fn read<T: FromBytes>(&self, offset: usize) -> Option<T> {
        let p = self.ptr(offset, size_of::<T>())?;
        if !(p as usize).is_multiple_of(align_of::<T>()) {
            return None;
        }
        // SAFETY: in range and aligned (checked above); any bit pattern is a
        // valid T (FromBytes). Volatile: the daemon may write concurrently.
        Some(unsafe { std::ptr::read_volatile(p.cast::<T>()) })
    }

    /// Copies a `T` into the mapping.
    pub fn write<T: IntoBytes + Immutable>(&self, offset: usize, value: &T) -> Option<()> {
        let bytes = value.as_bytes();
        self.copy_in(offset, bytes)
    }

    /// Copies `src` into the mapping at `offset`.
    pub fn copy_in(&self, offset: usize, src: &[u8]) -> Option<()> {
        let p = self.ptr(offset, src.len())?;
        // SAFETY: destination in range; the source is private memory, so the
        // ranges cannot overlap.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
        Some(())
    }

    /// Maps in, writable, every page of `[offset, offset + len)` that is
    /// not yet (madvise(2) MADV_POPULATE_WRITE, Linux 5.14), without
    /// changing a byte. A read of /dev/fuse into a page this process has
    /// not mapped yet faults it in, and that fault stops at a pending
    /// SIGKILL: the kernel then fails the request it was copying with EIO
    /// (`fuse_dev_do_read`), where the broker's own death (an upgrade's
    /// `execve`, a crash) must leave it to be re-sent.
    pub fn populate(&self, offset: usize, len: usize) -> io::Result<()> {
        let p = self.ptr(offset, len).ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: the range is within the mapping (checked above); the
        // advice only faults pages in, it neither moves nor changes them.
        unsafe { rustix::mm::madvise(p.cast(), len, rustix::mm::Advice::LinuxPopulateWrite) }?;
        Ok(())
    }

    /// Copies `len` bytes at `offset` out of the mapping.
    pub fn copy_out(&self, offset: usize, len: usize) -> Option<Vec<u8>> {
        let mut v = Vec::new();
        self.append_to(offset, len, &mut v)?;
        Some(v)
    }

    /// Appends `len` bytes from `offset` to `out` (private memory).
    pub fn append_to(&self, offset: usize, len: usize, out: &mut Vec<u8>) -> Option<()> {
        let p = self.ptr(offset, len)?;
        out.reserve(len);
        // SAFETY: source in range; the destination is `out`'s spare
        // capacity, just reserved, which is initialised before the length
        // covers it.
        unsafe {
            std::ptr::copy_nonoverlapping(p, out.as_mut_ptr().add(out.len()), len);
            out.set_len(out.len() + len);
        }
        Some(())
    }
}

/// Why the daemon's side of a ring cannot be trusted any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingViolation {
    /// The completion tail claims more entries than the ring holds.
    CompletionTail { head: u32, tail: u32, entries: u32 },
}

impl std::fmt::Display for RingViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::CompletionTail {
                head,
                tail,
                entries,
            } => write!(
                f,
                "completion ring tail {tail} is more than {entries} entries past head {head}"
            ),
        }
    }
}

/// One attachment's rings: the broker produces submissions and consumes
/// completions.
pub struct Rings {
    region: SharedRegion,
    layout: RingLayout,
}

impl Rings {
    /// Maps the rings memfd `fd`, which the caller created with
    /// `layout.byte_len()` bytes.
    pub fn map(fd: &OwnedFd, layout: RingLayout) -> io::Result<Self> {
        Ok(Self {
            region: SharedRegion::map(fd, layout.byte_len())?,
            layout,
        })
    }

    fn word(&self, offset: usize) -> Option<&AtomicU32> {
        self.region.atomic(offset)
    }

    /// Direct mode: what the daemon's reader `i` published (untrusted).
    pub fn reader_progress(&self, i: usize) -> Option<holdfast_proto::shm::ReaderProgress> {
        self.region.read(holdfast_proto::shm::direct::reader(i)?)
    }

    /// Sets or clears NEED_WAKEUP on the completion ring (the broker is about
    /// to sleep / is awake).
    pub fn set_completion_wakeup(&self, on: bool) {
        if let Some(w) = self.word(offsets::CQ_FLAGS) {
            w.store(if on { NEED_WAKEUP } else { 0 }, Ordering::SeqCst);
        }
    }

    /// The daemon's completion tail, checked against `head` (the broker's
    /// private consumer position). Returns the number of entries to read.
    pub fn completions_ready(&self, head: u32) -> Result<u32, RingViolation> {
        let tail = self
            .word(offsets::CQ_TAIL)
            .map_or(head, |w| w.load(Ordering::SeqCst));
        let ready = tail.wrapping_sub(head);
        if ready > self.layout.entries() {
            return Err(RingViolation::CompletionTail {
                head,
                tail,
                entries: self.layout.entries(),
            });
        }
        Ok(ready)
    }

    /// Copies completion entry `index` out of the ring.
    pub fn completion(&self, index: u32) -> Completion {
        self.region
            .read::<Completion>(self.layout.completion(index))
            .unwrap_or_default()
    }

    /// Publishes the broker's completion head.
    pub fn set_completion_head(&self, head: u32) {
        if let Some(w) = self.word(offsets::CQ_HEAD) {
            w.store(head, Ordering::Release);
        }
    }

    /// Writes submission entry `index` (not yet visible to the daemon).
    pub fn put_submission(&self, index: u32, entry: &Submission) {
        let _ = self.region.write(self.layout.submission(index), entry);
    }

    /// Publishes the submission tail; returns whether the daemon asked to be
    /// woken.
    pub fn publish_submissions(&self, tail: u32) -> bool {
        if let Some(w) = self.word(offsets::SQ_TAIL) {
            w.store(tail, Ordering::SeqCst);
        }
        self.word(offsets::SQ_FLAGS)
            .is_some_and(|w| w.load(Ordering::SeqCst) & NEED_WAKEUP != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rings(entries: u32) -> (OwnedFd, Rings) {
        let layout = RingLayout::new(entries).unwrap();
        let fd = crate::sys::sealed_memfd("test", layout.byte_len()).unwrap();
        let r = Rings::map(&fd, layout).unwrap();
        (fd, r)
    }

    #[test]
    fn region_bounds() {
        let fd = crate::sys::sealed_memfd("t", 4096).unwrap();
        let r = SharedRegion::map(&fd, 4096).unwrap();
        assert!(r.ptr(4096, 0).is_some());
        assert!(r.ptr(4096, 1).is_none());
        assert!(r.ptr(usize::MAX, 2).is_none());
        assert!(r.read::<u64>(4090).is_none());
        assert!(r.read::<u64>(3).is_none());
        assert!(r.copy_in(4000, &[1; 200]).is_none());
        r.copy_in(10, &[7; 4]).unwrap();
        assert_eq!(r.copy_out(10, 4).unwrap(), vec![7; 4]);
    }

    #[test]
    fn sealed_memfd_cannot_shrink() {
        let fd = crate::sys::sealed_memfd("t", 8192).unwrap();
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
    }

    #[test]
    fn completion_tail_is_validated() {
        let (_fd, r) = rings(8);
        assert_eq!(r.completions_ready(0), Ok(0));
        r.word(offsets::CQ_TAIL).unwrap().store(8, Ordering::SeqCst);
        assert_eq!(r.completions_ready(0), Ok(8));
        r.word(offsets::CQ_TAIL).unwrap().store(9, Ordering::SeqCst);
        assert!(r.completions_ready(0).is_err());
        // Wrapping arithmetic: head near u32::MAX.
        r.word(offsets::CQ_TAIL).unwrap().store(2, Ordering::SeqCst);
        assert_eq!(r.completions_ready(u32::MAX - 1), Ok(4));
        // A tail behind the head is a violation, not a huge count.
        assert!(r.completions_ready(3).is_err());
    }

    #[test]
    fn submissions_wrap_and_publish() {
        let (_fd, r) = rings(4);
        let e = Submission {
            seq: 9,
            ..Default::default()
        };
        r.put_submission(5, &e);
        let off = RingLayout::new(4).unwrap().submission(1);
        assert_eq!(r.region.read::<Submission>(off).unwrap().seq, 9);
        assert!(!r.publish_submissions(6));
        r.word(offsets::SQ_FLAGS)
            .unwrap()
            .store(NEED_WAKEUP, Ordering::SeqCst);
        assert!(r.publish_submissions(7));
    }
}
