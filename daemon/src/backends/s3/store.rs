//! The S3 side: a thin blocking wrapper over aws-sdk-s3 (on a small tokio
//! runtime of its own) that speaks in the backend's terms, conditional
//! manifest writes, immutable chunk objects and ranged reads, and retries
//! with capped exponential backoff. The SDK's own retries are off, so that
//! every failure is seen, counted and logged here.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use parking_lot::Mutex;

/// How an S3 call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// 404: no such object.
    NotFound,
    /// 412: a conditional write's condition does not hold.
    Precondition,
    /// Worth retrying: 5xx, 408, 409 (a conditional write raced), 429,
    /// timeouts, connection errors.
    Transient(String),
    /// Retrying will not help by itself (no such bucket, access denied).
    Permanent(String),
    /// The caller asked the retries to stop.
    Stopped,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotFound => f.write_str("no such object"),
            Self::Precondition => f.write_str("the condition of a conditional write failed"),
            Self::Transient(s) | Self::Permanent(s) => f.write_str(s),
            Self::Stopped => f.write_str("stopped"),
        }
    }
}

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    e: SdkError<E, HttpResponse>,
) -> Failure {
    let status = e.raw_response().map(|r| r.status().as_u16());
    let code = e.code().unwrap_or_default().to_string();
    let text = format!("{}", DisplayErrorContext(&e));
    match status {
        Some(404) if code == "NoSuchBucket" => {
            Failure::Permanent(format!("the bucket does not exist: {text}"))
        }
        Some(404) => Failure::NotFound,
        Some(412) => Failure::Precondition,
        Some(s) if matches!(s, 408 | 409 | 429) || s >= 500 => {
            Failure::Transient(format!("HTTP {s}: {text}"))
        }
        Some(s) => Failure::Permanent(format!("HTTP {s}: {text}")),
        None => match e {
            SdkError::ConstructionFailure(_) => Failure::Permanent(text),
            _ => Failure::Transient(text),
        },
    }
}

/// How long to keep retrying.
#[derive(Clone, Copy)]
pub enum Patience<'a> {
    /// Transient failures until this long has passed (checks at start).
    For(Duration),
    /// Every failure until the flag is set (the log holds the data
    /// meanwhile, so giving up would gain nothing).
    UntilStopped(&'a AtomicBool),
    /// Transient failures until the flag is set (housekeeping: a store
    /// that refuses it, say for want of a permission, ends it at once).
    WhileTransient(&'a AtomicBool),
}

impl<'a> Patience<'a> {
    /// The flag that stops the retries and cancels an attempt in flight.
    fn stop(self) -> Option<&'a AtomicBool> {
        match self {
            Self::For(_) => None,
            Self::UntilStopped(stop) | Self::WhileTransient(stop) => Some(stop),
        }
    }
}

pub struct Store {
    rt: tokio::runtime::Runtime,
    client: Client,
    bucket: String,
    /// Ends in '/' unless empty.
    prefix: String,
    /// Failed attempts so far (a metric for progress lines).
    pub failures: AtomicU64,
    /// When the last failure was logged, to log at most one a few seconds.
    last_logged: Mutex<Option<Instant>>,
}

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
const LOG_EVERY: Duration = Duration::from_secs(5);
/// How often an attempt in flight checks whether it should stop.
const STOP_POLL: Duration = Duration::from_millis(10);

impl Store {
    /// A client with the standard credential and region chains (region
    /// us-east-1 if none is set); with `endpoint`, path-style addressing
    /// for an S3-compatible store.
    pub fn new(bucket: &str, prefix: &str, endpoint: Option<&str>) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("holdfast-s3")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the S3 runtime: {e}"))?;
        let client = rt.block_on(async {
            let region = RegionProviderChain::default_provider().or_else("us-east-1");
            let mut loader = aws_config::defaults(BehaviorVersion::latest())
                .region(region)
                .retry_config(RetryConfig::disabled())
                .timeout_config(
                    TimeoutConfig::builder()
                        .connect_timeout(Duration::from_secs(5))
                        .operation_attempt_timeout(Duration::from_secs(60))
                        .build(),
                );
            if let Some(url) = endpoint {
                loader = loader.endpoint_url(url);
            }
            let shared = loader.load().await;
            let conf = aws_sdk_s3::config::Builder::from(&shared)
                .force_path_style(endpoint.is_some())
                // Plain PUTs: S3-compatible stores do not all take the
                // trailing checksums of aws-chunked uploads.
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
                .build();
            Client::from_conf(conf)
        });
        let prefix = match prefix {
            "" => String::new(),
            p if p.ends_with('/') => p.to_string(),
            p => format!("{p}/"),
        };
        Ok(Self {
            rt,
            client,
            bucket: bucket.to_string(),
            prefix,
            failures: AtomicU64::new(0),
            last_logged: Mutex::new(None),
        })
    }

    /// Where the volume lives, for messages.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Runs `attempt` until it succeeds, fails for good, or `patience`
    /// runs out.
    fn retry<T>(
        &self,
        what: &str,
        patience: Patience<'_>,
        attempt: impl AsyncFn() -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let start = Instant::now();
        let mut backoff = BACKOFF_MIN;
        let mut failed = 0u32;
        self.rt.block_on(async {
            loop {
                let err = match self.attempt(&attempt, patience).await {
                    Ok(v) => {
                        if failed > 0 {
                            crate::log(&format!("S3: {what} succeeded after {failed} failures"));
                        }
                        return Ok(v);
                    }
                    Err(e @ (Failure::NotFound | Failure::Precondition | Failure::Stopped)) => {
                        return Err(e);
                    }
                    Err(e) => e,
                };
                failed += 1;
                self.failures.fetch_add(1, Ordering::Relaxed);
                let give_up = match patience {
                    Patience::For(d) => {
                        matches!(err, Failure::Permanent(_)) || start.elapsed() + backoff > d
                    }
                    Patience::UntilStopped(stop) => stop.load(Ordering::SeqCst),
                    Patience::WhileTransient(stop) => {
                        matches!(err, Failure::Permanent(_)) || stop.load(Ordering::SeqCst)
                    }
                };
                if give_up {
                    return Err(err);
                }
                let tell = {
                    let now = Instant::now();
                    let mut last = self.last_logged.lock();
                    let tell = last.is_none_or(|t| now.duration_since(t) >= LOG_EVERY);
                    if tell {
                        *last = Some(now);
                    }
                    tell
                };
                if tell {
                    crate::log(&format!(
                        "S3: {what} failed ({failed} so far, retrying): {err}"
                    ));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                if let Some(stop) = patience.stop()
                    && stop.load(Ordering::SeqCst)
                {
                    return Err(Failure::Stopped);
                }
            }
        })
    }

    /// One attempt; with a stop flag, dropped (the request cancelled) once
    /// the flag is set, so that a handoff or a stop never waits out
    /// an upload or a store that does not answer.
    async fn attempt<T>(
        &self,
        attempt: &impl AsyncFn() -> Result<T, Failure>,
        patience: Patience<'_>,
    ) -> Result<T, Failure> {
        let Some(stop) = patience.stop() else {
            return attempt().await;
        };
        let mut call = std::pin::pin!(attempt());
        loop {
            if stop.load(Ordering::SeqCst) {
                return Err(Failure::Stopped);
            }
            if let Ok(result) = tokio::time::timeout(STOP_POLL, &mut call).await {
                return result;
            }
        }
    }

    /// The object `name` (or `len` bytes of it from `offset`) and its ETag.
    fn fetch(
        &self,
        name: &str,
        range: Option<(u64, u64)>,
        patience: Patience<'_>,
    ) -> Result<(Bytes, String), Failure> {
        let key = self.key(name);
        let header = range.map(|(offset, len)| format!("bytes={offset}-{}", offset + len - 1));
        self.retry(&format!("GET {key}"), patience, async || {
            let out = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(&key)
                .set_range(header.clone())
                .send()
                .await
                .map_err(classify)?;
            let etag = out.e_tag().unwrap_or_default().to_string();
            let body = out
                .body
                .collect()
                .await
                .map_err(|e| Failure::Transient(format!("reading {key}: {e}")))?
                .into_bytes();
            if let Some((offset, len)) = range
                && body.len() as u64 != len
            {
                return Err(Failure::Permanent(format!(
                    "{key}: asked for {len} bytes at {offset}, got {}",
                    body.len()
                )));
            }
            Ok((body, etag))
        })
    }

    /// The object `name` and its ETag.
    pub fn get(&self, name: &str, patience: Patience<'_>) -> Result<(Bytes, String), Failure> {
        self.fetch(name, None, patience)
    }

    /// `len` bytes of object `name` from `offset`.
    pub fn get_range(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        patience: Patience<'_>,
    ) -> Result<Bytes, Failure> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        Ok(self.fetch(name, Some((offset, len)), patience)?.0)
    }

    /// Writes object `name` if `cond` holds: `IfMatch(etag)`, or
    /// `IfNoneMatch` (only if there is none). Returns the new ETag.
    pub fn put(
        &self,
        name: &str,
        body: &Bytes,
        cond: Condition<'_>,
        patience: Patience<'_>,
    ) -> Result<String, Failure> {
        let key = self.key(name);
        self.retry(&format!("PUT {key}"), patience, async || {
            let req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(&key)
                // A clone of Bytes shares the buffer: no copy per attempt.
                .body(ByteStream::from(body.clone()));
            let req = match cond {
                Condition::IfMatch(etag) => req.if_match(etag),
                Condition::IfNoneMatch => req.if_none_match("*"),
            };
            let out = req.send().await.map_err(classify)?;
            Ok(out.e_tag().unwrap_or_default().to_string())
        })
    }

    /// The names of the objects under `under` (itself under the prefix),
    /// a page (up to a thousand) at a time, passed to `page`.
    pub fn list(
        &self,
        under: &str,
        patience: Patience<'_>,
        mut page: impl FnMut(Vec<String>) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        let prefix = self.key(under);
        let mut token: Option<String> = None;
        loop {
            let (names, next) = self.retry(&format!("LIST {prefix}"), patience, async || {
                let out = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(&prefix)
                    .set_continuation_token(token.clone())
                    .send()
                    .await
                    .map_err(classify)?;
                let names = out
                    .contents()
                    .iter()
                    .filter_map(|o| o.key()?.strip_prefix(&self.prefix))
                    .map(str::to_owned)
                    .collect::<Vec<_>>();
                Ok((names, out.next_continuation_token().map(str::to_owned)))
            })?;
            page(names)?;
            match next {
                Some(t) => token = Some(t),
                None => return Ok(()),
            }
        }
    }

    /// Deletes object `name` (a chunk no manifest names any more).
    pub fn delete(&self, name: &str, patience: Patience<'_>) -> Result<(), Failure> {
        let key = self.key(name);
        self.retry(&format!("DELETE {key}"), patience, async || {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(&key)
                .send()
                .await
                .map_err(classify)?;
            Ok(())
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Condition<'a> {
    IfMatch(&'a str),
    IfNoneMatch,
}
