//! Self-describing 4 KiB blocks for the writer/verifier: each block says
//! which block it is, which write generation, and carries a checksum, so a
//! read-back tells a stale block from a torn or misplaced one.

/// Block size of the pattern.
pub const BLOCK: usize = 4096;
const MAGIC: u64 = u64::from_le_bytes(*b"HFVERIFY");
const HEADER: usize = 32;
const SUM_AT: usize = BLOCK - 8;

/// What a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// All zeroes (never written).
    Zero,
    /// A valid pattern block.
    Block {
        block: u64,
        generation: u64,
        seed: u64,
    },
    /// Anything else: torn, corrupted, or not ours.
    Corrupt,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Fills `buf` (one block) with the pattern of `block` at `generation`.
pub fn fill(buf: &mut [u8], seed: u64, block: u64, generation: u64) {
    assert_eq!(buf.len(), BLOCK);
    buf[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    buf[8..16].copy_from_slice(&block.to_le_bytes());
    buf[16..24].copy_from_slice(&generation.to_le_bytes());
    buf[24..32].copy_from_slice(&seed.to_le_bytes());
    let mut rng = crate::Rng::new(
        seed ^ block.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ generation.wrapping_mul(0xc2b2_ae3d_27d4_eb4f),
    );
    rng.fill(&mut buf[HEADER..SUM_AT]);
    let sum = fnv1a(&buf[..SUM_AT]);
    buf[SUM_AT..].copy_from_slice(&sum.to_le_bytes());
}

/// Reads what a block holds.
pub fn inspect(buf: &[u8]) -> Found {
    if buf.iter().all(|&b| b == 0) {
        return Found::Zero;
    }
    let word = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
    if buf.len() != BLOCK || word(0) != MAGIC || word(SUM_AT) != fnv1a(&buf[..SUM_AT]) {
        return Found::Corrupt;
    }
    Found::Block {
        block: word(8),
        generation: word(16),
        seed: word(24),
    }
}

/// Checks that `buf` is `block` at `generation` (0 = never written).
pub fn check(buf: &[u8], seed: u64, block: u64, generation: u64) -> Result<(), String> {
    let found = inspect(buf);
    let want = if generation == 0 {
        Found::Zero
    } else {
        Found::Block {
            block,
            generation,
            seed,
        }
    };
    if found == want {
        Ok(())
    } else {
        Err(format!(
            "block {block}: expected generation {generation}, found {found:?}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_detection() {
        let mut b = vec![0u8; BLOCK];
        assert_eq!(inspect(&b), Found::Zero);
        fill(&mut b, 7, 3, 9);
        assert!(check(&b, 7, 3, 9).is_ok());
        assert!(check(&b, 7, 3, 8).is_err());
        assert!(check(&b, 7, 4, 9).is_err());
        b[100] ^= 1;
        assert_eq!(inspect(&b), Found::Corrupt);
    }
}
