//! `--metrics-listen`: a minimal HTTP/1.x server for `GET /metrics`, one
//! thread, no runtime. Every connection is bounded (its request's size,
//! its time, how many are open at once), so a bad or slow client gets an
//! error or is dropped, and never holds up the broker or other scrapers.
//! A scrape takes the export locks only to copy counters
//! (`Broker::metrics`).

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest request head (request line and headers) read.
pub const MAX_REQUEST: usize = 8 * 1024;
/// How long a connection may take to send its request and read the answer.
pub const CONNECTION_TIME: Duration = Duration::from_secs(10);

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Ask {
    Metrics { head_only: bool },
    Index { head_only: bool },
    NotFound,
    BadMethod,
    Bad,
}

/// Parses a request head (up to and without the blank line).
pub fn parse(head: &[u8]) -> Ask {
    let Ok(head) = std::str::from_utf8(head) else {
        return Ask::Bad;
    };
    let line = head.lines().next().unwrap_or_default();
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Ask::Bad;
    };
    if !matches!(version, "HTTP/1.0" | "HTTP/1.1") || !target.starts_with('/') {
        return Ask::Bad;
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Ask::BadMethod,
    };
    let path = target.split('?').next().unwrap_or_default();
    match path {
        "/metrics" => Ask::Metrics { head_only },
        "/" => Ask::Index { head_only },
        _ => Ask::NotFound,
    }
}

/// The whole response to `ask`; `scrape` renders the metrics.
pub fn respond(ask: &Ask, scrape: &dyn Fn() -> String) -> Vec<u8> {
    const TEXT: &str = "text/plain; charset=utf-8";
    let (status, kind, body, head_only) = match ask {
        Ask::Metrics { head_only } => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            scrape(),
            *head_only,
        ),
        Ask::Index { head_only } => (
            "200 OK",
            TEXT,
            "holdfast broker: metrics at /metrics\n".to_owned(),
            *head_only,
        ),
        Ask::NotFound => (
            "404 Not Found",
            TEXT,
            "only /metrics is here\n".into(),
            false,
        ),
        Ask::BadMethod => (
            "405 Method Not Allowed",
            TEXT,
            "only GET and HEAD\n".into(),
            false,
        ),
        Ask::Bad => ("400 Bad Request", TEXT, "bad HTTP request\n".into(), false),
    };
    reply(status, kind, &body, head_only)
}

fn reply(status: &str, kind: &str, body: &str, head_only: bool) -> Vec<u8> {
    let allow = if status.starts_with("405") {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

struct Connection {
    stream: TcpStream,
    head: Vec<u8>,
    /// The response, once the request head is in, and how much is sent.
    out: Option<(Vec<u8>, usize)>,
    deadline: Instant,
}

/// What became of a connection after it was ready.
enum Next {
    Keep,
    Close,
}

impl Connection {
    fn read(&mut self, scrape: &dyn Fn() -> String) -> Next {
        let mut buf = [0u8; 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Next::Close,
                Ok(n) => {
                    self.head
                        .extend_from_slice(buf.get(..n).unwrap_or_default());
                    if let Some(end) = self.head.windows(4).position(|w| w == b"\r\n\r\n") {
                        let ask = parse(self.head.get(..end).unwrap_or_default());
                        self.out = Some((respond(&ask, scrape), 0));
                        return self.write();
                    }
                    if self.head.len() > MAX_REQUEST {
                        let out = reply(
                            "431 Request Header Fields Too Large",
                            "text/plain",
                            "request head too large\n",
                            false,
                        );
                        self.out = Some((out, 0));
                        return self.write();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
    }

    fn write(&mut self) -> Next {
        let Some((out, sent)) = &mut self.out else {
            return Next::Keep;
        };
        while let Some(rest) = out.get(*sent..).filter(|r| !r.is_empty()) {
            match self.stream.write(rest) {
                Ok(0) => return Next::Close,
                Ok(n) => *sent = sent.saturating_add(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
        Next::Close
    }

    fn ready(&mut self, scrape: &dyn Fn() -> String) -> Next {
        if self.out.is_some() {
            self.write()
        } else {
            self.read(scrape)
        }
    }
}

/// Binds `addr` for [`serve`]; the error names the address.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    let l = TcpListener::bind(addr).map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("--metrics-listen {addr}: {e}"))?;
    Ok(l)
}

/// Serves scrapes on `listener` for ever.
pub fn serve(listener: TcpListener, scrape: &dyn Fn() -> String) {
    let mut conns: Vec<Connection> = Vec::new();
    loop {
        let now = Instant::now();
        conns.retain(|c| c.deadline > now);
        let accepting = conns.len() < MAX_CONNECTIONS;
        let wait = conns
            .iter()
            .map(|c| c.deadline.saturating_duration_since(now))
            .min()
            .unwrap_or(CONNECTION_TIME);
        let ready = match poll(&listener, &conns, accepting, wait) {
            Ok(r) => r,
            Err(e) => {
                crate::warn!("metrics: poll: {e}; the listener stops");
                return;
            }
        };
        let mut keep = Vec::with_capacity(conns.len());
        for (mut c, ready) in conns.drain(..).zip(ready.conns) {
            if !ready || matches!(c.ready(scrape), Next::Keep) {
                keep.push(c);
            }
        }
        conns = keep;
        if ready.listener {
            accept(&listener, &mut conns, scrape);
        }
    }
}

fn accept(listener: &TcpListener, conns: &mut Vec<Connection>, scrape: &dyn Fn() -> String) {
    while conns.len() < MAX_CONNECTIONS {
        match listener.accept() {
            Ok((stream, _)) => {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                let mut c = Connection {
                    stream,
                    head: Vec::new(),
                    out: None,
                    deadline: Instant::now() + CONNECTION_TIME,
                };
                if matches!(c.ready(scrape), Next::Keep) {
                    conns.push(c);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // WouldBlock, or out of descriptors: poll again later.
            Err(_) => return,
        }
    }
}

struct Ready {
    listener: bool,
    conns: Vec<bool>,
}

fn poll(
    listener: &TcpListener,
    conns: &[Connection],
    accepting: bool,
    wait: Duration,
) -> io::Result<Ready> {
    let mut fds = Vec::with_capacity(conns.len().saturating_add(1));
    let listen_events = if accepting {
        PollFlags::IN
    } else {
        PollFlags::empty()
    };
    fds.push(PollFd::new(listener, listen_events));
    for c in conns {
        let events = if c.out.is_some() {
            PollFlags::OUT
        } else {
            PollFlags::IN
        };
        fds.push(PollFd::from_borrowed_fd(c.stream.as_fd(), events));
    }
    let ts = Timespec {
        tv_sec: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(wait.subsec_nanos()),
    };
    match rustix::event::poll(&mut fds, Some(&ts)) {
        Ok(_) => {}
        Err(rustix::io::Errno::INTR) => {
            return Ok(Ready {
                listener: false,
                conns: vec![false; conns.len()],
            });
        }
        Err(e) => return Err(e.into()),
    }
    let mut ready = fds.iter().map(|p| !p.revents().is_empty());
    Ok(Ready {
        listener: ready.next().unwrap_or(false),
        conns: ready.collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        let m = |s: &str| parse(s.as_bytes());
        assert_eq!(
            m("GET /metrics HTTP/1.1\r\nHost: x"),
            Ask::Metrics { head_only: false }
        );
        assert_eq!(
            m("HEAD /metrics?x=1 HTTP/1.0"),
            Ask::Metrics { head_only: true }
        );
        assert_eq!(m("GET / HTTP/1.1"), Ask::Index { head_only: false });
        assert_eq!(m("GET /other HTTP/1.1"), Ask::NotFound);
        assert_eq!(m("POST /metrics HTTP/1.1"), Ask::BadMethod);
        assert_eq!(m("GET /metrics"), Ask::Bad);
        assert_eq!(m("GET /metrics HTTP/2"), Ask::Bad);
        assert_eq!(m("GET metrics HTTP/1.1"), Ask::Bad);
        assert_eq!(m("GET  /metrics HTTP/1.1"), Ask::Bad);
        assert_eq!(parse(b"\xff\xfe"), Ask::Bad);
    }

    #[test]
    fn responses_say_their_length() {
        let out = respond(&Ask::Metrics { head_only: false }, &|| "a 1\n".into());
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(text.contains("Content-Length: 4\r\n"));
        assert!(text.ends_with("\r\n\r\na 1\n"));
        let head = respond(&Ask::Metrics { head_only: true }, &|| "a 1\n".into());
        assert!(String::from_utf8(head).unwrap().ends_with("\r\n\r\n"));
        let bad = String::from_utf8(respond(&Ask::BadMethod, &String::new)).unwrap();
        assert!(bad.contains("405") && bad.contains("Allow: GET, HEAD"));
    }

    /// A real server on a loopback port: a scrape, a bad request, a slow
    /// client that does not hold up the next one, an oversized head.
    #[test]
    fn serves_scrapes_and_refuses_bad_requests() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || serve(listener, &|| "holdfast_up 1\n".into()));
        let ask = |req: &[u8]| {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(req).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        };
        // Held open without a request: the others are still served.
        let _slow: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let ok = ask(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.ends_with("holdfast_up 1\n"), "{ok}");
        assert!(ask(b"BREW /pot HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        assert!(ask(b"nonsense\r\n\r\n").starts_with("HTTP/1.1 400"));
        // Exactly one byte too many: the server reads all of it, so its
        // close after the answer is not a reset.
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        big.resize(MAX_REQUEST + 1, b'x');
        assert!(ask(&big).starts_with("HTTP/1.1 431"));
    }
}
