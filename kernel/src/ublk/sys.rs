//! The ublk kernel interface (Documentation/block/ublk.rst): layouts and
//! constants from include/uapi/linux/ublk_cmd.h as of Linux 6.12 (flag names
//! to 7.3), and the
//! control device /dev/ublk-control, driven with io_uring URING_CMD on a
//! ring of 128-byte submissions (the control command is 32 bytes).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use rustix::fs::{Mode, OFlags};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `struct ublksrv_ctrl_cmd`: the command in a control submission.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct CtrlCmd {
    pub dev_id: u32,
    /// u16::MAX unless the command is for one queue.
    pub queue_id: u16,
    /// Bytes at `addr`.
    pub len: u16,
    pub addr: u64,
    pub data: [u64; 1],
    pub dev_path_len: u16,
    pub pad: u16,
    pub reserved: u32,
}

/// `struct ublksrv_ctrl_dev_info`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DevInfo {
    pub nr_hw_queues: u16,
    pub queue_depth: u16,
    /// One of `STATE_*`.
    pub state: u16,
    pub pad0: u16,
    pub max_io_buf_bytes: u32,
    pub dev_id: u32,
    pub ublksrv_pid: i32,
    pub pad1: u32,
    /// `F_*` bits.
    pub flags: u64,
    pub ublksrv_flags: u64,
    pub owner_uid: u32,
    pub owner_gid: u32,
    pub reserved1: u64,
    pub reserved2: u64,
}

/// `struct ublk_param_basic`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ParamBasic {
    pub attrs: u32,
    pub logical_bs_shift: u8,
    pub physical_bs_shift: u8,
    pub io_opt_shift: u8,
    pub io_min_shift: u8,
    pub max_sectors: u32,
    pub chunk_sectors: u32,
    pub dev_sectors: u64,
    pub virt_boundary_mask: u64,
}

/// `struct ublk_param_discard`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ParamDiscard {
    pub discard_alignment: u32,
    pub discard_granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_discard_segments: u16,
    pub reserved0: u16,
}

/// The head of `struct ublk_params` with the parameter types the broker
/// sets; `len` tells the kernel how much of the struct is given.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Params {
    pub len: u32,
    /// `PARAM_TYPE_*` bits: which of the parts below are valid.
    pub types: u32,
    pub basic: ParamBasic,
    pub discard: ParamDiscard,
    /// Pads to the 8-byte alignment `struct ublk_params` has.
    pub pad: u32,
}

/// `struct ublksrv_io_desc`: one tag's request, in the array the server
/// maps from /dev/ublkcN.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoDesc {
    /// Op in bits 0-7 (`IO_OP_*`), flags above (`IO_F_*` shifted by 8).
    pub op_flags: u32,
    pub nr_sectors: u32,
    pub start_sector: u64,
    pub addr: u64,
}

/// `struct ublksrv_io_cmd`: a queue's FETCH / COMMIT_AND_FETCH command.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IoCmd {
    pub q_id: u16,
    pub tag: u16,
    /// Bytes done, or a negative errno (COMMIT only).
    pub result: i32,
    /// The tag's buffer in the server's memory (FETCH).
    pub addr: u64,
}

/// `_IOR` / `_IOWR` (include/uapi/asm-generic/ioctl.h) with type 'u'.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | ((b'u' as u32) << 8) | nr
}
const IOC_WRITE_READ: u32 = 3;
const IOC_READ: u32 = 2;
const CTRL: usize = size_of::<CtrlCmd>();
const IO: usize = size_of::<IoCmd>();

/// Control commands (`UBLK_U_CMD_*`).
pub const CMD_GET_DEV_INFO: u32 = ioc(IOC_READ, 0x02, CTRL);
pub const CMD_ADD_DEV: u32 = ioc(IOC_WRITE_READ, 0x04, CTRL);
pub const CMD_DEL_DEV: u32 = ioc(IOC_WRITE_READ, 0x05, CTRL);
pub const CMD_START_DEV: u32 = ioc(IOC_WRITE_READ, 0x06, CTRL);
pub const CMD_STOP_DEV: u32 = ioc(IOC_WRITE_READ, 0x07, CTRL);
pub const CMD_SET_PARAMS: u32 = ioc(IOC_WRITE_READ, 0x08, CTRL);
pub const CMD_START_USER_RECOVERY: u32 = ioc(IOC_WRITE_READ, 0x10, CTRL);
pub const CMD_END_USER_RECOVERY: u32 = ioc(IOC_WRITE_READ, 0x11, CTRL);
pub const CMD_GET_FEATURES: u32 = ioc(IOC_READ, 0x13, CTRL);
/// Linux 6.16, on a device added with [`F_QUIESCE`].
pub const CMD_QUIESCE_DEV: u32 = ioc(IOC_WRITE_READ, 0x16, CTRL);

/// Queue commands (`UBLK_U_IO_*`).
pub const IO_FETCH_REQ: u32 = ioc(IOC_WRITE_READ, 0x20, IO);
pub const IO_COMMIT_AND_FETCH_REQ: u32 = ioc(IOC_WRITE_READ, 0x21, IO);

/// Device flags (`UBLK_F_*`).
pub const F_USER_RECOVERY: u64 = 1 << 3;
pub const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
pub const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
/// QUIESCE_DEV (Linux 6.16).
pub const F_QUIESCE: u64 = 1 << 12;
/// Names of the flag bits, for reports (bit 0 upwards, as of Linux 7.3).
pub const FLAG_NAMES: [&str; 21] = [
    "SUPPORT_ZERO_COPY",
    "URING_CMD_COMP_IN_TASK",
    "NEED_GET_DATA",
    "USER_RECOVERY",
    "USER_RECOVERY_REISSUE",
    "UNPRIVILEGED_DEV",
    "CMD_IOCTL_ENCODE",
    "USER_COPY",
    "ZONED",
    "USER_RECOVERY_FAIL_IO",
    "UPDATE_SIZE",
    "AUTO_BUF_REG",
    "QUIESCE",
    "PER_IO_DAEMON",
    "BUF_REG_OFF_DAEMON",
    "BATCH_IO",
    "INTEGRITY",
    "SAFE_STOP_DEV",
    "NO_AUTO_PART_SCAN",
    "SHMEM_ZC",
    "IO_DESC_SIZE",
];

/// What GET_FEATURES said this kernel's driver supports (`UBLK_F_*`
/// bits): decided at run time, never from a version number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features(pub u64);

impl Features {
    /// What every device the broker makes needs: recovery with re-issue
    /// (the broker's own restart keeps requests) and ioctl-encoded
    /// commands (the only encoding `sys` speaks).
    pub const NEEDED: u64 = F_USER_RECOVERY | F_USER_RECOVERY_REISSUE | F_CMD_IOCTL_ENCODE;

    pub fn has(self, flags: u64) -> bool {
        self.0 & flags == flags
    }

    /// The names of the bits set in `flags`, joined with `|` (unknown
    /// bits as `bitN`).
    pub fn names(flags: u64) -> String {
        let name = |bit: usize| {
            FLAG_NAMES
                .get(bit)
                .map_or_else(|| format!("bit{bit}"), |n| (*n).to_owned())
        };
        let set: Vec<String> = (0..64).filter(|b| flags >> b & 1 == 1).map(name).collect();
        if set.is_empty() {
            "none".to_owned()
        } else {
            set.join("|")
        }
    }

    /// Fails, with what is missing, unless this kernel has `NEEDED`.
    pub fn check(self) -> io::Result<()> {
        if self.has(Self::NEEDED) {
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!(
                "this kernel's ublk driver lacks {} (GET_FEATURES: {:#x}); the broker needs it to \
                 keep a device's requests across its own restart (ublk_drv of Linux 6.0 or later)",
                Self::names(Self::NEEDED & !self.0),
                self.0
            ),
        ))
    }
}

/// Device states (`UBLK_S_DEV_*`).
pub const STATE_DEAD: u16 = 0;
pub const STATE_LIVE: u16 = 1;
pub const STATE_QUIESCED: u16 = 2;

/// `ublk_param_basic.attrs`: the device caches writes until a flush.
pub const ATTR_VOLATILE_CACHE: u32 = 1 << 2;

/// `ublk_params.types` bits.
pub const PARAM_TYPE_BASIC: u32 = 1 << 0;
pub const PARAM_TYPE_DISCARD: u32 = 1 << 1;

/// Request ops (`UBLK_IO_OP_*`, bits 0-7 of `IoDesc::op_flags`).
pub const IO_OP_READ: u8 = 0;
pub const IO_OP_WRITE: u8 = 1;
pub const IO_OP_FLUSH: u8 = 2;
pub const IO_OP_DISCARD: u8 = 3;
pub const IO_OP_WRITE_ZEROES: u8 = 5;

/// A queue command's completion: a request is in the tag's descriptor, or
/// the queue is going away (`UBLK_IO_RES_ABORT` is -ENODEV).
pub const IO_RES_OK: i32 = 0;
pub const IO_RES_ABORT: i32 = -libc::ENODEV;

/// Where the descriptor array is in /dev/ublkcN's mmap space.
pub const CMD_BUF_OFFSET: u64 = 0;
/// Most tags per queue.
pub const MAX_QUEUE_DEPTH: u16 = 4096;

/// /dev/ublk-control and the ring its commands go through.
pub struct Control {
    fd: OwnedFd,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
}

impl Control {
    pub fn open() -> io::Result<Self> {
        let fd = rustix::fs::open(
            "/dev/ublk-control",
            OFlags::RDWR | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4)?;
        Ok(Self { fd, ring })
    }

    /// Runs one control command and waits for its result: bytes moved, or
    /// zero (a negative result is returned as the error).
    fn cmd(&mut self, op: u32, dev_id: u32, buf: Option<&mut [u8]>, data0: u64) -> io::Result<i32> {
        let (addr, len) = match buf {
            Some(b) => (
                b.as_mut_ptr() as u64,
                u16::try_from(b.len()).unwrap_or(u16::MAX),
            ),
            None => (0, 0),
        };
        let c = CtrlCmd {
            dev_id,
            queue_id: u16::MAX,
            len,
            addr,
            data: [data0],
            ..CtrlCmd::default()
        };
        let mut cmd = [0u8; 80];
        if let Some(head) = cmd.get_mut(..CTRL) {
            head.copy_from_slice(c.as_bytes());
        }
        let sqe = opcode::UringCmd80::new(types::Fd(self.fd.as_raw_fd()), op)
            .cmd(cmd)
            .build();
        // SAFETY: the command's buffer (if any) outlives the call: we wait
        // for the completion below before returning.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("the ublk control ring is full"))?;
        self.ring.submit_and_wait(1)?;
        let res = self
            .ring
            .completion()
            .next()
            .map(|c| c.result())
            .ok_or_else(|| io::Error::other("no completion from /dev/ublk-control"))?;
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        Ok(res)
    }

    /// The `UBLK_F_*` bits this kernel supports.
    pub fn features(&mut self) -> io::Result<Features> {
        let mut f = [0u8; 8];
        self.cmd(CMD_GET_FEATURES, 0, Some(&mut f), 0)
            .map_err(|e| io::Error::new(e.kind(), format!("ublk GET_FEATURES: {e}")))?;
        Ok(Features(u64::from_le_bytes(f)))
    }

    /// Adds a device (`info.dev_id` u32::MAX: the kernel picks the id);
    /// returns the info with the id and flags the kernel filled in.
    pub fn add(&mut self, info: &DevInfo) -> io::Result<DevInfo> {
        let mut i = *info;
        self.cmd(CMD_ADD_DEV, info.dev_id, Some(i.as_mut_bytes()), 0)?;
        Ok(i)
    }

    pub fn set_params(&mut self, dev_id: u32, params: &Params) -> io::Result<()> {
        let mut p = *params;
        self.cmd(CMD_SET_PARAMS, dev_id, Some(p.as_mut_bytes()), 0)
            .map(drop)
    }

    pub fn info(&mut self, dev_id: u32) -> io::Result<DevInfo> {
        let mut i = DevInfo::default();
        self.cmd(CMD_GET_DEV_INFO, dev_id, Some(i.as_mut_bytes()), 0)?;
        Ok(i)
    }

    /// Starts the device once every tag of every queue is fetched; `pid`
    /// is the server the kernel reports (and watches).
    pub fn start(&mut self, dev_id: u32, pid: u32) -> io::Result<()> {
        self.cmd(CMD_START_DEV, dev_id, None, u64::from(pid))
            .map(drop)
    }

    pub fn stop(&mut self, dev_id: u32) -> io::Result<()> {
        self.cmd(CMD_STOP_DEV, dev_id, None, 0).map(drop)
    }

    pub fn delete(&mut self, dev_id: u32) -> io::Result<()> {
        self.cmd(CMD_DEL_DEV, dev_id, None, 0).map(drop)
    }

    /// Begins recovering a QUIESCED device: EBUSY while anyone still holds
    /// /dev/ublkcN open.
    pub fn start_recovery(&mut self, dev_id: u32) -> io::Result<()> {
        self.cmd(CMD_START_USER_RECOVERY, dev_id, None, 0).map(drop)
    }

    /// Ends recovery once the new server has fetched every tag.
    pub fn end_recovery(&mut self, dev_id: u32, pid: u32) -> io::Result<()> {
        self.cmd(CMD_END_USER_RECOVERY, dev_id, None, u64::from(pid))
            .map(drop)
    }

    /// Quiesces a LIVE device with a server (a planned handoff), as read in
    /// 7.3's `ublk_ctrl_quiesce_dev`: new requests wait in the kernel
    /// (requeued), then, once the server has an idle tag (up to
    /// `timeout_ms`, 0 for ever; EBUSY after), its idle FETCHes complete
    /// aborted. The tags it holds come back with its COMMITs. The device
    /// stays LIVE until the server closes /dev/ublkcN; then it is QUIESCED,
    /// to be recovered by the next server.
    pub fn quiesce(&mut self, dev_id: u32, timeout_ms: u64) -> io::Result<()> {
        self.cmd(CMD_QUIESCE_DEV, dev_id, None, timeout_ms)
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_and_commands_match_the_uapi_header() {
        assert_eq!(size_of::<CtrlCmd>(), 32);
        assert_eq!(size_of::<DevInfo>(), 64);
        assert_eq!(size_of::<ParamBasic>(), 32);
        assert_eq!(size_of::<ParamDiscard>(), 20);
        assert_eq!(size_of::<IoDesc>(), 24);
        assert_eq!(size_of::<IoCmd>(), 16);
        // Values of the _IOR/_IOWR macros, as C computes them.
        assert_eq!(CMD_ADD_DEV, 0xc020_7504);
        assert_eq!(CMD_GET_DEV_INFO, 0x8020_7502);
        assert_eq!(CMD_GET_FEATURES, 0x8020_7513);
        assert_eq!(CMD_QUIESCE_DEV, 0xc020_7516);
        assert_eq!(IO_FETCH_REQ, 0xc010_7520);
        assert_eq!(IO_COMMIT_AND_FETCH_REQ, 0xc010_7521);
    }

    #[test]
    fn features_are_named_and_checked() {
        // What Debian's 6.12 and 7.3 report.
        let (v612, v73) = (Features(0x1fe), Features(0x1f_ffff));
        assert!(v612.check().is_ok() && v73.check().is_ok());
        assert!(!v612.has(1 << 12) && v73.has(1 << 12));
        assert_eq!(
            Features::names(0x58),
            "USER_RECOVERY|USER_RECOVERY_REISSUE|CMD_IOCTL_ENCODE"
        );
        assert_eq!(Features::names(1 << 40), "bit40");
        assert_eq!(Features::names(0), "none");
        let e = Features(F_USER_RECOVERY | F_CMD_IOCTL_ENCODE)
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("lacks USER_RECOVERY_REISSUE"), "{e}");
    }
}
