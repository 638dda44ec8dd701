//! The ublk frontend (work in progress, issue 5): the broker will own each
//! ublk device (its control commands, its queues, and io buffers placed in
//! the export's data area so daemons read and write them without a copy).
//! So far: the typed kernel interface in `sys`, checked against a real
//! ublk kernel by `tests/kernel-vm/run ublk`.

pub mod sys;
