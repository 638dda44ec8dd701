//! holdfast daemon library: attach to a broker, recover, RESTORE, and serve
//! an export's requests from a [`Backend`].
//!
//! To write your own daemon, implement [`Backend`] and call [`run_with`];
//! or speak `holdfast_proto` directly with [`client::Connection`] and
//! [`rings::Attachment`].

pub mod backends;
pub mod client;
pub mod crc32c;
pub mod fault;
pub mod lease;
pub mod rings;
pub mod serve;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use backends::{Backend, BackendSpec, OpenContext};
use holdfast_proto::{ErrorReply, Reply, Request};

use crate::fault::Point;

/// Why a daemon stopped.
#[derive(Debug)]
pub enum Error {
    Io {
        context: String,
        source: io::Error,
    },
    /// The broker answered with an error.
    Broker(ErrorReply),
    /// The broker sent something this daemon does not understand.
    Protocol(String),
    /// The broker closed the connection.
    BrokerGone,
    /// The backend's lease could not be taken.
    Lease(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { context, source } => write!(f, "{context}: {source}"),
            Self::Broker(e) => write!(f, "the broker refused: {e}"),
            Self::Protocol(s) => f.write_str(s),
            Self::BrokerGone => f.write_str("the broker closed the connection"),
            Self::Lease(s) => f.write_str(s),
        }
    }
}

impl std::error::Error for Error {}

/// Writes one log line to stderr.
pub fn log(msg: &str) {
    eprintln!("holdfast-daemon[{}]: {msg}", std::process::id());
}

/// What a daemon serves, and how.
#[derive(Debug, Clone)]
pub struct Options {
    pub socket: PathBuf,
    pub export: String,
    /// Fence the export's current daemon instead of being refused as busy.
    pub takeover: bool,
    /// Join as the successor of a handoff (PREPARE) instead of ATTACH.
    pub successor: bool,
    pub workers: usize,
    pub lease_timeout: Duration,
    /// After a request that came alone, how long the I/O loop polls the
    /// submission ring before sleeping (zero: never polls).
    pub poll: Duration,
    /// Sleep this long before each read (tests: requests in flight at a
    /// kill). Zero: none.
    pub read_delay: Duration,
}

/// Attaches (or, as a successor, prepares), opens the backend with `open`,
/// takes its lease (a successor: once activated), issues RESTORE and serves
/// until SIGTERM/SIGINT (detaching cleanly), until a handoff releases it, or
/// until the broker goes away.
pub fn run_with(
    opts: &Options,
    open: impl FnOnce(OpenContext<'_>) -> Result<Box<dyn Backend>, Error>,
) -> Result<(), Error> {
    // Before any thread starts, so that every thread blocks them.
    let signals = serve::Signals::new()?;
    let mut conn = client::Connection::connect(&opts.socket)?;
    conn.hello()?;
    let att = if opts.successor {
        conn.prepare(&opts.export)?
    } else {
        conn.attach(&opts.export, opts.takeover)?
    };
    let geometry = att.geometry;
    log(&format!(
        "{} {} (epoch {}, {} bytes, {} requests pending)",
        if opts.successor {
            "preparing to take over"
        } else {
            "attached to"
        },
        opts.export,
        geometry.epoch,
        geometry.size,
        geometry.pending
    ));
    let opened = open(OpenContext {
        conn: &mut conn,
        export: &opts.export,
        size: geometry.size,
        kind: geometry.kind,
    })
    .and_then(|b| {
        backends::check_kind(&opts.export, geometry.kind, b.kind())?;
        Ok(Arc::<dyn Backend>::from(b))
    });
    let backend = match opened {
        Ok(b) => b,
        Err(e) => return Err(leave(&mut conn, opts, e)),
    };
    if opts.successor {
        fault::inject(Point::SuccessorAfterPrepare);
        conn.send(&Request::Ready)?;
        log("warmed up; sent READY");
        fault::inject(Point::SuccessorAfterReady);
        if !serve::await_activate(&mut conn, &signals)? {
            return Ok(());
        }
        fault::inject(Point::SuccessorAfterActivate);
    }
    if let Err(e) = backend.acquire_lease(opts.lease_timeout) {
        return Err(leave(&mut conn, opts, e));
    }
    let replayed = conn.restore()?;
    log(&format!("restored; {replayed} requests replayed"));
    let handed_off = serve::serve(conn, att, backend.clone(), opts, signals)?;
    if !handed_off {
        backend.detach()?;
    }
    Ok(())
}

/// A daemon that failed before serving leaves with DETACH and waits for
/// DETACHED, then returns `err`. Closing the connection alone would have the
/// broker declare it lost and SIGKILL it, which races the error message (and
/// the exit status) out. A successor's failure aborts its handoff instead.
fn leave(conn: &mut client::Connection, opts: &Options, err: Error) -> Error {
    if !opts.successor && conn.send(&Request::Detach).is_ok() {
        while let Ok((reply, _)) = conn.recv() {
            if matches!(reply, Reply::Detached | Reply::Error(_)) {
                break;
            }
        }
    }
    err
}

/// [`run_with`] for a backend named on the command line.
pub fn run(opts: &Options, backend: &BackendSpec) -> Result<(), Error> {
    run_with(opts, |ctx| backend.open(ctx))
}
