//! The daemon's side of an attachment: the rings and the data area the
//! broker passed with ATTACHED (layout in `holdfast_proto::shm`). The daemon
//! consumes submissions and produces completions.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use holdfast_proto::control::attach_fds;
use holdfast_proto::shm::{
    Completion, DataLayout, NEED_WAKEUP, Op, RingLayout, Submission, offsets,
};
use holdfast_proto::{Attached, ExportKind};
use memmap2::{MmapOptions, MmapRaw};

use crate::Error;

/// A mapped attachment.
pub struct Attachment {
    pub geometry: Attached,
    rings: MmapRaw,
    data: MmapRaw,
    layout: RingLayout,
    data_layout: DataLayout,
    submit_kick: OwnedFd,
    complete_kick: OwnedFd,
    /// Direct mode: the FUSE descriptors the broker lent.
    lent: Vec<OwnedFd>,
}

fn map(fd: &OwnedFd, len: usize, what: &str) -> Result<MmapRaw, Error> {
    let st = rustix::fs::fstat(fd).map_err(|e| Error::io(format!("fstat {what}"), e.into()))?;
    if u64::try_from(st.st_size).unwrap_or(0) < len as u64 {
        return Err(Error::Protocol(format!(
            "the broker's {what} memfd is {} bytes, {len} expected",
            st.st_size
        )));
    }
    MmapOptions::new()
        .len(len)
        .map_raw(fd.as_raw_fd())
        .map_err(|e| Error::io(format!("cannot map the {what}"), e))
}

impl Attachment {
    /// Direct mode's FUSE descriptors (empty in relay mode, and after the
    /// first call).
    pub fn take_lent(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.lent)
    }

    /// Maps the descriptors of an ATTACHED reply after checking the geometry.
    pub fn new(geometry: Attached, mut fds: Vec<OwnedFd>) -> Result<Self, Error> {
        let conns = geometry.direct.map_or(0, |d| d.conns() as usize);
        if fds.len() != attach_fds::COUNT + conns {
            return Err(Error::Protocol(format!(
                "ATTACHED carried {} descriptors, {} expected",
                fds.len(),
                attach_fds::COUNT + conns
            )));
        }
        let lent = fds.split_off(attach_fds::COUNT);
        let layout = RingLayout::new(geometry.slot_count);
        let data_layout = DataLayout::new(geometry.slot_count, geometry.slot_size);
        let (Some(layout), Some(data_layout)) = (layout, data_layout) else {
            return Err(Error::Protocol(format!(
                "bad geometry from the broker: {} slots of {} bytes",
                geometry.slot_count, geometry.slot_size
            )));
        };
        // Taken from the back so indices stay valid.
        let complete_kick = fds.remove(attach_fds::COMPLETE_KICK);
        let submit_kick = fds.remove(attach_fds::SUBMIT_KICK);
        let data_fd = fds.remove(attach_fds::DATA);
        let rings_fd = fds.remove(attach_fds::RINGS);
        // Draining and kicking must never block the I/O loop.
        for fd in [&submit_kick, &complete_kick] {
            rustix::io::ioctl_fionbio(fd, true)
                .map_err(|e| Error::io("cannot make a kick pipe non-blocking", e.into()))?;
        }
        Ok(Self {
            geometry,
            rings: map(&rings_fd, layout.byte_len(), "rings")?,
            data: map(&data_fd, data_layout.byte_len(), "data area")?,
            layout,
            data_layout,
            submit_kick,
            complete_kick,
            lent,
        })
    }

    fn word(&self, offset: usize) -> &AtomicU32 {
        debug_assert!(offset + 4 <= self.rings.len() && offset.is_multiple_of(4));
        // SAFETY: the ring index offsets are fixed, aligned and inside the
        // mapping (RingLayout guarantees ENTRIES > CQ_FLAGS), which lives as
        // long as `self`.
        unsafe { AtomicU32::from_ptr(self.rings.as_mut_ptr().add(offset).cast()) }
    }

    /// Direct mode: where reader `i` publishes its progress in the rings
    /// memfd (`holdfast_proto::shm::direct`), 64-byte aligned, inside the
    /// mapping, which lives as long as `self`.
    pub fn direct_progress(&self, i: usize) -> Option<*mut u8> {
        let off = holdfast_proto::shm::direct::reader(i)?;
        let end = off.checked_add(holdfast_proto::shm::direct::READER_SIZE)?;
        // SAFETY: `off` is inside the mapping (checked just above).
        (end <= self.rings.len()).then(|| unsafe { self.rings.as_mut_ptr().add(off) })
    }

    /// The pipe the broker writes to when it submits.
    pub fn submit_kick(&self) -> BorrowedFd<'_> {
        self.submit_kick.as_fd()
    }

    /// The broker's published submission tail.
    pub fn submission_tail(&self) -> u32 {
        self.word(offsets::SQ_TAIL).load(Ordering::SeqCst)
    }

    /// Copies submission entry `index` out of the ring.
    pub fn submission(&self, index: u32) -> Submission {
        let off = self.layout.submission(index);
        // SAFETY: RingLayout keeps every entry inside the mapping, aligned to 8.
        unsafe { std::ptr::read_volatile(self.rings.as_ptr().add(off).cast::<Submission>()) }
    }

    /// Publishes how far the daemon has consumed submissions.
    pub fn set_submission_head(&self, head: u32) {
        self.word(offsets::SQ_HEAD).store(head, Ordering::Release);
    }

    /// Sets or clears NEED_WAKEUP on the submission ring.
    pub fn set_submission_wakeup(&self, on: bool) {
        self.word(offsets::SQ_FLAGS)
            .store(if on { NEED_WAKEUP } else { 0 }, Ordering::SeqCst);
    }

    /// Writes completion entry `index` (not yet published).
    pub fn put_completion(&self, index: u32, c: &Completion) {
        let off = self.layout.completion(index);
        // SAFETY: as for `submission`.
        unsafe {
            std::ptr::write_volatile(self.rings.as_mut_ptr().add(off).cast::<Completion>(), *c)
        }
    }

    /// Publishes the completion tail and wakes the broker if it asked.
    pub fn publish_completions(&self, tail: u32) {
        self.word(offsets::CQ_TAIL).store(tail, Ordering::SeqCst);
        if self.word(offsets::CQ_FLAGS).load(Ordering::SeqCst) & NEED_WAKEUP != 0 {
            // A full pipe (EAGAIN) is a wake-up already pending.
            let _ = rustix::io::write(&self.complete_kick, &[1u8]);
        }
    }

    /// Checks a submission against the geometry; returns the op and, for
    /// the ops that use it, the slot buffer's address and length (an
    /// OPEN's: the whole slot, the name being its first `len` bytes).
    pub fn check(&self, s: &Submission) -> Option<(Op, Option<(*mut u8, usize)>)> {
        let op = Op::from_u8(s.op)?;
        let end = s.offset.checked_add(s.len)?;
        let blobs = self.geometry.kind == ExportKind::Blobs;
        let allowed = match op {
            Op::Read => true,
            Op::Open | Op::Close => blobs,
            _ => !blobs,
        };
        // A blob's size is the daemon's own answer; the broker clamps to it.
        if !allowed || (!blobs && end > self.geometry.size) {
            return None;
        }
        if !op.uses_buffer() {
            return Some((op, None));
        }
        let slot_size = self.data_layout.slot_size() as usize;
        let len = usize::try_from(s.len).ok()?;
        if len > slot_size {
            return None;
        }
        let len = if op == Op::Open { slot_size } else { len };
        let off = self.data_layout.slot_offset(s.slot)?;
        // SAFETY: slot_offset + slot_size is inside the mapping.
        let ptr = unsafe { self.data.as_mut_ptr().add(off) };
        Some((op, Some((ptr, len))))
    }
}
