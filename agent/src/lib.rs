//! The remus agent: protection policies, the checkpoint engine, failover and the control plane.
//!
//! This crate holds the code shared by the `remusd` daemon and the `remusctl` CLI:
//! - [`config`]: the `remus.toml` schema, defaults and validation with file:line:column
//!   diagnostics;
//! - [`cli`]: `remusctl` commands, one module per command group.

pub mod cli;
pub mod config;
