//! An export's block device: a loop device over the export's FUSE file,
//! with direct I/O where the kernel allows it so that blocks are cached
//! once (by whoever uses the device), not again in the file's page cache.
//! The loop driver turns discard into FALLOCATE(PUNCH_HOLE | KEEP_SIZE) and
//! write-zeroes into FALLOCATE(ZERO_RANGE) on the file, which the frontend
//! forwards to the daemon.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::sys::loopdev::LoopDevice;

/// Attaches a loop device to the export file `file`.
pub fn attach(file: &Path, block_size: u32) -> io::Result<LoopDevice> {
    let backing = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(file)?;
    // The loop driver keeps its own reference to the open file.
    LoopDevice::attach(&backing, block_size, &file.to_string_lossy()).map_err(|e| {
        let hint = if e.kind() == io::ErrorKind::NotFound {
            " (no /dev/loop-control: load the loop module, modprobe loop)"
        } else {
            ""
        };
        io::Error::new(e.kind(), format!("cannot attach a loop device: {e}{hint}"))
    })
}

/// Who holds the export open, in words a person can act on: processes with
/// the device or the file open, a mount or another exclusive holder of the
/// device, and stacked devices (device-mapper, md) over it. Empty if none.
pub fn users(file: &Path, device: Option<&LoopDevice>) -> Vec<String> {
    let path = device.map(LoopDevice::path);
    let mut found = crate::frontends::holders(path.as_deref(), &[file.to_path_buf()]);
    if let Some(d) = device
        && let Ok(dir) = std::fs::read_dir(d.sysfs().join("holders"))
    {
        for h in dir.flatten() {
            found.push(format!(
                "{} is under {}",
                d.path().display(),
                h.file_name().to_string_lossy()
            ));
        }
    }
    found
}
