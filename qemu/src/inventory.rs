//! What a running QEMU says its devices are: memory, vCPUs, block devices with their media,
//! NICs with their MACs.
//!
//! This is the live half of a domain's configuration (`remusctl domain config`): QEMU is the
//! reference for what the guest really has, the agent's stored template fills in what QEMU
//! cannot report (backing and replica paths, the policy). Devices are found by the ids the
//! spec gives them ([`crate::spec`]: `-device …,id=<id>-dev`, block node `<id>`, netdev
//! `<id>`), under `/machine/peripheral`.

use serde_json::Value;

use crate::control::{ControlError, VmControl};

/// Where `-device …,id=X` devices live in the QOM tree.
const PERIPHERALS: &str = "/machine/peripheral";

/// One block device as QEMU reports it (`query-block`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveBlock {
    /// The device's qdev id (`<disk id>-dev` for the spec's disks), or its QOM path.
    pub device: Option<String>,
    /// The inserted medium's block node name (`None`: no medium).
    pub node_name: Option<String>,
    /// The inserted medium's file name as QEMU knows it (`None`: no medium).
    pub file: Option<String>,
    /// Whether the medium can be removed (a CD-ROM).
    pub removable: bool,
    /// Whether the medium is read-only.
    pub read_only: bool,
}

/// One NIC as QEMU reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveNic {
    /// The device's id (`<nic id>-dev` for the spec's NICs).
    pub device: String,
    /// Its MAC address as QEMU formats it (`52:54:00:…`).
    pub mac: Option<String>,
}

/// The devices of a running VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inventory {
    /// Guest RAM (base memory) in bytes.
    pub memory_bytes: u64,
    /// vCPUs present.
    pub vcpus: usize,
    /// Block devices.
    pub blocks: Vec<LiveBlock>,
    /// Network devices.
    pub nics: Vec<LiveNic>,
}

impl VmControl {
    /// Reads the VM's devices over QMP (`query-memory-size-summary`, `query-cpus-fast`,
    /// `query-block`, `qom-list` of the peripherals and each NIC's `mac`).
    ///
    /// # Errors
    /// A QMP command failed.
    pub async fn inventory(&self) -> Result<Inventory, ControlError> {
        let qmp = self.qmp();
        let memory = qmp.execute(qapi_qmp::query_memory_size_summary {}).await?;
        let cpus = qmp.execute(qapi_qmp::query_cpus_fast {}).await?;
        let blocks = qmp
            .execute(qapi_qmp::query_block {})
            .await?
            .into_iter()
            .map(|b| LiveBlock {
                device: b
                    .qdev
                    .or_else(|| (!b.device.is_empty()).then_some(b.device)),
                node_name: b.inserted.as_ref().and_then(|i| i.node_name.clone()),
                file: b.inserted.as_ref().map(|i| i.file.clone()),
                removable: b.removable,
                read_only: b.inserted.as_ref().is_some_and(|i| i.ro),
            })
            .collect();
        let mut nics = Vec::new();
        for p in qmp
            .execute(qapi_qmp::qom_list {
                path: PERIPHERALS.into(),
            })
            .await?
        {
            if !is_nic_type(&p.type_) {
                continue;
            }
            let mac = qmp
                .execute(qapi_qmp::qom_get {
                    path: format!("{PERIPHERALS}/{}", p.name),
                    property: "mac".into(),
                })
                .await?;
            nics.push(LiveNic {
                device: p.name,
                mac: match mac {
                    Value::String(s) => Some(s),
                    _ => None,
                },
            });
        }
        Ok(Inventory {
            memory_bytes: memory.base_memory,
            vcpus: cpus.len(),
            blocks,
            nics,
        })
    }
}

/// Whether a `qom-list` entry type (`child<virtio-net-pci>`) is a NIC the spec creates or
/// one QEMU could have been given otherwise (any `*-net-*` or e1000/rtl8139 model).
fn is_nic_type(t: &str) -> bool {
    let Some(model) = t.strip_prefix("child<").and_then(|r| r.strip_suffix('>')) else {
        return false;
    };
    model.contains("-net-") || model.starts_with("e1000") || model == "rtl8139"
}

#[cfg(test)]
mod tests {
    use super::is_nic_type;

    #[test]
    fn nic_types() {
        for (t, nic) in [
            ("child<virtio-net-pci>", true),
            ("child<e1000e>", true),
            ("child<rtl8139>", true),
            ("child<virtio-blk-pci>", false),
            ("link<virtio-net-pci>", false),
            ("string", false),
        ] {
            assert_eq!(is_nic_type(t), nic, "{t}");
        }
    }
}
