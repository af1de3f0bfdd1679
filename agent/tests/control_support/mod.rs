//! What the control and metrics tests share: a representative [`DaemonStatus`] and a stub
//! [`ControlHandler`] that records the commands it receives.
//!
//! The stub stands in for the daemon because these tests prove the protocol (transport,
//! framing, errors, CLI rendering); the real daemon's answers are proven by its own tests.

#![allow(dead_code)] // each test binary uses part of it

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use remus_agent::api::{
    ControlHandler, CopyHolder, CopyStamp, DaemonStatus, DomainCounters, DomainStatus, EpochPhase,
    EpochReport, EpochSummary, FailoverRecord, PeerLiveness, Percentiles, ProtectionStatus,
    ReplicaState, ReplicaStatus, Request, Response, ResyncRecord, Role, VmStatus, CONTROL_VERSION,
};

/// Two domains seen from node alpha: `web` protected here as primary, `db` a backup here
/// that failed over once before, plus an unconfigured-looking `idle` stopped domain.
pub fn sample_status() -> DaemonStatus {
    let ms = Duration::from_millis;
    let us = Duration::from_micros;
    DaemonStatus {
        version: CONTROL_VERSION,
        node: "alpha".into(),
        peer: "beta".into(),
        peer_liveness: PeerLiveness::Alive {
            links_up: 1,
            links_total: 2,
        },
        replication_heard_ms_ago: Some(40),
        peer_longest_silence_ms: None,
        heartbeat_longest_gap_ms: None,
        uptime_s: 3725,
        domains: vec![
            DomainStatus {
                name: "web".into(),
                role: Role::Primary {
                    peer: "beta".into(),
                    since_epoch: 10,
                },
                vm: Some(VmStatus {
                    pid: 4242,
                    running: true,
                    output_held: true,
                }),
                protection: Some(ProtectionStatus {
                    phase: EpochPhase::Running { epoch: 812 },
                    last_acked: Some(811),
                    in_flight: 1,
                    last: Some(EpochReport {
                        epoch: 811,
                        ack_wait: Duration::ZERO,
                        stop: us(1500),
                        capture: us(4250),
                        disk_barrier: us(125),
                        device_save: ms(3),
                        resume: us(200),
                        pause: us(9500),
                        dirty_pages: 1234,
                        audit_repaired: 0,
                        device_bytes: 65536,
                        page_bytes_raw: 5_054_464,
                        page_bytes_encoded: 1_200_000,
                        transmit: ms(2),
                        ack_latency: us(2400),
                        output_commit_delay: ms(25),
                    }),
                    summary: EpochSummary {
                        epochs: 800,
                        pause: Percentiles {
                            p50_us: 12_300,
                            p99_us: 25_000,
                            max_us: 40_000,
                        },
                        output_commit_delay: Percentiles {
                            p50_us: 30_000,
                            p99_us: 61_500,
                            max_us: 90_000,
                        },
                        ack_latency: Percentiles {
                            p50_us: 1_200,
                            p99_us: 3_400,
                            max_us: 7_000,
                        },
                        mean_dirty_pages: 1100,
                    },
                    precopy_pages: vec![262_144, 2_000],
                    tracker: "compare".into(),
                    audit_repaired_total: 3,
                }),
                replica: None,
                committed_epoch: None,
                lease: Some("held".into()),
                alarms: vec![],
                failovers: vec![],
                resyncs: vec![ResyncRecord {
                    disk: "root".into(),
                    mode: "dirty".into(),
                    regions: 12,
                    bytes_copied: 1_048_576,
                    bytes_zero: 4096,
                }],
                copy: CopyStamp {
                    generation: 4,
                    holder: CopyHolder::Ran,
                },
                counters: DomainCounters {
                    checkpoints: 801,
                    refused: 0,
                    protection_lost: 1,
                    failovers: 0,
                    unprotected_ms: 3500,
                    verify_runs: 0,
                    verify_differing_regions: 0,
                },
                unprotected: vec![remus_agent::api::UnprotectedWindow {
                    from_ms: 1_700_000_000_000,
                    to_ms: Some(1_700_000_003_500),
                    reason: "primary: first checkpoint not yet acknowledged".into(),
                }],
                verify: None,
            },
            DomainStatus {
                name: "db".into(),
                role: Role::Backup {
                    peer: "beta".into(),
                    last_committed: Some(290),
                },
                vm: None,
                protection: None,
                replica: Some(ReplicaStatus {
                    replica: ReplicaState::Committed(300),
                    receiving: Some(301),
                    committed_count: 290,
                    refused_count: 2,
                }),
                committed_epoch: Some(300),
                lease: None,
                alarms: vec!["fencing command failed twice: fence-beta exited 1".into()],
                failovers: vec![FailoverRecord {
                    declared_at_ms: 1_700_000_000_500,
                    detection_ms: 520,
                    fencing_ms: 35,
                    activation_ms: 780,
                    fence_proof: "command".into(),
                    from_epoch: 120,
                }],
                resyncs: vec![],
                copy: CopyStamp {
                    generation: 7,
                    holder: CopyHolder::Received,
                },
                counters: DomainCounters {
                    checkpoints: 290,
                    refused: 2,
                    protection_lost: 0,
                    failovers: 1,
                    unprotected_ms: 0,
                    verify_runs: 0,
                    verify_differing_regions: 0,
                },
                unprotected: vec![],
                verify: None,
            },
            DomainStatus {
                name: "idle".into(),
                role: Role::Stopped,
                vm: None,
                protection: None,
                replica: None,
                committed_epoch: None,
                lease: None,
                alarms: vec![],
                failovers: vec![],
                resyncs: vec![],
                copy: CopyStamp::default(),
                counters: DomainCounters::default(),
                unprotected: vec![],
                verify: None,
            },
        ],
        doors: remus_agent::api::Doors {
            heartbeat_bad_tag: 7,
            heartbeat_replayed: 2,
            handshakes_refused: 3,
            connections_shed: 468,
            ..Default::default()
        },
        arbiter: Some(remus_agent::api::ArbiterStatus {
            backend: "etcd".into(),
            location: "https://192.0.2.5:2379,https://192.0.2.6:2379 /remus".into(),
            lease_ms: 2000,
            requests: vec![remus_agent::api::ArbiterOpStats {
                op: "renew".into(),
                ok: 900,
                denied: 0,
                failed: 2,
                latency_sum_us: 1_800_000,
                latency_max_us: 41_000,
                latency_last_us: 1_900,
            }],
        }),
    }
}

/// A daemon stand-in: answers status with a fixed snapshot and commands by a fixed rule,
/// recording every command.
pub struct Stub {
    /// What `status` returns.
    pub status: DaemonStatus,
    /// Commands received, in order.
    pub commands: Mutex<Vec<Request>>,
    /// Commands that finished (recorded after the handler's work, even if the client left).
    pub finished: Mutex<Vec<Request>>,
    /// Held by `test-activate slow`: it finishes only when notified.
    pub release: tokio::sync::Notify,
    /// `test-activate together-N` waits here until N such requests are inside the handler at
    /// once: proof that connections are served concurrently.
    pub barrier: tokio::sync::Barrier,
}

/// How many `together` requests the barrier waits for.
pub const TOGETHER: usize = 8;

impl Stub {
    pub fn new() -> Arc<Self> {
        Arc::new(Stub {
            status: sample_status(),
            commands: Mutex::new(Vec::new()),
            finished: Mutex::new(Vec::new()),
            release: tokio::sync::Notify::new(),
            barrier: tokio::sync::Barrier::new(TOGETHER),
        })
    }
}

#[async_trait]
impl ControlHandler for Stub {
    async fn status(&self) -> DaemonStatus {
        self.status.clone()
    }

    async fn command(&self, request: Request) -> Response {
        self.commands.lock().unwrap().push(request.clone());
        let response = match &request {
            Request::Start { domain, .. } if domain == "idle" => Response::Done {
                message: format!("{domain}: started on alpha, protection to beta pending"),
            },
            Request::Start { domain, .. } => Response::Error {
                message: format!("start {domain}: refused: role is not stopped"),
            },
            Request::Switchover { domain } => Response::Done {
                message: format!("{domain}: primary role handed to beta at epoch 812"),
            },
            Request::Verify { domain, .. } => Response::Error {
                message: format!("domain {domain}: verify: this node holds the replica"),
            },
            Request::Failover { domain } if domain == "db" => Response::Done {
                message: format!("{domain}: activated from checkpoint 300"),
            },
            Request::Failover { domain } => Response::Error {
                message: format!("failover {domain}: refused: this node is not the backup"),
            },
            Request::TestActivate { domain } if domain == "slow" => {
                self.release.notified().await;
                Response::Done {
                    message: "slow: test activation passed".into(),
                }
            }
            Request::TestActivate { domain } if domain == "together" => {
                self.barrier.wait().await;
                Response::Done {
                    message: "together: all in flight at once".into(),
                }
            }
            Request::TestActivate { domain } => Response::Done {
                message: format!("{domain}: test activation passed"),
            },
            Request::DomainConfig { domain } => Response::Error {
                message: format!("domain config {domain}: not in this stub"),
            },
            Request::Reload => Response::Error {
                message: "reload of /etc/remus/remus.toml refused, the running policy stays:\n/etc/remus/remus.toml:12:1: error: [heartbeat] changed: not applied live".into(),
            },
            Request::Status => Response::Error {
                message: "status reached command()".into(),
            },
        };
        self.finished.lock().unwrap().push(request);
        response
    }
}
