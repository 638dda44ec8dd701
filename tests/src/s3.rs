//! An S3 server for the s3:// backend's tests: moto's, started on
//! 127.0.0.1 for one test and killed (by pid) with it. `tests/setup-moto`
//! installs it; `HOLDFAST_MOTO_VENV` names another virtual environment.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{Proc, Scratch};

/// A manifest's fields (name, value) and its chunk keys, in order.
pub type ManifestView = (Vec<(String, String)>, Vec<String>);

pub struct Moto {
    pub endpoint: String,
    addr: String,
    pub proc: Proc,
}

/// A program of the virtual environment tests/setup-moto installs (moto's
/// server, the python3 with prometheus_client).
pub fn venv_bin(name: &str) -> PathBuf {
    let venv =
        std::env::var_os("HOLDFAST_MOTO_VENV").unwrap_or_else(|| "/opt/holdfast-moto".into());
    let bin = PathBuf::from(venv).join("bin").join(name);
    assert!(
        bin.exists(),
        "{} is missing: run tests/setup-moto (.ci/run does)",
        bin.display()
    );
    bin
}

/// An HTTP/1.0 request (no chunked replies); returns the status and body.
/// moto does not check signatures, but refuses anonymous reads of objects
/// a signed request wrote: the Authorization header names a user.
fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential=holdfast-test/20260101/us-east-1/s3/\
         aws4_request, SignedHeaders=host, Signature=00\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut reply = Vec::new();
    s.read_to_end(&mut reply)?;
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no HTTP header end"))?;
    let head = String::from_utf8_lossy(&reply[..split]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line: {head}")))?;
    Ok((status, reply[split + 4..].to_vec()))
}

impl Moto {
    /// Starts moto's server on a free port and waits until it answers.
    pub fn start(scratch: &Scratch) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(venv_bin("moto_server"));
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        let mut proc = scratch.spawn(&mut cmd, "moto.log");
        let addr = format!("127.0.0.1:{port}");
        let end = Instant::now() + Duration::from_secs(30);
        while http(&addr, "GET", "/", &[]).is_err() {
            assert!(
                proc.is_running() && Instant::now() < end,
                "moto_server did not come up:\n{}",
                proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self {
            endpoint: format!("http://{addr}"),
            addr,
            proc,
        }
    }

    pub fn create_bucket(&self, bucket: &str) {
        let (status, body) = http(&self.addr, "PUT", &format!("/{bucket}"), &[]).unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }

    /// Writes object `key` of `bucket`.
    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) {
        let (status, body) = http(&self.addr, "PUT", &format!("/{bucket}/{key}"), data).unwrap();
        assert_eq!(status, 200, "PUT {key}: {}", String::from_utf8_lossy(&body));
    }

    /// The object `key` of `bucket`, if there is one.
    pub fn get(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        let (status, body) = http(&self.addr, "GET", &format!("/{bucket}/{key}"), &[]).unwrap();
        match status {
            200 => Some(body),
            404 => None,
            s => panic!("GET {key}: HTTP {s}: {}", String::from_utf8_lossy(&body)),
        }
    }

    /// The keys of `bucket` under `prefix` (up to a thousand).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (status, body) = http(
            &self.addr,
            "GET",
            &format!("/{bucket}?list-type=2&prefix={prefix}"),
            &[],
        )
        .unwrap();
        assert_eq!(status, 200);
        let text = String::from_utf8_lossy(&body);
        text.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_owned)
            .collect()
    }

    /// The manifest's fields (`generation`, `owner`, ...) and its chunk keys.
    pub fn manifest(&self, bucket: &str, prefix: &str) -> Option<ManifestView> {
        let body = self.get(bucket, &format!("{prefix}/manifest"))?;
        let text = String::from_utf8(body).unwrap();
        let mut fields = Vec::new();
        let mut chunks = Vec::new();
        for line in text.lines().skip(1) {
            let (k, v) = line.split_once(' ').unwrap();
            if k == "chunk" {
                chunks.push(v.split(' ').nth(1).unwrap().to_owned());
            } else {
                fields.push((k.to_owned(), v.to_owned()));
            }
        }
        Some((fields, chunks))
    }

    /// The manifest's generation (0 without one).
    pub fn generation(&self, bucket: &str, prefix: &str) -> u64 {
        self.manifest(bucket, prefix).map_or(0, |(f, _)| {
            f.iter()
                .find(|(k, _)| k == "generation")
                .unwrap()
                .1
                .parse()
                .unwrap()
        })
    }

    /// Stops (SIGSTOP) or resumes (SIGCONT) the server: requests then hang,
    /// as with a store that stopped answering.
    pub fn pause(&self, stop: bool) {
        self.proc
            .signal(if stop { libc::SIGSTOP } else { libc::SIGCONT });
    }
}

/// Sets a daemon's environment for moto: static credentials and region,
/// and no instance metadata look-ups.
pub fn s3_env(cmd: &mut Command) -> &mut Command {
    cmd.env("AWS_ACCESS_KEY_ID", "holdfast-test")
        .env("AWS_SECRET_ACCESS_KEY", "holdfast-test")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
}

/// A request as the fault proxy sees it.
#[derive(Debug, Clone)]
pub struct ProxyRequest {
    pub method: String,
    /// The path and query, `/BUCKET/KEY?...`.
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl ProxyRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// What the fault proxy does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwards it and passes the answer on.
    Pass,
    /// Answers with this HTTP status (an S3 error), forwarding nothing.
    Refuse(u16),
    /// Forwards it (the store applies it), then answers 500 instead.
    ApplyThenFail,
    /// Forwards it without If-Match and If-None-Match: a store that ignores
    /// conditional writes.
    DropConditions,
    /// Forwards it and passes the answer on with its ETag unquoted: a store
    /// whose ETags in PUT answers differ in form from what If-Match takes.
    UnquoteEtag,
}

/// An HTTP proxy in front of moto that injects faults, chosen per request
/// by a rule; for the s3 backend's tests of a misbehaving store.
pub struct FaultProxy {
    pub endpoint: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

type Rule = dyn Fn(&ProxyRequest) -> Fault + Send + Sync;

impl FaultProxy {
    pub fn start(
        moto: &Moto,
        rule: impl Fn(&ProxyRequest) -> Fault + Send + Sync + 'static,
    ) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let rule: std::sync::Arc<Rule> = std::sync::Arc::new(rule);
        let (upstream, halt) = (moto.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            while !halt.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let (upstream, rule) = (upstream.clone(), rule.clone());
                        std::thread::spawn(move || {
                            let _ = proxy_connection(client, &upstream, &*rule);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { endpoint, stop }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An HTTP message's first line and its headers.
type Head = (String, Vec<(String, String)>);
/// An HTTP answer's status, headers and body.
type Answer = (u16, Vec<(String, String)>, Vec<u8>);

/// Reads an HTTP message's head (up to the blank line) from `r`; `None` at
/// a clean end of the connection.
fn read_head(r: &mut impl std::io::BufRead) -> std::io::Result<Option<Head>> {
    let mut first = String::new();
    if r.read_line(&mut first)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    Ok(Some((first.trim_end().to_owned(), headers)))
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Reads a body framed by Content-Length, or chunked, or (a response to a
/// `Connection: close` request) by the end of the stream.
fn read_body(
    r: &mut impl std::io::BufRead,
    headers: &[(String, String)],
    to_end: bool,
) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if header(headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                return Ok(body);
            }
            body.extend_from_slice(&chunk[..n]);
        }
    }
    match header(headers, "content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(n) => {
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        None if to_end => {
            r.read_to_end(&mut body)?;
        }
        None => {}
    }
    Ok(body)
}

/// Serves one client connection (keep-alive), each request by the rule.
fn proxy_connection(client: TcpStream, upstream: &str, rule: &Rule) -> std::io::Result<()> {
    let mut reader = std::io::BufReader::new(client.try_clone()?);
    let mut writer = client;
    while let Some((line, mut headers)) = read_head(&mut reader)? {
        if header(&headers, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            headers.retain(|(k, _)| !k.eq_ignore_ascii_case("expect"));
        }
        let body = read_body(&mut reader, &headers, false)?;
        let mut parts = line.split(' ');
        let req = ProxyRequest {
            method: parts.next().unwrap_or_default().to_owned(),
            path: parts.next().unwrap_or_default().to_owned(),
            headers: headers.clone(),
        };
        let fault = rule(&req);
        let (status, mut resp_headers, resp_body) = match fault {
            Fault::Refuse(status) => (status, Vec::new(), s3_error(status)),
            _ => {
                if fault == Fault::DropConditions {
                    headers.retain(|(k, _)| {
                        !k.eq_ignore_ascii_case("if-match")
                            && !k.eq_ignore_ascii_case("if-none-match")
                    });
                }
                let (status, h, b) = forward(upstream, &line, &headers, &body, &req.method)?;
                match fault {
                    Fault::ApplyThenFail => (500, Vec::new(), s3_error(500)),
                    _ => (status, h, b),
                }
            }
        };
        if fault == Fault::UnquoteEtag {
            for (k, v) in &mut resp_headers {
                if k.eq_ignore_ascii_case("etag") {
                    *v = v.trim_matches('"').to_owned();
                }
            }
        }
        let head_only = req.method == "HEAD";
        let length = if head_only {
            header(&resp_headers, "content-length")
                .unwrap_or("0")
                .to_owned()
        } else {
            resp_body.len().to_string()
        };
        write!(writer, "HTTP/1.1 {status} X\r\n")?;
        for (k, v) in &resp_headers {
            let skip = ["content-length", "transfer-encoding", "connection"];
            if !skip.iter().any(|s| k.eq_ignore_ascii_case(s)) {
                write!(writer, "{k}: {v}\r\n")?;
            }
        }
        write!(
            writer,
            "Content-Length: {length}\r\nConnection: keep-alive\r\n\r\n"
        )?;
        if !head_only {
            writer.write_all(&resp_body)?;
        }
        writer.flush()?;
    }
    Ok(())
}

/// Sends one request to moto (its own connection, closed after) and reads
/// the whole answer.
fn forward(
    upstream: &str,
    line: &str,
    headers: &[(String, String)],
    body: &[u8],
    method: &str,
) -> std::io::Result<Answer> {
    let mut s = TcpStream::connect(upstream)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(s, "{line}\r\n")?;
    for (k, v) in headers {
        if !k.eq_ignore_ascii_case("connection") {
            write!(s, "{k}: {v}\r\n")?;
        }
    }
    write!(s, "Connection: close\r\n\r\n")?;
    s.write_all(body)?;
    let mut r = std::io::BufReader::new(s);
    let (status_line, h) = read_head(&mut r)?.ok_or_else(|| std::io::Error::other("no answer"))?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {status_line:?}")))?;
    let b = if method == "HEAD" {
        Vec::new()
    } else {
        read_body(&mut r, &h, true)?
    };
    Ok((status, h, b))
}

fn s3_error(status: u16) -> Vec<u8> {
    let code = match status {
        403 => "AccessDenied",
        412 => "PreconditionFailed",
        _ => "InternalError",
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>injected by the test's fault proxy</Message></Error>"
    )
    .into_bytes()
}
