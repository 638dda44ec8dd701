//! holdfast-broker: the command line.

use std::process::ExitCode;

use holdfast_broker::config::{self, Config};

const USAGE: &str = "\
holdfast-broker: holds kernel device handles and every request in flight, so
storage daemons can crash or be replaced without the kernel seeing an error.

Usage: holdfast-broker [OPTIONS]

With no --export, serves one export vol0 of 1 GiB, and (unless --supervise is
given) supervises `holdfast-daemon --backend file:/var/lib/holdfast/vol0.img`.

Options:
  --config FILE           options and exports in TOML, each export with the
                          daemon command line that serves it (README
                          'Configuration file'); the flags below override
                          it, and `holdfastctl export add/rm` keep it
  --socket PATH           control socket [default: /run/holdfast/holdfast.sock]
  --socket-mode MODE      octal permissions of the socket [default: 600]
  --allow-uid UID         also accept connections from UID (repeatable;
                          root and the broker's own uid are always accepted)
  --mountpoint DIR        directory of the exports: each export is the file
                          DIR/NAME, its own FUSE mount [default: /run/holdfast/mnt]
  --export NAME=SIZE[,block|,ublk][,direct|,relay]
                          an export, e.g. vol0=256MiB (repeatable); with
                          ,block it also gets a block device /dev/loopN over
                          its FUSE file; with ,ublk it is a ublk device
                          /dev/ublkbN instead. Daemons read a FUSE export's
                          connection themselves (direct mode, Linux 6.9+)
                          unless ,relay or the daemon's --relay: then every
                          request goes through the broker. A ublk export is
                          relayed unless ,direct: then its daemon serves the
                          device's queue (and must be able to)
  --cachefiles DIR,TAG    bind /dev/cachefiles in ondemand mode on DIR (a
                          directory on ext4 or xfs) with TAG, and serve it as
                          the blob export named TAG: daemons attach with
                          `--export TAG --backend dir:PATH`, and erofs
                          mounts `-o fsid=BLOB` read through it
  --supervise CMD         run daemon command line CMD (with /bin/sh) and run it
                          again whenever it exits (repeatable), unless another
                          daemon serves its export then (it waits), or the
                          export was removed (it stops); `holdfastctl upgrade
                          EXPORT` or SIGHUP to the daemon hands its export off
                          to a new copy of CMD
  --request-timeout T     a request dispatched longer than T declares its daemon
                          lost (hung): it is killed and its requests replayed to
                          the next daemon [default: 30s; 0 = never]
  --daemon-wait T         pending requests wait T for a daemon, then fail with
                          EIO [default: forever]
  --fence-timeout T       how long to wait for a killed daemon to be gone before
                          warning (it is waited for regardless) [default: 10s]
  --metrics-listen ADDR:PORT
                          serve the metrics (as `holdfastctl metrics` prints
                          them) over HTTP at /metrics, e.g. 127.0.0.1:9464;
                          anyone who can connect can read them
  --fuse-workers N        FUSE worker threads per export [default: 4]
  --slots N               in-flight slots per export, a power of two larger
                          than --fuse-workers [default: 64]
  --slot-size SIZE        largest I/O per request [default: 1MiB]
  --block-size N          logical block size, 512 or 4096 [default: 512]
  --recover               accepted for older scripts: a broker always takes
                          over what a previous one left (its FUSE
                          connections, ublk devices, the cachefiles cache)
  -h, --help              print this help
  -V, --version           print the version

Signals: SIGTERM or SIGINT stop the broker (its exports end); SIGUSR2
upgrades it: the binary it was started from is executed again in the same
process, with the same options, keeping every export (as `holdfastctl
broker upgrade` does); SIGHUP is ignored.

Under systemd (deploy/systemd/holdfast.service), the broker keeps its
exports' descriptors in the service's fd store: a broker that crashes is
started again and takes them over.

Durations: 30, 2.5s, 500ms, 5m, forever.";

fn string_value(parser: &mut lexopt::Parser) -> Result<String, String> {
    parser
        .value()
        .map_err(|e| e.to_string())?
        .into_string()
        .map_err(|v| format!("{v:?} is not valid UTF-8"))
}

/// `--config FILE`, looked for before the other flags so that they
/// override it.
fn config_file() -> Result<Option<std::path::PathBuf>, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_env();
    let mut path = None;
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("config") => path = Some(string_value(&mut parser)?.into()),
            Long(_) | Short(_) => {
                // Skip the flag's value, if it takes one.
                let _ = parser.optional_value();
            }
            Value(_) => {}
        }
    }
    Ok(path)
}

fn parse_args() -> Result<Option<Config>, String> {
    use lexopt::prelude::*;
    // A bad file is reported after the flags: --help and --version work
    // regardless.
    let (mut cfg, bad_file) = match config_file()?.map(|p| config::file::load(&p)) {
        Some(Ok(cfg)) => (cfg, None),
        Some(Err(e)) => (Config::default(), Some(e)),
        None => (Config::default(), None),
    };
    let mut parser = lexopt::Parser::from_env();
    while let Some(arg) = parser.next().map_err(|e| e.to_string())? {
        match arg {
            Long("socket") => cfg.socket = string_value(&mut parser)?.into(),
            Long("socket-mode") => {
                cfg.socket_mode = config::parse_mode(&string_value(&mut parser)?)
                    .map_err(|e| format!("--socket-mode {e}"))?;
            }
            // Read first (`config_file`); flags then override it.
            Long("config") => drop(parser.value()),
            Long("allow-uid") => {
                let v = string_value(&mut parser)?;
                cfg.allow_uids.push(
                    v.parse()
                        .map_err(|_| format!("--allow-uid {v:?}: expected a number"))?,
                );
            }
            Long("mountpoint") => cfg.mountpoint = string_value(&mut parser)?.into(),
            Long("export") => cfg
                .exports
                .push(config::parse_export(&string_value(&mut parser)?)?),
            Long("supervise") => cfg.supervise.push(string_value(&mut parser)?),
            Long("request-timeout") => {
                cfg.request_timeout = config::parse_bound(&string_value(&mut parser)?)?
            }
            Long("daemon-wait") => {
                cfg.daemon_wait = config::parse_bound(&string_value(&mut parser)?)?
            }
            Long("fence-timeout") => {
                let v = string_value(&mut parser)?;
                cfg.fence_timeout = config::parse_bound(&v)?
                    .ok_or_else(|| format!("--fence-timeout {v:?}: must be a positive duration"))?;
            }
            Long("fuse-workers") => {
                let v = string_value(&mut parser)?;
                cfg.fuse_workers = v
                    .parse()
                    .map_err(|_| format!("--fuse-workers {v:?}: expected a number"))?;
            }
            Long("slots") => {
                let v = string_value(&mut parser)?;
                cfg.slot_count = v
                    .parse()
                    .map_err(|_| format!("--slots {v:?}: expected a number"))?;
            }
            Long("slot-size") => {
                let size = config::parse_size(&string_value(&mut parser)?)?;
                cfg.slot_size =
                    u32::try_from(size).map_err(|_| "--slot-size is too large".to_string())?;
            }
            Long("metrics-listen") => {
                cfg.metrics_listen = Some(
                    config::parse_listen(&string_value(&mut parser)?)
                        .map_err(|e| format!("--metrics-listen {e}"))?,
                );
            }
            Long("recover") => {}
            Long("cachefiles") => {
                cfg.cachefiles = Some(config::parse_cachefiles(&string_value(&mut parser)?)?);
            }
            Long("block-size") => {
                let v = string_value(&mut parser)?;
                cfg.block_size = v
                    .parse()
                    .map_err(|_| format!("--block-size {v:?}: expected 512 or 4096"))?;
            }
            Short('h') | Long("help") => {
                println!("{USAGE}");
                return Ok(None);
            }
            Short('V') | Long("version") => {
                println!(
                    "holdfast-broker {} {}",
                    env!("CARGO_PKG_VERSION"),
                    holdfast_broker::restart::record::readable()
                );
                return Ok(None);
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    if let Some(e) = bad_file {
        return Err(e);
    }
    let daemon = std::env::current_exe()
        .map(|p| p.with_file_name("holdfast-daemon"))
        .map_err(|e| format!("cannot find my own executable: {e}"))?;
    cfg.apply_defaults(&daemon.display().to_string());
    cfg.validate()?;
    Ok(Some(cfg))
}

fn main() -> ExitCode {
    let cfg = match parse_args() {
        Ok(Some(cfg)) => cfg,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("holdfast-broker: {e}\nTry 'holdfast-broker --help'.");
            return ExitCode::from(2);
        }
    };
    match holdfast_broker::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let err = holdfast_broker::log::prefix(holdfast_broker::log::ERR);
            eprintln!("{err}holdfast-broker: {e}");
            ExitCode::FAILURE
        }
    }
}
