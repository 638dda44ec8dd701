//! holdfastctl: the operator's view of a running broker.

use std::fmt::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

use holdfast_broker::supervise;
use holdfast_broker::sys::{self, pidfd::Pidfd, seqpacket};
use holdfast_proto::{
    DaemonStatus, ExportAdd, ExportStatus, HandoffOutcome, HandoffReport, HandoffRequest, Hello,
    MAX_MESSAGE_LEN, PROTOCOL_VERSION, Reply, Request, SOCKET_ENV, UpgradeReport,
};

const USAGE: &str = "\
holdfastctl: inspect and operate a holdfast broker.

Usage: holdfastctl [--socket PATH] COMMAND

Commands:
  status [--json]               every export: its daemon (pid, epoch, state),
                                requests in flight, pending, replayed so far
  restore EXPORT                replay pending requests to the attached daemon
  restore EXPORT --fail-pending fail every pending request with EIO
  handoff EXPORT [--exec CMD]   replace the export's daemon with a successor
                                without failing or losing a request: CMD is
                                started (sh -c, with HOLDFAST_SUCCESSOR=1 and
                                HOLDFAST_SOCKET set), or without --exec, start
                                `holdfast-daemon ... --successor` yourself.
                                Waits for the end and prints the figures.
                                CMD's log goes to this command's stderr
                                unless CMD redirects it (CMD 2>>LOG).
  upgrade EXPORT                handoff to a successor the broker starts with
                                the command line it supervises the daemon with
  export add NAME SIZE [--block | --frontend ublk] [--direct | --relay]
                                add an export (SIZE like 1GiB); with --block it
                                also gets a block device (/dev/loopN), with
                                --frontend ublk it is a ublk device
                                (/dev/ublkbN). Daemons serve a FUSE export's
                                connection themselves (direct mode, Linux
                                6.9+) unless --relay: then every request goes
                                through the broker. A ublk export is relayed
                                unless --direct: then its daemon serves the
                                device's queue; start a daemon for it:
                                holdfast-daemon --export NAME ...
  export rm NAME [--force]      remove an export; refused while its file or
                                block device is open, unless --force (its users
                                then get I/O errors)
  broker upgrade [--json]       replace the broker with the binary now on disk,
                                in the same process, keeping every export, its
                                mount, block device and daemon; what the old
                                broker held is re-sent by the kernel. Waits
                                and prints the old and new broker, the time
                                without dispatch and the FUSE requests re-sent

Handoff options:
  --dry-run             warm a successor up, then release it; the current
                        daemon keeps serving
  --timeout SECS        for the successor to attach and be ready [default: 60]
  --drain-timeout SECS  for the old daemon to drain (then it is killed and its
                        requests replayed to the successor) [default: 5]
  --json                print the report as JSON

Options:
  --socket PATH   the broker's control socket [default: $HOLDFAST_SOCKET or
                  /run/holdfast/holdfast.sock]
  -h, --help      print this help

Exit status: 0 on success (a handoff that completed, or a dry run that warmed
a successor up), 1 on failure (a handoff that was aborted), 2 on bad usage.";

enum Command {
    Status {
        json: bool,
    },
    Restore {
        export: String,
        fail_pending: bool,
    },
    Handoff {
        req: HandoffRequest,
        exec: Option<String>,
        json: bool,
    },
    ExportAdd(ExportAdd),
    ExportRemove {
        name: String,
        force: bool,
    },
    BrokerUpgrade {
        json: bool,
    },
}

/// Seconds on the command line to whole milliseconds on the wire.
fn seconds_ms(flag: &str, v: &str) -> Result<u32, String> {
    let secs: f64 = v
        .parse()
        .map_err(|_| format!("{flag} {v:?}: expected a number of seconds"))?;
    if !(0.001..=86_400.0).contains(&secs) {
        return Err(format!("{flag} must be from 0.001 to 86400 seconds"));
    }
    Ok((secs * 1000.0).round() as u32)
}

fn parse_args() -> Result<Option<(PathBuf, Command)>, String> {
    use lexopt::prelude::*;
    let mut socket: PathBuf = std::env::var_os(SOCKET_ENV).map_or_else(
        || holdfast_broker::config::DEFAULT_SOCKET.into(),
        PathBuf::from,
    );
    let mut words = Vec::new();
    let (mut json, mut fail_pending, mut dry_run) = (false, false, false);
    let (mut exec, mut ready_ms, mut drain_ms) = (None, 0u32, 0u32);
    let mut handoff_flags = false;
    let (mut block, mut force, mut ublk) = (false, false, false);
    let (mut direct, mut relay) = (false, false);
    let mut parser = lexopt::Parser::from_env();
    let text = |p: &mut lexopt::Parser| -> Result<String, String> {
        p.value()
            .map_err(|e| e.to_string())?
            .into_string()
            .map_err(|v| format!("{v:?} is not UTF-8"))
    };
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("socket") => socket = parser.value().map_err(|e| e.to_string())?.into(),
            Long("json") => json = true,
            Long("fail-pending") => fail_pending = true,
            Long("block") => block = true,
            Long("direct") => direct = true,
            Long("relay") => relay = true,
            Long("frontend") => match text(&mut parser)?.as_str() {
                "ublk" => ublk = true,
                "fuse" => ublk = false,
                other => return Err(format!("--frontend {other:?}: fuse or ublk")),
            },
            Long("force") => force = true,
            Long("dry-run") => (dry_run, handoff_flags) = (true, true),
            Long("exec") => (exec, handoff_flags) = (Some(text(&mut parser)?), true),
            Long("timeout") => {
                ready_ms = seconds_ms("--timeout", &text(&mut parser)?)?;
                handoff_flags = true;
            }
            Long("drain-timeout") => {
                drain_ms = seconds_ms("--drain-timeout", &text(&mut parser)?)?;
                handoff_flags = true;
            }
            Short('h') | Long("help") => {
                println!("{USAGE}");
                return Ok(None);
            }
            Value(v) => words.push(v.into_string().map_err(|v| format!("{v:?} is not UTF-8"))?),
            other => return Err(other.unexpected().to_string()),
        }
    }
    let cmd = match words
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        _ if (block || force || ublk || direct || relay)
            && words.first().map(String::as_str) != Some("export") =>
        {
            return Err(
                "--block, --frontend, --direct, --relay and --force belong to export add and export rm"
                    .into(),
            );
        }
        ["export", "add", ..] if direct && relay => {
            return Err("--direct and --relay exclude each other".into());
        }
        ["export", "add", ..] if block && ublk => {
            return Err(
                "--block is for FUSE exports; a ublk export is a block device already".into(),
            );
        }
        ["export", "add", name, size] if !json && !fail_pending && !handoff_flags && !force => {
            holdfast_proto::validate_name(name)?;
            Command::ExportAdd(ExportAdd {
                name: (*name).to_owned(),
                size: holdfast_broker::config::parse_size(size)?,
                block,
                ublk,
                // FUSE: direct unless --relay; ublk: relay unless --direct.
                direct: direct || !(relay || ublk),
            })
        }
        ["export", "rm", name]
            if !json && !fail_pending && !handoff_flags && !block && !ublk && !direct && !relay =>
        {
            Command::ExportRemove {
                name: (*name).to_owned(),
                force,
            }
        }
        ["export", ..] => {
            return Err(
                "usage: export add NAME SIZE [--block | --frontend ublk] [--relay] | export rm NAME [--force]"
                    .into(),
            );
        }
        ["status"] if !fail_pending && !handoff_flags => Command::Status { json },
        ["broker", "upgrade"] if !fail_pending && !handoff_flags => Command::BrokerUpgrade { json },
        ["broker", ..] => return Err("usage: broker upgrade [--json]".into()),
        ["restore", export] if !json && !handoff_flags => Command::Restore {
            export: (*export).to_owned(),
            fail_pending,
        },
        [verb @ ("handoff" | "upgrade"), export] if !fail_pending => {
            let spawn = *verb == "upgrade";
            if spawn && exec.is_some() {
                return Err(
                    "upgrade starts the supervised command line; use handoff --exec CMD for another"
                        .into(),
                );
            }
            holdfast_proto::validate_name(export)?;
            Command::Handoff {
                req: HandoffRequest {
                    export: (*export).to_owned(),
                    dry_run,
                    spawn,
                    ready_timeout_ms: ready_ms,
                    drain_timeout_ms: drain_ms,
                },
                exec,
                json,
            }
        }
        [verb @ ("restore" | "handoff" | "upgrade")] => {
            return Err(format!("{verb} needs an export name"));
        }
        [] => return Err("no command given".into()),
        other => return Err(format!("unknown command or arguments: {}", other.join(" "))),
    };
    Ok(Some((socket, cmd)))
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
            e.replayed_total.to_string(),
            e.completed_total.to_string(),
            e.failed_total.to_string(),
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
    }
    out
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

fn upgrade_json(r: &UpgradeReport) -> String {
    let missing: Vec<String> = r.missing.iter().map(|m| json_str(m)).collect();
    format!(
        "{{\"old_pid\":{},\"new_pid\":{},\"old_version\":{},\"new_version\":{},\"stall_us\":{},\"resent\":{},\"reattached\":{},\"missing\":[{}]}}",
        r.old_pid,
        r.new_pid,
        json_str(&r.old_version),
        json_str(&r.new_version),
        r.stall_us,
        r.resent,
        r.reattached,
        missing.join(",")
    )
}

fn daemon_json(d: Option<&DaemonStatus>) -> String {
    d.map_or("null".into(), |d| {
        format!(
            "{{\"pid\":{},\"epoch\":{},\"state\":{},\"mode\":{}}}",
            d.pid,
            d.epoch,
            json_str(d.state.name()),
            json_str(d.mode.name())
        )
    })
}

fn report_json(r: &HandoffReport) -> String {
    format!(
        "{{\"outcome\":{},\"reason\":{},\"from_pid\":{},\"from_epoch\":{},\"to_pid\":{},\"to_epoch\":{},\"warmup_us\":{},\"drain_us\":{},\"stall_us\":{},\"total_us\":{},\"replayed\":{},\"fenced\":{}}}",
        json_str(r.outcome.name()),
        json_str(&r.reason),
        r.from_pid,
        r.from_epoch,
        r.to_pid,
        r.to_epoch,
        r.warmup_us,
        r.drain_us,
        r.stall_us,
        r.total_us,
        r.replayed,
        r.fenced
    )
}

fn json_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json(exports: &[ExportStatus]) -> String {
    let items: Vec<String> = exports
        .iter()
        .map(|e| {
            let handoff = e.handoff.map_or("null".into(), |h| {
                format!(
                    "{{\"phase\":{},\"dry_run\":{},\"elapsed_ms\":{}}}",
                    json_str(h.phase.name()),
                    h.dry_run,
                    h.elapsed_ms
                )
            });
            format!(
                "{{\"name\":{},\"size\":{},\"frontend\":{},\"mode\":{},\"device\":{},\"block_size\":{},\"daemon\":{},\"successor\":{},\"handoff\":{handoff},\"last_handoff\":{},\"inflight\":{},\"pending\":{},\"replayed\":{},\"completed\":{},\"failed\":{},\"daemons_lost\":{},\"rejected_completions\":{},\"waiting_ms\":{}}}",
                json_str(&e.name),
                e.size,
                json_str(&e.frontend),
                json_str(e.mode.name()),
                e.device.as_deref().map_or("null".into(), json_str),
                e.block_size,
                daemon_json(e.daemon.as_ref()),
                daemon_json(e.successor.as_ref()),
                e.last_handoff.as_ref().map_or("null".into(), report_json),
                e.inflight,
                e.pending,
                e.replayed_total,
                e.completed_total,
                e.failed_total,
                e.daemons_lost,
                e.rejected_completions,
                e.waiting_ms.map_or("null".into(), |v| v.to_string()),
            )
        })
        .collect();
    format!("{{\"exports\":[{}]}}", items.join(","))
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

/// Runs a handoff: arms it, starts the successor for --exec, waits for
/// the report. Returns whether it succeeded.
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
        println!("{}", report_json(&report));
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

fn run(socket: &std::path::Path, cmd: Command) -> Result<(), String> {
    let sock = seqpacket::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    call(
        &sock,
        &Request::Hello(Hello {
            version: PROTOCOL_VERSION,
            caps: 0,
            pid: std::process::id(),
        }),
    )?;
    match cmd {
        Command::Status { json: as_json } => match call(&sock, &Request::Status)? {
            Reply::Status(exports) if as_json => println!("{}", json(&exports)),
            Reply::Status(exports) => print!("{}", table(&exports)),
            other => return Err(format!("unexpected reply {other:?}")),
        },
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
            Reply::OperatorRestored { replayed, failed } if fail_pending => {
                println!("{export}: failed {failed} pending requests with EIO");
                let _ = replayed;
            }
            Reply::OperatorRestored { replayed, .. } => {
                println!("{export}: restored, replaying {replayed} requests");
            }
            other => return Err(format!("unexpected reply {other:?}")),
        },
        Command::ExportAdd(add) => match call(&sock, &Request::ExportAdd(add))? {
            Reply::ExportAdded(e) => {
                let device = e.device.map(|d| format!(", block device {d}"));
                println!(
                    "{}: added, {}{}; it waits for a daemon (holdfast-daemon --export {} --backend ...)",
                    e.name,
                    human_size(e.size),
                    device.unwrap_or_default(),
                    e.name
                );
            }
            other => return Err(format!("unexpected reply {other:?}")),
        },
        Command::ExportRemove { name, force } => {
            match call(
                &sock,
                &Request::ExportRemove {
                    name: name.clone(),
                    force,
                },
            )? {
                Reply::ExportRemoved => println!("{name}: removed"),
                other => return Err(format!("unexpected reply {other:?}")),
            }
        }
        Command::BrokerUpgrade { json: as_json } => match call(&sock, &Request::BrokerUpgrade)? {
            Reply::BrokerUpgraded(r) if as_json => println!("{}", upgrade_json(&r)),
            Reply::BrokerUpgraded(r) => {
                println!("{}", upgrade_line(&r));
                if !r.missing.is_empty() {
                    return Err(format!(
                        "no daemon came back for {} (holdfastctl status)",
                        r.missing.join(", ")
                    ));
                }
            }
            other => return Err(format!("unexpected reply {other:?}")),
        },
        Command::Handoff { req, exec, json } => {
            if !handoff(&sock, socket, req, exec.as_deref(), json)? {
                return Err("the handoff was aborted; the current daemon keeps serving".into());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match parse_args() {
        Ok(None) => ExitCode::SUCCESS,
        Ok(Some((socket, cmd))) => match run(&socket, cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("holdfastctl: {e}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("holdfastctl: {e}\nTry 'holdfastctl --help'.");
            ExitCode::from(2)
        }
    }
}
