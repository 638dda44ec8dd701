//! The broker's figures in the Prometheus text exposition format (0.0.4):
//! what `holdfastctl metrics` prints and `--metrics-listen` serves. The
//! request path only adds to counters and histograms it already holds the
//! export's lock for; a scrape copies them (`Export::metrics`) and renders
//! here, outside every lock. README "Metrics" documents every name.

pub mod http;

use std::fmt::Write as _;
use std::time::Duration;

use holdfast_proto::{Figure, FigureKind, Figures, HandoffOutcome};

/// Upper bounds of the histograms' buckets, in microseconds (50 µs to
/// 60 s: a FUSE read from the page cache to a drain bound). Both
/// histograms share them, so they can be compared bucket by bucket.
pub const BOUNDS_US: [u64; 19] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// Counts of durations per bucket (the last one is +Inf) and their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Histogram {
    counts: [u64; BOUNDS_US.len() + 1],
    sum_us: u64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = BOUNDS_US.partition_point(|b| *b < us);
        if let Some(c) = self.counts.get_mut(i) {
            *c = c.saturating_add(1);
        }
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0, |a, c| a.saturating_add(*c))
    }
}

/// Handoffs by how they ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Handoffs {
    pub completed: u64,
    pub dry_run: u64,
    pub aborted: u64,
}

impl Handoffs {
    pub fn count(&mut self, outcome: HandoffOutcome) {
        let n = match outcome {
            HandoffOutcome::Completed => &mut self.completed,
            HandoffOutcome::DryRun => &mut self.dry_run,
            HandoffOutcome::Aborted => &mut self.aborted,
        };
        *n = n.saturating_add(1);
    }
}

/// One export's figures at one moment.
#[derive(Debug, Clone, Default)]
pub struct ExportMetrics {
    pub name: String,
    /// fuse, ublk or cachefiles.
    pub frontend: String,
    /// relay or direct.
    pub mode: String,
    pub daemon_attached: bool,
    pub inflight: u64,
    pub pending: u64,
    pub completed: u64,
    pub failed: u64,
    pub replayed: u64,
    pub rejected: u64,
    pub daemons_lost: u64,
    pub handoffs: Handoffs,
    /// Completed handoffs' stalls.
    pub stall: Histogram,
    /// Relayed requests, from the kernel to the daemon's completion.
    pub latency: Histogram,
    /// What the daemon last reported of its backend.
    pub backend: Figures,
}

/// The broker's figures at one moment.
#[derive(Debug, Clone, Default)]
pub struct BrokerMetrics {
    pub version: String,
    /// Upgrades and restarts after a crash this broker's state went through.
    pub restarts: u64,
    pub exports: Vec<ExportMetrics>,
}

/// A label value: `\`, `"` and newlines escaped (the format's rule).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn head(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One series per export of a counter or gauge.
fn per_export(
    out: &mut String,
    m: &BrokerMetrics,
    (name, kind, help): (&str, &str, &str),
    value: impl Fn(&ExportMetrics) -> u64,
) {
    head(out, name, kind, help);
    for e in &m.exports {
        let _ = writeln!(out, "{name}{{export=\"{}\"}} {}", label(&e.name), value(e));
    }
}

fn seconds(us: u64) -> f64 {
    us as f64 / 1e6
}

fn histogram(
    out: &mut String,
    m: &BrokerMetrics,
    (name, help): (&str, &str),
    of: impl Fn(&ExportMetrics) -> &Histogram,
) {
    head(out, name, "histogram", help);
    for e in &m.exports {
        let h = of(e);
        let export = label(&e.name);
        let mut cumulative = 0u64;
        for (bound, count) in BOUNDS_US.iter().zip(h.counts.iter()) {
            cumulative = cumulative.saturating_add(*count);
            let le = seconds(*bound);
            let _ = writeln!(
                out,
                "{name}_bucket{{export=\"{export}\",le=\"{le}\"}} {cumulative}"
            );
        }
        let total = h.count();
        let sum = seconds(h.sum_us);
        let _ = writeln!(
            out,
            "{name}_bucket{{export=\"{export}\",le=\"+Inf\"}} {total}\n\
             {name}_sum{{export=\"{export}\"}} {sum}\n\
             {name}_count{{export=\"{export}\"}} {total}"
        );
    }
}

/// A counter or gauge per export: name, type, help, value.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ExportMetrics) -> u64,
);

/// The text a scrape gets.
pub fn render(m: &BrokerMetrics) -> String {
    let mut out = String::with_capacity(1024 + m.exports.len() * 6 * 1024);
    head(
        &mut out,
        "holdfast_build_info",
        "gauge",
        "The broker's version (always 1).",
    );
    let _ = writeln!(
        out,
        "holdfast_build_info{{version=\"{}\"}} 1",
        label(&m.version)
    );
    head(
        &mut out,
        "holdfast_broker_restarts_total",
        "counter",
        "Broker upgrades and restarts after a crash that kept the exports.",
    );
    let _ = writeln!(out, "holdfast_broker_restarts_total {}", m.restarts);
    head(
        &mut out,
        "holdfast_export_info",
        "gauge",
        "Each export's frontend and the mode its daemon serves it in (always 1).",
    );
    for e in &m.exports {
        let _ = writeln!(
            out,
            "holdfast_export_info{{export=\"{}\",frontend=\"{}\",mode=\"{}\"}} 1",
            label(&e.name),
            label(&e.frontend),
            label(&e.mode)
        );
    }
    let series: [Series; 8] = [
        (
            "holdfast_daemon_attached",
            "gauge",
            "1 while a daemon is attached to the export (in any state).",
            |e| u64::from(e.daemon_attached),
        ),
        (
            "holdfast_requests_inflight",
            "gauge",
            "Requests the export's daemon holds.",
            |e| e.inflight,
        ),
        (
            "holdfast_requests_pending",
            "gauge",
            "Requests waiting in the broker for a daemon.",
            |e| e.pending,
        ),
        (
            "holdfast_requests_completed_total",
            "counter",
            "Requests completed to the kernel by a daemon.",
            |e| e.completed,
        ),
        (
            "holdfast_requests_failed_total",
            "counter",
            "Requests the broker failed (daemon wait bound, restore --fail-pending, removal).",
            |e| e.failed,
        ),
        (
            "holdfast_requests_replayed_total",
            "counter",
            "Requests replayed to a later daemon after a daemon was lost or handed off.",
            |e| e.replayed,
        ),
        (
            "holdfast_completions_rejected_total",
            "counter",
            "Completions refused as invalid (the daemon is then fenced).",
            |e| e.rejected,
        ),
        (
            "holdfast_daemons_lost_total",
            "counter",
            "Daemons that exited, crashed, hung or were fenced while serving.",
            |e| e.daemons_lost,
        ),
    ];
    for (name, kind, help, value) in &series {
        per_export(&mut out, m, (name, kind, help), value);
    }
    head(
        &mut out,
        "holdfast_handoffs_total",
        "counter",
        "Handoffs by result: completed, dry-run or aborted.",
    );
    for e in &m.exports {
        let h = e.handoffs;
        for (result, n) in [
            (HandoffOutcome::Completed, h.completed),
            (HandoffOutcome::DryRun, h.dry_run),
            (HandoffOutcome::Aborted, h.aborted),
        ] {
            let _ = writeln!(
                out,
                "holdfast_handoffs_total{{export=\"{}\",result=\"{}\"}} {n}",
                label(&e.name),
                result.name()
            );
        }
    }
    histogram(
        &mut out,
        m,
        (
            "holdfast_handoff_stall_seconds",
            "Completed handoffs' stall: from the successor's READY to it serving.",
        ),
        |e| &e.stall,
    );
    histogram(
        &mut out,
        m,
        (
            "holdfast_request_latency_seconds",
            "Relayed requests: from the broker reading them to the daemon's completion.",
        ),
        |e| &e.latency,
    );
    for figure in Figure::ALL {
        backend(&mut out, m, figure);
    }
    out
}

/// `holdfast_backend_*`: a figure daemons report, for the exports whose
/// daemon reported it. Ages (in ms on the wire) are in seconds here.
fn backend(out: &mut String, m: &BrokerMetrics, figure: Figure) {
    let values: Vec<(&str, u64)> = m
        .exports
        .iter()
        .filter_map(|e| Some((e.name.as_str(), e.backend.get(figure)?)))
        .collect();
    if values.is_empty() {
        return;
    }
    let base = figure.name();
    let (name, kind) = match figure.kind() {
        FigureKind::Counter => (format!("holdfast_backend_{base}_total"), "counter"),
        FigureKind::Gauge if figure.is_age() => {
            let base = base.strip_suffix("_ms").unwrap_or(base);
            (format!("holdfast_backend_{base}_seconds"), "gauge")
        }
        FigureKind::Gauge => (format!("holdfast_backend_{base}"), "gauge"),
    };
    head(out, &name, kind, figure.help());
    for (export, v) in values {
        let export = label(export);
        if figure.is_age() {
            let _ = writeln!(out, "{name}{{export=\"{export}\"}} {}", v as f64 / 1e3);
        } else {
            let _ = writeln!(out, "{name}{{export=\"{export}\"}} {v}");
        }
    }
}

/// `text` in parts of at most `max` bytes that end at line ends (a line
/// longer than `max`, which `render` never writes, is a part of its own).
pub fn chunks(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let head = &rest[..rest.floor_char_boundary(max)];
        let cut = if head.len() == rest.len() {
            rest.len()
        } else {
            let line_end = head.rfind('\n').or_else(|| rest.find('\n'));
            line_end.map_or(rest.len(), |i| i + 1)
        };
        let (part, tail) = rest.split_at(cut);
        rest = tail;
        Some(part)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_upper_bounds() {
        let mut h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(51));
        h.observe(Duration::from_secs(3600));
        assert_eq!(h.counts[0], 1);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[BOUNDS_US.len()], 1);
        assert_eq!(h.count(), 3);
        assert_eq!(h.sum_us, 3_600_000_101);
    }

    #[test]
    fn chunks_end_at_line_ends() {
        let text = "a 1\nbb 2\nccc 3\n";
        let parts: Vec<&str> = chunks(text, 9).collect();
        assert_eq!(parts, ["a 1\nbb 2\n", "ccc 3\n"]);
        assert_eq!(chunks(text, 2).collect::<String>(), text);
        assert_eq!(chunks("", 9).count(), 0);
    }

    #[test]
    fn render_names_every_export_and_escapes_labels() {
        let mut e = ExportMetrics {
            name: "vol\"0".into(),
            completed: 7,
            ..Default::default()
        };
        e.latency.observe(Duration::from_millis(2));
        e.handoffs.count(HandoffOutcome::Aborted);
        e.backend
            .set(Figure::LogBytes, 4096)
            .set(Figure::CheckpointAgeMs, 1500)
            .set(Figure::CacheHits, 9);
        let text = render(&BrokerMetrics {
            version: "0.1.0".into(),
            restarts: 2,
            exports: vec![e],
        });
        assert!(text.contains("holdfast_requests_completed_total{export=\"vol\\\"0\"} 7\n"));
        assert!(text.contains("holdfast_broker_restarts_total 2\n"));
        assert!(
            text.contains("holdfast_handoffs_total{export=\"vol\\\"0\",result=\"aborted\"} 1\n")
        );
        assert!(text.contains(
            "holdfast_request_latency_seconds_bucket{export=\"vol\\\"0\",le=\"0.001\"} 0\n"
        ));
        assert!(text.contains(
            "holdfast_request_latency_seconds_bucket{export=\"vol\\\"0\",le=\"0.0025\"} 1\n"
        ));
        assert!(text.contains("holdfast_request_latency_seconds_count{export=\"vol\\\"0\"} 1\n"));
        assert!(text.contains("holdfast_backend_log_bytes{export=\"vol\\\"0\"} 4096\n"));
        assert!(text.contains("# TYPE holdfast_backend_cache_hits_total counter\n"));
        assert!(
            text.contains("holdfast_backend_checkpoint_age_seconds{export=\"vol\\\"0\"} 1.5\n")
        );
        // Figures no daemon reported are left out.
        assert!(!text.contains("holdfast_backend_cache_misses"));
        // Every series line is "name{labels} value" or "name value".
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
