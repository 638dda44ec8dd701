//! ublk (drivers/block/ublk_drv.c, Documentation/block/ublk.rst): the
//! control device and the layouts (`sys`), a queue as its server runs it
//! (`queue`), and the checking of a queue's descriptors against an
//! export's geometry. The broker's ublk frontend uses them as the device's
//! server in relay mode.

pub mod queue;
pub mod sys;

use holdfast_proto::shm::Op;

use self::sys::{IoDesc, ParamBasic, ParamDiscard, Params};

/// The parameters of a device of `size` bytes with `block_size` logical
/// blocks and tag buffers of `max_io` bytes (the largest request).
pub fn params(size: u64, block_size: u32, max_io: u32) -> Params {
    let shift = |n: u32| u8::try_from(n.trailing_zeros()).unwrap_or(9);
    let sectors = max_io >> 9;
    Params {
        len: u32::try_from(size_of::<Params>()).unwrap_or(0),
        types: sys::PARAM_TYPE_BASIC | sys::PARAM_TYPE_DISCARD,
        basic: ParamBasic {
            // Writes are cached until a flush (the daemon's page cache, a
            // WAL): the kernel must send flushes.
            attrs: sys::ATTR_VOLATILE_CACHE,
            logical_bs_shift: shift(block_size),
            physical_bs_shift: 12,
            io_opt_shift: 12,
            io_min_shift: shift(block_size),
            max_sectors: sectors,
            dev_sectors: size >> 9,
            ..ParamBasic::default()
        },
        discard: ParamDiscard {
            discard_granularity: block_size,
            max_discard_sectors: sectors,
            max_write_zeroes_sectors: sectors,
            max_discard_segments: 1,
            ..ParamDiscard::default()
        },
        pad: 0,
    }
}

/// Bytes of a queue's descriptor array mapping: the driver maps exactly
/// round_up(depth * descriptor, PAGE_SIZE) (ublk_ch_mmap, 6.12), with the
/// page size of the running kernel, not 4 KiB.
pub fn descs_len(depth: u16, page_size: usize) -> usize {
    usize::from(depth)
        .saturating_mul(size_of::<IoDesc>())
        .next_multiple_of(page_size)
}

/// The request in a descriptor, checked against an export of `size` bytes
/// and tag buffers of `slot_size`: op, byte offset and length, or the
/// errno to fail it with.
pub fn parse(d: &IoDesc, size: u64, slot_size: u32) -> Result<(Op, u64, u64), i32> {
    let op = match (d.op_flags & 0xff) as u8 {
        sys::IO_OP_READ => Op::Read,
        sys::IO_OP_WRITE => Op::Write,
        sys::IO_OP_FLUSH => Op::Flush,
        sys::IO_OP_DISCARD => Op::Discard,
        sys::IO_OP_WRITE_ZEROES => Op::WriteZeroes,
        _ => return Err(libc::EOPNOTSUPP),
    };
    if op == Op::Flush {
        // A flush has no range: the block layer's flush request starts
        // at sector -1 (blk_rq_init), which checked arithmetic refuses.
        return Ok((op, 0, 0));
    }
    let offset = d.start_sector.checked_mul(512).ok_or(libc::EINVAL)?;
    let len = u64::from(d.nr_sectors)
        .checked_mul(512)
        .ok_or(libc::EINVAL)?;
    let end = offset.checked_add(len).ok_or(libc::EINVAL)?;
    if end > size || (op.uses_buffer() && len > u64::from(slot_size)) {
        return Err(libc::EINVAL);
    }
    Ok((op, offset, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(op: u8, start_sector: u64, nr_sectors: u32) -> IoDesc {
        IoDesc {
            op_flags: u32::from(op),
            nr_sectors,
            start_sector,
            ..IoDesc::default()
        }
    }

    #[test]
    fn the_descriptor_mapping_is_whole_pages_of_this_kernel() {
        // 24-byte descriptors: 64 tags fill 1536 bytes, 200 fill 4800.
        assert_eq!(descs_len(64, 4096), 4096);
        assert_eq!(descs_len(200, 4096), 8192);
        assert_eq!(descs_len(64, 65536), 65536);
        assert_eq!(descs_len(4096, 16384), 98304);
    }

    /// Every descriptor is checked; a flush's range is not one (the block
    /// layer's flush request starts at sector -1): it used to fail with
    /// EINVAL, so every fsync of a ublk device did.
    #[test]
    fn descriptors_are_checked() {
        let p = |d: IoDesc| parse(&d, 1 << 20, 4096);
        assert_eq!(p(desc(sys::IO_OP_READ, 8, 8)), Ok((Op::Read, 4096, 4096)));
        assert_eq!(
            p(desc(sys::IO_OP_FLUSH, u64::MAX, 0)),
            Ok((Op::Flush, 0, 0))
        );
        assert_eq!(p(desc(sys::IO_OP_WRITE, 2047, 2)), Err(libc::EINVAL));
        assert_eq!(p(desc(sys::IO_OP_WRITE, 0, 16)), Err(libc::EINVAL));
        assert_eq!(p(desc(sys::IO_OP_READ, u64::MAX, 1)), Err(libc::EINVAL));
        assert_eq!(
            p(desc(sys::IO_OP_DISCARD, 0, 2048)),
            Ok((Op::Discard, 0, 1 << 20))
        );
        assert_eq!(p(desc(0x7f, 0, 1)), Err(libc::EOPNOTSUPP));
    }
}
