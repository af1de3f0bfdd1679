//! The remus agent: protection policies, the checkpoint engine, failover and the control plane.

pub mod cli;
