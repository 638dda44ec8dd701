//! hf-ublk-baseline: a daemon-less ublk server, the in-process baseline of
//! the ublk benchmarks and a check of the daemon library's ublk queue
//! server (`holdfast_daemon::ublk`, the data path of ublk's direct mode)
//! against the real driver. It adds a device, serves its queue with the
//! `file` backend called in place, starts it, prints `ready /dev/ublkbN`,
//! and on SIGTERM stops and deletes it and prints what it served.
//!
//! Usage: hf-ublk-baseline --backend file:PATH --size BYTES
//!        [--depth N (64)] [--workers N (4)] [--block-size N (512)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use holdfast_daemon::backends::{self, BackendSpec};
use holdfast_daemon::ublk::{self, Geometry};
use holdfast_kernel::ublk::params;
use holdfast_kernel::ublk::sys::{self, Control, DevInfo};

/// A tag's buffer, the largest request (the kernel splits larger ones).
const BUF_SIZE: u32 = 1 << 20;

fn run() -> Result<(), String> {
    use lexopt::prelude::*;
    let (mut backend, mut size) = (None, None::<u64>);
    let (mut depth, mut workers, mut block_size) = (64u16, 4usize, 512u32);
    let mut p = lexopt::Parser::from_env();
    let text = |p: &mut lexopt::Parser| -> Result<String, String> {
        p.value()
            .map_err(|e| e.to_string())?
            .into_string()
            .map_err(|v| format!("{v:?} is not UTF-8"))
    };
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("backend") => backend = Some(text(&mut p)?.parse::<BackendSpec>()?),
            Long("size") => size = Some(text(&mut p)?.parse().map_err(|e| format!("--size: {e}"))?),
            Long("depth") => depth = text(&mut p)?.parse().map_err(|e| format!("--depth: {e}"))?,
            Long("workers") => {
                workers = text(&mut p)?
                    .parse()
                    .map_err(|e| format!("--workers: {e}"))?
            }
            Long("block-size") => {
                block_size = text(&mut p)?
                    .parse()
                    .map_err(|e| format!("--block-size: {e}"))?;
            }
            other => return Err(other.unexpected().to_string()),
        }
    }
    let (Some(BackendSpec::File(path)), Some(size)) = (backend, size) else {
        return Err("--backend file:PATH and --size BYTES are required".into());
    };
    let backend = Arc::new(backends::file::open(&path, size).map_err(|e| e.to_string())?);
    let mut ctl = Control::open().map_err(|e| format!("/dev/ublk-control: {e}"))?;
    ctl.features()
        .and_then(|f| f.check())
        .map_err(|e| e.to_string())?;
    let info = ctl
        .add(&DevInfo {
            nr_hw_queues: 1,
            queue_depth: depth,
            max_io_buf_bytes: BUF_SIZE,
            dev_id: u32::MAX,
            flags: sys::F_CMD_IOCTL_ENCODE,
            ..DevInfo::default()
        })
        .map_err(|e| format!("ADD_DEV: {e}"))?;
    let dev_id = info.dev_id;
    ctl.set_params(dev_id, &params(size, block_size, BUF_SIZE))
        .map_err(|e| format!("SET_PARAMS: {e}"))?;
    let signals = [libc::SIGTERM, libc::SIGINT];
    holdfast_broker::sys::block_signals(&signals).map_err(|e| e.to_string())?;
    let geo = Geometry {
        dev_id,
        depth,
        buf_size: BUF_SIZE,
        size,
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        ublk::serve(geo, backend, workers, move |r| {
            let _ = ready_tx.send(r);
        })
    });
    let started = ready_rx
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| "the queue did not start".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .and_then(|()| {
            ctl.start(dev_id, std::process::id())
                .map_err(|e| format!("START_DEV: {e}"))
        });
    if let Err(e) = started {
        let _ = ctl.delete(dev_id);
        return Err(e);
    }
    println!("ready /dev/ublkb{dev_id}");
    while holdfast_broker::sys::wait_signal(&signals, Duration::from_secs(1)).is_none() {}
    ctl.stop(dev_id).map_err(|e| format!("STOP_DEV: {e}"))?;
    let stats = server
        .join()
        .map_err(|_| "the queue thread failed".to_owned())?;
    ctl.delete(dev_id).map_err(|e| format!("DEL_DEV: {e}"))?;
    let stats = stats.map_err(|e| format!("the queue: {e}"))?;
    println!("served {} failed {}", stats.served, stats.failed);
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hf-ublk-baseline: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
