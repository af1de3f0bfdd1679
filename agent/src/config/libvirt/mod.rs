//! `remusctl domain import`: a libvirt domain definition turned into a `[[domain]]` policy.
//!
//! Why: operators define their KVM guests with libvirt, and writing the same guest again by
//! hand as a remus policy invites mistakes (a MAC or a disk path copied wrong). Why it
//! refuses so much: remus protects a VM only if every piece of its state is either in the
//! checkpoint (RAM, device state), replicated (disks, through remus's NBD server) or held
//! until acknowledged (NIC output, on a tap behind the egress buffer). A device outside
//! those paths — host hardware passed through, shared or block storage, a NIC whose frames
//! never reach a tap on a bridge — would be silently unprotected, so the import refuses
//! it, one [`Problem`] per device, rather than dropping it. Devices the guest's data and its
//! clients do not depend on (display, input, consoles, channels, controllers…) are dropped
//! and listed in a [`Note`]; anything this importer does not know is refused, because it
//! cannot vouch that dropping it is harmless. The full rule table is in
//! `docs/configuration.md` ("Importing a libvirt domain").
//!
//! [`convert`] is pure (XML text and options in, a [`DomainDraft`] or an [`ImportError`]
//! out); [`DomainDraft::to_toml`] writes the `[[domain]]` block, which becomes a policy once
//! appended to a file with `[node]`, `[peer]` and `[auth]` (and `[witness]` for the default
//! fencing). The XML is read with `roxmltree` (read-only, no `unsafe`, no DTD entities).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use roxmltree::{Document, Node};
use serde::Serialize;
use thiserror::Error;

#[cfg(test)]
mod tests;

use super::validate::{domain_chars, id_chars, ifname_ok, parse_mac};
use super::{Accel, Boot, DiskConfig, DiskFormat, MacAddr, NicConfig};

/// Smallest and largest guest RAM a policy accepts (`domain.qemu.memory_mib`).
const MEMORY_MIB: std::ops::RangeInclusive<u64> = 16..=(4 << 20);
/// Largest vCPU count a policy accepts (`domain.qemu.vcpus`).
const MAX_VCPUS: u64 = 288;
/// The libvirt namespace of raw QEMU command-line additions.
const QEMU_NS: &str = "http://libvirt.org/schemas/domain/qemu/1.0";

/// Top-level elements read into the policy.
const TOP_CARRIED: &[&str] = &["name", "uuid", "memory", "vcpu", "os", "clock", "devices"];
/// Top-level elements dropped: host-side tuning, lifecycle actions and descriptions that
/// hold no guest data and route no guest output (remus picks its own CPU model, RAM
/// backing and lifecycle).
const TOP_IGNORED: &[&str] = &[
    "title",
    "description",
    "metadata",
    "currentMemory",
    "maxMemory",
    "vcpus",
    "iothreads",
    "iothreadids",
    "defaultiothread",
    "cputune",
    "numatune",
    "memtune",
    "blkiotune",
    "memoryBacking",
    "resource",
    "features",
    "cpu",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "on_lockfailure",
    "pm",
    "perf",
    "seclabel",
    "keywrap",
    "idmap",
    "genid",
    "sysinfo",
    "throttlegroups",
];
/// Devices dropped, and why that is harmless: none holds guest data or carries the guest's
/// network output; remus gives the guest its own serial console (a file) and no display.
const DEVICES_DROPPED: &[&str] = &[
    "controller",
    "input",
    "graphics",
    "video",
    "audio",
    "sound",
    "serial",
    "console",
    "parallel",
    "channel",
    "memballoon",
    "rng",
    "watchdog",
    "panic",
    "hub",
    "iommu",
    "lease",
    "redirfilter",
];

/// What the operator adds to what the definition says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// The remus domain name; by default the libvirt name, lowercased.
    pub name: Option<String>,
    /// Where replicas go: `DIR/<domain>-<disk id>.replica`; by default `<image>.replica`.
    pub replica_dir: Option<PathBuf>,
    /// Host bridge of each libvirt network (`--network-bridge NETWORK=BRIDGE`).
    pub network_bridges: BTreeMap<String, String>,
    /// Fencing written into the policy.
    pub fencing: ImportFencing,
    /// Accelerator; by default from the domain type (`kvm` → kvm, `qemu` → tcg).
    pub accel: Option<Accel>,
}

/// The `[domain.fencing]` written.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ImportFencing {
    /// `mode = "witness"`: the policy needs a `[witness]` table.
    #[default]
    Witness,
    /// `mode = "command"` with this argv (`argv[0]` absolute).
    Command(Vec<String>),
}

/// A converted domain: the values of its `[[domain]]` table, and what was left behind.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainDraft {
    /// The libvirt domain's name.
    pub libvirt_name: String,
    /// `name`.
    pub name: String,
    /// `qemu.machine`: `pc` or `q35`.
    pub machine: String,
    /// `qemu.accel`.
    pub accel: Accel,
    /// `qemu.memory_mib`.
    pub memory_mib: u64,
    /// `qemu.vcpus`.
    pub vcpus: u32,
    /// `qemu.kernel…` or `qemu.boot_disk`.
    pub boot: Boot,
    /// `qemu.extra_args` (`-uuid`, `-rtc`).
    pub extra_args: Vec<String>,
    /// `[[domain.disk]]`, boot disk first.
    pub disks: Vec<DiskConfig>,
    /// `[[domain.nic]]`.
    pub nics: Vec<NicConfig>,
    /// `[domain.fencing]`.
    pub fencing: ImportFencing,
    /// What was dropped or translated, for the operator to read.
    pub notes: Vec<Note>,
}

/// Something dropped or changed on the way (not an error).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// Line of the element in the XML.
    pub line: u32,
    /// What happened.
    pub text: String,
}

impl fmt::Display for Note {
    /// `line N: note: …`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: note: {}", self.line, self.text)
    }
}

/// Why a problem stops the import.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProblemKind {
    /// The element is well formed but remus cannot protect it.
    Refused,
    /// The element's value is missing or wrong.
    Invalid,
}

/// One element the import stops at: its line, what it is (target dev, alias, MAC…) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Line of the element in the XML.
    pub line: u32,
    /// Refused or invalid.
    pub kind: ProblemKind,
    /// The element, named as the operator knows it (`disk vdb (/images/d.qcow2)`,
    /// `interface 52:54:00:12:34:56`, `hostdev ua-nic (pci 0000:03:00.1)`).
    pub subject: String,
    /// Why.
    pub reason: String,
}

impl Problem {
    /// `refused: SUBJECT: REASON` (or `invalid: …`), without the line.
    pub fn message(&self) -> String {
        let kind = match self.kind {
            ProblemKind::Refused => "refused",
            ProblemKind::Invalid => "invalid",
        };
        format!("{kind}: {}: {}", self.subject, self.reason)
    }
}

impl fmt::Display for Problem {
    /// `line N: refused: SUBJECT: REASON`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message())
    }
}

/// Why a definition was not converted.
#[derive(Debug, Error)]
pub enum ImportError {
    /// Not well-formed XML (roxmltree says where).
    #[error("reading the libvirt domain definition: {0}")]
    Xml(roxmltree::Error),
    /// Several definitions in one file: what `virt-install --print-xml` prints when it
    /// would install the guest (the install-time definition, then the final one).
    #[error("reading the libvirt domain definition: {0}: the file holds more than one <domain> (virt-install --print-xml with an install source prints the install-time and the final definitions); keep the last one")]
    SeveralDomains(roxmltree::Error),
    /// Well-formed XML of something else.
    #[error("reading the libvirt domain definition: the root element is <{0}>, expected <domain>")]
    NotADomain(String),
    /// An option the operator gave is unusable.
    #[error("importing libvirt domain `{domain}`: {option} `{value}`: {reason}")]
    Option {
        /// The libvirt domain.
        domain: String,
        /// The flag.
        option: &'static str,
        /// Its value.
        value: String,
        /// Why.
        reason: String,
    },
    /// Devices that cannot be protected or values that are wrong: every one found.
    #[error("importing libvirt domain `{domain}`: {}", list(problems))]
    Problems {
        /// The libvirt domain.
        domain: String,
        /// One per element.
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    let mut s = format!("{} problem(s)", problems.len());
    for p in problems {
        s.push('\n');
        s.push_str(&p.to_string());
    }
    s
}

/// Converts a libvirt domain definition (`virsh dumpxml`, `virt-install --print-xml`).
///
/// # Errors
/// Malformed XML, a root other than `<domain>`, a bad option, or every element that cannot
/// be protected or has a wrong value, one [`Problem`] each.
pub fn convert(xml: &str, opts: &ImportOptions) -> Result<DomainDraft, ImportError> {
    let doc = Document::parse(xml).map_err(|e| {
        if xml.matches("</domain>").count() > 1 {
            ImportError::SeveralDomains(e)
        } else {
            ImportError::Xml(e)
        }
    })?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(ImportError::NotADomain(root.tag_name().name().to_owned()));
    }
    let mut cx = Cx {
        doc: &doc,
        problems: Vec::new(),
        notes: Vec::new(),
    };
    let libvirt_name = child(root, "name")
        .and_then(|n| n.text())
        .map(str::trim)
        .unwrap_or_default()
        .to_owned();
    let name = domain_name(&libvirt_name, opts)?;
    if let Some(dir) = &opts.replica_dir {
        if !dir.is_absolute() {
            return Err(option_error(
                &libvirt_name,
                "--replica-dir",
                &dir.display().to_string(),
                "not an absolute path",
            ));
        }
    }
    let fencing = fencing(&libvirt_name, opts)?;
    top_level(&mut cx, root);
    let accel = accel(&mut cx, root, opts);
    let memory_mib = memory(&mut cx, root);
    let vcpus = vcpus(&mut cx, root);
    let os = os(&mut cx, root);
    let mut extra_args = uuid(&mut cx, root);
    extra_args.extend(clock(&mut cx, root));
    let devices = devices(&mut cx, root, &name, opts);
    let (boot, disks) = boot(&mut cx, root, os.kernel, devices.disks);
    cx.notes.sort_by_key(|n| n.line);
    cx.problems.sort_by_key(|p| p.line);
    if !cx.problems.is_empty() {
        return Err(ImportError::Problems {
            domain: libvirt_name,
            problems: cx.problems,
        });
    }
    Ok(DomainDraft {
        libvirt_name,
        name,
        machine: os.machine,
        accel,
        memory_mib,
        vcpus,
        boot,
        extra_args,
        disks,
        nics: devices.nics,
        fencing,
        notes: cx.notes,
    })
}

/// Problems and notes collected while walking the document.
struct Cx<'d, 'i> {
    doc: &'d Document<'i>,
    problems: Vec<Problem>,
    notes: Vec<Note>,
}

impl Cx<'_, '_> {
    fn line(&self, n: Node<'_, '_>) -> u32 {
        self.doc.text_pos_at(n.range().start).row
    }

    fn refuse(&mut self, n: Node<'_, '_>, subject: impl Into<String>, reason: impl Into<String>) {
        self.problem(n, ProblemKind::Refused, subject, reason);
    }

    fn invalid(&mut self, n: Node<'_, '_>, subject: impl Into<String>, reason: impl Into<String>) {
        self.problem(n, ProblemKind::Invalid, subject, reason);
    }

    fn problem(
        &mut self,
        n: Node<'_, '_>,
        kind: ProblemKind,
        subject: impl Into<String>,
        reason: impl Into<String>,
    ) {
        let line = self.line(n);
        self.problems.push(Problem {
            line,
            kind,
            subject: subject.into(),
            reason: reason.into(),
        });
    }

    fn note(&mut self, n: Node<'_, '_>, text: impl Into<String>) {
        let line = self.line(n);
        self.notes.push(Note {
            line,
            text: text.into(),
        });
    }
}

/// The first child element called `name` (libvirt's own namespace: none).
fn child<'a, 'i>(n: Node<'a, 'i>, name: &str) -> Option<Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().namespace().is_none() && c.has_tag_name(name))
}

fn elements<'a, 'i>(n: Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children().filter(|c| c.is_element())
}

fn option_error(domain: &str, option: &'static str, value: &str, reason: &str) -> ImportError {
    ImportError::Option {
        domain: domain.to_owned(),
        option,
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

/// `--name`, or the libvirt name lowercased; either must be a valid remus domain name.
fn domain_name(libvirt_name: &str, opts: &ImportOptions) -> Result<String, ImportError> {
    let (name, option) = match &opts.name {
        Some(n) => (n.clone(), "--name"),
        None => (libvirt_name.to_lowercase(), "<name> (lowercased)"),
    };
    if name.is_empty() || name.chars().count() > 32 || !name.chars().all(domain_chars) {
        return Err(option_error(
            libvirt_name,
            option,
            &name,
            "not a valid remus domain name (1..=32 of a-z, 0-9, '-', '_'); give one with --name",
        ));
    }
    Ok(name)
}

fn fencing(libvirt_name: &str, opts: &ImportOptions) -> Result<ImportFencing, ImportError> {
    if let ImportFencing::Command(argv) = &opts.fencing {
        if !argv.first().is_some_and(|p| p.starts_with('/')) {
            return Err(option_error(
                libvirt_name,
                "--fence-command",
                &argv.join(" "),
                "the program must be given as an absolute path (fencing must not depend on PATH)",
            ));
        }
    }
    Ok(opts.fencing.clone())
}

/// Refuses top-level elements that would change what the guest runs or sees and that
/// remus cannot carry; ignores the harmless ones.
fn top_level(cx: &mut Cx<'_, '_>, root: Node<'_, '_>) {
    for n in elements(root) {
        let tag = n.tag_name();
        let name = tag.name();
        match tag.namespace() {
            Some(QEMU_NS) => cx.refuse(
                n,
                format!("<qemu:{name}>"),
                "raw QEMU arguments or capabilities: they can add devices or backends whose state remus does not replicate (allowed additions go in domain.qemu.extra_args)",
            ),
            Some(ns) => cx.refuse(
                n,
                format!("<{name}> ({ns})"),
                "an element of another driver's namespace: remus cannot tell whether dropping it is harmless",
            ),
            None if TOP_CARRIED.contains(&name) || TOP_IGNORED.contains(&name) => {}
            None if name == "launchSecurity" => cx.refuse(
                n,
                "<launchSecurity>",
                "encrypted guest memory (SEV, TDX…): remus must read the guest's RAM to checkpoint it",
            ),
            None => cx.refuse(
                n,
                format!("<{name}>"),
                "not known to this importer, so it cannot say that dropping it is harmless",
            ),
        }
        if name == "cpu" && (n.has_attribute("mode") || child(n, "model").is_some()) {
            cx.note(
                n,
                "cpu: the CPU model is not carried over; remus starts QEMU with its default",
            );
        }
    }
}

/// `--accel`, else the domain type: `kvm` → kvm, `qemu` → tcg, and `test` (libvirt's mock
/// driver, `test:///default`, whose definitions describe QEMU guests) → kvm.
fn accel(cx: &mut Cx<'_, '_>, root: Node<'_, '_>, opts: &ImportOptions) -> Accel {
    let ty = root.attribute("type").unwrap_or("");
    let from_type = match ty {
        "kvm" | "test" => Some(Accel::Kvm),
        "qemu" => Some(Accel::Tcg),
        _ => None,
    };
    match (opts.accel, from_type) {
        (Some(a), _) => a,
        (None, Some(a)) => a,
        (None, None) => {
            cx.refuse(
                root,
                format!("domain type `{ty}`"),
                "remus runs QEMU guests: the type must be kvm or qemu (or give --accel)",
            );
            Accel::Kvm
        }
    }
}

/// Bytes per unit of libvirt's memory units (`KiB` when none is given).
fn unit_bytes(unit: &str) -> Option<u128> {
    let k: u128 = 1024;
    Some(match unit {
        "b" | "bytes" => 1,
        "KB" => 1000,
        "k" | "KiB" => k,
        "MB" => 1000u128.pow(2),
        "M" | "MiB" => k.pow(2),
        "GB" => 1000u128.pow(3),
        "G" | "GiB" => k.pow(3),
        "TB" => 1000u128.pow(4),
        "T" | "TiB" => k.pow(4),
        "PB" => 1000u128.pow(5),
        "P" | "PiB" => k.pow(5),
        "EB" => 1000u128.pow(6),
        "E" | "EiB" => k.pow(6),
        _ => return None,
    })
}

/// Why a `<memory>` element cannot be used.
#[derive(Debug, thiserror::Error)]
enum MemoryProblem {
    #[error("unit `{0}` is not a libvirt memory unit (b, bytes, KB, k, KiB, MB, M, MiB, GB, G, GiB, TB, T, TiB, PB, P, PiB, EB, E, EiB)")]
    Unit(String),
    #[error("`{text}` is not a whole number of {unit}")]
    NotANumber { text: String, unit: String },
    #[error("{value} {unit} is {mib} MiB; remus accepts {}..={} MiB", MEMORY_MIB.start(), MEMORY_MIB.end())]
    OutOfRange { value: u64, unit: String, mib: u128 },
}

/// `<memory unit=…>` in MiB, rounded up to a whole MiB, and whether it was whole.
fn memory_mib_of(n: Node<'_, '_>) -> Result<(u64, bool), MemoryProblem> {
    let unit = n.attribute("unit").unwrap_or("KiB");
    let Some(per) = unit_bytes(unit) else {
        return Err(MemoryProblem::Unit(unit.to_string()));
    };
    let text = n.text().unwrap_or("").trim();
    let value: u64 = text.parse().map_err(|_| MemoryProblem::NotANumber {
        text: text.to_string(),
        unit: unit.to_string(),
    })?;
    let bytes = u128::from(value) * per;
    let mib = bytes.div_ceil(1 << 20);
    let whole = bytes % (1 << 20) == 0;
    match u64::try_from(mib) {
        Ok(m) if MEMORY_MIB.contains(&m) => Ok((m, whole)),
        _ => Err(MemoryProblem::OutOfRange {
            value,
            unit: unit.to_string(),
            mib,
        }),
    }
}

fn memory(cx: &mut Cx<'_, '_>, root: Node<'_, '_>) -> u64 {
    let Some(n) = child(root, "memory") else {
        cx.invalid(
            root,
            "<memory>",
            "missing: the guest's RAM size is required",
        );
        return 0;
    };
    match memory_mib_of(n) {
        Ok((mib, true)) => mib,
        Ok((mib, false)) => {
            cx.note(
                n,
                format!("memory: not a whole number of MiB, rounded up to {mib} MiB"),
            );
            mib
        }
        Err(why) => {
            cx.invalid(n, "<memory>", why.to_string());
            0
        }
    }
}

/// `<vcpu current=N>MAX</vcpu>`: the vCPUs online (`current`, else the count). remus has no
/// vCPU hot-plug, so the guest gets exactly that many.
fn vcpus(cx: &mut Cx<'_, '_>, root: Node<'_, '_>) -> u32 {
    let Some(n) = child(root, "vcpu") else {
        return 1; // libvirt's default
    };
    let text = n.text().unwrap_or("").trim();
    let count = text.parse::<u64>().ok();
    let current = n
        .attribute("current")
        .map(|c| (c, c.trim().parse::<u64>().ok()));
    let online = match (count, current) {
        (None, _) => {
            cx.invalid(n, "<vcpu>", format!("`{text}` is not a whole number"));
            return 1;
        }
        (Some(_), Some((c, None))) => {
            cx.invalid(n, "<vcpu>", format!("current=`{c}` is not a whole number"));
            return 1;
        }
        (Some(max), Some((_, Some(cur)))) if cur < max => {
            cx.note(
                n,
                format!("vcpu: {cur} online of {max}; remus has no vCPU hot-plug and gives the guest {cur}"),
            );
            cur
        }
        (Some(max), _) => max,
    };
    if !(1..=MAX_VCPUS).contains(&online) {
        cx.invalid(
            n,
            "<vcpu>",
            format!("{online} vCPUs: remus accepts 1..={MAX_VCPUS}"),
        );
        return 1;
    }
    online as u32
}

/// What `<os>` says.
struct Os {
    machine: String,
    kernel: Option<Boot>,
}

fn os(cx: &mut Cx<'_, '_>, root: Node<'_, '_>) -> Os {
    let mut out = Os {
        machine: "pc".to_owned(),
        kernel: None,
    };
    let Some(os) = child(root, "os") else {
        cx.invalid(root, "<os>", "missing: the guest type (hvm) is required");
        return out;
    };
    if let Some(fw) = os.attribute("firmware") {
        cx.refuse(os, format!("<os firmware='{fw}'>"), firmware_reason());
    }
    let mut kernel = None;
    let mut initrd = None;
    let mut cmdline = None;
    for n in elements(os) {
        match n.tag_name().name() {
            "type" => out.machine = os_type(cx, n),
            "kernel" => kernel = Some(abs_path(cx, n, "<os><kernel>")),
            "initrd" => initrd = Some(abs_path(cx, n, "<os><initrd>")),
            "cmdline" => cmdline = Some(n.text().unwrap_or("").to_owned()),
            "boot" | "bootmenu" | "smbios" | "bios" => {}
            "loader" | "nvram" => cx.refuse(
                n,
                format!("<os><{}>", n.tag_name().name()),
                firmware_reason(),
            ),
            other => cx.refuse(
                n,
                format!("<os><{other}>"),
                "not known to this importer, so it cannot say that dropping it is harmless",
            ),
        }
    }
    match kernel {
        Some(kernel) => {
            out.kernel = Some(Boot::Kernel {
                kernel,
                initrd,
                cmdline: cmdline.unwrap_or_default(),
            })
        }
        None if initrd.is_some() || cmdline.is_some() => cx.invalid(
            os,
            "<os>",
            "<initrd> or <cmdline> without <kernel>: direct kernel boot needs the kernel",
        ),
        None => {}
    }
    out
}

fn firmware_reason() -> &'static str {
    "firmware of the definition's own (UEFI, a loader, NVRAM variables): remus boots QEMU's default BIOS, under which this guest would not boot, and does not replicate NVRAM"
}

/// `<type arch machine>hvm</type>` → the policy's machine (`pc` or `q35`).
fn os_type(cx: &mut Cx<'_, '_>, n: Node<'_, '_>) -> String {
    let kind = n.text().unwrap_or("").trim();
    if kind != "hvm" {
        cx.refuse(
            n,
            format!("<os><type>{kind}</type>"),
            "remus runs full virtual machines (hvm), not paravirtualised guests or containers",
        );
    }
    let arch = n.attribute("arch").unwrap_or("x86_64");
    if !matches!(arch, "x86_64" | "i686") {
        cx.refuse(
            n,
            format!("arch `{arch}`"),
            "remus runs x86 guests (qemu-system-x86_64): arch must be x86_64 or i686",
        );
    }
    // libvirt's default machine for x86 is QEMU's `pc` (i440fx).
    let machine = n.attribute("machine").unwrap_or("pc");
    if machine == "q35" || machine.starts_with("pc-q35") {
        "q35".to_owned()
    } else if machine == "pc" || machine.starts_with("pc-") {
        "pc".to_owned()
    } else {
        cx.refuse(
            n,
            format!("machine `{machine}`"),
            "remus builds pc (i440fx) or q35 machines",
        );
        "pc".to_owned()
    }
}

fn abs_path(cx: &mut Cx<'_, '_>, n: Node<'_, '_>, what: &str) -> PathBuf {
    let text = n.text().unwrap_or("").trim();
    let p = PathBuf::from(text);
    if !p.is_absolute() {
        cx.invalid(n, what, format!("`{text}` is not an absolute path"));
    }
    p
}

/// `<uuid>` → `-uuid`, so that the guest's firmware reports the same UUID as under libvirt.
fn uuid(cx: &mut Cx<'_, '_>, root: Node<'_, '_>) -> Vec<String> {
    let Some(n) = child(root, "uuid") else {
        return Vec::new();
    };
    let text = n.text().unwrap_or("").trim();
    let groups: Vec<&str> = text.split('-').collect();
    let shape_ok = groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups
            .iter()
            .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()));
    if !shape_ok {
        cx.invalid(
            n,
            "<uuid>",
            format!("`{text}` is not a UUID (8-4-4-4-12 hex digits)"),
        );
        return Vec::new();
    }
    vec!["-uuid".to_owned(), text.to_owned()]
}

/// `<clock offset>`: `utc` is QEMU's default; `localtime` becomes `-rtc base=localtime`;
/// other offsets (`variable`, `timezone`) would change the guest's time and are refused.
fn clock(cx: &mut Cx<'_, '_>, root: Node<'_, '_>) -> Vec<String> {
    let Some(n) = child(root, "clock") else {
        return Vec::new();
    };
    match n.attribute("offset").unwrap_or("utc") {
        "utc" => Vec::new(),
        "localtime" => vec!["-rtc".to_owned(), "base=localtime".to_owned()],
        other => {
            cx.refuse(
                n,
                format!("<clock offset='{other}'>"),
                "the guest would see another time under remus: only utc and localtime are carried over (write the -rtc base in domain.qemu.extra_args by hand)",
            );
            Vec::new()
        }
    }
}

/// A disk carried over, with libvirt's boot order.
struct DraftDisk {
    disk: DiskConfig,
    boot_order: Option<u32>,
    line: u32,
}

struct Devices {
    disks: Vec<DraftDisk>,
    nics: Vec<NicConfig>,
}

fn devices(cx: &mut Cx<'_, '_>, root: Node<'_, '_>, domain: &str, opts: &ImportOptions) -> Devices {
    let mut out = Devices {
        disks: Vec::new(),
        nics: Vec::new(),
    };
    let Some(devs) = child(root, "devices") else {
        return out;
    };
    let mut dropped: BTreeMap<&str, usize> = BTreeMap::new();
    let mut disk_ids = HashSet::new();
    for (index, n) in elements(devs).enumerate() {
        let kind = n.tag_name().name();
        match kind {
            "disk" => {
                if let Some(d) = disk(cx, n, domain, opts) {
                    if disk_ids.insert(d.disk.id.clone()) {
                        out.disks.push(d);
                    } else {
                        let id = d.disk.id.clone();
                        cx.invalid(
                            n,
                            format!("disk {id}"),
                            "a second disk with this target dev",
                        );
                    }
                }
            }
            "interface" => {
                if let Some(nic) = interface(cx, n, out.nics.len(), opts) {
                    out.nics.push(nic);
                }
            }
            _ if n.tag_name().namespace().is_some() => cx.refuse(
                n,
                format!("<{kind}>"),
                "a device of another namespace: remus cannot tell whether dropping it is harmless",
            ),
            // remus runs its own QEMU binary (`domain.qemu.binary`).
            "emulator" => {}
            _ if DEVICES_DROPPED.contains(&kind) => *dropped.entry(kind).or_default() += 1,
            "redirdev" if n.attribute("type") == Some("spicevmc") => {
                // USB redirection from a SPICE client: there is no SPICE display under
                // remus, so nothing can be redirected.
                *dropped.entry(kind).or_default() += 1;
            }
            _ => {
                let subject = device_name(n, kind, index);
                cx.refuse(n, subject, refusal_of_device(kind));
            }
        }
    }
    if !dropped.is_empty() {
        let list: Vec<String> = dropped
            .iter()
            .map(|(k, n)| {
                if *n == 1 {
                    (*k).to_owned()
                } else {
                    format!("{k} x{n}")
                }
            })
            .collect();
        cx.note(
            devs,
            format!(
                "dropped (no guest data, no guest output; remus gives the guest a serial console to a file and no display): {}",
                list.join(", ")
            ),
        );
    }
    out
}

/// Why a device other than a disk or a NIC is refused.
fn refusal_of_device(kind: &str) -> &'static str {
    match kind {
        "hostdev" => "pass-through of a host device (PCI, USB, SCSI, mediated): its state lives in hardware remus can neither checkpoint nor find on the peer",
        "redirdev" => "USB redirection of a device elsewhere on the network: pass-through that remus cannot checkpoint",
        "smartcard" => "a smartcard reader passed through or emulated from host certificates: not on the peer",
        "filesystem" => "a host directory shared into the guest: its files are neither replicated nor on the peer",
        "shmem" => "memory shared with the host or other guests: outside the checkpoint",
        "memory" => "a memory device (DIMM, NVDIMM, virtio-mem/pmem): remus checkpoints the main RAM only, and an NVDIMM's file is not replicated",
        "tpm" => "a TPM: its secrets (the emulator's state or a host chip) are not replicated, so the guest would lose them on failover",
        "vsock" => "host-guest sockets: their endpoints are on this host, not on the peer",
        "crypto" => "a crypto device backed by the host: outside the checkpoint",
        _ => "not known to this importer, so it cannot say that dropping it is harmless",
    }
}

/// A device named as the operator knows it: its alias, else its position.
fn device_name(n: Node<'_, '_>, kind: &str, index: usize) -> String {
    let alias = child(n, "alias").and_then(|a| a.attribute("name"));
    let ty = n.attribute("type");
    let mut s = match alias {
        Some(a) => format!("{kind} {a}"),
        None => format!("{kind} #{}", index + 1),
    };
    let source = child(n, "source").map(source_text).unwrap_or_default();
    match (ty, source.is_empty()) {
        (Some(t), true) => s.push_str(&format!(" ({t})")),
        (Some(t), false) => s.push_str(&format!(" ({t} {source})")),
        (None, false) => s.push_str(&format!(" ({source})")),
        (None, true) => {}
    }
    s
}

/// A `<source>` described: a PCI address, a USB vendor:product, a path or a name.
fn source_text(src: Node<'_, '_>) -> String {
    if let Some(a) = child(src, "address") {
        let at = |k: &str| a.attribute(k).unwrap_or("?");
        if a.has_attribute("slot") {
            return format!(
                "{}:{}:{}.{}",
                at("domain"),
                at("bus"),
                at("slot"),
                at("function")
            );
        }
        if a.has_attribute("device") {
            return format!("usb bus {} device {}", at("bus"), at("device"));
        }
    }
    if let (Some(v), Some(p)) = (child(src, "vendor"), child(src, "product")) {
        return format!(
            "usb {}:{}",
            v.attribute("id").unwrap_or("?"),
            p.attribute("id").unwrap_or("?")
        );
    }
    [
        "file", "dev", "path", "dir", "name", "network", "bridge", "host",
    ]
    .iter()
    .find_map(|k| src.attribute(*k))
    .unwrap_or("")
    .to_owned()
}

/// `<disk>`: a raw image file becomes a `[[domain.disk]]`; an empty CD-ROM or floppy drive
/// is dropped; everything else is refused.
fn disk(
    cx: &mut Cx<'_, '_>,
    n: Node<'_, '_>,
    domain: &str,
    opts: &ImportOptions,
) -> Option<DraftDisk> {
    let ty = n.attribute("type").unwrap_or("file");
    let device = n.attribute("device").unwrap_or("disk");
    let target = child(n, "target").and_then(|t| t.attribute("dev"));
    let alias = child(n, "alias").and_then(|a| a.attribute("name"));
    let source = child(n, "source");
    let src_text = source.map(source_text).unwrap_or_default();
    let subject = {
        let who = target.or(alias).unwrap_or("without target");
        if src_text.is_empty() {
            format!("{device} {who}")
        } else {
            format!("{device} {who} ({src_text})")
        }
    };
    if matches!(device, "cdrom" | "floppy") {
        if src_text.is_empty() {
            cx.note(
                n,
                format!("{subject}: empty drive dropped (remus has no removable media)"),
            );
        } else {
            cx.refuse(n, subject, "remus has no removable media: the guest would lose this medium; eject it (virsh change-media --eject) or copy its data into a disk");
        }
        return None;
    }
    let refusal = match (device, ty) {
        ("lun", _) => Some("SCSI pass-through of a host LUN: commands go to host hardware remus cannot replicate".to_owned()),
        ("disk", "file") => None,
        ("disk", "block") => Some("a host block device: remus serves and replicates image files through its NBD server, not block devices (often shared or LVM storage); copy it into a raw file (qemu-img convert -O raw)".to_owned()),
        ("disk", "network") => Some(format!(
            "network storage ({}): on storage both hosts reach, or served by another server; remus replicates local raw files",
            source.and_then(|s| s.attribute("protocol")).unwrap_or("?")
        )),
        ("disk", "volume") => Some("a storage-pool volume: its path is the pool's business; give the file itself (type='file')".to_owned()),
        ("disk", "nvme") => Some("NVMe pass-through: host hardware remus cannot replicate".to_owned()),
        ("disk", "vhostuser") => Some("vhost-user-blk: served by another process, so writes bypass remus's replication".to_owned()),
        ("disk", other) => Some(format!("disk type `{other}`: remus replicates raw image files (type='file') only")),
        (other, _) => Some(format!("device `{other}`: remus attaches disks only")),
    };
    if let Some(why) = refusal {
        cx.refuse(n, subject, why);
        return None;
    }
    if child(n, "shareable").is_some() {
        cx.refuse(n, subject, "<shareable/>: another VM writes it too, and remus's replica would not see those writes");
        return None;
    }
    if child(n, "readonly").is_some() {
        cx.refuse(n, subject, "<readonly/>: remus attaches disks read-write, so the guest could write what was read-only");
        return None;
    }
    if child(n, "transient").is_some() {
        cx.refuse(n, subject, "<transient/>: the guest's writes are meant to be thrown away, remus would keep and replicate them");
        return None;
    }
    let format = child(n, "driver").and_then(|d| d.attribute("type"));
    if let Some(f) = format.filter(|f| *f != "raw") {
        cx.refuse(n, subject, format!("format {f}: remus's disk path serves raw images only; convert it (qemu-img convert -O raw)"));
        return None;
    }
    let Some(image) = source.and_then(|s| s.attribute("file")) else {
        cx.invalid(n, subject, "no <source file=…>: the image path is required");
        return None;
    };
    let Some(id) = target else {
        cx.invalid(
            n,
            subject,
            "no <target dev=…>: the disk's id is taken from it",
        );
        return None;
    };
    if id.is_empty() || id.len() > 32 || !id.chars().all(id_chars) {
        cx.invalid(
            n,
            subject,
            format!(
                "target dev `{id}` cannot be a remus disk id (1..=32 of letters, digits, '-', '_')"
            ),
        );
        return None;
    }
    let image = PathBuf::from(image);
    if !image.is_absolute() {
        cx.invalid(n, subject, "the image path is not absolute");
        return None;
    }
    let bus = child(n, "target").and_then(|t| t.attribute("bus"));
    if let Some(b) = bus.filter(|b| *b != "virtio") {
        cx.note(
            n,
            format!("disk {id}: bus {b} becomes virtio-blk (the guest needs its driver)"),
        );
    }
    let boot_order = child(n, "boot")
        .and_then(|b| b.attribute("order"))
        .and_then(|o| o.parse().ok());
    let replica = replica_path(&image, domain, id, opts);
    Some(DraftDisk {
        disk: DiskConfig {
            id: id.to_owned(),
            image,
            replica,
            format: DiskFormat::Raw,
        },
        boot_order,
        line: cx.line(n),
    })
}

/// The documented rule: `<image>.replica` beside the image, or
/// `<replica-dir>/<domain>-<disk id>.replica`.
fn replica_path(image: &Path, domain: &str, id: &str, opts: &ImportOptions) -> PathBuf {
    match &opts.replica_dir {
        Some(dir) => dir.join(format!("{domain}-{id}.replica")),
        None => {
            let mut s = image.as_os_str().to_owned();
            s.push(".replica");
            PathBuf::from(s)
        }
    }
}

/// `<interface>`: a NIC on a Linux bridge (directly, or through a libvirt network mapped
/// with `--network-bridge`) becomes a `[[domain.nic]]` named `net<N>`; the others are
/// refused, because only a tap on a bridge passes through remus's egress buffer.
fn interface(
    cx: &mut Cx<'_, '_>,
    n: Node<'_, '_>,
    index: usize,
    opts: &ImportOptions,
) -> Option<NicConfig> {
    let ty = n.attribute("type").unwrap_or("");
    let mac_text = child(n, "mac").and_then(|m| m.attribute("address"));
    let alias = child(n, "alias").and_then(|a| a.attribute("name"));
    let subject = format!(
        "interface {} (type {ty})",
        mac_text.or(alias).unwrap_or("without MAC")
    );
    let source = child(n, "source");
    let bridge = match ty {
        "bridge" => source
            .and_then(|s| s.attribute("bridge"))
            .map(str::to_owned),
        "network" => {
            let net = source.and_then(|s| s.attribute("network")).unwrap_or("");
            match opts.network_bridges.get(net) {
                Some(b) => Some(b.clone()),
                None => {
                    let hint = source
                        .and_then(|s| s.attribute("bridge"))
                        .map_or_else(|| "BRIDGE".to_owned(), str::to_owned);
                    cx.refuse(n, subject, format!(
                        "libvirt network `{net}`: the host bridge behind it is libvirt's, and not in the definition; if a bridge of that name exists on both nodes, give --network-bridge {net}={hint}"
                    ));
                    return None;
                }
            }
        }
        other => {
            cx.refuse(n, subject, interface_refusal(other));
            return None;
        }
    };
    if child(n, "virtualport").is_some() {
        cx.refuse(n, subject, "<virtualport> (Open vSwitch, 802.1Qbh): remus joins the tap to a Linux bridge and holds its output there");
        return None;
    }
    if child(n, "filterref").is_some() {
        cx.refuse(n, subject, "<filterref>: libvirt's nwfilter rules on the tap would not be applied by remus, so the guest would lose that isolation");
        return None;
    }
    let Some(bridge) = bridge else {
        cx.invalid(n, subject, "no <source bridge=…>: the bridge is required");
        return None;
    };
    if !ifname_ok(&bridge) {
        cx.invalid(
            n,
            subject,
            format!("bridge `{bridge}` is not a valid interface name"),
        );
        return None;
    }
    let Some(mac_text) = mac_text else {
        cx.invalid(n, subject, "no <mac address=…>: libvirt invents one when the domain is defined; import the definition from `virsh dumpxml` so the guest keeps its MAC");
        return None;
    };
    let mac = match parse_mac(mac_text) {
        Some(MacAddr(b)) if b[0] & 1 == 1 => Err("a multicast address"),
        Some(MacAddr([0, 0, 0, 0, 0, 0])) => Err("all zero"),
        Some(m) => Ok(m),
        None => Err("not six hex pairs separated by ':'"),
    };
    let mac = match mac {
        Ok(m) => m,
        Err(why) => {
            cx.invalid(n, subject, format!("MAC `{mac_text}`: {why}"));
            return None;
        }
    };
    let model = child(n, "model").and_then(|m| m.attribute("type"));
    if let Some(m) = model.filter(|m| *m != "virtio") {
        cx.note(
            n,
            format!("interface {mac}: model {m} becomes virtio-net (the guest needs its driver)"),
        );
    }
    Some(NicConfig {
        id: format!("net{index}"),
        mac,
        bridge,
    })
}

fn interface_refusal(ty: &str) -> String {
    match ty {
        "direct" => "macvtap: the guest's frames leave through a host NIC directly, not through a tap on a bridge, so remus's egress buffer cannot hold them until the backup has the state".to_owned(),
        "vhostuser" => "vhost-user: another process (e.g. OVS-DPDK) moves the guest's frames through shared memory; remus's buffer never sees them and that process's state is not checkpointed".to_owned(),
        "hostdev" | "vdpa" => "pass-through of a host NIC (SR-IOV VF, vDPA): its state lives in hardware remus cannot checkpoint, and its frames bypass the egress buffer".to_owned(),
        "user" => "user-mode networking (SLIRP): its connections live inside the QEMU process, outside the checkpoint, and there is no tap to buffer".to_owned(),
        "ethernet" => "a tap made by a script or by hand: remus makes its own tap on a bridge; define the NIC with type='bridge'".to_owned(),
        "mcast" | "server" | "client" | "udp" => "a QEMU socket backend: frames go over a socket, not a tap on a bridge, so remus cannot buffer them".to_owned(),
        other => format!("interface type `{other}`: remus accepts bridge (and network with --network-bridge) only: only a tap on a Linux bridge passes through its egress buffer"),
    }
}

/// The boot source: `<os><kernel>` if given, else the disk libvirt boots first (the lowest
/// `<boot order>`, else the first disk). That disk is moved to the head of the list, since
/// the firmware boots the first disk.
fn boot(
    cx: &mut Cx<'_, '_>,
    root: Node<'_, '_>,
    kernel: Option<Boot>,
    mut disks: Vec<DraftDisk>,
) -> (Boot, Vec<DiskConfig>) {
    if let Some(k) = kernel {
        return (k, disks.into_iter().map(|d| d.disk).collect());
    }
    let first = disks
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.boot_order.map(|o| (o, i)))
        .min()
        .map_or(0, |(_, i)| i);
    if disks.is_empty() {
        // Only report it if nothing else is wrong: a refused disk explains it better.
        if cx.problems.is_empty() {
            cx.invalid(
                root,
                "<os>",
                "no boot source: neither <kernel> nor a disk remus can carry",
            );
        }
        return (
            Boot::Disk {
                disk_id: String::new(),
            },
            Vec::new(),
        );
    }
    if first != 0 {
        let d = disks.remove(first);
        let line = d.line;
        cx.notes.push(Note {
            line,
            text: format!(
                "disk {}: boots first, so it is listed first (the firmware boots the first disk)",
                d.disk.id
            ),
        });
        disks.insert(0, d);
    }
    let disk_id = disks[0].disk.id.clone();
    (
        Boot::Disk { disk_id },
        disks.into_iter().map(|d| d.disk).collect(),
    )
}

/// The `[[domain]]` block as written out.
#[derive(Serialize)]
struct PolicyOut<'a> {
    domain: [DomainOut<'a>; 1],
}

#[derive(Serialize)]
struct DomainOut<'a> {
    name: &'a str,
    qemu: QemuOut<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    disk: Vec<DiskOut>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    nic: Vec<NicOut<'a>>,
    fencing: FencingOut<'a>,
}

#[derive(Serialize)]
struct QemuOut<'a> {
    machine: &'a str,
    accel: Accel,
    memory_mib: u64,
    vcpus: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    initrd: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cmdline: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot_disk: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    extra_args: &'a [String],
}

#[derive(Serialize)]
struct DiskOut {
    id: String,
    image: String,
    replica: String,
    format: DiskFormat,
}

#[derive(Serialize)]
struct NicOut<'a> {
    id: &'a str,
    mac: String,
    bridge: &'a str,
}

#[derive(Serialize)]
struct FencingOut<'a> {
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    command: Option<&'a [String]>,
}

impl DomainDraft {
    /// The `[[domain]]` block, with a comment saying where it came from and what it needs.
    ///
    /// # Errors
    /// Only if the TOML serialiser fails, which valid drafts do not make it do.
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        let (kernel, initrd, cmdline, boot_disk) = match &self.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => (
                Some(kernel.display().to_string()),
                initrd.as_ref().map(|i| i.display().to_string()),
                Some(cmdline.as_str()),
                None,
            ),
            Boot::Disk { disk_id } => (None, None, None, Some(disk_id.as_str())),
        };
        let out = PolicyOut {
            domain: [DomainOut {
                name: &self.name,
                qemu: QemuOut {
                    machine: &self.machine,
                    accel: self.accel,
                    memory_mib: self.memory_mib,
                    vcpus: self.vcpus,
                    kernel,
                    initrd,
                    cmdline,
                    boot_disk,
                    extra_args: &self.extra_args,
                },
                disk: self
                    .disks
                    .iter()
                    .map(|d| DiskOut {
                        id: d.id.clone(),
                        image: d.image.display().to_string(),
                        replica: d.replica.display().to_string(),
                        format: d.format,
                    })
                    .collect(),
                nic: self
                    .nics
                    .iter()
                    .map(|n| NicOut {
                        id: &n.id,
                        mac: n.mac.to_string(),
                        bridge: &n.bridge,
                    })
                    .collect(),
                fencing: match &self.fencing {
                    ImportFencing::Witness => FencingOut {
                        mode: "witness",
                        command: None,
                    },
                    ImportFencing::Command(argv) => FencingOut {
                        mode: "command",
                        command: Some(argv),
                    },
                },
            }],
        };
        let body = toml::to_string(&out)?;
        let needs = match self.fencing {
            ImportFencing::Witness => "[node], [peer], [auth] and [witness]",
            ImportFencing::Command(_) => "[node], [peer] and [auth]",
        };
        Ok(format!(
            "# Imported from libvirt domain `{}` by `remusctl domain import`.\n\
             # Append it to a policy that has {needs}, then run `remusctl config check`.\n\
             {body}",
            self.libvirt_name.replace('\n', " ")
        ))
    }
}
