//! holdfastctl: the operator's view of a running broker.

use std::fmt::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use holdfast_broker::supervise;
use holdfast_broker::sys::{self, pidfd::Pidfd, seqpacket};
use holdfast_proto::{
    ExportAdd, ExportStatus, Figure, HandoffOutcome, HandoffProgress, HandoffReport,
    HandoffRequest, Hello, MAX_MESSAGE_LEN, PROTOCOL_VERSION, Reply, Request, SOCKET_ENV,
    SupervisorStatus, UpgradeReport,
};

/// The layout of `status --json`; bumped when a key changes meaning or
/// goes away (new keys do not bump it).
const STATUS_JSON_VERSION: u32 = 1;

#[derive(Parser)]
#[command(
    name = "holdfastctl",
    version,
    about = "Inspect and operate a holdfast broker",
    after_help = "Exit status: 0 on success (a handoff that completed, or a dry run that warmed \
                  a successor up), 1 on failure (a handoff that was aborted), 2 on bad usage.\n\
                  Durations: 500ms, 30s, 2m (a bare number is seconds). Sizes: 4096, 64KiB, 1GiB."
)]
struct Cli {
    /// The broker's control socket
    #[arg(
        long,
        global = true,
        env = SOCKET_ENV,
        default_value = holdfast_broker::config::DEFAULT_SOCKET,
        value_name = "PATH"
    )]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every export: its daemon (pid, epoch, state), requests in flight,
    /// pending, replayed so far, the running and the last handoff
    Status {
        /// Print JSON (keys as in the README's "Status")
        #[arg(long)]
        json: bool,
    },
    /// The broker's figures in the Prometheus text format (as
    /// `holdfast-broker --metrics-listen` serves them)
    Metrics,
    /// Replay an export's pending requests to its attached daemon, or fail
    /// them
    Restore {
        /// The export's name
        #[arg(value_parser = export_name)]
        export: String,
        /// Fail every pending request with EIO instead (the writers see an
        /// error; nothing is replayed)
        #[arg(long)]
        fail_pending: bool,
    },
    /// Replace an export's daemon with a successor without failing or
    /// losing a request; waits for the end and prints the figures
    #[command(
        after_help = "Without --exec, start `holdfast-daemon ... --successor` yourself \
        once the handoff is armed. CMD's log goes to this command's stderr unless CMD \
        redirects it (CMD 2>>LOG)."
    )]
    Handoff {
        /// The export's name
        #[arg(value_parser = export_name)]
        export: String,
        /// Start the successor: CMD runs with /bin/sh, with
        /// HOLDFAST_SUCCESSOR=1 and HOLDFAST_SOCKET set
        #[arg(long, value_name = "CMD")]
        exec: Option<String>,
        #[command(flatten)]
        opts: HandoffOpts,
    },
    /// Hand an export off to a successor the broker starts with the command
    /// line it supervises the export's daemon with, or with a new one
    Upgrade {
        /// The export's name
        #[arg(value_parser = export_name)]
        export: String,
        /// Start the successor from this command line instead; once it
        /// serves, it is the one supervised (and kept in the broker's
        /// --config file)
        #[arg(long, value_name = "CMD", value_parser = daemon_cmd)]
        cmd: Option<String>,
        #[command(flatten)]
        opts: HandoffOpts,
    },
    /// Add or remove exports
    #[command(subcommand)]
    Export(ExportCommand),
    /// Operate the broker itself
    #[command(subcommand)]
    Broker(BrokerCommand),
    /// Print a shell completion script (e.g. `holdfastctl completions bash
    /// > /etc/bash_completion.d/holdfastctl`)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages of holdfastctl and its commands to DIR
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Args)]
struct HandoffOpts {
    /// Warm a successor up, then release it; the current daemon keeps
    /// serving
    #[arg(long)]
    dry_run: bool,
    /// For the successor to attach and be ready [default: 60s]
    #[arg(long, value_name = "DURATION", value_parser = millis)]
    timeout: Option<u32>,
    /// For the old daemon to drain; then it is killed and its requests are
    /// replayed to the successor [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = millis)]
    drain_timeout: Option<u32>,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum ExportCommand {
    /// Add an export; it waits for a daemon (holdfast-daemon --export NAME
    /// ...)
    #[command(
        after_help = "Daemons serve a FUSE export's connection themselves (direct \
        mode, Linux 6.9+) unless --relay: then every request goes through the broker. A ublk \
        export is relayed unless --direct: then its daemon serves the device's queue."
    )]
    Add {
        /// The export's name
        #[arg(value_parser = export_name)]
        name: String,
        /// Its size, like 1GiB
        #[arg(value_parser = holdfast_proto::parse_size)]
        size: u64,
        /// Also give it a block device (/dev/loopN) over its FUSE file
        #[arg(long)]
        block: bool,
        /// What the kernel sees: a FUSE file, or a ublk device (/dev/ublkbN)
        #[arg(long, value_enum, default_value_t = Frontend::Fuse)]
        frontend: Frontend,
        /// Let its daemons serve the kernel's queue themselves
        #[arg(long, conflicts_with = "relay")]
        direct: bool,
        /// Take every request through the broker
        #[arg(long)]
        relay: bool,
        /// A daemon command line the broker supervises for it (run with
        /// /bin/sh, started again whenever it exits); kept with the export
        /// in the broker's --config file
        #[arg(long, value_name = "CMD", value_parser = daemon_cmd)]
        daemon: Option<String>,
    },
    /// Remove an export; refused while its file or block device is open
    Rm {
        /// The export's name
        #[arg(value_parser = export_name)]
        name: String,
        /// Remove it even while open: its users then get I/O errors
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Frontend {
    Fuse,
    Ublk,
}

#[derive(Subcommand)]
enum BrokerCommand {
    /// Replace the broker with the binary now on disk, in the same process,
    /// keeping every export, its mount, block device and daemon; prints the
    /// old and new broker, the time without dispatch and the FUSE requests
    /// re-sent
    Upgrade {
        /// Print the report as JSON
        #[arg(long)]
        json: bool,
    },
}

fn daemon_cmd(s: &str) -> Result<String, String> {
    if s.trim().is_empty() || s.len() > holdfast_proto::MAX_TEXT_LEN {
        return Err(format!(
            "a command line of 1 to {} bytes",
            holdfast_proto::MAX_TEXT_LEN
        ));
    }
    Ok(s.to_owned())
}

fn export_name(s: &str) -> Result<String, String> {
    holdfast_proto::validate_name(s).map(|()| s.to_owned())
}

/// A duration on the command line to whole milliseconds on the wire.
fn millis(s: &str) -> Result<u32, String> {
    let d = holdfast_proto::parse_duration(s)?;
    u32::try_from(d.as_millis())
        .ok()
        .filter(|ms| (1..=86_400_000).contains(ms))
        .ok_or_else(|| format!("{s:?}: from 1ms to 24h"))
}

/// `status --json`.
#[derive(serde::Serialize)]
struct StatusJson<'a> {
    version: u32,
    exports: &'a [ExportStatus],
}

fn to_json(v: &impl serde::Serialize) -> Result<String, String> {
    serde_json::to_string(v).map_err(|e| format!("cannot write JSON: {e}"))
}

/// Connects, saying what to check when that fails.
fn connect(socket: &Path) -> Result<OwnedFd, String> {
    seqpacket::connect(socket).map_err(|e| {
        let at = socket.display();
        let hint = match e.raw_os_error() {
            Some(libc::ENOENT) => format!(
                "no broker has a socket there. Is it running (`systemctl status holdfast`, \
                 `pgrep -a holdfast-broker`)? Start one with `holdfast-broker --socket {at}`, \
                 or point to another with --socket or ${SOCKET_ENV}"
            ),
            Some(libc::ECONNREFUSED) => format!(
                "the socket is there but nothing listens on it: the broker that made it has \
                 stopped. Start one with `holdfast-broker --socket {at}`"
            ),
            Some(libc::EACCES) | Some(libc::EPERM) => "permission denied: run as root or as \
                 the broker's user, or start the broker with --allow-uid and --socket-mode"
                .to_owned(),
            _ => "check --socket".to_owned(),
        };
        format!("cannot connect to {at}: {e}; {hint}")
    })
}

fn hello(sock: &OwnedFd) -> Result<(), String> {
    call(
        sock,
        &Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            caps: 0,
            pid: std::process::id(),
        }),
    )
    .map(drop)
}

fn call(sock: &OwnedFd, req: &Request) -> Result<Reply, String> {
    seqpacket::send(sock.as_fd(), &req.encode(), &[]).map_err(|e| format!("send: {e}"))?;
    receive(sock)
}

/// The next message from the broker; an ERROR is an `Err`.
fn receive(sock: &OwnedFd) -> Result<Reply, String> {
    let mut buf = vec![0u8; MAX_MESSAGE_LEN];
    let pkt = seqpacket::recv(sock.as_fd(), &mut buf, rustix::net::RecvFlags::empty())
        .map_err(|e| format!("receive: {e}"))?;
    if pkt.len == 0 {
        return Err("the broker closed the connection".into());
    }
    let reply = Reply::decode(buf.get(..pkt.len).unwrap_or_default())
        .map_err(|e| format!("bad reply from the broker: {e}"))?;
    match reply {
        Reply::Error(e) => Err(e.to_string()),
        r => Ok(r),
    }
}

fn human_size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut i = 0;
    while i + 1 < UNITS.len() && n >= 1 << (10 * (i + 1)) && n.is_multiple_of(1 << (10 * (i + 1))) {
        i += 1;
    }
    format!("{}{}", n >> (10 * i), UNITS[i])
}

fn table(exports: &[ExportStatus]) -> String {
    let head = [
        "EXPORT",
        "SIZE",
        "FRONTEND",
        "MODE",
        "DEVICE",
        "PID",
        "EPOCH",
        "STATE",
        "INFLIGHT",
        "PENDING",
        "REPLAYED",
        "COMPLETED",
        "FAILED",
        "LOST",
        "REJECTED",
        "WAITING",
    ];
    let mut rows = vec![head.map(String::from).to_vec()];
    for e in exports {
        let (pid, epoch, state) = match e.daemon {
            Some(d) => (
                d.pid.to_string(),
                d.epoch.to_string(),
                d.state.name().to_string(),
            ),
            None => ("-".into(), "-".into(), "no daemon".into()),
        };
        rows.push(vec![
            e.name.clone(),
            human_size(e.size),
            e.frontend.clone(),
            // The daemon's; without one, what the next one can get.
            e.daemon.map_or(e.mode, |d| d.mode).name().to_owned(),
            e.device.clone().unwrap_or_else(|| "-".into()),
            pid,
            epoch,
            state,
            e.inflight.to_string(),
            e.pending.to_string(),
            e.replayed.to_string(),
            e.completed.to_string(),
            e.failed.to_string(),
            e.daemons_lost.to_string(),
            e.rejected_completions.to_string(),
            e.waiting_ms
                .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0)),
        ]);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    for e in exports {
        if let (Some(h), succ) = (&e.handoff, &e.successor) {
            let who = succ.map_or("no successor yet".into(), |d| {
                format!(
                    "successor pid {} (epoch {}) {}",
                    d.pid,
                    d.epoch,
                    d.state.name()
                )
            });
            let _ = writeln!(
                out,
                "{}: handoff{} {} for {:.1}s: {who}",
                e.name,
                if h.dry_run { " (dry run)" } else { "" },
                h.phase.name(),
                h.elapsed_ms as f64 / 1000.0
            );
        }
        if let Some(r) = &e.last_handoff {
            let _ = writeln!(out, "{}: last handoff {}", e.name, report_line(r));
        }
        if let Some(s) = &e.supervisor {
            let _ = writeln!(out, "{}: supervised: {}", e.name, supervisor_line(s));
        }
        if !e.backend.is_empty() {
            let figures: Vec<String> = e
                .backend
                .iter()
                .map(|(f, v)| format!("{} {}", f.name(), figure_text(f, v)))
                .collect();
            let _ = writeln!(out, "{}: backend: {}", e.name, figures.join(", "));
        }
    }
    out
}

fn supervisor_line(s: &SupervisorStatus) -> String {
    let mut l = match s.pid {
        Some(pid) => format!("daemon pid {pid}"),
        None => "no daemon".into(),
    };
    let _ = write!(l, ", {} restarts", s.restarts);
    if let Some(exit) = &s.last_exit {
        let _ = write!(l, ", last exit: {exit}");
    }
    if let Some(ms) = s.backoff_ms {
        let _ = write!(l, ", next start in {:.1}s", ms as f64 / 1000.0);
    }
    let _ = write!(l, "; {}", s.cmd);
    l
}

/// A backend figure as a person reads it: sizes in binary units, ages in
/// seconds.
fn figure_text(f: Figure, v: u64) -> String {
    if f.is_age() {
        return format!("{:.1}s", v as f64 / 1000.0);
    }
    if !f.name().ends_with("_bytes") || v < 1024 {
        return v.to_string();
    }
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut x = v as f64 / 1024.0;
    let mut i = 0;
    while x >= 1024.0 && i + 1 < UNITS.len() {
        x /= 1024.0;
        i += 1;
    }
    format!("{x:.1}{}", UNITS[i])
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

/// One line with a handoff's figures.
fn report_line(r: &HandoffReport) -> String {
    let mut l = format!(
        "{}: pid {} (epoch {}) -> pid {} (epoch {}); warm-up {}, drain {}, stall {}, total {}, replayed {}",
        r.outcome.name(),
        r.from_pid,
        r.from_epoch,
        r.to_pid,
        r.to_epoch,
        ms(r.warmup_us),
        ms(r.drain_us),
        ms(r.stall_us),
        ms(r.total_us),
        r.replayed
    );
    if !r.reason.is_empty() {
        let _ = write!(l, "; {}", r.reason);
    }
    l
}

fn upgrade_line(r: &UpgradeReport) -> String {
    format!(
        "broker upgraded: pid {} ({}) -> pid {} ({}); {} without dispatch, {} FUSE requests re-sent, \
         {} daemons attached again{}",
        r.old_pid,
        r.old_version,
        r.new_pid,
        r.new_version,
        ms(r.stall_us),
        r.resent,
        r.reattached,
        if r.missing.is_empty() {
            String::new()
        } else {
            format!("; no daemon yet: {}", r.missing.join(", "))
        }
    )
}

/// Starts a handoff successor: `sh -c "exec CMD"`, told by its environment
/// that it is a successor and where the broker is. It outlives holdfastctl,
/// so it must not hold holdfastctl's stdout: a caller reading that to its
/// end (`$(holdfastctl ...)`) would wait for the successor's exit. Its
/// stderr (the daemon's log) stays holdfastctl's unless CMD redirects it.
fn start_successor(cmd: &str, socket: &Path) -> Result<Child, String> {
    supervise::shell(cmd, true)
        .env(SOCKET_ENV, socket)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the successor {cmd:?}: {e}"))
}

/// Prints a running handoff's phases as they change, from STATUS on a
/// connection of its own (the handoff's waits for the report).
struct Progress {
    sock: Option<OwnedFd>,
    last: Option<(&'static str, Option<u32>)>,
}

impl Progress {
    fn new(socket: &Path) -> Self {
        let sock = connect(socket).ok().filter(|s| hello(s).is_ok());
        Self { sock, last: None }
    }

    fn show(&mut self, export: &str) {
        let Some(sock) = &self.sock else {
            return;
        };
        let Ok(all) = status(sock) else {
            self.sock = None;
            return;
        };
        let Some(e) = all.iter().find(|e| e.name == export) else {
            return;
        };
        let Some(HandoffProgress {
            phase, elapsed_ms, ..
        }) = e.handoff
        else {
            return;
        };
        let now = (phase.name(), e.successor.map(|d| d.pid));
        if self.last == Some(now) {
            return;
        }
        self.last = Some(now);
        let who = e.successor.map_or("no successor yet".into(), |d| {
            format!("successor pid {} {}", d.pid, d.state.name())
        });
        eprintln!(
            "{export}: {} at {:.1}s: {who}",
            phase.name(),
            elapsed_ms as f64 / 1000.0
        );
    }
}

/// Runs a handoff: arms it, starts the successor for --exec, prints its
/// phases, waits for the report. Returns whether it succeeded.
fn handoff(
    sock: &OwnedFd,
    socket: &Path,
    req: HandoffRequest,
    exec: Option<&str>,
    as_json: bool,
) -> Result<bool, String> {
    let export = req.export.clone();
    let from_pid = match call(sock, &Request::Handoff(req))? {
        Reply::HandoffArmed {
            from_pid,
            from_epoch,
        } => {
            eprintln!("{export}: handoff armed: daemon pid {from_pid} (epoch {from_epoch})");
            from_pid
        }
        other => return Err(format!("unexpected reply {other:?}")),
    };
    let mut child = exec.map(|c| start_successor(c, socket)).transpose()?;
    if let Some(c) = &child {
        eprintln!("{export}: started successor pid {}", c.id());
    }
    let mut progress = Progress::new(socket);
    // The report, unless the successor we started exits first without
    // one; closing the connection then cancels the handoff.
    let mut exited_at: Option<Instant> = None;
    let report = loop {
        let ready = sys::poll_readable(&[sock.as_fd()], Duration::from_millis(100))
            .map_err(|e| format!("poll: {e}"))?;
        if ready.first().copied().unwrap_or(false) {
            match receive(sock)? {
                Reply::HandoffDone(r) => break r,
                other => return Err(format!("unexpected reply {other:?}")),
            }
        }
        progress.show(&export);
        if let Some(c) = child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            child = None;
            exited_at = Some(Instant::now());
            eprintln!("{export}: the successor exited ({status})");
        }
        if exited_at.is_some_and(|t| t.elapsed() > Duration::from_secs(2)) {
            return Err(format!(
                "{export}: the successor exited before it attached; the handoff is cancelled"
            ));
        }
    };
    if as_json {
        println!("{}", to_json(&report)?);
    } else {
        println!("{export}: handoff {}", report_line(&report));
    }
    if report.outcome == HandoffOutcome::Completed {
        // The old daemon exits once it has read DETACHED.
        let gone = Pidfd::open(from_pid).map_or(true, |p| p.wait_gone(Duration::from_secs(10)));
        let what = if gone {
            "exited"
        } else {
            "is still running after 10s"
        };
        eprintln!("{export}: old daemon pid {from_pid} {what}");
    }
    if let Some(mut c) = child
        && report.outcome != HandoffOutcome::Completed
    {
        // A released or failed successor exits; reap it.
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end && matches!(c.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(report.outcome != HandoffOutcome::Aborted)
}

/// The metrics text, from every METRICS_TEXT part.
/// Every export's status, from as many STATUS_OK batches as it takes.
fn status(sock: &OwnedFd) -> Result<Vec<ExportStatus>, String> {
    let mut all = Vec::new();
    let mut reply = call(sock, &Request::Status)?;
    loop {
        match reply {
            Reply::Status { exports, more } => {
                all.extend(exports);
                if !more {
                    return Ok(all);
                }
            }
            other => return Err(format!("unexpected reply {other:?}")),
        }
        reply = receive(sock)?;
    }
}

fn metrics(sock: &OwnedFd) -> Result<String, String> {
    let mut text = String::new();
    let mut reply = call(sock, &Request::Metrics)?;
    loop {
        match reply {
            Reply::MetricsText { text: part, more } => {
                text.push_str(&part);
                if !more {
                    return Ok(text);
                }
            }
            other => return Err(format!("unexpected reply {other:?}")),
        }
        reply = receive(sock)?;
    }
}

/// A HANDOFF; `spawn` (upgrade) with the successor's command line, if
/// another than the supervised one.
fn handoff_request(export: String, opts: &HandoffOpts, spawn: Option<String>) -> HandoffRequest {
    HandoffRequest {
        export,
        dry_run: opts.dry_run,
        spawn: spawn.is_some(),
        ready_timeout_ms: opts.timeout.unwrap_or(0),
        drain_timeout_ms: opts.drain_timeout.unwrap_or(0),
        cmd: spawn.unwrap_or_default(),
    }
}

fn export_add(add: ExportAdd, sock: &OwnedFd) -> Result<(), String> {
    let supervised = !add.daemon.is_empty();
    match call(sock, &Request::ExportAdd(add))? {
        Reply::ExportAdded { status: e, kept } => {
            let device = e.device.map(|d| format!(", block device {d}"));
            let daemon = if supervised {
                "its daemon is started".to_owned()
            } else {
                format!(
                    "it waits for a daemon (holdfast-daemon --export {} --backend ...)",
                    e.name
                )
            };
            println!(
                "{}: added, {}{}; {daemon}; {kept}",
                e.name,
                human_size(e.size),
                device.unwrap_or_default(),
            );
            Ok(())
        }
        other => Err(format!("unexpected reply {other:?}")),
    }
}

fn run(socket: &Path, cmd: Command) -> Result<(), String> {
    // What needs no broker.
    match cmd {
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "holdfastctl",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Command::Man { dir } => {
            return clap_mangen::generate_to(Cli::command(), &dir)
                .map_err(|e| format!("cannot write the man pages to {}: {e}", dir.display()));
        }
        _ => {}
    }
    let sock = connect(socket)?;
    hello(&sock)?;
    match cmd {
        Command::Status { json } => {
            let exports = status(&sock)?;
            if json {
                let v = StatusJson {
                    version: STATUS_JSON_VERSION,
                    exports: &exports,
                };
                println!("{}", to_json(&v)?);
            } else {
                print!("{}", table(&exports));
            }
        }
        Command::Metrics => print!("{}", metrics(&sock)?),
        Command::Restore {
            export,
            fail_pending,
        } => match call(
            &sock,
            &Request::OperatorRestore {
                export: export.clone(),
                fail_pending,
            },
        )? {
            Reply::OperatorRestored { failed, .. } if fail_pending => {
                println!("{export}: failed {failed} pending requests with EIO");
            }
            Reply::OperatorRestored { replayed, .. } => {
                println!("{export}: restored, replaying {replayed} requests");
            }
            other => return Err(format!("unexpected reply {other:?}")),
        },
        Command::Handoff { export, exec, opts } => {
            let req = handoff_request(export, &opts, None);
            if !handoff(&sock, socket, req, exec.as_deref(), opts.json)? {
                return Err("the handoff was aborted; the current daemon keeps serving".into());
            }
        }
        Command::Upgrade { export, cmd, opts } => {
            let req = handoff_request(export, &opts, Some(cmd.unwrap_or_default()));
            if !handoff(&sock, socket, req, None, opts.json)? {
                return Err("the handoff was aborted; the current daemon keeps serving".into());
            }
        }
        Command::Export(ExportCommand::Add {
            name,
            size,
            block,
            frontend,
            direct,
            relay,
            daemon,
        }) => {
            let ublk = frontend == Frontend::Ublk;
            let add = ExportAdd {
                name,
                size,
                block,
                ublk,
                // FUSE: direct unless --relay; ublk: relay unless --direct.
                direct: direct || !(relay || ublk),
                daemon: daemon.unwrap_or_default(),
            };
            export_add(add, &sock)?;
        }
        Command::Export(ExportCommand::Rm { name, force }) => {
            match call(
                &sock,
                &Request::ExportRemove {
                    name: name.clone(),
                    force,
                },
            )? {
                Reply::ExportRemoved { kept } => println!("{name}: removed; {kept}"),
                other => return Err(format!("unexpected reply {other:?}")),
            }
        }
        Command::Broker(BrokerCommand::Upgrade { json }) => {
            match call(&sock, &Request::BrokerUpgrade)? {
                Reply::BrokerUpgraded(r) => {
                    if json {
                        println!("{}", to_json(&r)?);
                    } else {
                        println!("{}", upgrade_line(&r));
                    }
                    if !r.missing.is_empty() {
                        return Err(format!(
                            "no daemon came back for {} (holdfastctl status)",
                            r.missing.join(", ")
                        ));
                    }
                }
                other => return Err(format!("unexpected reply {other:?}")),
            }
        }
        Command::Completions { .. } | Command::Man { .. } => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    // Usage errors exit 2 and --help/--version 0, from clap.
    let cli = Cli::parse();
    if let Command::Export(ExportCommand::Add {
        block: true,
        frontend: Frontend::Ublk,
        ..
    }) = cli.command
    {
        Cli::command()
            .error(
                clap::error::ErrorKind::ArgumentConflict,
                "--block is for FUSE exports; a ublk export is a block device already",
            )
            .exit();
    }
    match run(&cli.socket, cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holdfastctl: {e}");
            ExitCode::FAILURE
        }
    }
}
