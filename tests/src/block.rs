//! Block-device helpers: fio, a file-system mount guard, and an oracle of
//! our own for what fio wrote.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{AlignedBuf, Scratch, open_direct};

/// Fails the test with a clear message unless `tool` is installed.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).exists()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: apt-get install {package} (.ci/run does)"
    );
}

/// Runs fio with `args` (job options, without output options) and returns
/// its JSON report, failing the test if fio failed, reported an error or
/// took longer than `timeout`.
pub fn fio(scratch: &Scratch, name: &str, args: &[String], timeout: Duration) -> serde_json::Value {
    require_tool("fio", "fio");
    let out = scratch.path(&format!("fio-{name}.json"));
    let mut cmd = Command::new("fio");
    cmd.arg(format!("--name={name}"))
        .arg("--output-format=json")
        .arg(format!("--output={}", out.display()))
        .args(args);
    let mut p = scratch.spawn(&mut cmd, &format!("fio-{name}.log"));
    let status = p.wait_timeout(timeout).unwrap_or_else(|| {
        panic!(
            "fio {name} still running after {timeout:?}:\n{}",
            p.log_text()
        )
    });
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    // fio prints notes before the JSON document in the same file.
    let json = text.find('{').map_or("", |i| &text[i..]);
    let report: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| {
        panic!(
            "fio {name}: no JSON report ({e}):\n{text}\n{}",
            p.log_text()
        )
    });
    assert!(
        status.success(),
        "fio {name} failed ({status}):\n{}\n{report}",
        p.log_text()
    );
    for job in report["jobs"].as_array().into_iter().flatten() {
        assert_eq!(job["error"], 0, "fio {name} job error: {job}");
    }
    report
}

/// fio job options: random 4 KiB writes over `size` bytes of `dev` at queue
/// depth 16, then every block read back and verified.
pub fn fio_verify_args(dev: &Path, size: u64, seed: u64) -> Vec<String> {
    [
        format!("--filename={}", dev.display()),
        "--direct=1".into(),
        "--ioengine=io_uring".into(),
        "--iodepth=16".into(),
        "--rw=randwrite".into(),
        "--bs=4k".into(),
        format!("--size={size}"),
        format!("--randseed={seed}"),
        "--verify=crc32c".into(),
        "--do_verify=1".into(),
        "--verify_fatal=1".into(),
        // fio otherwise leaves local-*-verify.state files in the cwd.
        "--verify_state_save=0".into(),
    ]
    .into()
}

/// A mounted file system, lazily unmounted when dropped (also when the test
/// fails), so that a failed test leaves no mount behind.
pub struct Mounted {
    pub dir: PathBuf,
    mounted: bool,
}

impl Mounted {
    pub fn new(device: &Path, dir: &Path, fstype: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .arg("-t")
            .arg(fstype)
            .arg(device)
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount {}: {out:?}", device.display());
        Self {
            dir: dir.to_path_buf(),
            mounted: true,
        }
    }

    /// Unmounts now (not lazily): every dirty block is written back, which
    /// fails the test if the device fails.
    pub fn unmount(mut self) {
        let out = Command::new("umount").arg(&self.dir).output().unwrap();
        assert!(
            out.status.success(),
            "umount {}: {out:?}",
            self.dir.display()
        );
        self.mounted = false;
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = rustix::mount::unmount(&self.dir, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// CRC-32C (Castagnoli) as fio's `--verify=crc32c` computes it: seeded
/// with all ones but, unlike the standard one, not inverted at the end.
pub fn fio_crc32c(data: &[u8]) -> u32 {
    holdfast_daemon::crc32c::fio(data)
}

/// fio's `struct verify_header` (fio 3.x, verify.h): magic 0xacca, verify
/// type, block length, seed, offset, time, thread, number, and a CRC-32C of
/// the header's first 36 bytes; with `--verify=crc32c` a CRC-32C of the
/// rest of the block follows it.
const FIO_MAGIC: u16 = 0xacca;
const FIO_HEADER: usize = 40;
const FIO_HEADER_CRC_AT: usize = 36;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Checks one block fio wrote with `--verify=crc32c` at `offset`; returns
/// what is wrong with it.
pub fn check_fio_block(b: &[u8], offset: u64) -> Result<(), String> {
    if le16(b, 0) != FIO_MAGIC {
        return Err(format!(
            "offset {offset}: no fio header (magic {:#x})",
            le16(b, 0)
        ));
    }
    if le32(b, 4) as usize != b.len() || le64(b, 16) != offset {
        return Err(format!(
            "offset {offset}: header says {} bytes at offset {}",
            le32(b, 4),
            le64(b, 16)
        ));
    }
    if fio_crc32c(&b[..FIO_HEADER_CRC_AT]) != le32(b, FIO_HEADER_CRC_AT) {
        return Err(format!("offset {offset}: header checksum mismatch"));
    }
    if fio_crc32c(&b[FIO_HEADER + 4..]) != le32(b, FIO_HEADER) {
        return Err(format!("offset {offset}: data checksum mismatch"));
    }
    Ok(())
}

/// The second oracle after fio: reads `len` bytes of the device and of the
/// daemon's backing file `img` in `block`-byte blocks, both with O_DIRECT;
/// every block must be the same in both and be a block fio wrote, intact.
pub fn check_fio_device(device: &Path, img: &Path, len: u64, block: usize) {
    check_fio_blocks(device, Some(img), len, block);
}

/// [`check_fio_device`], with the backing file compared only if there is
/// one (a `mem` backend has none).
pub fn check_fio_blocks(device: &Path, img: Option<&Path>, len: u64, block: usize) {
    use std::os::unix::fs::FileExt;
    let (dev, file) = (open_direct(device), img.map(open_direct));
    let chunk = 1 << 20;
    let (mut a, mut b) = (AlignedBuf::new(chunk), AlignedBuf::new(chunk));
    let mut bad = Vec::new();
    let mut at = 0u64;
    while at < len {
        dev.read_exact_at(&mut a, at).unwrap();
        match &file {
            Some(f) => f.read_exact_at(&mut b, at).unwrap(),
            None => b.copy_from_slice(&a),
        }
        for (i, (x, y)) in a.chunks(block).zip(b.chunks(block)).enumerate() {
            let off = at + (i * block) as u64;
            if x != y {
                bad.push(format!(
                    "offset {off}: the device and the backing file differ"
                ));
            } else if let Err(e) = check_fio_block(x, off) {
                bad.push(e);
            }
        }
        at += chunk as u64;
    }
    assert!(
        bad.is_empty(),
        "{} bad blocks of {}, first: {:?}",
        bad.len(),
        len / block as u64,
        &bad[..bad.len().min(5)]
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_crc32c_is_the_standard_check_value_inverted() {
        assert_eq!(!fio_crc32c(b"123456789"), 0xE306_9283);
    }
}
