//! Choosing and building the egress buffer of a domain.
//!
//! The choice matters before QEMU starts: the plug works on a tap netdev, the relay needs
//! QEMU's `-netdev stream` pointed at its socket. So the engine first [`resolve`]s the
//! configured [`Backend`] (for `Auto`: a probe builds a throwaway plug layout on two IFBs —
//! the only reliable test of sch_plug, ifb, sch_ingress, cls_u32 and act_mirred together),
//! then [`open`]s the buffer and launches QEMU with [`OpenedBuffer::qemu_netdev`].

use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

use crate::buffer::{BackendKind, EgressBuffer};
use crate::netns::Netns;
use crate::plug::rtnl::Rtnl;
use crate::plug::{msg, PlugBuffer, PlugError};
use crate::relay::{RelayBuffer, RelayConfig, RelayError};

/// The configured backend of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The kernel's plug qdisc (fails if the kernel lacks it).
    Plug,
    /// The in-agent relay.
    Relay,
    /// The plug where the kernel has it, the relay otherwise.
    Auto,
}

impl FromStr for Backend {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "plug" => Ok(Backend::Plug),
            "relay" => Ok(Backend::Relay),
            "auto" => Ok(Backend::Auto),
            other => Err(BackendError::UnknownBackend(other.to_string())),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Plug => "plug",
            Backend::Relay => "relay",
            Backend::Auto => "auto",
        })
    }
}

/// Relay-specific settings.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// The unix socket QEMU's stream netdev connects to.
    pub socket_path: PathBuf,
    /// A bridge for the relay's tap.
    pub bridge: Option<String>,
    /// The pipeline depth (closed epochs awaiting release).
    pub max_closed_epochs: usize,
}

/// Everything needed to build a domain's egress buffer.
#[derive(Debug, Clone)]
pub struct EgressConfig {
    /// Which backend.
    pub backend: Backend,
    /// The guest's tap (plug: existing, created by QEMU or the agent; relay: created by it).
    pub dev: String,
    /// The namespace of the tap.
    pub netns: Netns,
    /// The most bytes held at once.
    pub limit_bytes: u64,
    /// Needed for `Relay`, and for `Auto` on a kernel without sch_plug.
    pub relay: Option<RelayOptions>,
}

/// Failures choosing or opening a backend.
#[derive(Debug, Error)]
pub enum BackendError {
    #[error("netbuf backend {0:?} is unknown (expected plug, relay or auto)")]
    UnknownBackend(String),
    #[error(
        "netbuf on {dev}: the relay backend needs a stream socket path (relay options missing)"
    )]
    RelayNeedsSocket { dev: String },
    #[error(transparent)]
    Plug(#[from] PlugError),
    #[error(transparent)]
    Relay(#[from] RelayError),
}

/// An opened buffer and how QEMU must be wired to it.
pub struct OpenedBuffer {
    /// The buffer the engine drives.
    pub buffer: Box<dyn EgressBuffer>,
    /// The backend chosen.
    pub kind: BackendKind,
    /// The tap.
    pub dev: String,
    /// The relay socket, for the relay backend.
    pub socket_path: Option<PathBuf>,
}

impl OpenedBuffer {
    /// The `-netdev` value QEMU must be started with.
    pub fn qemu_netdev(&self, id: &str) -> String {
        match (&self.kind, &self.socket_path) {
            (BackendKind::Relay, Some(p)) => format!(
                "stream,id={id},server=off,addr.type=unix,addr.path={}",
                p.display()
            ),
            _ => format!("tap,id={id},ifname={},script=no,downscript=no", self.dev),
        }
    }
}

/// Checks that the kernel of `netns` supports the plug layout by building one between two
/// throwaway IFBs and removing it. Ok, or the typed error naming the missing module.
pub async fn probe_plug(netns: &Netns) -> Result<(), PlugError> {
    let tag = std::process::id() % 100_000;
    let (a, b) = (format!("rprba{tag}"), format!("rprbb{tag}"));
    let rtnl = Rtnl::open(netns).map_err(|source| PlugError::Netlink {
        dev: a.clone(),
        source,
    })?;
    let net = |dev: &str| {
        let dev = dev.to_string();
        move |source| PlugError::Netlink { dev, source }
    };
    let missing = |module, config| PlugError::MissingKernelFeature {
        dev: "probe".into(),
        module,
        config,
    };
    let mut indexes = Vec::new();
    let result = async {
        for name in [&a, &b] {
            match rtnl
                .request(format!("create {name}"), msg::new_ifb(name))
                .await
            {
                Ok(_) => {}
                Err(e) if e.errno() == Some(libc::EOPNOTSUPP) => {
                    return Err(missing("ifb", "CONFIG_IFB"))
                }
                Err(e) => return Err(net(name)(e)),
            }
            let answers = rtnl
                .request(format!("get {name}"), msg::get_link(name))
                .await
                .map_err(net(name))?;
            for ans in answers {
                if let netlink_packet_route::RouteNetlinkMessage::NewLink(l) = ans {
                    indexes.push(l.header.index);
                }
            }
        }
        let (ia, ib) = (indexes[0], indexes[1]);
        match rtnl
            .request("probe plug", msg::new_plug_qdisc(ia, 1 << 16))
            .await
        {
            Ok(_) => {}
            Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::EOPNOTSUPP)) => {
                return Err(missing("sch_plug", "CONFIG_NET_SCH_PLUG"))
            }
            Err(e) => return Err(net(&a)(e)),
        }
        match rtnl
            .request("probe ingress", msg::new_ingress_qdisc(ib))
            .await
        {
            Ok(_) => {}
            Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::EOPNOTSUPP)) => {
                return Err(missing("sch_ingress", "CONFIG_NET_SCH_INGRESS"))
            }
            Err(e) => return Err(net(&b)(e)),
        }
        match rtnl
            .request("probe filter", msg::new_redirect_filter(ib, ia))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.errno(), Some(libc::ENOENT) | Some(libc::EOPNOTSUPP)) => {
                if e.extack()
                    .unwrap_or_default()
                    .to_ascii_lowercase()
                    .contains("action")
                {
                    Err(missing("act_mirred", "CONFIG_NET_ACT_MIRRED"))
                } else {
                    Err(missing("cls_u32", "CONFIG_NET_CLS_U32"))
                }
            }
            Err(e) => Err(net(&b)(e)),
        }
    }
    .await;
    for index in indexes {
        let _ = rtnl.request("remove probe", msg::del_link(index)).await;
    }
    result
}

/// Resolves `Auto` by probing; `Plug` and `Relay` are returned as they are (a `Plug` on a
/// kernel without sch_plug fails later, at setup, with the typed error).
pub async fn resolve(backend: Backend, netns: &Netns) -> Result<BackendKind, BackendError> {
    match backend {
        Backend::Plug => Ok(BackendKind::Plug),
        Backend::Relay => Ok(BackendKind::Relay),
        Backend::Auto => match probe_plug(netns).await {
            Ok(()) => {
                tracing::info!(%netns, "netbuf auto: the kernel has sch_plug; using the plug backend");
                Ok(BackendKind::Plug)
            }
            Err(e) if e.missing_module().is_some() => {
                tracing::info!(%netns, reason = %e, "netbuf auto: using the relay backend");
                Ok(BackendKind::Relay)
            }
            Err(e) => Err(e.into()),
        },
    }
}

/// Builds the egress buffer of a domain (resolving `Auto` first). For the plug the tap must
/// exist; for the relay the tap is created and the socket listens before this returns.
pub async fn open(cfg: &EgressConfig) -> Result<OpenedBuffer, BackendError> {
    let kind = resolve(cfg.backend, &cfg.netns).await?;
    match kind {
        BackendKind::Plug => {
            let b = PlugBuffer::setup(&cfg.dev, &cfg.netns, cfg.limit_bytes).await?;
            Ok(OpenedBuffer {
                buffer: Box::new(b),
                kind,
                dev: cfg.dev.clone(),
                socket_path: None,
            })
        }
        BackendKind::Relay => {
            let opts = cfg
                .relay
                .as_ref()
                .ok_or_else(|| BackendError::RelayNeedsSocket {
                    dev: cfg.dev.clone(),
                })?;
            let rc = RelayConfig {
                socket_path: opts.socket_path.clone(),
                tap: cfg.dev.clone(),
                bridge: opts.bridge.clone(),
                netns: cfg.netns.clone(),
                limit_bytes: cfg.limit_bytes,
                max_closed_epochs: opts.max_closed_epochs,
            };
            let b = RelayBuffer::start(rc).await?;
            Ok(OpenedBuffer {
                buffer: Box::new(b),
                kind,
                dev: cfg.dev.clone(),
                socket_path: Some(opts.socket_path.clone()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_names() {
        for (s, b) in [
            ("plug", Backend::Plug),
            ("relay", Backend::Relay),
            ("auto", Backend::Auto),
        ] {
            assert_eq!(s.parse::<Backend>().unwrap(), b);
            assert_eq!(b.to_string(), s);
        }
        assert!(
            matches!("tc".parse::<Backend>(), Err(BackendError::UnknownBackend(s)) if s == "tc")
        );
    }
}
