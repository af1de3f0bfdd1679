//! Drives one QEMU process for continuous checkpointing.
