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

fn moto_server() -> PathBuf {
    let venv =
        std::env::var_os("HOLDFAST_MOTO_VENV").unwrap_or_else(|| "/opt/holdfast-moto".into());
    let bin = PathBuf::from(venv).join("bin/moto_server");
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
        let mut cmd = Command::new(moto_server());
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
