//! holdfast-daemon: the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use holdfast_daemon::{BackendSpec, Error, Options, log};
use holdfast_proto::{SOCKET_ENV, SUCCESSOR_ENV};

const USAGE: &str = "\
holdfast-daemon: serve one export of a holdfast broker from a backend.

Usage: holdfast-daemon --export NAME --backend SPEC [OPTIONS]

Attaches to the broker, takes the backend's lease, issues restore (pending
requests are replayed first) and serves until SIGTERM or SIGINT, on which it
detaches cleanly after finishing the requests it holds.

With --successor it takes over from the export's running daemon in a
handoff armed by `holdfastctl handoff EXPORT`: it warms up while the old
daemon serves, takes the lease when the broker activates it, and serves; the
old daemon drains and exits 0. SIGHUP to a daemon that the broker supervises
hands its export off to a fresh copy of the supervised command line.

Backends:
  file:PATH             a local file, created sparse if missing; flush = fdatasync
  mem                   a memfd kept in the broker's fd store (survives daemon
                        crashes, not broker restarts)
  dir:PATH              for a cachefiles export (holdfast-broker --cachefiles):
                        blobs (erofs images) as files in PATH, read-only

Options:
  --socket PATH         the broker's control socket [default: $HOLDFAST_SOCKET
                        or /run/holdfast/holdfast.sock]
  --export NAME         the export to serve
  --backend SPEC        where the export's bytes live
  --takeover            replace a daemon already serving the export (the broker
                        kills it and waits until it is gone)
  --successor           take over in a planned handoff (also when the
                        environment has HOLDFAST_SUCCESSOR=1)
  --workers N           I/O threads [default: 16]
  --lease-timeout SECS  how long to wait for a predecessor's lease [default: 30]
  --poll-us N           after a request that came alone, poll for the next
                        one for N microseconds before sleeping: lower latency
                        at queue depth 1 for up to a core of CPU while busy
                        (see BENCHMARKS.md) [default: 0, never poll]
  --read-delay-ms N     sleep N ms before each read (for tests that need reads
                        in flight) [default: 0]
  -h, --help            print this help
  -V, --version         print the version

Exit status: 0 after a clean detach or a handoff to a successor (and for a
successor released by a dry run), 1 on errors, 2 on bad usage.";

fn string_value(p: &mut lexopt::Parser) -> Result<String, String> {
    p.value()
        .map_err(|e| e.to_string())?
        .into_string()
        .map_err(|v| format!("{v:?} is not valid UTF-8"))
}

fn number<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag} {v:?}: expected a number"))
}

fn parse_args() -> Result<Option<(Options, BackendSpec)>, String> {
    use lexopt::prelude::*;
    let mut socket = std::env::var_os(SOCKET_ENV)
        .map_or_else(|| "/run/holdfast/holdfast.sock".into(), PathBuf::from);
    let (mut export, mut backend) = (None, None);
    let mut takeover = false;
    let mut successor = std::env::var_os(SUCCESSOR_ENV).is_some_and(|v| v == "1");
    let mut workers = 16usize;
    let mut lease_timeout = 30u64;
    let mut poll_us = 0u64;
    let mut read_delay_ms = 0u64;
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("socket") => socket = string_value(&mut p)?.into(),
            Long("export") => {
                let v = string_value(&mut p)?;
                holdfast_proto::validate_name(&v).map_err(|e| format!("--export: {e}"))?;
                export = Some(v);
            }
            Long("backend") => backend = Some(string_value(&mut p)?.parse::<BackendSpec>()?),
            Long("takeover") => takeover = true,
            Long("successor") => successor = true,
            Long("workers") => {
                workers = number("--workers", &string_value(&mut p)?)?;
                if !(1..=1024).contains(&workers) {
                    return Err("--workers must be from 1 to 1024".into());
                }
            }
            Long("read-delay-ms") => {
                read_delay_ms = number("--read-delay-ms", &string_value(&mut p)?)?;
                if read_delay_ms > 60_000 {
                    return Err("--read-delay-ms must be at most 60000 (one minute)".into());
                }
            }
            Long("poll-us") => {
                poll_us = number("--poll-us", &string_value(&mut p)?)?;
                if poll_us > 1_000_000 {
                    return Err("--poll-us must be at most 1000000 (one second)".into());
                }
            }
            Long("lease-timeout") => {
                lease_timeout = number("--lease-timeout", &string_value(&mut p)?)?;
            }
            Short('h') | Long("help") => {
                println!("{USAGE}");
                return Ok(None);
            }
            Short('V') | Long("version") => {
                println!("holdfast-daemon {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    let export = export.ok_or("--export NAME is required")?;
    if takeover && successor {
        return Err("--takeover and --successor exclude each other".into());
    }
    holdfast_daemon::fault::check_env()?;
    let backend = backend.ok_or("--backend SPEC is required (file:PATH or mem)")?;
    Ok(Some((
        Options {
            socket,
            export,
            takeover,
            successor,
            workers,
            lease_timeout: Duration::from_secs(lease_timeout),
            poll: Duration::from_micros(poll_us),
            read_delay: Duration::from_millis(read_delay_ms),
        },
        backend,
    )))
}

fn main() -> ExitCode {
    let (opts, backend) = match parse_args() {
        Ok(Some(v)) => v,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holdfast-daemon: {e}\nTry 'holdfast-daemon --help'.");
            return ExitCode::from(2);
        }
    };
    match holdfast_daemon::run(&opts, &backend) {
        Ok(()) => {
            log("exiting");
            ExitCode::SUCCESS
        }
        Err(e @ Error::BrokerGone) => {
            log(&format!("{e}; exiting"));
            ExitCode::FAILURE
        }
        Err(e) => {
            log(&format!("error: {e}"));
            ExitCode::FAILURE
        }
    }
}
