//! `mem`: an export kept in a memfd that the daemon deposits in the broker's
//! fd store. A restarted daemon gets the same memfd back, so the contents
//! survive daemon crashes and broker upgrades (not broker crashes or
//! reboots). A broker that lost the memfd with its predecessor says so
//! (the error code `lost`), and this daemon then refuses to start on a
//! fresh one: the device's users hold the old contents.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};

use rustix::fs::MemfdFlags;

use super::{FdBackend, OpenContext};
use crate::Error;
use crate::lease::Lease;

/// Name of the memfd in the export's fd store.
pub const FDSTORE_NAME: &str = "mem";

pub fn open(ctx: OpenContext<'_>) -> Result<FdBackend, Error> {
    let file = match ctx.conn.fd_get(FDSTORE_NAME)? {
        Some(fd) => File::from(fd),
        None => {
            let fd = rustix::fs::memfd_create(
                format!("holdfast-mem-{}", ctx.export),
                MemfdFlags::CLOEXEC,
            )
            .map_err(|e| Error::io("memfd_create", e.into()))?;
            let file = File::from(fd);
            file.set_len(ctx.size)
                .map_err(|e| Error::io("cannot size the memfd", e))?;
            ctx.conn.fd_put(FDSTORE_NAME, file.as_fd())?;
            crate::log(&format!(
                "created a {} byte memfd and deposited it in the broker's fd store",
                ctx.size
            ));
            file
        }
    };
    // The fd store hands out the broker's open file description, which a
    // predecessor shares; reopening gives this daemon its own to lock.
    let what = format!("the {} memfd", ctx.export);
    let lock = File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| Error::io(format!("cannot reopen {what}"), e))?;
    let lease = Lease::new(lock, what);
    let len = file
        .metadata()
        .map_err(|e| Error::io("cannot stat the memfd", e))?
        .len();
    if len < ctx.size {
        return Err(Error::Protocol(format!(
            "the stored memfd is {len} bytes, the export is {} bytes",
            ctx.size
        )));
    }
    Ok(FdBackend::new(file, false, lease))
}
