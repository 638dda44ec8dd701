//! Command-line behaviour of holdfast-broker and holdfastctl: help, version,
//! and a clear error with exit status 2 for every bad argument. (Having
//! integration tests here also makes `cargo test` build the binaries that
//! the cross-process tests in tests/ run.)
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn broker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_holdfast-broker"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn help_and_version() {
    let o = broker(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--socket",
        "--mountpoint",
        "--export",
        "--supervise",
        "--request-timeout",
        "--daemon-wait",
        "--recover",
        ",ublk",
        "--metrics-listen",
    ] {
        assert!(text.contains(flag), "--help does not mention {flag}");
    }
    assert!(broker(&["--version"]).status.success());
    let o = Command::new(env!("CARGO_BIN_EXE_holdfastctl"))
        .args(["restore", "--help"])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("--fail-pending"));
}

#[test]
fn bad_arguments_exit_2_with_a_reason() {
    let cases: &[(&[&str], &str)] = &[
        (&["--export", "vol0"], "expected NAME=SIZE"),
        (&["--export", "a/b=1M"], "contains '/'"),
        (&["--export", "v=12X"], "unknown size suffix"),
        (&["--export", "v=1M", "--export", "v=2M"], "given twice"),
        (
            &["--export", "v=1000"],
            "not a whole number of 512-byte blocks",
        ),
        (&["--export", "v=1M,blk"], "unknown option \"blk\""),
        (&["--slots", "3"], "power of two"),
        (
            &["--slots", "4", "--fuse-workers", "4"],
            "larger than --fuse-workers",
        ),
        (&["--fence-timeout", "1e12"], "too large"),
        (&["--request-timeout", "soon"], "not a duration"),
        (&["--socket-mode", "999"], "octal mode"),
        (&["--block-size", "1024"], "512 or 4096"),
        (&["--frobnicate"], "--frobnicate"),
        (&["--metrics-listen", "9464"], "expected ADDRESS:PORT"),
    ];
    for (args, want) in cases {
        let o = broker(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
}
