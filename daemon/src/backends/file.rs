//! `file:PATH`: an export stored in a local file, created sparse at the
//! export's size if missing. Flushes are fdatasync; the lease is a flock on
//! the file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::FdBackend;
use crate::Error;
use crate::lease::Lease;

/// Opens (creating it sparse, or growing it) the file of an export of
/// `size` bytes, without taking its lease.
pub fn open(path: &Path, size: u64) -> Result<FdBackend, Error> {
    let what = path.display().to_string();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    }
    // A new backing file is readable by its owner only, like the export.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("cannot open {what}"), e))?;
    let lock = File::open(path).map_err(|e| Error::io(format!("cannot open {what}"), e))?;
    let lease = Lease::new(lock, &what);
    // Growing is safe without the lease: a predecessor never shrinks it.
    let len = file
        .metadata()
        .map_err(|e| Error::io(format!("cannot stat {what}"), e))?
        .len();
    if len < size {
        file.set_len(size)
            .map_err(|e| Error::io(format!("cannot grow {what} to {size} bytes"), e))?;
    }
    Ok(FdBackend::new(file, true, lease))
}
