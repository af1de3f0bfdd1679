//! `remusctl domain config`: a domain's configuration as it really is on this node.

use serde::{Deserialize, Serialize};

/// Where a device stands in the stored configuration (the steps of a change).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStep {
    /// Present in QEMU and in the stored configuration.
    Present,
    /// Being added: in the stored configuration, QEMU's step not confirmed yet.
    Adding,
    /// Being removed: QEMU's step not confirmed yet.
    Removing,
    /// In QEMU but not in the stored configuration (reported with a warning).
    Unrecorded,
}

/// One disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskView {
    /// Its id (QEMU's block node name).
    pub id: String,
    /// The image this node runs it from (from the stored configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The replica this node keeps of the peer's (from the stored configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// The file the VM's data of this disk is in now: the image, or the replica on a node
    /// that runs from its copy of the peer's disk (after an activation). Live only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
    /// What QEMU has inserted (for our disks, the agent's NBD export).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub medium: Option<String>,
    /// Its step.
    pub step: DeviceStep,
}

/// One NIC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicView {
    /// Its id (QEMU's netdev id).
    pub id: String,
    /// Its MAC (QEMU's when live, else the stored one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// The bridge its tap joins (from the stored configuration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge: Option<String>,
    /// Its step.
    pub step: DeviceStep,
}

/// The answer to [`crate::api::Request::DomainConfig`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainConfigView {
    /// The domain.
    pub domain: String,
    /// This node.
    pub node: String,
    /// Whether QEMU runs here and was asked (false: the stored configuration alone).
    pub live: bool,
    /// Guest RAM (MiB).
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Disks.
    pub disks: Vec<DiskView>,
    /// NICs.
    pub nics: Vec<NicView>,
    /// What the stored configuration and QEMU disagreed about, and what was repaired.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The stored configuration's file.
    pub stored: String,
}
