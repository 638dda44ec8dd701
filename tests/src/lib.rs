//! Test harness for holdfast: start a broker and daemons in a scratch
//! directory, talk to them, and clean up everything even when a test fails
//! or hangs.
//!
//! * Every process a test starts is a [`Proc`]: killed (by pid, never by
//!   name) and reaped when dropped.
//! * Every mount is detached when its [`Broker`] is dropped.
//! * Every [`Scratch`] has a deadline: past it, the processes it started are
//!   killed, which aborts the FUSE connection so that any I/O the test is
//!   blocked in fails and the test ends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod block;
pub mod pattern;
pub mod prometheus;
pub mod s3;
pub mod service;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use holdfast_daemon::client::Connection;
use holdfast_proto::{HandoffReport, HandoffRequest, Reply, Request};

/// Path of a binary built from this workspace (`holdfast-broker`, ...),
/// next to the test executable's directory (target/<profile>/).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo test --workspace builds it)",
        p.display()
    );
    p
}

/// Panics with a clear message unless the tests can mount FUSE.
pub fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "holdfast's integration tests mount FUSE file systems: run them as root"
    );
    assert!(Path::new("/dev/fuse").exists(), "/dev/fuse is missing");
}

type Registry = Arc<Mutex<Vec<u32>>>;

/// A scratch directory under /tmp with a deadline for the whole test.
pub struct Scratch {
    pub dir: PathBuf,
    registry: Registry,
    disarmed: Arc<AtomicBool>,
}

impl Scratch {
    /// Creates /tmp/holdfast-test-NAME-PID-N; past `deadline`, every process
    /// started through it is killed so that a hung test fails.
    pub fn new(name: &str, deadline: Duration) -> Self {
        require_root();
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "holdfast-test-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let registry: Registry = Arc::default();
        let disarmed = Arc::new(AtomicBool::new(false));
        {
            let (registry, disarmed, name) = (registry.clone(), disarmed.clone(), name.to_owned());
            std::thread::spawn(move || {
                let end = Instant::now() + deadline;
                while Instant::now() < end {
                    if disarmed.load(Ordering::SeqCst) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                eprintln!("test {name}: deadline of {deadline:?} passed; killing its processes");
                for pid in registry.lock().unwrap().iter() {
                    // Only pids this test started and has not reaped yet.
                    unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                }
            });
        }
        Self {
            dir,
            registry,
            disarmed,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Starts a process that is killed when dropped or at the deadline.
    /// Its stderr and stdout go to `log` in the scratch directory.
    pub fn spawn(&self, cmd: &mut Command, log: &str) -> Proc {
        let out = File::create(self.path(log)).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        // A binary a test just wrote is busy while another test thread's
        // fork still holds the writer's descriptor (until its exec).
        let mut tries = 0;
        let child = loop {
            match cmd.spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                other => break other.unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}")),
            }
        };
        self.registry.lock().unwrap().push(child.id());
        Proc {
            child: Some(child),
            log: self.path(log),
            registry: self.registry.clone(),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.disarmed.store(true, Ordering::SeqCst);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "scratch directory kept for inspection: {}",
                self.dir.display()
            );
        }
    }
}

/// A child process; SIGKILLed and reaped when dropped.
pub struct Proc {
    child: Option<Child>,
    pub log: PathBuf,
    registry: Registry,
}

/// Sends `sig` to `pid` through a pidfd, so that a pid the broker reported
/// cannot be confused with a later process.
pub fn signal_pid(pid: u32, sig: rustix::process::Signal) -> std::io::Result<()> {
    let p = rustix::process::Pid::from_raw(pid as i32)
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let fd = rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())?;
    Ok(rustix::process::pidfd_send_signal(&fd, sig)?)
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // The child is not reaped while we hold it, so the pid is ours.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            {
                // Reap and unregister under the lock, so the deadline thread
                // never signals a pid that was reaped (and maybe reused).
                let mut reg = self.registry.lock().unwrap();
                let c = self.child.as_mut()?;
                if let Some(s) = c.try_wait().unwrap() {
                    let pid = c.id();
                    reg.retain(|p| *p != pid);
                    self.child = None;
                    return Some(s);
                }
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.wait_timeout(Duration::ZERO).is_none()
    }

    /// SIGKILL and reap. A process blocked in I/O on a FUSE export with no
    /// daemon cannot die until its broker does: after 3 s it is left to be
    /// reaped by no one (and still killed at the deadline), so that a
    /// failing test's teardown goes on to stop the broker.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        let c = self.child.as_mut()?;
        let _ = c.kill();
        if let Some(s) = self.wait_timeout(Duration::from_secs(3)) {
            return Some(s);
        }
        eprintln!(
            "pid {} did not die within 3 s of SIGKILL; leaving it",
            self.pid()
        );
        self.child = None;
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a broker should serve.
pub struct BrokerOpts {
    pub exports: Vec<(String, String)>,
    pub extra: Vec<String>,
}

/// How daemons get an export's requests: tests that hold in both modes
/// take one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Through the broker (`,relay`).
    Relay,
    /// The daemon reads the export's FUSE connection itself (a FUSE
    /// export's default).
    Direct,
}

impl Mode {
    /// The `SIZE[,OPTIONS]` of an export of `size` in this mode.
    pub fn export(self, size: &str) -> String {
        match self {
            Self::Relay => format!("{size},relay"),
            Self::Direct => size.to_owned(),
        }
    }

    /// Its name, as status shows it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Relay => "relay",
            Self::Direct => "direct",
        }
    }
}

impl BrokerOpts {
    pub fn new(exports: &[(&str, &str)]) -> Self {
        Self {
            exports: exports
                .iter()
                .map(|(n, s)| ((*n).to_owned(), (*s).to_owned()))
                .collect(),
            extra: Vec::new(),
        }
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.to_owned());
        self
    }
}

/// Whether `path` is a mount point, from /proc/self/mountinfo (a stat of
/// a FUSE mount would wait on its server).
fn is_mount(path: &Path) -> bool {
    let Some(want) = path.to_str() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want))
}

/// A running broker with its own socket and mount point.
pub struct Broker {
    pub socket: PathBuf,
    pub mountpoint: PathBuf,
    pub proc: Proc,
    /// Block devices the test asked for, detached when dropped if the
    /// broker left them attached (killed, or a test failed).
    devices: Mutex<Vec<PathBuf>>,
}

impl Broker {
    /// Starts `holdfast-broker` and waits until its mount and socket are up.
    pub fn start(scratch: &Scratch, opts: BrokerOpts) -> Self {
        let mut cmd = Command::new(bin("holdfast-broker"));
        cmd.args(Self::args(scratch, &opts));
        let proc = scratch.spawn(&mut cmd, "broker.log");
        Self::started(scratch, &opts, proc)
    }

    /// The broker's command line for `opts` (without the program).
    pub fn args(scratch: &Scratch, opts: &BrokerOpts) -> Vec<std::ffi::OsString> {
        let mut args: Vec<std::ffi::OsString> = vec![
            "--socket".into(),
            scratch.path("broker.sock").into(),
            "--mountpoint".into(),
            scratch.path("mnt").into(),
        ];
        for (name, size) in &opts.exports {
            args.push("--export".into());
            args.push(format!("{name}={size}").into());
        }
        args.extend(opts.extra.iter().map(Into::into));
        args
    }

    /// Waits until the broker started as `proc` with `opts` is up.
    pub fn started(scratch: &Scratch, opts: &BrokerOpts, mut proc: Proc) -> Self {
        let socket = scratch.path("broker.sock");
        let mountpoint = scratch.path("mnt");
        let first = opts.exports.first().map(|(n, _)| n.clone());
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            // Mounted, not just the file it mounts on created: a test that
            // opened that file would write to it, past the broker.
            let mounted = first.as_ref().is_none_or(|n| is_mount(&mountpoint.join(n)));
            if socket.exists() && mounted {
                break;
            }
            if !proc.is_running() || Instant::now() > end {
                panic!("broker did not come up:\n{}", proc.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            socket,
            mountpoint,
            proc,
            devices: Mutex::default(),
        }
    }

    /// The block device of `export` (from its status), detached at drop.
    pub fn device(&self, export: &str) -> PathBuf {
        let s = self.status(export);
        let dev = PathBuf::from(
            s["device"]
                .as_str()
                .unwrap_or_else(|| panic!("{export} has no block device: {s}")),
        );
        self.devices.lock().unwrap().push(dev.clone());
        dev
    }

    /// Detaches the loop devices of this broker's exports that are still
    /// attached (to a file under our mount point).
    fn detach_devices(&self) {
        for dev in self.devices.lock().unwrap().drain(..) {
            let name = dev.file_name().unwrap().to_string_lossy().into_owned();
            let backing = read_text(
                &Path::new("/sys/block")
                    .join(&name)
                    .join("loop/backing_file"),
            );
            if backing.starts_with(self.mountpoint.to_str().unwrap()) {
                let _ = Command::new("losetup").arg("-d").arg(&dev).output();
            }
        }
    }

    /// The file of an export on the mount.
    pub fn file(&self, export: &str) -> PathBuf {
        self.mountpoint.join(export)
    }

    /// The `holdfast-daemon` command line for `export` with `backend`.
    pub fn daemon_cmd(&self, export: &str, backend: &str, extra: &[&str]) -> Command {
        let mut cmd = Command::new(bin("holdfast-daemon"));
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--export")
            .arg(export)
            .arg("--backend")
            .arg(backend)
            .args(extra);
        cmd
    }

    /// Starts `holdfast-daemon` for `export` with `backend` and extra args.
    pub fn daemon(&self, scratch: &Scratch, export: &str, backend: &str, extra: &[&str]) -> Proc {
        self.daemon_with(scratch, self.daemon_cmd(export, backend, extra), export)
    }

    /// Starts a daemon command line built with [`Self::daemon_cmd`].
    pub fn daemon_with(&self, scratch: &Scratch, mut cmd: Command, export: &str) -> Proc {
        static N: AtomicU32 = AtomicU32::new(0);
        scratch.spawn(
            &mut cmd,
            &format!("daemon-{export}-{}.log", N.fetch_add(1, Ordering::SeqCst)),
        )
    }

    /// Arms a handoff of `export` over a control connection of the test's
    /// own; returns the connection (to read the report from with
    /// [`handoff_report`]) and the pid of the daemon being handed off.
    pub fn arm_handoff(&self, export: &str, dry_run: bool, drain_ms: u32) -> (Connection, u32) {
        let mut c = Connection::connect(&self.socket).unwrap();
        c.hello().unwrap();
        let req = Request::Handoff(HandoffRequest {
            export: export.to_owned(),
            dry_run,
            spawn: false,
            ready_timeout_ms: 30_000,
            drain_timeout_ms: drain_ms,
            cmd: String::new(),
        });
        match c.call(&req, &[]) {
            Ok((Reply::HandoffArmed { from_pid, .. }, _)) => (c, from_pid),
            other => panic!(
                "{export}: handoff not armed: {other:?}\nbroker log:\n{}",
                self.proc.log_text()
            ),
        }
    }

    /// Starts `hf-faulty` (a misbehaving daemon) on `export` in `mode`,
    /// with extra arguments (`--successor`).
    pub fn faulty(&self, scratch: &Scratch, export: &str, mode: &str, extra: &[&str]) -> Proc {
        let mut cmd = Command::new(bin("hf-faulty"));
        cmd.arg("--socket")
            .arg(&self.socket)
            .arg("--export")
            .arg(export)
            .arg("--mode")
            .arg(mode)
            .args(extra);
        scratch.spawn(&mut cmd, &format!("faulty-{export}-{mode}.log"))
    }

    /// Runs `holdfastctl --socket S ARGS`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("holdfastctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }

    /// `holdfastctl status --json`, parsed; the entry for `export`.
    pub fn status(&self, export: &str) -> serde_json::Value {
        let out = self.ctl(&["status", "--json"]);
        assert!(out.status.success(), "status failed: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["exports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == export)
            .cloned()
            .unwrap_or_else(|| panic!("no export {export} in {v}"))
    }

    /// Waits until `export` has an active daemon with an epoch above
    /// `after`; returns (pid, epoch).
    pub fn wait_active(&self, export: &str, after: u64, timeout: Duration) -> (u32, u64) {
        let end = Instant::now() + timeout;
        loop {
            let s = self.status(export);
            let d = &s["daemon"];
            if d["state"] == "active" && d["epoch"].as_u64().unwrap_or(0) > after {
                return (
                    d["pid"].as_u64().unwrap() as u32,
                    d["epoch"].as_u64().unwrap(),
                );
            }
            assert!(
                Instant::now() < end,
                "{export}: no active daemon after epoch {after} within {timeout:?}: {s}\nbroker log:\n{}",
                self.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `check` holds for the status of `export`.
    pub fn wait_status(
        &self,
        export: &str,
        timeout: Duration,
        what: &str,
        check: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + timeout;
        loop {
            let s = self.status(export);
            if check(&s) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "{export}: {what} not reached within {timeout:?}: {s}\nbroker log:\n{}",
                self.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the broker with SIGTERM (so supervised daemons are stopped too).
    pub fn stop(&mut self) {
        self.proc.signal(libc::SIGTERM);
        if self.proc.wait_timeout(Duration::from_secs(10)).is_none() {
            self.proc.kill();
        }
        self.detach_devices();
        self.unmount();
    }

    fn unmount(&self) {
        let _ = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.proc.is_running() {
            self.proc.signal(libc::SIGTERM);
            if self.proc.wait_timeout(Duration::from_secs(5)).is_none() {
                self.proc.kill();
            }
        }
        self.detach_devices();
        self.unmount();
    }
}

/// Waits for the report of a handoff armed with [`Broker::arm_handoff`].
pub fn handoff_report(c: &mut Connection) -> HandoffReport {
    match c.recv() {
        Ok((Reply::HandoffDone(r), _)) => r,
        other => panic!("no handoff report: {other:?}"),
    }
}

/// Reads a whole file (for logs in assertion messages).
pub fn read_text(p: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = File::open(p) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// A 4096-byte-aligned buffer for O_DIRECT I/O.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    pub fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.max(1), 4096).unwrap();
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Self { ptr, len }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(1), 4096).unwrap();
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

/// Opens a file with O_DIRECT for reading and writing.
pub fn open_direct(p: &Path) -> File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)
        .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", p.display()))
}

/// Runs the writer/verifier `hf-verify` with `args` against `file`.
pub fn verifier(scratch: &Scratch, file: &Path, args: &[&str]) -> Proc {
    static N: AtomicU32 = AtomicU32::new(0);
    let mut cmd = Command::new(bin("hf-verify"));
    cmd.arg("--file").arg(file).args(args);
    scratch.spawn(
        &mut cmd,
        &format!("verify-{}.log", N.fetch_add(1, Ordering::SeqCst)),
    )
}

/// Starts a writer/verifier with `threads` threads on `file` that writes
/// until [`stop_writer`]; with `state`, it saves the generation of every
/// block there for [`check_backing`].
pub fn writer(
    scratch: &Scratch,
    file: &Path,
    threads: u32,
    seed: u64,
    state: Option<&Path>,
) -> Proc {
    let (threads, seed) = (threads.to_string(), seed.to_string());
    let mut args = vec!["--seconds", "600", "--threads", &threads, "--seed", &seed];
    let state = state.map(|p| p.to_str().unwrap());
    if let Some(p) = state {
        args.extend(["--state", p]);
    }
    verifier(scratch, file, &args)
}

/// Stops a [`writer`] (SIGTERM: it finishes, reads every block back) and
/// fails the test unless it saw no I/O error and no block that lost its last
/// acknowledged write. Returns the report.
pub fn stop_writer(w: &mut Proc) -> serde_json::Value {
    w.signal(libc::SIGTERM);
    let report = verifier_report(w, Duration::from_secs(120));
    assert_eq!(report["errors"], 0, "{report}");
    assert_eq!(report["verify_failures"], 0, "{report}");
    report
}

/// Second oracle: reads the backing file `img` directly and checks that
/// every block holds the generation a writer saved in `state`.
pub fn check_backing(scratch: &Scratch, img: &Path, state: &Path, seed: u64) {
    let mut check = verifier(
        scratch,
        img,
        &[
            "--check",
            state.to_str().unwrap(),
            "--seed",
            &seed.to_string(),
        ],
    );
    let r = verifier_report(&mut check, Duration::from_secs(60));
    assert_eq!(
        r["verify_failures"],
        0,
        "backing file {}: {r}",
        img.display()
    );
}

/// Writes one 4 KiB block of `fill` at `offset` of `export` (O_DIRECT) in a
/// thread; while no daemon serves the export, the write waits.
pub fn write_in_thread(
    broker: &Broker,
    export: &str,
    offset: u64,
    fill: u8,
) -> std::thread::JoinHandle<std::io::Result<()>> {
    use std::os::unix::fs::FileExt;
    let f = open_direct(&broker.file(export));
    std::thread::spawn(move || {
        let mut b = AlignedBuf::new(4096);
        b.fill(fill);
        f.write_all_at(&b, offset)
    })
}

/// Waits for the verifier to finish and returns its report (the last JSON
/// line it printed), failing the test if it reported errors.
pub fn verifier_report(v: &mut Proc, timeout: Duration) -> serde_json::Value {
    let status = v.wait_timeout(timeout).unwrap_or_else(|| {
        panic!(
            "verifier still running after {timeout:?}:\n{}",
            v.log_text()
        )
    });
    let log = v.log_text();
    let report = log
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .unwrap_or_else(|| panic!("no report from the verifier:\n{log}"));
    assert!(status.success(), "verifier failed ({status}):\n{log}");
    report
}

/// A small deterministic PRNG (xorshift64*), so tests need no crates.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A seed from the clock, printed so a failure can be replayed with
/// HOLDFAST_SEED.
pub fn seed() -> u64 {
    let s = std::env::var("HOLDFAST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("seed: {s} (set HOLDFAST_SEED={s} to replay)");
    s
}

/// Two tests of one body that takes a [`Mode`]: `$relay` runs it in relay
/// mode, `$direct` in direct mode.
#[macro_export]
macro_rules! both_modes {
    ($relay:ident, $direct:ident, $body:path) => {
        #[test]
        fn $relay() {
            $body($crate::Mode::Relay);
        }

        #[test]
        fn $direct() {
            $body($crate::Mode::Direct);
        }
    };
}
