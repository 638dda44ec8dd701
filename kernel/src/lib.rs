//! The kernel's protocols, each written once: its ABI layer (`sys`: the
//! device, its ioctls and constants, each naming its header and kernel
//! version) and the parsing of its requests and the building of its
//! replies, every length checked before a field is used. The broker's
//! frontends use them in relay mode (the broker reads the kernel's
//! requests and hands them to a daemon through the rings); the daemon
//! library uses them in direct mode (the daemon reads them itself). What
//! to do with a request is the caller's: nothing here keeps state beyond
//! the geometry it is given, logs, or decides policy.

pub mod fuse;
pub mod ublk;
