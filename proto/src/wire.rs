//! Little-endian field codec for control messages (and the broker's own
//! restart record). The reader checks every length against what is left and
//! every string against its bound.

use std::fmt;

/// Why a control message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The message ended before a field of `need` bytes (`have` were left).
    Truncated {
        field: &'static str,
        need: usize,
        have: usize,
    },
    /// Bytes were left over after the last field.
    TrailingBytes(usize),
    /// The message did not start with the holdfast magic number.
    BadMagic(u32),
    /// The frame version is one this side does not speak.
    UnsupportedVersion(u16),
    /// The message kind is unknown.
    UnknownKind(u16),
    /// A string field was not UTF-8.
    BadUtf8(&'static str),
    /// A field was longer than its bound.
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    /// A field held a value outside its range.
    BadValue { field: &'static str, value: u64 },
    /// The message was larger than [`crate::MAX_MESSAGE_LEN`].
    TooLarge(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { field, need, have } => write!(
                f,
                "message truncated at field `{field}`: needs {need} bytes, {have} left"
            ),
            Self::TrailingBytes(n) => write!(f, "{n} unexpected bytes after the message"),
            Self::BadMagic(m) => write!(f, "not a holdfast message (magic {m:#010x})"),
            Self::UnsupportedVersion(v) => write!(
                f,
                "frame version {v} is not supported (this side speaks {})",
                crate::PROTOCOL_VERSION
            ),
            Self::UnknownKind(k) => write!(f, "unknown message kind {k:#06x}"),
            Self::BadUtf8(field) => write!(f, "field `{field}` is not UTF-8"),
            Self::TooLong { field, len, max } => {
                write!(f, "field `{field}` is {len} long, at most {max} allowed")
            }
            Self::BadValue { field, value } => {
                write!(f, "field `{field}` has invalid value {value}")
            }
            Self::TooLarge(n) => write!(
                f,
                "message of {n} bytes exceeds the limit of {} bytes",
                crate::MAX_MESSAGE_LEN
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
    /// A string with a u16 length prefix. Callers keep strings within their
    /// bounds; an over-long one is cut at a character boundary rather than
    /// producing a message the peer must reject.
    pub fn str(&mut self, s: &str, max: usize) -> &mut Self {
        let mut end = s.len().min(max).min(usize::from(u16::MAX));
        while !s.is_char_boundary(end) {
            end = end.saturating_sub(1);
        }
        let bytes = s.as_bytes().get(..end).unwrap_or_default();
        self.u16(u16::try_from(bytes.len()).unwrap_or(0));
        self.buf.extend_from_slice(bytes);
        self
    }
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                field,
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let bytes = self.take(field, N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    pub fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::BadValue {
                field,
                value: u64::from(v),
            }),
        }
    }
    pub fn str(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u16(field)?);
        if len > max {
            return Err(DecodeError::TooLong { field, len, max });
        }
        let bytes = self.take(field, len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::BadUtf8(field))
    }
    /// A u32 element count, checked against `max`.
    pub fn count(&mut self, field: &'static str, max: usize) -> Result<usize, DecodeError> {
        let n = self.u32(field)?;
        let len = usize::try_from(n).unwrap_or(usize::MAX);
        if len > max {
            return Err(DecodeError::TooLong { field, len, max });
        }
        Ok(len)
    }
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
}
