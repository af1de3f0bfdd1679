//! The remus agent: protection policies, the checkpoint engine, failover and the control plane.
//!
//! This crate holds the code shared by the `remusd` daemon and the `remusctl` CLI:
//! - [`config`]: the `remus.toml` schema, defaults and validation with file:line:column
//!   diagnostics;
//! - [`cli`]: `remusctl` commands, one module per command group;
//! - [`domain`]: one protected domain: its files, its QEMU, and the checkpoint engine wired
//!   to the real VM, network buffer and disks.
//!
//! The failover drills are test tooling and live in their own crate (`drill/`,
//! `remus-drill`), which uses this library; this crate does not depend on the test guest.

pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod domain;
pub mod iproute;
pub mod keys;
pub mod metrics;
