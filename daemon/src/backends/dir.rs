//! `dir:PATH`: the blobs of a blob export (cachefiles: erofs images and
//! their data blobs), one file per blob in a directory, named by the blob's
//! name. Read-only, so it needs no lease: a stale daemon cannot change what
//! a successor serves.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use holdfast_proto::ExportKind;
use parking_lot::RwLock;

use super::Backend;
use crate::Error;

pub struct DirBackend {
    dir: PathBuf,
    /// Open blobs by the broker's object number.
    blobs: RwLock<HashMap<u32, File>>,
}

/// Opens the directory of blobs.
pub fn open(dir: &Path) -> Result<DirBackend, Error> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| Error::io(format!("blob directory {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(Error::io(
            format!("blob directory {}", dir.display()),
            io::Error::from_raw_os_error(libc::ENOTDIR),
        ));
    }
    Ok(DirBackend {
        dir: dir.to_path_buf(),
        blobs: RwLock::new(HashMap::new()),
    })
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

/// A blob name is one plain file name in the directory.
fn check_name(name: &[u8]) -> io::Result<&str> {
    let name = std::str::from_utf8(name).map_err(|_| errno(libc::ENOENT))?;
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(errno(libc::ENOENT));
    }
    Ok(name)
}

impl Backend for DirBackend {
    fn kind(&self) -> ExportKind {
        ExportKind::Blobs
    }

    fn acquire_lease(&self, _timeout: Duration) -> Result<(), Error> {
        Ok(())
    }

    fn release_lease(&self) -> Result<(), Error> {
        Ok(())
    }

    fn read(&self, _offset: u64, _buf: &mut [u8]) -> io::Result<()> {
        Err(errno(libc::EOPNOTSUPP))
    }

    fn write(&self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
        Err(errno(libc::EROFS))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn open_blob(&self, object: u32, name: &[u8]) -> io::Result<u64> {
        let file = File::open(self.dir.join(check_name(name)?))?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(errno(libc::ENOENT));
        }
        self.blobs.write().insert(object, file);
        Ok(meta.len())
    }

    fn read_blob(&self, object: u32, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let blobs = self.blobs.read();
        // An object the broker never opened here is a broker bug: EIO.
        let file = blobs.get(&object).ok_or_else(|| errno(libc::EIO))?;
        super::read_full(file, offset, buf)
    }

    fn close_blob(&self, object: u32) {
        self.blobs.write().remove(&object);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_open_read_close() {
        let dir = std::env::temp_dir().join(format!("holdfast-dir-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("img"), b"0123456789").unwrap();
        let b = open(&dir).unwrap();
        assert_eq!(b.open_blob(3, b"img").unwrap(), 10);
        let mut buf = [0u8; 8];
        b.read_blob(3, 6, &mut buf).unwrap();
        assert_eq!(&buf, b"6789\0\0\0\0");
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"../img",
            b"sub",
            b"missing",
            b"\xff",
        ] {
            assert!(b.open_blob(4, bad).is_err(), "{bad:?}");
        }
        b.close_blob(3);
        assert_eq!(
            b.read_blob(3, 0, &mut buf).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        assert!(open(&dir.join("img")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
