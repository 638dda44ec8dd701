//! The record a broker leaves for the broker after it: its exports (kind,
//! geometry, which kept descriptors are theirs), epoch counters, fd store
//! contents, supervised daemons and, for an upgrade, what to report. It is
//! written to a sealed memfd (the contents can no longer change once
//! anyone else can see it), named `state.SEQ` among the kept descriptors;
//! the highest SEQ that decodes wins.
//!
//! The encoding is the control protocol's field codec: every length and
//! count is checked when read back, and anything unexpected is an error
//! naming the field.

use std::io::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use holdfast_proto::wire::{Reader, Writer};
use holdfast_proto::{DecodeError, MAX_EXPORTS, MAX_NAME_LEN};
use rustix::fs::{MemfdFlags, SealFlags};

/// `HFST`.
const MAGIC: u32 = u32::from_le_bytes(*b"HFST");
/// Bumped when the layout changes; a broker refuses a record it cannot
/// read, and an upgrade to a binary that reads another layout is refused.
pub const VERSION: u16 = 2;

/// The layouts this broker reads, as `--version` says them: one
/// "(restart record N)" each, which is what an older broker looks for
/// before it upgrades to this binary (`upgrade::check_binary`).
pub fn readable() -> String {
    let all: Vec<String> = (1..=VERSION)
        .map(|v| format!("(restart record {v})"))
        .collect();
    all.join(" ")
}
/// Longest path or command line in a record.
const MAX_TEXT: usize = u16::MAX as usize;
/// Largest record read back.
const MAX_RECORD_LEN: u64 = 16 << 20;
/// Bounds on the record's lists.
const MAX_CONNS: usize = 1024;
const MAX_SUPERVISED: usize = 1024;

/// Names of the kept descriptors.
pub mod names {
    /// The control socket's listener.
    pub const LISTEN: &str = "listen";
    /// The one-broker-per-socket lock (re-exec only: systemd must not keep
    /// it, or no broker could take it after a crash).
    pub const LOCK: &str = "lock";
    /// `/dev/cachefiles`.
    pub const CACHEFILES: &str = "cachefiles";
    /// The record itself: `state.SEQ` in systemd's store.
    pub const STATE_PREFIX: &str = "state.";
    /// The record a re-executing broker passes on (re-exec only).
    pub const RECORD: &str = "record";
    /// An operator's connection waiting for the upgrade report (re-exec
    /// only): `upgrade.N`.
    pub const REQUESTER_PREFIX: &str = "upgrade.";

    /// FUSE connection `i` (the first is the one mounted, the others its
    /// clones) of the mount `id` of `export`.
    pub fn fuse(export: &str, id: u64, i: usize) -> String {
        format!("fuse.{export}.{id}.{i}")
    }

    /// A descriptor of `export`'s fd store, kept as number `id`.
    pub fn stored(export: &str, id: u64) -> String {
        format!("store.{export}.{id}")
    }

    pub fn state(seq: u64) -> String {
        format!("{STATE_PREFIX}{seq}")
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// Increases with every record a broker writes.
    pub seq: u64,
    /// The next number for a kept descriptor's name (names are never
    /// reused, so a replaced descriptor never shares one with its
    /// predecessor in systemd's store).
    pub next_id: u64,
    pub exports: Vec<ExportRecord>,
    pub supervised: Vec<SupervisedRecord>,
    /// Set by a broker that re-executes for an upgrade.
    pub upgrade: Option<UpgradeRecord>,
    /// How many times the state was taken over by a next broker before
    /// this record was written (layout 2; 0 in layout 1).
    pub restarts: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRecord {
    pub name: String,
    pub size: u64,
    /// The last epoch granted: the next broker's epochs are above it.
    pub last_epoch: u64,
    pub frontend: FrontendRecord,
    /// The fd store: each entry's name and its kept descriptor's number.
    pub stored: Vec<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendRecord {
    Fuse(FuseRecord),
    Ublk { dev_id: u32 },
    Cachefiles,
}

/// A FUSE export's mount, its connections and what INIT negotiated (the
/// kernel sends INIT once per connection: the next broker does not see it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuseRecord {
    pub id: u64,
    pub mount: PathBuf,
    pub conns: u32,
    /// The loop device number of a block export.
    pub device: Option<u32>,
    pub minor: u32,
    /// INIT's flags, flags2 in the high half.
    pub flags: u64,
    /// Daemons that can get direct mode.
    pub direct: bool,
}

/// A supervised daemon, so the next broker supervises it instead of
/// starting another: its start time (from /proc) tells a reused pid apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisedRecord {
    pub cmd: String,
    pub pid: u32,
    pub start_time: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRecord {
    pub old_pid: u32,
    pub old_version: String,
    /// CLOCK_MONOTONIC, in ns, when the old broker stopped.
    pub stopped_ns: u64,
    /// Exports that had an active daemon: the report waits for them.
    pub serving: Vec<String>,
}

/// Why a record could not be read.
#[derive(Debug)]
pub enum RecordError {
    Io(std::io::Error),
    Decode(DecodeError),
    Version(u16),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Io(e) => write!(f, "cannot read it: {e}"),
            Self::Decode(e) => write!(f, "it is damaged: {e}"),
            Self::Version(v) => write!(
                f,
                "it has layout {v}, this broker reads {VERSION}: a newer broker wrote it"
            ),
        }
    }
}

fn path_str(p: &std::path::Path) -> &str {
    // Mount points come from UTF-8 options and export names.
    p.to_str().unwrap_or_default()
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(MAGIC).u16(VERSION).u64(self.seq).u64(self.next_id);
        w.u32(u32::try_from(self.exports.len()).unwrap_or(0));
        for e in &self.exports {
            e.put(&mut w);
        }
        w.u32(u32::try_from(self.supervised.len()).unwrap_or(0));
        for s in &self.supervised {
            w.str(&s.cmd, MAX_TEXT).u32(s.pid).u64(s.start_time);
        }
        w.bool(self.upgrade.is_some());
        if let Some(u) = &self.upgrade {
            w.u32(u.old_pid)
                .str(&u.old_version, MAX_NAME_LEN)
                .u64(u.stopped_ns);
            w.u32(u32::try_from(u.serving.len()).unwrap_or(0));
            for s in &u.serving {
                w.str(s, MAX_NAME_LEN);
            }
        }
        w.u64(self.restarts);
        w.finish()
    }

    pub fn decode(buf: &[u8]) -> Result<Self, RecordError> {
        let mut r = Reader::new(buf);
        let magic = r.u32("record.magic").map_err(RecordError::Decode)?;
        if magic != MAGIC {
            return Err(RecordError::Decode(DecodeError::BadMagic(magic)));
        }
        let version = r.u16("record.version").map_err(RecordError::Decode)?;
        if !(1..=VERSION).contains(&version) {
            return Err(RecordError::Version(version));
        }
        Self::fields(&mut r, version)
            .and_then(|rec| r.finish().map(|()| rec))
            .map_err(RecordError::Decode)
    }

    fn fields(r: &mut Reader<'_>, version: u16) -> Result<Self, DecodeError> {
        let mut rec = Self {
            seq: r.u64("record.seq")?,
            next_id: r.u64("record.next_id")?,
            ..Self::default()
        };
        for _ in 0..r.count("record.exports", MAX_EXPORTS)? {
            rec.exports.push(ExportRecord::get(r)?);
        }
        for _ in 0..r.count("record.supervised", MAX_SUPERVISED)? {
            rec.supervised.push(SupervisedRecord {
                cmd: r.str("supervised.cmd", MAX_TEXT)?,
                pid: r.u32("supervised.pid")?,
                start_time: r.u64("supervised.start_time")?,
            });
        }
        if r.bool("record.upgrade")? {
            let mut u = UpgradeRecord {
                old_pid: r.u32("upgrade.old_pid")?,
                old_version: r.str("upgrade.old_version", MAX_NAME_LEN)?,
                stopped_ns: r.u64("upgrade.stopped_ns")?,
                serving: Vec::new(),
            };
            for _ in 0..r.count("upgrade.serving", MAX_EXPORTS)? {
                u.serving.push(r.str("upgrade.serving", MAX_NAME_LEN)?);
            }
            rec.upgrade = Some(u);
        }
        if version >= 2 {
            rec.restarts = r.u64("record.restarts")?;
        }
        Ok(rec)
    }

    /// Writes the record to a new memfd and seals it.
    pub fn to_memfd(&self) -> std::io::Result<OwnedFd> {
        let fd = rustix::fs::memfd_create(
            "holdfast-state",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&self.encode())?;
        let fd = OwnedFd::from(file);
        rustix::fs::fcntl_add_seals(
            &fd,
            SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
        )?;
        Ok(fd)
    }

    /// Reads a record from a memfd written by [`Self::to_memfd`].
    pub fn from_memfd(fd: &OwnedFd) -> Result<Self, RecordError> {
        let len = rustix::fs::fstat(fd)
            .map_err(|e| RecordError::Io(e.into()))?
            .st_size;
        let len = u64::try_from(len).unwrap_or(0);
        if len > MAX_RECORD_LEN {
            return Err(RecordError::Io(std::io::Error::other(format!(
                "{len} bytes, more than {MAX_RECORD_LEN}"
            ))));
        }
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        let file = std::fs::File::from(fd.as_fd().try_clone_to_owned().map_err(RecordError::Io)?);
        file.read_exact_at(&mut buf, 0).map_err(RecordError::Io)?;
        Self::decode(&buf)
    }
}

impl ExportRecord {
    fn put(&self, w: &mut Writer) {
        w.str(&self.name, MAX_NAME_LEN)
            .u64(self.size)
            .u64(self.last_epoch);
        match &self.frontend {
            // A FUSE export that allows direct mode has its own tag, so
            // that records of brokers before direct mode read as they are.
            FrontendRecord::Fuse(f) => {
                w.u8(if f.direct { 4 } else { 1 })
                    .u64(f.id)
                    .str(path_str(&f.mount), MAX_TEXT)
                    .u32(f.conns)
                    .bool(f.device.is_some())
                    .u32(f.device.unwrap_or(0))
                    .u32(f.minor)
                    .u64(f.flags);
            }
            FrontendRecord::Ublk { dev_id } => {
                w.u8(2).u32(*dev_id);
            }
            FrontendRecord::Cachefiles => {
                w.u8(3);
            }
        }
        w.u32(u32::try_from(self.stored.len()).unwrap_or(0));
        for (name, id) in &self.stored {
            w.str(name, MAX_NAME_LEN).u64(*id);
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let name = r.str("export.name", MAX_NAME_LEN)?;
        let size = r.u64("export.size")?;
        let last_epoch = r.u64("export.last_epoch")?;
        let frontend = match r.u8("export.frontend")? {
            tag @ (1 | 4) => {
                let id = r.u64("fuse.id")?;
                let mount = PathBuf::from(r.str("fuse.mount", MAX_TEXT)?);
                let conns = r.u32("fuse.conns")?;
                if conns == 0 || conns as usize > MAX_CONNS {
                    return Err(DecodeError::BadValue {
                        field: "fuse.conns",
                        value: u64::from(conns),
                    });
                }
                let has_device = r.bool("fuse.device")?;
                let device = r.u32("fuse.device")?;
                FrontendRecord::Fuse(FuseRecord {
                    id,
                    mount,
                    conns,
                    device: has_device.then_some(device),
                    minor: r.u32("fuse.minor")?,
                    flags: r.u64("fuse.flags")?,
                    direct: tag == 4,
                })
            }
            2 => FrontendRecord::Ublk {
                dev_id: r.u32("ublk.dev_id")?,
            },
            3 => FrontendRecord::Cachefiles,
            v => {
                return Err(DecodeError::BadValue {
                    field: "export.frontend",
                    value: u64::from(v),
                });
            }
        };
        let mut e = Self {
            name,
            size,
            last_epoch,
            frontend,
            stored: Vec::new(),
        };
        for _ in 0..r.count("export.stored", crate::export::MAX_STORED_FDS)? {
            e.stored
                .push((r.str("stored.name", MAX_NAME_LEN)?, r.u64("stored.id")?));
        }
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn sample() -> Record {
        Record {
            seq: 9,
            next_id: 31,
            exports: vec![
                ExportRecord {
                    name: "vol0".into(),
                    size: 1 << 30,
                    last_epoch: 12,
                    frontend: FrontendRecord::Fuse(FuseRecord {
                        id: 3,
                        mount: "/run/holdfast/mnt/vol0".into(),
                        conns: 4,
                        device: Some(7),
                        minor: 45,
                        flags: fuse_abi::linux::FUSE_HAS_RESEND | 1,
                        direct: true,
                    }),
                    stored: vec![("mem".into(), 30)],
                },
                ExportRecord {
                    name: "relay".into(),
                    size: 1 << 20,
                    last_epoch: 2,
                    frontend: FrontendRecord::Fuse(FuseRecord {
                        id: 4,
                        mount: "/run/holdfast/mnt/relay".into(),
                        conns: 1,
                        device: None,
                        minor: 39,
                        flags: 1,
                        direct: false,
                    }),
                    stored: vec![],
                },
                ExportRecord {
                    name: "vol1".into(),
                    size: 1 << 20,
                    last_epoch: 1,
                    frontend: FrontendRecord::Ublk { dev_id: 2 },
                    stored: vec![],
                },
                ExportRecord {
                    name: "images".into(),
                    size: 0,
                    last_epoch: 4,
                    frontend: FrontendRecord::Cachefiles,
                    stored: vec![],
                },
            ],
            supervised: vec![SupervisedRecord {
                cmd: "holdfast-daemon --export vol0 --backend mem".into(),
                pid: 77,
                start_time: 123_456,
            }],
            upgrade: Some(UpgradeRecord {
                old_pid: 5,
                old_version: "0.1.0".into(),
                stopped_ns: 99,
                serving: vec!["vol0".into()],
            }),
            restarts: 4,
        }
    }

    #[test]
    fn round_trip_through_a_sealed_memfd() {
        let rec = sample();
        let fd = rec.to_memfd().unwrap();
        assert_eq!(Record::from_memfd(&fd).unwrap(), rec);
        // Sealed: nobody can change it once it is passed on.
        let file = std::fs::File::from(fd);
        assert!(file.write_at(b"x", 0).is_err());
        assert!(file.set_len(1).is_err());
    }

    #[test]
    fn layout_1_is_read_with_no_restarts() {
        let mut rec = sample();
        rec.restarts = 0;
        let mut v1 = rec.encode();
        v1[4] = 1;
        v1.truncate(v1.len() - 8);
        assert_eq!(Record::decode(&v1).unwrap(), rec);
        assert!(readable().starts_with("(restart record 1) (restart record 2)"));
    }

    #[test]
    fn damage_is_an_error_never_a_panic() {
        let buf = sample().encode();
        for cut in 0..buf.len() {
            assert!(Record::decode(&buf[..cut]).is_err(), "cut at {cut}");
        }
        for i in 0..buf.len() {
            for v in [0u8, 1, 0x7f, 0xff] {
                let mut b = buf.clone();
                b[i] = v;
                let _ = Record::decode(&b);
            }
        }
        let mut newer = buf.clone();
        newer[4] = 3;
        assert!(matches!(
            Record::decode(&newer),
            Err(RecordError::Version(3))
        ));
        let mut trailing = buf;
        trailing.push(0);
        assert!(Record::decode(&trailing).is_err());
    }
}
