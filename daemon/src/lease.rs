//! The lease: an exclusive flock(2) on the backend that a daemon holds for
//! as long as it lives. A successor must take it before RESTORE, so two
//! daemons can never serve the same backing store, even if one of them was
//! started by hand outside the broker's knowledge. The kernel drops it when
//! the holder dies, however it dies.

use std::fs::File;
use std::time::{Duration, Instant};

use rustix::fs::FlockOperation;

use crate::Error;

/// A held lease; released when dropped or when the process exits.
pub struct Lease {
    _file: File,
}

impl Lease {
    /// Takes an exclusive flock on `file` (its own open file description),
    /// waiting up to `timeout` for a holder to go away.
    pub fn acquire(file: File, what: &str, timeout: Duration) -> Result<Self, Error> {
        let deadline = Instant::now() + timeout;
        let mut told = false;
        loop {
            match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(Self { _file: file }),
                Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                    if !told {
                        crate::log(&format!(
                            "waiting up to {timeout:?} for the lease on {what}, held by another daemon"
                        ));
                        told = true;
                    }
                    std::thread::sleep(Duration::from_millis(10));
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lease_waits_then_fails() {
        let dir = std::env::temp_dir().join(format!("holdfast-lease-{}", std::process::id()));
        std::fs::write(&dir, b"x").unwrap();
        let a = Lease::acquire(File::open(&dir).unwrap(), "t", Duration::ZERO).unwrap();
        let b = Lease::acquire(File::open(&dir).unwrap(), "t", Duration::from_millis(30));
        assert!(matches!(b, Err(Error::Lease(_))));
        drop(a);
        Lease::acquire(File::open(&dir).unwrap(), "t", Duration::ZERO).unwrap();
        std::fs::remove_file(&dir).unwrap();
    }
}
