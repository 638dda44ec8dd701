//! The lease: an exclusive flock(2) on the backend. A daemon holds it while
//! it serves; a successor must take it before RESTORE, so two daemons can
//! never serve the same backing store, even if one of them was started by
//! hand outside the broker's knowledge. The kernel drops it when the holder
//! dies, however it dies. In a handoff the old daemon releases it at
//! QUIESCE and the successor takes it at ACTIVATE.

use std::fs::File;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::fs::FlockOperation;

use crate::Error;

/// A lease on one backend, held or not.
pub struct Lease {
    /// Its own open file description: flock belongs to that, not to the
    /// file, so the lock is independent of any other fd on the backend.
    file: File,
    what: String,
    held: Mutex<bool>,
}

impl Lease {
    /// A lease on `file` (not taken yet); `what` names it in errors.
    pub fn new(file: File, what: impl Into<String>) -> Self {
        Self {
            file,
            what: what.into(),
            held: Mutex::new(false),
        }
    }

    /// Takes the lease, waiting up to `timeout` for a holder to go away.
    pub fn acquire(&self, timeout: Duration) -> Result<(), Error> {
        let mut held = self.held.lock();
        if *held {
            return Ok(());
        }
        let what = &self.what;
        let deadline = Instant::now() + timeout;
        let mut told = false;
        loop {
            match rustix::fs::flock(&self.file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    *held = true;
                    return Ok(());
                }
                Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                    if !told {
                        crate::log(&format!(
                            "waiting up to {timeout:?} for the lease on {what}, held by another daemon"
                        ));
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(Error::Lease(format!(
                        "the lease on {what} is still held by another daemon after {timeout:?}; \
                         is a second daemon serving this backend?"
                    )));
                }
                Err(e) => return Err(Error::io(format!("flock {what}"), e.into())),
            }
        }
    }

    /// Gives the lease up (a handoff's QUIESCE).
    pub fn release(&self) -> Result<(), Error> {
        let mut held = self.held.lock();
        if *held {
            rustix::fs::flock(&self.file, FlockOperation::Unlock)
                .map_err(|e| Error::io(format!("unlock {}", self.what), e.into()))?;
            *held = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lease_waits_then_fails_until_released() {
        let path = std::env::temp_dir().join(format!("holdfast-lease-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let lease = |p: &std::path::Path| Lease::new(File::open(p).unwrap(), "t");
        let a = lease(&path);
        a.acquire(Duration::ZERO).unwrap();
        let b = lease(&path);
        assert!(matches!(
            b.acquire(Duration::from_millis(30)),
            Err(Error::Lease(_))
        ));
        a.release().unwrap();
        b.acquire(Duration::ZERO).unwrap();
        // Taking a held lease again is a no-op; a released one can be retaken.
        b.acquire(Duration::ZERO).unwrap();
        drop(b);
        a.acquire(Duration::ZERO).unwrap();
        std::fs::remove_file(&path).unwrap();
    }
}
