//! holdfastctl: the operator's view of a running broker.

use std::fmt::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;

use holdfast_broker::sys::seqpacket;
use holdfast_proto::{ExportStatus, Hello, MAX_MESSAGE_LEN, PROTOCOL_VERSION, Reply, Request};

const USAGE: &str = "\
holdfastctl: inspect and operate a holdfast broker.

Usage: holdfastctl [--socket PATH] COMMAND

Commands:
  status [--json]               every export: its daemon (pid, epoch, state),
                                requests in flight, pending, replayed so far
  restore EXPORT                replay pending requests to the attached daemon
  restore EXPORT --fail-pending fail every pending request with EIO

Options:
  --socket PATH   the broker's control socket [default: $HOLDFAST_SOCKET or
                  /run/holdfast/holdfast.sock]
  -h, --help      print this help";

enum Command {
    Status { json: bool },
    Restore { export: String, fail_pending: bool },
}

fn parse_args() -> Result<Option<(PathBuf, Command)>, String> {
    use lexopt::prelude::*;
    let mut socket: PathBuf = std::env::var_os("HOLDFAST_SOCKET").map_or_else(
        || holdfast_broker::config::DEFAULT_SOCKET.into(),
        PathBuf::from,
    );
    let mut words = Vec::new();
    let (mut json, mut fail_pending) = (false, false);
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("socket") => socket = parser.value().map_err(|e| e.to_string())?.into(),
            Long("json") => json = true,
            Long("fail-pending") => fail_pending = true,
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
        ["status"] if !fail_pending => Command::Status { json },
        ["restore", export] if !json => Command::Restore {
            export: (*export).to_owned(),
            fail_pending,
        },
        ["restore"] => return Err("restore needs an export name".into()),
        [] => return Err("no command given".into()),
        other => return Err(format!("unknown command or arguments: {}", other.join(" "))),
    };
    Ok(Some((socket, cmd)))
}

fn call(sock: &OwnedFd, req: &Request) -> Result<Reply, String> {
    seqpacket::send(sock.as_fd(), &req.encode(), &[]).map_err(|e| format!("send: {e}"))?;
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
    out
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
            let daemon = e.daemon.map_or("null".into(), |d| {
                format!(
                    "{{\"pid\":{},\"epoch\":{},\"state\":{}}}",
                    d.pid,
                    d.epoch,
                    json_str(d.state.name())
                )
            });
            format!(
                "{{\"name\":{},\"size\":{},\"frontend\":{},\"daemon\":{daemon},\"inflight\":{},\"pending\":{},\"replayed\":{},\"completed\":{},\"failed\":{},\"daemons_lost\":{},\"rejected_completions\":{},\"waiting_ms\":{}}}",
                json_str(&e.name),
                e.size,
                json_str(&e.frontend),
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
