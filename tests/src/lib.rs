//! Test support shared by the end-to-end tests: the guest image, console logs, and
//! policies written for a test directory.
//!
//! Nothing here stands in for a product component: the tests start real QEMU guests, real
//! NBD clients and real sockets; this crate only prepares their inputs and reads their
//! outputs.

pub mod console;
pub mod guest;
