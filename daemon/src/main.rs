//! holdfast-daemon: the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser};
use holdfast_daemon::{BackendSpec, Error, Options, log};
use holdfast_proto::{SOCKET_ENV, SUCCESSOR_ENV};

const ABOUT: &str = "\
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
hands its export off to a fresh copy of the supervised command line.";

const AFTER: &str = "\
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

Durations: 500ms, 30s, 2m (a bare number is seconds). Sizes: 64KiB, 4MiB, 1GiB.

Exit status: 0 after a clean detach or a handoff to a successor (and for a
successor released by a dry run), 1 on errors, 2 on bad usage, 3 when another
daemon took an s3:// volume over (it stops writing at once).";

#[derive(Parser)]
#[command(
    name = "holdfast-daemon",
    version,
    about = "Serve one export of a holdfast broker from a backend",
    long_about = ABOUT,
    after_help = AFTER
)]
struct Cli {
    /// The broker's control socket
    #[arg(long, env = SOCKET_ENV, default_value = "/run/holdfast/holdfast.sock", value_name = "PATH")]
    socket: PathBuf,
    /// The export to serve
    #[arg(long, value_name = "NAME", value_parser = export_name)]
    export: String,
    /// Where the export's bytes live: file:PATH, mem, dir:PATH or
    /// s3://BUCKET[/PREFIX]
    #[arg(long, value_name = "SPEC", value_parser = |s: &str| s.parse::<BackendSpec>())]
    backend: BackendSpec,
    /// Replace a daemon already serving the export (the broker kills it and
    /// waits until it is gone)
    #[arg(long, conflicts_with = "successor")]
    takeover: bool,
    /// Take over in a planned handoff (also when the environment has
    /// HOLDFAST_SUCCESSOR=1)
    #[arg(long)]
    successor: bool,
    /// Take every request through the broker (relay mode), even where the
    /// export allows direct mode, in which this daemon reads the export's
    /// kernel queue itself
    #[arg(long)]
    relay: bool,
    /// I/O threads of relay mode
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: u16,
    /// How long to wait for a predecessor's lease
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = holdfast_proto::parse_duration)]
    lease_timeout: Duration,
    /// When the broker goes away (an upgrade, a crash and restart), how long
    /// to keep trying to attach to the next one, keeping the backend and its
    /// lease; 0 exits at once
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = reconnect)]
    reconnect_timeout: Duration,
    /// After a request that came alone, poll for the next one for N
    /// microseconds before sleeping: lower latency at queue depth 1 for up to
    /// a core of CPU while busy (see BENCHMARKS.md); 0 never polls
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    poll_us: u64,
    /// Sleep N ms before each read (for tests that need reads in flight)
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    read_delay_ms: u64,
    #[command(flatten)]
    s3: S3Flags,
    /// Print a shell completion script and exit
    #[arg(long, value_name = "SHELL", hide = true, exclusive = true)]
    completions: Option<clap_complete::Shell>,
    /// Write the man page to DIR and exit
    #[arg(long, value_name = "DIR", hide = true, exclusive = true)]
    man: Option<PathBuf>,
}

/// The S3 options, applied to an s3:// backend once all flags are read.
#[derive(Args)]
#[command(next_help_heading = "S3 options")]
struct S3Flags {
    /// The log, the read cache and the lease (required for s3://); the log
    /// must stay with the volume until it is uploaded
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// An S3-compatible store (path-style addressing)
    #[arg(long, value_name = "URL", value_parser = endpoint)]
    endpoint: Option<String>,
    /// Chunk size of a new volume, 64KiB to 64MiB, a power of two [default:
    /// 4MiB; an existing volume keeps its own]
    #[arg(long, value_name = "SIZE", value_parser = holdfast_proto::parse_size)]
    chunk_size: Option<u64>,
    /// Bound on the log; writes wait for uploads past it [default: 1GiB]
    #[arg(long, value_name = "SIZE", value_parser = holdfast_proto::parse_size)]
    log_size: Option<u64>,
    /// Bound on the read cache [default: 1GiB]
    #[arg(long, value_name = "SIZE", value_parser = holdfast_proto::parse_size)]
    read_cache_size: Option<u64>,
    /// Chunk uploads in flight at once [default: 8]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    uploads: Option<u16>,
    /// Upload a write at most this long after it completes, unless the log
    /// fills sooner [default: 5s]
    #[arg(long, value_name = "DURATION", value_parser = |s: &str| bounded(s, Duration::from_millis(1), Duration::from_secs(3600)))]
    checkpoint_interval: Option<Duration>,
    /// --checkpoint-interval in milliseconds (the older name)
    #[arg(long, value_name = "MS", hide = true, conflicts_with = "checkpoint_interval", value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    checkpoint_ms: Option<u64>,
    /// Serve at most this long without renewing the claim in S3; a daemon of
    /// another cache directory takes a claim after seeing it unrenewed for a
    /// term and a tenth, or at once after a clean detach [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = |s: &str| bounded(s, Duration::from_secs(1), Duration::from_secs(600)))]
    claim_term: Option<Duration>,
    /// --claim-term in milliseconds (the older name)
    #[arg(long, value_name = "MS", hide = true, conflicts_with = "claim_term", value_parser = clap::value_parser!(u64).range(1000..=600_000))]
    claim_term_ms: Option<u64>,
}

fn export_name(s: &str) -> Result<String, String> {
    holdfast_proto::validate_name(s).map(|()| s.to_owned())
}

fn endpoint(url: &str) -> Result<String, String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        Ok(url.to_owned())
    } else {
        Err("expected an http:// or https:// URL".into())
    }
}

fn reconnect(s: &str) -> Result<Duration, String> {
    let d = holdfast_proto::parse_bound(s)?.unwrap_or(Duration::ZERO);
    if d > Duration::from_secs(86_400) {
        return Err("at most a day (24h)".into());
    }
    Ok(d)
}

fn bounded(s: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = holdfast_proto::parse_duration(s)?;
    if d < min || d > max {
        return Err(format!("from {min:?} to {max:?}"));
    }
    Ok(d)
}

impl S3Flags {
    /// The S3 flags given, for an error on another backend.
    fn given(&self) -> Option<&'static str> {
        let flags = [
            (self.cache_dir.is_some(), "--cache-dir"),
            (self.endpoint.is_some(), "--endpoint"),
            (self.chunk_size.is_some(), "--chunk-size"),
            (self.log_size.is_some(), "--log-size"),
            (self.read_cache_size.is_some(), "--read-cache-size"),
            (self.uploads.is_some(), "--uploads"),
            (
                self.checkpoint_interval.is_some() || self.checkpoint_ms.is_some(),
                "--checkpoint-interval",
            ),
            (
                self.claim_term.is_some() || self.claim_term_ms.is_some(),
                "--claim-term",
            ),
        ];
        flags.iter().find(|(given, _)| *given).map(|(_, f)| *f)
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
        cfg.uploads = self.uploads.map_or(cfg.uploads, usize::from);
        if let Some(d) = self
            .checkpoint_interval
            .or(self.checkpoint_ms.map(Duration::from_millis))
        {
            cfg.checkpoint_interval = d;
        }
        if let Some(d) = self
            .claim_term
            .or(self.claim_term_ms.map(Duration::from_millis))
        {
            cfg.claim_term = d;
        }
        Ok(())
    }

    #[cfg(not(feature = "s3"))]
    fn apply(self, _backend: &mut BackendSpec) -> Result<(), String> {
        self.refuse()
    }

    fn refuse(&self) -> Result<(), String> {
        match self.given() {
            Some(flag) => Err(format!("{flag} is an option of s3:// backends")),
            None => Ok(()),
        }
    }
}

fn parse_args() -> Result<Option<(Options, BackendSpec)>, String> {
    // --completions and --man need no --export or --backend.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let generating = |a: &std::ffi::OsString| {
        a.to_str().is_some_and(|a| {
            ["--completions", "--man"]
                .iter()
                .any(|f| a == *f || a.strip_prefix(f).is_some_and(|r| r.starts_with('=')))
        })
    };
    if args.iter().any(generating) {
        let cmd = Cli::command()
            .mut_arg("export", |a| a.required(false))
            .mut_arg("backend", |a| a.required(false));
        let m = cmd.get_matches_from(&args);
        if let Some(shell) = m.get_one::<clap_complete::Shell>("completions") {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "holdfast-daemon",
                &mut std::io::stdout(),
            );
        }
        if let Some(dir) = m.get_one::<PathBuf>("man") {
            clap_mangen::generate_to(Cli::command(), dir)
                .map_err(|e| format!("cannot write the man page to {}: {e}", dir.display()))?;
        }
        return Ok(None);
    }
    let cli = Cli::parse_from(args);
    let successor = cli.successor || std::env::var_os(SUCCESSOR_ENV).is_some_and(|v| v == "1");
    if cli.takeover && successor {
        return Err(
            "--takeover and --successor (or HOLDFAST_SUCCESSOR=1) exclude each other".into(),
        );
    }
    holdfast_daemon::fault::check_env()?;
    let mut backend = cli.backend;
    cli.s3.apply(&mut backend)?;
    Ok(Some((
        Options {
            socket: cli.socket,
            export: cli.export,
            takeover: cli.takeover,
            successor,
            workers: usize::from(cli.workers),
            lease_timeout: cli.lease_timeout,
            poll: Duration::from_micros(cli.poll_us),
            read_delay: Duration::from_millis(cli.read_delay_ms),
            reconnect: cli.reconnect_timeout,
            relay: cli.relay,
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
