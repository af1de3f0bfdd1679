//! The real implementations of the engine's VM and network ports: QEMU and `sch-plug`.
//!
//! The engine speaks in small traits (`remus_engine::ports`); the leaf crates speak their own
//! APIs. These adapters are the only place the two meet, so each crate stays ignorant of the
//! others. Each adapter names the object in its errors (`vm web1`, `netbuf tap-web1`). The
//! disk path (`blk-remus`) is the engine's own (`remus_engine::disk`): a write and a
//! checkpoint share one stream and one barrier.

use std::sync::Arc;

use async_trait::async_trait;
use remus_engine::ports::{OutputBuffer, PortError};

/// The protected QEMU as the engine's `VmControl`.
pub struct QemuVm {
    /// `vm <domain>`, for errors.
    pub object: String,
    /// The QMP-level control of the process (shared with the domain runtime).
    pub control: Arc<remus_qemu::VmControl>,
}

#[async_trait]
impl remus_engine::ports::VmControl for QemuVm {
    async fn stop(&mut self) -> Result<(), PortError> {
        self.control
            .stop()
            .await
            .map(|_| ())
            .map_err(|e| PortError::new(&self.object, "stop", e))
    }

    async fn cont(&mut self) -> Result<(), PortError> {
        self.control
            .cont()
            .await
            .map(|_| ())
            .map_err(|e| PortError::new(&self.object, "cont", e))
    }

    async fn save_device_state(&mut self) -> Result<Vec<u8>, PortError> {
        self.control
            .save_device_state()
            .await
            .map(|s| s.bytes)
            .map_err(|e| PortError::new(&self.object, "save device state", e))
    }
}

/// One NIC's egress buffer, named `netbuf <dev>` for errors.
pub type NamedBuffer = (String, Box<dyn sch_plug::EgressBuffer>);

/// All of a domain's NIC buffers, driven as one: an epoch is closed and released on every
/// NIC. Shared with the domain runtime, which releases everything when protection ends.
#[derive(Clone)]
pub struct NicBuffers {
    /// The buffers, one per NIC.
    pub buffers: Arc<tokio::sync::Mutex<Vec<NamedBuffer>>>,
    /// The smallest pipeline depth among them (fixed at construction).
    pub max_closed: usize,
}

impl NicBuffers {
    /// Wraps the buffers of a domain's NICs.
    pub fn new(buffers: Vec<NamedBuffer>) -> Self {
        let max_closed = buffers
            .iter()
            .map(|(_, b)| b.max_closed_epochs())
            .min()
            .unwrap_or(usize::MAX);
        Self {
            buffers: Arc::new(tokio::sync::Mutex::new(buffers)),
            max_closed,
        }
    }
}

#[async_trait]
impl OutputBuffer for NicBuffers {
    fn max_closed_epochs(&self) -> usize {
        self.max_closed
    }

    async fn close_epoch(&mut self, epoch: u64) -> Result<(), PortError> {
        for (name, b) in self.buffers.lock().await.iter_mut() {
            b.buffer(epoch)
                .await
                .map_err(|e| PortError::new(name.as_str(), format!("close epoch {epoch}"), e))?;
        }
        Ok(())
    }

    async fn release(&mut self, epoch: u64) -> Result<(), PortError> {
        for (name, b) in self.buffers.lock().await.iter_mut() {
            b.release(epoch)
                .await
                .map_err(|e| PortError::new(name.as_str(), format!("release epoch {epoch}"), e))?;
        }
        Ok(())
    }

    async fn release_all(&mut self) -> Result<(), PortError> {
        for (name, b) in self.buffers.lock().await.iter_mut() {
            b.release_indefinite()
                .await
                .map_err(|e| PortError::new(name.as_str(), "release all", e))?;
        }
        Ok(())
    }
}
