//! What QEMU to start, and its command line.
//!
//! The agent builds a [`QemuSpec`] from a domain's policy; [`QemuSpec::argv`] renders the
//! arguments. The rendering encodes the checkpointing recipe so no caller can forget it:
//! - guest RAM is a shared file (`memory-backend-file,share=on` + `-machine memory-backend=`)
//!   the agent maps itself, and migration skips it (`x-ignore-shared`, set over QMP);
//! - `-nodefaults -display none -vga none -monitor none` and NICs with an empty `romfile=`
//!   keep the saved device state small (no VGA RAM, no option ROMs re-sent every epoch);
//! - the backup's QEMU gets `-incoming defer` and the *same* devices in the same order, since
//!   device state only loads into an identical machine.
//!
//! Every value that lands inside a QEMU option is validated or escaped (`,` doubled), so a
//! path or name can never inject another option.

use std::fmt;
use std::path::{Path, PathBuf};

/// Errors in a spec, naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("qemu spec: {what} {value:?} is not a valid QEMU id (letter, then letters, digits, '-', '_', '.'; at most 64)")]
    BadId { what: &'static str, value: String },
    #[error("qemu spec: duplicate id {0:?}")]
    DuplicateId(String),
    #[error("qemu spec: {what} path {path:?} is not UTF-8 or is empty")]
    BadPath { what: &'static str, path: PathBuf },
    #[error("qemu spec: {what} {value:?} contains a character QEMU cannot take here")]
    BadValue { what: &'static str, value: String },
    #[error("qemu spec: memory must be at least 16 MiB, got {0} MiB")]
    Memory(u64),
    #[error("qemu spec: vcpus must be 1..=255, got {0}")]
    Vcpus(u32),
    #[error("qemu spec: NIC {id}: MAC {mac} is multicast")]
    MulticastMac { id: String, mac: MacAddr },
}

/// Machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    Q35,
    Pc,
}

/// Accelerator: `kvm` in production, `tcg` where no KVM exists (CI, this project's tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

/// How the guest boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// Direct kernel boot.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        append: String,
    },
    /// Firmware boots from the first disk.
    Firmware,
}

/// A unicast Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Where a NIC's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// An existing tap interface (QEMU does not configure it: no scripts).
    Tap { ifname: String },
    /// A unix stream socket the agent's relay listens on (frames: 4-byte big-endian length +
    /// Ethernet frame). QEMU 7.2 never reconnects it: the relay must outlive the VM.
    Stream { path: PathBuf },
}

/// One virtio-net NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicSpec {
    /// netdev id; the device gets `<id>-dev`.
    pub id: String,
    /// Must be identical on primary and backup: the guest's view of its NIC.
    pub mac: MacAddr,
    pub backend: NetBackend,
}

/// Where a disk's blocks live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskBackend {
    /// The agent's NBD server on a unix socket (production: writes are replicated).
    Nbd { socket: PathBuf, export: String },
    /// A raw image file (tests).
    RawFile { path: PathBuf },
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// Block node name; the device gets `<id>-dev`.
    pub id: String,
    pub backend: DiskBackend,
}

/// Where the guest's serial console (ttyS0) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Serial {
    None,
    /// Appended to a file.
    File(PathBuf),
    /// A listening unix socket (`server=on,wait=off`).
    UnixSocket(PathBuf),
}

/// Everything needed to start one QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSpec {
    pub binary: PathBuf,
    /// `-name`, for `ps` and logs.
    pub name: String,
    pub machine: Machine,
    pub accel: Accel,
    /// `-cpu`; `None` leaves QEMU's default (use `host` with KVM in production).
    pub cpu: Option<String>,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub boot: Boot,
    /// The shared guest RAM file (in /dev/shm): the agent maps it.
    pub ram_path: PathBuf,
    pub nics: Vec<NicSpec>,
    pub disks: Vec<DiskSpec>,
    pub qmp_socket: PathBuf,
    pub serial: Serial,
    /// Start with `-incoming defer` (the backup's activation QEMU).
    pub incoming: bool,
    /// Appended verbatim, last.
    pub extra_args: Vec<String>,
}

impl QemuSpec {
    /// A spec with the defaults the project uses; callers fill in devices.
    pub fn new(name: &str, ram_path: &Path, qmp_socket: &Path) -> QemuSpec {
        QemuSpec {
            binary: PathBuf::from("qemu-system-x86_64"),
            name: name.to_string(),
            machine: Machine::Q35,
            accel: Accel::Kvm,
            cpu: None,
            memory_mib: 256,
            vcpus: 1,
            boot: Boot::Firmware,
            ram_path: ram_path.to_owned(),
            nics: Vec::new(),
            disks: Vec::new(),
            qmp_socket: qmp_socket.to_owned(),
            serial: Serial::None,
            incoming: false,
            extra_args: Vec::new(),
        }
    }

    /// Guest RAM size in bytes (the size of the RAM file).
    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// Renders the arguments (without the binary).
    pub fn argv(&self) -> Result<Vec<String>, SpecError> {
        self.validate()?;
        let mut a: Vec<String> = Vec::new();
        let mut push = |opt: &str, val: String| {
            a.push(opt.to_string());
            a.push(val);
        };
        push("-name", escape(&self.name));
        push(
            "-machine",
            format!(
                "{},memory-backend=ram0",
                match self.machine {
                    Machine::Q35 => "q35",
                    Machine::Pc => "pc",
                }
            ),
        );
        push(
            "-accel",
            match self.accel {
                Accel::Kvm => "kvm",
                Accel::Tcg => "tcg",
            }
            .into(),
        );
        if let Some(cpu) = &self.cpu {
            push("-cpu", cpu.clone());
        }
        push("-m", format!("{}M", self.memory_mib));
        push("-smp", self.vcpus.to_string());
        push(
            "-object",
            format!(
                "memory-backend-file,id=ram0,size={}M,mem-path={},share=on",
                self.memory_mib,
                path_value("RAM file", &self.ram_path)?
            ),
        );
        if let Boot::Kernel {
            kernel,
            initrd,
            append,
        } = &self.boot
        {
            push("-kernel", path_plain("kernel", kernel)?);
            if let Some(initrd) = initrd {
                push("-initrd", path_plain("initrd", initrd)?);
            }
            push("-append", append.clone());
        }
        push(
            "-chardev",
            format!(
                "socket,id=qmp,path={},server=on,wait=off",
                path_value("QMP socket", &self.qmp_socket)?
            ),
        );
        push("-mon", "chardev=qmp,mode=control".into());
        match &self.serial {
            Serial::None => {}
            Serial::File(p) => {
                push(
                    "-chardev",
                    format!("file,id=serial0,path={}", path_value("serial file", p)?),
                );
                push("-serial", "chardev:serial0".into());
            }
            Serial::UnixSocket(p) => {
                push(
                    "-chardev",
                    format!(
                        "socket,id=serial0,path={},server=on,wait=off",
                        path_value("serial socket", p)?
                    ),
                );
                push("-serial", "chardev:serial0".into());
            }
        }
        for disk in &self.disks {
            let node = &disk.id;
            let blockdev = match &disk.backend {
                DiskBackend::Nbd { socket, export } => format!(
                    "driver=nbd,node-name={node},server.type=unix,server.path={},export={}",
                    path_value("NBD socket", socket)?,
                    escape(export)
                ),
                DiskBackend::RawFile { path } => format!(
                    "driver=raw,node-name={node},file.driver=file,file.filename={}",
                    path_value("disk image", path)?
                ),
            };
            push("-blockdev", blockdev);
            push(
                "-device",
                format!("virtio-blk-pci,id={node}-dev,drive={node}"),
            );
        }
        for nic in &self.nics {
            let id = &nic.id;
            let netdev = match &nic.backend {
                NetBackend::Tap { ifname } => {
                    format!("tap,id={id},ifname={ifname},script=no,downscript=no")
                }
                NetBackend::Stream { path } => format!(
                    "stream,id={id},server=off,addr.type=unix,addr.path={}",
                    path_value("NIC stream socket", path)?
                ),
            };
            push("-netdev", netdev);
            push(
                "-device",
                format!(
                    "virtio-net-pci,id={id}-dev,netdev={id},mac={},romfile=",
                    nic.mac
                ),
            );
        }
        if self.incoming {
            push("-incoming", "defer".into());
        }
        a.extend(
            [
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-vga",
                "none",
                "-monitor",
                "none",
            ]
            .map(String::from),
        );
        a.extend(self.extra_args.iter().cloned());
        Ok(a)
    }

    fn validate(&self) -> Result<(), SpecError> {
        if self.memory_mib < 16 {
            return Err(SpecError::Memory(self.memory_mib));
        }
        if !(1..=255).contains(&self.vcpus) {
            return Err(SpecError::Vcpus(self.vcpus));
        }
        if let Some(cpu) = &self.cpu {
            // A CPU model may carry its own `,feature=on` list: allow commas, not spaces.
            if cpu.is_empty() || cpu.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(SpecError::BadValue {
                    what: "cpu",
                    value: cpu.clone(),
                });
            }
        }
        if let Boot::Kernel { append, .. } = &self.boot {
            if append.chars().any(char::is_control) {
                return Err(SpecError::BadValue {
                    what: "kernel command line",
                    value: append.clone(),
                });
            }
        }
        let mut ids: Vec<&str> = vec!["ram0", "qmp", "serial0"];
        for (what, id) in self
            .disks
            .iter()
            .map(|d| ("disk id", &d.id))
            .chain(self.nics.iter().map(|n| ("NIC id", &n.id)))
        {
            check_id(what, id)?;
            if ids.contains(&id.as_str()) {
                return Err(SpecError::DuplicateId(id.clone()));
            }
            ids.push(id);
        }
        for nic in &self.nics {
            if nic.mac.0[0] & 1 != 0 {
                return Err(SpecError::MulticastMac {
                    id: nic.id.clone(),
                    mac: nic.mac,
                });
            }
            if let NetBackend::Tap { ifname } = &nic.backend {
                // Linux interface names: 1..15 bytes, no '/', no whitespace; plus no ','.
                let ok = !ifname.is_empty()
                    && ifname.len() <= 15
                    && ifname
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                if !ok {
                    return Err(SpecError::BadValue {
                        what: "tap interface name",
                        value: ifname.clone(),
                    });
                }
            }
        }
        for disk in &self.disks {
            if let DiskBackend::Nbd { export, .. } = &disk.backend {
                if export.chars().any(char::is_control) {
                    return Err(SpecError::BadValue {
                        what: "NBD export name",
                        value: export.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

fn check_id(what: &'static str, id: &str) -> Result<(), SpecError> {
    let mut chars = id.chars();
    let ok = id.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(SpecError::BadId {
            what,
            value: id.to_string(),
        })
    }
}

/// Doubles commas: QEMU's option syntax reads `,,` as a literal comma.
fn escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn path_str<'a>(what: &'static str, p: &'a Path) -> Result<&'a str, SpecError> {
    match p.to_str() {
        Some(s) if !s.is_empty() && !s.chars().any(char::is_control) => Ok(s),
        _ => Err(SpecError::BadPath {
            what,
            path: p.to_owned(),
        }),
    }
}

/// A path inside a `key=value,...` option.
fn path_value(what: &'static str, p: &Path) -> Result<String, SpecError> {
    Ok(escape(path_str(what, p)?))
}

/// A path given as a whole argument (`-kernel PATH`): no escaping.
fn path_plain(what: &'static str, p: &Path) -> Result<String, SpecError> {
    Ok(path_str(what, p)?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> QemuSpec {
        let mut s = QemuSpec::new(
            "vm1",
            Path::new("/dev/shm/vm1.ram"),
            Path::new("/run/q.sock"),
        );
        s.accel = Accel::Tcg;
        s.memory_mib = 128;
        s
    }

    /// Finds `opt` followed by `val` in argv.
    fn has_pair(argv: &[String], opt: &str, val: &str) -> bool {
        argv.windows(2).any(|w| w[0] == opt && w[1] == val)
    }

    #[test]
    fn base_spec_renders_the_checkpointing_recipe() {
        let argv = base().argv().unwrap();
        let want: Vec<String> = [
            "-name",
            "vm1",
            "-machine",
            "q35,memory-backend=ram0",
            "-accel",
            "tcg",
            "-m",
            "128M",
            "-smp",
            "1",
            "-object",
            "memory-backend-file,id=ram0,size=128M,mem-path=/dev/shm/vm1.ram,share=on",
            "-chardev",
            "socket,id=qmp,path=/run/q.sock,server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-vga",
            "none",
            "-monitor",
            "none",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(argv, want);
    }

    #[test]
    fn devices_render_as_expected() {
        let mac = MacAddr([0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        // (name, change to the base spec, (option, value) pairs that must appear)
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, Box<dyn Fn(&mut QemuSpec)>, Vec<(&str, &str)>)> = vec![
            (
                "kernel boot",
                Box::new(|s| {
                    s.boot = Boot::Kernel {
                        kernel: "/img/vmlinux".into(),
                        initrd: Some("/img/initrd.img".into()),
                        append: "console=ttyS0 remus.mode=ticker".into(),
                    }
                }),
                vec![
                    ("-kernel", "/img/vmlinux"),
                    ("-initrd", "/img/initrd.img"),
                    ("-append", "console=ttyS0 remus.mode=ticker"),
                ],
            ),
            (
                "tap NIC with an empty option ROM",
                Box::new(move |s| {
                    s.nics.push(NicSpec {
                        id: "net0".into(),
                        mac,
                        backend: NetBackend::Tap { ifname: "rtap0".into() },
                    })
                }),
                vec![
                    ("-netdev", "tap,id=net0,ifname=rtap0,script=no,downscript=no"),
                    ("-device", "virtio-net-pci,id=net0-dev,netdev=net0,mac=52:54:00:12:34:56,romfile="),
                ],
            ),
            (
                "stream NIC to the relay",
                Box::new(move |s| {
                    s.nics.push(NicSpec {
                        id: "net0".into(),
                        mac,
                        backend: NetBackend::Stream { path: "/run/remus/vm1/net0.sock".into() },
                    })
                }),
                vec![(
                    "-netdev",
                    "stream,id=net0,server=off,addr.type=unix,addr.path=/run/remus/vm1/net0.sock",
                )],
            ),
            (
                "NBD disk",
                Box::new(|s| {
                    s.disks.push(DiskSpec {
                        id: "disk0".into(),
                        backend: DiskBackend::Nbd {
                            socket: "/run/remus/vm1/nbd.sock".into(),
                            export: "vm1-disk0".into(),
                        },
                    })
                }),
                vec![
                    (
                        "-blockdev",
                        "driver=nbd,node-name=disk0,server.type=unix,server.path=/run/remus/vm1/nbd.sock,export=vm1-disk0",
                    ),
                    ("-device", "virtio-blk-pci,id=disk0-dev,drive=disk0"),
                ],
            ),
            (
                "raw disk whose path has a comma",
                Box::new(|s| {
                    s.disks.push(DiskSpec {
                        id: "disk0".into(),
                        backend: DiskBackend::RawFile { path: "/var/a,b.raw".into() },
                    })
                }),
                vec![(
                    "-blockdev",
                    "driver=raw,node-name=disk0,file.driver=file,file.filename=/var/a,,b.raw",
                )],
            ),
            (
                "serial to a file",
                Box::new(|s| s.serial = Serial::File("/tmp/console.log".into())),
                vec![
                    ("-chardev", "file,id=serial0,path=/tmp/console.log"),
                    ("-serial", "chardev:serial0"),
                ],
            ),
            (
                "serial to a socket",
                Box::new(|s| s.serial = Serial::UnixSocket("/run/c.sock".into())),
                vec![("-chardev", "socket,id=serial0,path=/run/c.sock,server=on,wait=off")],
            ),
            (
                "backup activation, pc machine, kvm, cpu host",
                Box::new(|s| {
                    s.incoming = true;
                    s.machine = Machine::Pc;
                    s.accel = Accel::Kvm;
                    s.cpu = Some("host".into());
                    s.vcpus = 2;
                }),
                vec![
                    ("-incoming", "defer"),
                    ("-machine", "pc,memory-backend=ram0"),
                    ("-accel", "kvm"),
                    ("-cpu", "host"),
                    ("-smp", "2"),
                ],
            ),
            (
                "extra arguments come last",
                Box::new(|s| s.extra_args = vec!["-rtc".into(), "base=utc".into()]),
                vec![("-rtc", "base=utc")],
            ),
        ];
        for (name, change, pairs) in cases {
            let mut spec = base();
            change(&mut spec);
            let argv = spec.argv().unwrap_or_else(|e| panic!("{name}: {e}"));
            for (opt, val) in pairs {
                assert!(
                    has_pair(&argv, opt, val),
                    "{name}: missing {opt} {val} in {argv:?}"
                );
            }
        }
    }

    #[test]
    fn devices_keep_their_order() {
        let mut s = base();
        for i in 0..3 {
            s.disks.push(DiskSpec {
                id: format!("d{i}"),
                backend: DiskBackend::RawFile {
                    path: format!("/x{i}").into(),
                },
            });
        }
        let argv = s.argv().unwrap();
        let order: Vec<&String> = argv
            .iter()
            .filter(|a| a.starts_with("virtio-blk-pci"))
            .collect();
        assert_eq!(
            order,
            [
                "virtio-blk-pci,id=d0-dev,drive=d0",
                "virtio-blk-pci,id=d1-dev,drive=d1",
                "virtio-blk-pci,id=d2-dev,drive=d2"
            ]
        );
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let nic = |id: &str, mac: [u8; 6], ifname: &str| NicSpec {
            id: id.into(),
            mac: MacAddr(mac),
            backend: NetBackend::Tap {
                ifname: ifname.into(),
            },
        };
        let unicast = [2, 0, 0, 0, 0, 1];
        // (name, change, expected error)
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, Box<dyn Fn(&mut QemuSpec)>, SpecError)> = vec![
            (
                "tiny memory",
                Box::new(|s| s.memory_mib = 1),
                SpecError::Memory(1),
            ),
            ("no vcpus", Box::new(|s| s.vcpus = 0), SpecError::Vcpus(0)),
            (
                "id injecting an option",
                Box::new(move |s| s.nics.push(nic("n0,script=/bin/sh", unicast, "t0"))),
                SpecError::BadId {
                    what: "NIC id",
                    value: "n0,script=/bin/sh".into(),
                },
            ),
            (
                "id starting with a digit",
                Box::new(|s| {
                    s.disks.push(DiskSpec {
                        id: "0d".into(),
                        backend: DiskBackend::RawFile { path: "/x".into() },
                    })
                }),
                SpecError::BadId {
                    what: "disk id",
                    value: "0d".into(),
                },
            ),
            (
                "id clashing with the RAM backend",
                Box::new(|s| {
                    s.disks.push(DiskSpec {
                        id: "ram0".into(),
                        backend: DiskBackend::RawFile { path: "/x".into() },
                    })
                }),
                SpecError::DuplicateId("ram0".into()),
            ),
            (
                "duplicate NIC ids",
                Box::new(move |s| {
                    s.nics.push(nic("n0", unicast, "t0"));
                    s.nics.push(nic("n0", unicast, "t1"));
                }),
                SpecError::DuplicateId("n0".into()),
            ),
            (
                "multicast MAC",
                Box::new(|s| s.nics.push(nic("n0", [1, 0, 0, 0, 0, 1], "t0"))),
                SpecError::MulticastMac {
                    id: "n0".into(),
                    mac: MacAddr([1, 0, 0, 0, 0, 1]),
                },
            ),
            (
                "tap name with a comma",
                Box::new(move |s| s.nics.push(nic("n0", unicast, "t0,vhost=on"))),
                SpecError::BadValue {
                    what: "tap interface name",
                    value: "t0,vhost=on".into(),
                },
            ),
            (
                "tap name too long",
                Box::new(move |s| s.nics.push(nic("n0", unicast, "a-very-long-tap-name"))),
                SpecError::BadValue {
                    what: "tap interface name",
                    value: "a-very-long-tap-name".into(),
                },
            ),
            (
                "empty RAM path",
                Box::new(|s| s.ram_path = PathBuf::new()),
                SpecError::BadPath {
                    what: "RAM file",
                    path: PathBuf::new(),
                },
            ),
            (
                "newline in the kernel command line",
                Box::new(|s| {
                    s.boot = Boot::Kernel {
                        kernel: "/k".into(),
                        initrd: None,
                        append: "a\nb".into(),
                    }
                }),
                SpecError::BadValue {
                    what: "kernel command line",
                    value: "a\nb".into(),
                },
            ),
        ];
        for (name, change, want) in cases {
            let mut spec = base();
            change(&mut spec);
            assert_eq!(spec.argv(), Err(want), "{name}");
        }
    }
}
