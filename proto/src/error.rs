//! Error codes carried in ERROR replies. Each has a stable number and a
//! default meaning; the reply's text says what a person should do.

use std::fmt;

/// What went wrong, as a stable number a program can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The message could not be decoded.
    Malformed = 1,
    /// The peer speaks a protocol version the broker does not.
    UnsupportedVersion = 2,
    /// The peer's uid is not allowed, or HELLO was not sent first.
    NotPermitted = 3,
    /// No export has that name.
    NoSuchExport = 4,
    /// The export is served by another daemon.
    Busy = 5,
    /// The request needs an attached daemon session.
    NotAttached = 6,
    /// The request does not fit the current state (e.g. RESTORE twice).
    BadState = 7,
    /// The broker could not fence the previous daemon.
    FenceFailed = 8,
    /// The message exceeded the size limit.
    TooLarge = 9,
    /// An fd-store entry does not exist.
    NotFound = 10,
    /// A broker-side resource limit was reached.
    LimitReached = 11,
    /// The broker failed for a reason of its own (e.g. out of memory).
    Internal = 12,
    /// Something with that name already exists.
    Exists = 13,
    /// An fd-store entry was lost with a previous broker: what it held is
    /// gone, and a daemon must not start afresh in its place.
    Lost = 14,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Malformed,
            2 => Self::UnsupportedVersion,
            3 => Self::NotPermitted,
            4 => Self::NoSuchExport,
            5 => Self::Busy,
            6 => Self::NotAttached,
            7 => Self::BadState,
            8 => Self::FenceFailed,
            9 => Self::TooLarge,
            10 => Self::NotFound,
            11 => Self::LimitReached,
            12 => Self::Internal,
            13 => Self::Exists,
            14 => Self::Lost,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::UnsupportedVersion => "unsupported-version",
            Self::NotPermitted => "not-permitted",
            Self::NoSuchExport => "no-such-export",
            Self::Busy => "busy",
            Self::NotAttached => "not-attached",
            Self::BadState => "bad-state",
            Self::FenceFailed => "fence-failed",
            Self::TooLarge => "too-large",
            Self::NotFound => "not-found",
            Self::LimitReached => "limit-reached",
            Self::Internal => "internal",
            Self::Exists => "exists",
            Self::Lost => "lost",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An ERROR reply: a code and a text a person can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub text: String,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }
}

impl fmt::Display for ErrorReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.text, self.code)
    }
}

impl std::error::Error for ErrorReply {}
