//! The broker's metrics as Prometheus's own Python client parses them
//! (tests/parse-metrics, in tests/setup-moto's virtual environment).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Samples by `name{label="value",...}` (labels sorted).
pub type Samples = BTreeMap<String, f64>;

/// Parses `text` with the real parser; panics with its error.
pub fn parse(text: &str) -> Samples {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("parse-metrics");
    let mut child = Command::new(crate::s3::venv_bin("python3"))
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut samples = Samples::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let labels: BTreeMap<String, String> = serde_json::from_value(v["labels"].clone()).unwrap();
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        let key = format!("{}{{{}}}", v["name"].as_str().unwrap(), labels.join(","));
        samples.insert(key, v["value"].as_f64().unwrap());
    }
    samples
}

pub fn get(s: &Samples, key: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("no sample {key}; there are {:?}", s.keys()))
}
