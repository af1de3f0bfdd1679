//! The domain's stored configuration (`<state_dir>/<domain>/config.json`): what this node
//! launched the VM with, and the steps of changes to its devices.
//!
//! The design is libxl's configuration store: QEMU is the reference for what the guest has
//! (a device QEMU does not have is not there, whatever a file says), the stored template
//! fills in what QEMU cannot report (backing and replica paths, bridges), and each change
//! to a device is recorded *before* QEMU is asked (marked `adding` / `removing`), so a crash
//! between the steps leaves a state that [`merge`] reports truthfully and repairs:
//! - in the template but not in QEMU: not present — elided from the answer and dropped from
//!   the template (an add that never reached QEMU, or a removal QEMU finished);
//! - in QEMU but not in the template: reported with a warning and what QEMU says of it (it
//!   should never happen: a device added by hand over QMP, or a template lost or replaced);
//! - in both: present (an `adding` that reached QEMU becomes `present`; a `removing` stays
//!   so until QEMU has let it go).
//!
//! Every change goes through the domain's supervisor, one at a time (its command queue is
//! the per-domain lock). The file is versioned: one written by a newer release is refused,
//! naming both versions, never misread.

use std::path::{Path, PathBuf};

use remus_qemu::Inventory;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::api::{DeviceStep, DiskView, DomainConfigView, NicView};
use crate::config::DomainConfig;

/// File name in the domain's state directory.
pub const FILE_NAME: &str = "config.json";
/// The version this release writes and the newest it reads.
pub const VERSION: u32 = 1;
/// Largest template file read (a domain has tens of devices, not millions).
const MAX_BYTES: u64 = 1 << 20;

/// A device's step in the template.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Present.
    #[default]
    Present,
    /// Recorded before QEMU's `device_add`.
    Adding,
    /// Recorded before QEMU's `device_del`.
    Removing,
}

/// A disk of the template.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Its id (QEMU block node name; the device is `<id>-dev`).
    pub id: String,
    /// The image the primary runs from.
    pub image: PathBuf,
    /// The replica the backup keeps.
    pub replica: PathBuf,
    /// Its step.
    #[serde(default)]
    pub step: Step,
}

/// A NIC of the template.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Its id (QEMU netdev; the device is `<id>-dev`).
    pub id: String,
    /// Its MAC.
    pub mac: String,
    /// The bridge its tap joins.
    pub bridge: String,
    /// Its step.
    #[serde(default)]
    pub step: Step,
}

/// The stored configuration of one domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Template {
    /// [`VERSION`] when written by this release.
    pub version: u32,
    /// The domain.
    pub domain: String,
    /// Guest RAM (MiB).
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Disks, in the policy's order.
    pub disks: Vec<Disk>,
    /// NICs, in the policy's order.
    pub nics: Vec<Nic>,
}

impl Template {
    /// The template of a VM launched from `d` (every device present).
    pub fn of(d: &DomainConfig) -> Self {
        Self {
            version: VERSION,
            domain: d.name.clone(),
            memory_mib: d.qemu.memory_mib,
            vcpus: d.qemu.vcpus,
            disks: d
                .disks
                .iter()
                .map(|x| Disk {
                    id: x.id.clone(),
                    image: x.image.clone(),
                    replica: x.replica.clone(),
                    step: Step::Present,
                })
                .collect(),
            nics: d
                .nics
                .iter()
                .map(|n| Nic {
                    id: n.id.clone(),
                    mac: n.mac.to_string(),
                    bridge: n.bridge.clone(),
                    step: Step::Present,
                })
                .collect(),
        }
    }
}

/// Errors of the stored configuration; each names the file.
#[derive(Debug, Error)]
pub enum TemplateError {
    /// The file could not be read.
    #[error("domain {domain}: reading the stored configuration {path}: {source}")]
    Read {
        /// The domain.
        domain: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a template this release can read.
    #[error("domain {domain}: the stored configuration {path} is unusable: {reason}")]
    Corrupt {
        /// The domain.
        domain: String,
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column for a parse error.
        reason: String,
    },
    /// The file was written by a newer release.
    #[error("domain {domain}: the stored configuration {path} is version {found}, this release reads up to version {VERSION}: it was written by a newer remusd; run that release, or remove the file while the domain is stopped")]
    Newer {
        /// The domain.
        domain: String,
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The file could not be replaced.
    #[error("domain {domain}: writing the stored configuration {path}: {step}: {source}")]
    Write {
        /// The domain.
        domain: String,
        /// The file.
        path: PathBuf,
        /// Which step.
        step: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// The stored configuration of one domain on this node.
#[derive(Debug)]
pub struct TemplateStore {
    domain: String,
    path: PathBuf,
}

impl TemplateStore {
    /// The store in `state` (the domain's state directory).
    pub fn new(domain: &str, state: &Path) -> Self {
        Self {
            domain: domain.to_string(),
            path: state.join(FILE_NAME),
        }
    }

    /// Its file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored template (`None`: no file, e.g. the VM was launched by a release that
    /// wrote none).
    ///
    /// # Errors
    /// Unreadable, malformed, of another domain, or from a newer release.
    pub fn load(&self) -> Result<Option<Template>, TemplateError> {
        let corrupt = |reason: String| TemplateError::Corrupt {
            domain: self.domain.clone(),
            path: self.path.clone(),
            reason,
        };
        let read_err = |source| TemplateError::Read {
            domain: self.domain.clone(),
            path: self.path.clone(),
            source,
        };
        match std::fs::metadata(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(read_err(e)),
            Ok(m) if m.len() > MAX_BYTES => {
                return Err(corrupt(format!("{} bytes, more than {MAX_BYTES}", m.len())))
            }
            Ok(_) => {}
        }
        let bytes = std::fs::read(&self.path).map_err(read_err)?;
        // The version first, so a newer file is named as such rather than "malformed".
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let v: Versioned = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if v.version > VERSION {
            return Err(TemplateError::Newer {
                domain: self.domain.clone(),
                path: self.path.clone(),
                found: v.version,
            });
        }
        let t: Template = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
        if t.domain != self.domain {
            return Err(corrupt(format!("it describes domain {:?}", t.domain)));
        }
        Ok(Some(t))
    }

    /// Replaces the stored template durably (fsync + rename).
    ///
    /// # Errors
    /// The file could not be replaced; the old one is then unchanged.
    pub fn save(&self, t: &Template) -> Result<(), TemplateError> {
        let write_err = |step, source| TemplateError::Write {
            domain: self.domain.clone(),
            path: self.path.clone(),
            step,
            source,
        };
        let bytes = serde_json::to_vec_pretty(t)
            .map_err(|e| write_err("serialise", std::io::Error::other(e)))?;
        remus_ha::persist::write_atomic_creating_dir(&self.path, &bytes)
            .map_err(|(s, e)| write_err(s, e))
    }
}

/// The configuration as it really is: `live` (QEMU's devices, `None` when no VM runs here)
/// merged with the template `t`, and the template repaired to match (see the module doc).
/// Pure: the caller saves the repaired template when it differs.
pub fn merge(
    t: &Template,
    live: Option<&Inventory>,
    node: &str,
    stored: &Path,
) -> (DomainConfigView, Template) {
    let Some(live) = live else {
        let view = DomainConfigView {
            domain: t.domain.clone(),
            node: node.to_string(),
            live: false,
            memory_mib: t.memory_mib,
            vcpus: t.vcpus,
            disks: t
                .disks
                .iter()
                .map(|d| DiskView {
                    id: d.id.clone(),
                    image: Some(d.image.display().to_string()),
                    replica: Some(d.replica.display().to_string()),
                    backing: None,
                    medium: None,
                    step: step_view(d.step),
                })
                .collect(),
            nics: t
                .nics
                .iter()
                .map(|n| NicView {
                    id: n.id.clone(),
                    mac: Some(n.mac.clone()),
                    bridge: Some(n.bridge.clone()),
                    step: step_view(n.step),
                })
                .collect(),
            warnings: Vec::new(),
            stored: stored.display().to_string(),
        };
        return (view, t.clone());
    };
    let mut warnings = Vec::new();
    let mut repaired = t.clone();
    let memory_mib = live.memory_bytes >> 20;
    let vcpus = u32::try_from(live.vcpus).unwrap_or(u32::MAX);
    if memory_mib != t.memory_mib || vcpus != t.vcpus {
        warnings.push(format!(
            "QEMU has {memory_mib} MiB and {vcpus} vCPU(s), the stored configuration said {} MiB and {}: stored QEMU's",
            t.memory_mib, t.vcpus
        ));
        repaired.memory_mib = memory_mib;
        repaired.vcpus = vcpus;
    }

    // Disks: a live block device is ours when its node name is a template disk's id.
    let live_disk = |id: &str| {
        live.blocks
            .iter()
            .find(|b| b.node_name.as_deref() == Some(id))
    };
    let mut disks = Vec::new();
    repaired.disks.retain_mut(|d| match live_disk(&d.id) {
        Some(b) => {
            if d.step == Step::Adding {
                warnings.push(format!(
                    "disk {}: its add had reached QEMU: now present",
                    d.id
                ));
                d.step = Step::Present;
            }
            disks.push(DiskView {
                id: d.id.clone(),
                image: Some(d.image.display().to_string()),
                replica: Some(d.replica.display().to_string()),
                backing: None,
                medium: b.file.clone(),
                step: step_view(d.step),
            });
            true
        }
        None => {
            warnings.push(match d.step {
                Step::Adding => format!("disk {}: its add never reached QEMU: dropped", d.id),
                Step::Removing => format!("disk {}: QEMU has removed it: dropped", d.id),
                Step::Present => format!(
                    "disk {}: in the stored configuration but not in QEMU: not present, dropped",
                    d.id
                ),
            });
            false
        }
    });
    for b in &live.blocks {
        let ours = b
            .node_name
            .as_deref()
            .is_some_and(|n| t.disks.iter().any(|d| d.id == n));
        if ours || (b.removable && b.node_name.is_none()) {
            continue;
        }
        let id = b
            .node_name
            .clone()
            .or_else(|| b.device.clone())
            .unwrap_or_else(|| "?".into());
        warnings.push(format!(
            "disk {id}: in QEMU (device {:?}, medium {:?}) but not in the stored configuration: added outside remusd? it is not replicated",
            b.device, b.file
        ));
        disks.push(DiskView {
            id,
            image: None,
            replica: None,
            backing: None,
            medium: b.file.clone(),
            step: DeviceStep::Unrecorded,
        });
    }

    // NICs: a live NIC is ours when its device id is `<template id>-dev`.
    let live_nic = |id: &str| live.nics.iter().find(|n| n.device == format!("{id}-dev"));
    let mut nics = Vec::new();
    repaired.nics.retain_mut(|n| match live_nic(&n.id) {
        Some(l) => {
            if n.step == Step::Adding {
                warnings.push(format!(
                    "NIC {}: its add had reached QEMU: now present",
                    n.id
                ));
                n.step = Step::Present;
            }
            if l.mac
                .as_deref()
                .is_some_and(|m| !m.eq_ignore_ascii_case(&n.mac))
            {
                warnings.push(format!(
                    "NIC {}: QEMU's MAC {:?} differs from the stored {}",
                    n.id, l.mac, n.mac
                ));
            }
            nics.push(NicView {
                id: n.id.clone(),
                mac: l.mac.clone().or_else(|| Some(n.mac.clone())),
                bridge: Some(n.bridge.clone()),
                step: step_view(n.step),
            });
            true
        }
        None => {
            warnings.push(match n.step {
                Step::Adding => format!("NIC {}: its add never reached QEMU: dropped", n.id),
                Step::Removing => format!("NIC {}: QEMU has removed it: dropped", n.id),
                Step::Present => format!(
                    "NIC {}: in the stored configuration but not in QEMU: not present, dropped",
                    n.id
                ),
            });
            false
        }
    });
    for l in &live.nics {
        if t.nics.iter().any(|n| l.device == format!("{}-dev", n.id)) {
            continue;
        }
        let id = l
            .device
            .strip_suffix("-dev")
            .unwrap_or(&l.device)
            .to_string();
        warnings.push(format!(
            "NIC {id}: in QEMU (MAC {:?}) but not in the stored configuration: added outside remusd? its output is not held",
            l.mac
        ));
        nics.push(NicView {
            id,
            mac: l.mac.clone(),
            bridge: None,
            step: DeviceStep::Unrecorded,
        });
    }
    let view = DomainConfigView {
        domain: t.domain.clone(),
        node: node.to_string(),
        live: true,
        memory_mib,
        vcpus,
        disks,
        nics,
        warnings,
        stored: stored.display().to_string(),
    };
    (view, repaired)
}

fn step_view(s: Step) -> DeviceStep {
    match s {
        Step::Present => DeviceStep::Present,
        Step::Adding => DeviceStep::Adding,
        Step::Removing => DeviceStep::Removing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use remus_qemu::{LiveBlock, LiveNic};

    fn template() -> Template {
        Template {
            version: VERSION,
            domain: "web".into(),
            memory_mib: 128,
            vcpus: 1,
            disks: vec![
                Disk {
                    id: "d0".into(),
                    image: "/img/d0".into(),
                    replica: "/rep/d0".into(),
                    step: Step::Present,
                },
                Disk {
                    id: "d1".into(),
                    image: "/img/d1".into(),
                    replica: "/rep/d1".into(),
                    step: Step::Present,
                },
            ],
            nics: vec![Nic {
                id: "net0".into(),
                mac: "52:54:00:00:00:01".into(),
                bridge: "br0".into(),
                step: Step::Present,
            }],
        }
    }

    fn block(id: &str) -> LiveBlock {
        LiveBlock {
            device: Some(format!("{id}-dev")),
            node_name: Some(id.into()),
            file: Some(format!("nbd+unix:///{id}")),
            removable: false,
            read_only: false,
        }
    }

    fn inventory(disks: &[&str], nics: &[&str]) -> Inventory {
        Inventory {
            memory_bytes: 128 << 20,
            vcpus: 1,
            blocks: disks.iter().map(|d| block(d)).collect(),
            nics: nics
                .iter()
                .map(|n| LiveNic {
                    device: format!("{n}-dev"),
                    mac: Some("52:54:00:00:00:01".into()),
                })
                .collect(),
        }
    }

    /// (case, template steps of d1, live disks, live NICs, expected disk ids and steps in
    /// the answer, disk ids kept in the template, warnings expected)
    #[test]
    fn merge_table() {
        type Case = (
            &'static str,
            Step,
            &'static [&'static str],
            &'static [&'static str],
            &'static [(&'static str, DeviceStep)],
            &'static [&'static str],
            usize,
        );
        let cases: &[Case] = &[
            (
                "all present",
                Step::Present,
                &["d0", "d1"],
                &["net0"],
                &[("d0", DeviceStep::Present), ("d1", DeviceStep::Present)],
                &["d0", "d1"],
                0,
            ),
            (
                "stored but not live: elided and dropped",
                Step::Present,
                &["d0"],
                &["net0"],
                &[("d0", DeviceStep::Present)],
                &["d0"],
                1,
            ),
            (
                "an add that never reached QEMU",
                Step::Adding,
                &["d0"],
                &["net0"],
                &[("d0", DeviceStep::Present)],
                &["d0"],
                1,
            ),
            (
                "an add that reached QEMU becomes present",
                Step::Adding,
                &["d0", "d1"],
                &["net0"],
                &[("d0", DeviceStep::Present), ("d1", DeviceStep::Present)],
                &["d0", "d1"],
                1,
            ),
            (
                "a removal QEMU has not finished stays removing",
                Step::Removing,
                &["d0", "d1"],
                &["net0"],
                &[("d0", DeviceStep::Present), ("d1", DeviceStep::Removing)],
                &["d0", "d1"],
                0,
            ),
            (
                "a removal QEMU finished is dropped",
                Step::Removing,
                &["d0"],
                &["net0"],
                &[("d0", DeviceStep::Present)],
                &["d0"],
                1,
            ),
            (
                "live but not stored: reported, unrecorded, not stored",
                Step::Present,
                &["d0", "d1", "x9"],
                &["net0"],
                &[
                    ("d0", DeviceStep::Present),
                    ("d1", DeviceStep::Present),
                    ("x9", DeviceStep::Unrecorded),
                ],
                &["d0", "d1"],
                1,
            ),
        ];
        for (name, d1_step, disks, nics, want, kept, warnings) in cases {
            let mut t = template();
            t.disks[1].step = *d1_step;
            let live = inventory(disks, nics);
            let (view, repaired) = merge(&t, Some(&live), "alpha", Path::new("/s/config.json"));
            let got: Vec<(&str, DeviceStep)> =
                view.disks.iter().map(|d| (d.id.as_str(), d.step)).collect();
            assert_eq!(got, *want, "{name}: answer");
            let got_kept: Vec<&str> = repaired.disks.iter().map(|d| d.id.as_str()).collect();
            assert_eq!(got_kept, *kept, "{name}: template");
            assert_eq!(
                view.warnings.len(),
                *warnings,
                "{name}: {:?}",
                view.warnings
            );
            assert!(view.live, "{name}");
        }
    }

    #[test]
    fn nics_memory_and_no_vm() {
        let t = template();
        // A NIC gone from QEMU, another added by hand, and more memory than stored.
        let mut live = inventory(&["d0", "d1"], &["net7"]);
        live.memory_bytes = 256 << 20;
        let (view, repaired) = merge(&t, Some(&live), "alpha", Path::new("/s"));
        assert_eq!(view.memory_mib, 256);
        assert_eq!(repaired.memory_mib, 256);
        assert!(repaired.nics.is_empty(), "{:?}", repaired.nics);
        assert_eq!(view.nics.len(), 1);
        assert_eq!(view.nics[0].id, "net7");
        assert_eq!(view.nics[0].step, DeviceStep::Unrecorded);
        assert_eq!(view.warnings.len(), 3, "{:?}", view.warnings);
        // No VM here: the template as stored, unchanged.
        let (view, repaired) = merge(&t, None, "alpha", Path::new("/s"));
        assert!(!view.live);
        assert_eq!(repaired, t);
        assert_eq!(view.disks.len(), 2);
    }

    #[test]
    fn store_round_trip_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::new("web", dir.path());
        assert!(store.load().unwrap().is_none());
        store.save(&template()).unwrap();
        assert_eq!(store.load().unwrap(), Some(template()));
        for (text, want) in [
            ("{not json", "unusable"),
            (r#"{"version":1}"#, "unusable"),
            (
                r#"{"version":9,"anything":true}"#,
                "version 9, this release reads up to version 1",
            ),
        ] {
            std::fs::write(store.path(), text).unwrap();
            let e = store.load().unwrap_err().to_string();
            assert!(
                e.contains(want) && e.contains(&store.path().display().to_string()),
                "{text}: {e}"
            );
        }
        let mut other = template();
        other.domain = "db".into();
        std::fs::write(store.path(), serde_json::to_vec(&other).unwrap()).unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(e.contains("describes domain \"db\""), "{e}");
    }
}
