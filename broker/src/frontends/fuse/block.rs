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
    let mut targets = vec![file.to_path_buf()];
    let mut found = Vec::new();
    if let Some(d) = device {
        targets.push(d.path());
        if d.claimed() {
            found.push(format!(
                "{} is mounted or held exclusively",
                d.path().display()
            ));
        }
        if let Ok(dir) = std::fs::read_dir(d.sysfs().join("holders")) {
            for h in dir.flatten() {
                found.push(format!(
                    "{} is under {}",
                    d.path().display(),
                    h.file_name().to_string_lossy()
                ));
            }
        }
    }
    found.extend(open_by(&targets));
    found
}

/// Processes with one of `targets` open, from /proc/PID/fd. Reads the links
/// only: stat(2) on another process's files could block on a hung mount.
fn open_by(targets: &[std::path::PathBuf]) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let pid = p.file_name();
        let pid = pid.to_string_lossy();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        let hit = fds
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .find(|l| targets.iter().any(|t| t == l));
        if let Some(path) = hit {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            found.push(format!(
                "pid {pid} ({}) has {} open",
                comm.trim(),
                path.display()
            ));
        }
    }
    found
}
