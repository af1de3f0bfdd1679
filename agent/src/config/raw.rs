//! The configuration file as written: serde structures mirroring the TOML, with spans.
//!
//! Every structure denies unknown fields, because a misspelt key (`fencin`, `unsafe_no_ouput…`)
//! silently falling back to a default could turn protection off. Nearly every field is
//! optional here and wrapped in [`Spanned`] so that validation (in `validate.rs`) can apply
//! defaults and report a missing or bad value at the right line. Enumerations are serde
//! enums: a wrong word is reported by the parser with the list of accepted words.

use serde::Deserialize;
use toml::Spanned;

use super::{
    Accel, AuthMode, Compression, DiskFormat, Failover, FencingMode, NetbufBackend, Tracker,
    WitnessMode,
};

type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNode {
    pub name: Option<S<String>>,
    pub listen: Option<S<String>>,
    pub control_socket: Option<S<String>>,
    pub state_dir: Option<S<String>>,
    pub run_dir: Option<S<String>>,
    pub vm_netns: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPeer {
    pub name: Option<S<String>>,
    pub address: Option<S<String>>,
    pub link: Option<Vec<S<RawLink>>>,
    pub public_keys: Option<S<Vec<S<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLink {
    pub local: Option<S<String>>,
    pub remote: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHeartbeat {
    pub interval_ms: Option<S<u64>>,
    pub timeout_ms: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuth {
    pub mode: Option<S<AuthMode>>,
    pub psk_file: Option<S<String>>,
    pub private_key_file: Option<S<String>>,
    pub cert: Option<S<String>>,
    pub key: Option<S<String>>,
    pub ca: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawWitness {
    pub mode: Option<S<WitnessMode>>,
    pub address: Option<S<String>>,
    pub lease_ms: Option<S<u64>>,
    pub public_key: Option<S<String>>,
    pub endpoints: Option<S<Vec<S<String>>>>,
    pub prefix: Option<S<String>>,
    pub user: Option<S<String>>,
    pub password_file: Option<S<String>>,
    pub ca_file: Option<S<String>>,
    pub cert_file: Option<S<String>>,
    pub key_file: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    pub listen: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDomain {
    pub name: Option<S<String>>,
    pub checkpoint_interval_ms: Option<S<u64>>,
    pub ack_timeout_ms: Option<S<u64>>,
    pub ack_wait_max_ms: Option<S<u64>>,
    pub verify_interval_s: Option<S<u64>>,
    pub failover: Option<S<Failover>>,
    pub compression: Option<S<Compression>>,
    pub tracker: Option<S<Tracker>>,
    pub qemu: Option<S<RawQemu>>,
    pub nic: Option<Vec<S<RawNic>>>,
    pub disk: Option<Vec<S<RawDisk>>>,
    pub netbuf: Option<S<RawNetbuf>>,
    pub fencing: Option<S<RawFencing>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawQemu {
    pub binary: Option<S<String>>,
    pub machine: Option<S<String>>,
    pub accel: Option<S<Accel>>,
    pub memory_mib: Option<S<u64>>,
    pub vcpus: Option<S<u64>>,
    pub kernel: Option<S<String>>,
    pub initrd: Option<S<String>>,
    pub cmdline: Option<S<String>>,
    pub boot_disk: Option<S<String>>,
    pub extra_args: Option<S<Vec<S<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNic {
    pub id: Option<S<String>>,
    pub mac: Option<S<String>>,
    pub bridge: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDisk {
    pub id: Option<S<String>>,
    pub image: Option<S<String>>,
    pub replica: Option<S<String>>,
    pub format: Option<S<DiskFormat>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNetbuf {
    pub backend: Option<S<NetbufBackend>>,
    pub limit_bytes: Option<S<u64>>,
    pub unsafe_no_output_buffering: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFencing {
    pub mode: Option<S<FencingMode>>,
    pub command: Option<S<Vec<S<String>>>>,
    pub timeout_ms: Option<S<u64>>,
    pub retries: Option<S<u64>>,
}
