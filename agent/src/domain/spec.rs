//! The QEMU command line of a domain, from its policy.
//!
//! Primary and activated backup use the same function with different RAM files, sockets
//! and `incoming`, so their devices always match: QEMU refuses device state saved from a
//! differently configured VM (e.g. a tap netdev's state does not load into a stream netdev).

use std::path::PathBuf;

use remus_qemu::{DiskBackend, DiskSpec, MacAddr, NetBackend, NicSpec, QemuSpec, Serial};

use crate::config::{Accel, Boot, DomainConfig};
use crate::domain::DomainPaths;

/// How each NIC reaches the network (decided by the egress buffer backend).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NicWiring {
    /// QEMU's stream netdev to the relay's socket.
    Relay(PathBuf),
    /// An existing tap.
    Tap(String),
}

/// Builds the QEMU spec of `domain`.
///
/// `ram_path` is the guest RAM file (the primary's, or the replica's on activation);
/// `nics` has one wiring per `[[domain.nic]]` in order; disks are served by the agent over
/// NBD at [`DomainPaths::nbd`].
pub fn qemu_spec(
    domain: &DomainConfig,
    paths: &DomainPaths,
    ram_path: PathBuf,
    nics: &[NicWiring],
    incoming: bool,
) -> QemuSpec {
    let mut spec = QemuSpec::new(&domain.name, &ram_path, &paths.qmp());
    spec.binary = PathBuf::from(&domain.qemu.binary);
    spec.machine = if domain.qemu.machine == "pc" || domain.qemu.machine.starts_with("pc-i440fx") {
        remus_qemu::Machine::Pc
    } else {
        remus_qemu::Machine::Q35
    };
    spec.accel = match domain.qemu.accel {
        Accel::Kvm => remus_qemu::Accel::Kvm,
        Accel::Tcg => remus_qemu::Accel::Tcg,
    };
    spec.memory_mib = domain.qemu.memory_mib;
    spec.vcpus = domain.qemu.vcpus;
    spec.boot = match &domain.qemu.boot {
        Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        } => remus_qemu::Boot::Kernel {
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            append: cmdline.clone(),
        },
        Boot::Disk { .. } => remus_qemu::Boot::Firmware,
    };
    spec.nics = domain
        .nics
        .iter()
        .zip(nics)
        .map(|(n, w)| NicSpec {
            id: n.id.clone(),
            mac: MacAddr(n.mac.0),
            backend: match w {
                NicWiring::Relay(p) => NetBackend::Stream { path: p.clone() },
                NicWiring::Tap(t) => NetBackend::Tap { ifname: t.clone() },
            },
        })
        .collect();
    spec.disks = domain
        .disks
        .iter()
        .map(|d| DiskSpec {
            id: d.id.clone(),
            backend: DiskBackend::Nbd {
                socket: paths.nbd(&d.id),
                export: d.id.clone(),
            },
        })
        .collect();
    spec.serial = Serial::File(paths.console());
    spec.incoming = incoming;
    spec.extra_args = domain.qemu.extra_args.clone();
    spec
}
