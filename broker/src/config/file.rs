//! `holdfast-broker --config FILE`: the broker's options and exports in
//! TOML, each export with the daemon command line that serves it. Command
//! line flags given with `--config` override its values (and add exports).
//! Every error names the file and the line. `export add` and `export rm`
//! keep the file in step (`add_export`, `remove_export`), comments and all,
//! so a broker started afresh from it has the same exports and daemons.
//!
//! ```toml
//! request_timeout = "30s"
//! metrics_listen = "127.0.0.1:9464"
//!
//! [[export]]
//! name = "vol0"
//! size = "20GiB"
//! block = true
//! daemon = "holdfast-daemon --export vol0 --backend file:/var/lib/holdfast/vol0.img"
//! ```

use std::io::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{Config, ExportSpec};

/// Largest config file read.
const MAX_LEN: u64 = 1 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    socket: Option<PathBuf>,
    socket_mode: Option<Spanned<String>>,
    allow_uids: Option<Vec<u32>>,
    mountpoint: Option<PathBuf>,
    request_timeout: Option<Spanned<String>>,
    daemon_wait: Option<Spanned<String>>,
    fence_timeout: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
    fuse_workers: Option<usize>,
    slots: Option<u32>,
    slot_size: Option<Spanned<String>>,
    block_size: Option<Spanned<u32>>,
    cachefiles: Option<Spanned<String>>,
    #[serde(default)]
    supervise: Vec<String>,
    #[serde(default)]
    export: Vec<Spanned<ExportTable>>,
}

/// One `[[export]]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportTable {
    name: Spanned<String>,
    size: Spanned<String>,
    #[serde(default)]
    frontend: Option<Spanned<String>>,
    #[serde(default)]
    block: bool,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    daemon: Option<String>,
}

/// `FILE:LINE: what`, for a value at `span` of `text`.
struct At<'a> {
    path: &'a Path,
    text: &'a str,
}

impl At<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        let end = span.start.min(self.text.len());
        self.text
            .get(..end)
            .map_or(0, |t| t.matches('\n').count())
            .saturating_add(1)
    }

    fn err(&self, span: &Range<usize>, what: impl std::fmt::Display) -> String {
        format!("{}:{}: {what}", self.path.display(), self.line(span))
    }

    /// `value` parsed by `parse`, or an error at its line.
    fn parse<T>(
        &self,
        key: &str,
        value: &Spanned<String>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, String> {
        parse(value.get_ref()).map_err(|e| self.err(&value.span(), format_args!("{key}: {e}")))
    }
}

/// Reads `path` into a [`Config`] (with the defaults for what it leaves
/// out); the error names the file and line.
pub fn load(path: &Path) -> Result<Config, String> {
    let text = read(path)?;
    let at = At { path, text: &text };
    let file: File = toml::from_str(&text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        at.err(&span, e.message())
    })?;
    let mut cfg = Config {
        config_file: Some(path.to_owned()),
        ..Config::default()
    };
    apply_options(&at, &file, &mut cfg)?;
    cfg.supervise.extend(file.supervise.iter().cloned());
    let mut seen = std::collections::BTreeMap::new();
    for table in &file.export {
        let (spec, daemon) = export(&at, table.get_ref())?;
        let line = at.line(&table.span());
        if let Some(first) = seen.insert(spec.name.clone(), line) {
            return Err(at.err(
                &table.get_ref().name.span(),
                format_args!(
                    "export {:?} is given twice (first at line {first})",
                    spec.name
                ),
            ));
        }
        spec.check(cfg.block_size)
            .map_err(|e| at.err(&table.get_ref().size.span(), e))?;
        cfg.exports.push(spec);
        cfg.supervise.extend(daemon);
    }
    Ok(cfg)
}

fn read(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > MAX_LEN {
        return Err(format!(
            "{}: {} bytes; a config file is at most {MAX_LEN}",
            path.display(),
            meta.len()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn apply_options(at: &At<'_>, f: &File, cfg: &mut Config) -> Result<(), String> {
    if let Some(s) = &f.socket {
        cfg.socket.clone_from(s);
    }
    if let Some(m) = &f.socket_mode {
        cfg.socket_mode = at.parse("socket_mode", m, super::parse_mode)?;
    }
    if let Some(u) = &f.allow_uids {
        cfg.allow_uids.clone_from(u);
    }
    if let Some(m) = &f.mountpoint {
        cfg.mountpoint.clone_from(m);
    }
    if let Some(t) = &f.request_timeout {
        cfg.request_timeout = at.parse("request_timeout", t, super::parse_bound)?;
    }
    if let Some(t) = &f.daemon_wait {
        cfg.daemon_wait = at.parse("daemon_wait", t, super::parse_bound)?;
    }
    if let Some(t) = &f.fence_timeout {
        cfg.fence_timeout = at.parse("fence_timeout", t, holdfast_proto::parse_duration)?;
    }
    if let Some(a) = &f.metrics_listen {
        cfg.metrics_listen = Some(at.parse("metrics_listen", a, super::parse_listen)?);
    }
    if let Some(n) = f.fuse_workers {
        cfg.fuse_workers = n;
    }
    if let Some(n) = f.slots {
        cfg.slot_count = n;
    }
    if let Some(s) = &f.slot_size {
        let size = at.parse("slot_size", s, holdfast_proto::parse_size)?;
        cfg.slot_size =
            u32::try_from(size).map_err(|_| at.err(&s.span(), "slot_size: too large"))?;
    }
    if let Some(b) = &f.block_size {
        if !matches!(b.get_ref(), 512 | 4096) {
            return Err(at.err(&b.span(), "block_size: 512 or 4096"));
        }
        cfg.block_size = *b.get_ref();
    }
    if let Some(c) = &f.cachefiles {
        cfg.cachefiles = Some(at.parse("cachefiles", c, super::parse_cachefiles)?);
    }
    Ok(())
}

/// One `[[export]]` and its daemon command line.
fn export(at: &At<'_>, t: &ExportTable) -> Result<(ExportSpec, Option<String>), String> {
    let name = at.parse("name", &t.name, |n| {
        holdfast_proto::validate_name(n).map(|()| n.to_owned())
    })?;
    let size = at.parse("size", &t.size, holdfast_proto::parse_size)?;
    let ublk = match &t.frontend {
        None => false,
        Some(f) => at.parse("frontend", f, |f| match f {
            "fuse" => Ok(false),
            "ublk" => Ok(true),
            _ => Err(format!("{f:?}: fuse or ublk")),
        })?,
    };
    let direct = match &t.mode {
        None => !ublk,
        Some(m) => at.parse("mode", m, |m| match m {
            "direct" => Ok(true),
            "relay" => Ok(false),
            _ => Err(format!("{m:?}: direct or relay")),
        })?,
    };
    let daemon = t.daemon.clone().filter(|d| !d.trim().is_empty());
    let spec = ExportSpec {
        name,
        size,
        block: t.block,
        ublk,
        direct,
    };
    Ok((spec, daemon))
}

/// Adds `[[export]]` for `spec` (and `daemon`) to the file at `path`,
/// keeping the rest of it as it is.
pub fn add_export(path: &Path, spec: &ExportSpec, daemon: Option<&str>) -> Result<(), String> {
    edit(path, |doc| {
        let mut t = toml_edit::Table::new();
        t["name"] = toml_edit::value(spec.name.as_str());
        t["size"] = toml_edit::value(spec.size.to_string());
        if spec.ublk {
            t["frontend"] = toml_edit::value("ublk");
        }
        if spec.block {
            t["block"] = toml_edit::value(true);
        }
        t["mode"] = toml_edit::value(if spec.direct { "direct" } else { "relay" });
        if let Some(d) = daemon {
            t["daemon"] = toml_edit::value(d);
        }
        let exports = doc
            .entry("export")
            .or_insert(toml_edit::Item::ArrayOfTables(
                toml_edit::ArrayOfTables::new(),
            ));
        match exports.as_array_of_tables_mut() {
            Some(a) => {
                a.push(t);
                Ok(())
            }
            None => Err("\"export\" is not an array of [[export]] tables".into()),
        }
    })
}

/// Removes the `[[export]]` named `name` from the file at `path`; whether
/// there was one.
pub fn remove_export(path: &Path, name: &str) -> Result<bool, String> {
    let mut found = false;
    edit(path, |doc| {
        if let Some(a) = doc
            .get_mut("export")
            .and_then(toml_edit::Item::as_array_of_tables_mut)
        {
            let before = a.len();
            a.retain(|t| t.get("name").and_then(toml_edit::Item::as_str) != Some(name));
            found = a.len() != before;
        }
        Ok(())
    })?;
    Ok(found)
}

/// Replaces the daemon command line `old` with `new` wherever the file at
/// `path` has it (an export's `daemon`, an entry of `supervise`); whether
/// it had it.
pub fn replace_daemon(path: &Path, old: &str, new: &str) -> Result<bool, String> {
    let mut found = false;
    edit(path, |doc| {
        if let Some(a) = doc
            .get_mut("export")
            .and_then(toml_edit::Item::as_array_of_tables_mut)
        {
            for t in a.iter_mut() {
                if t.get("daemon").and_then(toml_edit::Item::as_str) == Some(old) {
                    t["daemon"] = toml_edit::value(new);
                    found = true;
                }
            }
        }
        if let Some(list) = doc
            .get_mut("supervise")
            .and_then(toml_edit::Item::as_array_mut)
        {
            for v in list.iter_mut() {
                if v.as_str() == Some(old) {
                    *v = new.into();
                    found = true;
                }
            }
        }
        Ok(())
    })?;
    Ok(found)
}

/// Reads, changes and atomically replaces the file (a new file beside it,
/// synced, renamed over it, the directory synced): a crash leaves the old
/// file or the new one.
fn edit(
    path: &Path,
    change: impl FnOnce(&mut toml_edit::DocumentMut) -> Result<(), String>,
) -> Result<(), String> {
    let text = read(path)?;
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    change(&mut doc).map_err(|e| format!("{}: {e}", path.display()))?;
    let tmp = path.with_extension("toml.new");
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        if let Ok(meta) = std::fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        }
        f.write_all(doc.to_string().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hf-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("holdfast.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_file_with_options_and_exports() {
        let p = file(
            "good",
            "# the broker\nrequest_timeout = \"10s\"\ndaemon_wait = \"forever\"\n\
             metrics_listen = \"127.0.0.1:9464\"\nblock_size = 4096\n\n\
             [[export]]\nname = \"vol0\"\nsize = \"1GiB\"\nblock = true\n\
             daemon = \"holdfast-daemon --export vol0 --backend mem\"\n\n\
             [[export]]\nname = \"vol1\"\nsize = \"16MiB\"\nfrontend = \"ublk\"\n",
        );
        let cfg = load(&p).unwrap();
        assert_eq!(
            cfg.request_timeout,
            Some(std::time::Duration::from_secs(10))
        );
        assert_eq!(cfg.daemon_wait, None);
        assert_eq!(cfg.block_size, 4096);
        assert_eq!(cfg.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(cfg.exports.len(), 2);
        assert!(cfg.exports[0].block && cfg.exports[0].direct);
        assert!(cfg.exports[1].ublk && !cfg.exports[1].direct);
        assert_eq!(
            cfg.supervise,
            ["holdfast-daemon --export vol0 --backend mem"]
        );
        assert_eq!(cfg.config_file.as_deref(), Some(p.as_path()));
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let cases = [
            ("syntax", "request_timeout = \n", ":1:"),
            (
                "unknown",
                "\n\nrequest_timout = \"1s\"\n",
                ":3: unknown field `request_timout`",
            ),
            (
                "duration",
                "daemon_wait = \"soon\"\n",
                ":1: daemon_wait: \"soon\" is not a duration",
            ),
            (
                "size",
                "[[export]]\nname = \"v\"\nsize = \"12X\"\n",
                ":3: size: \"12X\": unknown size suffix",
            ),
            (
                "name",
                "[[export]]\nname = \"a/b\"\nsize = \"1M\"\n",
                ":2: name: name \"a/b\" contains '/'",
            ),
            (
                "twice",
                "[[export]]\nname = \"v\"\nsize = \"1M\"\n[[export]]\nname = \"v\"\nsize = \"1M\"\n",
                ":5: export \"v\" is given twice (first at line 1)",
            ),
            (
                "blocks",
                "[[export]]\nname = \"v\"\nsize = \"1000\"\n",
                ":3: export v: size 1000 is not a whole number",
            ),
            (
                "frontend",
                "[[export]]\nname = \"v\"\nsize = \"1M\"\nfrontend = \"nbd\"\n",
                ":4: frontend: \"nbd\": fuse or ublk",
            ),
            (
                "listen",
                "metrics_listen = \"9464\"\n",
                ":1: metrics_listen:",
            ),
        ];
        for (name, text, want) in cases {
            let p = file(name, text);
            let err = load(&p).unwrap_err();
            assert!(
                err.starts_with(&p.display().to_string()) && err.contains(want),
                "{name}: {err}"
            );
        }
        assert!(load(Path::new("/nonexistent/holdfast.toml")).is_err());
    }

    #[test]
    fn add_and_remove_keep_the_rest_of_the_file() {
        let p = file("edit", "# keep me\nrequest_timeout = \"10s\" # and me\n");
        let spec = ExportSpec {
            name: "vol2".into(),
            size: 64 << 20,
            block: true,
            ublk: false,
            direct: false,
        };
        add_export(
            &p,
            &spec,
            Some("holdfast-daemon --export vol2 --backend mem"),
        )
        .unwrap();
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.starts_with("# keep me\nrequest_timeout = \"10s\" # and me\n"),
            "{text}"
        );
        let cfg = load(&p).unwrap();
        assert_eq!(cfg.exports, [spec]);
        assert_eq!(
            cfg.supervise,
            ["holdfast-daemon --export vol2 --backend mem"]
        );
        let upgraded = "holdfast-daemon --export vol2 --backend mem --workers 2";
        assert!(
            replace_daemon(&p, "holdfast-daemon --export vol2 --backend mem", upgraded).unwrap()
        );
        assert!(!replace_daemon(&p, "not there", "x").unwrap());
        assert_eq!(load(&p).unwrap().supervise, [upgraded]);
        assert!(remove_export(&p, "vol2").unwrap());
        assert!(!remove_export(&p, "vol2").unwrap());
        assert!(load(&p).unwrap().exports.is_empty());
        assert!(std::fs::read_to_string(&p).unwrap().contains("# and me"));
    }
}
