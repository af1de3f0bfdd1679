//! End-to-end tests that are not drills (`tests/tests/`), beside the guest image's build
//! scripts (`tests/images/`), the guest's workload (`tests/guest/`, crate `remus-guest`) and
//! the real-kernel harness (`tests/kernel-harness/`).
//!
//! The library is empty on purpose: the guest image's build-if-needed step and the helpers
//! that read the guest's console and disk log belong to the drill (`remus_drill::image`,
//! `remus_drill::guest`), which these tests use as a dev-dependency. Nothing here stands in
//! for a product component: the tests start real QEMU guests, real NBD clients and sockets.
