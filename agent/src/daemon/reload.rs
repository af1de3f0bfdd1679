//! Carrying out a policy reload (`remusctl reload`, SIGHUP, systemd's `ExecReload`).
//!
//! What may change is decided in one place, [`crate::config::reload::plan`]; this module
//! reads the file, tells the plan each domain's role here, and applies it: new supervisors
//! first (the only step that can fail), then new settings to running supervisors, then
//! retired supervisors. Reloads are serialized: a second one waits for the first. A refused
//! reload changes nothing and the running policy stays.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::domains::Domains;
use super::supervisor;
use super::Shared;
use crate::config::reload::{plan, refusals};
use crate::config::{Config, Diagnostic};

/// How long a retired supervisor may take to end.
const RETIRE_WAIT: Duration = Duration::from_secs(20);

/// Why a reload changed nothing.
#[derive(Debug, Error)]
pub enum ReloadError {
    /// The daemon was started without a file to re-read (the one-process drill).
    #[error("reload: this daemon was started without a configuration file")]
    NoFile,
    /// The new file has errors, or changes what cannot change live, or names missing files.
    #[error("reload of {path} refused, the running policy stays:\n{}", lines(.problems))]
    Refused {
        /// The file.
        path: PathBuf,
        /// Each problem, with file and line.
        problems: Vec<Diagnostic>,
    },
    /// A new domain's supervisor could not start (its role file is unreadable …).
    #[error("reload of {path} refused, the running policy stays: domain {domain}: {reason}")]
    Start {
        /// The file.
        path: PathBuf,
        /// The domain.
        domain: String,
        /// Why.
        reason: String,
    },
}

fn lines(d: &[Diagnostic]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Re-reads the daemon's configuration file and applies it.
pub struct Reloader {
    path: Option<PathBuf>,
    shared: Arc<Shared>,
    domains: Domains,
    /// The policy in force (its domains change with each reload); held for the whole
    /// reload, which serializes reloads.
    running: Mutex<Config>,
}

impl Reloader {
    /// A reloader of the file at `path` (`None`: reloads are refused) over `domains`.
    pub fn new(path: Option<PathBuf>, shared: Arc<Shared>, domains: Domains) -> Self {
        let running = Mutex::new(shared.config.clone());
        Self {
            path,
            shared,
            domains,
            running,
        }
    }

    /// Reloads: a summary of what changed, or why nothing did.
    ///
    /// # Errors
    /// See [`ReloadError`]; on any error nothing was changed.
    pub async fn reload(&self) -> Result<String, ReloadError> {
        let path = self.path.clone().ok_or(ReloadError::NoFile)?;
        let mut running = self.running.lock().await;
        let origin = path.display().to_string();
        let refused = |problems: Vec<Diagnostic>| ReloadError::Refused {
            path: path.clone(),
            problems,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            refused(vec![Diagnostic {
                severity: crate::config::Severity::Error,
                origin: origin.clone(),
                line: 0,
                column: 0,
                message: format!("cannot read configuration: {e}"),
            }])
        })?;
        let new = Config::from_str(&text, &origin).map_err(|e| refused(e.errors))?;
        let missing = new.check_files(&origin);
        if !missing.is_empty() {
            return Err(refused(missing));
        }
        let roles = self
            .domains
            .handles()
            .iter()
            .map(|h| (h.name.clone(), h.status.borrow().role.name().to_string()))
            .collect();
        let p = plan(&running, &new, &roles).map_err(|r| refused(refusals(&text, &origin, &r)))?;
        // New keys are loaded before anything changes: a bad key refuses the whole reload.
        let keys = if p.rekey {
            let keys = crate::keys::load(&new).map_err(|e| {
                refused(vec![Diagnostic {
                    severity: crate::config::Severity::Error,
                    origin: origin.clone(),
                    line: 0,
                    column: 0,
                    message: format!("loading the new keys: {e}"),
                }])
            })?;
            Some(keys)
        } else {
            None
        };
        // New supervisors first: the only fallible step; stop those started if one fails.
        let mut started = Vec::new();
        for d in &p.added {
            match supervisor::spawn(d.clone(), self.shared.clone()) {
                Ok(s) => started.push(s),
                Err(e) => {
                    for (h, task) in started {
                        h.retire.send_replace(true);
                        let _ = tokio::time::timeout(RETIRE_WAIT, task).await;
                    }
                    return Err(ReloadError::Start {
                        path: path.clone(),
                        domain: d.name.clone(),
                        reason: format!("{e:#}"),
                    });
                }
            }
        }
        for (h, task) in started {
            self.domains.insert(h, task);
        }
        for d in p.retuned.iter().chain(&p.reconfigured) {
            if let Some(h) = self.domains.get(&d.name) {
                h.config.send_replace(d.clone());
            }
        }
        for name in &p.removed {
            if let Some(h) = self.domains.get(name) {
                h.retire.send_replace(true);
            }
            if let Some(task) = self.domains.remove(name) {
                if tokio::time::timeout(RETIRE_WAIT, task).await.is_err() {
                    warn!(domain = %name, "reload: the removed domain's supervisor did not end in time");
                }
            }
        }
        if let Some(keys) = keys {
            self.shared.rekey(keys);
        }
        let summary = p.summary();
        *running = new;
        info!(file = %origin, change = %summary, "policy reloaded");
        Ok(format!("reloaded {origin}: {summary}"))
    }
}
