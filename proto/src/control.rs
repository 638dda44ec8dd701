//! Control messages on the broker's SOCK_SEQPACKET socket: one message per
//! packet, file descriptors in SCM_RIGHTS ancillary data.
//!
//! Every message starts with a frame header: magic (u32), frame version (u16)
//! and kind (u16), little-endian, followed by the kind's fields.
//!
//! A session starts with HELLO. A daemon then sends ATTACH, recovers its own
//! state (fd store, lease), and sends RESTORE, after which the broker
//! dispatches pending requests (flagged REPLAYED) and then new ones.
//!
//! A planned handoff (see [`crate::handoff`]) adds PREPARE, READY and
//! QUIESCED from daemons, HANDOFF from the operator, and the notices
//! QUIESCE, ACTIVATE and REVIVE that the broker sends a daemon unasked.

use crate::error::{ErrorCode, ErrorReply};
use crate::handoff::{HandoffProgress, HandoffReport, HandoffRequest};
use crate::report::Figures;
use crate::upgrade::UpgradeReport;
use crate::wire::{DecodeError, Reader, Writer};
use crate::{MAX_DEVICE_LEN, MAX_NAME_LEN, MAX_TEXT_LEN, PROTOCOL_VERSION};

/// First four bytes of every control message: "HFCT".
pub const MAGIC: u32 = u32::from_le_bytes(*b"HFCT");

/// Order of the descriptors passed with [`Reply::Attached`].
pub mod attach_fds {
    /// memfd holding this attachment's submission and completion rings.
    pub const RINGS: usize = 0;
    /// memfd holding the export's slot buffers (the data area).
    pub const DATA: usize = 1;
    /// Read end of a pipe the broker writes to when it submits and the
    /// daemon asked to be woken. Read and discard to reset it.
    pub const SUBMIT_KICK: usize = 2;
    /// Write end of a pipe the daemon writes (any bytes) to when it
    /// completes and the broker asked to be woken. Closing it while attached
    /// is a protocol violation.
    pub const COMPLETE_KICK: usize = 3;
    /// Number of descriptors.
    pub const COUNT: usize = 4;
}

mod kind {
    pub const HELLO: u16 = 0x0001;
    pub const ATTACH: u16 = 0x0002;
    pub const RESTORE: u16 = 0x0003;
    pub const DETACH: u16 = 0x0004;
    pub const STATUS: u16 = 0x0005;
    pub const OPERATOR_RESTORE: u16 = 0x0006;
    pub const FD_PUT: u16 = 0x0007;
    pub const FD_GET: u16 = 0x0008;
    pub const PREPARE: u16 = 0x0009;
    pub const READY: u16 = 0x000a;
    pub const QUIESCED: u16 = 0x000b;
    pub const HANDOFF: u16 = 0x000c;
    pub const EXPORT_ADD: u16 = 0x000d;
    pub const EXPORT_REMOVE: u16 = 0x000e;
    pub const BROKER_UPGRADE: u16 = 0x000f;
    pub const METRICS: u16 = 0x0010;
    pub const REPORT: u16 = 0x0011;

    pub const HELLO_OK: u16 = 0x8001;
    pub const ATTACHED: u16 = 0x8002;
    pub const RESTORED: u16 = 0x8003;
    pub const DETACHED: u16 = 0x8004;
    pub const STATUS_OK: u16 = 0x8005;
    pub const OPERATOR_RESTORED: u16 = 0x8006;
    pub const FD_STORED: u16 = 0x8007;
    pub const FD: u16 = 0x8008;
    pub const HANDOFF_ARMED: u16 = 0x8009;
    pub const HANDOFF_DONE: u16 = 0x800a;
    pub const QUIESCE: u16 = 0x800b;
    pub const ACTIVATE: u16 = 0x800c;
    pub const REVIVE: u16 = 0x800d;
    pub const EXPORT_ADDED: u16 = 0x800e;
    pub const EXPORT_REMOVED: u16 = 0x800f;
    pub const BROKER_UPGRADED: u16 = 0x8010;
    pub const METRICS_TEXT: u16 = 0x8011;
    pub const ERROR: u16 = 0x80ff;
}

/// HELLO: the first message of every session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the peer speaks.
    pub version: u16,
    /// Capability bits ([`crate::caps`]).
    pub caps: u64,
    /// The peer's pid as it sees it. The broker trusts SO_PEERCRED, not this.
    pub pid: u32,
}

/// ATTACH: become the daemon of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attach {
    pub export: String,
    /// Fence the export's current daemon instead of being refused as busy.
    pub takeover: bool,
    /// The daemon can serve the export's kernel queue itself ([`Mode::Direct`]);
    /// the broker says in ATTACHED which mode it gets.
    pub direct: bool,
}

/// How a daemon gets an export's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Through the broker's in-flight table and the shared rings.
    Relay = 1,
    /// From the kernel, on descriptors the broker lends it and keeps a
    /// reference to (FUSE: FUSE_NOTIFY_RESEND replays a lost daemon's).
    Direct = 2,
}

impl Mode {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Relay),
            2 => Some(Self::Direct),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Direct => "direct",
        }
    }
}

/// Most FUSE descriptors a direct-mode daemon is lent.
pub const MAX_DIRECT_CONNS: u32 = 64;

/// What a direct-mode daemon needs to serve the export's kernel queue,
/// sent with ATTACHED: one kind per frontend that can lend its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectTerms {
    Fuse(FuseTerms),
    Ublk(UblkTerms),
}

impl DirectTerms {
    /// FUSE descriptors passed after the [`attach_fds`] ones.
    pub fn conns(&self) -> u32 {
        match self {
            Self::Fuse(f) => f.conns,
            Self::Ublk(_) => 0,
        }
    }

    /// How many progress records (`shm::direct`) the daemon publishes: one
    /// per FUSE descriptor, one for a ublk queue.
    pub fn meters(&self) -> u32 {
        match self {
            Self::Fuse(f) => f.conns,
            Self::Ublk(_) => 1,
        }
    }
}

/// Direct mode on a FUSE export: what the broker's INIT negotiated and the
/// shape of the file system, so that both answer alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FuseTerms {
    /// The kernel's FUSE protocol minor version.
    pub minor: u32,
    /// INIT's flags (flags2 in the high half).
    pub flags: u64,
    /// Largest request data in bytes (INIT's max_write and max_readahead).
    pub max_io: u32,
    /// INIT's max_background.
    pub max_background: u16,
    /// When the file system was mounted (its files' times), Unix seconds.
    pub started: u64,
    /// FUSE descriptors passed after the [`attach_fds`] ones, 1 to
    /// [`MAX_DIRECT_CONNS`].
    pub conns: u32,
}

/// Most tags of a ublk queue (`UBLK_MAX_QUEUE_DEPTH`, linux/ublk_cmd.h).
pub const MAX_UBLK_DEPTH: u16 = 4096;
/// Largest ublk tag buffer a daemon is asked to map (64 MiB: far above
/// any `max_io_buf_bytes` the broker sets).
pub const MAX_UBLK_BUF: u32 = 64 << 20;

/// Direct mode on a ublk export: the device whose queue the daemon opens
/// (/dev/ublkcN) and serves; the broker keeps its control side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UblkTerms {
    pub dev_id: u32,
    /// Tags of the device's one queue, 1 to [`MAX_UBLK_DEPTH`].
    pub depth: u16,
    /// Bytes of a tag's buffer (the device's `max_io_buf_bytes`), 1 to
    /// [`MAX_UBLK_BUF`].
    pub buf_size: u32,
}

/// EXPORT_ADD: the operator adds an export to a running broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportAdd {
    pub name: String,
    /// Bytes; a multiple of the broker's block size.
    pub size: u64,
    /// Also give the export a block device (a loop device over its file).
    pub block: bool,
    /// Serve it through ublk (a `/dev/ublkbN` the broker owns) instead of
    /// FUSE.
    pub ublk: bool,
    /// Daemons that can may serve it in direct mode (FUSE only).
    pub direct: bool,
    /// A daemon command line for the broker to supervise for it (empty:
    /// none), at most [`MAX_TEXT_LEN`] bytes.
    pub daemon: String,
}

/// A message a client sends to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello(Hello),
    Attach(Attach),
    /// The daemon has recovered its state and its lease: start dispatching.
    Restore,
    /// The daemon is leaving: stop dispatching; the broker answers once the
    /// daemon's in-flight requests are complete.
    Detach,
    Status,
    /// The operator's restore of an export: replay pending requests to the
    /// attached daemon, or with `fail_pending` fail them with EIO.
    OperatorRestore {
        export: String,
        fail_pending: bool,
    },
    /// Deposit the descriptor passed with this message under `name` in the
    /// attached export's fd store, replacing any earlier one.
    FdPut {
        name: String,
    },
    /// Fetch a descriptor from the attached export's fd store.
    FdGet {
        name: String,
    },
    /// Attach as the successor of the export's daemon in a handoff: the
    /// broker answers ATTACHED; the successor warms up without the lease.
    /// `direct` as in [`Attach`].
    Prepare {
        export: String,
        direct: bool,
    },
    /// The successor has warmed up and can take over.
    Ready,
    /// The old daemon has completed every request it was given and
    /// released its lease (answer to QUIESCE).
    Quiesced,
    /// Start a handoff; answered HANDOFF_ARMED at once and, on an operator
    /// connection, HANDOFF_DONE when it ends.
    Handoff(HandoffRequest),
    /// Add an export; answered EXPORT_ADDED with its status.
    ExportAdd(ExportAdd),
    /// Remove an export. Refused while its file or block device is open,
    /// unless `force`, which fails its outstanding requests with EIO.
    ExportRemove {
        name: String,
        force: bool,
    },
    /// Replace the broker with the binary now on disk, keeping every
    /// export; answered BROKER_UPGRADED by the new broker (or ERROR by the
    /// old one, which then keeps serving).
    BrokerUpgrade,
    /// The broker's figures in the Prometheus text format: answered with
    /// METRICS_TEXT messages, the last with `more` false.
    Metrics,
    /// A daemon's backend figures ([`crate::report`]); not answered.
    Report(Figures),
}

/// Most exports in one STATUS_OK message: a status is as many messages as
/// it takes, the last with `more` false.
pub const STATUS_BATCH: usize = 32;

/// Most bytes of metrics text in one METRICS_TEXT message (a string's
/// length is a u16 on the wire); the broker splits at line ends.
pub const METRICS_CHUNK: usize = 60_000;

/// What an export holds, and so which ops its daemon gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExportKind {
    /// One volume of `size` bytes (FUSE file, loop or ublk device): read,
    /// write, flush, discard, write-zeroes, allocate.
    Volume = 1,
    /// Named read-only blobs (cachefiles: the blobs of erofs images): open,
    /// read (of one blob), close.
    Blobs = 2,
}

impl ExportKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Volume),
            2 => Some(Self::Blobs),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Volume => "volume",
            Self::Blobs => "blobs",
        }
    }
}

/// Shape of the export and of the shared memory, sent with ATTACHED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attached {
    pub kind: ExportKind,
    /// Export size in bytes (blob exports: 0).
    pub size: u64,
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    /// Number of slots (and ring entries).
    pub slot_count: u32,
    /// Size of each slot buffer in the data area, in bytes.
    pub slot_size: u32,
    /// This attachment's epoch; completions must carry it.
    pub epoch: u64,
    /// Requests waiting for this daemon's RESTORE.
    pub pending: u32,
    /// Direct mode's terms; None in relay mode.
    pub direct: Option<DirectTerms>,
}

/// What the daemon attached to an export is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DaemonState {
    /// Attached, recovering its state; receives nothing until RESTORE.
    Attached = 1,
    /// Restored and receiving requests.
    Active = 2,
    /// Sent DETACH; finishing its in-flight requests.
    Detaching = 3,
    /// Declared lost; the broker is killing it and waiting until it is gone.
    Fencing = 4,
    /// A handoff successor warming up (no lease, receives nothing).
    Preparing = 5,
    /// A successor that sent READY.
    Ready = 6,
    /// A successor sent ACTIVATE, taking the lease.
    Activating = 7,
    /// Sent QUIESCE: receives nothing new, finishing what it has.
    Quiescing = 8,
    /// Drained and without its lease, waiting to be released or revived.
    Quiesced = 9,
}

impl DaemonState {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Attached,
            2 => Self::Active,
            3 => Self::Detaching,
            4 => Self::Fencing,
            5 => Self::Preparing,
            6 => Self::Ready,
            7 => Self::Activating,
            8 => Self::Quiescing,
            9 => Self::Quiesced,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Attached => "attached",
            Self::Active => "active",
            Self::Detaching => "detaching",
            Self::Fencing => "fencing",
            Self::Preparing => "preparing",
            Self::Ready => "ready",
            Self::Activating => "activating",
            Self::Quiescing => "quiescing",
            Self::Quiesced => "quiesced",
        }
    }
}

/// The daemon attached to an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct DaemonStatus {
    pub pid: u32,
    pub epoch: u64,
    pub state: DaemonState,
    pub mode: Mode,
}

/// One export in a STATUS reply.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ExportStatus {
    pub name: String,
    pub size: u64,
    pub frontend: String,
    /// The block device over the export, e.g. `/dev/loop3`.
    pub device: Option<String>,
    /// Logical block size of the export and its block device.
    pub block_size: u32,
    /// The mode daemons that can get: [`Mode::Direct`] where the export
    /// allows it and the kernel can re-send.
    pub mode: Mode,
    pub daemon: Option<DaemonStatus>,
    /// The successor of a running handoff.
    pub successor: Option<DaemonStatus>,
    /// Requests dispatched to the daemon and not yet completed.
    pub inflight: u32,
    /// Requests waiting for a daemon (new, or to be replayed).
    pub pending: u32,
    /// Requests re-delivered after a daemon loss, since the broker started.
    pub replayed: u64,
    /// Requests completed to the kernel, since the broker started.
    pub completed: u64,
    /// Requests failed to the kernel with an error the broker chose (wait
    /// bound, `--fail-pending`), since the broker started.
    pub failed: u64,
    /// Daemons declared lost (crash, hang, takeover, protocol violation).
    pub daemons_lost: u64,
    /// Completions rejected as invalid (bad slot, stale epoch, bad result).
    pub rejected_completions: u64,
    /// How long pending requests have waited without an active daemon, in ms.
    pub waiting_ms: Option<u64>,
    /// The running handoff.
    pub handoff: Option<HandoffProgress>,
    /// The last handoff that ended.
    pub last_handoff: Option<HandoffReport>,
    /// The broker's supervisor of the export's daemons, if it has one.
    pub supervisor: Option<SupervisorStatus>,
    /// What the attached daemon last reported of its backend.
    pub backend: Figures,
}

/// A supervisor (`--supervise`, an export's daemon in `--config`, `export
/// add --daemon`), as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct SupervisorStatus {
    /// The command line it runs (cut at [`MAX_TEXT_LEN`] bytes).
    pub cmd: String,
    /// The daemon it runs now.
    pub pid: Option<u32>,
    /// Daemons it started after one exited.
    pub restarts: u64,
    /// How the last of its daemons ended, e.g. `signal 9`.
    pub last_exit: Option<String>,
    /// How long until it starts the next daemon, while it backs off.
    pub backoff_ms: Option<u64>,
}

/// A message the broker sends to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Hello {
        version: u16,
        caps: u64,
        broker_pid: u32,
    },
    /// Sent with the descriptors listed in [`attach_fds`].
    Attached(Attached),
    Restored {
        replayed: u32,
    },
    Detached,
    /// Up to [`STATUS_BATCH`] exports; `more`: another STATUS_OK follows.
    Status {
        exports: Vec<ExportStatus>,
        more: bool,
    },
    OperatorRestored {
        replayed: u32,
        failed: u32,
    },
    FdStored,
    /// Sent with the requested descriptor.
    Fd,
    /// A handoff started: the successor may PREPARE now.
    HandoffArmed {
        from_pid: u32,
        from_epoch: u64,
    },
    HandoffDone(HandoffReport),
    /// `kept` says whether and where the change was kept for the broker's
    /// next start (its `--config` file).
    ExportAdded {
        status: Box<ExportStatus>,
        kept: String,
    },
    ExportRemoved {
        kept: String,
    },
    BrokerUpgraded(UpgradeReport),
    /// Part of the metrics text, at most [`METRICS_CHUNK`] bytes of whole
    /// lines; more parts follow while `more`.
    MetricsText {
        text: String,
        more: bool,
    },
    /// Notice to the current daemon in a handoff: finish what you have,
    /// release the lease, answer QUIESCED.
    Quiesce,
    /// Notice to a READY successor: take the lease, then RESTORE.
    Activate,
    /// Notice to a quiescing or quiesced daemon whose successor failed:
    /// take the lease back, then RESTORE.
    Revive,
    Error(ErrorReply),
}

fn header(kind: u16) -> Writer {
    let mut w = Writer::new();
    w.u32(MAGIC).u16(PROTOCOL_VERSION).u16(kind);
    w
}

/// Reads the frame header and returns the kind.
fn open(buf: &[u8]) -> Result<(u16, Reader<'_>), DecodeError> {
    if buf.len() > crate::MAX_MESSAGE_LEN {
        return Err(DecodeError::TooLarge(buf.len()));
    }
    let mut r = Reader::new(buf);
    let magic = r.u32("magic")?;
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    let version = r.u16("version")?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    Ok((r.u16("kind")?, r))
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let w = match self {
            Self::Hello(h) => {
                let mut w = header(kind::HELLO);
                w.u16(h.version).u64(h.caps).u32(h.pid);
                w
            }
            Self::Attach(a) => {
                let mut w = header(kind::ATTACH);
                w.str(&a.export, MAX_NAME_LEN)
                    .bool(a.takeover)
                    .bool(a.direct);
                w
            }
            Self::Restore => header(kind::RESTORE),
            Self::Detach => header(kind::DETACH),
            Self::Status => header(kind::STATUS),
            Self::OperatorRestore {
                export,
                fail_pending,
            } => {
                let mut w = header(kind::OPERATOR_RESTORE);
                w.str(export, MAX_NAME_LEN).bool(*fail_pending);
                w
            }
            Self::FdPut { name } => {
                let mut w = header(kind::FD_PUT);
                w.str(name, MAX_NAME_LEN);
                w
            }
            Self::FdGet { name } => {
                let mut w = header(kind::FD_GET);
                w.str(name, MAX_NAME_LEN);
                w
            }
            Self::Prepare { export, direct } => {
                let mut w = header(kind::PREPARE);
                w.str(export, MAX_NAME_LEN).bool(*direct);
                w
            }
            Self::Ready => header(kind::READY),
            Self::Quiesced => header(kind::QUIESCED),
            Self::Handoff(h) => {
                let mut w = header(kind::HANDOFF);
                h.put(&mut w);
                w
            }
            Self::ExportAdd(a) => {
                let mut w = header(kind::EXPORT_ADD);
                w.str(&a.name, MAX_NAME_LEN)
                    .u64(a.size)
                    .bool(a.block)
                    .bool(a.ublk)
                    .bool(a.direct)
                    .str(&a.daemon, MAX_TEXT_LEN);
                w
            }
            Self::ExportRemove { name, force } => {
                let mut w = header(kind::EXPORT_REMOVE);
                w.str(name, MAX_NAME_LEN).bool(*force);
                w
            }
            Self::BrokerUpgrade => header(kind::BROKER_UPGRADE),
            Self::Metrics => header(kind::METRICS),
            Self::Report(f) => {
                let mut w = header(kind::REPORT);
                f.put(&mut w);
                w
            }
        };
        w.finish()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let (kind, mut r) = open(buf)?;
        let msg = match kind {
            kind::HELLO => Self::Hello(Hello {
                version: r.u16("hello.version")?,
                caps: r.u64("hello.caps")?,
                pid: r.u32("hello.pid")?,
            }),
            kind::ATTACH => Self::Attach(Attach {
                export: r.str("attach.export", MAX_NAME_LEN)?,
                takeover: r.bool("attach.takeover")?,
                direct: r.bool("attach.direct")?,
            }),
            kind::RESTORE => Self::Restore,
            kind::DETACH => Self::Detach,
            kind::STATUS => Self::Status,
            kind::OPERATOR_RESTORE => Self::OperatorRestore {
                export: r.str("restore.export", MAX_NAME_LEN)?,
                fail_pending: r.bool("restore.fail_pending")?,
            },
            kind::FD_PUT => Self::FdPut {
                name: r.str("fd_put.name", MAX_NAME_LEN)?,
            },
            kind::FD_GET => Self::FdGet {
                name: r.str("fd_get.name", MAX_NAME_LEN)?,
            },
            kind::PREPARE => Self::Prepare {
                export: r.str("prepare.export", MAX_NAME_LEN)?,
                direct: r.bool("prepare.direct")?,
            },
            kind::READY => Self::Ready,
            kind::QUIESCED => Self::Quiesced,
            kind::HANDOFF => Self::Handoff(HandoffRequest::get(&mut r)?),
            kind::EXPORT_ADD => Self::ExportAdd(ExportAdd {
                name: r.str("export_add.name", MAX_NAME_LEN)?,
                size: r.u64("export_add.size")?,
                block: r.bool("export_add.block")?,
                ublk: r.bool("export_add.ublk")?,
                direct: r.bool("export_add.direct")?,
                daemon: r.str("export_add.daemon", MAX_TEXT_LEN)?,
            }),
            kind::EXPORT_REMOVE => Self::ExportRemove {
                name: r.str("export_remove.name", MAX_NAME_LEN)?,
                force: r.bool("export_remove.force")?,
            },
            kind::BROKER_UPGRADE => Self::BrokerUpgrade,
            kind::METRICS => Self::Metrics,
            kind::REPORT => Self::Report(Figures::get_from(&mut r)?),
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Name of the message kind, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Hello(_) => "HELLO",
            Self::Attach(_) => "ATTACH",
            Self::Restore => "RESTORE",
            Self::Detach => "DETACH",
            Self::Status => "STATUS",
            Self::OperatorRestore { .. } => "OPERATOR_RESTORE",
            Self::FdPut { .. } => "FD_PUT",
            Self::FdGet { .. } => "FD_GET",
            Self::Prepare { .. } => "PREPARE",
            Self::Ready => "READY",
            Self::Quiesced => "QUIESCED",
            Self::Handoff(_) => "HANDOFF",
            Self::ExportAdd(_) => "EXPORT_ADD",
            Self::ExportRemove { .. } => "EXPORT_REMOVE",
            Self::BrokerUpgrade => "BROKER_UPGRADE",
            Self::Metrics => "METRICS",
            Self::Report(_) => "REPORT",
        }
    }
}

fn put_opt_u64(w: &mut Writer, v: Option<u64>) {
    w.bool(v.is_some()).u64(v.unwrap_or(0));
}

fn get_opt_u64(r: &mut Reader<'_>, field: &'static str) -> Result<Option<u64>, DecodeError> {
    let present = r.bool(field)?;
    let v = r.u64(field)?;
    Ok(present.then_some(v))
}

fn put_export(w: &mut Writer, e: &ExportStatus) {
    w.str(&e.name, MAX_NAME_LEN)
        .u64(e.size)
        .str(&e.frontend, MAX_TEXT_LEN)
        .bool(e.device.is_some())
        .str(e.device.as_deref().unwrap_or_default(), MAX_DEVICE_LEN)
        .u32(e.block_size)
        .u8(e.mode as u8);
    put_daemon(w, e.daemon.as_ref());
    put_daemon(w, e.successor.as_ref());
    w.u32(e.inflight)
        .u32(e.pending)
        .u64(e.replayed)
        .u64(e.completed)
        .u64(e.failed)
        .u64(e.daemons_lost)
        .u64(e.rejected_completions);
    put_opt_u64(w, e.waiting_ms);
    w.bool(e.handoff.is_some());
    if let Some(h) = &e.handoff {
        h.put(w);
    }
    w.bool(e.last_handoff.is_some());
    if let Some(h) = &e.last_handoff {
        h.put(w);
    }
    w.bool(e.supervisor.is_some());
    if let Some(s) = &e.supervisor {
        w.str(&s.cmd, MAX_TEXT_LEN);
        put_opt_u64(w, s.pid.map(u64::from));
        w.u64(s.restarts)
            .bool(s.last_exit.is_some())
            .str(s.last_exit.as_deref().unwrap_or_default(), MAX_NAME_LEN);
        put_opt_u64(w, s.backoff_ms);
    }
    e.backend.put(w);
}

fn get_supervisor(r: &mut Reader<'_>) -> Result<Option<SupervisorStatus>, DecodeError> {
    if !r.bool("export.supervisor")? {
        return Ok(None);
    }
    let cmd = r.str("supervisor.cmd", MAX_TEXT_LEN)?;
    let pid = match get_opt_u64(r, "supervisor.pid")? {
        Some(p) => Some(u32::try_from(p).map_err(|_| DecodeError::BadValue {
            field: "supervisor.pid",
            value: p,
        })?),
        None => None,
    };
    let restarts = r.u64("supervisor.restarts")?;
    let has_exit = r.bool("supervisor.last_exit")?;
    let last_exit = r.str("supervisor.last_exit", MAX_NAME_LEN)?;
    Ok(Some(SupervisorStatus {
        cmd,
        pid,
        restarts,
        last_exit: has_exit.then_some(last_exit),
        backoff_ms: get_opt_u64(r, "supervisor.backoff_ms")?,
    }))
}

fn put_daemon(w: &mut Writer, d: Option<&DaemonStatus>) {
    match d {
        Some(d) => w
            .bool(true)
            .u32(d.pid)
            .u64(d.epoch)
            .u8(d.state as u8)
            .u8(d.mode as u8),
        None => w.bool(false),
    };
}

fn get_daemon(r: &mut Reader<'_>) -> Result<Option<DaemonStatus>, DecodeError> {
    if !r.bool("export.daemon")? {
        return Ok(None);
    }
    let pid = r.u32("daemon.pid")?;
    let epoch = r.u64("daemon.epoch")?;
    let state = r.u8("daemon.state")?;
    let state = DaemonState::from_u8(state).ok_or(DecodeError::BadValue {
        field: "daemon.state",
        value: u64::from(state),
    })?;
    let mode = get_mode(r, "daemon.mode")?;
    Ok(Some(DaemonStatus {
        pid,
        epoch,
        state,
        mode,
    }))
}

/// Direct mode's terms in ATTACHED: a byte saying which (0 none, 1 FUSE,
/// 2 ublk), then their fields.
fn put_terms(w: &mut Writer, terms: Option<&DirectTerms>) {
    match terms {
        None => {
            w.u8(terms::NONE);
        }
        Some(DirectTerms::Fuse(d)) => {
            w.u8(terms::FUSE)
                .u32(d.minor)
                .u64(d.flags)
                .u32(d.max_io)
                .u16(d.max_background)
                .u64(d.started)
                .u32(d.conns);
        }
        Some(DirectTerms::Ublk(u)) => {
            w.u8(terms::UBLK).u32(u.dev_id).u16(u.depth).u32(u.buf_size);
        }
    }
}

mod terms {
    pub const NONE: u8 = 0;
    pub const FUSE: u8 = 1;
    pub const UBLK: u8 = 2;
}

fn get_terms(r: &mut Reader<'_>) -> Result<Option<DirectTerms>, DecodeError> {
    match r.u8("attached.direct")? {
        terms::NONE => Ok(None),
        terms::FUSE => get_fuse_terms(r).map(|t| Some(DirectTerms::Fuse(t))),
        terms::UBLK => get_ublk_terms(r).map(|t| Some(DirectTerms::Ublk(t))),
        v => Err(DecodeError::BadValue {
            field: "attached.direct",
            value: u64::from(v),
        }),
    }
}

fn get_fuse_terms(r: &mut Reader<'_>) -> Result<FuseTerms, DecodeError> {
    let terms = FuseTerms {
        minor: r.u32("direct.minor")?,
        flags: r.u64("direct.flags")?,
        max_io: r.u32("direct.max_io")?,
        max_background: r.u16("direct.max_background")?,
        started: r.u64("direct.started")?,
        conns: r.u32("direct.conns")?,
    };
    if terms.conns == 0 || terms.conns > MAX_DIRECT_CONNS {
        return Err(DecodeError::BadValue {
            field: "direct.conns",
            value: u64::from(terms.conns),
        });
    }
    Ok(terms)
}

fn get_ublk_terms(r: &mut Reader<'_>) -> Result<UblkTerms, DecodeError> {
    let terms = UblkTerms {
        dev_id: r.u32("direct.dev_id")?,
        depth: r.u16("direct.depth")?,
        buf_size: r.u32("direct.buf_size")?,
    };
    if terms.depth == 0 || terms.depth > MAX_UBLK_DEPTH {
        return Err(DecodeError::BadValue {
            field: "direct.depth",
            value: u64::from(terms.depth),
        });
    }
    if terms.buf_size == 0 || terms.buf_size > MAX_UBLK_BUF {
        return Err(DecodeError::BadValue {
            field: "direct.buf_size",
            value: u64::from(terms.buf_size),
        });
    }
    Ok(terms)
}

fn get_mode(r: &mut Reader<'_>, field: &'static str) -> Result<Mode, DecodeError> {
    let v = r.u8(field)?;
    Mode::from_u8(v).ok_or(DecodeError::BadValue {
        field,
        value: u64::from(v),
    })
}

fn get_export(r: &mut Reader<'_>) -> Result<ExportStatus, DecodeError> {
    let name = r.str("export.name", MAX_NAME_LEN)?;
    let size = r.u64("export.size")?;
    let frontend = r.str("export.frontend", MAX_TEXT_LEN)?;
    let has_device = r.bool("export.device")?;
    let device = r.str("export.device", MAX_DEVICE_LEN)?;
    let block_size = r.u32("export.block_size")?;
    let mode = get_mode(r, "export.mode")?;
    let daemon = get_daemon(r)?;
    let successor = get_daemon(r)?;
    Ok(ExportStatus {
        name,
        size,
        frontend,
        device: has_device.then_some(device),
        block_size,
        mode,
        daemon,
        successor,
        inflight: r.u32("export.inflight")?,
        pending: r.u32("export.pending")?,
        replayed: r.u64("export.replayed")?,
        completed: r.u64("export.completed")?,
        failed: r.u64("export.failed")?,
        daemons_lost: r.u64("export.daemons_lost")?,
        rejected_completions: r.u64("export.rejected_completions")?,
        waiting_ms: get_opt_u64(r, "export.waiting_ms")?,
        handoff: match r.bool("export.handoff")? {
            true => Some(HandoffProgress::get(r)?),
            false => None,
        },
        last_handoff: match r.bool("export.last_handoff")? {
            true => Some(HandoffReport::get(r)?),
            false => None,
        },
        supervisor: get_supervisor(r)?,
        backend: Figures::get_from(r)?,
    })
}

impl Reply {
    /// Shorthand for an ERROR reply.
    pub fn error(code: ErrorCode, text: impl Into<String>) -> Self {
        Self::Error(ErrorReply::new(code, text))
    }

    pub fn encode(&self) -> Vec<u8> {
        let w = match self {
            Self::Hello {
                version,
                caps,
                broker_pid,
            } => {
                let mut w = header(kind::HELLO_OK);
                w.u16(*version).u64(*caps).u32(*broker_pid);
                w
            }
            Self::Attached(a) => {
                let mut w = header(kind::ATTACHED);
                w.u8(a.kind as u8)
                    .u64(a.size)
                    .u32(a.block_size)
                    .u32(a.slot_count)
                    .u32(a.slot_size)
                    .u64(a.epoch)
                    .u32(a.pending);
                put_terms(&mut w, a.direct.as_ref());
                w
            }
            Self::Restored { replayed } => {
                let mut w = header(kind::RESTORED);
                w.u32(*replayed);
                w
            }
            Self::Detached => header(kind::DETACHED),
            Self::Status { exports, more } => {
                let mut w = header(kind::STATUS_OK);
                let n = exports.len().min(STATUS_BATCH);
                w.u32(u32::try_from(n).unwrap_or(0));
                for e in exports.iter().take(n) {
                    put_export(&mut w, e);
                }
                w.bool(*more);
                w
            }
            Self::OperatorRestored { replayed, failed } => {
                let mut w = header(kind::OPERATOR_RESTORED);
                w.u32(*replayed).u32(*failed);
                w
            }
            Self::FdStored => header(kind::FD_STORED),
            Self::Fd => header(kind::FD),
            Self::HandoffArmed {
                from_pid,
                from_epoch,
            } => {
                let mut w = header(kind::HANDOFF_ARMED);
                w.u32(*from_pid).u64(*from_epoch);
                w
            }
            Self::HandoffDone(report) => {
                let mut w = header(kind::HANDOFF_DONE);
                report.put(&mut w);
                w
            }
            Self::ExportAdded { status, kept } => {
                let mut w = header(kind::EXPORT_ADDED);
                put_export(&mut w, status);
                w.str(kept, MAX_TEXT_LEN);
                w
            }
            Self::ExportRemoved { kept } => {
                let mut w = header(kind::EXPORT_REMOVED);
                w.str(kept, MAX_TEXT_LEN);
                w
            }
            Self::BrokerUpgraded(report) => {
                let mut w = header(kind::BROKER_UPGRADED);
                report.put(&mut w);
                w
            }
            Self::MetricsText { text, more } => {
                let mut w = header(kind::METRICS_TEXT);
                w.str(text, METRICS_CHUNK).bool(*more);
                w
            }
            Self::Quiesce => header(kind::QUIESCE),
            Self::Activate => header(kind::ACTIVATE),
            Self::Revive => header(kind::REVIVE),
            Self::Error(e) => {
                let mut w = header(kind::ERROR);
                w.u16(e.code as u16).str(&e.text, MAX_TEXT_LEN);
                w
            }
        };
        w.finish()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let (kind, mut r) = open(buf)?;
        let msg = match kind {
            kind::HELLO_OK => Self::Hello {
                version: r.u16("hello.version")?,
                caps: r.u64("hello.caps")?,
                broker_pid: r.u32("hello.broker_pid")?,
            },
            kind::ATTACHED => Self::Attached(Attached {
                kind: {
                    let v = r.u8("attached.kind")?;
                    ExportKind::from_u8(v).ok_or(DecodeError::BadValue {
                        field: "attached.kind",
                        value: u64::from(v),
                    })?
                },
                size: r.u64("attached.size")?,
                block_size: r.u32("attached.block_size")?,
                slot_count: r.u32("attached.slot_count")?,
                slot_size: r.u32("attached.slot_size")?,
                epoch: r.u64("attached.epoch")?,
                pending: r.u32("attached.pending")?,
                direct: get_terms(&mut r)?,
            }),
            kind::RESTORED => Self::Restored {
                replayed: r.u32("restored.replayed")?,
            },
            kind::DETACHED => Self::Detached,
            kind::STATUS_OK => {
                let n = r.count("status.exports", STATUS_BATCH)?;
                let mut exports = Vec::with_capacity(n);
                for _ in 0..n {
                    exports.push(get_export(&mut r)?);
                }
                let more = r.bool("status.more")?;
                Self::Status { exports, more }
            }
            kind::OPERATOR_RESTORED => Self::OperatorRestored {
                replayed: r.u32("restored.replayed")?,
                failed: r.u32("restored.failed")?,
            },
            kind::FD_STORED => Self::FdStored,
            kind::FD => Self::Fd,
            kind::HANDOFF_ARMED => Self::HandoffArmed {
                from_pid: r.u32("armed.from_pid")?,
                from_epoch: r.u64("armed.from_epoch")?,
            },
            kind::HANDOFF_DONE => Self::HandoffDone(HandoffReport::get(&mut r)?),
            kind::EXPORT_ADDED => Self::ExportAdded {
                status: Box::new(get_export(&mut r)?),
                kept: r.str("export_added.kept", MAX_TEXT_LEN)?,
            },
            kind::EXPORT_REMOVED => Self::ExportRemoved {
                kept: r.str("export_removed.kept", MAX_TEXT_LEN)?,
            },
            kind::BROKER_UPGRADED => Self::BrokerUpgraded(UpgradeReport::get(&mut r)?),
            kind::METRICS_TEXT => Self::MetricsText {
                text: r.str("metrics.text", METRICS_CHUNK)?,
                more: r.bool("metrics.more")?,
            },
            kind::QUIESCE => Self::Quiesce,
            kind::ACTIVATE => Self::Activate,
            kind::REVIVE => Self::Revive,
            kind::ERROR => {
                let code = r.u16("error.code")?;
                let text = r.str("error.text", MAX_TEXT_LEN)?;
                let code = ErrorCode::from_u16(code).ok_or(DecodeError::BadValue {
                    field: "error.code",
                    value: u64::from(code),
                })?;
                Self::Error(ErrorReply { code, text })
            }
            other => return Err(DecodeError::UnknownKind(other)),
        };
        r.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MAX_EXPORTS;

    fn sample_export(i: u32) -> ExportStatus {
        ExportStatus {
            name: format!("vol{i}"),
            size: 1 << 30,
            frontend: "fuse".into(),
            device: i.is_multiple_of(2).then(|| format!("/dev/loop{i}")),
            block_size: 4096,
            mode: if i.is_multiple_of(2) {
                Mode::Direct
            } else {
                Mode::Relay
            },
            daemon: i.is_multiple_of(2).then_some(DaemonStatus {
                pid: 42 + i,
                epoch: 7,
                state: DaemonState::Active,
                mode: Mode::Direct,
            }),
            inflight: 3,
            pending: 4,
            replayed: 5,
            completed: 6,
            failed: 7,
            daemons_lost: 8,
            rejected_completions: 9,
            waiting_ms: i.is_multiple_of(3).then_some(1234),
            successor: i.is_multiple_of(2).then_some(DaemonStatus {
                pid: 99,
                epoch: 8,
                state: DaemonState::Ready,
                mode: Mode::Relay,
            }),
            handoff: i.is_multiple_of(2).then_some(HandoffProgress {
                phase: crate::handoff::HandoffPhase::Quiescing,
                dry_run: false,
                elapsed_ms: 12,
            }),
            last_handoff: Some(sample_report()),
            supervisor: i.is_multiple_of(2).then(|| SupervisorStatus {
                cmd: "holdfast-daemon --export vol0".into(),
                pid: i.is_multiple_of(4).then_some(77),
                restarts: 2,
                last_exit: Some("signal 9".into()),
                backoff_ms: (!i.is_multiple_of(4)).then_some(400),
            }),
            backend: {
                let mut f = Figures::default();
                if i.is_multiple_of(2) {
                    f.set(crate::Figure::LogBytes, 1 << 20)
                        .set(crate::Figure::CacheHits, u64::from(i));
                }
                f
            },
        }
    }

    fn sample_report() -> HandoffReport {
        HandoffReport {
            outcome: crate::handoff::HandoffOutcome::Aborted,
            reason: "the successor exited".into(),
            from_pid: 1,
            from_epoch: 2,
            to_pid: 3,
            to_epoch: 4,
            warmup_us: 5,
            drain_us: 6,
            stall_us: 7,
            total_us: 8,
            replayed: 9,
            fenced: true,
        }
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::Hello(Hello {
                version: PROTOCOL_VERSION,
                caps: crate::caps::ALL,
                pid: 1234,
            }),
            Request::Attach(Attach {
                export: "vol0".into(),
                takeover: true,
                direct: true,
            }),
            Request::Restore,
            Request::Detach,
            Request::Status,
            Request::OperatorRestore {
                export: "vol1".into(),
                fail_pending: true,
            },
            Request::FdPut { name: "mem".into() },
            Request::FdGet { name: "mem".into() },
            Request::Prepare {
                export: "vol0".into(),
                direct: true,
            },
            Request::Ready,
            Request::Quiesced,
            Request::Handoff(HandoffRequest {
                export: "vol0".into(),
                dry_run: true,
                spawn: true,
                ready_timeout_ms: 60_000,
                drain_timeout_ms: 5_000,
                cmd: "holdfast-daemon --export vol0 --backend mem --workers 4".into(),
            }),
            Request::ExportAdd(ExportAdd {
                name: "vol2".into(),
                size: 1 << 30,
                block: true,
                ublk: false,
                direct: true,
                daemon: "holdfast-daemon --export vol2 --backend mem".into(),
            }),
            Request::ExportRemove {
                name: "vol2".into(),
                force: true,
            },
            Request::BrokerUpgrade,
            Request::Metrics,
            Request::Report(Figures::default()),
            Request::Report({
                let mut f = Figures::default();
                for (i, k) in crate::Figure::ALL.into_iter().enumerate() {
                    f.set(k, i as u64 * 1000);
                }
                f
            }),
        ]
    }

    fn all_replies() -> Vec<Reply> {
        vec![
            Reply::Hello {
                version: 1,
                caps: 3,
                broker_pid: 9,
            },
            Reply::Attached(Attached {
                kind: ExportKind::Blobs,
                size: 256 << 20,
                block_size: 512,
                slot_count: 64,
                slot_size: 1 << 20,
                epoch: 3,
                pending: 17,
                direct: None,
            }),
            Reply::Attached(Attached {
                kind: ExportKind::Volume,
                size: 1 << 30,
                block_size: 4096,
                slot_count: 64,
                slot_size: 1 << 20,
                epoch: 4,
                pending: 0,
                direct: Some(DirectTerms::Fuse(FuseTerms {
                    minor: 45,
                    flags: 1 << 40,
                    max_io: 1 << 20,
                    max_background: 64,
                    started: 1_800_000_000,
                    conns: 4,
                })),
            }),
            Reply::Attached(Attached {
                kind: ExportKind::Volume,
                size: 1 << 30,
                block_size: 512,
                slot_count: 64,
                slot_size: 1 << 20,
                epoch: 5,
                pending: 0,
                direct: Some(DirectTerms::Ublk(UblkTerms {
                    dev_id: 7,
                    depth: 32,
                    buf_size: 1 << 20,
                })),
            }),
            Reply::Restored { replayed: 5 },
            Reply::Detached,
            Reply::Status {
                exports: (0..4).map(sample_export).collect(),
                more: false,
            },
            Reply::Status {
                exports: (0..STATUS_BATCH as u32).map(sample_export).collect(),
                more: true,
            },
            Reply::OperatorRestored {
                replayed: 1,
                failed: 2,
            },
            Reply::FdStored,
            Reply::Fd,
            Reply::HandoffArmed {
                from_pid: 7,
                from_epoch: 8,
            },
            Reply::HandoffDone(sample_report()),
            Reply::Quiesce,
            Reply::Activate,
            Reply::Revive,
            Reply::ExportAdded {
                status: Box::new(sample_export(1)),
                kept: "kept in /etc/holdfast/holdfast.toml".into(),
            },
            Reply::ExportRemoved {
                kept: String::new(),
            },
            Reply::BrokerUpgraded(UpgradeReport {
                old_pid: 1,
                new_pid: 1,
                old_version: "0.1.0".into(),
                new_version: "0.2.0".into(),
                stall_us: 420,
                resent: 3,
                reattached: 2,
                missing: vec!["vol1".into(), "vol9".into()],
            }),
            Reply::MetricsText {
                text: "holdfast_broker_restarts_total 0\n".into(),
                more: true,
            },
            Reply::error(ErrorCode::Busy, "export vol0 is busy"),
        ]
    }

    #[test]
    fn requests_round_trip() {
        for m in all_requests() {
            assert_eq!(Request::decode(&m.encode()).unwrap(), m, "{}", m.name());
        }
    }

    #[test]
    fn replies_round_trip() {
        for m in all_replies() {
            assert_eq!(Reply::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for m in all_requests() {
            let buf = m.encode();
            for cut in 0..buf.len() {
                assert!(
                    Request::decode(&buf[..cut]).is_err(),
                    "{} cut {cut}",
                    m.name()
                );
            }
        }
        for m in all_replies() {
            let buf = m.encode();
            for cut in 0..buf.len() {
                assert!(Reply::decode(&buf[..cut]).is_err());
            }
        }
    }

    #[test]
    fn trailing_bytes_rejected() {
        let mut buf = Request::Restore.encode();
        buf.push(0);
        assert_eq!(Request::decode(&buf), Err(DecodeError::TrailingBytes(1)));
    }

    #[test]
    fn wrong_magic_version_kind() {
        let mut buf = Request::Status.encode();
        buf[0] ^= 0xff;
        assert!(matches!(
            Request::decode(&buf),
            Err(DecodeError::BadMagic(_))
        ));

        let mut buf = Request::Status.encode();
        buf[4] = 9;
        assert_eq!(
            Request::decode(&buf),
            Err(DecodeError::UnsupportedVersion(9))
        );

        let mut buf = Request::Status.encode();
        buf[6] = 0x77;
        assert!(matches!(
            Request::decode(&buf),
            Err(DecodeError::UnknownKind(_))
        ));
        // A reply kind is not a request.
        assert!(Request::decode(&Reply::Detached.encode()).is_err());
    }

    #[test]
    fn bounds_enforced() {
        // A name longer than allowed, written by hand.
        let mut w = header(kind::ATTACH);
        let long = "x".repeat(MAX_NAME_LEN + 1);
        w.u16(long.len() as u16);
        let mut buf = w.finish();
        buf.extend_from_slice(long.as_bytes());
        buf.push(0);
        assert!(matches!(
            Request::decode(&buf),
            Err(DecodeError::TooLong { .. })
        ));

        // Invalid UTF-8.
        let mut w = header(kind::FD_GET);
        w.u16(2);
        let mut buf = w.finish();
        buf.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(
            Request::decode(&buf),
            Err(DecodeError::BadUtf8("fd_get.name"))
        );

        // A bool that is neither 0 nor 1.
        let mut buf = Request::Attach(Attach {
            export: "v".into(),
            takeover: false,
            direct: false,
        })
        .encode();
        *buf.last_mut().unwrap() = 2;
        assert!(matches!(
            Request::decode(&buf),
            Err(DecodeError::BadValue { .. })
        ));

        // ublk terms out of range (depth 0, a 4 GiB buffer), and a kind of
        // terms that does not exist.
        let attached = |direct| {
            Reply::Attached(Attached {
                kind: ExportKind::Volume,
                size: 1 << 30,
                block_size: 512,
                slot_count: 8,
                slot_size: 1 << 20,
                epoch: 1,
                pending: 0,
                direct,
            })
        };
        for (depth, buf_size) in [(0, 4096), (MAX_UBLK_DEPTH + 1, 4096), (8, 0), (8, u32::MAX)] {
            let m = attached(Some(DirectTerms::Ublk(UblkTerms {
                dev_id: 0,
                depth,
                buf_size,
            })));
            assert!(
                matches!(
                    Reply::decode(&m.encode()),
                    Err(DecodeError::BadValue { .. })
                ),
                "depth {depth}, buffer {buf_size}"
            );
        }
        let mut buf = attached(None).encode();
        *buf.last_mut().unwrap() = 3;
        assert!(matches!(
            Reply::decode(&buf),
            Err(DecodeError::BadValue {
                field: "attached.direct",
                ..
            })
        ));

        // Oversized buffer.
        let big = vec![0u8; crate::MAX_MESSAGE_LEN + 1];
        assert!(matches!(
            Request::decode(&big),
            Err(DecodeError::TooLarge(_))
        ));

        // A status count beyond the limit.
        let mut w = header(kind::STATUS_OK);
        w.u32(u32::MAX);
        assert!(matches!(
            Reply::decode(&w.finish()),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn full_status_fits_message_limit() {
        let figures = crate::Figure::ALL
            .into_iter()
            .fold(Figures::default(), |mut f, k| {
                f.set(k, u64::MAX);
                f
            });
        let exports: Vec<_> = (0..STATUS_BATCH as u32)
            .map(|_| ExportStatus {
                name: "x".repeat(MAX_NAME_LEN),
                frontend: "cachefiles".into(),
                device: Some("x".repeat(MAX_DEVICE_LEN)),
                last_handoff: Some(HandoffReport {
                    reason: "x".repeat(crate::handoff::MAX_REASON_LEN),
                    ..sample_report()
                }),
                supervisor: Some(SupervisorStatus {
                    cmd: "x".repeat(MAX_TEXT_LEN),
                    pid: Some(u32::MAX),
                    restarts: u64::MAX,
                    last_exit: Some("x".repeat(MAX_NAME_LEN)),
                    backoff_ms: Some(u64::MAX),
                }),
                backend: figures.clone(),
                ..sample_export(0)
            })
            .collect();
        assert!(STATUS_BATCH * MAX_EXPORTS.div_ceil(STATUS_BATCH) >= MAX_EXPORTS);
        let buf = Reply::Status {
            exports,
            more: true,
        }
        .encode();
        assert!(buf.len() <= crate::MAX_MESSAGE_LEN, "{}", buf.len());
    }

    #[test]
    fn garbage_never_panics() {
        // A cheap deterministic fuzz: every request mutated at every byte.
        for m in all_requests().into_iter().chain([]) {
            let buf = m.encode();
            for i in 0..buf.len() {
                for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                    let mut b = buf.clone();
                    b[i] = v;
                    let _ = Request::decode(&b);
                    let _ = Reply::decode(&b);
                }
            }
        }
    }
}
