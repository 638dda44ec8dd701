//! Shared-memory layout between the broker and one attached daemon.
//!
//! Two memfds, both created and owned by the broker:
//!
//! * the **rings** memfd, one per attachment: a submission ring (broker →
//!   daemon) and a completion ring (daemon → broker), each an SPSC ring of
//!   `slot_count` entries with free-running u32 head and tail indices on
//!   their own cache lines. A fresh rings memfd per attachment means a fenced
//!   daemon's mapping can never touch its successor's rings.
//! * the **data** memfd, one per export, lasting as long as the broker: slot
//!   `i`'s buffer is bytes `[i * slot_size, (i + 1) * slot_size)`. Write data
//!   waits there while no daemon is attached, so a daemon crash loses nothing.
//!
//! Wake-ups: each ring has a flags word. A consumer about to sleep sets
//! [`NEED_WAKEUP`] (SeqCst), re-checks the tail, then polls its kick pipe;
//! a producer publishes its tail (SeqCst) and writes the pipe only if the
//! flag is set. A busy peer costs no syscall. (Pipes, not eventfds, so that
//! each side owns the file description it writes through: see
//! `attach_fds` in `control`.)
//!
//! Everything a daemon writes here is untrusted by the broker: indices,
//! slots, sequence numbers and results are validated against the broker's
//! private table before they are acted on.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Byte offsets of the ring indices in the rings memfd (one cache line each).
pub mod offsets {
    /// Submission ring head: written by the daemon (consumer).
    pub const SQ_HEAD: usize = 0;
    /// Submission ring tail: written by the broker (producer).
    pub const SQ_TAIL: usize = 64;
    /// Submission ring flags: written by the daemon ([`super::NEED_WAKEUP`]).
    pub const SQ_FLAGS: usize = 128;
    /// Completion ring head: written by the broker (consumer).
    pub const CQ_HEAD: usize = 192;
    /// Completion ring tail: written by the daemon (producer).
    pub const CQ_TAIL: usize = 256;
    /// Completion ring flags: written by the broker ([`super::NEED_WAKEUP`]).
    pub const CQ_FLAGS: usize = 320;
    /// First submission entry.
    pub const ENTRIES: usize = 384;
}

/// Ring flag: the consumer is about to sleep on its kick pipe.
pub const NEED_WAKEUP: u32 = 1;

/// Direct mode's use of the rings memfd, whose rings it does not use: from
/// [`offsets::ENTRIES`], one [`ReaderProgress`] per lent FUSE descriptor,
/// written by the daemon's reader on it (on ublk, one, written by the
/// daemon's queue thread), read by the broker for status and to see a hung
/// daemon (`DirectTerms::meters`). Every ring layout has room for them
/// ([`RingLayout::byte_len`]).
pub mod direct {
    use super::offsets;

    /// Offset of reader `i`'s progress.
    pub fn reader(i: usize) -> Option<usize> {
        (i < crate::MAX_DIRECT_CONNS as usize)
            .then(|| offsets::ENTRIES.saturating_add(i.saturating_mul(READER_SIZE)))
    }

    /// Bytes of one reader's progress (its own cache line).
    pub const READER_SIZE: usize = 64;
    /// End of the last reader's progress.
    pub const END: usize = offsets::ENTRIES + crate::MAX_DIRECT_CONNS as usize * READER_SIZE;
}

/// One direct-mode reader's progress: u64 words, each written by the
/// reader alone. Untrusted by the broker: figures for status, and a
/// timestamp that can only make it declare the daemon lost sooner.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct ReaderProgress {
    /// CLOCK_MONOTONIC in ns when the reader took the request it holds; 0
    /// while it holds none.
    pub busy_since_ns: u64,
    /// Requests answered.
    pub answered: u64,
    /// Of those, requests the kernel had re-sent.
    pub resent: u64,
    /// Replies the kernel refused (the request had been re-sent meanwhile).
    pub refused: u64,
}

/// Most slots an export can have.
pub const MAX_SLOTS: u32 = 4096;
/// Largest slot buffer, in bytes.
pub const MAX_SLOT_SIZE: u32 = 16 << 20;
/// Slot buffers are whole pages so daemons can use them for O_DIRECT I/O.
pub const SLOT_ALIGN: u32 = 4096;

/// Operation of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Read `len` bytes at `offset` into the slot buffer.
    Read = 1,
    /// Write `len` bytes from the slot buffer at `offset`.
    Write = 2,
    /// Make every completed write durable (fdatasync).
    Flush = 3,
    /// Deallocate `[offset, offset + len)`; it reads back as zeroes.
    Discard = 4,
    /// Make `[offset, offset + len)` read back as zeroes.
    WriteZeroes = 5,
    /// Allocate backing space for `[offset, offset + len)`.
    Allocate = 6,
    /// Blob exports: blob `object` is opened. The slot buffer holds its
    /// name (`len` bytes; cachefiles: the cookie key). The daemon writes
    /// the blob's size in bytes as a little-endian u64 at the start of the
    /// slot buffer and completes with 0, or fails with a negative errno.
    /// Sent again for every open blob before anything else to each new
    /// daemon of the export, so a daemon learns every blob it is asked for.
    Open = 7,
    /// Blob exports: blob `object` is closed; its number may be reused.
    Close = 8,
}

impl Op {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Read,
            2 => Self::Write,
            3 => Self::Flush,
            4 => Self::Discard,
            5 => Self::WriteZeroes,
            6 => Self::Allocate,
            7 => Self::Open,
            8 => Self::Close,
            _ => return None,
        })
    }

    /// Whether the op uses the slot buffer.
    pub fn uses_buffer(self) -> bool {
        matches!(self, Self::Read | Self::Write | Self::Open)
    }

    /// Whether a successful completion reports `len` bytes moved (reads and
    /// writes) rather than 0.
    pub fn moves_len(self) -> bool {
        matches!(self, Self::Read | Self::Write)
    }

    /// Whether the slot buffer holds data for the daemon when dispatched.
    pub fn carries_data(self) -> bool {
        matches!(self, Self::Write | Self::Open)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Flush => "flush",
            Self::Discard => "discard",
            Self::WriteZeroes => "write-zeroes",
            Self::Allocate => "allocate",
            Self::Open => "open",
            Self::Close => "close",
        }
    }
}

/// What a request asks of a daemon: a submission without the broker's
/// bookkeeping (sequence number, epoch, slot, flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub op: Op,
    /// Blob exports: the blob; volume exports: 0.
    pub object: u32,
    pub offset: u64,
    pub len: u64,
}

impl Ask {
    /// A request on a volume export.
    pub fn volume(op: Op, offset: u64, len: u64) -> Self {
        Self {
            op,
            object: 0,
            offset,
            len,
        }
    }
}

/// Submission flag: this request was dispatched to an earlier daemon that
/// was lost before completing it.
pub const FLAG_REPLAYED: u8 = 1 << 0;

/// A submission ring entry (broker → daemon).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct Submission {
    /// Request sequence number: unique per export, increasing in arrival
    /// order; the completion echoes it.
    pub seq: u64,
    /// Byte offset in the export (blob exports: in blob `object`).
    pub offset: u64,
    /// Length in bytes (at most `slot_size` for reads and writes).
    pub len: u64,
    /// Epoch of the attachment this was dispatched to; echoed in the completion.
    pub epoch: u64,
    /// Slot index; for reads and writes, the data is in this slot's buffer.
    pub slot: u32,
    /// Blob exports: the blob (cachefiles: the kernel's object id, named
    /// by an earlier [`Op::Open`]). Volume exports: 0.
    pub object: u32,
    /// An [`Op`] as u8.
    pub op: u8,
    /// [`FLAG_REPLAYED`] and future flags.
    pub flags: u8,
    pub reserved: [u8; 6],
}

/// A completion ring entry (daemon → broker).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct Completion {
    /// The submission's `seq`.
    pub seq: u64,
    /// The submission's `epoch`.
    pub epoch: u64,
    /// The submission's `slot`.
    pub slot: u32,
    /// Bytes transferred (reads and writes: must equal `len`; others: 0), or
    /// a negative errno.
    pub result: i32,
}

pub const SUBMISSION_SIZE: usize = size_of::<Submission>();
pub const COMPLETION_SIZE: usize = size_of::<Completion>();
const _: () = assert!(SUBMISSION_SIZE == 48 && COMPLETION_SIZE == 24);

/// Geometry of the rings memfd for a given number of entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    entries: u32,
}

impl RingLayout {
    /// `entries` must be a power of two from 1 to [`MAX_SLOTS`].
    pub fn new(entries: u32) -> Option<Self> {
        (entries.is_power_of_two() && entries <= MAX_SLOTS).then_some(Self { entries })
    }

    pub fn entries(self) -> u32 {
        self.entries
    }

    /// Index mask for the free-running head and tail.
    pub fn mask(self) -> u32 {
        self.entries.wrapping_sub(1)
    }

    fn entries_usize(self) -> usize {
        self.entries as usize
    }

    /// Offset of submission entry `index & mask`.
    pub fn submission(self, index: u32) -> usize {
        let i = (index & self.mask()) as usize;
        offsets::ENTRIES.saturating_add(i.saturating_mul(SUBMISSION_SIZE))
    }

    fn cq_base(self) -> usize {
        offsets::ENTRIES.saturating_add(self.entries_usize().saturating_mul(SUBMISSION_SIZE))
    }

    /// Offset of completion entry `index & mask`.
    pub fn completion(self, index: u32) -> usize {
        let i = (index & self.mask()) as usize;
        self.cq_base()
            .saturating_add(i.saturating_mul(COMPLETION_SIZE))
    }

    /// Size of the rings memfd in bytes, rounded up to a page.
    pub fn byte_len(self) -> usize {
        let end = self
            .cq_base()
            .saturating_add(self.entries_usize().saturating_mul(COMPLETION_SIZE))
            .max(direct::END);
        end.div_ceil(4096).saturating_mul(4096)
    }
}

/// Geometry of an export's data memfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataLayout {
    slot_count: u32,
    slot_size: u32,
}

impl DataLayout {
    /// `slot_count` as for [`RingLayout::new`]; `slot_size` a multiple of
    /// [`SLOT_ALIGN`] from [`SLOT_ALIGN`] to [`MAX_SLOT_SIZE`].
    pub fn new(slot_count: u32, slot_size: u32) -> Option<Self> {
        let ok = RingLayout::new(slot_count).is_some()
            && (SLOT_ALIGN..=MAX_SLOT_SIZE).contains(&slot_size)
            && slot_size.is_multiple_of(SLOT_ALIGN);
        ok.then_some(Self {
            slot_count,
            slot_size,
        })
    }

    pub fn slot_count(self) -> u32 {
        self.slot_count
    }

    pub fn slot_size(self) -> u32 {
        self.slot_size
    }

    /// Byte offset of slot `slot`'s buffer, or `None` if out of range.
    pub fn slot_offset(self, slot: u32) -> Option<usize> {
        (slot < self.slot_count).then(|| (slot as usize).saturating_mul(self.slot_size as usize))
    }

    /// Size of the data memfd in bytes (at most 64 GiB by the bounds above).
    pub fn byte_len(self) -> usize {
        (self.slot_count as usize).saturating_mul(self.slot_size as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_layout() {
        assert!(RingLayout::new(0).is_none());
        assert!(RingLayout::new(3).is_none());
        assert!(RingLayout::new(MAX_SLOTS * 2).is_none());
        let l = RingLayout::new(64).unwrap();
        assert_eq!(l.submission(0), offsets::ENTRIES);
        assert_eq!(l.submission(65), offsets::ENTRIES + SUBMISSION_SIZE);
        assert_eq!(l.completion(0), offsets::ENTRIES + 64 * SUBMISSION_SIZE);
        assert!(l.completion(63) + COMPLETION_SIZE <= l.byte_len());
        assert_eq!(l.byte_len() % 4096, 0);
        let max = RingLayout::new(MAX_SLOTS).unwrap();
        assert!(max.completion(u32::MAX) + COMPLETION_SIZE <= max.byte_len());
    }

    #[test]
    fn data_layout() {
        assert!(DataLayout::new(64, 1000).is_none());
        assert!(DataLayout::new(64, MAX_SLOT_SIZE * 2).is_none());
        let d = DataLayout::new(64, 1 << 20).unwrap();
        assert_eq!(d.slot_offset(1), Some(1 << 20));
        assert_eq!(d.slot_offset(64), None);
        assert_eq!(d.byte_len(), 64 << 20);
    }

    #[test]
    fn entries_round_trip_through_bytes() {
        let s = Submission {
            seq: 1,
            offset: 2,
            len: 3,
            epoch: 4,
            slot: 5,
            op: Op::Write as u8,
            flags: FLAG_REPLAYED,
            object: 6,
            reserved: [0; 6],
        };
        assert_eq!(Submission::read_from_bytes(s.as_bytes()).unwrap(), s);
        for v in 0..=255u8 {
            assert_eq!(
                Op::from_u8(v).map(|o| o as u8),
                (1..=8).contains(&v).then_some(v)
            );
        }
    }
}
