//! Command-line behaviour of holdfast-daemon. (Also makes `cargo test` build
//! the binary for the cross-process tests in tests/.)
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn daemon(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_holdfast-daemon"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help_lists_backends() {
    let o = daemon(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("file:PATH") && text.contains("mem") && text.contains("--takeover"));
}

#[test]
fn bad_arguments_exit_2_with_a_reason() {
    let cases: &[(&[&str], &str)] = &[
        (&["--backend", "mem"], "--export NAME is required"),
        (&["--export", "vol0"], "--backend SPEC is required"),
        (
            &["--export", "vol0", "--backend", "nfs://x"],
            "unknown backend",
        ),
        (
            &["--export", "vol0", "--backend", "s3://x"],
            "bucket names are 3 to 63",
        ),
        (&["--export", "../x", "--backend", "mem"], "--export"),
        (
            &["--export", "v", "--backend", "mem", "--workers", "0"],
            "--workers",
        ),
        (
            &["--export", "v", "--backend", "mem", "--poll-us", "2000000"],
            "--poll-us must be at most",
        ),
        (
            &["--export", "v", "--backend", "mem", "--poll-us", "soon"],
            "--poll-us \"soon\": expected a number",
        ),
    ];
    for (args, want) in cases {
        let o = daemon(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn a_missing_broker_is_a_clear_error() {
    let o = daemon(&[
        "--socket",
        "/nonexistent/sock",
        "--export",
        "vol0",
        "--backend",
        "mem",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot connect to /nonexistent/sock"), "{err}");
}
