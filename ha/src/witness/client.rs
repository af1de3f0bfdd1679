//! The witness client and the lease keeper.
//!
//! Invariant: a [`Lease`]'s `expires_at_local` is computed from the instant the answered
//! request was *sent*, minus a drift margin, so it is always earlier than the witness's own
//! expiry for that grant (see the module documentation of [`crate::witness`]).
//!
//! # Which wire version
//! The client does not know whether its witness is of this release (version 3: takeovers)
//! or of v0.1.0 (version 2). Until an answer says so it alternates: the first attempt of an
//! exchange in version 3, the next in version 2, and so on. An answer to *any* attempt of
//! the exchange counts (a slow witness's version-3 answer arriving while the version-2
//! attempt waits is still proof of version 3). A version-3 answer is kept; a version-2
//! answer proves nothing more than that (every version-3 witness also answers version 2),
//! so it is kept only from a witness never heard in version 3, and only for a minute (a
//! witness upgraded meanwhile is noticed). Silence forgets both. Settling on version 2
//! after one slow version-3 answer had turned takeovers off for a minute on a loaded host.
//! Sent in version 2, a request loses its takeover flags, which only ever makes it more
//! conservative: a lease declared preemptible is granted exclusive, a preempting acquire
//! becomes a plain one.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout_at, Instant};
use tracing::{debug, info, warn};

use super::proto::{
    flags, reason, Op, Request, Response, Status, MAX_DATAGRAM, MAX_NAME, VERSION_2, VERSION_3,
};
use super::{LeaseArbiter, WitnessError, DEFAULT_TTL, DRIFT_DIVISOR};
use crate::auth::{HaKey, SequenceSource};
use crate::lineage::CopyStamp;

/// How a node talks to the witness.
#[derive(Clone, Debug)]
pub struct WitnessClientConfig {
    /// This node's name (as the peer and the witness know it).
    pub node: String,
    /// The witness's UDP address.
    pub witness: SocketAddr,
    /// The MAC key.
    pub key: HaKey,
    /// Lease length requested.
    pub ttl: Duration,
    /// How long to wait for an answer before sending again.
    pub attempt_timeout: Duration,
    /// Sends per operation before giving up.
    pub attempts: u32,
    /// Local address to send from (default: any address of the witness's family).
    pub bind: Option<SocketAddr>,
}

impl WitnessClientConfig {
    /// Defaults: 2 s TTL, 3 attempts of 200 ms each.
    pub fn new(node: impl Into<String>, witness: SocketAddr, key: HaKey) -> Self {
        Self {
            node: node.into(),
            witness,
            key,
            ttl: DEFAULT_TTL,
            attempt_timeout: Duration::from_millis(200),
            attempts: 3,
            bind: None,
        }
    }
}

/// A lease this node holds, by its own clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The domain.
    pub domain: String,
    /// The grant's generation (named by renewals and the release).
    pub generation: u64,
    /// The TTL the witness granted.
    pub ttl: Duration,
    /// When the answered request was sent.
    pub sent_at: Instant,
    /// When this node must consider the lease gone: `sent_at + ttl - ttl / 100`.
    pub expires_at_local: Instant,
    /// The witness granted it preemptible: the peer named when asking may take it at once.
    /// Such a lease proves nothing to release output on without the peer's
    /// acknowledgements (see [`LeaseMode`]).
    pub preemptible: bool,
}

/// How a lease is asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseMode {
    /// Nobody may take it before it expires: the holder may release output on it alone.
    Exclusive,
    /// The named peer may take it at once (`flags::PREEMPTIBLE`): asked by a primary whose
    /// output leaves only on that peer's acknowledgements, so that its backup, once it has
    /// stopped acknowledging, need not wait for the lease to run out.
    PreemptibleBy(String),
}

/// How long a witness that answered in version 2 is taken to speak only that.
const V2_KEPT_FOR: Duration = Duration::from_secs(60);

impl Lease {
    /// Whether the lease is still valid at `now` by this node's conservative view.
    pub fn valid_at(&self, now: Instant) -> bool {
        now < self.expires_at_local
    }
}

/// What the witness says about a domain's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The holder, if held.
    pub holder: Option<String>,
    /// Generation of the current grant (0 if free).
    pub generation: u64,
    /// How long it still runs at the witness.
    pub remaining: Duration,
}

/// The newest copy stamp the witness recorded for a domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedCopy {
    /// The stamp ([`CopyStamp::NONE`] when nothing was recorded).
    pub stamp: CopyStamp,
    /// The node that recorded it.
    pub node: Option<String>,
}

/// A client of one witness. Share it (`Arc`) among all domains of a node: its nonces must
/// increase per (node, domain), which one client guarantees and two clients racing for the
/// same domain would not.
#[derive(Debug)]
pub struct WitnessClient {
    cfg: WitnessClientConfig,
    socket: UdpSocket,
    seq: SequenceSource,
    /// One exchange at a time, so an answer is never read by the wrong caller. It guards
    /// what was learned of the witness's wire version.
    exchange_lock: Mutex<Learned>,
    /// The MAC key in use: `cfg.key` until [`WitnessClient::set_key`] (a reload during a key
    /// rotation) replaces it.
    key: std::sync::RwLock<HaKey>,
}

/// What the client learned of its witness's wire version.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Learned {
    /// The version to speak (`None`: unknown, alternate), and since when.
    known: Option<(u8, Instant)>,
    /// The witness answered in version 3 since it last fell silent.
    seen_v3: bool,
}

impl Learned {
    /// An answer in `version` (see the module doc).
    fn answered(&mut self, version: u8, now: Instant) {
        if version == VERSION_3 {
            self.seen_v3 = true;
        } else if self.seen_v3 {
            // A version-3 witness answering a version-2 attempt: keep trying 3 first.
            return;
        }
        if self.known.is_none_or(|(v, _)| v != version) {
            self.known = Some((version, now));
        }
    }

    /// The version of `attempt` (1-based) of an exchange.
    fn version_of(&mut self, attempt: u32, now: Instant) -> u8 {
        if self
            .known
            .is_some_and(|(v, at)| v == VERSION_2 && now.duration_since(at) > V2_KEPT_FOR)
        {
            self.known = None;
        }
        match self.known {
            Some((v, _)) => v,
            None if attempt % 2 == 1 => VERSION_3,
            None => VERSION_2,
        }
    }
}

impl WitnessClient {
    /// Binds the client's socket.
    ///
    /// # Errors
    /// [`WitnessError::BadName`] for an unusable node name, [`WitnessError::Io`] on bind.
    pub async fn new(cfg: WitnessClientConfig) -> Result<Self, WitnessError> {
        check_name("node", &cfg.node)?;
        let bind = cfg.bind.unwrap_or(match cfg.witness {
            SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        });
        let socket = UdpSocket::bind(bind)
            .await
            .map_err(|source| WitnessError::Io {
                addr: cfg.witness,
                op: "bind client socket",
                source,
            })?;
        Ok(Self {
            key: std::sync::RwLock::new(cfg.key.clone()),
            cfg,
            socket,
            seq: SequenceSource::new(),
            exchange_lock: Mutex::new(Learned::default()),
        })
    }

    /// Authenticates from now on with `key` (this node's new key, or a new witness key,
    /// taken by a policy reload). An exchange in flight may need one more attempt.
    pub fn set_key(&self, key: HaKey) {
        *self
            .key
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = key;
    }

    fn current_key(&self) -> HaKey {
        self.key
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    /// The TTL requested.
    pub fn ttl(&self) -> Duration {
        self.cfg.ttl
    }

    /// Acquires the domain's lease.
    ///
    /// # Errors
    /// [`WitnessError::Denied`] if another node holds it, [`WitnessError::Unreachable`],
    /// [`WitnessError::Refused`].
    pub async fn acquire(&self, domain: &str) -> Result<Lease, WitnessError> {
        self.grant(domain, 0, &LeaseMode::Exclusive, false).await
    }

    /// Acquires the domain's lease (exclusive), taking it at once from a holder that
    /// declared it preemptible by this node: the backup's fencing, after it stopped
    /// acknowledging its primary.
    ///
    /// # Errors
    /// As [`WitnessClient::acquire`].
    pub async fn preempt(&self, domain: &str) -> Result<Lease, WitnessError> {
        self.grant(domain, 0, &LeaseMode::Exclusive, true).await
    }

    /// Renews a lease exclusively (same generation if still held at the witness; a new one
    /// if it had expired there and was free).
    ///
    /// # Errors
    /// As [`WitnessClient::acquire`].
    pub async fn renew(&self, lease: &Lease) -> Result<Lease, WitnessError> {
        self.renew_as(lease, &LeaseMode::Exclusive).await
    }

    /// Renews a lease in `mode`.
    ///
    /// # Errors
    /// As [`WitnessClient::acquire`].
    pub async fn renew_as(&self, lease: &Lease, mode: &LeaseMode) -> Result<Lease, WitnessError> {
        self.grant(&lease.domain, lease.generation, mode, false)
            .await
    }

    /// Acquires the domain's lease in `mode`.
    ///
    /// # Errors
    /// As [`WitnessClient::acquire`].
    pub async fn acquire_as(&self, domain: &str, mode: &LeaseMode) -> Result<Lease, WitnessError> {
        self.grant(domain, 0, mode, false).await
    }

    /// Gives the lease up. Returns whether the witness still had it as ours.
    ///
    /// # Errors
    /// [`WitnessError::Unreachable`], [`WitnessError::Refused`].
    pub async fn release(&self, lease: &Lease) -> Result<bool, WitnessError> {
        let (r, _) = self
            .exchange(Op::Release, &lease.domain, lease.generation, NO_TAKEOVER)
            .await?;
        match r.status {
            Status::Released => Ok(true),
            Status::NotHolder => Ok(false),
            _ => Err(self.refused(&r, Op::Release)),
        }
    }

    /// Asks who holds the domain's lease.
    ///
    /// # Errors
    /// [`WitnessError::Unreachable`], [`WitnessError::Refused`].
    pub async fn query(&self, domain: &str) -> Result<LeaseInfo, WitnessError> {
        let (r, _) = self.exchange(Op::Query, domain, 0, NO_TAKEOVER).await?;
        match r.status {
            Status::Free => Ok(LeaseInfo {
                holder: None,
                generation: 0,
                remaining: Duration::ZERO,
            }),
            Status::Held => Ok(LeaseInfo {
                holder: Some(r.holder),
                generation: r.generation,
                remaining: Duration::from_millis(u64::from(r.ttl_ms)),
            }),
            _ => Err(self.refused(&r, Op::Query)),
        }
    }

    /// Records this node's copy stamp for `domain` at the witness (which keeps the newest it
    /// was ever sent) and returns the newest recorded, with the node that recorded it. A
    /// node about to start a domain learns from it whether a newer copy exists even when
    /// the peer that holds it is down.
    ///
    /// # Errors
    /// Unreachable witness, or a refusal.
    pub async fn record_copy(
        &self,
        domain: &str,
        copy: CopyStamp,
    ) -> Result<RecordedCopy, WitnessError> {
        let (r, _) = self
            .exchange_with(Op::Record, domain, 0, copy, NO_TAKEOVER)
            .await?;
        match r.status {
            Status::Recorded => Ok(RecordedCopy {
                stamp: r.copy,
                node: (!r.holder.is_empty()).then_some(r.holder),
            }),
            _ => Err(self.refused(&r, Op::Record)),
        }
    }

    async fn grant(
        &self,
        domain: &str,
        generation: u64,
        mode: &LeaseMode,
        preempt: bool,
    ) -> Result<Lease, WitnessError> {
        let takeover = match mode {
            LeaseMode::PreemptibleBy(peer) => (flags::PREEMPTIBLE, peer.as_str()),
            LeaseMode::Exclusive if preempt => (flags::PREEMPT, ""),
            LeaseMode::Exclusive => NO_TAKEOVER,
        };
        if !takeover.1.is_empty() {
            check_name("peer", takeover.1)?;
        }
        let (r, sent_at) = self
            .exchange(Op::Acquire, domain, generation, takeover)
            .await?;
        match r.status {
            Status::Granted => {
                // Never trust a longer grant than asked for.
                let ttl = Duration::from_millis(u64::from(r.ttl_ms)).min(self.cfg.ttl);
                Ok(Lease {
                    domain: domain.to_string(),
                    generation: r.generation,
                    ttl,
                    sent_at,
                    expires_at_local: sent_at + ttl - ttl / DRIFT_DIVISOR,
                    preemptible: r.flags & flags::PREEMPTIBLE != 0,
                })
            }
            Status::Denied => Err(WitnessError::Denied {
                at: format!("witness {}", self.cfg.witness),
                domain: domain.to_string(),
                holder: r.holder,
                remaining: Duration::from_millis(u64::from(r.ttl_ms)),
            }),
            _ => Err(self.refused(&r, Op::Acquire)),
        }
    }

    fn refused(&self, r: &Response, op: Op) -> WitnessError {
        WitnessError::Refused {
            addr: self.cfg.witness,
            domain: r.domain.clone(),
            op: op.name(),
            reason: if r.status == Status::Refused {
                reason::text(r.reason)
            } else {
                "unexpected answer"
            },
        }
    }

    /// Sends the request (fresh nonce per attempt) until an authentic answer to *that*
    /// attempt arrives. Returns it with the instant the answered attempt was sent.
    async fn exchange(
        &self,
        op: Op,
        domain: &str,
        generation: u64,
        takeover: (u8, &str),
    ) -> Result<(Response, Instant), WitnessError> {
        self.exchange_with(op, domain, generation, CopyStamp::NONE, takeover)
            .await
    }

    /// `takeover`: the version-3 flags and peer of the request (dropped in version 2).
    async fn exchange_with(
        &self,
        op: Op,
        domain: &str,
        generation: u64,
        copy: CopyStamp,
        takeover: (u8, &str),
    ) -> Result<(Response, Instant), WitnessError> {
        check_name("domain", domain)?;
        let mut learned = self.exchange_lock.lock().await;
        let addr = self.cfg.witness;
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        // (nonce, version, when sent) of every attempt of this exchange: a late answer to an
        // earlier attempt is as good as one to the current attempt.
        let mut sent: Vec<(u64, u8, Instant)> = Vec::new();
        for attempt in 1..=self.cfg.attempts.max(1) {
            let version = learned.version_of(attempt, Instant::now());
            let (flags, peer) = if version == VERSION_3 {
                takeover
            } else {
                NO_TAKEOVER
            };
            let req = Request {
                op,
                node: self.cfg.node.clone(),
                domain: domain.to_string(),
                nonce: self.seq.next(),
                generation,
                ttl_ms: u32::try_from(self.cfg.ttl.as_millis()).unwrap_or(u32::MAX),
                copy,
                version,
                flags,
                peer: peer.to_string(),
            };
            let key = self.current_key();
            let bytes = req.encode(&key).map_err(|_| WitnessError::BadName {
                what: "domain",
                name: domain.to_string(),
            })?;
            let attempt_sent_at = Instant::now();
            sent.push((req.nonce, req.version, attempt_sent_at));
            if let Err(e) = self.socket.send_to(&bytes, addr).await {
                // Unreachable networks are retried like lost datagrams.
                debug!(%addr, attempt, error = %e, "witness request not sent");
            }
            let deadline = attempt_sent_at + self.cfg.attempt_timeout;
            loop {
                let Ok(r) = timeout_at(deadline, self.socket.recv_from(&mut buf)).await else {
                    break;
                };
                let (n, from) = r.map_err(|source| WitnessError::Io {
                    addr,
                    op: "receive",
                    source,
                })?;
                match Response::decode(&key, &buf[..n]) {
                    Ok(resp)
                        if resp.node == req.node
                            && resp.domain == req.domain
                            && sent
                                .iter()
                                .any(|&(n, v, _)| n == resp.nonce && v == resp.version) =>
                    {
                        let before = learned.known.map(|(v, _)| v);
                        learned.answered(resp.version, Instant::now());
                        if learned.known.map(|(v, _)| v) != before {
                            info!(%addr, version = resp.version, "the witness speaks wire version {}", resp.version);
                        }
                        // The lease runs from when the answered attempt was sent (the
                        // invariant at the top of this module).
                        let at = sent
                            .iter()
                            .find(|&&(n, _, _)| n == resp.nonce)
                            .map_or(attempt_sent_at, |&(_, _, t)| t);
                        return Ok((resp, at));
                    }
                    Ok(_) => debug!(%from, "stale witness answer ignored"),
                    Err(e) => warn!(%from, error = %e, "witness answer dropped"),
                }
            }
        }
        // Silent: it may have been replaced by another release; learn its version again.
        *learned = Learned::default();
        Err(WitnessError::Unreachable {
            addr,
            domain: domain.to_string(),
            op: op.name(),
            attempts: self.cfg.attempts.max(1),
        })
    }
}

#[async_trait::async_trait]
impl LeaseArbiter for WitnessClient {
    fn backend(&self) -> &'static str {
        "witness"
    }

    fn location(&self) -> String {
        self.cfg.witness.to_string()
    }

    fn node(&self) -> &str {
        WitnessClient::node(self)
    }

    fn ttl(&self) -> Duration {
        WitnessClient::ttl(self)
    }

    async fn acquire_as(&self, domain: &str, mode: &LeaseMode) -> Result<Lease, WitnessError> {
        WitnessClient::acquire_as(self, domain, mode).await
    }

    async fn preempt(&self, domain: &str) -> Result<Lease, WitnessError> {
        WitnessClient::preempt(self, domain).await
    }

    async fn renew_as(&self, lease: &Lease, mode: &LeaseMode) -> Result<Lease, WitnessError> {
        WitnessClient::renew_as(self, lease, mode).await
    }

    async fn release(&self, lease: &Lease) -> Result<bool, WitnessError> {
        WitnessClient::release(self, lease).await
    }

    async fn query(&self, domain: &str) -> Result<LeaseInfo, WitnessError> {
        WitnessClient::query(self, domain).await
    }

    async fn record_copy(
        &self,
        domain: &str,
        copy: CopyStamp,
    ) -> Result<RecordedCopy, WitnessError> {
        WitnessClient::record_copy(self, domain, copy).await
    }
}

/// Sends `v` on `tx` unless it is the current value (watchers wake only on a change).
fn send_if_changed<T: PartialEq>(tx: &watch::Sender<T>, v: T) {
    tx.send_if_modified(|cur| {
        if *cur == v {
            false
        } else {
            *cur = v;
            true
        }
    });
}

/// No takeover flags, no peer.
const NO_TAKEOVER: (u8, &str) = (0, "");

fn check_name(what: &'static str, name: &str) -> Result<(), WitnessError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(WitnessError::BadName {
            what,
            name: name.to_string(),
        });
    }
    Ok(())
}

/// The keeper's verdict on a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseState {
    /// The first acquisition is under way.
    Acquiring,
    /// Held until `until` (this node's conservative clock). Check `until` against the
    /// clock when acting: the value may be read late.
    Held {
        /// Local expiry.
        until: Instant,
        /// The grant's generation.
        generation: u64,
        /// Granted preemptible: proves the lease only to run with output held for the peer's
        /// acknowledgements, not to release output alone.
        preemptible: bool,
    },
    /// Not held: expired without a successful renewal, or the witness is unreachable.
    Lost,
    /// Another node holds it.
    Denied {
        /// That node.
        holder: String,
    },
}

impl LeaseState {
    /// Whether the state proves the lease held at `now`.
    pub fn held_at(&self, now: Instant) -> bool {
        matches!(self, LeaseState::Held { until, .. } if now < *until)
    }

    /// Whether the state proves the lease held at `now`, and not preemptible.
    pub fn held_exclusively_at(&self, now: Instant) -> bool {
        matches!(self, LeaseState::Held { until, preemptible: false, .. } if now < *until)
    }
}

/// A task that acquires a domain's lease from its arbiter (the witness or etcd: any
/// [`LeaseArbiter`]) and renews it every TTL/3 in the mode it is told
/// ([`LeaseKeeper::set_mode`]: at once when the mode changes), reporting through a watch
/// channel. It publishes `Lost` at the local expiry even if the witness never answers.
#[derive(Debug)]
pub struct LeaseKeeper {
    state: watch::Receiver<LeaseState>,
    mode: watch::Sender<LeaseMode>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Option<Lease>>,
    client: Arc<dyn LeaseArbiter>,
}

impl LeaseKeeper {
    /// Starts keeping `domain`'s lease, beginning with `initial` if this node already holds
    /// it (e.g. won by fencing).
    pub fn spawn(client: Arc<dyn LeaseArbiter>, domain: String, initial: Option<Lease>) -> Self {
        let first = match &initial {
            Some(l) => LeaseState::Held {
                until: l.expires_at_local,
                generation: l.generation,
                preemptible: l.preemptible,
            },
            None => LeaseState::Acquiring,
        };
        let (tx, rx) = watch::channel(first);
        let (stop, stop_rx) = watch::channel(false);
        let (mode, mode_rx) = watch::channel(LeaseMode::Exclusive);
        let task = tokio::spawn(keep(client.clone(), domain, initial, tx, mode_rx, stop_rx));
        Self {
            state: rx,
            mode,
            stop,
            task,
            client,
        }
    }

    /// The keeper's verdicts.
    pub fn state(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// How the lease is to be held from now on; a change is sent to the witness at once.
    pub fn set_mode(&self, mode: LeaseMode) {
        send_if_changed(&self.mode, mode);
    }

    /// Whether the lease is held now.
    pub fn is_held(&self) -> bool {
        self.state.borrow().held_at(Instant::now())
    }

    /// Stops renewing; with `release`, gives the lease back so the other node need not wait
    /// for it to expire.
    ///
    /// # Errors
    /// The release's error, if any (the lease then simply expires).
    pub async fn stop(self, release: bool) -> Result<(), WitnessError> {
        let _ = self.stop.send(true);
        let lease = self.task.await.ok().flatten();
        match lease {
            Some(l) if release => self.client.release(&l).await.map(|_| ()),
            _ => Ok(()),
        }
    }
}

async fn keep(
    client: Arc<dyn LeaseArbiter>,
    domain: String,
    mut lease: Option<Lease>,
    tx: watch::Sender<LeaseState>,
    mut mode: watch::Receiver<LeaseMode>,
    mut stop: watch::Receiver<bool>,
) -> Option<Lease> {
    let ttl = client.ttl();
    let far = || Instant::now() + Duration::from_secs(86_400);
    let publish = |s: LeaseState| send_if_changed(&tx, s);
    let mut next_attempt = match &lease {
        Some(l) => l.sent_at + ttl / 3,
        None => Instant::now(),
    };
    loop {
        // Wait for the next attempt, publishing Lost at the local expiry meanwhile.
        loop {
            let expiry = lease.as_ref().map_or_else(far, |l| l.expires_at_local);
            tokio::select! {
                () = sleep_until(next_attempt) => break,
                () = sleep_until(expiry), if lease.is_some() => {
                    warn!(%domain, "lease expired locally before a renewal succeeded");
                    lease = None;
                    publish(LeaseState::Lost);
                }
                r = mode.changed() => {
                    if r.is_ok() {
                        break;
                    }
                }
                _ = stop.changed() => return lease.filter(|l| l.valid_at(Instant::now())),
            }
        }
        let held = lease.clone();
        let asked = mode.borrow_and_update().clone();
        let attempt = async {
            match &held {
                Some(l) => client.renew_as(l, &asked).await,
                None => client.acquire_as(&domain, &asked).await,
            }
        };
        tokio::pin!(attempt);
        let result = loop {
            let expiry = lease.as_ref().map_or_else(far, |l| l.expires_at_local);
            tokio::select! {
                r = &mut attempt => break r,
                () = sleep_until(expiry), if lease.is_some() => {
                    warn!(%domain, "lease expired locally while renewing");
                    lease = None;
                    publish(LeaseState::Lost);
                }
                _ = stop.changed() => return lease.filter(|l| l.valid_at(Instant::now())),
            }
        };
        let now = Instant::now();
        match result {
            Ok(l) => {
                if lease.is_none() {
                    info!(%domain, generation = l.generation, preemptible = l.preemptible, "lease acquired");
                } else if lease
                    .as_ref()
                    .is_some_and(|p| p.preemptible != l.preemptible)
                {
                    info!(%domain, generation = l.generation, preemptible = l.preemptible, "lease renewed in another mode");
                }
                publish(LeaseState::Held {
                    until: l.expires_at_local,
                    generation: l.generation,
                    preemptible: l.preemptible,
                });
                next_attempt = l.sent_at + ttl / 3;
                lease = Some(l);
            }
            Err(WitnessError::Denied { holder, .. }) => {
                lease = None;
                publish(LeaseState::Denied { holder });
                next_attempt = now + ttl / 3;
            }
            Err(e) => {
                // Keep what is still valid; retry soon.
                warn!(%domain, error = %e, "lease renewal failed");
                if !lease.as_ref().is_some_and(|l| l.valid_at(now)) {
                    lease = None;
                    publish(LeaseState::Lost);
                }
                next_attempt = now + ttl / 10;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A witness of v0.1.0 as far as the wire goes: it answers version 2 and ignores
    /// anything else (v0.1.0's decoder refuses version 3). A unit-test stand-in: the real
    /// server answers both versions (`tests/witness.rs`).
    /// Counts the version-3 datagrams it ignored.
    async fn v2_only_witness(
        key: HaKey,
    ) -> (
        SocketAddr,
        JoinHandle<()>,
        Arc<std::sync::atomic::AtomicU32>,
    ) {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = sock.local_addr().unwrap();
        let ignored = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let seen = ignored.clone();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let mut generation = 0;
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(req) = Request::decode(&key, &buf[..n]) else {
                    continue;
                };
                if req.version != VERSION_2 {
                    seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    continue;
                }
                generation += 1;
                let resp = Response {
                    status: Status::Granted,
                    node: req.node,
                    domain: req.domain,
                    nonce: req.nonce,
                    generation,
                    ttl_ms: req.ttl_ms,
                    holder: String::new(),
                    reason: reason::NONE,
                    copy: CopyStamp::NONE,
                    version: VERSION_2,
                    flags: 0,
                };
                let _ = sock.send_to(&resp.encode(&key).unwrap(), from).await;
            }
        });
        (addr, task, ignored)
    }

    #[tokio::test]
    async fn a_version_2_witness_is_spoken_to_in_version_2_and_grants_exclusive() {
        let key = HaKey::derive(&[5u8; 32]).unwrap();
        let (addr, task, ignored) = v2_only_witness(key.clone()).await;
        let cfg = WitnessClientConfig {
            attempt_timeout: Duration::from_millis(100),
            ..WitnessClientConfig::new("alpha", addr, key)
        };
        let c = WitnessClient::new(cfg).await.unwrap();
        // First exchange: version 3 unanswered, version 2 answered; the takeover flag is
        // dropped, so the lease is exclusive, never "preemptible" on a witness that cannot
        // honour it.
        let l = c
            .acquire_as("web", &LeaseMode::PreemptibleBy("beta".into()))
            .await
            .unwrap();
        assert!(!l.preemptible);
        assert_eq!(
            c.exchange_lock.lock().await.known.map(|(v, _)| v),
            Some(VERSION_2)
        );
        let probes = ignored.load(std::sync::atomic::Ordering::SeqCst);
        assert!(probes >= 1);
        // Known now: the next exchange goes out in version 2 only.
        let l = c
            .renew_as(&l, &LeaseMode::PreemptibleBy("beta".into()))
            .await
            .unwrap();
        assert!(!l.preemptible);
        assert_eq!(ignored.load(std::sync::atomic::Ordering::SeqCst), probes);
        task.abort();
    }

    /// What is learned from answers: a version-3 answer is kept; a version-2 answer only
    /// from a witness never heard in version 3; a version 2 kept goes stale after a minute.
    #[test]
    fn learning_the_version() {
        let t0 = Instant::now();
        let mut l = Learned::default();
        assert_eq!(l.version_of(1, t0), VERSION_3);
        assert_eq!(l.version_of(2, t0), VERSION_2);
        l.answered(VERSION_2, t0);
        assert_eq!(
            l.version_of(1, t0),
            VERSION_2,
            "a v0.1.0 witness: version 2 kept"
        );
        assert_eq!(
            l.version_of(1, t0 + V2_KEPT_FOR + Duration::from_secs(1)),
            VERSION_3,
            "version 2 kept only for a while"
        );
        let mut l = Learned::default();
        l.answered(VERSION_3, t0);
        assert_eq!(l.version_of(1, t0), VERSION_3);
        l.answered(VERSION_2, t0);
        assert_eq!(
            l.version_of(1, t0),
            VERSION_3,
            "a v2 answer does not downgrade a v3 witness"
        );
        assert_eq!(l.version_of(2, t0), VERSION_3);
    }

    /// A witness that answers every request, but only after `delay`.
    async fn slow_witness(key: HaKey, delay: Duration) -> (SocketAddr, JoinHandle<()>) {
        let sock = Arc::new(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap());
        let addr = sock.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(req) = Request::decode(&key, &buf[..n]) else {
                    continue;
                };
                let resp = Response {
                    status: Status::Granted,
                    node: req.node,
                    domain: req.domain,
                    nonce: req.nonce,
                    generation: 1,
                    ttl_ms: req.ttl_ms,
                    holder: String::new(),
                    reason: reason::NONE,
                    copy: CopyStamp::NONE,
                    version: req.version,
                    flags: if req.version == VERSION_3 {
                        req.flags & flags::PREEMPTIBLE
                    } else {
                        0
                    },
                };
                let bytes = resp.encode(&key).unwrap();
                let sock = sock.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    let _ = sock.send_to(&bytes, from).await;
                });
            }
        });
        (addr, task)
    }

    /// A version-3 answer that comes after its attempt timed out, while the version-2
    /// attempt waits, is taken: the lease is preemptible and version 3 is learned (this
    /// client used to settle on version 2 for a minute here, turning takeovers off).
    #[tokio::test]
    async fn a_late_version_3_answer_still_counts() {
        let key = HaKey::derive(&[5u8; 32]).unwrap();
        let attempt = Duration::from_millis(100);
        let (addr, task) = slow_witness(key.clone(), attempt * 3 / 2).await;
        let cfg = WitnessClientConfig {
            attempt_timeout: attempt,
            ..WitnessClientConfig::new("alpha", addr, key)
        };
        let c = WitnessClient::new(cfg).await.unwrap();
        let l = c
            .acquire_as("web", &LeaseMode::PreemptibleBy("beta".into()))
            .await
            .unwrap();
        assert!(l.preemptible, "the late version-3 answer was not taken");
        assert_eq!(
            c.exchange_lock.lock().await.known.map(|(v, _)| v),
            Some(VERSION_3)
        );
        task.abort();
    }
}
