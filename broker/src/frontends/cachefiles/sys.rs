//! The cachefiles ondemand interface (Documentation/filesystems/caching/
//! cachefiles.rst, "On-demand Read"; Linux 5.19+, `restore` 6.8+): the
//! messages read from /dev/cachefiles and the commands written to it.
//! Layouts from include/uapi/linux/cachefiles.h. Every message is parsed
//! into a typed value with checked lengths before anything acts on it.
#![cfg_attr(
    not(test),
    deny(clippy::arithmetic_side_effects, clippy::indexing_slicing)
)]

use std::fmt;

/// Largest message the kernel writes (`CACHEFILES_MSG_MAX_SIZE`).
pub const MSG_MAX_SIZE: usize = 1024;

/// `CACHEFILES_IOC_READ_COMPLETE` = `_IOW(0x98, 1, int)`, on an object's
/// anonymous fd with the READ's message id as argument.
pub const IOC_READ_COMPLETE: u32 = (1 << 30) | (4 << 16) | (0x98 << 8) | 1;

/// `struct cachefiles_msg` header: msg_id, opcode, len, object_id.
const HEADER: usize = 16;
/// `struct cachefiles_open` before its keys: volume and cookie key sizes,
/// fd, flags.
const OPEN_HEAD: usize = 16;
/// `struct cachefiles_read`: off, len.
const READ_BODY: usize = 16;

const OP_OPEN: u32 = 0;
const OP_CLOSE: u32 = 1;
const OP_READ: u32 = 2;

/// A message from /dev/cachefiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A cache object is opened: the daemon says the blob's size (`copen`).
    /// `fd` is an anonymous fd the kernel installed in the reading process.
    Open {
        msg_id: u32,
        object_id: u32,
        /// The volume key, without its NUL (erofs: "erofs,DOMAIN" or
        /// "erofs,FSID").
        volume_key: Vec<u8>,
        /// The cookie key: the blob's name (erofs: the fsid or device id).
        cookie_key: Vec<u8>,
        fd: i32,
        flags: u32,
    },
    /// The object is closed; no reply.
    Close { msg_id: u32, object_id: u32 },
    /// `len` bytes at `off` of the object are wanted in the cache file,
    /// then READ_COMPLETE with `msg_id` on the object's fd.
    Read {
        msg_id: u32,
        object_id: u32,
        off: u64,
        len: u64,
    },
}

/// Why a message was not understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Short {
        need: usize,
        got: usize,
    },
    /// The header's length is not the number of bytes read.
    Length {
        said: u32,
        got: usize,
    },
    UnknownOpcode(u32),
    /// The OPEN's key sizes do not add up to the message.
    Keys {
        volume: u32,
        cookie: u32,
        room: usize,
    },
    /// The volume key is not NUL-terminated.
    VolumeKey,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Short { need, got } => {
                write!(
                    f,
                    "cachefiles message of {got} bytes, at least {need} needed"
                )
            }
            Self::Length { said, got } => {
                write!(f, "cachefiles message says {said} bytes, {got} were read")
            }
            Self::UnknownOpcode(op) => write!(f, "cachefiles message with unknown opcode {op}"),
            Self::Keys {
                volume,
                cookie,
                room,
            } => write!(
                f,
                "cachefiles OPEN with keys of {volume} + {cookie} bytes in {room} bytes"
            ),
            Self::VolumeKey => f.write_str("cachefiles OPEN with a volume key not ending in NUL"),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    let bytes = b.get(at..at.checked_add(8)?)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

/// Parses one message as read (one read(2) returns one message).
pub fn parse(b: &[u8]) -> Result<Message, ParseError> {
    let short = |need: usize| ParseError::Short { need, got: b.len() };
    let (Some(msg_id), Some(opcode), Some(len), Some(object_id)) =
        (u32_at(b, 0), u32_at(b, 4), u32_at(b, 8), u32_at(b, 12))
    else {
        return Err(short(HEADER));
    };
    if usize::try_from(len).ok() != Some(b.len()) {
        return Err(ParseError::Length {
            said: len,
            got: b.len(),
        });
    }
    let body = b.get(HEADER..).unwrap_or_default();
    match opcode {
        OP_OPEN => {
            let head = |at| u32_at(body, at).ok_or(short(HEADER.saturating_add(OPEN_HEAD)));
            let (volume, cookie, fd, flags) = (head(0)?, head(4)?, head(8)?, head(12)?);
            let keys = body.get(OPEN_HEAD..).unwrap_or_default();
            let bad_keys = ParseError::Keys {
                volume,
                cookie,
                room: keys.len(),
            };
            let vsize = usize::try_from(volume).map_err(|_| bad_keys.clone())?;
            let csize = usize::try_from(cookie).map_err(|_| bad_keys.clone())?;
            if vsize.checked_add(csize) != Some(keys.len()) {
                return Err(bad_keys);
            }
            let (vkey, ckey) = keys.split_at(vsize);
            let vkey = match vkey.split_last() {
                Some((0, key)) => key,
                _ => return Err(ParseError::VolumeKey),
            };
            Ok(Message::Open {
                msg_id,
                object_id,
                volume_key: vkey.to_vec(),
                cookie_key: ckey.to_vec(),
                fd: i32::from_ne_bytes(fd.to_ne_bytes()),
                flags,
            })
        }
        OP_CLOSE => Ok(Message::Close { msg_id, object_id }),
        OP_READ => {
            let need = short(HEADER.saturating_add(READ_BODY));
            let (Some(off), Some(len)) = (u64_at(body, 0), u64_at(body, 8)) else {
                return Err(need);
            };
            Ok(Message::Read {
                msg_id,
                object_id,
                off,
                len,
            })
        }
        op => Err(ParseError::UnknownOpcode(op)),
    }
}

/// The `copen` command answering OPEN `msg_id`: the blob's size, or a
/// negative errno to fail the open.
pub fn copen(msg_id: u32, size_or_errno: i64) -> String {
    format!("copen {msg_id},{size_or_errno}")
}

/// The commands that set up a cache in ondemand mode: the cache directory
/// (on a real file system) and the tag, then the bind.
pub fn bind_commands(dir: &str, tag: &str) -> [String; 3] {
    [
        format!("dir {dir}"),
        format!("tag {tag}"),
        "bind ondemand".to_owned(),
    ]
}

/// Asks the kernel to send again the requests a previous reader of this
/// /dev/cachefiles read but did not answer (failover, Linux 6.8+).
pub const RESTORE: &str = "restore";

#[cfg(test)]
mod tests {
    use super::*;

    fn header(msg_id: u32, op: u32, len: usize, object_id: u32) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [msg_id, op, len as u32, object_id] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        v
    }

    fn open_msg(vkey: &[u8], ckey: &[u8]) -> Vec<u8> {
        let len = HEADER + OPEN_HEAD + vkey.len() + ckey.len();
        let mut v = header(7, OP_OPEN, len, 3);
        for x in [vkey.len() as u32, ckey.len() as u32, 42, 0] {
            v.extend_from_slice(&x.to_ne_bytes());
        }
        v.extend_from_slice(vkey);
        v.extend_from_slice(ckey);
        v
    }

    #[test]
    fn messages_parse() {
        assert_eq!(
            parse(&open_msg(b"erofs,img\0", b"img")),
            Ok(Message::Open {
                msg_id: 7,
                object_id: 3,
                volume_key: b"erofs,img".to_vec(),
                cookie_key: b"img".to_vec(),
                fd: 42,
                flags: 0,
            })
        );
        assert_eq!(
            parse(&header(1, OP_CLOSE, HEADER, 3)),
            Ok(Message::Close {
                msg_id: 1,
                object_id: 3
            })
        );
        let mut read = header(2, OP_READ, HEADER + READ_BODY, 3);
        read.extend_from_slice(&4096u64.to_ne_bytes());
        read.extend_from_slice(&65536u64.to_ne_bytes());
        assert_eq!(
            parse(&read),
            Ok(Message::Read {
                msg_id: 2,
                object_id: 3,
                off: 4096,
                len: 65536
            })
        );
    }

    #[test]
    fn bad_messages_are_errors() {
        assert!(matches!(parse(&[0; 8]), Err(ParseError::Short { .. })));
        assert!(matches!(
            parse(&header(1, OP_CLOSE, HEADER + 1, 3)),
            Err(ParseError::Length { .. })
        ));
        assert_eq!(
            parse(&header(1, 9, HEADER, 3)),
            Err(ParseError::UnknownOpcode(9))
        );
        assert!(matches!(
            parse(&header(2, OP_READ, HEADER, 3)),
            Err(ParseError::Short { .. })
        ));
        // Key sizes that overrun the message, or a volume key without NUL.
        let mut m = open_msg(b"v\0", b"c");
        m[HEADER..HEADER + 4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(matches!(parse(&m), Err(ParseError::Keys { .. })));
        assert_eq!(parse(&open_msg(b"v", b"c")), Err(ParseError::VolumeKey));
        // Every truncation and byte flip of a good OPEN: never a panic.
        let good = open_msg(b"erofs,x\0", b"x");
        for n in 0..good.len() {
            let _ = parse(&good[..n]);
            for v in [0u8, 0x7f, 0xff] {
                let mut b = good.clone();
                b[n] = v;
                let _ = parse(&b);
            }
        }
    }

    #[test]
    fn commands() {
        assert_eq!(IOC_READ_COMPLETE, 0x4004_9801);
        assert_eq!(copen(7, 1 << 20), "copen 7,1048576");
        assert_eq!(copen(8, -2), "copen 8,-2");
        assert_eq!(bind_commands("/c", "t")[2], "bind ondemand");
    }
}
