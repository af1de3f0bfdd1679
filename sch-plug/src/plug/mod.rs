//! The production backend: the kernel's plug qdisc (sch_plug) on an IFB that receives the
//! guest interface's traffic, driven over rtnetlink.
//!
//! `buffer`, `release` and `release_indefinite` are one netlink request each (no `tc`
//! processes). Per-epoch counters come from the qdisc's own statistics: packets accepted by
//! the plug (dequeued + queued) since the previous close belong to the epoch being closed.
//! The counters are read right after the kernel acted, so a packet that arrives in between
//! can be attributed to the neighbouring epoch *in the statistics* (never in what is held or
//! released, which the kernel decides).
//!
//! The plug keeps at most one closed epoch apart (see [`crate::buffer`] on pipelining).
//! Dropping a [`PlugBuffer`] leaves the kernel layout in place on purpose: a restarted agent
//! adopts it with [`PlugBuffer::setup`] while the guest's held output stays held.

pub mod msg;
pub mod rtnl;
pub mod setup;

use async_trait::async_trait;
use thiserror::Error;

use crate::buffer::{BackendKind, EgressBuffer, EgressError};
use crate::epoch::{EgressStats, Epoch, EpochCounters, EpochLedger, EpochStats, Mode};
use crate::netns::Netns;
use msg::PlugAction;
use rtnl::{Rtnl, RtnlError};
pub use setup::{IngressOrigin, PlugDevice, PlugStatus, QdiscCounters, TeardownReport};

/// Failures of the plug backend.
#[derive(Debug, Error)]
pub enum PlugError {
    #[error("plug setup on {dev}: the kernel lacks {module} ({config})")]
    MissingKernelFeature {
        dev: String,
        /// The kernel module that is missing, e.g. "sch_plug".
        module: &'static str,
        /// Its kernel configuration option.
        config: &'static str,
    },
    #[error("plug on {dev}: no such interface in {netns}")]
    DeviceNotFound { dev: String, netns: String },
    #[error("plug on {dev}: interface {ifb} exists but is not this agent's buffer for {dev} (alias {alias:?})")]
    IfbNameTaken {
        dev: String,
        ifb: String,
        alias: Option<String>,
    },
    #[error("plug on {dev}: {what} is gone (removed behind the agent's back?)")]
    LayoutGone { dev: String, what: String },
    #[error("plug on {dev}: limit of {bytes} bytes does not fit the kernel's 32-bit limit")]
    LimitTooLarge { dev: String, bytes: u64 },
    #[error("plug on {dev}: {source}")]
    Netlink {
        dev: String,
        #[source]
        source: RtnlError,
    },
}

impl PlugError {
    /// The missing kernel module, if that is what this error is about.
    pub fn missing_module(&self) -> Option<&'static str> {
        match self {
            PlugError::MissingKernelFeature { module, .. } => Some(module),
            _ => None,
        }
    }
}

/// The default byte limit: 256 frames of 1514 bytes would be too few for a busy guest at
/// 100 ms epochs; 8 MiB holds ~5500 full frames.
pub const DEFAULT_LIMIT_BYTES: u64 = 8 << 20;

fn limit_u32(dev: &str, bytes: u64) -> Result<u32, PlugError> {
    u32::try_from(bytes).map_err(|_| PlugError::LimitTooLarge {
        dev: dev.to_string(),
        bytes,
    })
}

/// An egress buffer on the plug qdisc of one guest interface.
pub struct PlugBuffer {
    /// The netlink connection (in the interface's namespace).
    rtnl: Rtnl,
    /// What setup installed or adopted.
    device: PlugDevice,
    /// The epoch rules and counters.
    ledger: EpochLedger,
    /// The kernel counters at the last close / indefinite release: the open epoch holds what
    /// was accepted since.
    baseline: QdiscCounters,
}

impl PlugBuffer {
    /// Installs or adopts the layout on `dev` in `netns`. Must run inside a tokio runtime.
    pub async fn setup(dev: &str, netns: &Netns, limit_bytes: u64) -> Result<Self, PlugError> {
        let limit = limit_u32(dev, limit_bytes)?;
        let rtnl = Rtnl::open(netns).map_err(|source| PlugError::Netlink {
            dev: dev.to_string(),
            source,
        })?;
        let device = setup::setup(&rtnl, dev, limit).await?;
        let mut baseline = setup::plug_counters(&rtnl, dev, &device.ifb, device.ifb_index).await?;
        // What is queued at setup (adoption after a restart) belongs to the open epoch.
        baseline.backlog_packets = 0;
        baseline.backlog_bytes = 0;
        tracing::info!(dev, ifb = %device.ifb, adopted = device.adopted, "plug egress buffer ready");
        Ok(Self {
            rtnl,
            device,
            ledger: EpochLedger::new(1, limit_bytes),
            baseline,
        })
    }

    /// What setup installed.
    pub fn device(&self) -> &PlugDevice {
        &self.device
    }

    async fn counters(&self) -> Result<QdiscCounters, PlugError> {
        setup::plug_counters(
            &self.rtnl,
            &self.device.dev,
            &self.device.ifb,
            self.device.ifb_index,
        )
        .await
    }

    /// Counters accepted since the baseline.
    fn delta(&self, now: &QdiscCounters) -> EpochCounters {
        EpochCounters {
            packets: now
                .accepted_packets()
                .wrapping_sub(self.baseline.accepted_packets())
                & 0xffff_ffff,
            bytes: now
                .accepted_bytes()
                .wrapping_sub(self.baseline.accepted_bytes()),
            dropped_packets: u64::from(now.drops.wrapping_sub(self.baseline.drops)),
        }
    }

    /// Moves what the kernel accepted since the baseline into the ledger's open epoch (or
    /// the passed count, when not holding) and makes `now` the new baseline.
    fn absorb(&mut self, now: QdiscCounters) {
        let d = self.delta(&now);
        if self.ledger.mode() == Mode::Passthrough {
            self.ledger.record_passed(d.packets);
        } else {
            self.ledger.add_to_open(&d);
        }
        self.baseline = now;
    }
}

#[async_trait]
impl EgressBuffer for PlugBuffer {
    fn kind(&self) -> BackendKind {
        BackendKind::Plug
    }

    fn max_closed_epochs(&self) -> usize {
        self.ledger.max_closed()
    }

    async fn buffer(&mut self, epoch: Epoch) -> Result<(), EgressError> {
        self.ledger.check_close(epoch)?;
        setup::plug_action(&self.rtnl, &self.device, PlugAction::Buffer, 0).await?;
        let now = self.counters().await?;
        self.absorb(now);
        self.ledger.close(epoch)?;
        Ok(())
    }

    async fn release(&mut self, epoch: Epoch) -> Result<EpochStats, EgressError> {
        self.ledger.check_release(epoch)?;
        setup::plug_action(&self.rtnl, &self.device, PlugAction::ReleaseOne, 0).await?;
        Ok(self.ledger.release(epoch)?)
    }

    async fn release_indefinite(&mut self) -> Result<(), EgressError> {
        self.ledger.check_release_indefinite()?;
        setup::plug_action(&self.rtnl, &self.device, PlugAction::ReleaseIndefinite, 0).await?;
        let now = self.counters().await?;
        self.absorb(now);
        self.ledger.release_indefinite()?;
        Ok(())
    }

    async fn set_limit(&mut self, bytes: u64) -> Result<(), EgressError> {
        let limit = limit_u32(&self.device.dev, bytes)?;
        setup::plug_action(&self.rtnl, &self.device, PlugAction::Limit, limit).await?;
        self.ledger.set_limit(bytes);
        Ok(())
    }

    async fn stats(&mut self) -> Result<EgressStats, EgressError> {
        if self.ledger.mode() == Mode::TornDown {
            return Ok(self.ledger.stats());
        }
        let now = self.counters().await?;
        // A what-if copy: the open epoch as the kernel sees it now, without moving the
        // baseline (only closes do that).
        let mut view = self.ledger.clone();
        let d = self.delta(&now);
        if view.mode() == Mode::Passthrough {
            view.record_passed(d.packets);
        } else {
            view.add_to_open(&d);
        }
        Ok(view.stats())
    }

    async fn teardown(&mut self) -> Result<(), EgressError> {
        setup::teardown(&self.rtnl, &self.device.dev).await?;
        self.ledger.tear_down();
        Ok(())
    }
}
