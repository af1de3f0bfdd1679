//! Fencing: proving the peer can no longer run the VM before this node does.
//!
//! Three policies, one trait ([`Fencer`]):
//! - [`CommandFencer`]: runs an operator-provided command (power off the peer through its
//!   BMC, cut its switch port, …) with `REMUS_DOMAIN`, `REMUS_PEER` and `REMUS_ATTEMPT` in
//!   its environment. Success is exit status 0 within the timeout; a command that outlives
//!   the timeout is killed with its whole process group; failures are retried after a delay.
//! - [`WitnessFencer`]: fencing is winning the domain's lease from the witness — taken at
//!   once if the old primary declared it preemptible by this node (its output waits for this
//!   node's acknowledgements, which stopped before fencing began), otherwise only once it
//!   has expired (and by [`crate::witness`]'s argument, the old primary stopped before that).
//! - [`NoFencer`]: always "succeeds" and says loudly every time that nothing was proven.
//!
//! [`RandomDelay`] wraps any fencer with a random delay before it acts, Pacemaker's trick for
//! two nodes that lose each other at the same instant: without it both shoot together and
//! both die; with it one shoots first and the other is gone before its own delay ends.

use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rand::Rng;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::time::{sleep, timeout, Instant};
use tracing::{info, warn};

use crate::role::FenceProof;
use crate::witness::{Lease, LeaseArbiter, WitnessError};

/// Bytes of a fencing command's output kept for the log (the end of it).
const OUTPUT_TAIL: usize = 2048;

/// A successful fencing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FenceOutcome {
    /// What proves the peer gone (recorded in the role).
    pub proof: FenceProof,
    /// Attempts made (1 = first try).
    pub attempts: u32,
    /// Time from the call to success, delay included.
    pub elapsed: Duration,
    /// With [`WitnessFencer`]: the lease won, to be kept by a [`crate::witness::LeaseKeeper`].
    pub lease: Option<Lease>,
}

/// Why one attempt of a fencing command failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttemptFailure {
    /// The command could not be started.
    Spawn(String),
    /// It exited unsuccessfully; the end of its output.
    Exit {
        /// Its status (`exit status: 1`, `signal: 9`).
        status: String,
        /// The last bytes of stdout and stderr.
        output: String,
    },
    /// It was still running at the timeout and was killed.
    TimedOut(Duration),
}

impl std::fmt::Display for AttemptFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptFailure::Spawn(e) => write!(f, "could not start: {e}"),
            AttemptFailure::Exit { status, output } if output.is_empty() => write!(f, "{status}"),
            AttemptFailure::Exit { status, output } => write!(f, "{status}; output: {output}"),
            AttemptFailure::TimedOut(t) => write!(f, "still running after {t:?}, killed"),
        }
    }
}

/// Errors of fencing; each names the domain and the peer.
#[derive(Debug, Error)]
pub enum FenceError {
    /// The command policy has no program.
    #[error("fence: empty command")]
    EmptyCommand,
    /// Every attempt of the command failed.
    #[error("fence {domain}: {peer} not fenced after {attempts} attempts of {program}: {last}")]
    CommandFailed {
        domain: String,
        peer: String,
        program: String,
        attempts: u32,
        last: AttemptFailure,
    },
    /// The witness gave the lease to someone else (the peer still holds it).
    #[error("fence {domain}: lease held by {holder}, {peer} may still be running")]
    LeaseDenied {
        domain: String,
        peer: String,
        holder: String,
    },
    /// The witness could not be asked.
    #[error("fence {domain}: {peer}: {source}")]
    Witness {
        domain: String,
        peer: String,
        source: Box<WitnessError>,
    },
}

/// Something that proves a peer gone.
#[async_trait]
pub trait Fencer: Send + Sync {
    /// Fences `peer` for `domain`.
    ///
    /// # Errors
    /// A [`FenceError`] when the peer could not be proven gone: the caller must not
    /// activate (or release output).
    async fn fence(&self, domain: &str, peer: &str) -> Result<FenceOutcome, FenceError>;
}

#[async_trait]
impl<F: Fencer + ?Sized> Fencer for Arc<F> {
    async fn fence(&self, domain: &str, peer: &str) -> Result<FenceOutcome, FenceError> {
        (**self).fence(domain, peer).await
    }
}

#[async_trait]
impl<F: Fencer + ?Sized> Fencer for Box<F> {
    async fn fence(&self, domain: &str, peer: &str) -> Result<FenceOutcome, FenceError> {
        (**self).fence(domain, peer).await
    }
}

/// Fencing by running a command.
#[derive(Clone, Debug)]
pub struct CommandFencer {
    argv: Vec<String>,
    timeout: Duration,
    retries: u32,
    retry_delay: Duration,
}

impl CommandFencer {
    /// A fencer running `argv` with a per-attempt `timeout`, tried `retries + 1` times with
    /// one second between attempts.
    ///
    /// # Errors
    /// [`FenceError::EmptyCommand`] for an empty `argv`.
    pub fn new(argv: Vec<String>, timeout: Duration, retries: u32) -> Result<Self, FenceError> {
        if argv.is_empty() || argv[0].is_empty() {
            return Err(FenceError::EmptyCommand);
        }
        Ok(Self {
            argv,
            timeout,
            retries,
            retry_delay: Duration::from_secs(1),
        })
    }

    /// Sets the pause between a failed attempt and the next.
    pub fn with_retry_delay(mut self, delay: Duration) -> Self {
        self.retry_delay = delay;
        self
    }

    async fn attempt(&self, domain: &str, peer: &str, n: u32) -> Result<(), AttemptFailure> {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..])
            .env("REMUS_DOMAIN", domain)
            .env("REMUS_PEER", peer)
            .env("REMUS_ATTEMPT", n.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills whatever it started too.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| AttemptFailure::Spawn(e.to_string()))?;
        let pid = child.id();
        let out = tokio::spawn(tail(child.stdout.take()));
        let err = tokio::spawn(tail(child.stderr.take()));
        let status = match timeout(self.timeout, child.wait()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(AttemptFailure::Spawn(format!("wait: {e}"))),
            Err(_) => {
                kill_group(pid);
                let _ = child.wait().await;
                out.abort();
                err.abort();
                return Err(AttemptFailure::TimedOut(self.timeout));
            }
        };
        // Children that kept the pipes open must not hold the verdict back: after a grace
        // period, kill what is left of the group (its id cannot have been reused while
        // members remain, and members remain exactly when the pipes are still open).
        let grace = Duration::from_millis(200);
        let both = async { (out.await.unwrap_or_default(), err.await.unwrap_or_default()) };
        let (mut output, e) = match timeout(grace, both).await {
            Ok(pair) => pair,
            Err(_) => {
                kill_group(pid);
                (
                    String::new(),
                    "(output cut: the command left children behind)".to_string(),
                )
            }
        };
        if !e.is_empty() {
            if !output.is_empty() {
                output.push_str(" | ");
            }
            output.push_str(&e);
        }
        verdict(status, output)
    }
}

fn verdict(status: ExitStatus, output: String) -> Result<(), AttemptFailure> {
    if status.success() {
        Ok(())
    } else {
        Err(AttemptFailure::Exit {
            status: status.to_string(),
            output,
        })
    }
}

/// Kills the process group led by `pid` (the fencing command and everything it started).
fn kill_group(pid: Option<u32>) {
    let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) else {
        return;
    };
    // The group may already be gone (ESRCH): nothing to do then.
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
}

/// Reads a pipe to its end, keeping only the last [`OUTPUT_TAIL`] bytes.
async fn tail<R: AsyncRead + Unpin>(pipe: Option<R>) -> String {
    let Some(mut pipe) = pipe else {
        return String::new();
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
        kept.extend_from_slice(&buf[..n]);
        if kept.len() > OUTPUT_TAIL {
            kept.drain(..kept.len() - OUTPUT_TAIL);
        }
    }
    String::from_utf8_lossy(&kept).trim().to_string()
}

#[async_trait]
impl Fencer for CommandFencer {
    async fn fence(&self, domain: &str, peer: &str) -> Result<FenceOutcome, FenceError> {
        let started = Instant::now();
        let attempts = self.retries.saturating_add(1);
        let mut last = None;
        for n in 1..=attempts {
            if n > 1 {
                sleep(self.retry_delay).await;
            }
            match self.attempt(domain, peer, n).await {
                Ok(()) => {
                    info!(domain, peer, attempt = n, elapsed = ?started.elapsed(), program = %self.argv[0], "peer fenced by command");
                    return Ok(FenceOutcome {
                        proof: FenceProof::Command,
                        attempts: n,
                        elapsed: started.elapsed(),
                        lease: None,
                    });
                }
                Err(f) => {
                    warn!(domain, peer, attempt = n, of = attempts, failure = %f, "fencing attempt failed");
                    last = Some(f);
                }
            }
        }
        Err(FenceError::CommandFailed {
            domain: domain.to_string(),
            peer: peer.to_string(),
            program: self.argv[0].clone(),
            attempts,
            last: last.unwrap_or(AttemptFailure::Spawn("no attempt".into())),
        })
    }
}

/// Fencing by winning the lease from the arbiter (the witness or etcd).
#[derive(Clone, Debug)]
pub struct WitnessFencer {
    client: Arc<dyn LeaseArbiter>,
}

impl WitnessFencer {
    /// A fencer asking `client`'s arbiter.
    pub fn new(client: Arc<dyn LeaseArbiter>) -> Self {
        Self { client }
    }
}

#[async_trait]
impl Fencer for WitnessFencer {
    async fn fence(&self, domain: &str, peer: &str) -> Result<FenceOutcome, FenceError> {
        let started = Instant::now();
        match self.client.preempt(domain).await {
            Ok(lease) => {
                info!(
                    domain,
                    peer,
                    generation = lease.generation,
                    "lease won: peer fenced"
                );
                Ok(FenceOutcome {
                    proof: FenceProof::Lease,
                    attempts: 1,
                    elapsed: started.elapsed(),
                    lease: Some(lease),
                })
            }
            Err(WitnessError::Denied { holder, .. }) => Err(FenceError::LeaseDenied {
                domain: domain.to_string(),
                peer: peer.to_string(),
                holder,
            }),
            Err(source) => Err(FenceError::Witness {
                domain: domain.to_string(),
                peer: peer.to_string(),
                source: Box::new(source),
            }),
        }
    }
}

/// No fencing: succeeds at once, and warns every time that nothing was proven.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoFencer;

#[async_trait]
impl Fencer for NoFencer {
    async fn fence(&self, domain: &str, peer: &str) -> Result<FenceOutcome, FenceError> {
        warn!(
            domain,
            peer,
            "UNSAFE: fencing policy is none; proceeding without proof that {peer} stopped \
             (both nodes may run the VM: split brain)"
        );
        Ok(FenceOutcome {
            proof: FenceProof::Unfenced,
            attempts: 1,
            elapsed: Duration::ZERO,
            lease: None,
        })
    }
}

/// Waits a random time in `[0, max]` before fencing with the inner fencer.
#[derive(Clone, Debug)]
pub struct RandomDelay<F> {
    inner: F,
    max: Duration,
}

impl<F> RandomDelay<F> {
    /// Wraps `inner` with a random delay of at most `max`.
    pub fn new(inner: F, max: Duration) -> Self {
        Self { inner, max }
    }
}

#[async_trait]
impl<F: Fencer> Fencer for RandomDelay<F> {
    async fn fence(&self, domain: &str, peer: &str) -> Result<FenceOutcome, FenceError> {
        let started = Instant::now();
        let max_ms = u64::try_from(self.max.as_millis()).unwrap_or(u64::MAX);
        let delay = Duration::from_millis(rand::rng().random_range(0..=max_ms));
        info!(domain, peer, ?delay, "fencing delay");
        sleep(delay).await;
        let mut out = self.inner.fence(domain, peer).await?;
        out.elapsed = started.elapsed();
        Ok(out)
    }
}
