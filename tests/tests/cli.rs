//! holdfastctl's and holdfast-broker's command lines, without a broker:
//! usage errors exit 2 with a reason, --version, completions, man pages.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use holdfast_tests::bin;

fn run(binary: &str, args: &[&str]) -> Output {
    Command::new(bin(binary))
        .args(args)
        .env_remove("HOLDFAST_SOCKET")
        .output()
        .unwrap()
}

#[test]
fn every_subcommand_refuses_bad_usage_with_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "Usage"),
        (&["statu"], "similar subcommand exists: 'status'"),
        (&["status", "--force"], "--force"),
        (&["metrics", "vol0"], "unexpected argument"),
        (&["restore"], "<EXPORT>"),
        (&["restore", "a/b"], "contains '/'"),
        (&["handoff"], "<EXPORT>"),
        (
            &["handoff", "vol0", "--timeout", "soon"],
            "is not a duration",
        ),
        (
            &["handoff", "vol0", "--timeout", "0"],
            "give a positive duration",
        ),
        (
            &["handoff", "vol0", "--drain-timeout", "2d"],
            "is not a duration",
        ),
        (
            &["upgrade", "vol0", "--exec", "x"],
            "unexpected argument '--exec'",
        ),
        (&["export"], "Usage"),
        (&["export", "list"], "unrecognized subcommand"),
        (&["export", "add", "vol2"], "<SIZE>"),
        (&["export", "add", "vol2", "1Gx"], "unknown size suffix"),
        (
            &["export", "add", "v", "1M", "--frontend", "nbd"],
            "possible values: fuse, ublk",
        ),
        (
            &["export", "add", "v", "1M", "--direct", "--relay"],
            "cannot be used with",
        ),
        (
            &["export", "add", "v", "1M", "--block", "--frontend", "ublk"],
            "a ublk export is a block device already",
        ),
        (&["export", "rm"], "<NAME>"),
        (
            &["export", "rm", "vol1", "--block"],
            "unexpected argument '--block'",
        ),
        (&["broker"], "Usage"),
        (&["broker", "upgrade", "now"], "unexpected argument"),
        (&["completions", "tcsh"], "invalid value"),
        (&["man"], "<DIR>"),
    ];
    for (args, want) in cases {
        let o = run("holdfastctl", args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
}

#[test]
fn every_subcommand_has_its_own_help() {
    for cmd in [
        "status",
        "metrics",
        "restore",
        "handoff",
        "upgrade",
        "export add",
        "export rm",
        "broker upgrade",
    ] {
        let mut args: Vec<&str> = cmd.split(' ').collect();
        args.push("--help");
        let o = run("holdfastctl", &args);
        assert!(o.status.success(), "{cmd}");
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains(&format!("Usage: holdfastctl {cmd}")),
            "{cmd}: {text}"
        );
    }
}

#[test]
fn a_missing_broker_says_what_to_check() {
    let o = run(
        "holdfastctl",
        &["--socket", "/nonexistent/hf.sock", "status"],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot connect to /nonexistent/hf.sock"),
        "{err}"
    );
    assert!(
        err.contains("holdfast-broker --socket /nonexistent/hf.sock"),
        "{err}"
    );
}

#[test]
fn versions_completions_and_man_pages() {
    for binary in ["holdfastctl", "holdfast-broker", "holdfast-daemon"] {
        let o = run(binary, &["--version"]);
        assert!(o.status.success(), "{binary}");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            out.starts_with(&format!("{binary} {}", env!("CARGO_PKG_VERSION"))),
            "{out}"
        );
    }
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = run("holdfastctl", &["completions", shell]);
        assert!(o.status.success(), "{shell}");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("handoff"),
            "{shell}"
        );
    }
    let dir = std::env::temp_dir().join(format!("hf-man-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let o = run("holdfastctl", &["man", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{o:?}");
    for page in [
        "holdfastctl.1",
        "holdfastctl-handoff.1",
        "holdfastctl-export-add.1",
    ] {
        let text = std::fs::read_to_string(dir.join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
