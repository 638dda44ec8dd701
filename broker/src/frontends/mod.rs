//! Frontends turn kernel requests into slots of an export's in-flight table
//! and complete them to the kernel when a daemon answers. One file (or
//! folder) per kernel interface.

pub mod fuse;

use std::sync::Arc;

use holdfast_proto::shm::Op;

use crate::shm::SharedRegion;

/// Where a request came from, so that exactly one reply goes back there.
#[derive(Clone)]
pub struct Origin {
    pub sink: Arc<dyn ReplySink>,
    /// The frontend's own request id (FUSE: the request's `unique`).
    pub tag: u64,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Origin({})", self.tag)
    }
}

/// Bytes of a slot buffer holding a read's result.
pub struct SlotData<'a> {
    pub region: &'a SharedRegion,
    pub offset: usize,
    pub len: usize,
}

/// How a request ended.
pub enum Outcome<'a> {
    /// Success; `data` holds a read's bytes.
    Done {
        len: u64,
        data: Option<SlotData<'a>>,
    },
    /// Failure with a positive errno.
    Failed(i32),
}

/// A frontend's way back to the kernel. Called once per request.
pub trait ReplySink: Send + Sync {
    fn complete(&self, tag: u64, op: Op, outcome: Outcome<'_>);
}
