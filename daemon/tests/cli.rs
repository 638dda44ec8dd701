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
        (&["--backend", "mem"], "--export <NAME>"),
        (&["--export", "vol0"], "--backend <SPEC>"),
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
            "2000000 is not in 0..=1000000",
        ),
        (
            &["--export", "v", "--backend", "mem", "--poll-us", "soon"],
            "invalid value 'soon' for '--poll-us <N>'",
        ),
        (
            &[
                "--export",
                "v",
                "--backend",
                "mem",
                "--lease-timeout",
                "forever",
            ],
            "give a positive duration",
        ),
        (
            &[
                "--export",
                "v",
                "--backend",
                "mem",
                "--checkpoint-interval",
                "1s",
            ],
            "--checkpoint-interval is an option of s3:// backends",
        ),
        (
            &[
                "--export",
                "v",
                "--backend",
                "mem",
                "--takeover",
                "--successor",
            ],
            "cannot be used with",
        ),
        (
            &["--export", "v", "--backend", "mem", "--wrokers", "2"],
            "--workers",
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

#[test]
fn version_completions_and_man_page() {
    let o = daemon(&["--version"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("holdfast-daemon "));
    for shell in ["bash", "zsh", "fish"] {
        let o = daemon(&["--completions", shell]);
        assert!(o.status.success(), "{shell}: {o:?}");
        assert!(String::from_utf8_lossy(&o.stdout).contains("holdfast-daemon"));
    }
    let dir = std::env::temp_dir().join(format!("hf-daemon-man-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let o = daemon(&["--man", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    let page = std::fs::read_to_string(dir.join("holdfast-daemon.1")).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
    assert!(page.contains("backend"));
}
