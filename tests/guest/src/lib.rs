//! The test guest's workload as a library, so the host side (the drill) reads the guest's
//! disk log with the very code that writes it.
//!
//! - [`disklog`]: the counter's write-ahead log on a raw block device;
//! - [`counter`]: the counter kept in memory and logged to disk first;
//! - [`service`]: the TCP service (`INC`, `GET`, `CHECK`).

pub mod counter;
pub mod disklog;
pub mod service;
