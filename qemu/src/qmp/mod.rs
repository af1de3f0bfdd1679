//! QMP: the wire messages ([`message`]) and an fd-passing async client ([`client`]).

pub mod client;
pub mod message;

pub use client::{Qmp, QmpError, DEFAULT_TIMEOUT, MAX_LINE};
pub use message::{Event, Message, ParseError};
