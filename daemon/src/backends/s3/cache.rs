//! The read cache: bytes of chunk objects on local disk, fetched with
//! ranged GETs in 64 KiB fill blocks. Chunk objects are never rewritten
//! (every upload has a new key), so a cached block never goes stale.
//!
//! One file per cached chunk object, `c-KEY` with '/' as '_': a 4 KiB
//! header (magic, chunk size, a bitmap of the fill blocks present), then the
//! chunk's bytes. A block's bit is set only after its bytes were written;
//! that order holds through a process crash (the page cache keeps both),
//! not through a power loss, so the cache is emptied when the boot id
//! changes. The least recently used chunks go when it grows past its limit.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::store::Failure;

/// The unit of a fetch and of the bitmap.
pub const FILL: u64 = 64 << 10;
const HEADER: u64 = 4096;
const MAGIC: &[u8; 8] = b"HFCACHE1";
const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
/// The most entries (each an open file) the cache keeps, whatever its
/// limit in bytes: random reads of small chunks would otherwise open a file
/// per chunk touched and run into the descriptor limit (EMFILE).
const MAX_ENTRIES: usize = 256;

struct Entry {
    file: Arc<File>,
    present: Vec<u8>,
    used: u64,
}

impl Entry {
    fn has(&self, block: u64) -> bool {
        self.present
            .get((block / 8) as usize)
            .is_some_and(|b| b & (1 << (block % 8)) != 0)
    }

    fn blocks(&self) -> u64 {
        self.present.iter().map(|b| u64::from(b.count_ones())).sum()
    }
}

struct Inner {
    /// By file name (see [`file_name`]), which is what survives a restart.
    entries: HashMap<String, Entry>,
    tick: u64,
    /// Fill blocks present in all entries.
    blocks: u64,
}

pub struct Cache {
    dir: PathBuf,
    chunk_size: u64,
    /// Fill blocks allowed.
    limit: u64,
    inner: Mutex<Inner>,
    /// Reads served without a fetch, and reads that fetched.
    hits: AtomicU64,
    misses: AtomicU64,
}

fn file_name(key: &str) -> String {
    format!("c-{}", key.replace('/', "_"))
}

fn bitmap_len(chunk_size: u64) -> usize {
    chunk_size.div_ceil(FILL).div_ceil(8) as usize
}

impl Cache {
    /// Opens the cache in `dir`, keeping what a previous daemon cached
    /// since the last boot; `limit` is in bytes.
    pub fn open(dir: &Path, chunk_size: u64, limit: u64) -> io::Result<Self> {
        super::wal::ensure_dir(dir)?;
        let boot = std::fs::read_to_string(BOOT_ID).unwrap_or_default();
        let boot_file = dir.join("boot_id");
        let same_boot = std::fs::read_to_string(&boot_file).is_ok_and(|b| b == boot);
        let mut inner = Inner {
            entries: HashMap::new(),
            tick: 0,
            blocks: 0,
        };
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("c-") {
                continue;
            }
            let loaded = if same_boot {
                Self::load(&entry.path(), chunk_size)
            } else {
                None
            };
            match loaded {
                Some(e) => {
                    inner.blocks += e.blocks();
                    inner.entries.insert(name, e);
                }
                None => std::fs::remove_file(entry.path())?,
            }
        }
        if !same_boot {
            std::fs::write(&boot_file, boot)?;
        }
        let cache = Self {
            dir: dir.to_path_buf(),
            chunk_size,
            limit: (limit / FILL).max(1),
            inner: Mutex::new(inner),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        };
        cache.trim(&mut cache.inner.lock());
        Ok(cache)
    }

    fn load(path: &Path, chunk_size: u64) -> Option<Entry> {
        let file = OpenOptions::new().read(true).write(true).open(path).ok()?;
        let mut h = vec![0u8; 16 + bitmap_len(chunk_size)];
        file.read_exact_at(&mut h, 0).ok()?;
        if &h[..8] != MAGIC || h[8..16] != chunk_size.to_le_bytes() {
            return None;
        }
        Some(Entry {
            file: Arc::new(file),
            present: h[16..].to_vec(),
            used: 0,
        })
    }

    /// The entry for `key` (created empty), marked used; returns its file.
    fn entry(&self, inner: &mut Inner, key: &str) -> io::Result<Arc<File>> {
        inner.tick += 1;
        let tick = inner.tick;
        let name = file_name(key);
        if let Some(e) = inner.entries.get_mut(&name) {
            e.used = tick;
            return Ok(e.file.clone());
        }
        let path = self.dir.join(&name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&self.chunk_size.to_le_bytes());
        h.resize(16 + bitmap_len(self.chunk_size), 0);
        file.write_all_at(&h, 0)?;
        let file = Arc::new(file);
        inner.entries.insert(
            name,
            Entry {
                file: file.clone(),
                present: vec![0; bitmap_len(self.chunk_size)],
                used: tick,
            },
        );
        Ok(file)
    }

    /// Marks blocks `[first, end)` of `key` present, if its entry still is
    /// the file they were written to.
    fn mark(&self, key: &str, file: &Arc<File>, first: u64, end: u64) {
        let mut inner = self.inner.lock();
        let Some(e) = inner.entries.get_mut(&file_name(key)) else {
            return;
        };
        if !Arc::ptr_eq(&e.file, file) {
            return;
        }
        let mut added = 0;
        for b in first..end {
            if let Some(byte) = e.present.get_mut((b / 8) as usize) {
                if *byte & (1 << (b % 8)) == 0 {
                    added += 1;
                }
                *byte |= 1 << (b % 8);
            }
        }
        // Data first, then the bits that vouch for it.
        if e.file.write_all_at(&e.present, 16).is_err() {
            crate::log(&format!(
                "read cache: cannot update {}; dropping it",
                file_name(key)
            ));
            drop(inner);
            self.evict(key);
            return;
        }
        inner.blocks += added;
        self.trim(&mut inner);
    }

    /// Drops least recently used entries until the cache fits its limits.
    fn trim(&self, inner: &mut Inner) {
        while (inner.blocks > self.limit && inner.entries.len() > 1)
            || inner.entries.len() > MAX_ENTRIES
        {
            let Some(oldest) = inner
                .entries
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                return;
            };
            if let Some(e) = inner.entries.remove(&oldest) {
                inner.blocks -= e.blocks();
                let _ = std::fs::remove_file(self.dir.join(&oldest));
            }
        }
    }

    /// Forgets chunk object `key` (it was replaced).
    /// Reads served from the cache alone, and reads that fetched.
    pub fn hits_and_misses(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    pub fn evict(&self, key: &str) {
        let mut inner = self.inner.lock();
        let name = file_name(key);
        if let Some(e) = inner.entries.remove(&name) {
            inner.blocks -= e.blocks();
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }

    /// Fills `buf` with the bytes of chunk object `key` at `offset`,
    /// fetching the missing fill blocks with `fetch(offset, len)`.
    pub fn read<D: AsRef<[u8]>>(
        &self,
        key: &str,
        offset: u64,
        buf: &mut [u8],
        fetch: impl Fn(u64, u64) -> Result<D, Failure>,
    ) -> Result<(), Failure> {
        let end = offset + buf.len() as u64;
        if buf.is_empty() || end > self.chunk_size {
            return Err(Failure::Permanent(format!(
                "read cache: {} bytes at {offset} is outside a chunk",
                buf.len()
            )));
        }
        let io_err = |e: io::Error| Failure::Permanent(format!("read cache: {e}"));
        let (first, last) = (offset / FILL, (end - 1) / FILL);
        let (file, missing) = {
            let mut inner = self.inner.lock();
            let file = self.entry(&mut inner, key).map_err(io_err)?;
            let e = inner.entries.get(&file_name(key));
            let missing: Vec<u64> = (first..=last)
                .filter(|&b| !e.is_some_and(|e| e.has(b)))
                .collect();
            (file, missing)
        };
        let counter = if missing.is_empty() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        // Fetch each run of missing blocks with one ranged GET.
        let mut i = 0;
        while i < missing.len() {
            let mut j = i + 1;
            while j < missing.len() && missing[j] == missing[j - 1] + 1 {
                j += 1;
            }
            let (from, to) = (missing[i], missing[j - 1] + 1);
            let start = from * FILL;
            let len = (to * FILL).min(self.chunk_size) - start;
            let data = fetch(start, len)?;
            let data = data.as_ref();
            // Serve from what was fetched, so a full cache disk costs
            // only the caching.
            let lo = start.max(offset);
            let hi = (start + len).min(end);
            buf[(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&data[(lo - start) as usize..(hi - start) as usize]);
            match file.write_all_at(data, HEADER + start) {
                Ok(()) => self.mark(key, &file, from, to),
                Err(e) => crate::log(&format!("read cache: cannot write {key}: {e}")),
            }
            i = j;
        }
        // The blocks that were present.
        let mut b = first;
        while b <= last {
            if missing.binary_search(&b).is_ok() {
                b += 1;
                continue;
            }
            let lo = (b * FILL).max(offset);
            let hi = ((b + 1) * FILL).min(end);
            file.read_exact_at(
                &mut buf[(lo - offset) as usize..(hi - offset) as usize],
                HEADER + lo,
            )
            .map_err(io_err)?;
            b += 1;
        }
        Ok(())
    }

    /// Caches a whole chunk object just uploaded.
    pub fn insert(&self, key: &str, data: &[u8]) {
        let file = match self.entry(&mut self.inner.lock(), key) {
            Ok(f) => f,
            Err(e) => {
                crate::log(&format!("read cache: cannot add {key}: {e}"));
                return;
            }
        };
        if file.write_all_at(data, HEADER).is_ok() {
            self.mark(key, &file, 0, (data.len() as u64).div_ceil(FILL));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn fetches_missing_blocks_once_and_evicts_oldest() {
        let d = std::env::temp_dir().join(format!("holdfast-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let cs = 4 * FILL;
        let object: Vec<u8> = (0..cs).map(|i| (i % 251) as u8).collect();
        let fetched = AtomicU64::new(0);
        let fetch = |off: u64, len: u64| {
            fetched.fetch_add(len, Ordering::SeqCst);
            Ok(object[off as usize..(off + len) as usize].to_vec())
        };
        let cache = Cache::open(&d, cs, 8 * FILL).unwrap();
        let mut buf = vec![0u8; 100];
        cache.read("k/1", FILL - 50, &mut buf, fetch).unwrap();
        assert_eq!(buf, object[(FILL - 50) as usize..(FILL + 50) as usize]);
        assert_eq!(fetched.load(Ordering::SeqCst), 2 * FILL);
        cache.read("k/1", 10, &mut buf, fetch).unwrap();
        assert_eq!(fetched.load(Ordering::SeqCst), 2 * FILL);
        assert_eq!(buf, object[10..110]);
        drop(cache);

        // Kept across a reopen within one boot.
        let cache = Cache::open(&d, cs, 8 * FILL).unwrap();
        let mut all = vec![0u8; cs as usize];
        cache.read("k/1", 0, &mut all, fetch).unwrap();
        assert_eq!(all, object);
        assert_eq!(fetched.load(Ordering::SeqCst), 4 * FILL);

        // A third chunk pushes the least recently used one out.
        cache.insert("k/2", &object);
        cache.read("k/1", 0, &mut buf, fetch).unwrap();
        cache.insert("k/3", &object);
        assert!(cache.inner.lock().entries.contains_key(&file_name("k/1")));
        assert!(!cache.inner.lock().entries.contains_key(&file_name("k/2")));
        assert!(!d.join(file_name("k/2")).exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Many chunks touched once each (random reads of a volume of small
    /// chunks) keep at most MAX_ENTRIES files open, however much room the
    /// limit in bytes leaves.
    #[test]
    fn open_files_are_bounded() {
        let d = std::env::temp_dir().join(format!("holdfast-cache-n-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let cache = Cache::open(&d, FILL, 1 << 40).unwrap();
        let mut buf = [0u8; 10];
        for i in 0..MAX_ENTRIES + 50 {
            cache
                .read(&format!("k/{i}"), 0, &mut buf, |_, len| {
                    Ok(vec![1; len as usize])
                })
                .unwrap();
        }
        assert_eq!(cache.inner.lock().entries.len(), MAX_ENTRIES);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), MAX_ENTRIES + 1); // + boot_id
        std::fs::remove_dir_all(&d).unwrap();
    }
}
