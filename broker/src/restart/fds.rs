//! Descriptors a broker hands to the broker after it, by name: across its
//! own `execve` (the upgrade: `HOLDFAST_FDS=NAME=FD,...`, the numbers as
//! they were), or through systemd's fd store after a crash (`LISTEN_FDS`,
//! `LISTEN_FDNAMES`, `LISTEN_PID`: sd_listen_fds(3), numbered from 3).
#![cfg_attr(not(test), deny(clippy::arithmetic_side_effects))]

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// The variable a re-executing broker names its descriptors in.
pub const FDS_ENV: &str = "HOLDFAST_FDS";
/// sd_listen_fds(3): passed descriptors start here.
const LISTEN_FDS_START: RawFd = 3;
/// Most descriptors taken from a previous broker (systemd's own limit on a
/// service's fd store is lower).
const MAX_INHERITED: usize = 1 << 16;

/// What a previous broker (or systemd on its behalf) passed on.
#[derive(Default)]
pub struct Inherited {
    fds: Vec<(String, OwnedFd)>,
    /// They came from systemd's fd store (so they are in it).
    pub from_systemd: bool,
}

impl Inherited {
    /// Takes the descriptors named in the environment and removes the
    /// variables, so that daemons the broker starts do not see them. Call
    /// at start-up, before any thread starts.
    pub fn from_env() -> Result<Self, String> {
        let var = |k| std::env::var(k).ok();
        let exec = var(FDS_ENV);
        let (pid, count, names) = (var("LISTEN_PID"), var("LISTEN_FDS"), var("LISTEN_FDNAMES"));
        // SAFETY: called at start-up, before the broker starts any thread.
        unsafe {
            for v in [
                FDS_ENV,
                "LISTEN_FDS",
                "LISTEN_PID",
                "LISTEN_FDNAMES",
                "LISTEN_PIDFDID",
            ] {
                std::env::remove_var(v);
            }
        }
        let (list, from_systemd) = match exec {
            Some(v) => (parse_exec_list(&v)?, false),
            None => (
                parse_listen(
                    std::process::id(),
                    pid.as_deref(),
                    count.as_deref(),
                    names.as_deref(),
                )?,
                true,
            ),
        };
        let mut fds = Vec::with_capacity(list.len());
        for (name, raw) in list {
            fds.push((name, adopt(raw)?));
        }
        Ok(Self {
            from_systemd: from_systemd && !fds.is_empty(),
            fds,
        })
    }

    /// The descriptor passed as `name`, if any.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        let i = self.fds.iter().position(|(n, _)| n == name)?;
        Some(self.fds.swap_remove(i).1)
    }

    /// Every descriptor whose name starts with `prefix`.
    pub fn take_prefix(&mut self, prefix: &str) -> Vec<(String, OwnedFd)> {
        let (hit, rest) = std::mem::take(&mut self.fds)
            .into_iter()
            .partition(|(n, _)| n.starts_with(prefix));
        self.fds = rest;
        hit
    }

    /// The names of what is left.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fds.iter().map(|(n, _)| n.as_str())
    }

    /// What nobody took: names the broker no longer knows.
    pub fn into_rest(self) -> Vec<(String, OwnedFd)> {
        self.fds
    }
}

/// Owns an inherited descriptor number, after checking it is open.
fn adopt(raw: RawFd) -> Result<OwnedFd, String> {
    // SAFETY: only borrowed for the check.
    let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
    rustix::io::fcntl_getfd(borrowed).map_err(|e| format!("inherited fd {raw}: {e}"))?;
    // SAFETY: the previous broker (or systemd) passed this descriptor to
    // this process for the broker to own, and each number is listed once
    // (checked by the parsers).
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    rustix::io::fcntl_setfd(&fd, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| format!("inherited fd {raw}: {e}"))?;
    Ok(fd)
}

/// `NAME=FD,NAME=FD`: names as in sd_notify's FDNAME (no `:`), distinct
/// numbers above stderr.
fn parse_exec_list(v: &str) -> Result<Vec<(String, RawFd)>, String> {
    let bad = |what: &str| format!("{FDS_ENV}={v:?}: {what}");
    let mut out: Vec<(String, RawFd)> = Vec::new();
    for item in v.split(',').filter(|s| !s.is_empty()) {
        let (name, fd) = item
            .split_once('=')
            .ok_or_else(|| bad("expected NAME=FD"))?;
        let fd: RawFd = fd
            .parse()
            .ok()
            .filter(|fd| *fd > 2)
            .ok_or_else(|| bad("expected a descriptor number above 2"))?;
        if name.is_empty() || out.iter().any(|(_, f)| *f == fd) {
            return Err(bad("a name is empty or a number is listed twice"));
        }
        if out.len() >= MAX_INHERITED {
            return Err(bad("too many descriptors"));
        }
        out.push((name.to_owned(), fd));
    }
    Ok(out)
}

/// sd_listen_fds_with_names(3): nothing unless `LISTEN_PID` is `me`; the
/// descriptors are numbered from 3 in `LISTEN_FDNAMES` order (systemd
/// names a descriptor without FDNAME "unknown" or "stored").
fn parse_listen(
    me: u32,
    pid: Option<&str>,
    count: Option<&str>,
    names: Option<&str>,
) -> Result<Vec<(String, RawFd)>, String> {
    let (Some(pid), Some(count)) = (pid, count) else {
        return Ok(Vec::new());
    };
    if pid.parse::<u32>().ok() != Some(me) {
        return Ok(Vec::new());
    }
    let n: usize = count
        .parse()
        .ok()
        .filter(|n| *n <= MAX_INHERITED)
        .ok_or_else(|| format!("LISTEN_FDS={count:?}: expected a count"))?;
    let mut names = names.unwrap_or_default().split(':');
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let fd = RawFd::try_from(i)
            .ok()
            .and_then(|i| LISTEN_FDS_START.checked_add(i))
            .ok_or_else(|| format!("LISTEN_FDS={count:?}: too many"))?;
        let name = names.next().filter(|s| !s.is_empty()).unwrap_or("unknown");
        out.push((name.to_owned(), fd));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_lists() {
        assert_eq!(
            parse_exec_list("listen=5,fuse.vol0.1.0=9").unwrap(),
            vec![("listen".into(), 5), ("fuse.vol0.1.0".into(), 9)]
        );
        assert_eq!(parse_exec_list("").unwrap(), vec![]);
        for bad in ["x", "x=", "x=1", "x=-4", "x=7,y=7", "=7", "x=seven"] {
            assert!(parse_exec_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn listen_fds_by_name() {
        let p = |pid, count, names| parse_listen(7, Some(pid), Some(count), names);
        assert_eq!(
            p("7", "3", Some("a:b:cachefiles")).unwrap(),
            vec![("a".into(), 3), ("b".into(), 4), ("cachefiles".into(), 5)]
        );
        assert_eq!(p("8", "1", Some("a")).unwrap(), vec![], "another pid's");
        assert_eq!(
            p("7", "2", Some("a")).unwrap(),
            vec![("a".into(), 3), ("unknown".into(), 4)]
        );
        assert!(p("7", "x", None).is_err());
        assert!(p("7", "99999999", None).is_err());
        assert_eq!(parse_listen(7, None, Some("1"), None).unwrap(), vec![]);
    }
}
