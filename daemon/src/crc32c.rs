//! CRC-32C (Castagnoli, polynomial 0x1EDC6F41 reflected), table-driven: the
//! checksum of the S3 backend's log records, and (without the final
//! inversion) the one fio's `--verify=crc32c` writes.

const POLY: u32 = 0x82F6_3B78;

const TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Feeds `data` into the CRC register `crc` (no inversions).
pub fn update(crc: u32, data: &[u8]) -> u32 {
    data.iter().fold(crc, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// The standard CRC-32C of the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u32 {
    !parts.iter().fold(!0u32, |c, p| update(c, p))
}

#[cfg(test)]
mod tests {
    #[test]
    fn check_value() {
        assert_eq!(super::checksum(&[b"123456789"]), 0xE306_9283);
        assert_eq!(super::checksum(&[b"1234", b"56789"]), 0xE306_9283);
    }
}
