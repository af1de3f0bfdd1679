//! Test support: network topologies in namespaces, guest images, the kernel harness.
