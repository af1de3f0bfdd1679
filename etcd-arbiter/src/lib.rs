//! The etcd backend of the lease arbiter ([`remus_ha::witness::LeaseArbiter`]).
//!
//! Why etcd: `remus-witness` is one process of this project on one host; if that host is
//! down, no failover can win a lease, and a site with many pairs must run and trust one more
//! home-made server. etcd is a replicated store many pairs can share, whose leases and
//! transactions are the standard tool for "one holder at a time, with a TTL". Nothing of the
//! etcd protocol is written here: the `etcd-client` crate speaks etcd's v3 gRPC API.
//!
//! # The same promises as the witness
//! - **One etcd lease per node**, granted with the policy's lease length (whole seconds:
//!   etcd's TTLs are) and kept alive by every grant or renewal of any of the node's domains,
//!   i.e. at the keeper's renewal interval (a third of the TTL).
//! - **The holder record** `<prefix>/domains/<domain>/holder` names the node that may run
//!   the domain and, for a protecting primary, the backup that may take it at once. It is
//!   attached to the holder's etcd lease, so etcd deletes it when that lease runs out. It is
//!   written only by a transaction comparing the key's mod revision with the one just read,
//!   and only when [`record::decide`] allows it: the key absent (free), or ours, or (a
//!   preemption) declared preemptible by us. A holder's exclusive renewal and its backup's
//!   takeover are therefore ordered by etcd: the second one's comparison fails, it reads
//!   the new record and is denied.
//! - **The holder's view ends first.** Every grant first keeps the node's etcd lease alive
//!   (or grants it anew), and the local expiry runs from when *that* request was sent:
//!   `sent + ttl - ttl / 100` ([`remus_ha::witness::DRIFT_DIVISOR`]), with `ttl` the smaller of
//!   what was asked and what etcd granted. The etcd leader starts the lease's TTL when it
//!   *receives* the keep-alive, later than the send, so as long as the two clocks' rates
//!   differ by less than 1 % the holder stops trusting its lease before etcd can delete the
//!   record and grant it to anyone else.
//! - **Clock assumptions**: etcd lease TTLs run on the etcd *leader's* monotonic clock; no
//!   synchronisation with the nodes' clocks is assumed, only rates within 1 %. A new etcd
//!   leader extends every lease by a full TTL when it takes over (etcd's lessor "promotes"
//!   them), which only ever makes a lease outlive its holder's view, never the reverse.
//! - **Copy stamps** `<prefix>/domains/<domain>/copy` are replaced by compare-and-swap on the
//!   mod revision, and only by a newer stamp, so the newest recorded survives any race.
//!
//! # Foreign data
//! Every value names its kind and format ([`record`]); a key under the prefix that is not
//! ours is an error naming the key ([`EtcdError::Foreign`]) — never overwritten. The daemon
//! checks the prefix at start ([`EtcdArbiter::check_domains`]).
//!
//! # Members and timeouts
//! One client per endpoint: a request goes to the member that answered last, and to the
//! next one when that member is unreachable, has no leader or does not answer within
//! [`EtcdSettings::op_timeout`] ([`EtcdArbiter::call`]). Each keep-alive opens its own
//! stream, so a late answer can never be taken for the answer to a later request (its send
//! time would then be wrong).

pub mod record;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use remus_ha::lineage::CopyStamp;
use remus_ha::witness::{
    Lease, LeaseArbiter, LeaseInfo, LeaseMode, RecordedCopy, WitnessError, DRIFT_DIVISOR,
};
use thiserror::Error;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use record::{Ask, Current, DomainKeys, Grant, Parsed};

/// Transactions tried before a contended write gives up (each one follows a fresh read, so
/// it fails only if another writer changed the key in between).
const TXN_ATTEMPTS: u32 = 8;

/// How the node reaches etcd.
#[derive(Clone)]
pub struct EtcdSettings {
    /// This node's name (the holder records name it).
    pub node: String,
    /// Client endpoints: `http://host:port`, `https://host:port`, or `host:port` (https when
    /// [`EtcdSettings::tls`] is set).
    pub endpoints: Vec<String>,
    /// The key prefix of this site's pairs, e.g. `/remus` ([`record::prefix_problem`]).
    pub prefix: String,
    /// The lease length (rounded up to whole seconds for etcd).
    pub ttl: Duration,
    /// `(user, password)` for etcd's authentication, if enabled.
    pub user: Option<(String, String)>,
    /// TLS: the CA that signed the servers' certificates, and this node's client
    /// certificate and key (PEM).
    pub tls: Option<EtcdTls>,
    /// Longest wait for one etcd request.
    pub op_timeout: Duration,
}

impl std::fmt::Debug for EtcdSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSettings")
            .field("node", &self.node)
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("tls", &self.tls.is_some())
            .field("op_timeout", &self.op_timeout)
            .finish()
    }
}

impl EtcdSettings {
    /// Settings with no authentication, no TLS and a 1 s request timeout.
    pub fn new(
        node: impl Into<String>,
        endpoints: Vec<String>,
        prefix: impl Into<String>,
        ttl: Duration,
    ) -> Self {
        Self {
            node: node.into(),
            endpoints,
            prefix: prefix.into(),
            ttl,
            user: None,
            tls: None,
            op_timeout: Duration::from_secs(1),
        }
    }
}

/// TLS material (PEM), read by the caller from the policy's files.
#[derive(Clone, Default)]
pub struct EtcdTls {
    /// The CA certificate(s) the servers' certificates must chain to (none: the system's
    /// roots are not used, so this should be set).
    pub ca_pem: Option<Vec<u8>>,
    /// This node's client certificate and private key.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

/// Errors of the etcd arbiter; each names the endpoints and, where there is one, the key
/// and the operation.
#[derive(Debug, Error)]
pub enum EtcdError {
    /// A node or domain name cannot be part of a key.
    #[error("etcd: {what} {name:?} cannot be part of a key: {why}")]
    BadName {
        what: &'static str,
        name: String,
        why: &'static str,
    },
    /// The key prefix is unusable.
    #[error("etcd: key prefix {prefix:?}: {why}")]
    BadPrefix { prefix: String, why: &'static str },
    /// The settings are unusable (no endpoint, an endpoint's scheme, the TTL).
    #[error("etcd {endpoints}: {why}")]
    Settings { endpoints: String, why: String },
    /// No connection could be set up.
    #[error("etcd {endpoints}: cannot connect: {}", describe(.error))]
    Connect {
        endpoints: String,
        error: etcd_client::Error,
    },
    /// etcd refused the user name or password.
    #[error("etcd {endpoints}: authentication as user {user:?} refused: {}", describe(.error))]
    Auth {
        endpoints: String,
        user: String,
        error: etcd_client::Error,
    },
    /// The node's etcd user may not do this.
    #[error(
        "etcd {endpoints}: {op} {key}: permission denied (the node's etcd role needs \
         read-write on the prefix {grant}): {}", describe(.error)
    )]
    PermissionDenied {
        endpoints: String,
        op: &'static str,
        key: String,
        grant: String,
        error: etcd_client::Error,
    },
    /// A request failed.
    #[error("etcd {endpoints}: {op} {key}: {}", describe(.error))]
    Request {
        endpoints: String,
        op: &'static str,
        key: String,
        error: etcd_client::Error,
    },
    /// A request got no answer in time.
    #[error("etcd {endpoints}: {op} {key}: no answer within {timeout:?}")]
    Timeout {
        endpoints: String,
        op: &'static str,
        key: String,
        timeout: Duration,
    },
    /// A key under the prefix holds data remus-agent did not write.
    #[error(
        "etcd {endpoints}: key {key} holds {what}: the prefix {prefix:?} holds data that \
         remus-agent did not write; give remus-agent a prefix of its own ([witness] prefix)"
    )]
    Foreign {
        endpoints: String,
        key: String,
        prefix: String,
        what: String,
    },
    /// Every member failed in a way another member might not have (unreachable, no leader,
    /// no answer in time): each one's failure.
    #[error("etcd {endpoints}: {op} {key}: no member answered: {failures}")]
    Unreachable {
        endpoints: String,
        op: &'static str,
        key: String,
        failures: String,
    },
    /// Other writers kept changing the key.
    #[error(
        "etcd {endpoints}: {op} {key}: the key changed under {attempts} transactions in a row"
    )]
    Contended {
        endpoints: String,
        op: &'static str,
        key: String,
        attempts: u32,
    },
}

impl EtcdError {
    /// Whether another member might not fail the same way (so the request is worth asking
    /// there): unreachable, no leader, no answer in time. Credentials, permissions, foreign
    /// data and a lease etcd no longer has are the cluster's answer, not one member's.
    pub fn is_transient(&self) -> bool {
        match self {
            EtcdError::Timeout { .. }
            | EtcdError::Connect { .. }
            | EtcdError::Unreachable { .. } => true,
            EtcdError::Request { error, .. } => match error {
                etcd_client::Error::GRpcStatus(s) => matches!(
                    s.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                        | tonic::Code::Unknown
                        | tonic::Code::Aborted
                        | tonic::Code::Cancelled
                ),
                etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
                _ => false,
            },
            _ => false,
        }
    }
}

impl From<EtcdError> for WitnessError {
    fn from(e: EtcdError) -> Self {
        WitnessError::Backend(Box::new(e))
    }
}

/// The node's etcd lease, as last kept alive.
#[derive(Clone, Copy, Debug)]
struct NodeLease {
    id: i64,
    /// The TTL etcd granted.
    granted: Duration,
}

/// One endpoint and its client, connected on first use.
struct Member {
    url: String,
    client: std::sync::Mutex<Option<Client>>,
}

/// The etcd lease arbiter of one node. Share it (`Arc`) among the node's domains: they share
/// its etcd lease.
pub struct EtcdArbiter {
    cfg: EtcdSettings,
    /// `cfg.endpoints` joined, for messages.
    endpoints: String,
    /// One client per endpoint (see [`EtcdArbiter::call`] for why not one balanced client).
    members: Vec<Member>,
    /// The member that answered last: asked first.
    preferred: AtomicUsize,
    /// The runtime [`EtcdArbiter::connect`] ran on: every member's connection (and the
    /// tasks `etcd-client` spawns for it) is made there, whoever asks first — the daemon
    /// connects on its HA runtime, so a busy main runtime never delays a renewal.
    runtime: tokio::runtime::Handle,
    opts: ConnectOptions,
    /// The TTL asked of etcd, whole seconds.
    ttl_secs: i64,
    /// The node's etcd lease; the lock also serialises keep-alives.
    lease: Mutex<Option<NodeLease>>,
}

impl std::fmt::Debug for EtcdArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdArbiter")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl EtcdArbiter {
    /// Connects (with user and password, authenticates at once: wrong credentials fail
    /// here). Without authentication the connection is made by the first request:
    /// [`EtcdArbiter::check_domains`] is that request at the daemon's start.
    ///
    /// # Errors
    /// [`EtcdError::BadName`], [`EtcdError::BadPrefix`], [`EtcdError::Settings`],
    /// [`EtcdError::Connect`], [`EtcdError::Auth`], [`EtcdError::Timeout`].
    pub async fn connect(cfg: EtcdSettings) -> Result<Self, EtcdError> {
        let endpoints = cfg.endpoints.join(",");
        if let Some(why) = record::name_problem(&cfg.node) {
            return Err(EtcdError::BadName {
                what: "node",
                name: cfg.node.clone(),
                why,
            });
        }
        if let Some(why) = record::prefix_problem(&cfg.prefix) {
            return Err(EtcdError::BadPrefix {
                prefix: cfg.prefix.clone(),
                why,
            });
        }
        let settings = |why: String| EtcdError::Settings {
            endpoints: endpoints.clone(),
            why,
        };
        if cfg.endpoints.is_empty() {
            return Err(settings("no endpoint".into()));
        }
        if cfg.tls.is_some() {
            if let Some(e) = cfg.endpoints.iter().find(|e| e.starts_with("http://")) {
                return Err(settings(format!(
                    "endpoint {e} is plain http but TLS files are set: use https://"
                )));
            }
        }
        if cfg.ttl < Duration::from_secs(1) {
            return Err(settings(format!(
                "lease {:?} is shorter than etcd's one-second granularity",
                cfg.ttl
            )));
        }
        let ttl_secs = i64::try_from(cfg.ttl.as_millis().div_ceil(1000)).unwrap_or(i64::MAX);
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(cfg.op_timeout)
            .with_keep_alive(Duration::from_secs(1), cfg.op_timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from its cluster's leader must not answer for it.
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if let Some((user, password)) = &cfg.user {
            opts = opts.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &cfg.tls {
            let mut t = TlsOptions::new();
            if let Some(ca) = &tls.ca_pem {
                t = t.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &tls.client {
                t = t.identity(Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(t);
        }
        let members: Vec<Member> = cfg
            .endpoints
            .iter()
            .map(|url| Member {
                url: url.clone(),
                client: std::sync::Mutex::new(None),
            })
            .collect();
        let arbiter = Self {
            endpoints,
            members,
            preferred: AtomicUsize::new(0),
            runtime: tokio::runtime::Handle::current(),
            opts,
            ttl_secs,
            lease: Mutex::new(None),
            cfg,
        };
        // At least one member must take the connection (and, with a user, the credentials);
        // the others are connected when first needed.
        let mut last = None;
        for i in 0..arbiter.members.len() {
            match arbiter.client_for(i).await {
                Ok(_) => {
                    arbiter.preferred.store(i, Ordering::Relaxed);
                    return Ok(arbiter);
                }
                Err(e) if e.is_transient() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| EtcdError::Settings {
            endpoints: arbiter.endpoints.clone(),
            why: "no endpoint".into(),
        }))
    }

    /// Member `i`'s client, connecting it if needed.
    async fn client_for(&self, i: usize) -> Result<Client, EtcdError> {
        let m = &self.members[i];
        if let Some(c) = m
            .client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
        {
            return Ok(c);
        }
        let url = m.url.clone();
        let opts = self.opts.clone();
        // With a user, connecting is a request (authentication): the connect timeout and
        // the request's.
        let wait = self.cfg.op_timeout * 2;
        let connecting = self.runtime.spawn(async move {
            tokio::time::timeout(wait, Client::connect([url.as_str()], Some(opts))).await
        });
        let c = match connecting.await.unwrap_or_else(|e| {
            Ok(Err(etcd_client::Error::Internal(format!(
                "the connecting task failed: {e}"
            ))))
        }) {
            Err(_) => {
                return Err(EtcdError::Timeout {
                    endpoints: m.url.clone(),
                    op: "connect",
                    key: String::new(),
                    timeout: wait,
                })
            }
            Ok(Err(error)) => {
                return Err(match &self.cfg.user {
                    Some((user, _)) if is_auth_failure(&error) => EtcdError::Auth {
                        endpoints: m.url.clone(),
                        user: user.clone(),
                        error,
                    },
                    _ => EtcdError::Connect {
                        endpoints: m.url.clone(),
                        error,
                    },
                })
            }
            Ok(Ok(c)) => c,
        };
        *m.client
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(c.clone());
        Ok(c)
    }

    /// Runs one request, on the member that answered last first, then on each other member
    /// while the failure is one another member may not have (unreachable, no leader, no
    /// answer in time). Returns the answer and when the answered attempt was sent.
    ///
    /// Why not `etcd-client`'s balanced channel over all endpoints: it keeps routing
    /// requests to a member that is down (a killed member failed about a third of them), and
    /// a lease renewal that fails for that reason is a lease at risk.
    ///
    /// A request that timed out may still have been applied; every write here is a
    /// compare-and-swap on a revision just read, so a repeat on another member is refused
    /// and re-read, never applied twice.
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        f: F,
    ) -> Result<(T, Instant), EtcdError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.members.len();
        let first = self.preferred.load(Ordering::Relaxed);
        let mut failures: Vec<EtcdError> = Vec::new();
        for k in 0..n {
            let i = (first + k) % n;
            let client = match self.client_for(i).await {
                Ok(c) => c,
                Err(e) if e.is_transient() => {
                    failures.push(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let sent = Instant::now();
            let e = match tokio::time::timeout(self.cfg.op_timeout, f(client)).await {
                Ok(Ok(v)) => {
                    if k > 0 {
                        info!(endpoint = %self.members[i].url, op, "etcd answers through this member now");
                    }
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok((v, sent));
                }
                Ok(Err(error)) => self.classify(&self.members[i].url, op, key, error),
                Err(_) => EtcdError::Timeout {
                    endpoints: self.members[i].url.clone(),
                    op,
                    key: key.to_string(),
                    timeout: self.cfg.op_timeout,
                },
            };
            if !e.is_transient() {
                return Err(e);
            }
            debug!(endpoint = %self.members[i].url, error = %e, "etcd member failed; trying the next");
            failures.push(e);
        }
        if failures.len() == 1 {
            if let Some(e) = failures.pop() {
                return Err(e);
            }
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints.clone(),
            op,
            key: key.to_string(),
            failures: failures
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.cfg.prefix
    }

    /// Checks that etcd answers and that nothing under the prefix is foreign: every key
    /// below it must be one of ours (`domains/<name>/holder|copy`) with a value we can read.
    /// Where the node's etcd user may read only its own domains' keys (etcd's role-based
    /// access), the check covers those keys only.
    ///
    /// # Errors
    /// [`EtcdError::Foreign`] naming the first foreign key; any error of the request
    /// (unreachable, wrong credentials, permission denied on the domain's own keys).
    pub async fn check_domains(&self, domains: &[String]) -> Result<(), EtcdError> {
        for d in domains {
            self.check_name("domain", d)?;
        }
        let root = format!("{}/", self.cfg.prefix);
        match self
            .get(
                &root,
                "check the prefix",
                Some(GetOptions::new().with_prefix()),
            )
            .await
        {
            Ok(kvs) => {
                for kv in &kvs {
                    self.check_own_kv(kv)?;
                }
                debug!(prefix = %self.cfg.prefix, keys = kvs.len(), "etcd prefix checked");
                return Ok(());
            }
            Err(EtcdError::PermissionDenied { .. }) => {
                debug!(prefix = %self.cfg.prefix, "no read access to the whole prefix: checking this node's domains only");
            }
            Err(e) => return Err(e),
        }
        for d in domains {
            let keys = DomainKeys::new(&self.cfg.prefix, d);
            let kvs = self
                .get(
                    &keys.dir,
                    "check the domain's keys",
                    Some(GetOptions::new().with_prefix()),
                )
                .await?;
            for kv in &kvs {
                self.check_own_kv(kv)?;
            }
        }
        Ok(())
    }

    fn check_own_kv(&self, kv: &etcd_client::KeyValue) -> Result<(), EtcdError> {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let foreign = |what: String| EtcdError::Foreign {
            endpoints: self.endpoints.clone(),
            key: key.clone(),
            prefix: self.cfg.prefix.clone(),
            what,
        };
        if !record::is_own_key(&self.cfg.prefix, &key) {
            return Err(foreign(
                "a key remus-agent does not write (it writes only domains/<name>/holder and \
                 domains/<name>/copy)"
                    .into(),
            ));
        }
        let why = if key.ends_with("/holder") {
            match record::parse_holder(kv.value()) {
                Parsed::Ours(_) => None,
                Parsed::Foreign(w) => Some(w),
            }
        } else {
            match record::parse_copy(kv.value()) {
                Parsed::Ours(_) => None,
                Parsed::Foreign(w) => Some(w),
            }
        };
        why.map_or(Ok(()), |w| Err(foreign(w)))
    }

    fn check_name(&self, what: &'static str, name: &str) -> Result<(), EtcdError> {
        match record::name_problem(name) {
            Some(why) => Err(EtcdError::BadName {
                what,
                name: name.to_string(),
                why,
            }),
            None => Ok(()),
        }
    }

    /// Keeps the node's etcd lease alive (granting a new one if it is gone). Returns it and
    /// the instant the answered request was sent.
    async fn keep_node_lease(&self) -> Result<(NodeLease, Instant), EtcdError> {
        let mut held = self.lease.lock().await;
        if let Some(l) = *held {
            match self
                .call(
                    "keep alive the etcd lease",
                    &format!("{:x} of node {}", l.id, self.cfg.node),
                    |mut c| async move { c.lease_keep_alive(l.id).await.map(|_| ()) },
                )
                .await
            {
                Ok(((), sent)) => return Ok((l, sent)),
                Err(EtcdError::Request {
                    error: etcd_client::Error::LeaseKeepAliveError(why),
                    ..
                }) => {
                    warn!(lease = l.id, %why, "the node's etcd lease is gone; granting a new one");
                    *held = None;
                }
                Err(e) => return Err(e),
            }
        }
        let ttl_secs = self.ttl_secs;
        let (r, sent) = self
            .call(
                "grant an etcd lease",
                &format!("to node {}", self.cfg.node),
                |mut c| async move { c.lease_grant(ttl_secs, None).await },
            )
            .await?;
        let granted = Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0));
        if granted.is_zero() {
            return Err(EtcdError::Settings {
                endpoints: self.endpoints.clone(),
                why: format!("lease grant of {} s answered with TTL 0", self.ttl_secs),
            });
        }
        let l = NodeLease {
            id: r.id(),
            granted,
        };
        info!(lease = l.id, ttl = ?granted, "etcd lease granted to this node");
        *held = Some(l);
        Ok((l, sent))
    }

    fn classify(
        &self,
        endpoint: &str,
        op: &'static str,
        key: &str,
        error: etcd_client::Error,
    ) -> EtcdError {
        let endpoints = endpoint.to_string();
        let key = key.to_string();
        match &error {
            etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::PermissionDenied => {
                EtcdError::PermissionDenied {
                    endpoints,
                    op,
                    key,
                    grant: format!("{}/", self.cfg.prefix),
                    error,
                }
            }
            _ if is_auth_failure(&error) => EtcdError::Auth {
                endpoints,
                user: self
                    .cfg
                    .user
                    .as_ref()
                    .map_or_else(String::new, |(u, _)| u.clone()),
                error,
            },
            _ => EtcdError::Request {
                endpoints,
                op,
                key,
                error,
            },
        }
    }

    async fn get(
        &self,
        key: &str,
        op: &'static str,
        opts: Option<GetOptions>,
    ) -> Result<Vec<etcd_client::KeyValue>, EtcdError> {
        let (mut r, _) = self
            .call(op, key, |mut c| {
                let opts = opts.clone();
                async move { c.get(key, opts).await }
            })
            .await?;
        Ok(r.take_kvs())
    }

    /// Reads a domain's holder record.
    async fn read_holder(&self, keys: &DomainKeys) -> Result<Option<Current>, EtcdError> {
        let kvs = self.get(&keys.holder, "read the holder", None).await?;
        self.holder_of(keys, kvs.first())
    }

    fn holder_of(
        &self,
        keys: &DomainKeys,
        kv: Option<&etcd_client::KeyValue>,
    ) -> Result<Option<Current>, EtcdError> {
        let Some(kv) = kv else {
            return Ok(None);
        };
        match record::parse_holder(kv.value()) {
            Parsed::Ours(record) => Ok(Some(Current {
                record,
                lease: kv.lease(),
                mod_revision: kv.mod_revision(),
            })),
            Parsed::Foreign(what) => Err(EtcdError::Foreign {
                endpoints: self.endpoints.clone(),
                key: keys.holder.clone(),
                prefix: self.cfg.prefix.clone(),
                what,
            }),
        }
    }

    /// The remaining TTL of an etcd lease (zero if gone or unknown).
    async fn remaining(&self, lease: i64) -> Duration {
        match self
            .call(
                "ask the remaining TTL of etcd lease",
                &format!("{lease:x}"),
                |mut c| async move { c.lease_time_to_live(lease, None).await },
            )
            .await
        {
            Ok((r, _)) => Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0)),
            Err(e) => {
                debug!(lease, error = %e, "remaining TTL unknown");
                Duration::ZERO
            }
        }
    }

    async fn grant(
        &self,
        domain: &str,
        generation: u64,
        mode: &LeaseMode,
        preempt: bool,
    ) -> Result<Lease, WitnessError> {
        self.check_name("domain", domain)?;
        let peer = match mode {
            LeaseMode::PreemptibleBy(p) => {
                self.check_name("peer", p)?;
                Some(p.as_str())
            }
            LeaseMode::Exclusive => None,
        };
        let keys = DomainKeys::new(&self.cfg.prefix, domain);
        // First the node's etcd lease: the holder record lives as long as it does, so the
        // local expiry runs from this request's send time.
        let (node_lease, sent_at) = self.keep_node_lease().await?;
        let ask = Ask {
            node: &self.cfg.node,
            lease: node_lease.id,
            generation,
            preemptible_by: peer,
            preempt,
        };
        let value =
            serde_json::to_vec(&record::HolderRecord::new(&self.cfg.node, peer)).map_err(|e| {
                EtcdError::Settings {
                    endpoints: self.endpoints.clone(),
                    why: format!("encoding the holder record: {e}"),
                }
            })?;
        let mut current = self.read_holder(&keys).await?;
        for _ in 0..TXN_ATTEMPTS {
            let generation = match record::decide(current.as_ref(), &ask) {
                Grant::Keep { generation } => generation,
                Grant::Denied { holder } => {
                    let remaining = match &current {
                        Some(c) => self.remaining(c.lease).await,
                        None => Duration::ZERO,
                    };
                    return Err(WitnessError::Denied {
                        at: format!("etcd {} key {}", self.endpoints, keys.holder),
                        domain: domain.to_string(),
                        holder,
                        remaining,
                    });
                }
                Grant::Write { expect } => {
                    let txn = Txn::new()
                        .when([Compare::mod_revision(
                            keys.holder.clone(),
                            CompareOp::Equal,
                            expect,
                        )])
                        .and_then([TxnOp::put(
                            keys.holder.clone(),
                            value.clone(),
                            Some(PutOptions::new().with_lease(node_lease.id)),
                        )])
                        .or_else([TxnOp::get(keys.holder.clone(), None)]);
                    let (r, _) = self
                        .call("write the holder", &keys.holder, |mut c| {
                            let txn = txn.clone();
                            async move { c.txn(txn).await }
                        })
                        .await?;
                    if !r.succeeded() {
                        // Someone wrote in between: decide again on what is there now.
                        current = match r.op_responses().into_iter().next() {
                            Some(TxnOpResponse::Get(g)) => {
                                self.holder_of(&keys, g.kvs().first())?
                            }
                            _ => self.read_holder(&keys).await?,
                        };
                        continue;
                    }
                    let rev = r.header().map_or(0, |h| h.revision());
                    u64::try_from(rev).unwrap_or(0)
                }
            };
            let ttl = node_lease.granted.min(self.cfg.ttl);
            return Ok(Lease {
                domain: domain.to_string(),
                generation,
                ttl,
                sent_at,
                expires_at_local: sent_at + ttl - ttl / DRIFT_DIVISOR,
                preemptible: peer.is_some(),
            });
        }
        Err(EtcdError::Contended {
            endpoints: self.endpoints.clone(),
            op: "write the holder",
            key: keys.holder,
            attempts: TXN_ATTEMPTS,
        }
        .into())
    }
}

/// etcd-client's error in one line: a gRPC status's message and its deepest cause (a
/// refused connection, a certificate problem), without the layers of debug formatting.
fn describe(e: &etcd_client::Error) -> String {
    let etcd_client::Error::GRpcStatus(s) = e else {
        return e.to_string();
    };
    let mut text = s.message().to_string();
    let mut cause = std::error::Error::source(s);
    let mut deepest = None;
    while let Some(c) = cause {
        deepest = Some(c.to_string());
        cause = c.source();
    }
    if let Some(d) = deepest {
        if !text.contains(&d) {
            text = format!("{text}: {d}");
        }
    }
    if text.is_empty() {
        text = format!("{:?}", s.code());
    }
    text
}

/// Whether etcd refused the credentials (as opposed to being unreachable).
fn is_auth_failure(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unauthenticated
                || (s.code() == tonic::Code::InvalidArgument
                    && s.message().contains("authentication failed"))
                || s.message().contains("invalid auth token")
                || s.message().contains("user name not found")
        }
        _ => false,
    }
}

#[async_trait]
impl LeaseArbiter for EtcdArbiter {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    fn location(&self) -> String {
        format!("{} {}", self.endpoints, self.cfg.prefix)
    }

    fn node(&self) -> &str {
        &self.cfg.node
    }

    fn ttl(&self) -> Duration {
        self.cfg.ttl
    }

    async fn acquire_as(&self, domain: &str, mode: &LeaseMode) -> Result<Lease, WitnessError> {
        self.grant(domain, 0, mode, false).await
    }

    async fn preempt(&self, domain: &str) -> Result<Lease, WitnessError> {
        self.grant(domain, 0, &LeaseMode::Exclusive, true).await
    }

    async fn renew_as(&self, lease: &Lease, mode: &LeaseMode) -> Result<Lease, WitnessError> {
        self.grant(&lease.domain, lease.generation, mode, false)
            .await
    }

    async fn release(&self, lease: &Lease) -> Result<bool, WitnessError> {
        self.check_name("domain", &lease.domain)?;
        let keys = DomainKeys::new(&self.cfg.prefix, &lease.domain);
        let Ok(rev) = i64::try_from(lease.generation) else {
            return Ok(false);
        };
        // Deleted only if nothing was written since our grant: a delayed release never
        // frees a lease taken over, or acquired again, since.
        let txn = Txn::new()
            .when([Compare::mod_revision(
                keys.holder.clone(),
                CompareOp::Equal,
                rev,
            )])
            .and_then([TxnOp::delete(keys.holder.clone(), None)]);
        let (r, _) = self
            .call("release the holder", &keys.holder, |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        Ok(r.succeeded())
    }

    async fn query(&self, domain: &str) -> Result<LeaseInfo, WitnessError> {
        self.check_name("domain", domain)?;
        let keys = DomainKeys::new(&self.cfg.prefix, domain);
        Ok(match self.read_holder(&keys).await? {
            None => LeaseInfo {
                holder: None,
                generation: 0,
                remaining: Duration::ZERO,
            },
            Some(c) => LeaseInfo {
                remaining: self.remaining(c.lease).await,
                holder: Some(c.record.node),
                generation: u64::try_from(c.mod_revision).unwrap_or(0),
            },
        })
    }

    async fn record_copy(
        &self,
        domain: &str,
        copy: CopyStamp,
    ) -> Result<RecordedCopy, WitnessError> {
        self.check_name("domain", domain)?;
        let keys = DomainKeys::new(&self.cfg.prefix, domain);
        let value =
            serde_json::to_vec(&record::CopyRecord::new(&self.cfg.node, copy)).map_err(|e| {
                EtcdError::Settings {
                    endpoints: self.endpoints.clone(),
                    why: format!("encoding the copy record: {e}"),
                }
            })?;
        let read = |kv: Option<&etcd_client::KeyValue>| -> Result<_, EtcdError> {
            match kv {
                None => Ok((None, 0)),
                Some(kv) => match record::parse_copy(kv.value()) {
                    Parsed::Ours(r) => Ok((Some(r), kv.mod_revision())),
                    Parsed::Foreign(what) => Err(EtcdError::Foreign {
                        endpoints: self.endpoints.clone(),
                        key: keys.copy.clone(),
                        prefix: self.cfg.prefix.clone(),
                        what,
                    }),
                },
            }
        };
        let kvs = self.get(&keys.copy, "read the copy stamp", None).await?;
        let (mut stored, mut rev) = read(kvs.first())?;
        for _ in 0..TXN_ATTEMPTS {
            if let Some(s) = &stored {
                if s.stamp >= copy {
                    return Ok(RecordedCopy {
                        stamp: s.stamp,
                        node: Some(s.node.clone()),
                    });
                }
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    keys.copy.clone(),
                    CompareOp::Equal,
                    rev,
                )])
                .and_then([TxnOp::put(keys.copy.clone(), value.clone(), None)])
                .or_else([TxnOp::get(keys.copy.clone(), None)]);
            let (r, _) = self
                .call("write the copy stamp", &keys.copy, |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if r.succeeded() {
                return Ok(RecordedCopy {
                    stamp: copy,
                    node: Some(self.cfg.node.clone()),
                });
            }
            (stored, rev) = match r.op_responses().into_iter().next() {
                Some(TxnOpResponse::Get(g)) => read(g.kvs().first())?,
                _ => read(
                    self.get(&keys.copy, "read the copy stamp", None)
                        .await?
                        .first(),
                )?,
            };
        }
        Err(EtcdError::Contended {
            endpoints: self.endpoints.clone(),
            op: "write the copy stamp",
            key: keys.copy,
            attempts: TXN_ATTEMPTS,
        }
        .into())
    }
}
