//! The holdfast broker: one small process that never restarts, holds the
//! kernel device handles and the table of every request in flight, and hands
//! requests to storage daemons that attach over a Unix socket.
//!
//! Where a request goes:
//! `frontends/` (kernel → request) → `export` + `inflight` (slot table,
//! dispatch, replay) → `shm` rings → daemon → `control` (session thread
//! reaps completions) → `frontends/` (reply to the kernel).

pub mod config;
pub mod control;
pub mod export;
pub mod fault;
pub mod frontends;
pub mod inflight;
pub mod log;
pub mod metrics;
pub mod restart;
pub mod shm;
pub mod supervise;
pub mod sys;

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use holdfast_proto::{
    ErrorCode, ErrorReply, ExportAdd, ExportKind, ExportStatus, HandoffRequest, Reply,
};
use parking_lot::{Mutex, RwLock};

use crate::config::Config;
use crate::export::{Export, ExportConfig, HandoffParams};
use crate::frontends::cachefiles::{self, Cachefiles};
use crate::frontends::fuse::FuseFrontend;
use crate::frontends::ublk::UblkDevice;
use crate::restart::record::{SupervisedRecord, names};
use crate::restart::{Custody, Prior, Reexec, UpgradeRequest};
use crate::supervise::Supervisor;

/// Write data held in private memory per export while all slots are taken.
const HEAP_LIMIT: usize = 256 << 20;
/// How often the request-age, daemon-wait and handoff bounds are checked.
const WATCHDOG_TICK: Duration = Duration::from_millis(100);
/// How long a handoff's successor has to attach and send READY, unless the
/// HANDOFF request says.
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a handoff's old daemon has to drain, unless the HANDOFF
/// request says.
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What connection threads share.
pub struct Broker {
    exports: RwLock<Vec<Arc<Export>>>,
    frontend: FuseFrontend,
    /// The ublk devices, by export name.
    ublk: Mutex<Vec<(String, UblkDevice)>>,
    /// The cache and its export's name (`--cachefiles`).
    cachefiles: OnceLock<(String, Cachefiles)>,
    /// Shape of every export (slots, block size); only names and sizes differ.
    shape: ExportConfig,
    /// Held while an export is added or removed (mounts take a while).
    admin: Mutex<()>,
    /// Where ublk device ids are recorded for `--recover` (the socket's
    /// directory).
    state_dir: std::path::PathBuf,
    pub allow_uids: Vec<u32>,
    pub fence_timeout: Duration,
    /// Pids of the latest daemons that got as far as RESTORE, with their
    /// exports (bounded).
    restored: Mutex<std::collections::VecDeque<(u32, String)>>,
    /// Set after the control socket listens; suspended for an upgrade.
    supervisors: Mutex<Vec<Supervisor>>,
    /// The control socket, kept for the broker's own restart (the control
    /// thread accepts on a duplicate).
    listener: OwnedFd,
    lock: restart::lock::InstanceLock,
    custody: Custody,
    /// Numbers the kept descriptors' names (`restart::record::names`).
    next_id: AtomicU64,
    /// Operators' BROKER_UPGRADE requests for the main thread.
    upgrades: Mutex<Vec<UpgradeRequest>>,
    reexec: Reexec,
    /// `--config`: where `export add` and `export rm` are kept.
    config_file: Option<std::path::PathBuf>,
    /// How many times a broker took this state over (upgrades, restarts
    /// after a crash), from the record it was given.
    restarts: u64,
}

/// How many restored pids are remembered for the supervisor.
const RESTORED_PIDS: usize = 64;

impl Broker {
    /// Records that daemon `pid` restored `export` (it was healthy).
    pub fn note_restored(&self, pid: u32, export: &str) {
        let mut r = self.restored.lock();
        if r.len() >= RESTORED_PIDS {
            r.pop_front();
        }
        r.push_back((pid, export.to_owned()));
    }

    /// The export daemon `pid` last restored, if it did.
    pub fn export_of(&self, pid: u32) -> Option<String> {
        let r = self.restored.lock();
        r.iter()
            .rev()
            .find(|(p, _)| *p == pid)
            .map(|(_, e)| e.clone())
    }

    /// Export `name`'s daemon, for a supervisor.
    pub fn daemon_of(&self, name: &str) -> supervise::ExportDaemon {
        let exports = self.exports.read();
        match exports
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.daemon_pid())
        {
            None => supervise::ExportDaemon::Removed,
            Some(None) => supervise::ExportDaemon::None,
            Some(Some(pid)) => supervise::ExportDaemon::Pid(pid),
        }
    }

    /// Whether daemon `pid` ever restored.
    pub fn restored(&self, pid: u32) -> bool {
        self.restored.lock().iter().any(|(p, _)| *p == pid)
    }

    /// The exports, in the order they were added.
    pub fn exports(&self) -> Vec<Arc<Export>> {
        self.exports.read().clone()
    }

    /// The export named `name`, or an error that lists the ones there are.
    pub fn find(&self, name: &str) -> Result<Arc<Export>, ErrorReply> {
        let found = self.exports.read().iter().find(|e| e.name == name).cloned();
        found.ok_or_else(|| {
            ErrorReply::new(
                ErrorCode::NoSuchExport,
                format!(
                    "no export named {name:?}; this broker has: {}",
                    self.export_names()
                ),
            )
        })
    }

    pub fn export_names(&self) -> String {
        let exports = self.exports.read();
        let names: Vec<&str> = exports.iter().map(|e| e.name.as_str()).collect();
        if names.is_empty() {
            return "none".into();
        }
        names.join(", ")
    }

    pub fn status(&self) -> Vec<ExportStatus> {
        self.exports()
            .iter()
            .map(|e| self.export_status(e))
            .collect()
    }

    /// Every figure `holdfastctl metrics` and `--metrics-listen` show.
    pub fn metrics(&self) -> metrics::BrokerMetrics {
        let exports = self
            .exports()
            .iter()
            .map(|e| {
                let s = self.export_status(e);
                let (handoffs, stall, latency) = e.histograms();
                metrics::ExportMetrics {
                    name: s.name,
                    frontend: s.frontend,
                    mode: s.daemon.map_or(s.mode, |d| d.mode).name().to_owned(),
                    daemon_attached: s.daemon.is_some(),
                    inflight: u64::from(s.inflight),
                    pending: u64::from(s.pending),
                    completed: s.completed,
                    failed: s.failed,
                    replayed: s.replayed,
                    rejected: s.rejected_completions,
                    daemons_lost: s.daemons_lost,
                    handoffs,
                    stall,
                    latency,
                    backend: s.backend,
                }
            })
            .collect();
        metrics::BrokerMetrics {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            restarts: self.restarts,
            exports,
        }
    }

    fn export_status(&self, e: &Export) -> ExportStatus {
        let ublk = self.ublk_device(&e.name);
        let (frontend, device) = match ublk {
            Some(d) => ("ublk", Some(d)),
            None if e.kind == ExportKind::Blobs => ("cachefiles", Some(cachefiles::DEVICE.into())),
            None => ("fuse", self.frontend.device(&e.name)),
        };
        let mut status = e.status(frontend, device.map(|d| d.to_string_lossy().into_owned()));
        status.supervisor = self.supervisor_of(&status);
        status
    }

    /// The supervisor of an export's daemons: the one running its daemon
    /// or successor, else the one whose daemons last restored it. Taken
    /// with no export's lock held.
    fn supervisor_of(&self, e: &ExportStatus) -> Option<holdfast_proto::SupervisorStatus> {
        let pids: Vec<u32> = [e.daemon, e.successor]
            .iter()
            .flatten()
            .map(|d| d.pid)
            .collect();
        let supervisors = self.supervisors.lock();
        let by_pid = supervisors
            .iter()
            .find(|s| s.current_pid().is_some_and(|p| pids.contains(&p)));
        by_pid
            .or_else(|| {
                supervisors
                    .iter()
                    .find(|s| s.export().as_deref() == Some(e.name.as_str()))
            })
            .map(Supervisor::status)
    }

    fn ublk_device(&self, name: &str) -> Option<std::path::PathBuf> {
        let devices = self.ublk.lock();
        devices
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.path())
    }

    /// Adds an export: mounts its file and, for `block`, attaches a block
    /// device over it; supervises `req.daemon` for it, if given; keeps it in
    /// the `--config` file. Returns its status and where it was kept.
    pub fn add_export(
        self: &Arc<Self>,
        req: &ExportAdd,
    ) -> Result<(ExportStatus, String), ErrorReply> {
        let _admin = self.admin.lock();
        let spec = config::ExportSpec {
            name: req.name.clone(),
            size: req.size,
            block: req.block,
            ublk: req.ublk,
            direct: req.direct,
        };
        spec.check(self.shape.block_size)
            .map_err(|e| ErrorReply::new(ErrorCode::Malformed, e))?;
        if self.find(&req.name).is_ok() {
            return Err(ErrorReply::new(
                ErrorCode::Exists,
                format!("export {:?} exists already", req.name),
            ));
        }
        if self.exports.read().len() >= holdfast_proto::MAX_EXPORTS {
            return Err(ErrorReply::new(
                ErrorCode::LimitReached,
                format!(
                    "this broker serves {} exports, the most it can",
                    holdfast_proto::MAX_EXPORTS
                ),
            ));
        }
        let export = self
            .create(&spec, None)
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e))?;
        info!("export {} added ({} bytes)", export.name, export.size);
        let daemon = Some(req.daemon.as_str()).filter(|d| !d.trim().is_empty());
        if let Some(cmd) = daemon {
            match Supervisor::start(cmd.to_owned(), supervise::Hooks::of(self), None) {
                Ok(s) => self.supervisors.lock().push(s),
                Err(e) => warn!("export {}: cannot supervise {cmd:?}: {e}", export.name),
            }
        }
        self.persist();
        let kept = self.keep(|path| config::file::add_export(path, &spec, daemon).map(|()| true));
        Ok((self.export_status(&export), kept))
    }

    /// A supervisor now runs `new` instead of `old` (`upgrade --cmd`): the
    /// `--config` file says so too, where it had `old`.
    pub fn supervised_command_changed(&self, old: &str, new: &str) {
        let _admin = self.admin.lock();
        let kept = self.keep(|path| config::file::replace_daemon(path, old, new));
        info!("supervise: {new:?} replaces {old:?}; {kept}");
        self.persist();
    }

    /// Applies an export's addition or removal to the `--config` file;
    /// says what became of it, for the operator.
    fn keep(&self, change: impl FnOnce(&std::path::Path) -> Result<bool, String>) -> String {
        let Some(path) = &self.config_file else {
            return "not kept for the broker's next start (it has no --config file)".into();
        };
        match change(path) {
            Ok(true) => format!("kept in {}", path.display()),
            Ok(false) => format!("it was not in {}", path.display()),
            Err(e) => {
                warn!("{e}");
                format!("NOT kept for the broker's next start: {e}")
            }
        }
    }

    /// Creates, mounts and lists an export. A ublk export takes over the
    /// device a previous broker left, if its record names one that still
    /// exists. With `prior`, what a previous broker kept of it.
    fn create(
        &self,
        spec: &config::ExportSpec,
        prior: Option<Prior<'_>>,
    ) -> Result<Arc<Export>, String> {
        let export = self.new_export(
            &spec.name,
            spec.size,
            ExportKind::Volume,
            spec.direct,
            prior,
        )?;
        if spec.ublk {
            let record = self.state_dir.join(format!("ublk-{}.id", spec.name));
            let device = UblkDevice::start_or_recover(&export, record, spec.direct)
                .map_err(|e| format!("export {}: {e}", spec.name))?;
            info!("{}: ublk device {}", spec.name, device.dev_id);
            self.ublk.lock().push((spec.name.clone(), device));
        } else {
            self.frontend
                .add(&export, spec.block, spec.direct, self.next_id())
                .map_err(|e| format!("export {}: {e}", spec.name))?;
        }
        self.exports.write().push(export.clone());
        Ok(export)
    }

    /// A new export (not listed yet), with what a previous broker kept of it.
    fn new_export(
        &self,
        name: &str,
        size: u64,
        kind: ExportKind,
        direct: bool,
        prior: Option<Prior<'_>>,
    ) -> Result<Arc<Export>, String> {
        let export = Export::new(&ExportConfig {
            name: name.to_owned(),
            kind,
            size,
            direct,
            ..self.shape.clone()
        })
        .map(Arc::new)
        .map_err(|e| format!("export {name}: {e}"))?;
        if let Some((rec, stored)) = prior {
            export.adopt(rec.last_epoch, &rec.stored, stored);
        }
        Ok(export)
    }

    /// A number for a kept descriptor's name.
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn ublk_id(&self, name: &str) -> Option<u32> {
        let devices = self.ublk.lock();
        devices
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.dev_id)
    }

    /// Binds the cache, or takes over `inherited` (the one a previous
    /// broker passed on), and adds its blob export.
    fn start_cachefiles(
        &self,
        spec: &config::CachefilesSpec,
        inherited: Option<OwnedFd>,
        prior: Option<Prior<'_>>,
    ) -> Result<(), String> {
        let export = self.new_export(&spec.tag, 0, ExportKind::Blobs, false, prior)?;
        let (cache, how) = Cachefiles::start(export.clone(), &spec.dir, &spec.tag, inherited)?;
        match how {
            cachefiles::Device::Bound => info!(
                "{}: cache bound in ondemand mode on {}",
                spec.tag,
                spec.dir.display()
            ),
            cachefiles::Device::Restored => info!(
                "{}: took over the cache a previous broker held; wrote restore",
                spec.tag
            ),
        }
        self.exports.write().push(export);
        let _ = self.cachefiles.set((spec.tag.clone(), cache));
        Ok(())
    }

    /// Removes an export. Refused while its file or block device is open,
    /// unless `force`: then the users' I/O fails with EIO from here on.
    pub fn remove_export(&self, name: &str, force: bool) -> Result<String, ErrorReply> {
        let _admin = self.admin.lock();
        let export = self.find(name)?;
        if export.kind == ExportKind::Blobs {
            return Err(ErrorReply::new(
                ErrorCode::BadState,
                format!(
                    "export {name} is the cachefiles cache (--cachefiles); it lasts as long as \
                     the broker: unmount its erofs file systems and stop the broker instead"
                ),
            ));
        }
        let mut users = self.frontend.users(name);
        if let Some(device) = self.ublk_device(name) {
            users.extend(frontends::holders(Some(&device), &[]));
        }
        if !users.is_empty() && !force {
            return Err(ErrorReply::new(
                ErrorCode::Busy,
                format!(
                    "export {name} is in use: {}; stop using it, or remove it with --force (its users then get I/O errors)",
                    users.join("; ")
                ),
            ));
        }
        export.remove()?;
        // Users' I/O fails from here on: a direct-mode daemon first stops
        // reading the kernel's queue (or is fenced), so that what is queued
        // comes back to the frontend, which fails it.
        let bound = control::RELEASE_DRAIN + self.fence_timeout + Duration::from_secs(1);
        if !export.wait_taken_back(Instant::now() + bound) {
            warn!("{name}: its direct-mode daemon did not give the queue back within {bound:?}");
        }
        self.exports.write().retain(|e| !Arc::ptr_eq(e, &export));
        self.frontend.remove(name);
        let ublk = {
            let mut devices = self.ublk.lock();
            let i = devices.iter().position(|(n, _)| n == name);
            i.map(|i| devices.swap_remove(i))
        };
        if let Some((_, device)) = ublk {
            device.remove();
        }
        self.persist();
        info!(
            "export {name} removed{}",
            if users.is_empty() {
                String::new()
            } else {
                format!(" while in use ({})", users.join("; "))
            }
        );
        Ok(self.keep(|path| config::file::remove_export(path, name)))
    }

    /// Arms a handoff of `export` and, for `spawn`, starts its successor
    /// with the command line the current daemon is supervised with.
    /// Returns the handoff's id and the HANDOFF_ARMED reply.
    pub fn start_handoff(
        &self,
        export: &Export,
        req: &HandoffRequest,
    ) -> Result<(u64, Reply), ErrorReply> {
        let bound = |ms: u32, default: Duration| match ms {
            0 => default,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let params = HandoffParams {
            dry_run: req.dry_run,
            ready_timeout: bound(req.ready_timeout_ms, DEFAULT_READY_TIMEOUT),
            drain_timeout: bound(req.drain_timeout_ms, DEFAULT_DRAIN_TIMEOUT),
        };
        if req.spawn {
            // Refused before it is armed: a daemon nobody supervises is no
            // handoff that was aborted.
            let pid = export.daemon_pid();
            let supervised = self
                .supervisors
                .lock()
                .iter()
                .any(|s| pid.is_some() && s.current_pid() == pid);
            if let (Some(pid), false) = (pid, supervised) {
                return Err(not_supervised(&export.name, pid));
            }
        }
        let (id, pid, epoch) = export.begin_handoff(params)?;
        if req.spawn {
            let supervisors = self.supervisors.lock();
            let supervisor = supervisors.iter().find(|s| s.current_pid() == Some(pid));
            let spawned = match supervisor {
                None => Err(not_supervised(&export.name, pid)),
                Some(s) => s
                    .spawn_successor(Some(req.cmd.as_str()).filter(|c| !c.is_empty()))
                    .map(drop)
                    .map_err(|e| {
                        ErrorReply::new(
                            ErrorCode::Internal,
                            format!("export {}: cannot start the successor: {e}", export.name),
                        )
                    }),
            };
            drop(supervisors);
            if let Err(e) = spawned {
                export.cancel_handoff(id, &e.text);
                return Err(e);
            }
        }
        Ok((
            id,
            Reply::HandoffArmed {
                from_pid: pid,
                from_epoch: epoch,
            },
        ))
    }
}

fn not_supervised(export: &str, pid: u32) -> ErrorReply {
    ErrorReply::new(
        ErrorCode::BadState,
        format!(
            "export {export}: its daemon pid {pid} is not supervised by this broker \
             (--supervise, or an export's daemon in --config); start a successor yourself: \
             holdfastctl handoff {export} --exec CMD"
        ),
    )
}

/// The signals the main thread takes: SIGTERM and SIGINT stop the broker,
/// SIGUSR2 upgrades it, and SIGHUP (a closing terminal, a reload meant for
/// something else) is logged and ignored: it must never end the broker.
const SIGNALS: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR2, libc::SIGHUP];

/// Runs the broker until SIGTERM or SIGINT.
pub fn run(cfg: Config) -> Result<(), String> {
    let reexec = Reexec::capture()?;
    // Read (and cleared from the environment) before any thread starts.
    let mut inherited = restart::fds::Inherited::from_env()?;
    // Blocked before any thread starts, so every thread inherits the mask
    // and the signals are taken only by the main thread below.
    sys::block_signals(&SIGNALS).map_err(|e| format!("cannot block signals: {e}"))?;
    let systemd = restart::systemd::Notifier::from_env()?;

    let mut allow_uids = cfg.allow_uids.clone();
    allow_uids.push(0);
    allow_uids.push(rustix::process::geteuid().as_raw());

    for dir in [cfg.socket.parent(), Some(cfg.mountpoint.as_path())]
        .into_iter()
        .flatten()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let lock = restart::lock::InstanceLock::acquire(&cfg.socket, inherited.take(names::LOCK))?;
    let metrics_listener = cfg.metrics_listen.map(metrics::http::bind).transpose()?;
    let requesters = inherited.take_prefix(names::REQUESTER_PREFIX);
    // What systemd's store holds: everything it passed, or everything the
    // broker before this one passed on (it kept the store in step).
    let stored = if systemd.is_some() {
        inherited
            .names()
            .filter(|n| *n != names::RECORD)
            .map(str::to_owned)
            .collect()
    } else {
        std::collections::BTreeSet::new()
    };
    let record = restart::take_record(&mut inherited);
    let listener = match inherited.take(names::LISTEN) {
        Some(l) => l,
        None => sys::seqpacket::listen(&cfg.socket, cfg.socket_mode)
            .map_err(|e| format!("cannot listen on {}: {e}", cfg.socket.display()))?,
    };
    let seq = record.as_ref().map_or(0, |r| r.seq);
    let next_id = record.as_ref().map_or(0, |r| r.next_id);
    let broker = Arc::new_cyclic(|weak: &Weak<Broker>| {
        let weak = weak.clone();
        let on_init = Arc::new(move || {
            if let Some(b) = weak.upgrade() {
                b.persist();
            }
        });
        Broker {
            exports: RwLock::default(),
            frontend: FuseFrontend::new(&cfg.mountpoint, cfg.fuse_workers, on_init),
            ublk: Mutex::default(),
            cachefiles: OnceLock::new(),
            shape: ExportConfig {
                name: String::new(),
                kind: ExportKind::Volume,
                size: 0,
                block_size: cfg.block_size,
                slot_count: cfg.slot_count,
                slot_size: cfg.slot_size,
                heap_limit: HEAP_LIMIT,
                direct: false,
            },
            admin: Mutex::default(),
            state_dir: cfg
                .socket
                .parent()
                .map_or_else(|| ".".into(), std::path::Path::to_path_buf),
            allow_uids,
            fence_timeout: cfg.fence_timeout,
            restored: Mutex::default(),
            supervisors: Mutex::default(),
            listener,
            lock,
            custody: Custody::new(systemd, stored, seq),
            next_id: AtomicU64::new(next_id),
            upgrades: Mutex::default(),
            reexec,
            config_file: cfg.config_file.clone(),
            restarts: record.as_ref().map_or(0, |r| r.restarts.saturating_add(1)),
        }
    });
    broker.restore_exports(&cfg, record.as_ref(), &mut inherited)?;
    for (name, _) in inherited.into_rest() {
        warn!("a previous broker passed on {name:?}, which nothing here uses; closed");
    }

    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .map(drop)
            .map_err(|e| format!("cannot start thread {name}: {e}"))
    };
    {
        let broker = broker.clone();
        let listener = broker
            .listener
            .try_clone()
            .map_err(|e| format!("control socket: {e}"))?;
        spawn(
            "holdfast-control",
            Box::new(move || control::serve(broker, listener)),
        )?;
    }
    if let Some(listener) = metrics_listener {
        if let Some(addr) = cfg.metrics_listen {
            info!("metrics at http://{addr}/metrics");
        }
        let broker = broker.clone();
        spawn(
            "holdfast-metrics",
            Box::new(move || {
                metrics::http::serve(listener, &|| metrics::render(&broker.metrics()))
            }),
        )?;
    }
    {
        let (req, wait) = (cfg.request_timeout, cfg.daemon_wait);
        let broker = broker.clone();
        spawn(
            "holdfast-watchdog",
            Box::new(move || {
                loop {
                    std::thread::sleep(WATCHDOG_TICK);
                    let (now, mono_ns) = (Instant::now(), restart::monotonic_ns());
                    for e in broker.exports() {
                        e.check_bounds(now, mono_ns, req, wait);
                    }
                }
            }),
        )?;
    }
    let mut prior: Vec<SupervisedRecord> = record
        .as_ref()
        .map(|r| r.supervised.clone())
        .unwrap_or_default();
    for cmd in &cfg.supervise {
        let adopt = prior
            .iter()
            .position(|s| &s.cmd == cmd)
            .map(|i| prior.swap_remove(i))
            .map(|s| (s.pid, s.start_time));
        let s = Supervisor::start(cmd.clone(), supervise::Hooks::of(&broker), adopt)
            .map_err(|e| format!("cannot supervise {cmd:?}: {e}"))?;
        broker.supervisors.lock().push(s);
    }
    // What the previous broker supervised beyond its command line: daemons
    // of exports added at run time with --daemon.
    for s in prior {
        info!(
            "supervise: {:?} was added at run time; supervising it again",
            s.cmd
        );
        match Supervisor::start(
            s.cmd.clone(),
            supervise::Hooks::of(&broker),
            Some((s.pid, s.start_time)),
        ) {
            Ok(s) => broker.supervisors.lock().push(s),
            Err(e) => warn!("cannot supervise {:?}: {e}", s.cmd),
        }
    }
    broker.persist();
    if let Some(upgrade) = record.and_then(|r| r.upgrade) {
        broker.finish_upgrade(upgrade, requesters);
    }
    broker.custody.notify(&format!(
        "READY=1\nSTATUS=serving {}\n",
        broker.export_names()
    ));
    info!(
        "ready: socket {}, mount {}, exports: {}",
        cfg.socket.display(),
        cfg.mountpoint.display(),
        broker.export_names()
    );
    let sig = loop {
        match sys::wait_signal(&SIGNALS, Duration::from_secs(1)) {
            Some(libc::SIGUSR2) => broker.upgrade(),
            Some(libc::SIGHUP) => info!(
                "SIGHUP ignored; to replace the broker, use SIGUSR2 or holdfastctl broker upgrade"
            ),
            Some(s) => break s,
            None => {}
        }
    };
    info!("signal {sig}: shutting down");
    broker.custody.notify("STOPPING=1\n");
    // The ublk devices first, while their daemons still serve the
    // writeback that stopping a device needs; taken out of the list, so
    // that a status request meanwhile does not wait behind the stops.
    let devices = std::mem::take(&mut *broker.ublk.lock());
    for (name, device) in devices {
        match broker.find(&name) {
            Ok(export) => device.stop(&export),
            Err(_) => device.remove(),
        }
    }
    for s in broker.supervisors.lock().iter() {
        s.shutdown(Duration::from_secs(3));
    }
    // A stop is a stop: the next start is a fresh one.
    broker.custody.clear();
    broker.frontend.unmount();
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}
