//! `remusctl keygen`: a node's static key pair for `[auth] mode = "keys"`.
//!
//! The private key goes to a new file, owner-only (0600 whatever the umask) and never
//! overwritten: replacing a key in place would cut the node off from a peer that has not yet
//! pinned the new public key, so rotation writes a new file and the policy switches to it
//! (`docs/operations.md`, "Rotating a node's key"). The public key is printed for the peer's
//! `[peer] public_keys` (and the witness's `--node` pins); it is not secret.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use super::{EXIT_OK, EXIT_PROBLEMS};
use crate::keys::{load_node_key, KeysError};
use remus_engine::peer::NodeKey;

/// `remusctl keygen` arguments.
#[derive(Debug, Args)]
pub struct KeygenCmd {
    /// Write a new private key to this file (created owner-only; an existing file is never
    /// overwritten) and print its public key.
    #[arg(long, value_name = "FILE", conflicts_with = "public")]
    pub out: Option<PathBuf>,
    /// Print the public key of an existing private key file instead.
    #[arg(long, value_name = "FILE")]
    pub public: Option<PathBuf>,
}

/// Why `remusctl keygen` failed; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    /// Neither or both of --out and --public.
    #[error("remusctl keygen: give --out FILE (write a new key) or --public FILE (print an existing key's public half)")]
    Usage,
    /// The file already exists.
    #[error("{0}: already exists; a key is never overwritten (write the new key to another file and point [auth] private_key_file at it)")]
    Exists(String),
    /// Creating or writing the file failed.
    #[error("{path}: {op} the key file: {source}")]
    Io {
        path: String,
        op: &'static str,
        source: std::io::Error,
    },
    /// No key could be generated, or the existing file holds none.
    #[error(transparent)]
    Key(#[from] KeysError),
}

impl KeygenCmd {
    /// Runs the command: prints the public key on stdout, problems on stderr.
    pub fn run(self) -> ExitCode {
        let result = match (&self.out, &self.public) {
            (Some(out), None) => generate(out),
            (None, Some(file)) => load_node_key(file)
                .map(|k| k.public().to_string())
                .map_err(KeygenError::from),
            _ => Err(KeygenError::Usage),
        };
        match result {
            Ok(public) => {
                // A closed pipe is not an error worth a message (`remusctl keygen … | head`).
                let _ = writeln!(std::io::stdout(), "{public}");
                ExitCode::from(EXIT_OK)
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EXIT_PROBLEMS)
            }
        }
    }
}

/// Creates `path` (0600, `create_new`) holding a fresh key; returns its public key as text.
fn generate(path: &Path) -> Result<String, KeygenError> {
    use std::os::unix::fs::PermissionsExt;
    let key = NodeKey::generate().map_err(KeysError::from)?;
    let io = |op| {
        let path = path.display().to_string();
        move |source| KeygenError::Io { path, op, source }
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => KeygenError::Exists(path.display().to_string()),
            _ => io("creating")(e),
        })?;
    // The mode given to open() is masked by the umask; set it again so 0600 holds exactly.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .and_then(|()| file.write_all(key.to_file_text().as_bytes()))
        .and_then(|()| file.sync_all())
        .map_err(io("writing"))?;
    Ok(key.public().to_string())
}
