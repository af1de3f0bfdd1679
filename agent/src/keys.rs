//! This node's keys, as the policy's `[auth]` names them: read once at start and turned into
//! what each channel needs — the replication stream's [`ChannelAuth`], the heartbeats'
//! [`PeerKeys`], and the witness protocol's [`HaKey`].
//!
//! Why here: the engine (Noise) and `remus-ha` (heartbeat MACs) do not know each other; the
//! per-node heartbeat keys derive from the X25519 secret the engine's [`NodeKey`] computes,
//! so the agent, which imports both, composes them. Every key file is checked to be readable
//! by its owner only before it is read (`remus_ha::auth::check_key_file_mode`).

use std::path::Path;
use std::sync::Arc;

use remus_engine::peer::{ChannelAuth, NodeKey, PreSharedKey};
use remus_ha::auth::KeyError;
use remus_ha::{HaKey, PeerKeys};
use thiserror::Error;

use crate::config::{AuthConfig, Config};

/// Why the node's keys could not be loaded. Each names the file or key.
#[derive(Debug, Error)]
pub enum KeysError {
    /// A key file is unreadable, exposed to other users, or too short.
    #[error("{0}")]
    File(#[from] KeyError),
    /// A key does not parse, or a pinned public key is unusable.
    #[error("{0}")]
    Key(#[from] remus_keys::KeyError),
}

/// Everything the daemon authenticates with.
#[derive(Clone, Debug)]
pub struct NodeKeys {
    /// The replication stream.
    pub channel: ChannelAuth,
    /// The heartbeats.
    pub heartbeat: PeerKeys,
    /// The witness protocol's key: the pre-shared key's in psk mode, the one shared with the
    /// pinned witness key in keys mode; `None` without a witness.
    pub witness: Option<HaKey>,
}

/// Reads this node's private key file (owner-only, base64, as `remusctl keygen` writes it).
///
/// # Errors
/// [`KeysError::File`] for an unreadable or exposed file, [`KeysError::Key`] for one that
/// does not hold a key.
pub fn load_node_key(path: &Path) -> Result<NodeKey, KeysError> {
    let raw = remus_ha::auth::read_key_file(path)?;
    let text = String::from_utf8_lossy(&raw);
    Ok(NodeKey::from_text(&text, &path.display().to_string())?)
}

/// Loads the keys the policy names.
///
/// # Errors
/// As [`load_node_key`]; a pre-shared key file that is too short.
pub fn load(config: &Config) -> Result<NodeKeys, KeysError> {
    let psk = match config.auth.psk_file() {
        Some(path) => {
            let raw = remus_ha::auth::read_key_file(path)?;
            let too_short = || {
                KeysError::File(KeyError::TooShort {
                    path: path.display().to_string(),
                    len: raw.len(),
                })
            };
            let stream = PreSharedKey::from_bytes(&raw).ok_or_else(too_short)?;
            let ha = HaKey::derive(&raw).ok_or_else(too_short)?;
            Some((stream, ha))
        }
        None => None,
    };
    match &config.auth {
        AuthConfig::Psk { key_file } => {
            let (stream, ha) = psk.ok_or_else(|| {
                KeysError::File(KeyError::TooShort {
                    path: key_file.display().to_string(),
                    len: 0,
                })
            })?;
            Ok(NodeKeys {
                channel: ChannelAuth::Psk(stream),
                heartbeat: PeerKeys::shared(ha.clone()),
                witness: Some(ha),
            })
        }
        AuthConfig::Keys {
            private_key_file, ..
        } => {
            let local = load_node_key(private_key_file)?;
            let secrets = config
                .peer
                .public_keys
                .iter()
                .map(|k| local.shared_secret(k))
                .collect::<Result<Vec<_>, _>>()?;
            let heartbeat = PeerKeys::per_node(
                &secrets,
                psk.as_ref().map(|(_, ha)| ha),
                &config.node.name,
                &config.peer.name,
            )
            .ok_or_else(|| remus_keys::KeyError {
                what: "[peer] public_keys".into(),
                reason: "no key pinned".into(),
            })?;
            // The witness protocol: a key from this node's and the witness's secret.
            let witness = match config.witness.as_ref().and_then(|w| w.public_key) {
                Some(w) => Some(HaKey::for_witness(
                    &local.shared_secret(&w)?,
                    &config.node.name,
                )),
                None => None,
            };
            Ok(NodeKeys {
                channel: ChannelAuth::Keys {
                    local: Arc::new(local),
                    peer_keys: config.peer.public_keys.clone(),
                    psk: psk.as_ref().map(|(s, _)| s.clone()),
                },
                heartbeat,
                witness,
            })
        }
    }
}
