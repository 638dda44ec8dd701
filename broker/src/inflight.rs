//! The in-flight table of one export: every request the kernel handed the
//! broker and that has not been completed to the kernel yet.
//!
//! A request is *queued* (waiting for an active daemon or a free slot) or
//! *dispatched* to the daemon of one epoch. It keeps its slot (and so its
//! write data) until it completes; a daemon loss moves its dispatched
//! requests back to the queue, flagged replayed, and the queue is ordered by
//! sequence number, so replays go out in their original order. Requests
//! submitted [`Priority::First`] (a blob export's OPENs sent again to a new
//! daemon) go before every other queued one.
//!
//! Completions from shared memory are checked here against this private
//! table: a completion must name a dispatched request by sequence number,
//! slot and epoch, with a result that fits the op.
#![cfg_attr(
    not(test),
    deny(clippy::arithmetic_side_effects, clippy::indexing_slicing)
)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Instant;

use holdfast_proto::shm::{Ask, Completion, FLAG_REPLAYED, Op, Submission};

use crate::frontends::Origin;

/// Largest errno a daemon may return (include/linux/err.h MAX_ERRNO).
const MAX_ERRNO: i32 = 4095;

/// Where a new request's data is.
pub enum Data {
    /// No data yet (reads, flushes, discards...).
    None,
    /// Already in this slot's buffer (the slot is now the request's).
    Slot(u32),
    /// Write data in private memory, waiting for a free slot.
    Heap(Box<[u8]>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    Dispatched { epoch: u64, at: Instant },
}

/// Where a request goes in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    /// Before every `Normal` request (in sequence order among themselves).
    First,
    /// In sequence order.
    Normal,
}

struct Request {
    op: Op,
    object: u32,
    priority: Priority,
    offset: u64,
    len: u64,
    origin: Origin,
    slot: Option<u32>,
    heap: Option<Box<[u8]>>,
    state: State,
    replayed: bool,
    /// When the broker took it from the kernel (its latency's start).
    arrived: Instant,
}

/// A request ready to be written to a submission ring.
pub struct Dispatch {
    pub entry: Submission,
    /// Write data the caller must copy into the slot buffer first.
    pub heap: Option<Box<[u8]>>,
}

/// A validated completion. The slot stays taken until [`Inflight::release`]
/// so that a read's data can be copied to the kernel first.
pub struct Done {
    pub origin: Origin,
    pub op: Op,
    pub slot: u32,
    pub len: u64,
    /// Bytes transferred, or a positive errno.
    pub result: Result<u64, i32>,
    /// When the broker took the request from the kernel.
    pub arrived: Instant,
}

/// A request failed by the broker itself (wait bound, operator).
pub struct Failed {
    pub origin: Origin,
    pub op: Op,
}

/// Why a completion was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejected {
    UnknownRequest {
        seq: u64,
    },
    WrongSlot {
        seq: u64,
        slot: u32,
        expected: Option<u32>,
    },
    StaleEpoch {
        seq: u64,
        epoch: u64,
        current: u64,
    },
    NotDispatched {
        seq: u64,
    },
    BadResult {
        seq: u64,
        op: Op,
        len: u64,
        result: i32,
    },
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownRequest { seq } => write!(f, "completion for unknown request {seq}"),
            Self::WrongSlot {
                seq,
                slot,
                expected,
            } => write!(
                f,
                "completion for request {seq} names slot {slot}, the request holds {expected:?}"
            ),
            Self::StaleEpoch {
                seq,
                epoch,
                current,
            } => write!(
                f,
                "completion for request {seq} carries epoch {epoch}, current is {current}"
            ),
            Self::NotDispatched { seq } => {
                write!(f, "completion for request {seq}, which was not dispatched")
            }
            Self::BadResult {
                seq,
                op,
                len,
                result,
            } => write!(
                f,
                "completion for {} request {seq} of {len} bytes has result {result}",
                op.name()
            ),
        }
    }
}

pub struct Inflight {
    free: Vec<u32>,
    /// Slots below this are pinned to a frontend (a ublk tag's buffer):
    /// never in `free`, never stolen, kept when their request completes.
    pinned: u32,
    requests: BTreeMap<u64, Request>,
    /// Queued requests in dispatch order.
    queued: BTreeSet<(Priority, u64)>,
    next_seq: u64,
    heap_bytes: usize,
}

impl Inflight {
    pub fn new(slot_count: u32) -> Self {
        Self {
            // Reversed so that slot 0 is handed out first.
            free: (0..slot_count).rev().collect(),
            pinned: 0,
            requests: BTreeMap::new(),
            queued: BTreeSet::new(),
            next_seq: 1,
            heap_bytes: 0,
        }
    }

    /// Takes a free slot (for a frontend to read a request into).
    pub fn take_slot(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Returns a slot taken with [`Self::take_slot`] or named by [`Done`];
    /// a pinned slot stays with its frontend.
    pub fn release(&mut self, slot: u32) {
        if slot >= self.pinned {
            self.free.push(slot);
        }
    }

    /// Pins slots `0..n` to the frontend for good, so that it can give
    /// their buffers to the kernel once (ublk tags). Fails if one of them
    /// is taken, or if no slot would be left for requests without data.
    pub fn pin(&mut self, n: u32) -> bool {
        let all_free = (0..n).all(|s| self.free.contains(&s));
        if self.pinned != 0 || !all_free || usize::try_from(n).is_ok_and(|n| n >= self.free.len()) {
            return false;
        }
        self.free.retain(|s| *s >= n);
        self.pinned = n;
        true
    }

    /// Bytes of write data held in private memory.
    pub fn heap_bytes(&self) -> usize {
        self.heap_bytes
    }

    /// Adds a request; it is queued until [`Self::next_dispatch`].
    pub fn submit(&mut self, op: Op, offset: u64, len: u64, origin: Origin, data: Data) -> u64 {
        self.submit_ask(Ask::volume(op, offset, len), Priority::Normal, origin, data)
    }

    /// Adds a request with its object and place in the queue.
    pub fn submit_ask(&mut self, ask: Ask, priority: Priority, origin: Origin, data: Data) -> u64 {
        let seq = self.next_seq;
        self.next_seq = self.next_seq.saturating_add(1);
        let (slot, heap) = match data {
            Data::None => (None, None),
            Data::Slot(s) => (Some(s), None),
            Data::Heap(h) => {
                self.heap_bytes = self.heap_bytes.saturating_add(h.len());
                (None, Some(h))
            }
        };
        self.requests.insert(
            seq,
            Request {
                op: ask.op,
                object: ask.object,
                priority,
                offset: ask.offset,
                len: ask.len,
                origin,
                slot,
                heap,
                state: State::Queued,
                replayed: false,
                arrived: Instant::now(),
            },
        );
        self.queued.insert((priority, seq));
        seq
    }

    /// The oldest queued request, made ready for the daemon of `epoch`, or
    /// `None` if nothing is queued or no slot can be had for it (order is
    /// kept: a later request never overtakes it).
    ///
    /// If the oldest request has no slot and none is free, it takes the slot
    /// of the latest queued request that holds one; that request's write
    /// data is moved to private memory with `to_heap(slot, len)`. Without
    /// this, requests read straight into slots while no daemon was attached
    /// could hold every slot behind a slotless one (an fsync) forever.
    pub fn next_dispatch(
        &mut self,
        epoch: u64,
        now: Instant,
        to_heap: impl FnOnce(u32, u64) -> Option<Box<[u8]>>,
    ) -> Option<Dispatch> {
        let (priority, seq) = *self.queued.first()?;
        if self.requests.get(&seq)?.slot.is_none() && self.free.is_empty() {
            self.steal_slot(to_heap)?;
        }
        let req = self.requests.get_mut(&seq)?;
        let slot = match req.slot {
            Some(s) => s,
            None => {
                let s = self.free.pop()?;
                req.slot = Some(s);
                s
            }
        };
        self.queued.remove(&(priority, seq));
        req.state = State::Dispatched { epoch, at: now };
        let heap = req.heap.take();
        if let Some(h) = &heap {
            self.heap_bytes = self.heap_bytes.saturating_sub(h.len());
        }
        Some(Dispatch {
            entry: Submission {
                seq,
                offset: req.offset,
                len: req.len,
                epoch,
                slot,
                object: req.object,
                op: req.op as u8,
                flags: if req.replayed { FLAG_REPLAYED } else { 0 },
                reserved: [0; 6],
            },
            heap,
        })
    }

    /// Frees the slot of the latest queued request holding one.
    fn steal_slot(&mut self, to_heap: impl FnOnce(u32, u64) -> Option<Box<[u8]>>) -> Option<()> {
        let (_, victim) = *self.queued.iter().rev().find(|(_, s)| {
            self.requests
                .get(s)
                .is_some_and(|r| r.slot.is_some_and(|slot| slot >= self.pinned))
        })?;
        let req = self.requests.get_mut(&victim)?;
        let slot = req.slot?;
        if req.op.carries_data() {
            let data = to_heap(slot, req.len)?;
            self.heap_bytes = self.heap_bytes.saturating_add(data.len());
            req.heap = Some(data);
        }
        req.slot = None;
        self.free.push(slot);
        Some(())
    }

    /// Removes the queued [`Priority::First`] requests: OPENs sent again to
    /// a daemon that was lost before it answered them. The next daemon is
    /// sent the current set afresh; kept, a stale copy would pile up with
    /// every loss (and go out before the reads that wait). They answer
    /// nothing in the kernel, so they are dropped unanswered.
    pub fn drop_queued_first(&mut self) -> usize {
        let stale: Vec<u64> = self
            .queued
            .iter()
            .take_while(|(p, _)| *p == Priority::First)
            .map(|(_, seq)| *seq)
            .collect();
        for seq in &stale {
            self.queued.remove(&(Priority::First, *seq));
            let Some(req) = self.requests.remove(seq) else {
                continue;
            };
            if let Some(h) = &req.heap {
                self.heap_bytes = self.heap_bytes.saturating_sub(h.len());
            }
            if let Some(slot) = req.slot {
                self.release(slot);
            }
        }
        stale.len()
    }

    /// Validates a completion from the daemon of `epoch` and removes its
    /// request. A rejected completion changes nothing.
    pub fn complete(&mut self, epoch: u64, c: &Completion) -> Result<Done, Rejected> {
        let seq = c.seq;
        let req = self
            .requests
            .get(&seq)
            .ok_or(Rejected::UnknownRequest { seq })?;
        let State::Dispatched { epoch: held_by, .. } = req.state else {
            return Err(Rejected::NotDispatched { seq });
        };
        if c.epoch != held_by || held_by != epoch {
            return Err(Rejected::StaleEpoch {
                seq,
                epoch: c.epoch,
                current: held_by,
            });
        }
        if req.slot != Some(c.slot) {
            return Err(Rejected::WrongSlot {
                seq,
                slot: c.slot,
                expected: req.slot,
            });
        }
        let result = check_result(req.op, req.len, c.result).ok_or(Rejected::BadResult {
            seq,
            op: req.op,
            len: req.len,
            result: c.result,
        })?;
        let req = self
            .requests
            .remove(&seq)
            .ok_or(Rejected::UnknownRequest { seq })?;
        Ok(Done {
            origin: req.origin,
            op: req.op,
            slot: c.slot,
            len: req.len,
            result,
            arrived: req.arrived,
        })
    }

    /// Moves every request dispatched to `epoch` back to the queue, flagged
    /// replayed. Returns how many.
    pub fn reclaim(&mut self, epoch: u64) -> usize {
        let mut n = 0usize;
        for (seq, req) in &mut self.requests {
            if matches!(req.state, State::Dispatched { epoch: e, .. } if e == epoch) {
                req.state = State::Queued;
                req.replayed = true;
                self.queued.insert((req.priority, *seq));
                n = n.saturating_add(1);
            }
        }
        n
    }

    /// Removes every queued request (to fail them) and frees their slots.
    pub fn take_queued(&mut self) -> Vec<Failed> {
        let mut out = Vec::with_capacity(self.queued.len());
        for (_, seq) in std::mem::take(&mut self.queued) {
            if let Some(req) = self.requests.remove(&seq) {
                if let Some(s) = req.slot {
                    self.free.push(s);
                }
                if let Some(h) = &req.heap {
                    self.heap_bytes = self.heap_bytes.saturating_sub(h.len());
                }
                out.push(Failed {
                    origin: req.origin,
                    op: req.op,
                });
            }
        }
        out
    }

    /// Requests waiting for dispatch.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Queued requests that an earlier daemon had and lost.
    pub fn queued_replays(&self) -> usize {
        self.queued
            .iter()
            .filter(|(_, s)| self.requests.get(s).is_some_and(|r| r.replayed))
            .count()
    }

    /// Requests dispatched to `epoch` and not completed.
    pub fn dispatched(&self, epoch: u64) -> usize {
        self.requests
            .values()
            .filter(|r| matches!(r.state, State::Dispatched { epoch: e, .. } if e == epoch))
            .count()
    }

    /// When the oldest request still dispatched was dispatched.
    pub fn oldest_dispatch(&self) -> Option<Instant> {
        self.requests
            .values()
            .filter_map(|r| match r.state {
                State::Dispatched { at, .. } => Some(at),
                State::Queued => None,
            })
            .min()
    }
}

/// Maps a daemon's result to bytes transferred or a positive errno, or
/// `None` if it does not fit the op: reads and writes transfer exactly `len`
/// bytes (the broker already clamped `len` to the export), other ops 0.
fn check_result(op: Op, len: u64, result: i32) -> Option<Result<u64, i32>> {
    if result < 0 {
        let errno = result.checked_neg()?;
        return (errno <= MAX_ERRNO).then_some(Err(errno));
    }
    let n = u64::try_from(result).ok()?;
    let expected = if op.moves_len() { len } else { 0 };
    (n == expected).then_some(Ok(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontends::{Outcome, ReplySink};
    use std::sync::Arc;

    struct Null;
    impl ReplySink for Null {
        fn complete(&self, _: u64, _: Op, _: Outcome<'_>) {}
    }

    fn origin(tag: u64) -> Origin {
        Origin {
            sink: Arc::new(Null),
            tag,
        }
    }

    fn no_heap(_: u32, _: u64) -> Option<Box<[u8]>> {
        None
    }

    fn done(d: &Dispatch, result: i32) -> Completion {
        Completion {
            seq: d.entry.seq,
            epoch: d.entry.epoch,
            slot: d.entry.slot,
            result,
        }
    }

    #[test]
    fn pinned_slots_stay_with_the_frontend() {
        let mut t = Inflight::new(4);
        assert!(!t.pin(4), "no slot would be left for requests without data");
        assert!(t.pin(2));
        assert!(!t.pin(1), "pinned once only");
        let now = Instant::now();
        // A write in pinned slot 1 and a flush, which gets an unpinned slot.
        t.submit(Op::Write, 0, 512, origin(1), Data::Slot(1));
        t.submit(Op::Flush, 0, 0, origin(2), Data::None);
        let a = t.next_dispatch(1, now, no_heap).unwrap();
        let b = t.next_dispatch(1, now, no_heap).unwrap();
        assert_eq!(a.entry.slot, 1);
        assert!(b.entry.slot >= 2);
        let d = t.complete(1, &done(&a, 512)).unwrap();
        t.release(d.slot);
        // Released, slot 1 is still not handed out.
        assert!(t.take_slot().is_some_and(|s| s >= 2));
        assert!(t.take_slot().is_none());
    }

    #[test]
    fn dispatch_in_order_and_complete() {
        let mut t = Inflight::new(4);
        let now = Instant::now();
        let s = t.take_slot().unwrap();
        t.submit(Op::Write, 0, 4096, origin(1), Data::Slot(s));
        t.submit(Op::Read, 4096, 512, origin(2), Data::None);
        let a = t.next_dispatch(1, now, no_heap).unwrap();
        let b = t.next_dispatch(1, now, no_heap).unwrap();
        assert!(t.next_dispatch(1, now, no_heap).is_none());
        assert_eq!((a.entry.seq, a.entry.slot), (1, s));
        assert_eq!(b.entry.seq, 2);
        assert_ne!(b.entry.slot, s);
        assert_eq!(t.dispatched(1), 2);
        let d = t.complete(1, &done(&b, 512)).unwrap();
        assert_eq!(d.result, Ok(512));
        assert_eq!(d.origin.tag, 2);
        t.release(d.slot);
        assert_eq!(t.dispatched(1), 1);
        // Completing twice is rejected.
        assert!(matches!(
            t.complete(1, &done(&b, 512)),
            Err(Rejected::UnknownRequest { .. })
        ));
    }

    #[test]
    fn reclaim_replays_in_original_order() {
        let mut t = Inflight::new(8);
        let now = Instant::now();
        for i in 0..5 {
            t.submit(Op::Write, i * 512, 512, origin(i), Data::None);
        }
        let ds: Vec<_> = (0..3)
            .map(|_| t.next_dispatch(1, now, no_heap).unwrap())
            .collect();
        // Daemon of epoch 1 completes the middle one, then is lost.
        let d = t.complete(1, &done(&ds[1], 512)).unwrap();
        t.release(d.slot);
        assert_eq!(t.reclaim(1), 2);
        assert_eq!(t.queued(), 4);
        assert_eq!(t.queued_replays(), 2);
        let order: Vec<_> = std::iter::from_fn(|| t.next_dispatch(2, now, no_heap))
            .map(|d| (d.entry.seq, d.entry.flags))
            .collect();
        assert_eq!(
            order,
            vec![(1, FLAG_REPLAYED), (3, FLAG_REPLAYED), (4, 0), (5, 0)]
        );
        // A late completion from epoch 1 is stale.
        assert!(matches!(
            t.complete(2, &done(&ds[0], 512)),
            Err(Rejected::StaleEpoch { .. })
        ));
    }

    #[test]
    fn slots_bound_dispatch_and_keep_order() {
        let mut t = Inflight::new(2);
        let now = Instant::now();
        for i in 0..4 {
            t.submit(Op::Read, 0, 512, origin(i), Data::None);
        }
        let a = t.next_dispatch(1, now, no_heap).unwrap();
        let _b = t.next_dispatch(1, now, no_heap).unwrap();
        assert!(t.next_dispatch(1, now, no_heap).is_none());
        let d = t.complete(1, &done(&a, 512)).unwrap();
        t.release(d.slot);
        assert_eq!(t.next_dispatch(1, now, no_heap).unwrap().entry.seq, 3);
    }

    #[test]
    fn heap_data_accounted() {
        let mut t = Inflight::new(1);
        let now = Instant::now();
        t.submit(Op::Write, 0, 3, origin(1), Data::Heap(vec![1, 2, 3].into()));
        assert_eq!(t.heap_bytes(), 3);
        let d = t.next_dispatch(1, now, no_heap).unwrap();
        assert_eq!(d.heap.as_deref(), Some(&[1u8, 2, 3][..]));
        assert_eq!(t.heap_bytes(), 0);
        t.submit(Op::Write, 0, 2, origin(2), Data::Heap(vec![1, 2].into()));
        assert_eq!(t.take_queued().len(), 1);
        assert_eq!(t.heap_bytes(), 0);
    }

    #[test]
    fn bad_completions_rejected_and_change_nothing() {
        let mut t = Inflight::new(4);
        let now = Instant::now();
        t.submit(Op::Read, 0, 4096, origin(1), Data::None);
        t.submit(Op::Flush, 0, 0, origin(2), Data::None);
        t.submit(Op::Write, 0, 512, origin(3), Data::None);
        let r = t.next_dispatch(5, now, no_heap).unwrap();
        let f = t.next_dispatch(5, now, no_heap).unwrap();
        let cases = [
            Completion {
                slot: 3,
                ..done(&r, 4096)
            },
            Completion {
                slot: u32::MAX,
                ..done(&r, 4096)
            },
            Completion {
                epoch: 4,
                ..done(&r, 4096)
            },
            Completion {
                seq: 99,
                ..done(&r, 4096)
            },
            Completion {
                seq: 3,
                slot: 0,
                epoch: 5,
                result: 512,
            },
            done(&r, 4095),
            done(&r, 4097),
            done(&r, i32::MIN),
            done(&r, -4096),
            done(&f, 1),
        ];
        for c in cases {
            assert!(t.complete(5, &c).is_err(), "{c:?}");
        }
        assert_eq!(t.dispatched(5), 2);
        assert_eq!(t.complete(5, &done(&r, -5)).unwrap().result, Err(5));
        assert_eq!(t.complete(5, &done(&f, 0)).unwrap().result, Ok(0));
    }

    #[test]
    fn a_slotless_head_takes_the_slot_of_a_later_queued_write() {
        let mut t = Inflight::new(2);
        let now = Instant::now();
        // While no daemon is attached: an fsync, then two writes read
        // straight into the only two slots.
        t.submit(Op::Flush, 0, 0, origin(1), Data::None);
        let a = t.take_slot().unwrap();
        let b = t.take_slot().unwrap();
        t.submit(Op::Write, 0, 512, origin(2), Data::Slot(a));
        t.submit(Op::Write, 512, 512, origin(3), Data::Slot(b));
        let mut moved = None;
        let f = t
            .next_dispatch(1, now, |slot, len| {
                moved = Some((slot, len));
                Some(vec![7u8; len as usize].into())
            })
            .expect("the fsync must not wait forever");
        assert_eq!(f.entry.seq, 1);
        // The latest queued write gave up its slot; its data is on the heap.
        assert_eq!(moved, Some((b, 512)));
        assert_eq!(f.entry.slot, b);
        assert_eq!(t.heap_bytes(), 512);
        let w2 = t.next_dispatch(1, now, no_heap).unwrap();
        assert_eq!((w2.entry.seq, w2.entry.slot), (2, a));
        // The third waits for a slot, then gets its data back from the heap.
        assert!(t.next_dispatch(1, now, no_heap).is_none());
        let d = t.complete(1, &done(&f, 0)).unwrap();
        t.release(d.slot);
        let w3 = t.next_dispatch(1, now, no_heap).unwrap();
        assert_eq!(w3.entry.seq, 3);
        assert_eq!(w3.heap.as_deref(), Some(&[7u8; 512][..]));
    }

    #[test]
    fn take_queued_frees_slots() {
        let mut t = Inflight::new(1);
        let s = t.take_slot().unwrap();
        t.submit(Op::Write, 0, 512, origin(1), Data::Slot(s));
        assert!(t.take_slot().is_none());
        assert_eq!(t.take_queued().len(), 1);
        assert!(t.take_slot().is_some());
    }

    /// A blob export's OPENs sent again to a new daemon go before the
    /// replays (a lost daemon's are dropped, for the next daemon's fresh
    /// set); an OPEN's completion reports 0, and its name survives a stolen
    /// slot.
    #[test]
    fn first_priority_opens_go_before_replays() {
        let mut t = Inflight::new(2);
        let now = Instant::now();
        let read = |object, offset| Ask {
            op: Op::Read,
            object,
            offset,
            len: 4096,
        };
        t.submit_ask(read(5, 0), Priority::Normal, origin(1), Data::None);
        let r = t.next_dispatch(1, now, no_heap).unwrap();
        assert_eq!((r.entry.object, r.entry.op), (5, Op::Read as u8));
        assert_eq!(t.reclaim(1), 1);
        let open = Ask {
            op: Op::Open,
            object: 5,
            offset: 0,
            len: 3,
        };
        t.submit_ask(
            open,
            Priority::First,
            origin(2),
            Data::Heap(b"img".to_vec().into()),
        );
        let o = t.next_dispatch(2, now, no_heap).unwrap();
        assert_eq!(o.entry.op, Op::Open as u8);
        assert_eq!(o.heap.as_deref(), Some(&b"img"[..]));
        assert!(
            t.complete(2, &done(&o, 3)).is_err(),
            "an OPEN moves no bytes"
        );
        // Lost again: the stale OPEN is dropped (with its slot) and the
        // fresh one sent to the next daemon goes first; only one of each.
        assert_eq!(t.reclaim(2), 1);
        assert_eq!(t.drop_queued_first(), 1);
        assert_eq!(t.queued(), 1, "the read waits");
        let freed = t.take_slot().expect("the stale OPEN's slot is free again");
        t.release(freed);
        t.submit_ask(
            open,
            Priority::First,
            origin(6),
            Data::Heap(b"img".to_vec().into()),
        );
        let o = t.next_dispatch(3, now, no_heap).unwrap();
        assert_eq!(o.entry.op, Op::Open as u8);
        let r = t.next_dispatch(3, now, no_heap).unwrap();
        assert_eq!((r.entry.op, r.entry.flags), (Op::Read as u8, FLAG_REPLAYED));
        let d = t.complete(3, &done(&o, 0)).unwrap();
        assert_eq!((d.op, d.result), (Op::Open, Ok(0)));

        // A queued OPEN holding a slot gives it up to an older request
        // without one, and keeps its name.
        let mut t = Inflight::new(1);
        t.submit(Op::Flush, 0, 0, origin(4), Data::None);
        let s = t.take_slot().unwrap();
        t.submit_ask(open, Priority::Normal, origin(5), Data::Slot(s));
        let copied = |_: u32, len: u64| Some(vec![7u8; len as usize].into_boxed_slice());
        let f = t.next_dispatch(1, now, copied).unwrap();
        assert_eq!(f.entry.op, Op::Flush as u8);
        let d = t.complete(1, &done(&f, 0)).unwrap();
        t.release(d.slot);
        let o = t.next_dispatch(1, now, no_heap).unwrap();
        assert_eq!(o.heap.as_deref(), Some(&[7u8; 3][..]));
        assert_eq!(o.entry.op, Op::Open as u8);
    }
}
