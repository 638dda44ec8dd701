//! hf-baseline: the benchmark's in-process baseline. The broker's own FUSE
//! frontend (and block device) over the daemon's own file backend, with the
//! backend called in place by the FUSE worker that read the request: no
//! in-flight table, no rings, no daemon process, no wake-ups. This is the
//! limit of the broker's design: what the broker path (`holdfast-broker` +
//! `holdfast-daemon`) costs is measured against it.
//!
//! Usage: hf-baseline --mountpoint DIR --export NAME=SIZE[,block]
//!        --backend file:PATH [--fuse-workers N] [--block-size N]
//! Prints `ready DEVICE` (or `ready FILE`) on stdout, serves until SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use holdfast_broker::config::{self, ExportSpec};
use holdfast_broker::frontends::fuse::FuseFrontend;
use holdfast_broker::frontends::{Origin, Outcome, SlotData, Target};
use holdfast_broker::inflight::Data;
use holdfast_broker::shm::SharedRegion;
use holdfast_daemon::Backend;
use holdfast_daemon::backends::{self, BackendSpec};
use holdfast_proto::shm::{DataLayout, Op};
use parking_lot::Mutex;

/// Slots as the broker has by default; 1 MiB each.
const SLOTS: u32 = 64;
const SLOT_SIZE: u32 = 1 << 20;

/// A target that runs each request on the backend in the calling thread.
struct InPlace {
    name: String,
    size: u64,
    block_size: u32,
    layout: DataLayout,
    data: SharedRegion,
    free: Mutex<Vec<u32>>,
    backend: Box<dyn Backend>,
}

impl Target for InPlace {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn layout(&self) -> DataLayout {
        self.layout
    }
    fn data(&self) -> &SharedRegion {
        &self.data
    }
    fn take_slot(&self) -> Option<u32> {
        self.free.lock().pop()
    }
    fn release_slot(&self, slot: u32) {
        self.free.lock().push(slot);
    }

    fn submit(&self, op: Op, offset: u64, len: u64, origin: Origin, data: Data) {
        let slot = match data {
            Data::Slot(s) => Some(s),
            _ if op.uses_buffer() => self.take_slot(),
            _ => None,
        };
        let n = usize::try_from(len).unwrap_or(usize::MAX);
        let ptr = slot.and_then(|s| self.data.ptr(self.layout.slot_offset(s)?, n));
        // SAFETY: a slot is used by one request at a time (the free list
        // hands it out once), and the region outlives this call.
        let buf = ptr.map(|p| unsafe { std::slice::from_raw_parts_mut(p, n) });
        let outcome = match (op.uses_buffer(), buf) {
            (true, None) => Outcome::Failed(libc::EIO),
            (_, buf) => {
                match backends::run(&*self.backend, backends::Ask::volume(op, offset, len), buf) {
                    Ok(done) => Outcome::Done {
                        len: done as u64,
                        data: slot.and_then(|s| {
                            Some(SlotData {
                                region: &self.data,
                                offset: self.layout.slot_offset(s)?,
                                len: done,
                            })
                        }),
                    },
                    Err(e) => Outcome::Failed(e.raw_os_error().unwrap_or(libc::EIO)),
                }
            }
        };
        origin.sink.complete(origin.tag, op, outcome);
        if let Some(s) = slot {
            self.release_slot(s);
        }
    }

    fn submit_write(&self, offset: u64, origin: Origin, bytes: &[u8]) {
        let outcome = match self.backend.write(offset, bytes) {
            Ok(()) => Outcome::Done {
                len: bytes.len() as u64,
                data: None,
            },
            Err(e) => Outcome::Failed(e.raw_os_error().unwrap_or(libc::EIO)),
        };
        origin.sink.complete(origin.tag, Op::Write, outcome);
    }
}

fn run() -> Result<(), String> {
    use lexopt::prelude::*;
    let (mut mountpoint, mut export, mut backend) = (None, None::<ExportSpec>, None);
    let (mut workers, mut block_size) = (4usize, 512u32);
    let mut p = lexopt::Parser::from_env();
    let text = |p: &mut lexopt::Parser| -> Result<String, String> {
        p.value()
            .map_err(|e| e.to_string())?
            .into_string()
            .map_err(|v| format!("{v:?} is not UTF-8"))
    };
    while let Some(arg) = p.next().map_err(|e| e.to_string())? {
        match arg {
            Long("mountpoint") => mountpoint = Some(text(&mut p)?),
            Long("export") => export = Some(config::parse_export(&text(&mut p)?)?),
            Long("backend") => backend = Some(text(&mut p)?.parse::<BackendSpec>()?),
            Long("fuse-workers") => workers = text(&mut p)?.parse().map_err(|e| format!("{e}"))?,
            Long("block-size") => block_size = text(&mut p)?.parse().map_err(|e| format!("{e}"))?,
            other => return Err(other.unexpected().to_string()),
        }
    }
    let (Some(dir), Some(spec), Some(BackendSpec::File(path))) = (mountpoint, export, backend)
    else {
        return Err("--mountpoint, --export and --backend file:PATH are required".into());
    };
    spec.check(block_size)?;
    let layout = DataLayout::new(SLOTS, SLOT_SIZE).ok_or("bad slot layout")?;
    let fd = holdfast_broker::sys::sealed_memfd("hf-baseline", layout.byte_len())
        .map_err(|e| e.to_string())?;
    let backend = backends::file::open(&path, spec.size).map_err(|e| e.to_string())?;
    let target = Arc::new(InPlace {
        name: spec.name.clone(),
        size: spec.size,
        block_size,
        layout,
        data: SharedRegion::map(&fd, layout.byte_len()).map_err(|e| e.to_string())?,
        free: Mutex::new((0..SLOTS).collect()),
        backend: Box::new(backend),
    });
    let signals = [libc::SIGTERM, libc::SIGINT];
    holdfast_broker::sys::block_signals(&signals).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let frontend = FuseFrontend::new(dir.as_ref(), workers, std::sync::Arc::new(|| {}));
    frontend
        .add(&target, spec.block, false, 0)
        .map_err(|e| format!("cannot mount: {e}"))?;
    let ready = frontend
        .device(&spec.name)
        .unwrap_or_else(|| std::path::Path::new(&dir).join(&spec.name));
    println!("ready {}", ready.display());
    while holdfast_broker::sys::wait_signal(&signals, Duration::from_secs(1)).is_none() {}
    frontend.unmount();
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hf-baseline: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
