//! The cachefiles ondemand frontend (issue 6, started): the broker will
//! hold /dev/cachefiles (it opens once only), the anonymous object fds and
//! the object table, forwarding OPEN, READ and CLOSE to daemons. So far:
//! the typed message and command layer in `sys`.

pub mod sys;
