//! Typed parsing of FUSE requests (include/uapi/linux/fuse.h). Every length
//! is checked against the bytes the kernel delivered before a field is used.
#![cfg_attr(
    not(test),
    deny(clippy::arithmetic_side_effects, clippy::indexing_slicing)
)]

use fuse_abi::linux::{
    fuse_fallocate_in, fuse_fsync_in, fuse_in_header, fuse_opcode, fuse_open_in, fuse_read_in,
    fuse_setattr_in, fuse_write_in,
};
use zerocopy::FromBytes;

/// Size of the request header.
pub const IN_HEADER_LEN: usize = size_of::<fuse_in_header>();
/// Bytes read into private memory: the header plus a WRITE's arguments, so
/// that a WRITE's data lands exactly at the start of the slot buffer.
pub const HEAD_LEN: usize = IN_HEADER_LEN + size_of::<fuse_write_in>();

/// Largest argument block the broker parses (names, INIT, SETATTR...);
/// anything longer belongs to an op the broker does not implement.
pub const MAX_ARGS_LEN: usize = 4096;

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub enum FuseOp<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u64,
    },
    Destroy,
    Lookup {
        name: &'a [u8],
    },
    /// FORGET and BATCH_FORGET: no reply.
    Forget,
    Getattr,
    Setattr(fuse_setattr_in),
    Open {
        flags: u32,
    },
    Opendir,
    Readdir {
        offset: u64,
        size: u32,
    },
    Release,
    Releasedir,
    Read {
        offset: u64,
        size: u32,
    },
    /// The data follows in the body buffer.
    Write {
        offset: u64,
        size: u32,
    },
    Flush,
    Fsync {
        datasync: bool,
    },
    Fsyncdir,
    Fallocate {
        offset: u64,
        length: u64,
        mode: u32,
    },
    Statfs,
    Access,
    /// INTERRUPT: no reply; the broker lets requests finish.
    Interrupt,
    /// Any other opcode: answered ENOSYS.
    Unsupported(u32),
}

/// Why a request could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// The arguments are shorter than the opcode needs.
    Short {
        opcode: u32,
        need: usize,
        have: usize,
    },
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Short { opcode, need, have } => write!(
                f,
                "FUSE opcode {opcode}: arguments of {have} bytes, at least {need} needed"
            ),
        }
    }
}

/// Parses the header from the start of `head`.
pub fn header(head: &[u8]) -> Option<fuse_in_header> {
    fuse_in_header::read_from_prefix(head).ok().map(|(h, _)| h)
}

fn args<T: FromBytes>(opcode: u32, payload: &[u8]) -> Result<T, ParseError> {
    T::read_from_prefix(payload)
        .map(|(v, _)| v)
        .map_err(|_| ParseError::Short {
            opcode,
            need: size_of::<T>(),
            have: payload.len(),
        })
}

fn u32_at(payload: &[u8], at: usize) -> Option<u32> {
    let end = at.checked_add(4)?;
    let b: [u8; 4] = payload.get(at..end)?.try_into().ok()?;
    Some(u32::from_ne_bytes(b))
}

/// Parses the arguments following the header. `payload` is everything after
/// the header for most ops; for WRITE, just the `fuse_write_in`.
pub fn parse(opcode: u32, payload: &[u8]) -> Result<FuseOp<'_>, ParseError> {
    use fuse_opcode as o;
    let is = |op: o| opcode == op as u32;
    Ok(if is(o::FUSE_INIT) {
        // fuse_init_in grew over time: major, minor, max_readahead, flags are
        // always there (16 bytes); flags2 (7.36) extends the flags.
        let short = ParseError::Short {
            opcode,
            need: 16,
            have: payload.len(),
        };
        let major = u32_at(payload, 0).ok_or(short)?;
        let minor = u32_at(payload, 4).ok_or(short)?;
        let max_readahead = u32_at(payload, 8).ok_or(short)?;
        let flags = u32_at(payload, 12).ok_or(short)?;
        let flags2 = u32_at(payload, 16).unwrap_or(0);
        FuseOp::Init {
            major,
            minor,
            max_readahead,
            flags: u64::from(flags) | (u64::from(flags2) << 32),
        }
    } else if is(o::FUSE_DESTROY) {
        FuseOp::Destroy
    } else if is(o::FUSE_LOOKUP) {
        // A NUL-terminated name.
        let end = payload
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(payload.len());
        FuseOp::Lookup {
            name: payload.get(..end).unwrap_or_default(),
        }
    } else if is(o::FUSE_FORGET) || is(o::FUSE_BATCH_FORGET) {
        FuseOp::Forget
    } else if is(o::FUSE_GETATTR) {
        FuseOp::Getattr
    } else if is(o::FUSE_SETATTR) {
        FuseOp::Setattr(args(opcode, payload)?)
    } else if is(o::FUSE_OPEN) {
        FuseOp::Open {
            flags: args::<fuse_open_in>(opcode, payload)?.flags,
        }
    } else if is(o::FUSE_OPENDIR) {
        FuseOp::Opendir
    } else if is(o::FUSE_READDIR) {
        let r: fuse_read_in = args(opcode, payload)?;
        FuseOp::Readdir {
            offset: r.offset,
            size: r.size,
        }
    } else if is(o::FUSE_RELEASE) {
        FuseOp::Release
    } else if is(o::FUSE_RELEASEDIR) {
        FuseOp::Releasedir
    } else if is(o::FUSE_READ) {
        let r: fuse_read_in = args(opcode, payload)?;
        FuseOp::Read {
            offset: r.offset,
            size: r.size,
        }
    } else if is(o::FUSE_WRITE) {
        let w: fuse_write_in = args(opcode, payload)?;
        FuseOp::Write {
            offset: w.offset,
            size: w.size,
        }
    } else if is(o::FUSE_FLUSH) {
        FuseOp::Flush
    } else if is(o::FUSE_FSYNC) {
        let f: fuse_fsync_in = args(opcode, payload)?;
        FuseOp::Fsync {
            datasync: f.fsync_flags & fuse_abi::linux::FUSE_FSYNC_FDATASYNC != 0,
        }
    } else if is(o::FUSE_FSYNCDIR) {
        FuseOp::Fsyncdir
    } else if is(o::FUSE_FALLOCATE) {
        let f: fuse_fallocate_in = args(opcode, payload)?;
        FuseOp::Fallocate {
            offset: f.offset,
            length: f.length,
            mode: f.mode,
        }
    } else if is(o::FUSE_STATFS) {
        FuseOp::Statfs
    } else if is(o::FUSE_ACCESS) {
        FuseOp::Access
    } else if is(o::FUSE_INTERRUPT) {
        FuseOp::Interrupt
    } else {
        FuseOp::Unsupported(opcode)
    })
}

/// Whether `opcode` is WRITE, whose data follows its arguments: read
/// into the body buffer, it starts at the buffer's start.
pub fn is_write(opcode: u32) -> bool {
    opcode == fuse_opcode::FUSE_WRITE as u32
}

/// Whether the kernel re-sent this request (FUSE_NOTIFY_RESEND, 7.40,
/// Linux 6.9: bit 63 of its unique is set, so that a reply to the first
/// unique no longer matches).
pub fn is_resent(unique: u64) -> bool {
    unique & fuse_abi::linux::FUSE_UNIQUE_RESEND as u64 != 0
}

/// Whether the kernel expects no reply to this opcode.
pub fn is_no_reply(opcode: u32) -> bool {
    opcode == fuse_opcode::FUSE_FORGET as u32
        || opcode == fuse_opcode::FUSE_BATCH_FORGET as u32
        || opcode == fuse_opcode::FUSE_INTERRUPT as u32
}

/// What a request read with [`sys::read_request`](super::sys::read_request)
/// is: `n` bytes, the first [`HEAD_LEN`] in the head, the rest at the start
/// of the body buffer.
#[derive(Debug)]
pub enum Decoded<'a> {
    /// Shorter than a header: there is nothing to answer.
    Runt { n: usize },
    /// Not to be served: answer `errno` (None: the kernel expects no
    /// answer), for the reason `why`.
    Refused {
        header: fuse_in_header,
        errno: Option<i32>,
        why: String,
    },
    /// A WRITE of `size` bytes at `offset`: its data is the body.
    Write {
        header: fuse_in_header,
        offset: u64,
        size: u32,
    },
    /// Any other request, with its arguments parsed.
    Op {
        header: fuse_in_header,
        op: FuseOp<'a>,
    },
}

impl Decoded<'_> {
    /// The request's header, where it has one.
    pub fn header(&self) -> Option<&fuse_in_header> {
        match self {
            Self::Runt { .. } => None,
            Self::Refused { header, .. } | Self::Write { header, .. } | Self::Op { header, .. } => {
                Some(header)
            }
        }
    }
}

/// Decodes a request of `n` bytes whose head is `head`. Arguments that go
/// past the head (names, INIT's) are gathered in `args`, the head's part
/// first and then `rest(len, args)`, which appends the body's first `len`
/// bytes: a caller whose body buffer another process can write copies them
/// out there, so that they cannot change while parsed. Written once for
/// the broker's relay mode and the daemon's direct mode.
pub fn decode<'a>(
    head: &'a [u8; HEAD_LEN],
    n: usize,
    args: &'a mut Vec<u8>,
    rest: impl FnOnce(usize, &mut Vec<u8>),
) -> Decoded<'a> {
    // Only what was read: the head may hold an earlier request's bytes.
    let Some(header) = header(head.get(..n.min(HEAD_LEN)).unwrap_or_default()) else {
        return Decoded::Runt { n };
    };
    let refuse = |errno: i32, why: String| Decoded::Refused {
        header,
        errno: (!is_no_reply(header.opcode)).then_some(errno),
        why,
    };
    if header.len as usize != n {
        return refuse(
            libc::EIO,
            format!(
                "FUSE request {} says {} bytes, {n} were read",
                header.unique, header.len
            ),
        );
    }
    let body_len = n.saturating_sub(HEAD_LEN);
    if is_write(header.opcode) {
        let write_in = head.get(IN_HEADER_LEN..).unwrap_or_default();
        return match parse(header.opcode, write_in) {
            Ok(FuseOp::Write { offset, size }) if size as usize == body_len => Decoded::Write {
                header,
                offset,
                size,
            },
            _ => refuse(
                libc::EINVAL,
                format!("FUSE WRITE {} does not carry its data", header.unique),
            ),
        };
    }
    if n.saturating_sub(IN_HEADER_LEN) > MAX_ARGS_LEN {
        return refuse(
            libc::ENOSYS,
            format!(
                "FUSE opcode {}: arguments past {MAX_ARGS_LEN} bytes",
                header.opcode
            ),
        );
    }
    let in_head = head.get(IN_HEADER_LEN..n.min(HEAD_LEN)).unwrap_or_default();
    let payload: &'a [u8] = if body_len == 0 {
        in_head
    } else {
        args.clear();
        args.extend_from_slice(in_head);
        rest(body_len, args);
        args.as_slice()
    };
    match parse(header.opcode, payload) {
        Ok(op) => Decoded::Op { header, op },
        Err(e) => refuse(libc::EINVAL, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    /// A head for a request of `len` bytes in all, with `args` after the
    /// header (as much as fits the head).
    fn head(opcode: fuse_opcode, len: usize, args: &[u8]) -> [u8; HEAD_LEN] {
        let h = fuse_in_header {
            len: len as u32,
            opcode: opcode as u32,
            unique: 7,
            nodeid: 1,
            ..Default::default()
        };
        let mut head = [0u8; HEAD_LEN];
        head[..IN_HEADER_LEN].copy_from_slice(h.as_bytes());
        let n = args.len().min(HEAD_LEN - IN_HEADER_LEN);
        head[IN_HEADER_LEN..IN_HEADER_LEN + n].copy_from_slice(&args[..n]);
        head
    }

    #[test]
    fn decoding_requests() {
        let mut args = Vec::new();
        let none = |_: usize, _: &mut Vec<u8>| panic!("nothing past the head");
        // Shorter than a header.
        let h = [0u8; HEAD_LEN];
        assert!(matches!(
            decode(&h, 10, &mut args, none),
            Decoded::Runt { n: 10 }
        ));
        // A length that is not what was read: EIO.
        let r = fuse_read_in {
            offset: 0,
            size: 4096,
            ..Default::default()
        };
        let h = head(fuse_opcode::FUSE_READ, 80, r.as_bytes());
        assert!(matches!(
            decode(&h, 72, &mut args, none),
            Decoded::Refused {
                errno: Some(libc::EIO),
                ..
            }
        ));
        // A WRITE whose data is the body, and one whose size is not.
        let w = fuse_write_in {
            offset: 8192,
            size: 4096,
            ..Default::default()
        };
        let h = head(fuse_opcode::FUSE_WRITE, HEAD_LEN + 4096, w.as_bytes());
        assert!(matches!(
            decode(&h, HEAD_LEN + 4096, &mut args, none),
            Decoded::Write {
                offset: 8192,
                size: 4096,
                ..
            }
        ));
        let h = head(fuse_opcode::FUSE_WRITE, HEAD_LEN + 512, w.as_bytes());
        assert!(matches!(
            decode(&h, HEAD_LEN + 512, &mut args, none),
            Decoded::Refused {
                errno: Some(libc::EINVAL),
                ..
            }
        ));
        // A name past the head comes from the body.
        let name = [b'x'; 60];
        let len = IN_HEADER_LEN + name.len();
        let h = head(fuse_opcode::FUSE_LOOKUP, len, &name);
        let rest = |n: usize, out: &mut Vec<u8>| out.extend_from_slice(&name[name.len() - n..]);
        match decode(&h, len, &mut args, rest) {
            Decoded::Op {
                op: FuseOp::Lookup { name: got },
                ..
            } => assert_eq!(got, &name[..]),
            other => panic!("{other:?}"),
        }
        // Arguments past the limit: ENOSYS; a FORGET of the wrong length:
        // refused, with no answer (the kernel expects none).
        let big = IN_HEADER_LEN + MAX_ARGS_LEN + 1;
        let h = head(fuse_opcode::FUSE_SETXATTR, big, &[]);
        assert!(matches!(
            decode(&h, big, &mut args, none),
            Decoded::Refused {
                errno: Some(libc::ENOSYS),
                ..
            }
        ));
        let h = head(fuse_opcode::FUSE_FORGET, IN_HEADER_LEN + 8, &[1; 8]);
        assert!(matches!(
            decode(&h, IN_HEADER_LEN + 4, &mut args, none),
            Decoded::Refused { errno: None, .. }
        ));
    }

    #[test]
    fn head_len_matches_abi() {
        assert_eq!(IN_HEADER_LEN, 40);
        assert_eq!(HEAD_LEN, 80);
    }

    #[test]
    fn short_arguments_are_errors() {
        for op in [
            fuse_opcode::FUSE_READ,
            fuse_opcode::FUSE_WRITE,
            fuse_opcode::FUSE_SETATTR,
            fuse_opcode::FUSE_OPEN,
            fuse_opcode::FUSE_FALLOCATE,
            fuse_opcode::FUSE_FSYNC,
            fuse_opcode::FUSE_INIT,
            fuse_opcode::FUSE_READDIR,
        ] {
            assert!(parse(op as u32, &[0u8; 3]).is_err(), "{op:?}");
        }
    }

    #[test]
    fn parses_read_write_lookup_init() {
        let r = fuse_read_in {
            offset: 4096,
            size: 512,
            ..Default::default()
        };
        assert_eq!(
            parse(fuse_opcode::FUSE_READ as u32, r.as_bytes()),
            Ok(FuseOp::Read {
                offset: 4096,
                size: 512
            })
        );
        let w = fuse_write_in {
            offset: 1,
            size: 2,
            ..Default::default()
        };
        assert_eq!(
            parse(fuse_opcode::FUSE_WRITE as u32, w.as_bytes()),
            Ok(FuseOp::Write { offset: 1, size: 2 })
        );
        assert_eq!(
            parse(fuse_opcode::FUSE_LOOKUP as u32, b"vol0\0junk"),
            Ok(FuseOp::Lookup { name: b"vol0" })
        );
        // An unterminated name is taken whole.
        assert_eq!(
            parse(fuse_opcode::FUSE_LOOKUP as u32, b"vol0"),
            Ok(FuseOp::Lookup { name: b"vol0" })
        );
        let mut init = vec![0u8; 20];
        init[0] = 7;
        init[4] = 45;
        init[19] = 1;
        assert_eq!(
            parse(fuse_opcode::FUSE_INIT as u32, &init),
            Ok(FuseOp::Init {
                major: 7,
                minor: 45,
                max_readahead: 0,
                flags: 1 << 56
            })
        );
        assert_eq!(parse(9999, &[]), Ok(FuseOp::Unsupported(9999)));
    }
}
