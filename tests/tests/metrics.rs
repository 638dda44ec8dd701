//! `holdfastctl metrics` and `--metrics-listen`: the text parses with
//! prometheus_client's parser (tests/parse-metrics) and the counters move
//! as they should under writes, a handoff and a daemon kill.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::time::Duration;

use holdfast_tests::prometheus::{Samples, get, parse};
use holdfast_tests::{AlignedBuf, Broker, BrokerOpts, Scratch, bin, open_direct};

/// A scrape over HTTP: the status line and the body.
fn scrape(addr: SocketAddr, request: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

fn ctl_metrics(broker: &Broker) -> Samples {
    let out = broker.ctl(&["metrics"]);
    assert!(out.status.success(), "{out:?}");
    parse(&String::from_utf8(out.stdout).unwrap())
}

fn write_blocks(broker: &Broker, n: u64, byte: u8) {
    let f = open_direct(&broker.file("vol0"));
    let mut b = AlignedBuf::new(4096);
    b.fill(byte);
    for i in 0..n {
        f.write_all_at(&b, i * 4096).unwrap();
    }
}

#[test]
fn metrics_parse_and_move_with_writes_a_handoff_and_a_kill() {
    let scratch = Scratch::new("metrics", Duration::from_secs(120));
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let broker = Broker::start(
        &scratch,
        BrokerOpts::new(&[("vol0", "16MiB,relay"), ("vol1", "16MiB")])
            .arg("--metrics-listen")
            .arg(&addr.to_string())
            .arg("--daemon-wait")
            .arg("30s"),
    );
    let backend = format!("file:{}", scratch.path("vol0.img").display());
    let mut d0 = broker.daemon(&scratch, "vol0", &backend, &[]);
    broker.wait_active("vol0", 0, Duration::from_secs(10));

    let before = ctl_metrics(&broker);
    let v0 = "{export=\"vol0\"}";
    assert_eq!(get(&before, "holdfast_build_info{version=\"0.1.0\"}"), 1.0);
    assert_eq!(get(&before, "holdfast_broker_restarts_total{}"), 0.0);
    assert_eq!(get(&before, &format!("holdfast_daemon_attached{v0}")), 1.0);
    assert_eq!(
        get(&before, "holdfast_daemon_attached{export=\"vol1\"}"),
        0.0
    );
    assert_eq!(
        get(
            &before,
            "holdfast_export_info{export=\"vol0\",frontend=\"fuse\",mode=\"relay\"}"
        ),
        1.0
    );

    // Writes: completed and the latency histogram move together.
    write_blocks(&broker, 64, 0x5a);
    let after = ctl_metrics(&broker);
    let completed = get(&after, &format!("holdfast_requests_completed_total{v0}"));
    assert!(
        completed >= get(&before, &format!("holdfast_requests_completed_total{v0}")) + 64.0,
        "{completed}"
    );
    let latency_count = get(
        &after,
        &format!("holdfast_request_latency_seconds_count{v0}"),
    );
    assert_eq!(latency_count, completed);
    assert_eq!(
        get(
            &after,
            "holdfast_request_latency_seconds_bucket{export=\"vol0\",le=\"+Inf\"}"
        ),
        latency_count
    );
    assert!(get(&after, &format!("holdfast_request_latency_seconds_sum{v0}")) > 0.0);

    // A handoff: one completed, one stall observed.
    let exec = format!(
        "{} --socket {} --export vol0 --backend {backend} 2>>{}",
        bin("holdfast-daemon").display(),
        broker.socket.display(),
        scratch.path("successor.log").display()
    );
    let out = broker.ctl(&["handoff", "vol0", "--exec", &exec]);
    assert!(out.status.success(), "{out:?}");
    // Its phases were printed as they happened.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("handoff armed"), "{err}");
    assert!(d0.wait_timeout(Duration::from_secs(10)).is_some());
    let (successor, _) = broker.wait_active("vol0", 1, Duration::from_secs(10));
    let handed = ctl_metrics(&broker);
    let completed_handoffs = "holdfast_handoffs_total{export=\"vol0\",result=\"completed\"}";
    assert_eq!(get(&handed, completed_handoffs), 1.0);
    assert_eq!(
        get(
            &handed,
            "holdfast_handoffs_total{export=\"vol0\",result=\"aborted\"}"
        ),
        0.0
    );
    assert_eq!(
        get(
            &handed,
            &format!("holdfast_handoff_stall_seconds_count{v0}")
        ),
        1.0
    );
    assert_eq!(
        get(&handed, &format!("holdfast_daemons_lost_total{v0}")),
        0.0
    );

    // A kill while writes wait: a daemon lost, the writes replayed or
    // waiting, then completed by the next daemon.
    holdfast_tests::signal_pid(successor, rustix::process::Signal::KILL).unwrap();
    broker.wait_status("vol0", Duration::from_secs(10), "the daemon lost", |s| {
        s["daemons_lost"] == 1
    });
    let writer = {
        let file = broker.file("vol0");
        std::thread::spawn(move || {
            let f = open_direct(&file);
            let mut b = AlignedBuf::new(4096);
            b.fill(0x77);
            f.write_all_at(&b, 0)
        })
    };
    broker.wait_status("vol0", Duration::from_secs(10), "a pending write", |s| {
        s["pending"].as_u64() > Some(0)
    });
    let waiting = ctl_metrics(&broker);
    assert!(get(&waiting, &format!("holdfast_requests_pending{v0}")) >= 1.0);
    assert_eq!(
        get(&waiting, &format!("holdfast_daemons_lost_total{v0}")),
        1.0
    );
    assert_eq!(get(&waiting, &format!("holdfast_daemon_attached{v0}")), 0.0);
    let _d2 = broker.daemon(&scratch, "vol0", &backend, &[]);
    writer.join().unwrap().unwrap();

    // Over HTTP: the same names, parsed by the same parser; bad requests
    // get their error.
    let (status, body) = scrape(addr, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    let http = parse(&body);
    assert_eq!(get(&http, completed_handoffs), 1.0);
    assert_eq!(get(&http, &format!("holdfast_daemons_lost_total{v0}")), 1.0);
    assert!(get(&http, &format!("holdfast_requests_completed_total{v0}")) > completed);
    assert_eq!(
        http.keys().collect::<Vec<_>>(),
        ctl_metrics(&broker).keys().collect::<Vec<_>>()
    );
    assert_eq!(
        scrape(addr, "GET /nope HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 404 Not Found"
    );
    assert_eq!(
        scrape(addr, "DELETE /metrics HTTP/1.1\r\n\r\n").0,
        "HTTP/1.1 405 Method Not Allowed"
    );
    assert_eq!(
        scrape(addr, "garbage\r\n\r\n").0,
        "HTTP/1.1 400 Bad Request"
    );
}
