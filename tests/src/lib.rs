//! Test support shared by the end-to-end tests: building the guest image.
//!
//! Nothing here stands in for a product component: the tests start real QEMU guests, real
//! NBD clients and real sockets; this crate only prepares their inputs.

pub mod guest;
