//! Direct mode on a ublk export: the daemon opens /dev/ublkcN and serves
//! the queue itself; the broker keeps the device's control side and never
//! opens /dev/ublkcN (START_USER_RECOVERY is EBUSY while anyone holds it).
//! The kernel keeps custody of the requests: when the server's /dev/ublkcN
//! closes (it died, was fenced, or handed off) the device goes QUIESCED,
//! and with USER_RECOVERY_REISSUE the next server gets every request again.
//!
//! At each RESTORE the broker tells the kernel who serves the device
//! (`Custody::serve_by`): START_DEV for the first server, a recovery for
//! any later one, nothing for the server it has (a daemon that went on
//! serving while the broker restarted). START_DEV and END_USER_RECOVERY
//! wait in the kernel until the server has fetched every tag, which it does
//! after RESTORED: they run on a thread of their own, and a handoff's stall
//! ends when they return (`Export::served`).
//!
//! A planned handoff on a device added with `UBLK_F_QUIESCE` (Linux 6.16,
//! where GET_FEATURES has it) begins with QUIESCE_DEV (`Custody::quiesce`):
//! the kernel hands the old daemon nothing new and takes back its idle
//! tags, so all it has to do is answer what it holds and close. Without it
//! (6.12) the daemon stops by itself and leaves what came after its stop
//! to the kernel to re-issue; the order is the same.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use holdfast_kernel::ublk::sys::{self, Control, DevInfo};
use holdfast_proto::{DirectTerms, UblkTerms};

use super::{RECOVER_WAIT, UblkDevice, misfit, quiesced, start_recovery};
use crate::export::Export;
use crate::frontends::{Lender, Serving, Target};
use crate::{info, warn};

/// How long QUIESCE_DEV waits for the server to have an idle tag (it
/// holds the device's lock meanwhile, and the export's lock is held too).
const QUIESCE_WAIT_MS: u64 = 100;

/// The device of a direct-mode export, lent to its daemons.
struct Custody {
    name: String,
    export: Weak<Export>,
    dev_id: u32,
    depth: u16,
    buf_size: u32,
    /// Added with `UBLK_F_QUIESCE`: a handoff begins with QUIESCE_DEV.
    quiesce: bool,
    /// Taken over from a previous broker and not served since: its server
    /// may be a daemon that went on serving, and attaches again.
    adopted: AtomicBool,
}

/// Makes `export`'s daemons the servers of the device `info` describes.
pub(super) fn lend(export: &Arc<Export>, info: &DevInfo, adopted: bool) {
    export.set_lender(Arc::new(Custody {
        name: export.name().to_owned(),
        export: Arc::downgrade(export),
        dev_id: info.dev_id,
        depth: info.queue_depth,
        buf_size: info.max_io_buf_bytes,
        quiesce: info.flags & sys::F_QUIESCE != 0,
        adopted: AtomicBool::new(adopted),
    }));
}

/// Takes over the device `dev_id` a previous broker left for `export`, in
/// whatever state it is: a daemon may still serve it (it attaches again),
/// or the next daemon's RESTORE recovers it.
pub(super) fn adopt(export: &Arc<Export>, dev_id: u32, record: PathBuf) -> io::Result<UblkDevice> {
    let info = Control::open()?.info(dev_id)?;
    if info.nr_hw_queues != 1 || info.max_io_buf_bytes > export.slot_size() {
        return Err(misfit(dev_id, &info));
    }
    // What the old broker's daemon acknowledged may be in its page cache.
    export.assume_dirty();
    lend(export, &info, true);
    info!(
        "{}: ublk device {dev_id} taken over in state {} (server pid {}); its next daemon serves it",
        export.name(),
        info.state,
        info.ublksrv_pid
    );
    Ok(UblkDevice { dev_id, record })
}

impl Custody {
    /// Runs START_DEV or END_USER_RECOVERY for `pid` on a thread: each
    /// returns once `pid` has fetched every tag, and the export hears of
    /// it. One for a server that died first fails (EINVAL: not the server);
    /// the next daemon's goes on.
    fn await_server(&self, pid: u32, recovery: bool) -> io::Result<Serving> {
        let (name, id, export) = (self.name.clone(), self.dev_id, self.export.clone());
        let step = if recovery {
            "END_USER_RECOVERY"
        } else {
            "START_DEV"
        };
        let began = Instant::now();
        std::thread::Builder::new()
            .name(format!("ublk-serve-{name}"))
            .spawn(move || {
                let done = Control::open().and_then(|mut c| {
                    if recovery {
                        c.end_recovery(id, pid)
                    } else {
                        c.start(id, pid)
                    }
                });
                let took = began.elapsed().as_secs_f64() * 1e3;
                let result = match done {
                    Ok(()) if recovery => {
                        info!("{name}: ublk device {id} recovered, served by pid {pid} ({took:.3} ms after its RESTORE)");
                        Ok(())
                    }
                    Ok(()) => {
                        info!("{name}: block device /dev/ublkb{id} started, served by pid {pid}");
                        Ok(())
                    }
                    Err(e) => {
                        warn!("{name}: ublk device {id}: {step} for pid {pid}: {e}");
                        Err(format!("{step}: {e}"))
                    }
                };
                if let Some(export) = export.upgrade() {
                    export.served(pid, result);
                }
            })
            .map(|_| Serving::Later)
    }
}

impl Lender for Custody {
    fn terms(&self) -> Result<DirectTerms, String> {
        Ok(DirectTerms::Ublk(UblkTerms {
            dev_id: self.dev_id,
            depth: self.depth,
            buf_size: self.buf_size,
        }))
    }

    fn lend(&self) -> io::Result<Vec<std::os::fd::OwnedFd>> {
        Ok(Vec::new())
    }

    fn park(&self) -> io::Result<()> {
        Ok(())
    }

    fn resend(&self) -> io::Result<()> {
        Ok(())
    }

    fn unpark(&self) {}

    fn is_resent(&self, _tag: u64) -> bool {
        false
    }

    /// The requests the block layer has started and not seen completed
    /// (`/sys/block/ublkbN/inflight`: reads, writes): the daemon holds
    /// them, or has them on its ring.
    fn waiting(&self) -> Option<u64> {
        let path = format!("/sys/block/ublkb{}/inflight", self.dev_id);
        parse_inflight(&std::fs::read_to_string(path).ok()?)
    }

    fn serve_by(&self, pid: u32) -> io::Result<Serving> {
        let mut ctl = Control::open()?;
        let info = ctl.info(self.dev_id)?;
        // Only where this broker never served it: in any other LIVE state
        // the server has closed /dev/ublkcN and the kernel is yet to see
        // it (a revived handoff predecessor opens the device again).
        let adopted = self.adopted.swap(false, Ordering::SeqCst);
        let pid_i32 = i32::try_from(pid).unwrap_or(-1);
        match info.state {
            sys::STATE_DEAD => self.await_server(pid, false),
            sys::STATE_LIVE if adopted && info.ublksrv_pid == pid_i32 => {
                info!(
                    "{}: ublk device {} is served by pid {pid} already",
                    self.name, self.dev_id
                );
                Ok(Serving::Now)
            }
            _ => {
                let end = Instant::now() + RECOVER_WAIT;
                quiesced(&mut ctl, self.dev_id, end)?;
                start_recovery(&mut ctl, self.dev_id, end)?;
                self.await_server(pid, true)
            }
        }
    }

    fn quiesce(&self, pid: u32) {
        if !self.quiesce {
            return;
        }
        let began = Instant::now();
        // On an error or the bound, the kernel still dispatches nothing
        // new (it is `canceling`), and the daemon's own stop closes the
        // device: the handoff goes on either way.
        match Control::open().and_then(|mut c| c.quiesce(self.dev_id, QUIESCE_WAIT_MS)) {
            Ok(()) => info!(
                "{}: ublk device {} quiesced by the kernel for pid {pid}'s drain ({:.3} ms)",
                self.name,
                self.dev_id,
                began.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => warn!(
                "{}: ublk device {}: QUIESCE_DEV: {e}; pid {pid} stops its queue by itself",
                self.name, self.dev_id
            ),
        }
    }

    fn direct_only(&self) -> bool {
        true
    }
}

/// The sum of a block device's `inflight` file ("reads writes").
fn parse_inflight(text: &str) -> Option<u64> {
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    let (Some(Some(reads)), Some(Some(writes)), None) =
        (fields.next(), fields.next(), fields.next())
    else {
        return None;
    };
    reads.checked_add(writes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn inflight_file() {
        assert_eq!(super::parse_inflight("       3        5\n"), Some(8));
        assert_eq!(super::parse_inflight("0 0"), Some(0));
        for bad in ["", "1", "1 2 3", "a 1", "-1 2", "18446744073709551615 1"] {
            assert_eq!(super::parse_inflight(bad), None, "{bad:?}");
        }
    }
}
