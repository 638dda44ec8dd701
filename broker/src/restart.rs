//! The broker's own restart, for the device fds that must outlive the
//! process: closing /dev/cachefiles unbinds the cache under every erofs
//! mount. Two ways to keep it:
//!
//! * **re-exec** (SIGUSR2): the broker executes its binary again with the
//!   same options plus `--recover`, the fd inherited and named in
//!   [`FD_ENV`](crate::frontends::cachefiles::FD_ENV);
//! * **systemd's fd store**: the broker hands the fd to systemd
//!   (`FDSTORE=1`, sd_notify(3)); a restarted service gets it back through
//!   `LISTEN_FDS` / `LISTEN_FDNAMES` (sd_listen_fds(3)).

use std::ffi::{CString, OsString};
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix};

use crate::frontends::cachefiles::{FD_ENV, FD_NAME};

/// sd_listen_fds(3): passed fds start here.
const LISTEN_FDS_START: RawFd = 3;

/// The /dev/cachefiles fd a previous broker passed on, if any: from a
/// re-exec ([`FD_ENV`]) or from systemd's fd store (`LISTEN_FDNAMES`
/// naming [`FD_NAME`], for this pid). The variables are removed so that
/// daemons the broker starts do not see them.
pub fn inherited_cachefiles_fd() -> Result<Option<OwnedFd>, String> {
    let from_exec = std::env::var(FD_ENV).ok();
    let from_systemd = systemd_fd(FD_NAME);
    // SAFETY: called at start-up, before the broker starts any thread.
    unsafe {
        std::env::remove_var(FD_ENV);
        for v in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
            std::env::remove_var(v);
        }
    }
    let raw = match (from_exec, from_systemd) {
        (Some(v), _) => v
            .parse::<RawFd>()
            .ok()
            .filter(|fd| *fd >= 0)
            .ok_or_else(|| format!("{FD_ENV}={v:?}: expected an fd number"))?,
        (None, Some(fd)) => fd,
        (None, None) => return Ok(None),
    };
    // The fd must be open; fcntl tells without touching it.
    rustix::io::fcntl_getfd(
        // SAFETY: only borrowed for the check.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(raw) },
    )
    .map_err(|e| format!("inherited cachefiles fd {raw}: {e}"))?;
    // SAFETY: the previous broker (or systemd) passed this fd to this
    // process for the broker to own; nothing else here uses it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| format!("inherited cachefiles fd {raw}: {e}"))?;
    Ok(Some(fd))
}

/// The fd systemd passed under `name`, if the variables are for this pid.
fn systemd_fd(name: &str) -> Option<RawFd> {
    let var = |k| std::env::var(k).ok();
    listen_fd(
        name,
        std::process::id(),
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        var("LISTEN_FDNAMES").as_deref(),
    )
}

/// sd_listen_fds_with_names(3) for one name: `LISTEN_PID` must be `me`,
/// and the fds are numbered from 3 in `LISTEN_FDNAMES` order.
fn listen_fd(
    name: &str,
    me: u32,
    pid: Option<&str>,
    count: Option<&str>,
    names: Option<&str>,
) -> Option<RawFd> {
    if pid?.parse::<u32>().ok()? != me {
        return None;
    }
    let count: usize = count?.parse().ok()?;
    let index = names?.split(':').take(count).position(|n| n == name)?;
    LISTEN_FDS_START.checked_add(RawFd::try_from(index).ok()?)
}

/// Hands `fd` to systemd's fd store under `name`, if the broker runs
/// under systemd (`NOTIFY_SOCKET` set). Returns whether it was sent; the
/// unit needs `FileDescriptorStoreMax=` for systemd to keep it.
pub fn store_fd(fd: &OwnedFd, name: &str) -> Result<bool, String> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let addr = notify_addr(&path).map_err(|e| format!("NOTIFY_SOCKET {path:?}: {e}"))?;
    let sock = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::DGRAM,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| format!("sd_notify socket: {e}"))?;
    let msg = format!("FDSTORE=1\nFDNAME={name}\n");
    let fds = [fd.as_fd()];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err("sd_notify: no room for the fd".into());
    }
    rustix::net::sendmsg_addr(
        &sock,
        &addr,
        &[IoSlice::new(msg.as_bytes())],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(|e| format!("sd_notify FDSTORE to {path:?}: {e}"))?;
    Ok(true)
}

/// A notify socket path, or an abstract name starting with `@`.
fn notify_addr(path: &std::ffi::OsStr) -> rustix::io::Result<SocketAddrUnix> {
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => SocketAddrUnix::new_abstract_name(name),
        None => SocketAddrUnix::new(path),
    }
}

/// What a re-exec runs.
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
        let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
        if !args.iter().any(|a| a == "--recover") {
            args.push("--recover".into());
        }
        Ok(Self { program, args })
    }

    /// Replaces this process with a new broker that inherits `keep`.
    /// Returns only on failure (with `keep` left close-on-exec again).
    pub fn exec(&self, keep: &OwnedFd) -> String {
        let to_c = |s: &std::ffi::OsStr| CString::new(s.as_bytes()).ok();
        let Some(program) = to_c(self.program.as_os_str()) else {
            return format!("{}: not a valid path", self.program.display());
        };
        let mut argv: Vec<CString> = vec![program.clone()];
        argv.extend(self.args.iter().filter_map(|a| to_c(a)));
        let mut env: Vec<CString> = std::env::vars_os()
            .filter(|(k, _)| k != FD_ENV)
            .filter_map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                CString::new(kv).ok()
            })
            .collect();
        env.extend(CString::new(format!("{FD_ENV}={}", keep.as_raw_fd())).ok());
        if let Err(e) = rustix::io::fcntl_setfd(keep, rustix::io::FdFlags::empty()) {
            return format!("cannot keep the cachefiles fd open across exec: {e}");
        }
        let ptrs = |v: &[CString]| -> Vec<*const libc::c_char> {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        let (argv_p, env_p) = (ptrs(&argv), ptrs(&env));
        // SAFETY: NUL-terminated arrays of C strings that outlive the call.
        unsafe { libc::execve(program.as_ptr(), argv_p.as_ptr(), env_p.as_ptr()) };
        let err = std::io::Error::last_os_error();
        let _ = rustix::io::fcntl_setfd(keep, rustix::io::FdFlags::CLOEXEC);
        format!("exec {}: {err}", self.program.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_fds_by_name() {
        let fd = |pid, count, names| listen_fd("cachefiles", 7, Some(pid), Some(count), names);
        assert_eq!(fd("7", "1", Some("cachefiles")), Some(3));
        assert_eq!(fd("7", "3", Some("a:b:cachefiles")), Some(5));
        assert_eq!(fd("8", "1", Some("cachefiles")), None, "another pid's");
        assert_eq!(
            fd("7", "2", Some("a:b:cachefiles")),
            None,
            "past LISTEN_FDS"
        );
        assert_eq!(fd("7", "1", None), None);
        assert_eq!(fd("7", "x", Some("cachefiles")), None);
    }

    #[test]
    fn store_fd_sends_the_fd_with_its_name() {
        let dir = std::env::temp_dir().join(format!("holdfast-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let rx = rustix::net::socket(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::DGRAM,
            None,
        )
        .unwrap();
        rustix::net::bind(&rx, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        let fd: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        // SAFETY: this test's process; no other test reads NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        let sent = store_fd(&fd, "cachefiles");
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        assert_eq!(sent, Ok(true));
        let mut buf = [0u8; 64];
        let p = crate::sys::seqpacket::recv(rx.as_fd(), &mut buf, rustix::net::RecvFlags::empty())
            .unwrap();
        assert_eq!(&buf[..p.len], b"FDSTORE=1\nFDNAME=cachefiles\n");
        assert_eq!(p.fds.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
