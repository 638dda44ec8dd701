//! CRC-32C (Castagnoli): the checksum of the S3 backend's log records, and
//! (without the final inversion) the one fio's `--verify=crc32c` writes.
//! The `crc32c` crate uses the CPU's CRC instructions where present: the
//! log's reads check whole records, so the checksum is on the read path.

/// The standard CRC-32C of the concatenation of `parts`.
pub fn checksum(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |c, p| ::crc32c::crc32c_append(c, p))
}

/// fio's variant: seeded with all ones, not inverted at the end.
pub fn fio(data: &[u8]) -> u32 {
    !::crc32c::crc32c(data)
}

#[cfg(test)]
mod tests {
    #[test]
    fn check_value() {
        assert_eq!(super::checksum(&[b"123456789"]), 0xE306_9283);
        assert_eq!(super::checksum(&[b"1234", b"56789"]), 0xE306_9283);
        assert_eq!(super::fio(b"123456789"), !0xE306_9283);
    }
}
