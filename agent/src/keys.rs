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
            let witness = match config.witness.as_ref().and_then(|w| w.public_key()) {
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

/// Why the etcd arbiter's credentials (`[witness] mode = "etcd"`) could not be read. Each
/// names the policy key and the file.
#[derive(Debug, Error)]
pub enum EtcdFilesError {
    /// A secret (the password or the client key) is unreadable or exposed to other users.
    #[error("witness.{key}: {source}")]
    Secret { key: &'static str, source: KeyError },
    /// A certificate file is unreadable.
    #[error("witness.{key} {path}: {source}")]
    Read {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    /// A file is empty (or, for the password, only a line end).
    #[error("witness.{key} {path}: empty")]
    Empty { key: &'static str, path: String },
}

/// Reads the etcd credentials `w` names (password and client key checked owner-only, as
/// every key file) into the arbiter's settings. Nothing connects.
///
/// # Errors
/// [`EtcdFilesError`] naming the file.
pub fn etcd_settings(
    node: &str,
    lease: std::time::Duration,
    w: &crate::config::EtcdWitness,
) -> Result<remus_etcd_arbiter::EtcdSettings, EtcdFilesError> {
    let secret = |key: &'static str, path: &Path| -> Result<Vec<u8>, EtcdFilesError> {
        let v = remus_ha::auth::read_key_file(path)
            .map_err(|source| EtcdFilesError::Secret { key, source })?;
        non_empty(key, path, v)
    };
    let public = |key: &'static str, path: &Path| -> Result<Vec<u8>, EtcdFilesError> {
        let v = std::fs::read(path).map_err(|source| EtcdFilesError::Read {
            key,
            path: path.display().to_string(),
            source,
        })?;
        non_empty(key, path, v)
    };
    let mut s =
        remus_etcd_arbiter::EtcdSettings::new(node, w.endpoints.clone(), w.prefix.clone(), lease);
    if let (Some(user), Some(path)) = (&w.user, &w.password_file) {
        let raw = secret("password_file", path)?;
        let text = String::from_utf8_lossy(&raw);
        // One line end is the editor's, not the password's.
        let password = text
            .strip_suffix('\n')
            .map_or(&*text, |t| t.strip_suffix('\r').unwrap_or(t));
        let password = non_empty("password_file", path, password.as_bytes().to_vec())?;
        s.user = Some((
            user.clone(),
            String::from_utf8_lossy(&password).into_owned(),
        ));
    }
    if w.ca_file.is_some() || w.cert_file.is_some() {
        let ca_pem = w
            .ca_file
            .as_deref()
            .map(|p| public("ca_file", p))
            .transpose()?;
        let client = match (&w.cert_file, &w.key_file) {
            (Some(c), Some(k)) => Some((public("cert_file", c)?, secret("key_file", k)?)),
            _ => None,
        };
        s.tls = Some(remus_etcd_arbiter::EtcdTls { ca_pem, client });
    }
    Ok(s)
}

fn non_empty(key: &'static str, path: &Path, v: Vec<u8>) -> Result<Vec<u8>, EtcdFilesError> {
    if v.iter().all(u8::is_ascii_whitespace) {
        return Err(EtcdFilesError::Empty {
            key,
            path: path.display().to_string(),
        });
    }
    Ok(v)
}
