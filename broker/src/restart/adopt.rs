//! What a broker keeps of itself for the next one, and how the next one
//! takes it over: the record of its state and the descriptors it names
//! (`persist`, `record`), and the adoption of every export at start-up
//! (`restore_exports`).

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use holdfast_proto::ExportKind;

use super::fds::Inherited;
use super::record::{ExportRecord, FrontendRecord, FuseRecord, Record, SupervisedRecord, names};
use crate::config::{self, Config};
use crate::{Broker, warn};

/// What a previous broker kept of an export: its record and its fd
/// store's descriptors.
pub(crate) type Prior<'a> = (&'a ExportRecord, Vec<(String, u64, OwnedFd)>);

/// The descriptors of `rec`'s fd store that were passed on.
fn take_stored(rec: &ExportRecord, inherited: &mut Inherited) -> Vec<(String, u64, OwnedFd)> {
    let mut out = Vec::with_capacity(rec.stored.len());
    for (name, id) in &rec.stored {
        match inherited.take(&names::stored(&rec.name, *id)) {
            Some(fd) => out.push((name.clone(), *id, fd)),
            None => warn!("{}: its fd store's {name:?} was not passed on", rec.name),
        }
    }
    out
}

impl Broker {
    /// Brings systemd's fd store up to date with this broker's state (when
    /// it runs under systemd): called whenever something that must outlive
    /// the broker changes (an export, an epoch, the fd store, a FUSE INIT).
    pub fn persist(&self) {
        self.custody.commit(|seq| self.record(seq));
    }

    /// What the next broker needs: the record and the descriptors it names.
    pub(crate) fn record(&self, seq: u64) -> (Record, Vec<(String, OwnedFd)>) {
        let mut fds = Vec::new();
        if let Ok(l) = self.listener.try_clone() {
            fds.push((names::LISTEN.to_owned(), l));
        }
        let mut exports = Vec::new();
        for e in self.exports() {
            let frontend = if let Some(dev_id) = self.ublk_id(&e.name) {
                FrontendRecord::Ublk { dev_id }
            } else if e.kind == ExportKind::Blobs {
                let cache = self
                    .cachefiles
                    .get()
                    .map(|(_, c)| c.device_fd().try_clone());
                if let Some(Ok(fd)) = cache {
                    fds.push((names::CACHEFILES.to_owned(), fd));
                }
                FrontendRecord::Cachefiles
            } else {
                // A connection that cannot be kept is left out: after a
                // crash its mount is made again.
                let Some((rec, devs)) = self.frontend.custody(&e.name) else {
                    continue;
                };
                for (i, fd) in devs.into_iter().enumerate() {
                    fds.push((names::fuse(&e.name, rec.id, i), fd));
                }
                FrontendRecord::Fuse(rec)
            };
            let (last_epoch, stored) = e.custody();
            let mut kept = Vec::with_capacity(stored.len());
            for (name, id, fd) in stored {
                fds.push((names::stored(&e.name, id), fd));
                kept.push((name, id));
            }
            exports.push(ExportRecord {
                name: e.name.clone(),
                size: e.size,
                last_epoch,
                frontend,
                stored: kept,
            });
        }
        let supervised = self
            .supervisors
            .lock()
            .iter()
            .filter_map(|s| {
                let (pid, start_time) = s.current()?;
                Some(SupervisedRecord {
                    cmd: s.cmd(),
                    pid,
                    start_time,
                })
            })
            .collect();
        let record = Record {
            seq,
            next_id: self.next_id.load(Ordering::Relaxed),
            exports,
            supervised,
            upgrade: None,
            restarts: self.restarts,
        };
        (record, fds)
    }

    /// Takes over the exports of `record` (with descriptors from
    /// `inherited`), then creates the configured ones it did not have.
    pub(crate) fn restore_exports(
        &self,
        cfg: &Config,
        record: Option<&Record>,
        inherited: &mut Inherited,
    ) -> Result<(), String> {
        let mut done = std::collections::BTreeSet::new();
        let mut cache_prior = None;
        for rec in record.map(|r| r.exports.as_slice()).unwrap_or_default() {
            let stored = take_stored(rec, inherited);
            let taken = match &rec.frontend {
                FrontendRecord::Fuse(f) => self.adopt_fuse(rec, f, stored, inherited),
                FrontendRecord::Ublk { .. } => {
                    let spec = config::ExportSpec {
                        name: rec.name.clone(),
                        size: rec.size,
                        block: false,
                        ublk: true,
                        direct: false,
                    };
                    self.create(&spec, Some((rec, stored))).map(drop)
                }
                FrontendRecord::Cachefiles => {
                    cache_prior = Some((rec, stored));
                    continue;
                }
            };
            match taken {
                Ok(()) => {
                    done.insert(rec.name.clone());
                }
                Err(e) => warn!("{e}"),
            }
        }
        for spec in &cfg.exports {
            if !done.contains(&spec.name) {
                self.create(spec, None)?;
            } else if self.find(&spec.name).is_ok_and(|e| e.size != spec.size) {
                warn!(
                    "export {}: kept at the size it had ({} bytes); --export asks for {} \
                     (an export's size never changes under its users)",
                    spec.name,
                    self.find(&spec.name).map_or(0, |e| e.size),
                    spec.size
                );
            }
        }
        if let Some(spec) = &cfg.cachefiles {
            let prior = cache_prior.filter(|(rec, _)| rec.name == spec.tag);
            self.start_cachefiles(spec, inherited.take(names::CACHEFILES), prior)?;
        }
        Ok(())
    }

    /// Takes over a FUSE export a previous broker left: its connection's
    /// descriptors from `inherited`; if they cannot be, mounts it again.
    fn adopt_fuse(
        &self,
        rec: &ExportRecord,
        fuse: &FuseRecord,
        stored: Vec<(String, u64, OwnedFd)>,
        inherited: &mut Inherited,
    ) -> Result<(), String> {
        let devs: Vec<OwnedFd> = (0..fuse.conns as usize)
            .filter_map(|i| inherited.take(&names::fuse(&rec.name, fuse.id, i)))
            .collect();
        if devs.len() != fuse.conns as usize {
            warn!(
                "{}: {} of its {} FUSE descriptors were passed on; requests read on the others \
                 were failed by the kernel when they closed",
                rec.name,
                devs.len(),
                fuse.conns
            );
        }
        let export = self.new_export(
            &rec.name,
            rec.size,
            ExportKind::Volume,
            fuse.direct,
            Some((rec, stored)),
        )?;
        if let Err(e) = self.frontend.adopt(&export, fuse, devs) {
            // The old connection is gone with its descriptors: what it
            // held failed; the export itself goes on, mounted again.
            warn!(
                "{}: cannot take its FUSE connection over: {e}; mounting it again",
                rec.name
            );
            self.frontend
                .add(&export, fuse.device.is_some(), fuse.direct, self.next_id())
                .map_err(|e| format!("export {}: {e}", rec.name))?;
        }
        self.exports.write().push(export);
        Ok(())
    }
}
