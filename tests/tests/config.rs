//! `holdfast-broker --config FILE`: a broker started from the file serves
//! its exports and supervises their daemons; `holdfastctl export add
//! --daemon` and `export rm` keep the file in step, so a broker started
//! afresh has the same exports and daemons; a bad file is refused with its
//! name, the line and what is wrong.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use holdfast_tests::{AlignedBuf, Broker, BrokerOpts, Scratch, bin, open_direct};

fn daemon_cmd(scratch: &Scratch, export: &str) -> String {
    format!(
        "{} --socket {} --export {export} --backend file:{}",
        bin("holdfast-daemon").display(),
        scratch.path("broker.sock").display(),
        scratch.path(&format!("{export}.img")).display()
    )
}

fn start(scratch: &Scratch, config: &Path) -> Broker {
    let broker = Broker::start(
        scratch,
        BrokerOpts::new(&[])
            .arg("--config")
            .arg(config.to_str().unwrap())
            .arg("--daemon-wait")
            .arg("30s"),
    );
    // The socket of a broker before this one may still be there.
    let end = Instant::now() + Duration::from_secs(15);
    while !broker.ctl(&["status"]).status.success() {
        assert!(
            Instant::now() < end,
            "broker not up:\n{}",
            broker.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    broker
}

/// A process's command line, its arguments joined by spaces.
fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn write_block(broker: &Broker, export: &str, byte: u8) {
    let mut b = AlignedBuf::new(4096);
    b.fill(byte);
    open_direct(&broker.file(export))
        .write_all_at(&b, 8192)
        .unwrap();
}

fn read_block(broker: &Broker, export: &str) -> u8 {
    let mut b = AlignedBuf::new(4096);
    open_direct(&broker.file(export))
        .read_exact_at(&mut b, 8192)
        .unwrap();
    assert!(b.iter().all(|x| *x == b[0]));
    b[0]
}

#[test]
fn exports_and_their_daemons_come_back_from_the_config_file() {
    let scratch = Scratch::new("config", Duration::from_secs(120));
    let config = scratch.path("holdfast.toml");
    std::fs::write(
        &config,
        format!(
            "# written by the test\nrequest_timeout = \"20s\"\n\n\
             [[export]]\nname = \"vol0\"\nsize = \"16MiB\"\nmode = \"relay\"\ndaemon = \"{}\"\n",
            daemon_cmd(&scratch, "vol0")
        ),
    )
    .unwrap();
    let mut broker = start(&scratch, &config);
    broker.wait_active("vol0", 0, Duration::from_secs(15));
    assert_eq!(broker.status("vol0")["mode"], "relay");
    write_block(&broker, "vol0", 0x21);

    // Added at run time, with its daemon: served, and kept in the file.
    let cmd = daemon_cmd(&scratch, "vol1");
    let out = broker.ctl(&["export", "add", "vol1", "16MiB", "--daemon", &cmd]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("kept in {}", config.display())),
        "{said}"
    );
    broker.wait_active("vol1", 0, Duration::from_secs(15));
    write_block(&broker, "vol1", 0x42);
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.starts_with("# written by the test\n"), "{text}");
    assert!(
        text.contains("name = \"vol1\"") && text.contains(&cmd),
        "{text}"
    );

    // Upgraded to another command line: the successor serves, and its
    // command line is the one supervised (a kill restarts it) and kept.
    let (old, epoch) = broker.wait_active("vol0", 0, Duration::from_secs(5));
    let new_cmd = format!("{} --workers 3", daemon_cmd(&scratch, "vol0"));
    let out = broker.ctl(&["upgrade", "vol0", "--cmd", &new_cmd]);
    assert!(out.status.success(), "{out:?}");
    let (pid, epoch) = broker.wait_active("vol0", epoch, Duration::from_secs(15));
    assert_ne!(pid, old);
    assert!(cmdline(pid).contains("--workers 3"), "{}", cmdline(pid));
    let end = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&config).unwrap().contains(&new_cmd) {
        assert!(
            Instant::now() < end,
            "{}",
            std::fs::read_to_string(&config).unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    holdfast_tests::signal_pid(pid, rustix::process::Signal::KILL).unwrap();
    let (pid, _) = broker.wait_active("vol0", epoch, Duration::from_secs(15));
    assert!(cmdline(pid).contains("--workers 3"), "{}", cmdline(pid));

    // A broker started afresh from the file has both, served.
    broker.stop();
    let mut broker = start(&scratch, &config);
    broker.wait_active("vol0", 0, Duration::from_secs(15));
    broker.wait_active("vol1", 0, Duration::from_secs(15));
    assert_eq!(read_block(&broker, "vol0"), 0x21);
    assert_eq!(read_block(&broker, "vol1"), 0x42);

    // Removed: gone from the file too; its supervisor stops.
    let out = broker.ctl(&["export", "rm", "vol1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kept in"),
        "{out:?}"
    );
    assert!(!std::fs::read_to_string(&config).unwrap().contains("vol1"));
    broker.stop();
    let broker = start(&scratch, &config);
    broker.wait_active("vol0", 0, Duration::from_secs(15));
    let out = broker.ctl(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], 1);
    assert_eq!(v["exports"].as_array().unwrap().len(), 1, "{v}");
}

#[test]
fn a_broker_without_a_config_says_its_changes_are_not_kept() {
    let scratch = Scratch::new("config-none", Duration::from_secs(60));
    let broker = Broker::start(&scratch, BrokerOpts::new(&[("vol0", "16MiB")]));
    let out = broker.ctl(&["export", "add", "vol1", "16MiB"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("it has no --config file"),
        "{out:?}"
    );
}

#[test]
fn a_bad_config_file_is_refused_with_its_line() {
    let scratch = Scratch::new("config-bad", Duration::from_secs(30));
    for (text, want) in [
        (
            "request_timeout = \"30s\"\n[[export]]\nname = \"vol0\"\nsize = \"lots\"\n",
            ":4: size:",
        ),
        (
            "\n\nmetrics_lisen = \"127.0.0.1:1\"\n",
            ":3: unknown field `metrics_lisen`",
        ),
        (
            "[[export]]\nname = \"vol0\"\nsize = \"1MiB\"\nmode = \"fast\"\n",
            ":4: mode: \"fast\": direct or relay",
        ),
        ("[[export\n", ":1:"),
    ] {
        let config = scratch.path("bad.toml");
        std::fs::write(&config, text).unwrap();
        let out = Command::new(bin("holdfast-broker"))
            .args(["--socket", scratch.path("bad.sock").to_str().unwrap()])
            .args(["--mountpoint", scratch.path("mnt").to_str().unwrap()])
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {err}");
        assert!(
            err.contains(&format!("{}{want}", config.display())),
            "{text}: want {want:?} in {err}"
        );
    }
}
