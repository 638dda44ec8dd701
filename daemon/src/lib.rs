//! holdfast daemon library: attach to a broker, recover, RESTORE, and serve
//! an export's requests from a [`Backend`].
//!
//! To write your own daemon, implement [`Backend`] and call [`run_with`];
//! or speak `holdfast_proto` directly with [`client::Connection`] and
//! [`rings::Attachment`].

pub mod backends;
pub mod client;
pub mod crc32c;
pub mod direct;
pub mod fault;
pub mod lease;
pub mod rings;
pub mod serve;
pub mod ublk;

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use backends::{Backend, BackendSpec, OpenContext};
use holdfast_proto::{ErrorReply, Reply, Request};
use serve::Served;

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
    /// How long to keep trying to attach again when the broker goes away
    /// (it is being upgraded, or restarted after a crash); zero: exit.
    pub reconnect: Duration,
    /// Never ask for direct mode: every request comes through the broker.
    pub relay: bool,
}

/// The first wait between attempts to reach a broker that went away; it
/// doubles up to [`RECONNECT_MAX_BACKOFF`].
const RECONNECT_BACKOFF: Duration = Duration::from_millis(5);
const RECONNECT_MAX_BACKOFF: Duration = Duration::from_millis(500);

/// Attaches (or, as a successor, prepares), opens the backend with `open`,
/// takes its lease (a successor: once activated), issues RESTORE and serves
/// until SIGTERM/SIGINT (detaching cleanly) or until a handoff releases it.
/// When the broker goes away, it attaches again to the broker that follows
/// (for up to [`Options::reconnect`]), keeping its backend and lease.
pub fn run_with(
    opts: &Options,
    open: impl FnOnce(OpenContext<'_>) -> Result<Box<dyn Backend>, Error>,
) -> Result<(), Error> {
    // Before any thread starts, so that every thread blocks them.
    let signals = serve::Signals::new()?;
    let mut conn = client::Connection::connect(&opts.socket)?;
    conn.hello()?;
    let att = if opts.successor {
        conn.prepare(&opts.export, !opts.relay)?
    } else {
        conn.attach(&opts.export, opts.takeover, !opts.relay)?
    };
    let geometry = att.geometry;
    if geometry.kind == holdfast_proto::ExportKind::Volume {
        // Before the backend and the workers start threads.
        set_io_flusher();
    }
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
    let mut att = att;
    // Direct mode on ublk: the queue, served on while the broker is away.
    let mut queue = None;
    loop {
        let served =
            serve::serve_attachment(&mut conn, att, backend.clone(), opts, &signals, &mut queue)?;
        match served {
            Served::HandedOff => return Ok(()),
            Served::Detached => return backend.detach(),
            Served::BrokerGone { lease_released } => {
                if opts.reconnect.is_zero() {
                    return Err(Error::BrokerGone);
                }
                log("the broker went away; every request it gave is done; attaching again");
                if lease_released {
                    backend.acquire_lease(opts.lease_timeout)?;
                }
                match reattach(opts, geometry, &signals)? {
                    Some((mut c, a)) => {
                        c.redeposit(conn)?;
                        let replayed = c.restore()?;
                        log(&format!(
                            "attached again (epoch {}); restored, {replayed} requests replayed",
                            a.geometry.epoch
                        ));
                        (conn, att) = (c, a);
                    }
                    None => return backend.detach(),
                }
            }
        }
    }
}

/// Attaches to the broker that follows one that went away, retrying with
/// back-off for up to [`Options::reconnect`]. None if a signal asked this
/// daemon to stop meanwhile.
fn reattach(
    opts: &Options,
    was: holdfast_proto::Attached,
    signals: &serve::Signals,
) -> Result<Option<(client::Connection, rings::Attachment)>, Error> {
    let end = std::time::Instant::now() + opts.reconnect;
    let mut backoff = RECONNECT_BACKOFF;
    loop {
        let tried = client::Connection::connect(&opts.socket).and_then(|mut c| {
            c.hello()?;
            let a = c.attach(&opts.export, false, !opts.relay)?;
            Ok((c, a))
        });
        match tried {
            Ok((c, a)) => {
                let g = a.geometry;
                if g.kind != was.kind || g.size != was.size {
                    return Err(Error::Protocol(format!(
                        "the new broker serves {} as a {} of {} bytes; this daemon served a {} \
                         of {} bytes",
                        opts.export,
                        g.kind.name(),
                        g.size,
                        was.kind.name(),
                        was.size
                    )));
                }
                return Ok(Some((c, a)));
            }
            // Another daemon has the export: it is not ours any more.
            Err(e @ Error::Broker(_)) => return Err(e),
            Err(e) if std::time::Instant::now() >= end => {
                return Err(Error::Protocol(format!(
                    "no broker to attach to within {:?} ({e})",
                    opts.reconnect
                )));
            }
            Err(_) => {}
        }
        if signals.wait_stop(backoff) {
            log("signal received while the broker was away: exiting");
            return Ok(None);
        }
        backoff = (backoff * 2).min(RECONNECT_MAX_BACKOFF);
    }
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

/// Marks this thread, and the threads it starts from now on, as serving
/// the kernel's writeback (prctl(2), PR_SET_IO_FLUSHER, Linux 5.6): the
/// requests a volume's daemon serves may be a file system's dirty pages,
/// and a backend that writes to the page cache (`file`, the s3 log) would
/// otherwise wait in reclaim for writeback that waits for it (the deadlock
/// of loop and NBD servers). [`run_with`] calls it for a volume, before
/// the backend or a worker starts a thread; not for a cachefiles export,
/// whose reads are no writeback: reclaim without I/O is slower under
/// memory pressure, a cost worth paying only where it prevents a deadlock.
pub fn set_io_flusher() {
    if let Err(e) = rustix::process::configure_io_flusher_behavior(true) {
        log(&format!(
            "PR_SET_IO_FLUSHER: {e} (it needs CAP_SYS_RESOURCE): under memory pressure, \
             serving writeback can deadlock"
        ));
    }
}

/// [`run_with`] for a backend named on the command line.
pub fn run(opts: &Options, backend: &BackendSpec) -> Result<(), Error> {
    run_with(opts, |ctx| backend.open(ctx))
}
