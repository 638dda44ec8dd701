//! Broker configuration: command-line values, their parsing, and defaults;
//! `file` reads and keeps `--config FILE`.

pub mod file;

use std::path::PathBuf;
use std::time::Duration;

pub use holdfast_proto::parse_size;

/// Where a broker started with no flags puts things.
pub const DEFAULT_SOCKET: &str = "/run/holdfast/holdfast.sock";
pub const DEFAULT_MOUNTPOINT: &str = "/run/holdfast/mnt";
pub const DEFAULT_EXPORT: &str = "vol0";
pub const DEFAULT_EXPORT_SIZE: u64 = 1 << 30;
pub const DEFAULT_BACKING_DIR: &str = "/var/lib/holdfast";

/// One `--export NAME=SIZE[,block|,ublk][,direct|,relay]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    pub size: u64,
    /// Also give the export a block device (a loop device over its file).
    pub block: bool,
    /// Serve it through ublk instead of FUSE.
    pub ublk: bool,
    /// Daemons that can serve its FUSE connection themselves do (direct
    /// mode, the default for FUSE exports); the others get relay mode.
    pub direct: bool,
}

impl ExportSpec {
    /// Checks the name and that the size is whole blocks.
    pub fn check(&self, block_size: u32) -> Result<(), String> {
        holdfast_proto::validate_name(&self.name)?;
        if self.block && self.ublk {
            return Err(format!(
                "export {}: block (a loop device over the FUSE file) and ublk exclude each other",
                self.name
            ));
        }
        if self.size == 0 || !self.size.is_multiple_of(u64::from(block_size)) {
            return Err(format!(
                "export {}: size {} is not a whole number of {block_size}-byte blocks",
                self.name, self.size
            ));
        }
        Ok(())
    }
}

/// `--cachefiles DIR,TAG`: a cache bound in ondemand mode on DIR, served
/// as the blob export named TAG.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachefilesSpec {
    pub dir: PathBuf,
    pub tag: String,
}

/// Parses `DIR,TAG`.
pub fn parse_cachefiles(s: &str) -> Result<CachefilesSpec, String> {
    let (dir, tag) = s.rsplit_once(',').ok_or_else(|| {
        format!("--cachefiles {s:?}: expected DIR,TAG, e.g. /var/cache/holdfast,images")
    })?;
    holdfast_proto::validate_name(tag).map_err(|e| format!("--cachefiles {s:?}: tag: {e}"))?;
    if !dir.starts_with('/') || dir.contains(['\n', ' ']) {
        return Err(format!(
            "--cachefiles {s:?}: the cache directory must be an absolute path without spaces"
        ));
    }
    Ok(CachefilesSpec {
        dir: dir.into(),
        tag: tag.to_owned(),
    })
}

#[derive(Debug, Clone)]
pub struct Config {
    pub socket: PathBuf,
    pub socket_mode: u32,
    /// Uids allowed to connect (root and the broker's own uid are always).
    pub allow_uids: Vec<u32>,
    pub mountpoint: PathBuf,
    pub exports: Vec<ExportSpec>,
    pub cachefiles: Option<CachefilesSpec>,
    /// Daemon command lines to run and restart.
    pub supervise: Vec<String>,
    pub fuse_workers: usize,
    pub slot_count: u32,
    pub slot_size: u32,
    pub block_size: u32,
    /// A request dispatched longer than this declares its daemon lost.
    pub request_timeout: Option<Duration>,
    /// Pending requests wait this long for a daemon, then fail with EIO.
    pub daemon_wait: Option<Duration>,
    /// How long to wait for a killed daemon to be gone before warning.
    pub fence_timeout: Duration,
    /// Where to serve `GET /metrics` (`--metrics-listen`).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `--config FILE`: where `export add` and `export rm` are kept.
    pub config_file: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            socket_mode: 0o600,
            allow_uids: Vec::new(),
            mountpoint: DEFAULT_MOUNTPOINT.into(),
            exports: Vec::new(),
            cachefiles: None,
            supervise: Vec::new(),
            fuse_workers: 4,
            slot_count: 64,
            slot_size: 1 << 20,
            block_size: 512,
            request_timeout: Some(Duration::from_secs(30)),
            daemon_wait: None,
            fence_timeout: Duration::from_secs(10),
            metrics_listen: None,
            config_file: None,
        }
    }
}

impl Config {
    /// With no `--export`, one default export served by a supervised daemon
    /// on a local file (unless `--supervise` names another command).
    pub fn apply_defaults(&mut self, daemon_binary: &str) {
        if self.exports.is_empty() && self.cachefiles.is_none() {
            self.exports.push(ExportSpec {
                name: DEFAULT_EXPORT.into(),
                size: DEFAULT_EXPORT_SIZE,
                block: false,
                ublk: false,
                direct: true,
            });
            if self.supervise.is_empty() {
                self.supervise.push(format!(
                    "{daemon_binary} --socket {} --export {DEFAULT_EXPORT} --backend file:{DEFAULT_BACKING_DIR}/{DEFAULT_EXPORT}.img",
                    self.socket.display()
                ));
            }
        }
    }

    /// Checks values that depend on each other.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = std::collections::BTreeSet::new();
        for e in &self.exports {
            if !names.insert(&e.name) {
                return Err(format!("export {:?} is given twice", e.name));
            }
            e.check(self.block_size)?;
        }
        if let Some(c) = &self.cachefiles
            && names.contains(&c.tag)
        {
            return Err(format!(
                "--cachefiles tag {:?} is also an --export name; the cachefiles export is named by its tag",
                c.tag
            ));
        }
        if self.exports.len() > holdfast_proto::MAX_EXPORTS {
            return Err(format!(
                "at most {} exports are supported",
                holdfast_proto::MAX_EXPORTS
            ));
        }
        if holdfast_proto::shm::DataLayout::new(self.slot_count, self.slot_size).is_none() {
            return Err(format!(
                "--slots must be a power of two up to {} and --slot-size a multiple of 4096 up to {} (got {} and {})",
                holdfast_proto::shm::MAX_SLOTS,
                holdfast_proto::shm::MAX_SLOT_SIZE,
                self.slot_count,
                self.slot_size
            ));
        }
        if self.fuse_workers == 0 || self.fuse_workers > 64 {
            return Err("--fuse-workers must be from 1 to 64".into());
        }
        // Each worker keeps one slot reserved to read into; requests need
        // the rest.
        if self.slot_count as usize <= self.fuse_workers {
            return Err(format!(
                "--slots ({}) must be larger than --fuse-workers ({})",
                self.slot_count, self.fuse_workers
            ));
        }
        if !matches!(self.block_size, 512 | 4096) {
            return Err("--block-size must be 512 or 4096".into());
        }
        Ok(())
    }
}

/// Parses `NAME=SIZE[,OPTION]...`, options `block`, `ublk`, `direct` and
/// `relay`. A FUSE export is direct unless `relay` (daemons that cannot
/// serve it directly still get relay mode); a ublk export is relay unless
/// `direct` (then only daemons that serve its queue themselves attach).
pub fn parse_export(s: &str) -> Result<ExportSpec, String> {
    let (name, rest) = s.split_once('=').ok_or_else(|| {
        format!(
            "--export {s:?}: expected NAME=SIZE[,block|,ublk][,direct|,relay], e.g. vol0=256MiB,block"
        )
    })?;
    holdfast_proto::validate_name(name).map_err(|e| format!("--export {s:?}: {e}"))?;
    let mut parts = rest.split(',');
    let size = parts.next().unwrap_or_default();
    let size = parse_size(size).map_err(|e| format!("--export {s:?}: {e}"))?;
    let (mut block, mut ublk, mut direct, mut relay) = (false, false, false, false);
    for opt in parts {
        let flag = match opt {
            "block" => &mut block,
            "ublk" => &mut ublk,
            "direct" => &mut direct,
            "relay" => &mut relay,
            _ => {
                return Err(format!(
                    "--export {s:?}: unknown option {opt:?} (block: a loop device over the FUSE \
                     file; ublk: a ublk device; direct: daemons serve the kernel's queue \
                     themselves, the default for FUSE; relay: every request goes through the \
                     broker, the default for ublk)"
                ));
            }
        };
        if std::mem::replace(flag, true) {
            return Err(format!("--export {s:?}: option {opt:?} is given twice"));
        }
    }
    if direct && relay {
        return Err(format!(
            "--export {s:?}: direct and relay exclude each other"
        ));
    }
    Ok(ExportSpec {
        name: name.to_owned(),
        size,
        block,
        ublk,
        direct: direct || !(relay || ublk),
    })
}

pub use holdfast_proto::parse_bound;

/// An octal permission mode like `600`.
pub fn parse_mode(v: &str) -> Result<u32, String> {
    u32::from_str_radix(v, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{v:?}: expected an octal mode like 600"))
}

/// `ADDRESS:PORT` to listen on.
pub fn parse_listen(v: &str) -> Result<std::net::SocketAddr, String> {
    v.parse()
        .map_err(|_| format!("{v:?}: expected ADDRESS:PORT, like 127.0.0.1:9464 or [::1]:9464"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports() {
        assert_eq!(
            parse_export("vol0=256MiB"),
            Ok(ExportSpec {
                name: "vol0".into(),
                size: 256 << 20,
                block: false,
                ublk: false,
                direct: true,
            })
        );
        assert_eq!(
            parse_export("vol0=1GiB,block,relay"),
            Ok(ExportSpec {
                name: "vol0".into(),
                size: 1 << 30,
                block: true,
                ublk: false,
                direct: false,
            })
        );
        assert!(parse_export("vol0=1GiB,block,direct").is_ok_and(|e| e.block && e.direct));
        assert!(parse_export("vol0=1GiB,direct").is_ok_and(|e| e.direct && !e.block));
        assert!(parse_export("vol0=1GiB,direct,direct").is_err());
        assert!(parse_export("vol0=1GiB,relay,relay").is_err());
        let both = parse_export("vol0=1GiB,direct,relay").unwrap_err();
        assert!(both.contains("exclude each other"), "{both}");
        let ublk_direct = parse_export("vol0=1GiB,ublk,direct").unwrap();
        assert!(ublk_direct.direct && ublk_direct.check(512).is_ok());
        // A ublk export is relay without being told.
        assert!(parse_export("vol0=1GiB,ublk").is_ok_and(|e| e.ublk && !e.direct));
        assert!(parse_export("vol0=1GiB,ublk,relay").is_ok_and(|e| e.check(512).is_ok()));
        assert!(parse_export("vol0=1GiB,ublk").is_ok_and(|e| e.ublk && !e.block));
        let both = ExportSpec {
            name: "v".into(),
            size: 4096,
            block: true,
            ublk: true,
            direct: false,
        };
        assert!(both.check(512).is_err());
        assert!(parse_export("vol0=1G,blok").is_err());
        assert!(parse_export("vol0=1G,").is_err());
        assert!(parse_export("vol0").is_err());
        assert!(parse_export("a/b=1M").is_err());
        assert!(parse_export("=1M").is_err());
    }

    #[test]
    fn cachefiles() {
        assert_eq!(
            parse_cachefiles("/var/cache/hf,images"),
            Ok(CachefilesSpec {
                dir: "/var/cache/hf".into(),
                tag: "images".into()
            })
        );
        for bad in ["/c", "c,images", "/c,", "/c d,t", "/c,a/b"] {
            assert!(parse_cachefiles(bad).is_err(), "{bad}");
        }
        let mut cfg = Config {
            cachefiles: Some(parse_cachefiles("/c,vol0").unwrap()),
            ..Config::default()
        };
        cfg.apply_defaults("d");
        assert!(cfg.exports.is_empty());
        cfg.exports.push(parse_export("vol0=1MiB").unwrap());
        assert!(cfg.validate().unwrap_err().contains("also an --export"));
    }

    #[test]
    fn bounds() {
        assert_eq!(parse_bound("forever"), Ok(None));
        assert_eq!(parse_bound("0"), Ok(None));
        assert_eq!(parse_bound("30"), Ok(Some(Duration::from_secs(30))));
        assert_eq!(parse_bound("500ms"), Ok(Some(Duration::from_millis(500))));
        assert_eq!(parse_bound("2m"), Ok(Some(Duration::from_secs(120))));
        assert!(parse_bound("-1").is_err());
        assert!(parse_bound("soon").is_err());
        assert!(parse_bound("1e300").is_err());
        assert!(parse_bound("1e12").is_err());
    }

    #[test]
    fn defaults_and_validation() {
        let mut c = Config::default();
        c.apply_defaults("/usr/bin/holdfast-daemon");
        assert_eq!(c.exports.len(), 1);
        assert_eq!(c.supervise.len(), 1);
        assert!(c.supervise[0].contains("--backend file:/var/lib/holdfast/vol0.img"));
        c.validate().unwrap();
        c.exports.push(c.exports[0].clone());
        assert!(c.validate().is_err());
        let c = Config {
            slot_count: 3,
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }
}
