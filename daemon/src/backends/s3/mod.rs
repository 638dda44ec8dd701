//! `s3://BUCKET/PREFIX`: a volume kept in S3 (or any S3-compatible store) as
//! fixed-size chunk objects and a manifest, with a local write-ahead log in
//! front (`--cache-dir`).
//!
//! A write completes once it is appended to the log ([`wal`]); flush makes
//! the log durable. A checkpointer thread uploads the chunks the log has
//! touched (new objects, never overwritten), then replaces the manifest
//! with a conditional write, then deletes the log segments it covered.
//! Reads overlay the log's extents ([`extents`]) on the chunks, which come
//! from S3 through a local read cache ([`cache`]).
//!
//! Who may write: on one host, the flock lease on the cache directory; across
//! hosts, the claim ([`claim`]), which a holder renews and a daemon of
//! another cache directory takes only once it lapsed or was released, and
//! the manifest ([`manifest`]). Taking the lease takes the claim, then
//! claims the manifest (a conditional write of the next generation naming
//! this daemon); a daemon whose conditional write of either then fails was
//! superseded and exits at once (status 3) without writing again. Its chunk
//! uploads have keys of their own, so they cannot overwrite anything a
//! manifest names.

mod cache;
mod claim;
mod extents;
mod manifest;
mod store;
mod wal;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std::{fs, io};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};

use holdfast_proto::{Figure, Figures};

use self::cache::Cache;
use self::claim::{CLAIM, Claim};
use self::extents::{Extents, Source};
use self::manifest::{CHUNKS, Manifest, Owner, chunk_generation, chunk_key};
use self::store::{Condition, Failure, Patience, Store};
use self::wal::{Fit, Kind, Scan, Wal};
use super::Backend;
use crate::Error;
use crate::lease::Lease;

pub use self::manifest::valid_chunk_size;

const MANIFEST: &str = "manifest";
/// How long opening and claiming wait for S3 before giving up.
const S3_PATIENCE: Duration = Duration::from_secs(120);
/// How long a clean detach waits for the log to reach S3.
const DETACH_UPLOAD: Duration = Duration::from_secs(60);
/// How often a long checkpoint reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// The exit status of a daemon superseded by another one.
pub const SUPERSEDED_EXIT: i32 = 3;

/// What `--backend s3://...` and the S3 options name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    pub prefix: String,
    /// `--cache-dir`: the log, the read cache and the lease.
    pub cache_dir: Option<PathBuf>,
    /// `--endpoint`: an S3-compatible store (path-style addressing).
    pub endpoint: Option<String>,
    /// `--chunk-size`: for a new volume; an existing one keeps its own.
    pub chunk_size: Option<u64>,
    /// `--log-size`: the log's bound; writes wait for uploads past it.
    pub log_size: u64,
    /// `--read-cache-size`.
    pub read_cache_size: u64,
    /// `--uploads`: chunk uploads in flight at once.
    pub uploads: usize,
    /// `--checkpoint-ms`: how long a write may sit in the log before its
    /// chunk is uploaded (when the log is not filling up sooner).
    pub checkpoint_interval: Duration,
    /// `--claim-term-ms`: how long this daemon may serve without renewing
    /// its claim in S3 ([`claim`]).
    pub claim_term: Duration,
}

pub const DEFAULT_CHUNK_SIZE: u64 = 4 << 20;
pub const DEFAULT_CLAIM_TERM: Duration = Duration::from_secs(30);

impl S3Config {
    /// Parses `s3://BUCKET[/PREFIX]`, with the other settings at their
    /// defaults.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("{url:?} is not an s3://BUCKET/PREFIX URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        if !bucket_ok {
            return Err(format!(
                "{url:?}: bucket names are 3 to 63 characters of a-z, 0-9, '.' and '-'"
            ));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty()
            && (!manifest::is_token(prefix)
                || prefix
                    .split('/')
                    .any(|p| p.is_empty() || p == ".." || p == "."))
        {
            return Err(format!(
                "{url:?}: the prefix must be path segments of A-Z, a-z, 0-9, '.', '_' and '-'"
            ));
        }
        Ok(Self {
            bucket: bucket.into(),
            prefix: prefix.into(),
            cache_dir: None,
            endpoint: None,
            chunk_size: None,
            log_size: 1 << 30,
            read_cache_size: 1 << 30,
            uploads: 8,
            checkpoint_interval: Duration::from_secs(5),
            claim_term: DEFAULT_CLAIM_TERM,
        })
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn random_hex(bytes: usize) -> Result<String, Error> {
    let mut b = vec![0u8; bytes];
    rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty())
        .map_err(|e| Error::io("getrandom", e.into()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The cache directory's lineage: made once, kept by every daemon that
/// follows on this directory (and its log).
fn lineage(dir: &std::path::Path) -> Result<String, Error> {
    let path = dir.join("lineage");
    match fs::read_to_string(&path) {
        Ok(s) if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) => return Ok(s),
        Ok(_) => {
            return Err(Error::Protocol(format!(
                "{} is not a lineage id written by holdfast",
                path.display()
            )));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
    }
    // Written aside, then linked into place: of two daemons starting at
    // once on a new directory, one id wins and both read it.
    let id = random_hex(16)?;
    let tmp = dir.join(format!("lineage.{}", std::process::id()));
    let linked = fs::write(&tmp, &id)
        .and_then(|()| fs::File::open(&tmp)?.sync_all())
        .and_then(|()| fs::hard_link(&tmp, &path));
    let _ = fs::remove_file(&tmp);
    match linked.and_then(|()| wal::sync_dir(dir)) {
        Ok(()) => Ok(id),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => lineage(dir),
        Err(e) => Err(Error::io(format!("write {}", path.display()), e)),
    }
}

fn hostname() -> String {
    let uname = rustix::system::uname();
    let host: String = uname
        .nodename()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if host.is_empty() {
        "unknown".into()
    } else {
        host
    }
}

/// What stays fixed while the daemon runs: the settings, the volume's shape,
/// the store, and who this daemon is.
struct Volume {
    size: u64,
    chunk_size: u64,
    cfg: S3Config,
    cache_dir: PathBuf,
    store: Store,
    owner: Owner,
    /// Numbers this daemon's chunk uploads, for their keys.
    uploads: AtomicU64,
}

/// The backend: the volume, and its state while this daemon holds the
/// lease.
pub struct S3Backend {
    vol: Arc<Volume>,
    lease: Lease,
    active: RwLock<Option<Arc<Active>>>,
    /// The log as read while warming up (its owner may still append), so
    /// that taking the lease reads only what came after.
    warm: Mutex<Option<(Scan, Extents)>>,
}

/// The log, its index and the manifest they sit on: one lock, so that a
/// reader sees extents and chunk keys of one moment.
struct Log {
    wal: Wal,
    extents: Extents,
    manifest: Manifest,
    etag: String,
    /// Writers waiting for room in the log.
    waiting: usize,
    /// A clean detach asks for everything to be uploaded now.
    drain: bool,
    last_checkpoint: Instant,
    /// When the last checkpoint ended (or the lease was taken).
    checkpointed: Instant,
}

/// The volume while this daemon holds the lease.
struct Active {
    vol: Arc<Volume>,
    cache: Cache,
    log: Mutex<Log>,
    /// Wakes the checkpointer.
    wake: Condvar,
    /// Wakes writers waiting for room and a detach waiting for uploads.
    room: Condvar,
    stop: AtomicBool,
    /// The checkpointer, the orphan collector and the claim's renewer.
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// The claim this daemon holds, and when it was last renewed.
    held: Mutex<Held>,
    /// Wakes requests waiting for a renewal of a lapsed claim.
    renewed: Condvar,
    /// Bytes of chunks the running checkpoint has yet to upload.
    backlog: AtomicU64,
}

/// The claim this daemon holds: as last written, under what ETag, and when
/// the write that renewed it started.
struct Held {
    claim: Claim,
    etag: String,
    renewed_at: Instant,
}

/// Opens the backend without its lease: checks the settings, and that the
/// volume in S3 (if there is one) fits the export.
pub fn open(cfg: &S3Config, export: &str, size: u64) -> Result<S3Backend, Error> {
    let cache_dir = cfg.cache_dir.clone().ok_or_else(|| {
        Error::Protocol("an s3:// backend needs --cache-dir DIR for its log and read cache".into())
    })?;
    wal::ensure_dir(&cache_dir)
        .map_err(|e| Error::io(format!("cache directory {}", cache_dir.display()), e))?;
    let lease_file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache_dir.join("lease"))
        .map_err(|e| Error::io(format!("lease file in {}", cache_dir.display()), e))?;
    let store =
        Store::new(&cfg.bucket, &cfg.prefix, cfg.endpoint.as_deref()).map_err(Error::Protocol)?;
    let existing = match store.get(MANIFEST, Patience::For(S3_PATIENCE)) {
        Ok((body, _)) => Some(parse_manifest(&store, &body)?),
        Err(Failure::NotFound) => None,
        Err(e) => {
            return Err(Error::Protocol(format!(
                "cannot read {}{MANIFEST}: {e}",
                store.url()
            )));
        }
    };
    let chunk_size = match (&existing, cfg.chunk_size) {
        (Some(m), Some(c)) if m.chunk_size != c => {
            return Err(Error::Protocol(format!(
                "{} has chunks of {} bytes, not the {c} of --chunk-size",
                store.url(),
                m.chunk_size
            )));
        }
        (Some(m), _) => m.chunk_size,
        (None, c) => c.unwrap_or(DEFAULT_CHUNK_SIZE),
    };
    if let Some(m) = &existing
        && m.size != size
    {
        return Err(Error::Protocol(format!(
            "{} holds a volume of {} bytes, and export {export} is {size} bytes",
            store.url(),
            m.size
        )));
    }
    if cfg.log_size < 4 * chunk_size || cfg.read_cache_size < 4 * chunk_size {
        return Err(Error::Protocol(format!(
            "--log-size and --read-cache-size must be at least 4 chunks ({} bytes)",
            4 * chunk_size
        )));
    }
    let owner = Owner {
        lineage: lineage(&cache_dir)?,
        nonce: random_hex(8)?,
        host: hostname(),
        pid: std::process::id(),
    };
    check_conditional_writes(&store, &owner.nonce)?;
    crate::log(&format!(
        "S3 volume {} ({}; chunks of {chunk_size} bytes), cache {}",
        store.url(),
        match &existing {
            Some(m) => format!(
                "generation {}, {} chunks stored",
                m.generation,
                m.chunks.len()
            ),
            None => "new".into(),
        },
        cache_dir.display()
    ));
    let wal_dir = cache_dir.join("wal");
    let mut warm = (Scan::default(), Extents::default());
    let warm = match Wal::scan(&wal_dir, size, &mut warm.0, true, |r| {
        warm.1.insert(r.offset, r.offset + r.len, r.src)
    }) {
        Ok(_) => Some(warm),
        Err(e) => {
            // Taking the lease reads it all, and reports what is wrong.
            crate::log(&format!(
                "could not read the log {} yet: {e}",
                wal_dir.display()
            ));
            None
        }
    };
    Ok(S3Backend {
        warm: Mutex::new(warm),
        lease: Lease::new(
            lease_file,
            format!("cache directory {}", cache_dir.display()),
        ),
        vol: Arc::new(Volume {
            size,
            chunk_size,
            cfg: cfg.clone(),
            cache_dir,
            store,
            owner,
            uploads: AtomicU64::new(0),
        }),
        active: RwLock::new(None),
    })
}

/// Refuses a store that ignores conditional writes, on which the claim and
/// every manifest write rest: a probe object is written with If-None-Match
/// twice and with an If-Match no ETag has; the last two must fail.
fn check_conditional_writes(store: &Store, nonce: &str) -> Result<(), Error> {
    let key = format!("probe.{nonce}");
    let body = Bytes::from_static(b"holdfast's probe of conditional writes; safe to delete\n");
    let put = |cond| store.put(&key, &body, cond, Patience::For(S3_PATIENCE));
    let first = put(Condition::IfNoneMatch);
    let again = put(Condition::IfNoneMatch);
    let wrong = put(Condition::IfMatch("\"holdfast-matches-no-etag\""));
    let _ = store.delete(&key, Patience::For(S3_PATIENCE));
    let url = store.url();
    let cannot = |e: Failure| {
        Error::Protocol(format!(
            "cannot check that {url} honours conditional writes: {e}"
        ))
    };
    match first {
        // Precondition: it landed on an attempt whose answer was lost.
        Ok(_) | Err(Failure::Precondition) => {}
        Err(e) => return Err(cannot(e)),
    }
    for probe in [again, wrong] {
        match probe {
            Err(Failure::Precondition) => {}
            Ok(_) => {
                return Err(Error::Protocol(format!(
                    "{url} ignores conditional writes (a PUT with If-None-Match or If-Match \
                     that should have failed succeeded): claiming the volume and replacing its \
                     manifest rest on them, so it cannot be served safely; use a store that \
                     honours them"
                )));
            }
            Err(e) => return Err(cannot(e)),
        }
    }
    Ok(())
}

/// A checkpoint's upload backlog, as the figure shows it: the bytes it has
/// to upload from its start, 0 again however it ends.
struct Backlog<'a>(&'a AtomicU64);

impl<'a> Backlog<'a> {
    fn of(figure: &'a AtomicU64, bytes: u64) -> Self {
        figure.store(bytes, Ordering::Relaxed);
        Self(figure)
    }
}

impl Drop for Backlog<'_> {
    fn drop(&mut self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// Starts a thread of `active` (stopped and joined by [`Active::stop`]).
fn spawn(
    active: &Arc<Active>,
    name: &str,
    run: impl FnOnce(&Active) + Send + 'static,
) -> Result<(), Error> {
    let a = active.clone();
    let t = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || run(&a))
        .map_err(|e| Error::io(format!("cannot start thread {name}"), e))?;
    active.threads.lock().push(t);
    Ok(())
}

fn parse_manifest(store: &Store, body: &[u8]) -> Result<Manifest, Error> {
    Manifest::parse(body).map_err(|e| Error::Protocol(format!("{}{MANIFEST}: {e}", store.url())))
}

impl S3Backend {
    fn active(&self) -> io::Result<Arc<Active>> {
        self.active.read().clone().ok_or_else(|| errno(libc::EIO))
    }

    /// Takes the manifest over: the next generation, naming this daemon,
    /// written on condition that nobody wrote since it was read. A log
    /// with writes in it may only follow a manifest of its own lineage.
    fn claim(
        &self,
        log_has_writes: bool,
        timeout: Duration,
    ) -> Result<(Manifest, String, Held), Error> {
        let url = self.vol.store.url();
        let mut held = None;
        for _ in 0..10 {
            let read = match self.vol.store.get(MANIFEST, Patience::For(S3_PATIENCE)) {
                Ok((body, etag)) => Some((parse_manifest(&self.vol.store, &body)?, etag)),
                Err(Failure::NotFound) => None,
                Err(e) => return Err(Error::Protocol(format!("cannot read {url}{MANIFEST}: {e}"))),
            };
            let (mut m, cond) = match &read {
                Some((m, _)) if m.owner.nonce == self.vol.owner.nonce => {
                    // Ours already (a REVIVE with nobody in between, or a
                    // retried write that had landed).
                    let held = match held {
                        Some(h) => h,
                        None => self.take_claim(timeout)?,
                    };
                    return Ok((m.clone(), read.map(|r| r.1).unwrap_or_default(), held));
                }
                Some((m, _)) if log_has_writes && m.owner.lineage != self.vol.owner.lineage => {
                    return Err(Error::Lease(format!(
                        "the log in {} holds writes that never reached S3, and {url} has since \
                         been taken over by a daemon of another cache directory (pid {} on {}, \
                         generation {}): replaying them would overwrite newer data. Move {} \
                         aside to serve what S3 holds (its writes are then lost), or serve the \
                         volume from the host that owns it",
                        self.vol.cache_dir.display(),
                        m.owner.pid,
                        m.owner.host,
                        m.generation,
                        self.vol.cache_dir.join("wal").display()
                    )));
                }
                Some((m, etag)) => (m.clone(), Condition::IfMatch(etag)),
                None if log_has_writes => {
                    return Err(Error::Lease(format!(
                        "the log in {} holds writes, but {url} has no manifest: was the volume \
                         deleted? Move the log aside to start an empty volume",
                        self.vol.cache_dir.display()
                    )));
                }
                None => (
                    Manifest {
                        size: self.vol.size,
                        chunk_size: self.vol.chunk_size,
                        generation: 0,
                        owner: self.vol.owner.clone(),
                        log: None,
                        chunks: BTreeMap::new(),
                    },
                    Condition::IfNoneMatch,
                ),
            };
            if m.size != self.vol.size || m.chunk_size != self.vol.chunk_size {
                return Err(Error::Protocol(format!(
                    "{url} changed shape while this daemon warmed up ({} bytes in chunks of {})",
                    m.size, m.chunk_size
                )));
            }
            // The claim first: it waits out another cache directory's.
            let h = match held.take() {
                Some(h) => h,
                None => self.take_claim(timeout)?,
            };
            m.generation += 1;
            m.owner = self.vol.owner.clone();
            match self.vol.store.put(
                MANIFEST,
                &Bytes::from(m.encode()),
                cond,
                Patience::For(S3_PATIENCE),
            ) {
                Ok(etag) => return Ok((m, etag, h)),
                // Somebody wrote in between (or our own retry landed):
                // read again.
                Err(Failure::Precondition) => held = Some(h),
                Err(e) => {
                    return Err(Error::Protocol(format!(
                        "cannot write {url}{MANIFEST}: {e}"
                    )));
                }
            }
        }
        Err(Error::Lease(format!(
            "{url}{MANIFEST} changed ten times while this daemon claimed it: another daemon \
             is claiming this volume too"
        )))
    }
}

impl S3Backend {
    /// Takes the claim ([`claim`]): at once if nobody holds it, if it was
    /// released, or if its holder is of this cache directory (whose flock
    /// lease this daemon holds); else once it has been seen unchanged for
    /// its holder's term and a tenth. Gives up if a live holder keeps
    /// renewing it past `timeout` (or two of its terms, if longer).
    fn take_claim(&self, timeout: Duration) -> Result<Held, Error> {
        let (store, ours) = (&self.vol.store, &self.vol.owner);
        let url = store.url();
        let mut seen: Option<(String, Instant)> = None;
        let mut deadline = None;
        loop {
            let (cond, renewal) = match store.get(CLAIM, Patience::For(S3_PATIENCE)) {
                Err(Failure::NotFound) => (None, 0),
                Err(e) => return Err(Error::Protocol(format!("cannot read {url}{CLAIM}: {e}"))),
                Ok((body, etag)) => {
                    let c = Claim::parse(&body)
                        .map_err(|e| Error::Protocol(format!("{url}{CLAIM}: {e}")))?;
                    let lapsed = seen
                        .as_ref()
                        .is_some_and(|(e, since)| *e == etag && since.elapsed() >= c.lapse());
                    if c.released || c.owner.lineage == ours.lineage || lapsed {
                        (Some(etag), c.renewal.saturating_add(1))
                    } else {
                        let end = *deadline
                            .get_or_insert_with(|| Instant::now() + timeout.max(2 * c.lapse()));
                        if seen.as_ref().is_none_or(|(e, _)| *e != etag) {
                            crate::log(&format!(
                                "{url} is claimed by pid {} on {} (another cache directory; \
                                 term {} ms): waiting until it has gone {} ms without a \
                                 renewal. A clean detach of that daemon releases it at once",
                                c.owner.pid,
                                c.owner.host,
                                c.term_ms,
                                c.lapse().as_millis()
                            ));
                            seen = Some((etag, Instant::now()));
                        }
                        if Instant::now() >= end {
                            return Err(Error::Lease(format!(
                                "{url} stays claimed by pid {} on {}, which renews its claim: \
                                 a live holder is not superseded. Stop that daemon (a clean \
                                 detach releases the claim), then start this one again",
                                c.owner.pid, c.owner.host
                            )));
                        }
                        std::thread::sleep(c.lapse().div_f64(8.0).min(Duration::from_secs(1)));
                        continue;
                    }
                }
            };
            let claim = Claim {
                owner: ours.clone(),
                term_ms: u64::try_from(self.vol.cfg.claim_term.as_millis()).unwrap_or(u64::MAX),
                renewal,
                released: false,
            };
            let condition = match &cond {
                Some(etag) => Condition::IfMatch(etag),
                None => Condition::IfNoneMatch,
            };
            let started = Instant::now();
            let body = Bytes::from(claim.encode());
            match store.put(CLAIM, &body, condition, Patience::For(S3_PATIENCE)) {
                Ok(etag) => {
                    return Ok(Held {
                        claim,
                        etag,
                        renewed_at: started,
                    });
                }
                // Written in between (or our own retry landed): read again.
                Err(Failure::Precondition) => {}
                Err(e) => return Err(Error::Protocol(format!("cannot write {url}{CLAIM}: {e}"))),
            }
        }
    }
}

impl Backend for S3Backend {
    /// The lease, then the log's replay, then the manifest's claim; then
    /// the checkpointer and the orphan collector start.
    fn acquire_lease(&self, timeout: Duration) -> Result<(), Error> {
        if self.active.read().is_some() {
            return Ok(());
        }
        self.lease.acquire(timeout)?;
        let wal_dir = self.vol.cache_dir.join("wal");
        let (mut scan, mut extents) = self.warm.lock().take().unwrap_or_default();
        let read_warm = scan.records;
        let mut read_now = 0u64;
        loop {
            let scanned = Wal::scan(&wal_dir, self.vol.size, &mut scan, false, |r| {
                read_now += 1;
                extents.insert(r.offset, r.offset + r.len, r.src)
            });
            match scanned.map_err(|e| Error::io(format!("log {}", wal_dir.display()), e))? {
                (Fit::Continued { oldest }, _) => {
                    extents.drop_before(oldest);
                    break;
                }
                (Fit::Stale, _) => (scan, extents) = Default::default(),
            }
        }
        let (manifest, etag, held) = self.claim(!extents.is_empty(), timeout)?;
        // What the manifest says is in S3 already is not replayed over it
        // (a cache directory restored from an older copy).
        let covered = manifest.covers(&self.vol.owner.lineage);
        extents.drop_before(covered);
        let wal = Wal::from_scan(&wal_dir, scan, covered)
            .map_err(|e| Error::io(format!("log {}", wal_dir.display()), e))?;
        let claimed = manifest.clone();
        let cache = Cache::open(
            &self.vol.cache_dir.join("cache"),
            self.vol.chunk_size,
            self.vol.cfg.read_cache_size,
        )
        .map_err(|e| Error::io("read cache", e))?;
        crate::log(&format!(
            "claimed {} at generation {}; the log holds {} bytes to upload ({} records read \
             while warming up, {read_now} now)",
            self.vol.store.url(),
            manifest.generation,
            wal.bytes(),
            read_warm,
        ));
        let active = Arc::new(Active {
            vol: self.vol.clone(),
            cache,
            log: Mutex::new(Log {
                wal,
                extents,
                manifest,
                etag,
                waiting: 0,
                drain: false,
                last_checkpoint: Instant::now(),
                checkpointed: Instant::now(),
            }),
            wake: Condvar::new(),
            room: Condvar::new(),
            stop: AtomicBool::new(false),
            threads: Mutex::new(Vec::new()),
            held: Mutex::new(held),
            renewed: Condvar::new(),
            backlog: AtomicU64::new(0),
        });
        let started = spawn(&active, "holdfast-checkpoint", Active::checkpointer)
            .and_then(|()| spawn(&active, "holdfast-claim", Active::renewer))
            .and_then(|()| {
                spawn(&active, "holdfast-orphans", move |a| {
                    a.collect_orphans(&claimed)
                })
            });
        if let Err(e) = started {
            active.stop();
            return Err(e);
        }
        *self.active.write() = Some(active);
        Ok(())
    }

    /// Stops uploading (a checkpoint in progress is abandoned before its
    /// manifest write; the successor replays the log), makes the log
    /// durable, and unlocks.
    fn release_lease(&self) -> Result<(), Error> {
        let Some(active) = self.active.write().take() else {
            return self.lease.release();
        };
        active.stop();
        active.sync().map_err(|e| Error::io("fsync the log", e))?;
        self.lease.release()
    }

    fn detach(&self) -> Result<(), Error> {
        let Some(active) = self.active.write().take() else {
            return Ok(());
        };
        active.upload_all(DETACH_UPLOAD);
        active.stop();
        active.release_claim();
        active.sync().map_err(|e| Error::io("fsync the log", e))
    }

    fn figures(&self) -> Figures {
        self.active
            .read()
            .as_ref()
            .map_or_else(Figures::default, |a| a.figures())
    }

    // Each answer waits until the claim is within its term: a daemon whose
    // claim lapsed may have been superseded, and must not acknowledge.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let a = self.active()?;
        a.read(offset, buf).and_then(|()| a.within_term())
    }

    fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let a = self.active()?;
        a.append(Kind::Write, offset, buf.len() as u64, buf)
            .and_then(|()| a.within_term())
    }

    fn flush(&self) -> io::Result<()> {
        let a = self.active()?;
        a.sync().and_then(|()| a.within_term())
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        let a = self.active()?;
        a.append(Kind::Zeroes, offset, len, &[])
            .and_then(|()| a.within_term())
    }
}

/// What a failed conditional manifest write turned out to be.
enum Landed {
    /// The write is there: the manifest's ETag now.
    Yes(String),
    /// The manifest is still this daemon's last one, under this ETag.
    StillOurs(String),
}

/// Why a checkpoint did not finish.
enum Stopped {
    /// The lease is being given up.
    Stop,
    /// A local failure (reading the log): try again later.
    Io(io::Error),
}

impl Active {
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_all();
        self.renewed.notify_all();
        let threads = std::mem::take(&mut *self.threads.lock());
        for t in threads {
            let _ = t.join();
        }
    }

    fn term(&self) -> Duration {
        self.vol.cfg.claim_term
    }

    /// Returns once the claim is within its term: at once while renewals
    /// succeed; after a lapse, when one succeeds again (EIO if the claim
    /// is given up meanwhile; a superseded daemon exits).
    fn within_term(&self) -> io::Result<()> {
        let mut held = self.held.lock();
        let mut told = false;
        while held.renewed_at.elapsed() >= self.term() {
            if self.stop.load(Ordering::SeqCst) {
                return Err(errno(libc::EIO));
            }
            if !told {
                crate::log(&format!(
                    "the claim on {} went {} ms without a renewal: requests wait until one \
                     succeeds",
                    self.vol.store.url(),
                    held.renewed_at.elapsed().as_millis()
                ));
                told = true;
            }
            self.renewed.wait_for(&mut held, Duration::from_millis(100));
        }
        Ok(())
    }

    /// The renewer: renews the claim every third of its term (every tenth
    /// once it has lapsed), until stopped.
    fn renewer(&self) {
        loop {
            let lapsed = self.held.lock().renewed_at.elapsed() >= self.term();
            let pause = self.term() / if lapsed { 10 } else { 3 };
            {
                let mut held = self.held.lock();
                if !self.stop.load(Ordering::SeqCst) {
                    self.renewed.wait_for(&mut held, pause);
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            self.renew();
        }
    }

    /// One renewal of the claim; a holder that finds the claim taken by
    /// another daemon was superseded, and exits.
    fn renew(&self) {
        let (mut next, etag) = {
            let h = self.held.lock();
            (h.claim.clone(), h.etag.clone())
        };
        next.renewal = next.renewal.saturating_add(1);
        let body = Bytes::from(next.encode());
        let started = Instant::now();
        let store = &self.vol.store;
        let put = store.put(
            CLAIM,
            &body,
            Condition::IfMatch(&etag),
            Patience::For(self.term() / 3),
        );
        let etag = match put {
            Ok(etag) => etag,
            Err(Failure::Precondition) => match store.get(CLAIM, Patience::For(self.term() / 3)) {
                // A retried attempt landed, or the ETag's form differed.
                Ok((now, etag)) if now == body => etag,
                Ok((now, etag)) if now == self.held.lock().claim.encode() => {
                    self.held.lock().etag = etag;
                    return;
                }
                Ok((now, _)) => self.superseded(&format!(
                    "its claim is now {}",
                    String::from_utf8_lossy(&now).replace('\n', "; ")
                )),
                Err(Failure::NotFound) => self.superseded("its claim was deleted"),
                Err(e) => {
                    crate::log(&format!("renewing the claim: {e}; trying again"));
                    return;
                }
            },
            Err(e) => {
                crate::log(&format!("renewing the claim: {e}; trying again"));
                return;
            }
        };
        let mut h = self.held.lock();
        *h = Held {
            claim: next,
            etag,
            renewed_at: started,
        };
        self.renewed.notify_all();
    }

    /// Gives the claim up (a clean detach), so that a daemon of another
    /// cache directory need not wait out its term.
    fn release_claim(&self) {
        let h = self.held.lock();
        let mut released = h.claim.clone();
        released.renewal = released.renewal.saturating_add(1);
        released.released = true;
        let body = Bytes::from(released.encode());
        let put = self.vol.store.put(
            CLAIM,
            &body,
            Condition::IfMatch(&h.etag),
            Patience::For(Duration::from_secs(10)),
        );
        if let Err(e) = put {
            crate::log(&format!(
                "could not release the claim ({e}): another cache directory's daemon waits \
                 out its term"
            ));
        }
    }

    /// Like a crash: the broker replays what this daemon holds to the next
    /// one. Nothing runs after it.
    fn superseded(&self, why: &str) -> ! {
        crate::log(&format!(
            "superseded: {why}. This daemon stops writing and exits; writes in its log ({}) \
             that did not reach S3 are kept there",
            self.vol.cache_dir.join("wal").display()
        ));
        // SAFETY: _exit ends the process at once; nothing runs after it.
        unsafe { libc::_exit(SUPERSEDED_EXIT) }
    }

    /// Makes every append so far durable. Older segments were made
    /// durable when they were rotated out; the fsync of the current one
    /// runs outside the lock, so that writes go on meanwhile.
    fn sync(&self) -> io::Result<()> {
        let Some((file, number, len)) = self.log.lock().wal.to_sync()? else {
            return Ok(());
        };
        let synced = Wal::sync(&file);
        let result = self.log.lock().wal.synced(number, len, synced);
        if result.is_err() {
            // Writers waiting for room find the log failed.
            self.room.notify_all();
        }
        result
    }

    /// Appends a record and indexes it. The append (a page-cache write)
    /// runs under the log's lock on purpose: the index must order
    /// overlapping writes as the log does, or a replay after a crash would
    /// disagree with what was read before it.
    fn append(&self, kind: Kind, offset: u64, len: u64, data: &[u8]) -> io::Result<()> {
        let end = offset.checked_add(len).filter(|&e| e <= self.vol.size);
        let end = end.ok_or_else(|| errno(libc::EINVAL))?;
        if len == 0 {
            return Ok(());
        }
        let need = 32 + data.len() as u64;
        let mut log = self.log.lock();
        let mut told = false;
        while log.wal.bytes() > 0 && log.wal.bytes() + need > self.vol.cfg.log_size {
            log.wal.healthy()?;
            if !told {
                crate::log(&format!(
                    "the log is full ({} bytes): writes wait for uploads to S3",
                    log.wal.bytes()
                ));
                told = true;
            }
            log.waiting += 1;
            self.wake.notify_one();
            self.room.wait(&mut log);
            log.waiting -= 1;
        }
        let src = log.wal.append(kind, offset, len, data)?;
        log.extents.insert(offset, end, src);
        if log.wal.bytes() >= self.vol.cfg.log_size / 4 {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Reads `[offset, offset+buf.len())`: the log's extents over the
    /// chunks. A chunk object replaced and deleted after the lookup (a
    /// checkpoint ran meanwhile) makes it look again.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.vol.size);
        let end = end.ok_or_else(|| errno(libc::EINVAL))?;
        for _ in 0..5 {
            match self.read_once(offset, end, buf, false) {
                Err(Failure::NotFound) => continue,
                Ok(()) => return Ok(()),
                Err(e) => {
                    crate::log(&format!("read of {} bytes at {offset}: {e}", buf.len()));
                    return Err(errno(libc::EIO));
                }
            }
        }
        Err(errno(libc::EIO))
    }

    /// Fills `dst` with chunk object `key`'s bytes at `within`, through
    /// the read cache.
    fn cached(&self, key: &str, within: u64, dst: &mut [u8]) -> Result<(), Failure> {
        self.cache.read(key, within, dst, |o, l| {
            self.vol
                .store
                .get_range(key, o, l, Patience::UntilStopped(&self.stop))
        })
    }

    /// Reads `[offset, end)` into `buf` as it reads now: the extents and
    /// chunk keys are taken under the lock, the bytes outside it. With
    /// `base_filled`, `buf` already holds the chunks' bytes and only the
    /// log's extents are laid over them.
    fn read_once(
        &self,
        offset: u64,
        end: u64,
        buf: &mut [u8],
        base_filled: bool,
    ) -> Result<(), Failure> {
        let cs = self.vol.chunk_size;
        let (pieces, chunks, files) = {
            let log = self.log.lock();
            let pieces = log.extents.pieces(offset, end);
            let chunks: BTreeMap<u64, String> = log
                .manifest
                .chunks
                .range(offset / cs..=(end - 1) / cs)
                .map(|(&i, k)| (i, k.clone()))
                .collect();
            let files: BTreeMap<u64, Arc<fs::File>> = pieces
                .iter()
                .filter_map(|p| p.src)
                .filter_map(|s| Some((s.segment, log.wal.file(s.segment)?)))
                .collect();
            (pieces, chunks, files)
        };
        for p in pieces {
            let dst = &mut buf[(p.start - offset) as usize..(p.end - offset) as usize];
            match p.src.map(|src| (src.segment, src.record, src.data)) {
                Some((_, _, None)) => dst.fill(0),
                Some((segment, record, Some(at))) => {
                    let file = files.get(&segment).ok_or_else(|| {
                        Failure::Permanent(format!("log segment {segment} is gone"))
                    })?;
                    let src = Source {
                        segment,
                        record,
                        data: Some(at),
                    };
                    wal::read_checked(file, src, dst).map_err(|e| {
                        Failure::Permanent(format!(
                            "reading the log (segment {segment}, byte {at}): {e}"
                        ))
                    })?;
                }
                None if base_filled => {}
                None => {
                    let mut at = p.start;
                    while at < p.end {
                        let within = at % cs;
                        let n = (cs - within).min(p.end - at);
                        let d = &mut dst[(at - p.start) as usize..(at - p.start + n) as usize];
                        match chunks.get(&(at / cs)) {
                            None => d.fill(0),
                            Some(key) => self.cached(key, within, d)?,
                        }
                        at += n;
                    }
                }
            }
        }
        Ok(())
    }

    /// The checkpointer: uploads when the log is a quarter full, when its
    /// oldest write is `--checkpoint-ms` old, when writers wait for room,
    /// or when a detach asks; until stopped.
    fn checkpointer(&self) {
        loop {
            {
                let mut log = self.log.lock();
                loop {
                    if self.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if log.wal.healthy().is_err() {
                        // Its pages may be gone: what a restarted daemon
                        // replays from the disk is what goes to S3.
                        self.room.notify_all();
                        self.wake.wait(&mut log);
                        continue;
                    }
                    let due = log.last_checkpoint + self.vol.cfg.checkpoint_interval;
                    if !log.extents.is_empty()
                        && (log.wal.bytes() >= self.vol.cfg.log_size / 4
                            || log.waiting > 0
                            || log.drain
                            || Instant::now() >= due)
                    {
                        break;
                    }
                    if log.extents.is_empty() {
                        log.last_checkpoint = Instant::now();
                        self.room.notify_all();
                        self.wake
                            .wait_for(&mut log, self.vol.cfg.checkpoint_interval);
                    } else {
                        self.wake.wait_until(&mut log, due);
                    }
                }
            }
            match self.checkpoint() {
                Ok(()) | Err(Stopped::Stop) => {}
                Err(Stopped::Io(e)) => {
                    crate::log(&format!("checkpoint failed, retrying in a second: {e}"));
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// The figures `holdfastctl status` shows of this volume.
    fn figures(&self) -> Figures {
        let (hits, misses) = self.cache.hits_and_misses();
        let log = self.log.lock();
        // Nothing waits for S3 while the log holds nothing to upload.
        let age = if log.extents.is_empty() {
            0
        } else {
            u64::try_from(log.checkpointed.elapsed().as_millis()).unwrap_or(u64::MAX)
        };
        let mut f = Figures::default();
        f.set(Figure::LogBytes, log.wal.bytes())
            .set(Figure::LogLimitBytes, self.vol.cfg.log_size)
            .set(
                Figure::UploadBacklogBytes,
                self.backlog.load(Ordering::Relaxed),
            )
            .set(Figure::CheckpointAgeMs, age)
            .set(Figure::CacheHits, hits)
            .set(Figure::CacheMisses, misses);
        f
    }

    /// Uploads every chunk the log's older segments touched, then the
    /// manifest naming them, then drops those segments.
    fn checkpoint(&self) -> Result<(), Stopped> {
        let started = Instant::now();
        let (cut, dirty, base, etag) = {
            let mut log = self.log.lock();
            log.last_checkpoint = started;
            let cut = log.wal.rotate().map_err(Stopped::Io)?;
            let dirty: Vec<u64> = log
                .extents
                .chunks_before(cut, self.vol.chunk_size)
                .into_iter()
                .collect();
            (cut, dirty, log.manifest.clone(), log.etag.clone())
        };
        let generation = base.generation + 1;
        let _backlog = Backlog::of(&self.backlog, dirty.len() as u64 * self.vol.chunk_size);
        let uploaded: Mutex<BTreeMap<u64, Option<String>>> = Mutex::new(BTreeMap::new());
        let bytes = AtomicU64::new(0);
        let next = AtomicUsize::new(0);
        let failed: Mutex<Option<Failure>> = Mutex::new(None);
        let upload = || {
            while !self.stop.load(Ordering::SeqCst) && failed.lock().is_none() {
                let Some(&index) = dirty.get(next.fetch_add(1, Ordering::SeqCst)) else {
                    return;
                };
                match self.upload_chunk(index, generation) {
                    Ok(key) => {
                        bytes.fetch_add(self.vol.chunk_size, Ordering::Relaxed);
                        self.backlog
                            .fetch_sub(self.vol.chunk_size, Ordering::Relaxed);
                        uploaded.lock().insert(index, key);
                    }
                    Err(e) => *failed.lock() = Some(e),
                }
            }
        };
        std::thread::scope(|s| {
            let workers: Vec<_> = (0..self.vol.cfg.uploads.min(dirty.len()).max(1))
                .map(|_| s.spawn(upload))
                .collect();
            let mut reported = Instant::now();
            while !workers.iter().all(|w| w.is_finished()) {
                std::thread::sleep(Duration::from_millis(20));
                if reported.elapsed() >= PROGRESS_EVERY {
                    reported = Instant::now();
                    crate::log(&format!(
                        "checkpoint to generation {generation}: {}/{} chunks uploaded \
                         ({} MiB) in {:.1} s; {} S3 failures so far",
                        uploaded.lock().len(),
                        dirty.len(),
                        bytes.load(Ordering::Relaxed) >> 20,
                        started.elapsed().as_secs_f64(),
                        self.vol.store.failures.load(Ordering::Relaxed)
                    ));
                }
            }
        });
        if let Some(e) = failed.lock().take() {
            return Err(match e {
                Failure::Stopped => Stopped::Stop,
                e => Stopped::Io(io::Error::other(e.to_string())),
            });
        }
        if self.stop.load(Ordering::SeqCst) {
            return Err(Stopped::Stop);
        }
        let uploaded = uploaded.into_inner();
        let mut next_manifest = base.clone();
        next_manifest.generation = generation;
        next_manifest.owner = self.vol.owner.clone();
        next_manifest.log = Some((self.vol.owner.lineage.clone(), cut));
        for (&index, key) in &uploaded {
            match key {
                Some(k) => next_manifest.chunks.insert(index, k.clone()),
                None => next_manifest.chunks.remove(&index),
            };
        }
        let body = Bytes::from(next_manifest.encode());
        let base_body = base.encode();
        let mut etag = etag;
        let mut tries = 0;
        let new_etag = loop {
            let put = self.vol.store.put(
                MANIFEST,
                &body,
                Condition::IfMatch(&etag),
                Patience::UntilStopped(&self.stop),
            );
            match put {
                Ok(t) => break t,
                Err(Failure::Precondition) => {
                    match self.landed_or_superseded(&body, &base_body, tries < 3)? {
                        Landed::Yes(t) => break t,
                        Landed::StillOurs(t) => etag = t,
                    }
                }
                Err(Failure::Stopped) => return Err(Stopped::Stop),
                Err(e) => return Err(Stopped::Io(io::Error::other(e.to_string()))),
            }
            tries += 1;
        };
        {
            let mut log = self.log.lock();
            log.manifest = next_manifest;
            log.etag = new_etag;
            log.extents.drop_before(cut);
            log.checkpointed = Instant::now();
            log.wal.remove_before(cut).map_err(Stopped::Io)?;
            if log.extents.is_empty() {
                log.drain = false;
            }
        }
        self.room.notify_all();
        for index in uploaded.keys() {
            if let Some(old) = base.chunks.get(index) {
                self.cache.evict(old);
                // One left behind (stopped, refused, or S3 failed) is an
                // orphan that the next claim collects: a refusal (403) is
                // not retried, or checkpoints would stop behind it.
                match self
                    .vol
                    .store
                    .delete(old, Patience::WhileTransient(&self.stop))
                {
                    Ok(()) | Err(Failure::Stopped) => {}
                    Err(e) => {
                        crate::log(&format!("could not delete the replaced chunk {old}: {e}"))
                    }
                }
            }
        }
        let took = started.elapsed();
        if took >= PROGRESS_EVERY {
            crate::log(&format!(
                "checkpoint to generation {generation}: {} chunks in {:.1} s",
                uploaded.len(),
                took.as_secs_f64()
            ));
        }
        Ok(())
    }

    /// Uploads chunk `index` under a key no other upload uses; `None` for a
    /// chunk of zeroes, which needs no object.
    fn upload_chunk(&self, index: u64, generation: u64) -> Result<Option<String>, Failure> {
        // The chunk as it reads now. Its key in the manifest cannot change
        // meanwhile: only this thread writes the manifest.
        let start = index * self.vol.chunk_size;
        let end = (start + self.vol.chunk_size).min(self.vol.size);
        let mut data = vec![0u8; self.vol.chunk_size as usize];
        // The whole base chunk first, in one ranged GET for what the cache
        // lacks, then the log over it. Reading the base piece by piece
        // between the log's extents would cost a GET per gap whenever the
        // cache dropped the chunk meanwhile (measured: handoff stalls went
        // from 0.24 s to 0.4 s median, 2.7 s max, with a 4-chunk cache).
        let base = self.log.lock().manifest.chunks.get(&index).cloned();
        if let Some(key) = base {
            self.cached(&key, 0, &mut data)?;
        }
        self.read_once(start, end, &mut data[..(end - start) as usize], true)?;
        if data.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let data = Bytes::from(data);
        let upload = self.vol.uploads.fetch_add(1, Ordering::Relaxed);
        let key = chunk_key(index, generation, &self.vol.owner.nonce, upload);
        match self.vol.store.put(
            &key,
            &data,
            Condition::IfNoneMatch,
            Patience::UntilStopped(&self.stop),
        ) {
            // No other upload has this key: a retry after an attempt that
            // landed finds it there.
            Ok(_) | Err(Failure::Precondition) => {}
            Err(e) => return Err(e),
        }
        self.cache.insert(&key, &data);
        Ok(Some(key))
    }

    /// A conditional manifest write failed: it landed after all (a retried
    /// attempt), or the manifest is still the one this daemon wrote last
    /// and only its ETag did not match (a store whose PUT answers give
    /// ETags in another form; `retry` allows writing again with the one a
    /// GET gives), or another daemon owns the volume now and this one must
    /// not write again.
    fn landed_or_superseded(
        &self,
        body: &[u8],
        base: &[u8],
        retry: bool,
    ) -> Result<Landed, Stopped> {
        match self
            .vol
            .store
            .get(MANIFEST, Patience::UntilStopped(&self.stop))
        {
            Ok((now, etag)) if now == body => Ok(Landed::Yes(etag)),
            Ok((now, etag)) if now == base && retry => {
                crate::log(&format!(
                    "{}{MANIFEST} is still this daemon's, but its ETag did not match ({etag} \
                     now); writing it again with that one",
                    self.vol.store.url()
                ));
                Ok(Landed::StillOurs(etag))
            }
            Err(Failure::Stopped) => Err(Stopped::Stop),
            Ok((now, _)) => {
                let who = Manifest::parse(&now).map_or_else(
                    |e| format!("an unreadable manifest ({e})"),
                    |m| {
                        format!(
                            "generation {} by pid {} on {}",
                            m.generation, m.owner.pid, m.owner.host
                        )
                    },
                );
                self.superseded(&format!("{}{MANIFEST} is now {who}", self.vol.store.url()))
            }
            // The next daemon refuses a log the manifest has moved past.
            Err(e) => self.superseded(&format!("or S3 failed ({e})")),
        }
    }

    /// Deletes the chunk objects that no manifest names or ever will:
    /// uploads of checkpoints that were abandoned (a kill, a handoff, a
    /// superseded daemon) and replaced chunks whose delete was cut short.
    /// Such a chunk was uploaded for a generation up to the one claimed,
    /// and the claimed manifest does not name it; every later manifest
    /// names only chunks uploaded for later generations (a checkpoint
    /// uploads for the generation it will write, and a manifest write on
    /// an older generation fails its condition). In the background, so
    /// that a claim never waits for a listing.
    fn collect_orphans(&self, claimed: &Manifest) {
        let named: std::collections::HashSet<&str> =
            claimed.chunks.values().map(String::as_str).collect();
        let patience = Patience::WhileTransient(&self.stop);
        let mut removed = 0u64;
        let listed = self.vol.store.list(CHUNKS, patience, |names| {
            for name in names {
                let orphan = chunk_generation(&name).is_some_and(|g| g <= claimed.generation)
                    && !named.contains(name.as_str());
                if orphan {
                    self.vol.store.delete(&name, patience)?;
                    removed += 1;
                }
            }
            Ok(())
        });
        match listed {
            Ok(()) | Err(Failure::Stopped) => {}
            Err(e) => crate::log(&format!("collecting orphaned chunks failed: {e}")),
        }
        if removed > 0 {
            crate::log(&format!(
                "removed {removed} orphaned chunk objects (uploaded for generation {} or \
                 before, named by no manifest)",
                claimed.generation
            ));
        }
    }

    /// Uploads until the log is empty or `bound` has passed (a clean
    /// detach: the next daemon, maybe on another host, then needs no log).
    fn upload_all(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        let mut log = self.log.lock();
        log.drain = true;
        self.wake.notify_all();
        while !log.extents.is_empty() {
            if self.room.wait_until(&mut log, deadline).timed_out() {
                crate::log(&format!(
                    "detaching with {} bytes of the log not yet in S3; the next daemon on {} \
                     replays them",
                    log.wal.bytes(),
                    self.vol.cache_dir.display()
                ));
                return;
            }
        }
        crate::log("every write is in S3");
    }
}
