//! The wire stays the wire of release 0.1.0.
//!
//! The golden texts below were produced by the 0.1.0 daemon's code (which serialised the
//! engine's and ha's types directly) from the very same internal values these tests build;
//! each test converts those values through [`super::convert`] as the supervisor does,
//! serialises them, and requires the same bytes. A change here is a change of the control
//! protocol (see the module's *Versions*), not a test to update.

use std::time::Duration;

use remus_engine::backup::BackupStatus;
use remus_engine::metrics::{
    EpochReport as EngineReport, EpochSummary as EngineSummary, Percentiles as EnginePct,
};
use remus_engine::primary::{EpochPhase as Phase, PrimaryStatus};
use remus_engine::replica::ReplicaState as Replica;
use remus_ha::lineage::{CopyHolder as Holder, CopyStamp as Stamp};
use remus_ha::role::{FenceProof as Proof, Role as HaRole};

use super::*;

/// The JSON of `value`, as the control server writes it (one compact line).
fn wire<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("status types always serialise")
}

/// `value` serialised and read back.
fn round_trip<T: Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
    serde_json::from_str(&wire(value)).expect("what the daemon writes, the client reads")
}

/// A domain as the supervisor publishes it: internal role, loop status, receiver status
/// and stamp, converted.
fn domain(
    name: &str,
    role: &HaRole,
    protection: Option<&PrimaryStatus>,
    replica: Option<&BackupStatus>,
    copy: Stamp,
) -> DomainStatus {
    DomainStatus {
        name: name.into(),
        role: role.into(),
        vm: None,
        protection: protection.map(ProtectionStatus::from),
        replica: replica.map(ReplicaStatus::from),
        committed_epoch: None,
        lease: None,
        alarms: vec![],
        failovers: vec![],
        resyncs: vec![],
        counters: DomainCounters::default(),
        copy: copy.into(),
        unprotected: vec![],
        verify: None,
    }
}

/// A primary's loop in the middle of a long protection session.
fn busy_primary() -> PrimaryStatus {
    let ms = Duration::from_millis;
    let us = Duration::from_micros;
    PrimaryStatus {
        phase: Phase::Running { epoch: 812 },
        last_acked: Some(811),
        in_flight: 1,
        last: Some(EngineReport {
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
        summary: EngineSummary {
            epochs: 800,
            pause: EnginePct {
                p50_us: 12_300,
                p99_us: 25_000,
                max_us: 40_000,
            },
            output_commit_delay: EnginePct {
                p50_us: 30_000,
                p99_us: 61_500,
                max_us: 90_000,
            },
            ack_latency: EnginePct {
                p50_us: 1_200,
                p99_us: 3_400,
                max_us: 7_000,
            },
            mean_dirty_pages: 1100,
        },
        precopy_pages: vec![262_144, 2_000],
        tracker: "compare".into(),
        audit_repaired_total: 3,
        verify: None,
        last_verify: None,
        peer_can_verify: None,
    }
}

/// Node alpha: `web` protected here, `db` a backup that failed over once, `idle` stopped.
fn sample() -> DaemonStatus {
    let mut web = domain(
        "web",
        &HaRole::Primary {
            peer: "beta".into(),
            since_epoch: 10,
        },
        Some(&busy_primary()),
        None,
        Stamp {
            generation: 4,
            holder: Holder::Ran,
        },
    );
    web.vm = Some(VmStatus {
        pid: 4242,
        running: true,
        output_held: true,
    });
    web.lease = Some("held".into());
    web.resyncs = vec![ResyncRecord {
        disk: "root".into(),
        mode: "dirty".into(),
        regions: 12,
        bytes_copied: 1_048_576,
        bytes_zero: 4096,
    }];
    web.counters = DomainCounters {
        checkpoints: 801,
        refused: 0,
        protection_lost: 1,
        failovers: 0,
        unprotected_ms: 0,
        verify_runs: 0,
        verify_differing_regions: 0,
    };
    let mut db = domain(
        "db",
        &HaRole::Backup {
            peer: "beta".into(),
            last_committed: Some(290),
        },
        None,
        Some(&BackupStatus {
            replica: Replica::Committed(300),
            receiving: Some(301),
            committed_count: 290,
            refused_count: 2,
        }),
        Stamp {
            generation: 7,
            holder: Holder::Received,
        },
    );
    db.committed_epoch = Some(300);
    db.alarms = vec!["fencing command failed twice: fence-beta exited 1".into()];
    db.failovers = vec![FailoverRecord {
        declared_at_ms: 1_700_000_000_500,
        detection_ms: 520,
        fencing_ms: 35,
        activation_ms: 780,
        fence_proof: "command".into(),
        from_epoch: 120,
    }];
    db.counters = DomainCounters {
        checkpoints: 290,
        refused: 2,
        protection_lost: 0,
        failovers: 1,
        unprotected_ms: 0,
        verify_runs: 0,
        verify_differing_regions: 0,
    };
    let idle = domain("idle", &HaRole::Stopped, None, None, Stamp::NONE);
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
        domains: vec![web, db, idle],
        doors: Default::default(),
        arbiter: None,
    }
}

const SAMPLE_GOLDEN: &str = concat!(
    r#"{"version":1,"node":"alpha","peer":"beta","peer_liveness":{"state":"alive","links_up"#,
    r#"":1,"links_total":2},"replication_heard_ms_ago":40,"uptime_s":3725,"domains":[{"name"#,
    r#"":"web","role":{"role":"primary","peer":"beta","since_epoch":10},"vm":{"pid":4242,"r"#,
    r#"unning":true,"output_held":true},"protection":{"phase":{"phase":"running","epoch":81"#,
    r#"2},"last_acked":811,"in_flight":1,"last":{"epoch":811,"ack_wait":0,"stop":1500,"capt"#,
    r#"ure":4250,"disk_barrier":125,"device_save":3000,"resume":200,"pause":9500,"dirty_pag"#,
    r#"es":1234,"audit_repaired":0,"device_bytes":65536,"page_bytes_raw":5054464,"page_byte"#,
    r#"s_encoded":1200000,"transmit":2000,"ack_latency":2400,"output_commit_delay":25000},""#,
    r#"summary":{"epochs":800,"pause":{"p50_us":12300,"p99_us":25000,"max_us":40000},"outpu"#,
    r#"t_commit_delay":{"p50_us":30000,"p99_us":61500,"max_us":90000},"ack_latency":{"p50_u"#,
    r#"s":1200,"p99_us":3400,"max_us":7000},"mean_dirty_pages":1100},"precopy_pages":[26214"#,
    r#"4,2000],"tracker":"compare","audit_repaired_total":3},"replica":null,"committed_epoc"#,
    r#"h":null,"lease":"held","alarms":[],"failovers":[],"resyncs":[{"disk":"root","mode":""#,
    r#"dirty","regions":12,"bytes_copied":1048576,"bytes_zero":4096}],"counters":{"checkpoi"#,
    r#"nts":801,"refused":0,"protection_lost":1,"failovers":0},"copy":{"generation":4,"hold"#,
    r#"er":"ran"}},{"name":"db","role":{"role":"backup","peer":"beta","last_committed":290}"#,
    r#","vm":null,"protection":null,"replica":{"replica":{"state":"committed","epoch":300},"#,
    r#""receiving":301,"committed_count":290,"refused_count":2},"committed_epoch":300,"leas"#,
    r#"e":null,"alarms":["fencing command failed twice: fence-beta exited 1"],"failovers":["#,
    r#"{"declared_at_ms":1700000000500,"detection_ms":520,"fencing_ms":35,"activation_ms":7"#,
    r#"80,"fence_proof":"command","from_epoch":120}],"resyncs":[],"counters":{"checkpoints""#,
    r#":290,"refused":2,"protection_lost":0,"failovers":1},"copy":{"generation":7,"holder":"#,
    r#""received"}},{"name":"idle","role":{"role":"stopped"},"vm":null,"protection":null,"r"#,
    r#"eplica":null,"committed_epoch":null,"lease":null,"alarms":[],"failovers":[],"resyncs"#,
    r#"":[],"counters":{"checkpoints":0,"refused":0,"protection_lost":0,"failovers":0},"cop"#,
    r#"y":{"generation":0,"holder":"none"}}]}"#,
);

#[test]
fn status_is_byte_for_byte_the_0_1_0_wire() {
    assert_eq!(wire(&sample()), SAMPLE_GOLDEN);
}

#[test]
fn absent_options_are_skipped_or_null_as_in_0_1_0() {
    let mut s = sample();
    s.replication_heard_ms_ago = None;
    s.peer_liveness = PeerLiveness::Lost {
        detected_after_ms: 900,
    };
    s.domains.truncate(1);
    assert_eq!(wire(&Response::Status(s)), RESPONSE_GOLDEN);
}

const RESPONSE_GOLDEN: &str = concat!(
    r#"{"response":"status","version":1,"node":"alpha","peer":"beta","peer_liveness":{"stat"#,
    r#"e":"lost","detected_after_ms":900},"uptime_s":3725,"domains":[{"name":"web","role":{"#,
    r#""role":"primary","peer":"beta","since_epoch":10},"vm":{"pid":4242,"running":true,"ou"#,
    r#"tput_held":true},"protection":{"phase":{"phase":"running","epoch":812},"last_acked":"#,
    r#"811,"in_flight":1,"last":{"epoch":811,"ack_wait":0,"stop":1500,"capture":4250,"disk_"#,
    r#"barrier":125,"device_save":3000,"resume":200,"pause":9500,"dirty_pages":1234,"audit_"#,
    r#"repaired":0,"device_bytes":65536,"page_bytes_raw":5054464,"page_bytes_encoded":12000"#,
    r#"00,"transmit":2000,"ack_latency":2400,"output_commit_delay":25000},"summary":{"epoch"#,
    r#"s":800,"pause":{"p50_us":12300,"p99_us":25000,"max_us":40000},"output_commit_delay":"#,
    r#"{"p50_us":30000,"p99_us":61500,"max_us":90000},"ack_latency":{"p50_us":1200,"p99_us""#,
    r#":3400,"max_us":7000},"mean_dirty_pages":1100},"precopy_pages":[262144,2000],"tracker"#,
    r#"":"compare","audit_repaired_total":3},"replica":null,"committed_epoch":null,"lease":"#,
    r#""held","alarms":[],"failovers":[],"resyncs":[{"disk":"root","mode":"dirty","regions""#,
    r#":12,"bytes_copied":1048576,"bytes_zero":4096}],"counters":{"checkpoints":801,"refuse"#,
    r#"d":0,"protection_lost":1,"failovers":0},"copy":{"generation":4,"holder":"ran"}}]}"#,
);

#[test]
fn doors_appear_once_anything_was_refused_and_read_back() {
    let mut s = sample();
    s.doors.heartbeat_bad_tag = 120_000;
    s.doors.connections_shed = 468;
    let text = wire(&s);
    assert!(
        text.ends_with(concat!(
            r#""doors":{"heartbeat_bad_tag":120000,"heartbeat_malformed":0,"heartbeat_unknown_"#,
            r#"node":0,"heartbeat_replayed":0,"handshakes_refused":0,"connections_shed":468}}"#
        )),
        "{text}"
    );
    assert_eq!(round_trip(&s), s);
    // A 0.1.0 daemon's status (no doors) reads as quiet doors.
    let old: DaemonStatus = serde_json::from_str(SAMPLE_GOLDEN).unwrap();
    assert!(old.doors.is_quiet());
}

#[test]
fn status_round_trips() {
    let s = sample();
    assert_eq!(round_trip(&s), s);
    let back: Response = round_trip(&Response::Status(s.clone()));
    assert!(matches!(back, Response::Status(b) if b == s));
}

#[test]
fn every_role_keeps_its_0_1_0_form() {
    let a = || "a".to_string();
    let b = || "b".to_string();
    #[rustfmt::skip]
    let table: Vec<(HaRole, &str)> = vec![
        (HaRole::Stopped, r#"{"role":"stopped"}"#),
        (HaRole::Standalone, r#"{"role":"standalone"}"#),
        (HaRole::Primary { peer: b(), since_epoch: 3 }, r#"{"role":"primary","peer":"b","since_epoch":3}"#),
        (HaRole::Backup { peer: a(), last_committed: None }, r#"{"role":"backup","peer":"a","last_committed":null}"#),
        (HaRole::Backup { peer: a(), last_committed: Some(9) }, r#"{"role":"backup","peer":"a","last_committed":9}"#),
        (HaRole::Fencing { peer: a(), started_ms: 17, attempts: 2 }, r#"{"role":"fencing","peer":"a","started_ms":17,"attempts":2}"#),
        (HaRole::Fenced { peer: a(), by: Proof::Command }, r#"{"role":"fenced","peer":"a","by":"command"}"#),
        (HaRole::Fenced { peer: a(), by: Proof::Lease }, r#"{"role":"fenced","peer":"a","by":"lease"}"#),
        (HaRole::Fenced { peer: a(), by: Proof::Unfenced }, r#"{"role":"fenced","peer":"a","by":"unfenced"}"#),
        (HaRole::Fenced { peer: a(), by: Proof::Operator }, r#"{"role":"fenced","peer":"a","by":"operator"}"#),
        (HaRole::Fenced { peer: a(), by: Proof::Switchover }, r#"{"role":"fenced","peer":"a","by":"switchover"}"#),
        (HaRole::Activating { from_epoch: 5 }, r#"{"role":"activating","from_epoch":5}"#),
        (HaRole::Activated { epoch: 6 }, r#"{"role":"activated","epoch":6}"#),
        (HaRole::Resyncing { peer: b() }, r#"{"role":"resyncing","peer":"b"}"#),
    ];
    for (internal, golden) in table {
        let role = Role::from(&internal);
        assert_eq!(wire(&role), golden, "{internal:?}");
        assert_eq!(role.name(), internal.name(), "{internal:?}");
        assert_eq!(round_trip(&role), role);
    }
}

#[test]
fn every_epoch_phase_keeps_its_0_1_0_form() {
    #[rustfmt::skip]
    let table: Vec<(Phase, &str)> = vec![
        (Phase::Idle, r#"{"phase":"idle"}"#),
        (Phase::PreCopy { round: 2 }, r#"{"phase":"pre_copy","round":2}"#),
        (Phase::Running { epoch: 1 }, r#"{"phase":"running","epoch":1}"#),
        (Phase::AwaitingAck { epoch: 2 }, r#"{"phase":"awaiting_ack","epoch":2}"#),
        (Phase::ClosingOutput { epoch: 3 }, r#"{"phase":"closing_output","epoch":3}"#),
        (Phase::Stopping { epoch: 4 }, r#"{"phase":"stopping","epoch":4}"#),
        (Phase::Capturing { epoch: 5 }, r#"{"phase":"capturing","epoch":5}"#),
        (Phase::DiskBarrier { epoch: 6 }, r#"{"phase":"disk_barrier","epoch":6}"#),
        (Phase::SavingDevice { epoch: 7 }, r#"{"phase":"saving_device","epoch":7}"#),
        (Phase::Resuming { epoch: 8 }, r#"{"phase":"resuming","epoch":8}"#),
        (Phase::Transmitting { epoch: 9 }, r#"{"phase":"transmitting","epoch":9}"#),
        (Phase::HandingOff { epoch: 10 }, r#"{"phase":"handing_off","epoch":10}"#),
        (Phase::Ended, r#"{"phase":"ended"}"#),
    ];
    for (internal, golden) in table {
        let phase = EpochPhase::from(internal);
        assert_eq!(wire(&phase), golden, "{internal:?}");
        assert_eq!(round_trip(&phase), phase);
    }
}

#[test]
fn every_replica_state_and_copy_stamp_keeps_its_0_1_0_form() {
    #[rustfmt::skip]
    let replicas: Vec<(Replica, &str)> = vec![
        (Replica::Empty, r#"{"state":"empty"}"#),
        (Replica::Syncing, r#"{"state":"syncing"}"#),
        (Replica::Applying(4), r#"{"state":"applying","epoch":4}"#),
        (Replica::Committed(5), r#"{"state":"committed","epoch":5}"#),
    ];
    for (internal, golden) in replicas {
        let state = ReplicaState::from(internal);
        assert_eq!(wire(&state), golden, "{internal:?}");
        assert_eq!(
            state.to_string(),
            internal.to_string(),
            "what remusctl prints"
        );
        assert_eq!(round_trip(&state), state);
    }
    #[rustfmt::skip]
    let stamps: Vec<(Holder, &str)> = vec![
        (Holder::None, r#"{"generation":2,"holder":"none"}"#),
        (Holder::Received, r#"{"generation":2,"holder":"received"}"#),
        (Holder::Ran, r#"{"generation":2,"holder":"ran"}"#),
    ];
    for (holder, golden) in stamps {
        let internal = Stamp {
            generation: 2,
            holder,
        };
        let stamp = CopyStamp::from(internal);
        assert_eq!(wire(&stamp), golden, "{internal:?}");
        assert_eq!(
            stamp.to_string(),
            internal.to_string(),
            "what remusctl prints"
        );
        assert_eq!(
            remus_ha::lineage::CopyStamp::from(stamp),
            internal,
            "the heartbeat's"
        );
        assert_eq!(round_trip(&stamp), stamp);
    }
    // The drills compare stamps: newer is greater, on the wire as in `remus_ha::lineage`.
    let older = Stamp {
        generation: 3,
        holder: Holder::Ran,
    };
    let newer = Stamp {
        generation: 4,
        holder: Holder::None,
    };
    let received = Stamp {
        generation: 4,
        holder: Holder::Received,
    };
    for (x, y) in [(older, newer), (newer, received), (older, received)] {
        assert_eq!(
            CopyStamp::from(x).cmp(&CopyStamp::from(y)),
            x.cmp(&y),
            "{x:?} {y:?}"
        );
    }
}

#[test]
fn an_idle_loop_an_empty_receiver_and_durations_keep_their_0_1_0_form() {
    let idle = PrimaryStatus {
        phase: Phase::Idle,
        last_acked: None,
        in_flight: 0,
        last: None,
        summary: EngineSummary::default(),
        precopy_pages: vec![],
        tracker: "soft-dirty".into(),
        audit_repaired_total: 0,
        verify: None,
        last_verify: None,
        peer_can_verify: None,
    };
    assert_eq!(wire(&ProtectionStatus::from(&idle)), PRIMARY_EMPTY_GOLDEN);
    let empty = BackupStatus {
        replica: Replica::Empty,
        receiving: None,
        committed_count: 0,
        refused_count: 0,
    };
    assert_eq!(
        wire(&ReplicaStatus::from(&empty)),
        r#"{"replica":{"state":"empty"},"receiving":null,"committed_count":0,"refused_count":0}"#
    );
    // Durations travel as whole microseconds, truncated.
    let report = EngineReport {
        epoch: 1,
        ack_wait: Duration::from_nanos(1500),
        ..Default::default()
    };
    let converted = EpochReport::from(&report);
    assert_eq!(wire(&converted), REPORT_GOLDEN);
    assert_eq!(round_trip(&converted).ack_wait, Duration::from_micros(1));
}

const PRIMARY_EMPTY_GOLDEN: &str = concat!(
    r#"{"phase":{"phase":"idle"},"last_acked":null,"in_flight":0,"last":null,"summary":{"ep"#,
    r#"ochs":0,"pause":{"p50_us":0,"p99_us":0,"max_us":0},"output_commit_delay":{"p50_us":0"#,
    r#","p99_us":0,"max_us":0},"ack_latency":{"p50_us":0,"p99_us":0,"max_us":0},"mean_dirty"#,
    r#"_pages":0},"precopy_pages":[],"tracker":"soft-dirty","audit_repaired_total":0}"#,
);

const REPORT_GOLDEN: &str = concat!(
    r#"{"epoch":1,"ack_wait":1,"stop":0,"capture":0,"disk_barrier":0,"device_save":0,"resum"#,
    r#"e":0,"pause":0,"dirty_pages":0,"audit_repaired":0,"device_bytes":0,"page_bytes_raw":"#,
    r#"0,"page_bytes_encoded":0,"transmit":0,"ack_latency":0,"output_commit_delay":0}"#,
);
