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

When the broker goes away (it is upgraded, or restarted after a crash), the
daemon finishes what it holds, attaches to the next broker and carries on;
the kernel re-sends to the new broker what the old one had not answered.

With --successor it takes over from the export's running daemon in a
handoff armed by `holdfastctl handoff EXPORT`: it warms up while the old
daemon serves, takes the lease when the broker activates it, and serves; the
old daemon drains and exits 0. SIGHUP to a daemon that the broker supervises
hands its export off to a fresh copy of the supervised command line.

Backends:
  file:PATH             a local file, created sparse if missing; flush = fdatasync
  mem                   a memfd kept in the broker's fd store (survives daemon
                        crashes and broker upgrades, not broker crashes)
  dir:PATH              for a cachefiles export (holdfast-broker --cachefiles):
                        blobs (erofs images) as files in PATH, read-only
  s3://BUCKET[/PREFIX]  chunk objects and a manifest in S3 or an S3-compatible
                        store, with a write-ahead log in --cache-dir; writes
                        complete in the log and are uploaded in the background
                        (credentials and region: the standard AWS chain)

S3 options:
  --cache-dir DIR       the log, the read cache and the lease (required); the
                        log must stay with the volume until it is uploaded
  --endpoint URL        an S3-compatible store (path-style addressing)
  --chunk-size SIZE     chunk size of a new volume, 64KiB to 64MiB, a power of
                        two [default: 4MiB; an existing volume keeps its own]
  --log-size SIZE       bound on the log; writes wait for uploads past it
                        [default: 1GiB]
  --read-cache-size SIZE  bound on the read cache [default: 1GiB]
  --uploads N           chunk uploads in flight at once [default: 8]
  --checkpoint-ms N     upload a write at most this long after it completes,
                        unless the log fills sooner [default: 5000]
  --claim-term-ms N     serve at most this long without renewing the claim in
                        S3; a daemon of another cache directory takes a claim
                        after seeing it unrenewed for a term and a tenth, or at
                        once after a clean detach [default: 30000]

Options:
  --socket PATH         the broker's control socket [default: $HOLDFAST_SOCKET
                        or /run/holdfast/holdfast.sock]
  --export NAME         the export to serve
  --backend SPEC        where the export's bytes live
  --takeover            replace a daemon already serving the export (the broker
                        kills it and waits until it is gone)
  --successor           take over in a planned handoff (also when the
                        environment has HOLDFAST_SUCCESSOR=1)
  --relay               take every request through the broker (relay mode),
                        even where the export allows direct mode, in which
                        this daemon reads the export's FUSE connection
                        itself (one thread per descriptor the broker lends)
  --workers N           I/O threads of relay mode [default: 16]
  --lease-timeout SECS  how long to wait for a predecessor's lease [default: 30]
  --reconnect-timeout SECS
                        when the broker goes away (an upgrade, a crash and
                        restart), how long to keep trying to attach to the
                        next one, keeping the backend and its lease; 0 exits
                        at once [default: 60]
  --poll-us N           after a request that came alone, poll for the next
                        one for N microseconds before sleeping: lower latency
                        at queue depth 1 for up to a core of CPU while busy
                        (see BENCHMARKS.md) [default: 0, never poll]
  --read-delay-ms N     sleep N ms before each read (for tests that need reads
                        in flight) [default: 0]
  -h, --help            print this help
  -V, --version         print the version

Exit status: 0 after a clean detach or a handoff to a successor (and for a
successor released by a dry run), 1 on errors, 2 on bad usage, 3 when another
daemon took an s3:// volume over (it stops writing at once).";

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

/// The S3 options, applied to an s3:// backend once all flags are read.
#[derive(Default)]
struct S3Flags {
    given: Vec<&'static str>,
    cache_dir: Option<PathBuf>,
    endpoint: Option<String>,
    chunk_size: Option<u64>,
    log_size: Option<u64>,
    read_cache_size: Option<u64>,
    uploads: Option<usize>,
    checkpoint_ms: Option<u64>,
    claim_term_ms: Option<u64>,
}

impl S3Flags {
    fn size(&mut self, flag: &'static str, v: &str) -> Result<u64, String> {
        self.given.push(flag);
        holdfast_proto::parse_size(v).map_err(|e| format!("{flag}: {e}"))
    }

    #[cfg(feature = "s3")]
    fn apply(self, backend: &mut BackendSpec) -> Result<(), String> {
        use holdfast_daemon::backends::s3;
        let BackendSpec::S3(cfg) = backend else {
            return self.refuse();
        };
        cfg.cache_dir = Some(
            self.cache_dir
                .ok_or("an s3:// backend needs --cache-dir DIR")?,
        );
        cfg.endpoint = self.endpoint;
        if let Some(c) = self.chunk_size {
            if !s3::valid_chunk_size(c) {
                return Err("--chunk-size must be a power of two from 64KiB to 64MiB".into());
            }
            cfg.chunk_size = Some(c);
        }
        cfg.log_size = self.log_size.unwrap_or(cfg.log_size);
        cfg.read_cache_size = self.read_cache_size.unwrap_or(cfg.read_cache_size);
        cfg.uploads = self.uploads.unwrap_or(cfg.uploads);
        if let Some(ms) = self.checkpoint_ms {
            cfg.checkpoint_interval = Duration::from_millis(ms);
        }
        if let Some(ms) = self.claim_term_ms {
            cfg.claim_term = Duration::from_millis(ms);
        }
        Ok(())
    }

    #[cfg(not(feature = "s3"))]
    fn apply(self, _backend: &mut BackendSpec) -> Result<(), String> {
        self.refuse()
    }

    fn refuse(&self) -> Result<(), String> {
        match self.given.first() {
            Some(flag) => Err(format!("{flag} is an option of s3:// backends")),
            None => Ok(()),
        }
    }
}

fn parse_args() -> Result<Option<(Options, BackendSpec)>, String> {
    use lexopt::prelude::*;
    let mut socket = std::env::var_os(SOCKET_ENV)
        .map_or_else(|| "/run/holdfast/holdfast.sock".into(), PathBuf::from);
    let (mut export, mut backend) = (None, None);
    let (mut takeover, mut relay) = (false, false);
    let mut successor = std::env::var_os(SUCCESSOR_ENV).is_some_and(|v| v == "1");
    let mut workers = 16usize;
    let mut lease_timeout = 30u64;
    let mut reconnect = 60u64;
    let mut poll_us = 0u64;
    let mut read_delay_ms = 0u64;
    let mut s3 = S3Flags::default();
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
            Long("cache-dir") => {
                s3.given.push("--cache-dir");
                s3.cache_dir = Some(string_value(&mut p)?.into());
            }
            Long("endpoint") => {
                s3.given.push("--endpoint");
                let url = string_value(&mut p)?;
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return Err(format!(
                        "--endpoint {url:?}: expected an http:// or https:// URL"
                    ));
                }
                s3.endpoint = Some(url);
            }
            Long("chunk-size") => {
                s3.chunk_size = Some(s3.size("--chunk-size", &string_value(&mut p)?)?);
            }
            Long("log-size") => s3.log_size = Some(s3.size("--log-size", &string_value(&mut p)?)?),
            Long("read-cache-size") => {
                s3.read_cache_size = Some(s3.size("--read-cache-size", &string_value(&mut p)?)?);
            }
            Long("uploads") => {
                s3.given.push("--uploads");
                let n = number("--uploads", &string_value(&mut p)?)?;
                if !(1..=256).contains(&n) {
                    return Err("--uploads must be from 1 to 256".into());
                }
                s3.uploads = Some(n);
            }
            Long("checkpoint-ms") => {
                s3.given.push("--checkpoint-ms");
                let ms = number("--checkpoint-ms", &string_value(&mut p)?)?;
                if !(1..=3_600_000).contains(&ms) {
                    return Err("--checkpoint-ms must be from 1 to 3600000 (an hour)".into());
                }
                s3.checkpoint_ms = Some(ms);
            }
            Long("claim-term-ms") => {
                s3.given.push("--claim-term-ms");
                let ms = number("--claim-term-ms", &string_value(&mut p)?)?;
                if !(1000..=600_000).contains(&ms) {
                    return Err("--claim-term-ms must be from 1000 to 600000 (ten minutes)".into());
                }
                s3.claim_term_ms = Some(ms);
            }
            Long("takeover") => takeover = true,
            Long("relay") => relay = true,
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
            Long("reconnect-timeout") => {
                reconnect = number("--reconnect-timeout", &string_value(&mut p)?)?;
                if reconnect > 86_400 {
                    return Err("--reconnect-timeout must be at most 86400 (a day)".into());
                }
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
    let mut backend = backend
        .ok_or("--backend SPEC is required (file:PATH, mem, s3://BUCKET/PREFIX or dir:PATH)")?;
    s3.apply(&mut backend)?;
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
            reconnect: Duration::from_secs(reconnect),
            relay,
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
