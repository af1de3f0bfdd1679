//! A hand-written NBD server (fixed newstyle handshake, simple replies).
//!
//! Written by hand because no maintained Rust crate implements the *server* side of NBD with
//! the features we need (fixed newstyle negotiation with `NBD_OPT_GO`, FUA, trim,
//! write-zeroes, many requests in flight). The protocol is small and documented in the NBD
//! project's `proto.md`; [`proto`] holds its wire constants and codecs and [`server`] the
//! connection state machine.
//!
//! What is implemented: `NBD_OPT_GO`, `NBD_OPT_INFO`, `NBD_OPT_LIST`, `NBD_OPT_ABORT`,
//! `NBD_OPT_EXPORT_NAME`; every other option (STARTTLS, structured replies, meta contexts,
//! extended headers) is answered `NBD_REP_ERR_UNSUP`, so clients fall back to simple replies.
//! Transmission: READ, WRITE (+FUA), FLUSH, TRIM, WRITE_ZEROES (+NO_HOLE), DISC.
//!
//! Invariants: a request is answered exactly once, by the connection's single writer task, in
//! completion order (replies are matched by cookie); a request the server cannot answer
//! safely (bad magic, write payload above the maximum) ends the connection with a logged typed
//! [`server::NbdError`]; a well-formed but invalid request (out of range, bad flags, write to a
//! read-only export) gets an errno reply and the connection continues.

pub mod proto;
pub mod server;

pub use server::{Export, NbdError, NbdServer};
