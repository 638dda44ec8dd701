//! Loop devices (Documentation/admin-guide/devices.txt, loop(4)): a block
//! device over a file. Constants and layouts are from
//! include/uapi/linux/loop.h (LOOP_CONFIGURE since Linux 5.8).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

/// ioctls on /dev/loop-control and /dev/loopN.
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;

/// `lo_flags`: the loop driver does direct I/O on the backing file, so
/// blocks are not cached twice (once for the loop device, once for the file).
const LO_FLAGS_DIRECT_IO: u32 = 16;

const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// How many times a free device is looked for when another process takes
/// the one LOOP_CTL_GET_FREE named (EBUSY from LOOP_CONFIGURE).
const CLAIM_ATTEMPTS: usize = 16;

/// An attached loop device.
#[derive(Debug)]
pub struct LoopDevice {
    pub number: u32,
    /// Whether the driver does direct I/O on the backing file.
    pub direct_io: bool,
}

impl LoopDevice {
    pub fn path(&self) -> PathBuf {
        format!("/dev/loop{}", self.number).into()
    }

    /// The device's directory in sysfs.
    pub fn sysfs(&self) -> PathBuf {
        format!("/sys/block/loop{}", self.number).into()
    }

    /// Attaches a free loop device to `backing` with logical block size
    /// `block_size`, with direct I/O if the kernel allows it on that file
    /// (it refuses with EINVAL when the file's alignment does not fit).
    /// `name` is what `losetup -l` shows as the backing file.
    pub fn attach(backing: &File, block_size: u32, name: &str) -> io::Result<Self> {
        let control = open("/dev/loop-control")?;
        let mut last = io::Error::from(io::ErrorKind::WouldBlock);
        for _ in 0..CLAIM_ATTEMPTS {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument.
            let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            let number = u32::try_from(n).map_err(|_| io::Error::last_os_error())?;
            let dev = open(&format!("/dev/loop{number}"))?;
            let mut result = configure(&dev, backing, block_size, name, LO_FLAGS_DIRECT_IO);
            if matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
                result = configure(&dev, backing, block_size, name, 0);
            }
            match result {
                Ok(()) => return Ok(Self::numbered(number)),
                // Taken by someone else between GET_FREE and CONFIGURE.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    fn numbered(number: u32) -> Self {
        let mut d = Self {
            number,
            direct_io: false,
        };
        d.direct_io =
            std::fs::read_to_string(d.sysfs().join("loop/dio")).is_ok_and(|s| s.trim() == "1");
        d
    }

    /// The device `number` that a previous broker attached to `backing`
    /// (checked in sysfs: a device detached since, or given to another
    /// file, is not taken).
    pub fn existing(number: u32, backing: &Path) -> io::Result<Self> {
        let d = Self::numbered(number);
        let file = std::fs::read_to_string(d.sysfs().join("loop/backing_file"))?;
        if Path::new(file.trim()) != backing {
            return Err(io::Error::other(format!(
                "{} is attached to {:?}, not to {}",
                d.path().display(),
                file.trim(),
                backing.display()
            )));
        }
        Ok(d)
    }

    /// Detaches the backing file. On a device still open, the kernel
    /// detaches when the last opener closes it (autoclear).
    pub fn detach(&self) -> io::Result<()> {
        let dev = open(&self.path().to_string_lossy())?;
        // SAFETY: LOOP_CLR_FD takes no argument.
        if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CLR_FD) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn open(path: &str) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

fn configure(
    dev: &OwnedFd,
    backing: &File,
    block_size: u32,
    name: &str,
    flags: u32,
) -> io::Result<()> {
    let mut file_name = [0u8; LO_NAME_SIZE];
    // At most LO_NAME_SIZE - 1 bytes: the kernel expects a NUL.
    for (d, s) in file_name
        .iter_mut()
        .zip(name.bytes().take(LO_NAME_SIZE.saturating_sub(1)))
    {
        *d = s;
    }
    let cfg = LoopConfig {
        fd: u32::try_from(backing.as_raw_fd())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        block_size,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: file_name,
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `cfg` is.
    if unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &raw const cfg) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_uapi_header() {
        assert_eq!(size_of::<LoopInfo64>(), 232);
        assert_eq!(size_of::<LoopConfig>(), 304);
    }
}
