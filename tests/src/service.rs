//! A service manager for tests that speaks systemd's protocol as systemd
//! does (sd_notify(3), sd_listen_fds(3)): it gives the service
//! `NOTIFY_SOCKET`, reads its datagrams (READY=1, STATUS=, RELOADING=1,
//! STOPPING=1, FDSTORE=1 with FDNAME= and FDPOLL=, FDSTOREREMOVE=1), takes
//! them only from the main process it started (NotifyAccess=main, checked
//! with SCM_CREDENTIALS), keeps the stored descriptors (a descriptor it
//! holds already is not stored twice: systemd compares open files with
//! kcmp), and starts the service again with them: numbered from 3, with
//! `LISTEN_FDS`, `LISTEN_FDNAMES` and `LISTEN_PID`, the same command line.
//! Used to restart a broker that was SIGKILLed, the way
//! `Restart=always` does.

use std::ffi::OsString;
use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SocketAddrUnix, SocketType,
};

use crate::{Proc, Scratch};

/// Most descriptors passed to a service (systemd's FileDescriptorStoreMax
/// for the tests).
const MAX_PASSED: usize = 512;

/// What the manager knows of its service.
#[derive(Default)]
struct State {
    /// Pids allowed to notify: the main pid, and earlier ones whose last
    /// messages may still be queued.
    mains: Vec<u32>,
    store: Vec<(String, OwnedFd)>,
    ready: u32,
    reloading: u32,
    stopping: u32,
    status: String,
    /// Messages from other processes, dropped as systemd drops them.
    refused: u32,
}

pub struct ServiceManager {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    program: PathBuf,
    args: Vec<OsString>,
    starts: u32,
}

impl ServiceManager {
    /// A manager for `program args`, with its notify socket in `scratch`.
    /// Past `deadline` it closes what it stores, so that a FUSE connection
    /// it keeps cannot keep a failed test's I/O waiting.
    pub fn new(scratch: &Scratch, program: &Path, args: Vec<OsString>, deadline: Duration) -> Self {
        let path = scratch.path("notify.sock");
        let sock = rustix::net::socket(AddressFamily::UNIX, SocketType::DGRAM, None).unwrap();
        rustix::net::bind(&sock, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        rustix::net::sockopt::set_socket_passcred(&sock, true).unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        {
            let state = Arc::downgrade(&state);
            let end = Instant::now() + deadline;
            std::thread::spawn(move || read_loop(&sock, &state, end));
        }
        Self {
            path,
            state,
            program: program.to_path_buf(),
            args,
            starts: 0,
        }
    }

    /// Starts the service (again): with every stored descriptor passed on
    /// as systemd passes them.
    pub fn start(&mut self, scratch: &Scratch) -> Proc {
        let mut st = self.state.lock().unwrap();
        let raw: Vec<RawFd> = st.store.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let names: Vec<&str> = st.store.iter().map(|(n, _)| n.as_str()).collect();
        let mut cmd = Command::new("/bin/sh");
        // LISTEN_PID is the service's own pid: the shell's, which exec keeps.
        cmd.arg("-c")
            .arg(r#"LISTEN_PID=$$ exec "$0" "$@""#)
            .arg(&self.program)
            .args(&self.args)
            .env("NOTIFY_SOCKET", &self.path)
            .env_remove("LISTEN_PID");
        if raw.is_empty() {
            cmd.env_remove("LISTEN_FDS").env_remove("LISTEN_FDNAMES");
        } else {
            cmd.env("LISTEN_FDS", raw.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        assert!(raw.len() <= MAX_PASSED, "{} descriptors to pass", raw.len());
        // SAFETY: only dup2, fcntl and close (async-signal-safe, no
        // allocation) run in the child: the descriptors are first moved out
        // of the way, then to 3, 4...
        unsafe {
            cmd.pre_exec(move || {
                let mut high = [0 as RawFd; MAX_PASSED];
                for (h, fd) in high.iter_mut().zip(&raw) {
                    *h = libc::fcntl(*fd, libc::F_DUPFD, 1000);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, h) in high.iter().take(raw.len()).enumerate() {
                    if libc::dup2(*h, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(*h);
                }
                Ok(())
            });
        }
        let log = format!("broker-{}.log", self.starts);
        self.starts += 1;
        // Under the lock until the pid is known: a quick service says
        // READY=1 before `spawn` returns, and a message applied before its
        // pid is listed would be refused as another process's. (The lock
        // also keeps the store's descriptors open until they are passed.)
        let proc = scratch.spawn(&mut cmd, &log);
        st.mains.push(proc.pid());
        drop(st);
        proc
    }

    /// Waits until the service has said READY=1 `n` times in all.
    pub fn wait_ready(&self, n: u32, timeout: Duration) {
        let end = Instant::now() + timeout;
        while self.state.lock().unwrap().ready < n {
            assert!(
                Instant::now() < end,
                "no READY=1 #{n} within {timeout:?}; stored: {:?}",
                self.stored()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The names in the fd store.
    pub fn stored(&self) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.store.iter().map(|(n, _)| n.clone()).collect()
    }

    /// (READY=1, RELOADING=1, STOPPING=1) counts, the last STATUS=, and
    /// how many messages came from other processes.
    pub fn counts(&self) -> (u32, u32, u32, String, u32) {
        let st = self.state.lock().unwrap();
        (
            st.ready,
            st.reloading,
            st.stopping,
            st.status.clone(),
            st.refused,
        )
    }
}

impl Drop for ServiceManager {
    fn drop(&mut self) {
        self.state.lock().unwrap().store.clear();
    }
}

fn read_loop(sock: &OwnedFd, state: &std::sync::Weak<Mutex<State>>, end: Instant) {
    let mut buf = vec![0u8; 4096];
    loop {
        let mut pfd = [rustix::event::PollFd::new(
            sock,
            rustix::event::PollFlags::IN,
        )];
        let tick = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 100_000_000,
        };
        let _ = rustix::event::poll(&mut pfd, Some(&tick));
        let Some(state) = state.upgrade() else {
            return;
        };
        if Instant::now() > end {
            state.lock().unwrap().store.clear();
            return;
        }
        if pfd[0].revents().is_empty() {
            continue;
        }
        let mut space =
            [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8), ScmCredentials(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let Ok(msg) = rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) else {
            return;
        };
        let (mut fds, mut pid) = (Vec::new(), 0u32);
        for m in control.drain() {
            match m {
                RecvAncillaryMessage::ScmRights(r) => fds.extend(r),
                RecvAncillaryMessage::ScmCredentials(c) => {
                    pid = c.pid.as_raw_nonzero().get() as u32
                }
                _ => {}
            }
        }
        let text = String::from_utf8_lossy(&buf[..msg.bytes]).into_owned();
        apply(&mut state.lock().unwrap(), pid, &text, fds);
    }
}

fn apply(st: &mut State, pid: u32, text: &str, fds: Vec<OwnedFd>) {
    if !st.mains.contains(&pid) {
        st.refused += 1;
        return;
    }
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
    };
    if field("READY") == Some("1") {
        st.ready += 1;
    }
    if field("RELOADING") == Some("1") {
        st.reloading += 1;
    }
    if field("STOPPING") == Some("1") {
        st.stopping += 1;
    }
    if let Some(s) = field("STATUS") {
        st.status = s.to_owned();
    }
    let name = field("FDNAME").unwrap_or("stored").to_owned();
    if field("FDSTOREREMOVE") == Some("1") {
        st.store.retain(|(n, _)| *n != name);
    }
    if field("FDSTORE") == Some("1") {
        for fd in fds {
            if !st.store.iter().any(|(_, kept)| same_file(kept, &fd)) {
                st.store.push((name.clone(), fd));
            }
        }
    }
}

/// kcmp(KCMP_FILE): the same open file (what systemd's same_fd asks).
fn same_file(a: &OwnedFd, b: &OwnedFd) -> bool {
    let me = std::process::id() as libc::pid_t;
    // SAFETY: kcmp only compares the two descriptors of this process.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            me,
            me,
            0, // KCMP_FILE
            a.as_fd().as_raw_fd(),
            b.as_fd().as_raw_fd(),
        )
    };
    r == 0
}
