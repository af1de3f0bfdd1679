//! Plain functions behind `remusctl netbuf setup|buffer|release|release-all|status|teardown
//! --dev IFACE [--backend …]`, for an operator poking at a device by hand.
//!
//! They act on the kernel state directly and know nothing of epochs (a separate process has
//! no ledger): two `buffer`s without a `release` in between merge two epochs in the plug,
//! exactly as `tc qdisc change … plug block` would. The relay backend lives inside remusd
//! (it must own QEMU's stream socket for the VM's whole life), so these functions refuse it
//! with an explanation instead of pretending.

use thiserror::Error;

use crate::backend::{resolve, Backend};
use crate::buffer::BackendKind;
use crate::netns::Netns;
use crate::plug::msg::PlugAction;
use crate::plug::rtnl::Rtnl;
use crate::plug::setup::{self, PlugDevice};
use crate::plug::{PlugError, PlugStatus, TeardownReport};

/// The device a command acts on.
#[derive(Debug, Clone)]
pub struct CtlTarget {
    /// The guest interface.
    pub dev: String,
    /// The backend asked for.
    pub backend: Backend,
    /// Its namespace.
    pub netns: Netns,
}

impl CtlTarget {
    /// `dev` with `backend` in the current namespace.
    pub fn new(dev: impl Into<String>, backend: Backend) -> Self {
        Self {
            dev: dev.into(),
            backend,
            netns: Netns::current(),
        }
    }
}

/// A failed `netbuf` command.
#[derive(Debug, Error)]
pub enum CtlError {
    #[error("netbuf {op} on {dev}: the kernel lacks {module} ({config}): use --backend relay")]
    MissingKernelFeature {
        op: &'static str,
        dev: String,
        module: &'static str,
        config: &'static str,
    },
    #[error(
        "netbuf {op} on {dev}: the relay backend runs inside remusd (it owns QEMU's stream \
         socket for the VM's life); use the daemon's API, or --backend plug on a kernel with sch_plug"
    )]
    RelayInProcess { op: &'static str, dev: String },
    #[error("netbuf {op} on {dev}: no egress buffer is set up (run netbuf setup first)")]
    NotSetUp { op: &'static str, dev: String },
    #[error("netbuf {op} on {dev}: {source}")]
    Plug {
        op: &'static str,
        dev: String,
        #[source]
        source: PlugError,
    },
    #[error("netbuf {op} on {dev}: {source}")]
    Backend {
        op: &'static str,
        dev: String,
        #[source]
        source: crate::backend::BackendError,
    },
}

fn plug_err<'a>(op: &'static str, dev: &'a str) -> impl Fn(PlugError) -> CtlError + 'a {
    move |source| match source {
        PlugError::MissingKernelFeature { module, config, .. } => CtlError::MissingKernelFeature {
            op,
            dev: dev.to_string(),
            module,
            config,
        },
        source => CtlError::Plug {
            op,
            dev: dev.to_string(),
            source,
        },
    }
}

async fn plug_only(op: &'static str, t: &CtlTarget) -> Result<Rtnl, CtlError> {
    let kind = match t.backend {
        // For an existing setup Auto means "whatever is there": only the plug can be.
        Backend::Auto if op != "setup" => BackendKind::Plug,
        b => resolve(b, &t.netns).await.map_err(|source| match source {
            crate::backend::BackendError::Plug(p) => plug_err(op, &t.dev)(p),
            source => CtlError::Backend {
                op,
                dev: t.dev.clone(),
                source,
            },
        })?,
    };
    if kind == BackendKind::Relay {
        // Auto resolved to relay means the kernel lacks the plug: say which module.
        if t.backend == Backend::Auto {
            if let Err(e) = crate::backend::probe_plug(&t.netns).await {
                return Err(plug_err(op, &t.dev)(e));
            }
        }
        return Err(CtlError::RelayInProcess {
            op,
            dev: t.dev.clone(),
        });
    }
    Rtnl::open(&t.netns).map_err(|source| {
        plug_err(op, &t.dev)(PlugError::Netlink {
            dev: t.dev.clone(),
            source,
        })
    })
}

async fn installed(op: &'static str, t: &CtlTarget, rtnl: &Rtnl) -> Result<PlugDevice, CtlError> {
    let st = setup::status(rtnl, &t.dev)
        .await
        .map_err(plug_err(op, &t.dev))?;
    match (&st.ifb, st.plug.is_some()) {
        (Some((ifb, ifb_index)), true) => Ok(PlugDevice {
            dev: t.dev.clone(),
            dev_index: 0,
            ifb: ifb.clone(),
            ifb_index: *ifb_index,
            ingress: setup::IngressOrigin::Existing,
            adopted: true,
        }),
        _ => Err(CtlError::NotSetUp {
            op,
            dev: t.dev.clone(),
        }),
    }
}

/// `netbuf setup`: installs (or adopts) the plug layout; returns the resulting status.
pub async fn setup(t: &CtlTarget, limit_bytes: u64) -> Result<PlugStatus, CtlError> {
    let op = "setup";
    let rtnl = plug_only(op, t).await?;
    let limit = u32::try_from(limit_bytes).map_err(|_| {
        plug_err(op, &t.dev)(PlugError::LimitTooLarge {
            dev: t.dev.clone(),
            bytes: limit_bytes,
        })
    })?;
    setup::setup(&rtnl, &t.dev, limit)
        .await
        .map_err(plug_err(op, &t.dev))?;
    setup::status(&rtnl, &t.dev)
        .await
        .map_err(plug_err(op, &t.dev))
}

async fn action(op: &'static str, t: &CtlTarget, a: PlugAction) -> Result<PlugStatus, CtlError> {
    let rtnl = plug_only(op, t).await?;
    let device = installed(op, t, &rtnl).await?;
    setup::plug_action(&rtnl, &device, a, 0)
        .await
        .map_err(plug_err(op, &t.dev))?;
    setup::status(&rtnl, &t.dev)
        .await
        .map_err(plug_err(op, &t.dev))
}

/// `netbuf buffer`: closes the current epoch (`TCQ_PLUG_BUFFER`).
pub async fn buffer(t: &CtlTarget) -> Result<PlugStatus, CtlError> {
    action("buffer", t, PlugAction::Buffer).await
}

/// `netbuf release`: releases the last closed epoch (`TCQ_PLUG_RELEASE_ONE`).
pub async fn release(t: &CtlTarget) -> Result<PlugStatus, CtlError> {
    action("release", t, PlugAction::ReleaseOne).await
}

/// `netbuf release-all`: releases everything and stops holding (`TCQ_PLUG_RELEASE_INDEFINITE`).
pub async fn release_all(t: &CtlTarget) -> Result<PlugStatus, CtlError> {
    action("release-all", t, PlugAction::ReleaseIndefinite).await
}

/// `netbuf status`: what is installed and the plug's counters.
pub async fn status(t: &CtlTarget) -> Result<PlugStatus, CtlError> {
    let op = "status";
    let rtnl = plug_only(op, t).await?;
    setup::status(&rtnl, &t.dev)
        .await
        .map_err(plug_err(op, &t.dev))
}

/// `netbuf teardown`: removes the layout and restores the interface.
pub async fn teardown(t: &CtlTarget) -> Result<TeardownReport, CtlError> {
    let op = "teardown";
    let rtnl = plug_only(op, t).await?;
    setup::teardown(&rtnl, &t.dev)
        .await
        .map_err(plug_err(op, &t.dev))
}

impl std::fmt::Display for PlugStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yn = |b: bool| if b { "yes" } else { "no" };
        write!(
            f,
            "{}: present={} ifb={} ingress={} filter={}",
            self.dev,
            yn(self.dev_present),
            self.ifb.as_ref().map(|(n, _)| n.as_str()).unwrap_or("-"),
            yn(self.ingress),
            yn(self.filter)
        )?;
        match &self.plug {
            Some(c) => write!(
                f,
                " plug: queued {} pkts/{} B, released {} pkts/{} B, dropped {}",
                c.backlog_packets, c.backlog_bytes, c.sent_packets, c.sent_bytes, c.drops
            ),
            None => write!(f, " plug: none"),
        }
    }
}
