//! The witness server: the lease table (pure), its state file, and the UDP loop.
//!
//! Invariant: an answer that grants, renews or releases a lease leaves the witness only
//! after the table it reflects is durable in the state file. A write failure refuses the
//! request and leaves the table as it was.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::proto::{flags, reason, Op, ProtoError, Request, Response, Status, MAX_DATAGRAM};
use super::{WitnessError, MAX_TTL, MIN_TTL};
use crate::auth::HaKey;
use crate::lineage::CopyStamp;
use crate::persist::write_atomic;

/// Most domains (and most node/domain nonce records) the witness keeps: only key holders can
/// create entries, but the table stays bounded anyway.
pub const MAX_ENTRIES: usize = 4096;
const STATE_VERSION: u32 = 1;
const MAX_STATE_FILE: u64 = 8 << 20;

/// One held lease.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Held {
    holder: String,
    generation: u64,
    ttl_ms: u32,
    /// When the witness considers the lease expired.
    expires: Instant,
    /// The node that may take the lease at once (the holder declared that its output
    /// waits for this node's acknowledgements), if any.
    preemptible_by: Option<String>,
}

/// What [`LeaseTable::handle`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Handled {
    /// Answer with `response`; write the table first if `persist`.
    Reply {
        /// The answer.
        response: Response,
        /// Whether the table changed in a way that must be durable before answering.
        persist: bool,
    },
    /// A replayed (or reordered) request: drop it silently.
    Replay,
}

/// The leases, the replay counters, and the generation counter. Pure: time is a parameter.
#[derive(Clone, Debug, Default)]
pub struct LeaseTable {
    leases: BTreeMap<String, Held>,
    /// node → domain → last accepted nonce.
    nonces: BTreeMap<String, BTreeMap<String, u64>>,
    /// Generation of the next grant (strictly increasing over the witness's life).
    next_generation: u64,
    /// domain → the newest copy stamp recorded for it, and the node that recorded it.
    stamps: BTreeMap<String, (CopyStamp, String)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    next_generation: u64,
    leases: Vec<PersistedLease>,
    nonces: Vec<PersistedNonce>,
    /// Absent in files written before copy stamps were recorded.
    #[serde(default)]
    stamps: Vec<PersistedStamp>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PersistedStamp {
    domain: String,
    node: String,
    stamp: CopyStamp,
}

#[derive(Debug, Serialize, Deserialize)]
struct PersistedLease {
    domain: String,
    holder: String,
    generation: u64,
    ttl_ms: u32,
    /// Absent in files written before takeovers (and for exclusive leases).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    preemptible_by: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PersistedNonce {
    node: String,
    domain: String,
    nonce: u64,
}

impl LeaseTable {
    /// An empty table.
    pub fn new() -> Self {
        Self {
            next_generation: 1,
            ..Self::default()
        }
    }

    /// The domain's lease, if held and not expired at `now`.
    fn current(&self, domain: &str, now: Instant) -> Option<&Held> {
        self.leases.get(domain).filter(|h| h.expires > now)
    }

    fn count_nonces(&self) -> usize {
        self.nonces.values().map(BTreeMap::len).sum()
    }

    /// Serves one authenticated request at time `now`.
    pub fn handle(
        &mut self,
        now: Instant,
        req: &Request,
        ttl_limits: (Duration, Duration),
    ) -> Handled {
        let last = self
            .nonces
            .get(&req.node)
            .and_then(|d| d.get(&req.domain))
            .copied();
        if last.is_some_and(|n| req.nonce <= n) {
            return Handled::Replay;
        }
        let recorded = self
            .stamps
            .get(&req.domain)
            .map_or(CopyStamp::NONE, |(s, _)| *s);
        let reply = |status, generation, ttl_ms, holder: &str, why| Response {
            status,
            node: req.node.clone(),
            domain: req.domain.clone(),
            nonce: req.nonce,
            generation,
            ttl_ms,
            holder: holder.to_string(),
            reason: why,
            copy: recorded,
            version: req.version,
            flags: 0,
        };
        let refuse = |why| Handled::Reply {
            response: reply(Status::Refused, 0, 0, "", why),
            persist: false,
        };
        if last.is_none() && self.count_nonces() >= MAX_ENTRIES {
            return refuse(reason::TOO_MANY);
        }
        self.nonces
            .entry(req.node.clone())
            .or_default()
            .insert(req.domain.clone(), req.nonce);
        let remaining = |h: &Held| {
            u32::try_from(h.expires.saturating_duration_since(now).as_millis()).unwrap_or(u32::MAX)
        };
        let current = self.current(&req.domain, now);
        let (response, persist) = match req.op {
            Op::Query => match current {
                Some(h) => (
                    reply(
                        Status::Held,
                        h.generation,
                        remaining(h),
                        &h.holder,
                        reason::NONE,
                    ),
                    false,
                ),
                None => (reply(Status::Free, 0, 0, "", reason::NONE), false),
            },
            Op::Acquire => {
                let ttl = Duration::from_millis(u64::from(req.ttl_ms));
                if ttl < ttl_limits.0 || ttl > ttl_limits.1 {
                    return refuse(reason::BAD_TTL);
                }
                let preempts = |h: &Held| {
                    req.flags & flags::PREEMPT != 0
                        && h.preemptible_by.as_deref() == Some(req.node.as_str())
                };
                match current {
                    Some(h) if h.holder != req.node && !preempts(h) => (
                        reply(
                            Status::Denied,
                            h.generation,
                            remaining(h),
                            &h.holder,
                            reason::NONE,
                        ),
                        // The nonce moved: persist it with the next change, not now.
                        false,
                    ),
                    _ => {
                        if !self.leases.contains_key(&req.domain)
                            && self.leases.len() >= MAX_ENTRIES
                        {
                            return refuse(reason::TOO_MANY);
                        }
                        // A renewal of the generation held keeps it; anything else (free,
                        // expired, taken over, or the holder starting over) is a new
                        // generation.
                        let generation = match current {
                            Some(h) if h.holder == req.node && h.generation == req.generation => {
                                h.generation
                            }
                            _ => {
                                let g = self.next_generation;
                                self.next_generation += 1;
                                g
                            }
                        };
                        let granted_flags = req.flags & flags::PREEMPTIBLE;
                        let preemptible_by = (granted_flags != 0).then(|| req.peer.clone());
                        self.leases.insert(
                            req.domain.clone(),
                            Held {
                                holder: req.node.clone(),
                                generation,
                                ttl_ms: req.ttl_ms,
                                expires: now + ttl,
                                preemptible_by,
                            },
                        );
                        let mut r =
                            reply(Status::Granted, generation, req.ttl_ms, "", reason::NONE);
                        r.flags = granted_flags;
                        (r, true)
                    }
                }
            }
            Op::Record => {
                let newer = req.copy > recorded;
                if newer
                    && !self.stamps.contains_key(&req.domain)
                    && self.stamps.len() >= MAX_ENTRIES
                {
                    return refuse(reason::TOO_MANY);
                }
                if newer {
                    self.stamps
                        .insert(req.domain.clone(), (req.copy, req.node.clone()));
                }
                let (stamp, by) = self
                    .stamps
                    .get(&req.domain)
                    .cloned()
                    .unwrap_or((CopyStamp::NONE, String::new()));
                let mut r = reply(Status::Recorded, 0, 0, &by, reason::NONE);
                r.copy = stamp;
                (r, newer)
            }
            Op::Release => match self.leases.get(&req.domain) {
                Some(h) if h.holder == req.node && h.generation == req.generation => {
                    self.leases.remove(&req.domain);
                    (
                        reply(Status::Released, req.generation, 0, "", reason::NONE),
                        true,
                    )
                }
                _ => (reply(Status::NotHolder, 0, 0, "", reason::NONE), false),
            },
        };
        Handled::Reply { response, persist }
    }

    fn to_file(&self) -> StateFile {
        StateFile {
            version: STATE_VERSION,
            next_generation: self.next_generation,
            leases: self
                .leases
                .iter()
                .map(|(d, h)| PersistedLease {
                    domain: d.clone(),
                    holder: h.holder.clone(),
                    generation: h.generation,
                    ttl_ms: h.ttl_ms,
                    preemptible_by: h.preemptible_by.clone(),
                })
                .collect(),
            nonces: self
                .nonces
                .iter()
                .flat_map(|(n, ds)| {
                    ds.iter().map(move |(d, nonce)| PersistedNonce {
                        node: n.clone(),
                        domain: d.clone(),
                        nonce: *nonce,
                    })
                })
                .collect(),
            stamps: self
                .stamps
                .iter()
                .map(|(d, (stamp, node))| PersistedStamp {
                    domain: d.clone(),
                    node: node.clone(),
                    stamp: *stamp,
                })
                .collect(),
        }
    }

    /// Rebuilds the table from a state file read at time `now`: every lease in it is treated
    /// as held by its holder for its full TTL from `now` (the holder may have renewed right
    /// before the witness stopped).
    fn from_file(f: StateFile, now: Instant) -> Self {
        let mut t = Self::new();
        t.next_generation = f.next_generation.max(1);
        for l in f.leases {
            t.next_generation = t.next_generation.max(l.generation + 1);
            t.leases.insert(
                l.domain,
                Held {
                    holder: l.holder,
                    generation: l.generation,
                    ttl_ms: l.ttl_ms,
                    expires: now + Duration::from_millis(u64::from(l.ttl_ms)),
                    preemptible_by: l.preemptible_by,
                },
            );
        }
        for n in f.nonces {
            t.nonces
                .entry(n.node)
                .or_default()
                .insert(n.domain, n.nonce);
        }
        for s in f.stamps {
            t.stamps.insert(s.domain, (s.stamp, s.node));
        }
        t
    }
}

/// The keys a witness authenticates requests with.
///
/// A node that has pinned keys here (per-node keys mode: `HaKey::for_witness` of the
/// witness's and the node's X25519 keys) is accepted under those keys only — never under the
/// shared key, or any holder of the shared key could speak for it. Other nodes use the
/// shared key (pairs still in pre-shared key mode), if there is one. Two keys for one node
/// are a rotation of that node's key.
#[derive(Clone, Debug, Default)]
pub struct WitnessKeys {
    /// The pairs' pre-shared key, for nodes without pinned keys.
    pub shared: Option<HaKey>,
    /// Per node: the keys derived from each pinned public key.
    pub nodes: HashMap<String, Vec<HaKey>>,
}

impl WitnessKeys {
    /// The keys that may authenticate a datagram claiming to come from `node`.
    fn for_node(&self, node: Option<&str>) -> &[HaKey] {
        match node.and_then(|n| self.nodes.get(n)) {
            Some(keys) => keys,
            None => self.shared.as_slice(),
        }
    }

    /// Authenticates and decodes a request; returns it with the key that verified it (the
    /// answer is sealed with the same key).
    fn decode(&self, datagram: &[u8]) -> Result<(Request, HaKey), ProtoError> {
        let claimed = Request::claimed_node(datagram);
        let mut last = ProtoError::BadTag;
        for key in self.for_node(claimed) {
            match Request::decode(key, datagram) {
                Ok(req) if Some(req.node.as_str()) == claimed => return Ok((req, key.clone())),
                Ok(_) => return Err(ProtoError::BadName),
                Err(ProtoError::BadTag) => {}
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// How to run a witness.
#[derive(Clone, Debug)]
pub struct WitnessServerConfig {
    /// UDP address to serve on.
    pub listen: SocketAddr,
    /// The MAC keys: shared with the agents, or per node.
    pub keys: WitnessKeys,
    /// The durable lease table.
    pub state_file: PathBuf,
    /// Shortest and longest TTL granted.
    pub ttl_limits: (Duration, Duration),
}

impl WitnessServerConfig {
    /// A configuration with the default TTL limits.
    pub fn new(listen: SocketAddr, key: HaKey, state_file: PathBuf) -> Self {
        Self::with_keys(
            listen,
            WitnessKeys {
                shared: Some(key),
                nodes: HashMap::new(),
            },
            state_file,
        )
    }

    /// A configuration with per-node keys (and the shared key, if any), default TTL limits.
    pub fn with_keys(listen: SocketAddr, keys: WitnessKeys, state_file: PathBuf) -> Self {
        Self {
            listen,
            keys,
            state_file,
            ttl_limits: (MIN_TTL, MAX_TTL),
        }
    }
}

/// Counters of a running witness (shared with whoever started it).
#[derive(Debug, Default)]
pub struct WitnessStats {
    /// Requests answered.
    pub answered: AtomicU64,
    /// Grants and renewals.
    pub granted: AtomicU64,
    /// Acquisitions refused because another node holds the lease.
    pub denied: AtomicU64,
    /// Datagrams dropped for a bad tag (wrong key, tampering).
    pub dropped_bad_tag: AtomicU64,
    /// Authentic datagrams dropped for a bad format.
    pub dropped_malformed: AtomicU64,
    /// Requests dropped as replays.
    pub dropped_replay: AtomicU64,
    /// State file writes that failed.
    pub persist_failures: AtomicU64,
}

/// A bound witness, ready to [`run`](WitnessServer::run).
#[derive(Debug)]
pub struct WitnessServer {
    socket: UdpSocket,
    addr: SocketAddr,
    cfg: WitnessServerConfig,
    table: LeaseTable,
    stats: Arc<WitnessStats>,
    /// What anyone on the path can send — a bad tag, a malformed request, a replay of a
    /// captured one — is counted always and logged rarely, one limit per kind.
    quiet_tag: crate::lograte::LogLimit,
    quiet_malformed: crate::lograte::LogLimit,
    quiet_replay: crate::lograte::LogLimit,
}

fn load(path: &Path, now: Instant) -> Result<LeaseTable, WitnessError> {
    let bad = |op, reason: String| WitnessError::State {
        path: path.to_path_buf(),
        op,
        reason,
    };
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LeaseTable::new()),
        Err(e) => Err(bad("stat", e.to_string())),
        Ok(m) if m.len() > MAX_STATE_FILE => {
            Err(bad("read", format!("{} bytes is too large", m.len())))
        }
        Ok(_) => {
            let bytes = std::fs::read(path).map_err(|e| bad("read", e.to_string()))?;
            let f: StateFile =
                serde_json::from_slice(&bytes).map_err(|e| bad("parse", e.to_string()))?;
            if f.version != STATE_VERSION {
                return Err(bad(
                    "parse",
                    crate::persist::unknown_version(f.version, STATE_VERSION),
                ));
            }
            Ok(LeaseTable::from_file(f, now))
        }
    }
}

impl WitnessServer {
    /// Loads the state file (leases in it count as held for a TTL from now) and binds.
    ///
    /// # Errors
    /// [`WitnessError::State`] for an unusable state file, [`WitnessError::Io`] on bind.
    pub async fn bind(cfg: WitnessServerConfig) -> Result<Self, WitnessError> {
        let table = load(&cfg.state_file, Instant::now())?;
        if !table.leases.is_empty() {
            info!(
                leases = table.leases.len(),
                "witness: leases from the state file are held for a full TTL from now"
            );
        }
        let socket = UdpSocket::bind(cfg.listen)
            .await
            .map_err(|source| WitnessError::Io {
                addr: cfg.listen,
                op: "bind",
                source,
            })?;
        let addr = socket.local_addr().map_err(|source| WitnessError::Io {
            addr: cfg.listen,
            op: "local address",
            source,
        })?;
        Ok(Self {
            socket,
            addr,
            cfg,
            table,
            stats: Arc::default(),
            quiet_tag: crate::lograte::LogLimit::default(),
            quiet_malformed: crate::lograte::LogLimit::default(),
            quiet_replay: crate::lograte::LogLimit::default(),
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters, readable while the server runs.
    pub fn stats(&self) -> Arc<WitnessStats> {
        self.stats.clone()
    }

    /// Serves requests until `shutdown` completes.
    ///
    /// # Errors
    /// [`WitnessError::Io`] if the socket fails.
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), WitnessError> {
        tokio::pin!(shutdown);
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        info!(addr = %self.addr, "witness serving");
        loop {
            let (n, from) = tokio::select! {
                r = self.socket.recv_from(&mut buf) => r.map_err(|source| WitnessError::Io {
                    addr: self.addr, op: "receive", source,
                })?,
                () = &mut shutdown => return Ok(()),
            };
            let (req, key) = match self.cfg.keys.decode(&buf[..n]) {
                Ok(r) => r,
                Err(ProtoError::BadTag) => {
                    let total = self.stats.dropped_bad_tag.fetch_add(1, Ordering::Relaxed) + 1;
                    if let Some(folded) = self.quiet_tag.admit(std::time::Instant::now()) {
                        warn!(%from, bytes = n, total, folded, "witness: dropped datagram with a bad tag (rate-limited)");
                    }
                    continue;
                }
                Err(e) => {
                    let total = self.stats.dropped_malformed.fetch_add(1, Ordering::Relaxed) + 1;
                    if let Some(folded) = self.quiet_malformed.admit(std::time::Instant::now()) {
                        warn!(%from, error = %e, total, folded, "witness: dropped malformed request (rate-limited)");
                    }
                    continue;
                }
            };
            let Some(resp) = self.serve(&req).await else {
                continue;
            };
            match resp.encode(&key) {
                Ok(bytes) => {
                    if let Err(e) = self.socket.send_to(&bytes, from).await {
                        warn!(%from, error = %e, "witness: answer not sent");
                    }
                    self.stats.answered.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => warn!(error = %e, "witness: answer not encodable"),
            }
        }
    }

    async fn serve(&mut self, req: &Request) -> Option<Response> {
        let now = Instant::now();
        let holder_before = self
            .table
            .current(&req.domain, now)
            .map(|h| h.holder.clone());
        let mut next = self.table.clone();
        match next.handle(now, req, self.cfg.ttl_limits) {
            Handled::Replay => {
                let total = self.stats.dropped_replay.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(folded) = self.quiet_replay.admit(std::time::Instant::now()) {
                    warn!(node = %req.node, domain = %req.domain, nonce = req.nonce, total, folded, "witness: dropped replayed request (rate-limited)");
                }
                None
            }
            Handled::Reply { response, persist } => {
                if persist {
                    let bytes =
                        serde_json::to_vec_pretty(&next.to_file()).expect("state serializes");
                    let path = self.cfg.state_file.clone();
                    let r = tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
                        .await
                        .unwrap_or_else(|e| {
                            Err(("write task", std::io::Error::other(e.to_string())))
                        });
                    if let Err((op, e)) = r {
                        self.stats.persist_failures.fetch_add(1, Ordering::Relaxed);
                        warn!(path = %self.cfg.state_file.display(), op, error = %e, "witness: state not persisted, request refused");
                        // The table stays as it was; only the nonce is consumed.
                        self.table.nonces = next.nonces;
                        return Some(Response {
                            status: Status::Refused,
                            generation: 0,
                            ttl_ms: 0,
                            holder: String::new(),
                            reason: reason::PERSIST_FAILED,
                            flags: 0,
                            ..response
                        });
                    }
                }
                match response.status {
                    Status::Granted => {
                        self.stats.granted.fetch_add(1, Ordering::Relaxed);
                        if let Some(from) = holder_before.filter(|h| *h != req.node) {
                            info!(domain = %req.domain, %from, to = %req.node, generation = response.generation, "witness: lease taken over (its holder's output waits for the taker's acknowledgements)");
                        }
                        debug!(node = %req.node, domain = %req.domain, generation = response.generation, ttl_ms = response.ttl_ms, "witness: lease granted");
                    }
                    Status::Denied => {
                        self.stats.denied.fetch_add(1, Ordering::Relaxed);
                        info!(node = %req.node, domain = %req.domain, holder = %response.holder, "witness: lease denied");
                    }
                    Status::Released => {
                        info!(node = %req.node, domain = %req.domain, "witness: lease released")
                    }
                    _ => {}
                }
                self.table = next;
                Some(response)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: Op, node: &str, nonce: u64, generation: u64) -> Request {
        Request {
            op,
            node: node.into(),
            domain: "web".into(),
            nonce,
            generation,
            ttl_ms: 1000,
            copy: CopyStamp::NONE,
            version: super::super::proto::VERSION_3,
            flags: 0,
            peer: String::new(),
        }
    }

    fn status(h: &Handled) -> (Status, u64, &str, bool) {
        match h {
            Handled::Reply { response, persist } => (
                response.status,
                response.generation,
                response.holder.as_str(),
                *persist,
            ),
            Handled::Replay => panic!("unexpected replay"),
        }
    }

    /// An acquire declaring the lease preemptible by `peer`.
    fn preemptible(node: &str, nonce: u64, generation: u64, peer: &str) -> Request {
        Request {
            flags: flags::PREEMPTIBLE,
            peer: peer.into(),
            ..req(Op::Acquire, node, nonce, generation)
        }
    }

    /// An acquire asking to preempt.
    fn preempting(node: &str, nonce: u64) -> Request {
        Request {
            flags: flags::PREEMPT,
            ..req(Op::Acquire, node, nonce, 0)
        }
    }

    #[test]
    fn takeover_rules() {
        let lim = (MIN_TTL, MAX_TTL);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        type Want<'a> = (Status, u64, &'a str, bool, u8);
        // (case, time ms, request, expected (status, generation, holder, persist, flags))
        let steps: Vec<(&str, u64, Request, Want)> = vec![
            (
                "a takes the lease preemptible by b",
                0,
                preemptible("a", 1, 0, "b"),
                (Status::Granted, 1, "", true, flags::PREEMPTIBLE),
            ),
            (
                "c may not preempt: the lease names b",
                10,
                preempting("c", 1),
                (Status::Denied, 1, "a", false, 0),
            ),
            (
                "b without the flag waits like before",
                20,
                req(Op::Acquire, "b", 1, 0),
                (Status::Denied, 1, "a", false, 0),
            ),
            (
                "a renews exclusive: no longer preemptible",
                30,
                req(Op::Acquire, "a", 2, 1),
                (Status::Granted, 1, "", true, 0),
            ),
            (
                "b cannot preempt an exclusive lease",
                40,
                preempting("b", 2),
                (Status::Denied, 1, "a", false, 0),
            ),
            (
                "a declares it preemptible again",
                50,
                preemptible("a", 3, 1, "b"),
                (Status::Granted, 1, "", true, flags::PREEMPTIBLE),
            ),
            (
                "b takes it over at once, a new generation",
                60,
                preempting("b", 3),
                (Status::Granted, 2, "", true, 0),
            ),
            (
                "a's renewal is denied: b holds it",
                70,
                preemptible("a", 4, 1, "b"),
                (Status::Denied, 2, "b", false, 0),
            ),
            (
                "a's bid to hold it exclusively is denied as well",
                80,
                req(Op::Acquire, "a", 5, 1),
                (Status::Denied, 2, "b", false, 0),
            ),
            (
                "a cannot preempt back: b's lease is exclusive",
                90,
                preempting("a", 6),
                (Status::Denied, 2, "b", false, 0),
            ),
        ];
        let mut t = LeaseTable::new();
        for (case, at, r, want) in steps {
            let h = t.handle(ms(at), &r, lim);
            let Handled::Reply { response, persist } = &h else {
                panic!("{case}: replay");
            };
            assert_eq!(
                (
                    response.status,
                    response.generation,
                    response.holder.as_str(),
                    *persist,
                    response.flags
                ),
                want,
                "{case}"
            );
        }
        // The preemptible mark survives a restart of the witness.
        let mut t = LeaseTable::new();
        t.handle(t0, &preemptible("a", 1, 0, "b"), lim);
        let mut r = LeaseTable::from_file(
            serde_json::from_slice(&serde_json::to_vec(&t.to_file()).unwrap()).unwrap(),
            t0,
        );
        assert_eq!(
            status(&r.handle(t0, &preempting("b", 1), lim)),
            (Status::Granted, 2, "", true)
        );
        // A state file of the previous release (no mark) reads as exclusive.
        let old = r#"{"version":1,"next_generation":5,"leases":[{"domain":"web","holder":"a","generation":4,"ttl_ms":1000}],"nonces":[]}"#;
        let mut r = LeaseTable::from_file(serde_json::from_str(old).unwrap(), t0);
        assert_eq!(
            status(&r.handle(t0, &preempting("b", 1), lim)),
            (Status::Denied, 4, "a", false)
        );
    }

    #[test]
    fn version_2_requests_are_answered_in_version_2() {
        let mut t = LeaseTable::new();
        let r = Request {
            version: super::super::proto::VERSION_2,
            ..req(Op::Acquire, "a", 1, 0)
        };
        let Handled::Reply { response, .. } = t.handle(Instant::now(), &r, (MIN_TTL, MAX_TTL))
        else {
            panic!("replay");
        };
        assert_eq!(
            (response.status, response.version, response.flags),
            (Status::Granted, 2, 0)
        );
    }

    #[test]
    fn lease_table_rules() {
        let lim = (MIN_TTL, MAX_TTL);
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut t = LeaseTable::new();
        // (time ms, request, expected (status, generation, holder, persist))
        #[rustfmt::skip]
        type Want<'a> = (Status, u64, &'a str, bool);
        let steps: Vec<(u64, Request, Want)> = vec![
            (0, req(Op::Query, "a", 1, 0), (Status::Free, 0, "", false)),
            (
                0,
                req(Op::Acquire, "a", 2, 0),
                (Status::Granted, 1, "", true),
            ),
            (
                10,
                req(Op::Acquire, "b", 1, 0),
                (Status::Denied, 1, "a", false),
            ),
            // Renewal of the held generation keeps it.
            (
                500,
                req(Op::Acquire, "a", 3, 1),
                (Status::Granted, 1, "", true),
            ),
            (
                1400,
                req(Op::Acquire, "b", 2, 0),
                (Status::Denied, 1, "a", false),
            ),
            (
                1400,
                req(Op::Query, "b", 3, 0),
                (Status::Held, 1, "a", false),
            ),
            // A release of another generation is a no-op; a stranger cannot release.
            (
                1400,
                req(Op::Release, "a", 4, 7),
                (Status::NotHolder, 0, "", false),
            ),
            (
                1400,
                req(Op::Release, "b", 4, 1),
                (Status::NotHolder, 0, "", false),
            ),
            // Expired (renewed at 500 + 1000): the other node wins a new generation.
            (
                1501,
                req(Op::Acquire, "b", 5, 0),
                (Status::Granted, 2, "", true),
            ),
            (
                1600,
                req(Op::Acquire, "a", 5, 1),
                (Status::Denied, 2, "b", false),
            ),
            (
                1700,
                req(Op::Release, "b", 6, 2),
                (Status::Released, 2, "", true),
            ),
            (
                1700,
                req(Op::Acquire, "a", 6, 0),
                (Status::Granted, 3, "", true),
            ),
            // The holder starting over gets a fresh generation, so its older delayed release
            // (generation 3) can no longer free the lease.
            (
                1800,
                req(Op::Acquire, "a", 7, 0),
                (Status::Granted, 4, "", true),
            ),
            (
                1800,
                req(Op::Release, "a", 8, 3),
                (Status::NotHolder, 0, "", false),
            ),
        ];
        for (i, (at, r, want)) in steps.iter().enumerate() {
            let h = t.handle(ms(*at), r, lim);
            assert_eq!(status(&h), *want, "step {i}: {r:?}");
        }
        // Replays and reordering per (node, domain) are dropped; another domain is separate.
        assert_eq!(
            t.handle(ms(1900), &req(Op::Acquire, "a", 7, 0), lim),
            Handled::Replay
        );
        assert_eq!(
            t.handle(ms(1900), &req(Op::Query, "a", 2, 0), lim),
            Handled::Replay
        );
        let other = Request {
            domain: "db".into(),
            ..req(Op::Acquire, "a", 1, 0)
        };
        assert_eq!(status(&t.handle(ms(1900), &other, lim)).0, Status::Granted);
        // TTL outside the limits is refused.
        let long = Request {
            ttl_ms: 10_000_000,
            ..req(Op::Acquire, "a", 50, 0)
        };
        let h = t.handle(ms(1900), &long, lim);
        assert!(matches!(
            h,
            Handled::Reply {
                response: Response {
                    status: Status::Refused,
                    reason: reason::BAD_TTL,
                    ..
                },
                ..
            }
        ));
    }

    #[test]
    fn reload_holds_every_lease_for_a_full_ttl() {
        let lim = (MIN_TTL, MAX_TTL);
        let t0 = Instant::now();
        let mut t = LeaseTable::new();
        t.handle(t0, &req(Op::Acquire, "a", 1, 0), lim);
        // Saved long after the grant expired, reloaded at t1: held again until t1 + TTL.
        let t1 = t0 + Duration::from_secs(60);
        let mut r = LeaseTable::from_file(t.to_file(), t1);
        let h = r.handle(
            t1 + Duration::from_millis(999),
            &req(Op::Acquire, "b", 1, 0),
            lim,
        );
        assert_eq!(status(&h).0, Status::Denied);
        let h = r.handle(
            t1 + Duration::from_millis(1001),
            &req(Op::Acquire, "b", 2, 0),
            lim,
        );
        assert_eq!(
            status(&h),
            (Status::Granted, 2, "", true),
            "generations continue"
        );
        // The replay counters survive the reload.
        assert_eq!(
            r.handle(t1, &req(Op::Acquire, "a", 1, 0), lim),
            Handled::Replay
        );
    }

    #[test]
    fn the_newest_copy_stamp_is_kept_per_domain_and_survives_a_reload() {
        use crate::lineage::CopyHolder::{Ran, Received};
        let lim = (MIN_TTL, MAX_TTL);
        let t0 = Instant::now();
        let stamp = |generation, holder| CopyStamp { generation, holder };
        let record = |node: &str, nonce, s: CopyStamp| Request {
            copy: s,
            ..req(Op::Record, node, nonce, 0)
        };
        let answer = |h: &Handled| match h {
            Handled::Reply { response, persist } => (
                response.status,
                response.copy,
                response.holder.clone(),
                *persist,
            ),
            Handled::Replay => panic!("unexpected replay"),
        };
        let mut t = LeaseTable::new();
        // (request, expected (status, newest, its node, persist))
        let steps = [
            (
                record("a", 1, stamp(1, Ran)),
                (Status::Recorded, stamp(1, Ran), "a", true),
            ),
            // An older or equal stamp changes nothing and names who holds the newer.
            (
                record("b", 1, stamp(1, Received)),
                (Status::Recorded, stamp(1, Ran), "a", false),
            ),
            (
                record("a", 2, stamp(1, Ran)),
                (Status::Recorded, stamp(1, Ran), "a", false),
            ),
            (
                record("b", 2, stamp(2, Ran)),
                (Status::Recorded, stamp(2, Ran), "b", true),
            ),
            (
                record("a", 3, CopyStamp::NONE),
                (Status::Recorded, stamp(2, Ran), "b", false),
            ),
        ];
        for (i, (r, want)) in steps.into_iter().enumerate() {
            let got = answer(&t.handle(t0, &r, lim));
            assert_eq!((got.0, got.1, got.2.as_str(), got.3), want, "step {i}");
        }
        // Every answer carries the newest stamp, e.g. a query's.
        let q = t.handle(t0, &req(Op::Query, "a", 4, 0), lim);
        assert_eq!(answer(&q).1, stamp(2, Ran));
        // Another domain has none.
        let other = Request {
            domain: "db".into(),
            ..record("a", 1, CopyStamp::NONE)
        };
        assert_eq!(answer(&t.handle(t0, &other, lim)).1, CopyStamp::NONE);
        // Reloaded from its state file, the witness still knows.
        let mut r = LeaseTable::from_file(t.to_file(), t0);
        let got = answer(&r.handle(t0, &record("a", 9, stamp(1, Ran)), lim));
        assert_eq!((got.1, got.2.as_str()), (stamp(2, Ran), "b"));
    }
}
