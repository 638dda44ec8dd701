//! The broker's own restart. Everything the kernel ties to an open file
//! must outlive the broker process: a FUSE connection ends (and its mount
//! fails with ENOTCONN) when its last /dev/fuse descriptor closes, and
//! closing /dev/cachefiles unbinds the cache. Two ways to keep them, both
//! with the same record (`record`) and the same names (`record::names`):
//!
//! * **upgrade** (`holdfastctl broker upgrade`, SIGUSR2): the broker
//!   executes its binary again, same pid, same options, passing its
//!   descriptors and a record of its state (`fds::FDS_ENV`);
//! * **crash** (under systemd): every kept descriptor and the record are
//!   in systemd's fd store (`systemd`), which passes them to the broker it
//!   starts next (`LISTEN_FDS`).
//!
//! The kernel replays what the old broker held: FUSE_NOTIFY_RESEND (Linux
//! 6.9) re-queues what it read and did not answer, ublk USER_RECOVERY
//! re-issues its tags, cachefiles `restore` re-sends its requests.
//! Daemons reconnect by themselves. kmod-notes/broker-restart.md has the
//! whole story.

mod adopt;
pub mod fds;
pub mod lock;
pub mod record;
pub mod systemd;
mod upgrade;

pub(crate) use adopt::Prior;
pub use upgrade::UpgradeRequest;

/// The record a previous broker left: the one a re-executing broker passed
/// on, else the newest of systemd's store that can be read. A record that
/// cannot be read is reported and ignored: the broker then starts afresh.
pub fn take_record(inherited: &mut fds::Inherited) -> Option<Record> {
    let mut states = inherited.take_prefix(names::STATE_PREFIX);
    if let Some(fd) = inherited.take(names::RECORD) {
        states.push((names::RECORD.to_owned(), fd));
    }
    let mut best: Option<Record> = None;
    for (name, fd) in states {
        match Record::from_memfd(&fd) {
            Ok(r) if name == names::RECORD => return Some(r),
            Ok(r) if best.as_ref().is_none_or(|b| r.seq > b.seq) => best = Some(r),
            Ok(_) => {}
            Err(e) => warn!("the restart record {name} is ignored: {e}"),
        }
    }
    best
}

use std::collections::BTreeSet;
use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use parking_lot::Mutex;

use self::record::{Record, names};
use self::systemd::Notifier;
use crate::warn;

/// CLOCK_MONOTONIC in ns: the same clock in the old and the new broker.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

/// What the broker keeps in systemd's fd store, kept in step with its
/// state: descriptors are stored before the record that names them, and
/// removed after the record that no longer does, so a crash at any point
/// leaves a record whose descriptors are all there.
pub struct Custody {
    systemd: Option<Notifier>,
    inner: Mutex<Stored>,
}

struct Stored {
    /// Names in systemd's store.
    names: BTreeSet<String>,
    seq: u64,
    /// The last record put there, to pass its name on across an upgrade
    /// (the next broker then removes it once it has put its own).
    state: Option<(String, OwnedFd)>,
}

impl Custody {
    /// `stored`: the names the store holds already (those systemd passed).
    pub fn new(systemd: Option<Notifier>, stored: BTreeSet<String>, seq: u64) -> Self {
        Self {
            systemd,
            inner: Mutex::new(Stored {
                names: stored,
                seq,
                state: None,
            }),
        }
    }

    /// Whether the broker runs under a service manager.
    pub fn supervised(&self) -> bool {
        self.systemd.is_some()
    }

    /// Sends a notification (READY=1, STATUS=...), if under a manager.
    pub fn notify(&self, msg: &str) {
        if let Some(n) = &self.systemd
            && let Err(e) = n.send(msg, None)
        {
            warn!(
                "sd_notify {:?}: {e}",
                msg.lines().next().unwrap_or_default()
            );
        }
    }

    /// Puts the record made by `make` (with the next sequence number) and
    /// the descriptors it names into systemd's store; drops what neither
    /// names any more. Without a manager, nothing.
    pub fn commit(&self, make: impl FnOnce(u64) -> (Record, Vec<(String, OwnedFd)>)) {
        let Some(n) = &self.systemd else {
            return;
        };
        let mut st = self.inner.lock();
        st.seq = st.seq.saturating_add(1);
        let (record, fds) = make(st.seq);
        let state = match record.to_memfd() {
            Ok(fd) => (names::state(record.seq), fd),
            Err(e) => return warn!("cannot write the restart record: {e}"),
        };
        let mut keep = BTreeSet::new();
        for (name, fd) in fds.iter().chain(std::iter::once(&state)) {
            if !st.names.contains(name)
                && let Err(e) = n.store(name, fd.as_fd())
            {
                warn!("cannot put {name} in systemd's fd store: {e}");
                continue;
            }
            keep.insert(name.clone());
        }
        for gone in st.names.difference(&keep) {
            if let Err(e) = n.remove(gone) {
                warn!("cannot remove {gone} from systemd's fd store: {e}");
            }
        }
        st.names = keep;
        st.state = Some(state);
    }

    /// The sequence number of the last record.
    pub fn seq(&self) -> u64 {
        self.inner.lock().seq
    }

    /// A duplicate of the last record put in systemd's store, with its name.
    pub fn last_state(&self) -> Option<(String, OwnedFd)> {
        let st = self.inner.lock();
        let (name, fd) = st.state.as_ref()?;
        Some((name.clone(), fd.try_clone().ok()?))
    }

    /// Removes names that nothing uses (left by an older broker).
    pub fn discard(&self, names: &[String]) {
        let Some(n) = &self.systemd else {
            return;
        };
        let mut st = self.inner.lock();
        for name in names {
            st.names.remove(name);
            if let Err(e) = n.remove(name) {
                warn!("cannot remove {name} from systemd's fd store: {e}");
            }
        }
    }

    /// A clean stop: systemd keeps nothing, so the next start is a fresh
    /// one.
    pub fn clear(&self) {
        let all: Vec<String> = self.inner.lock().names.iter().cloned().collect();
        self.discard(&all);
    }
}

/// How this broker was started, for the upgrade's `execve`.
pub struct Reexec {
    /// The binary the broker was started from, resolved at start-up: after
    /// a package upgrade the path holds the new binary.
    program: PathBuf,
    args: Vec<OsString>,
}

impl Reexec {
    /// Records how this process was started. Call at start-up.
    pub fn capture() -> Result<Self, String> {
        let program =
            std::env::current_exe().map_err(|e| format!("cannot find my own executable: {e}"))?;
        // `/proc/self/exe` of a replaced binary reads "PATH (deleted)".
        let program = match program.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            Some(p) => PathBuf::from(p),
            None => program,
        };
        let args = std::env::args_os().skip(1).collect();
        Ok(Self { program, args })
    }

    /// The binary an upgrade executes.
    pub fn program(&self) -> &std::path::Path {
        &self.program
    }

    /// Replaces this process with a new broker that inherits `keep`, each
    /// under its name. Returns only on failure.
    pub fn exec(&self, keep: &[(String, BorrowedFd<'_>)]) -> String {
        let to_c = |s: &std::ffi::OsStr| CString::new(s.as_bytes()).ok();
        let Some(program) = to_c(self.program.as_os_str()) else {
            return format!("{}: not a valid path", self.program.display());
        };
        // Duplicates without close-on-exec; closed again if exec fails.
        let mut passed = Vec::with_capacity(keep.len());
        for (name, fd) in keep {
            match rustix::io::dup(fd) {
                Ok(d) => passed.push((name.as_str(), d)),
                Err(e) => return format!("cannot pass {name} on: {e}"),
            }
        }
        let list: Vec<String> = passed
            .iter()
            .map(|(n, fd)| format!("{n}={}", fd.as_raw_fd()))
            .collect();
        let mut argv: Vec<CString> = vec![program.clone()];
        argv.extend(self.args.iter().filter_map(|a| to_c(a)));
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != fds::FDS_ENV)
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        env.extend(CString::new(format!("{}={}", fds::FDS_ENV, list.join(","))).ok());
        let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        let (argv_p, env_p) = (ptrs(&argv), ptrs(&env));
        // SAFETY: NUL-terminated arrays of C strings that outlive the call.
        unsafe { libc::execve(program.as_ptr(), argv_p.as_ptr(), env_p.as_ptr()) };
        format!(
            "exec {}: {}",
            self.program.display(),
            std::io::Error::last_os_error()
        )
    }
}
