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
pub mod frontends;
pub mod inflight;
pub mod log;
pub mod restart;
pub mod shm;
pub mod supervise;
pub mod sys;

use std::sync::{Arc, OnceLock};
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
    /// Pids of the latest daemons that got as far as RESTORE (bounded).
    restored: Mutex<std::collections::VecDeque<u32>>,
    /// Set once, after the control socket listens.
    supervisors: OnceLock<Vec<Supervisor>>,
}

/// How many restored pids are remembered for the supervisor.
const RESTORED_PIDS: usize = 64;

impl Broker {
    /// Records that daemon `pid` restored (it was healthy).
    pub fn note_restored(&self, pid: u32) {
        let mut r = self.restored.lock();
        if r.len() >= RESTORED_PIDS {
            r.pop_front();
        }
        r.push_back(pid);
    }

    /// Whether daemon `pid` ever restored.
    pub fn restored(&self, pid: u32) -> bool {
        self.restored.lock().contains(&pid)
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

    fn export_status(&self, e: &Export) -> ExportStatus {
        let ublk = self.ublk_device(&e.name);
        let (frontend, device) = match ublk {
            Some(d) => ("ublk", Some(d)),
            None if e.kind == ExportKind::Blobs => ("cachefiles", Some(cachefiles::DEVICE.into())),
            None => ("fuse", self.frontend.device(&e.name)),
        };
        e.status(frontend, device.map(|d| d.to_string_lossy().into_owned()))
    }

    fn ublk_device(&self, name: &str) -> Option<std::path::PathBuf> {
        let devices = self.ublk.lock();
        devices
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.path())
    }

    /// Adds an export: mounts its file and, for `block`, attaches a block
    /// device over it. It waits for a daemon like any other export.
    pub fn add_export(&self, req: &ExportAdd) -> Result<ExportStatus, ErrorReply> {
        let _admin = self.admin.lock();
        let spec = config::ExportSpec {
            name: req.name.clone(),
            size: req.size,
            block: req.block,
            ublk: req.ublk,
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
            .create(&spec, false)
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, e))?;
        info!("export {} added ({} bytes)", export.name, export.size);
        Ok(self.export_status(&export))
    }

    /// Creates, mounts and lists an export; with `recover`, a ublk export
    /// takes over the device a killed broker left.
    fn create(&self, spec: &config::ExportSpec, recover: bool) -> Result<Arc<Export>, String> {
        let export = Export::new(&ExportConfig {
            name: spec.name.clone(),
            size: spec.size,
            ..self.shape.clone()
        })
        .map(Arc::new)
        .map_err(|e| format!("export {}: {e}", spec.name))?;
        if spec.ublk {
            let record = self.state_dir.join(format!("ublk-{}.id", spec.name));
            let device = if recover {
                UblkDevice::recover(&export, record)
            } else {
                UblkDevice::start(&export, record)
            }
            .map_err(|e| format!("export {}: {e}", spec.name))?;
            info!("{}: ublk device {}", spec.name, device.dev_id);
            self.ublk.lock().push((spec.name.clone(), device));
        } else {
            self.frontend
                .add(&export, spec.block)
                .map_err(|e| format!("export {}: {e}", spec.name))?;
        }
        self.exports.write().push(export.clone());
        Ok(export)
    }

    /// Binds the cache, or takes over `inherited` (the one a previous
    /// broker passed on), and adds its blob export.
    fn start_cachefiles(
        &self,
        spec: &config::CachefilesSpec,
        inherited: Option<std::os::fd::OwnedFd>,
    ) -> Result<(), String> {
        let export = Arc::new(
            Export::new(&ExportConfig {
                name: spec.tag.clone(),
                kind: ExportKind::Blobs,
                size: 0,
                ..self.shape.clone()
            })
            .map_err(|e| format!("export {}: {e}", spec.tag))?,
        );
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
        match restart::store_fd(cache.device_fd(), cachefiles::FD_NAME) {
            Ok(true) => info!("{}: cache fd handed to systemd's fd store", spec.tag),
            Ok(false) => {}
            Err(e) => warn!("{}: {e}", spec.tag),
        }
        self.exports.write().push(export);
        let _ = self.cachefiles.set((spec.tag.clone(), cache));
        Ok(())
    }

    /// SIGUSR2: replaces this process with a new broker (same binary path,
    /// options and `--recover`) that inherits /dev/cachefiles. Refused with
    /// FUSE or ublk exports, whose devices a re-exec would end.
    fn reexec(&self, how: &restart::Reexec) {
        let Some((_, cache)) = self.cachefiles.get() else {
            return warn!("SIGUSR2: re-exec refused: there is no --cachefiles cache to keep");
        };
        let others: Vec<String> = self
            .exports()
            .iter()
            .filter(|e| e.kind != ExportKind::Blobs)
            .map(|e| e.name.clone())
            .collect();
        if !others.is_empty() {
            return warn!(
                "SIGUSR2: re-exec refused: exports {} would lose their FUSE mounts or ublk \
                 devices; remove them first (holdfastctl export rm)",
                others.join(", ")
            );
        }
        info!("SIGUSR2: re-executing, keeping {}", cachefiles::DEVICE);
        // Daemons get SIGTERM and detach; the new broker starts its own.
        for s in self.supervisors.get().into_iter().flatten() {
            s.shutdown(Duration::from_secs(3));
        }
        let err = how.exec(cache.device_fd());
        warn!("SIGUSR2: re-exec failed: {err}; this broker goes on without its supervised daemons");
    }

    /// Removes an export. Refused while its file or block device is open,
    /// unless `force`: then the users' I/O fails with EIO from here on.
    pub fn remove_export(&self, name: &str, force: bool) -> Result<(), ErrorReply> {
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
        info!(
            "export {name} removed{}",
            if users.is_empty() {
                String::new()
            } else {
                format!(" while in use ({})", users.join("; "))
            }
        );
        Ok(())
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
        let (id, pid, epoch) = export.begin_handoff(params)?;
        if req.spawn {
            let supervisor = self
                .supervisors
                .get()
                .and_then(|all| all.iter().find(|s| s.current_pid() == Some(pid)));
            let spawned = match supervisor {
                None => Err(ErrorReply::new(
                    ErrorCode::BadState,
                    format!(
                        "export {}: its daemon pid {pid} is not supervised by this broker (--supervise); \
                         start a successor yourself: holdfastctl handoff {} --exec CMD",
                        export.name, export.name
                    ),
                )),
                Some(s) => s.spawn_successor().map(drop).map_err(|e| {
                    ErrorReply::new(
                        ErrorCode::Internal,
                        format!("export {}: cannot start the successor: {e}", export.name),
                    )
                }),
            };
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

/// Runs the broker until SIGTERM or SIGINT.
pub fn run(cfg: Config) -> Result<(), String> {
    let signals = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR2];
    let reexec = restart::Reexec::capture()?;
    // Read (and cleared from the environment) before any thread starts.
    let inherited = if cfg.recover && cfg.cachefiles.is_some() {
        restart::inherited_cachefiles_fd()?
    } else {
        None
    };
    // Blocked before any thread starts, so every thread inherits the mask
    // and the signals are taken only by the main thread below.
    sys::block_signals(&signals).map_err(|e| format!("cannot block signals: {e}"))?;

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

    let listener = sys::seqpacket::listen(&cfg.socket, cfg.socket_mode)
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.socket.display()))?;
    let broker = Arc::new(Broker {
        exports: RwLock::default(),
        frontend: FuseFrontend::new(&cfg.mountpoint, cfg.fuse_workers),
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
        },
        admin: Mutex::default(),
        state_dir: cfg
            .socket
            .parent()
            .map_or_else(|| ".".into(), std::path::Path::to_path_buf),
        allow_uids,
        fence_timeout: cfg.fence_timeout,
        restored: Mutex::default(),
        supervisors: OnceLock::new(),
    });
    for spec in &cfg.exports {
        broker.create(spec, cfg.recover)?;
    }
    if let Some(spec) = &cfg.cachefiles {
        broker.start_cachefiles(spec, inherited)?;
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
        spawn(
            "holdfast-control",
            Box::new(move || control::serve(broker, listener)),
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
                    let now = Instant::now();
                    for e in broker.exports() {
                        e.check_bounds(now, req, wait);
                    }
                }
            }),
        )?;
    }
    let mut supervisors = Vec::new();
    for cmd in &cfg.supervise {
        let b = broker.clone();
        let healthy = Box::new(move |pid| b.restored(pid));
        supervisors.push(
            Supervisor::start(cmd.clone(), healthy)
                .map_err(|e| format!("cannot supervise {cmd:?}: {e}"))?,
        );
    }
    let _ = broker.supervisors.set(supervisors);

    info!(
        "ready: socket {}, mount {}, exports: {}",
        cfg.socket.display(),
        cfg.mountpoint.display(),
        broker.export_names()
    );
    let sig = loop {
        match sys::wait_signal(&signals, Duration::from_secs(1)) {
            Some(libc::SIGUSR2) => broker.reexec(&reexec),
            Some(s) => break s,
            None => {}
        }
    };
    info!("signal {sig}: shutting down");
    for s in broker.supervisors.get().into_iter().flatten() {
        s.shutdown(Duration::from_secs(3));
    }
    broker.frontend.unmount();
    for (_, device) in broker.ublk.lock().drain(..) {
        device.remove();
    }
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}
