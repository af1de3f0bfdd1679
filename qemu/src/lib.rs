//! Drives one QEMU process for continuous checkpointing.
//!
//! - [`spec`]: what to start ([`QemuSpec`]) and its argv, encoding the checkpointing recipe;
//! - [`process`]: the child process, its life tied to the agent's ([`QemuProcess`]);
//! - [`qmp`]: QMP messages and an async client that can pass file descriptors ([`Qmp`]);
//! - [`control`]: checkpoint operations — stop, cont, device state out and in ([`VmControl`]);
//! - [`inventory`]: the devices a running QEMU reports (the live half of a domain's
//!   configuration);
//! - [`ram`]: guest RAM as a shared mapping of QEMU's RAM file ([`GuestRam`], [`GuestRamMut`]).
//!
//! Typical primary epoch: `stop` → copy dirty pages from [`GuestRam`] → `save_device_state`
//! → `cont`. Backup activation: spawn with `incoming = true` on the replica RAM →
//! `enable_checkpointing` → `load_device_state` → `cont` → `announce_self`.

pub mod control;
pub mod inventory;
pub mod process;
pub mod qmp;
pub mod ram;
pub mod spec;

pub use control::{Announce, ControlError, DeviceState, VmControl};
pub use inventory::{Inventory, LiveBlock, LiveNic};
pub use process::{ProcessError, QemuProcess};
pub use qapi_qmp::{MigrationStatus, RunState};
pub use qmp::{Event, Qmp, QmpError};
pub use ram::{GuestRam, GuestRamMut, RamError, PAGE_SIZE};
pub use spec::{
    Accel, Boot, DiskBackend, DiskSpec, MacAddr, Machine, NetBackend, NicSpec, QemuSpec, Serial,
    SpecError,
};
