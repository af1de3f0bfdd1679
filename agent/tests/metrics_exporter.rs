//! The Prometheus exporter: the exposition rendered from a representative snapshot, checked
//! line by line, and the real HTTP server scraped over TCP on 127.0.0.1.

mod control_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use control_support::{sample_status, Stub};
use remus_agent::api::PeerLiveness;
use remus_agent::metrics::{render, serve_metrics, MetricsServer, CONTENT_TYPE_OPENMETRICS};
use tokio::sync::oneshot;

/// Families as they must appear: descriptor lines, then every sample, contiguous.
const BLOCKS: &[&str] = &[
    "# HELP remus_daemon This node's name, its peer's and the control protocol version.
# TYPE remus_daemon info
remus_daemon_info{node=\"alpha\",peer=\"beta\",control_version=\"1\"} 1
",
    "# TYPE remus_daemon_uptime_seconds gauge
# UNIT remus_daemon_uptime_seconds seconds
remus_daemon_uptime_seconds 3725
",
    "# TYPE remus_peer_liveness gauge
remus_peer_liveness{peer=\"beta\",state=\"starting\"} 0
remus_peer_liveness{peer=\"beta\",state=\"alive\"} 1
remus_peer_liveness{peer=\"beta\",state=\"suspect\"} 0
remus_peer_liveness{peer=\"beta\",state=\"lost\"} 0
",
    "remus_peer_links_up{peer=\"beta\"} 1
",
    "remus_peer_links{peer=\"beta\"} 2
",
    "# TYPE remus_peer_replication_heard_ago_seconds gauge
# UNIT remus_peer_replication_heard_ago_seconds seconds
remus_peer_replication_heard_ago_seconds{peer=\"beta\"} 0.04
",
    // one-hot role: exactly one 1 per domain
    "remus_domain_role{domain=\"web\",role=\"stopped\"} 0
remus_domain_role{domain=\"web\",role=\"standalone\"} 0
remus_domain_role{domain=\"web\",role=\"primary\"} 1
remus_domain_role{domain=\"web\",role=\"backup\"} 0
",
    "remus_domain_role{domain=\"db\",role=\"primary\"} 0
remus_domain_role{domain=\"db\",role=\"backup\"} 1
",
    "remus_domain_role{domain=\"idle\",role=\"stopped\"} 1
",
    "# HELP remus_vm_running Whether this node's QEMU for the domain runs the guest (0 without a QEMU).
# TYPE remus_vm_running gauge
remus_vm_running{domain=\"web\"} 1
remus_vm_running{domain=\"db\"} 0
remus_vm_running{domain=\"idle\"} 0
",
    "remus_vm_output_held{domain=\"web\"} 1
remus_vm_output_held{domain=\"db\"} 0
",
    "# HELP remus_checkpoints Checkpoints acknowledged by the backup (primary) or committed (backup).
# TYPE remus_checkpoints counter
remus_checkpoints_total{domain=\"web\"} 801
remus_checkpoints_total{domain=\"db\"} 290
remus_checkpoints_total{domain=\"idle\"} 0
",
    "# TYPE remus_checkpoints_refused counter
remus_checkpoints_refused_total{domain=\"web\"} 0
remus_checkpoints_refused_total{domain=\"db\"} 2
",
    "remus_protection_lost_total{domain=\"web\"} 1
",
    "remus_failovers_total{domain=\"db\"} 1
",
    // only the primary has an epoch loop: no series for db or idle
    "# TYPE remus_audit_repaired_pages counter
remus_audit_repaired_pages_total{domain=\"web\"} 3
# HELP remus_last_acked_epoch Last checkpoint the backup acknowledged (primary).
# TYPE remus_last_acked_epoch gauge
remus_last_acked_epoch{domain=\"web\"} 811
# HELP remus_committed_epoch Last committed checkpoint of the replica (backup).
# TYPE remus_committed_epoch gauge
remus_committed_epoch{domain=\"db\"} 300
# HELP remus_checkpoints_in_flight Checkpoints sent and not yet acknowledged (primary).
# TYPE remus_checkpoints_in_flight gauge
remus_checkpoints_in_flight{domain=\"web\"} 1
",
    "remus_epoch_window{domain=\"web\"} 800
",
    "# HELP remus_epoch_pause_seconds The VM's pause per checkpoint, stop to cont (quantile 1 is the maximum).
# TYPE remus_epoch_pause_seconds gauge
# UNIT remus_epoch_pause_seconds seconds
remus_epoch_pause_seconds{domain=\"web\",quantile=\"0.5\"} 0.0123
remus_epoch_pause_seconds{domain=\"web\",quantile=\"0.99\"} 0.025
remus_epoch_pause_seconds{domain=\"web\",quantile=\"1\"} 0.04
",
    "remus_epoch_ack_latency_seconds{domain=\"web\",quantile=\"0.5\"} 0.0012
remus_epoch_ack_latency_seconds{domain=\"web\",quantile=\"0.99\"} 0.0034
",
    "remus_epoch_output_commit_delay_seconds{domain=\"web\",quantile=\"0.5\"} 0.03
remus_epoch_output_commit_delay_seconds{domain=\"web\",quantile=\"0.99\"} 0.0615
",
    "remus_last_epoch{domain=\"web\"} 811
",
    "# TYPE remus_unprotected_seconds counter
# UNIT remus_unprotected_seconds seconds
remus_unprotected_seconds_total{domain=\"web\"} 3.5
remus_unprotected_seconds_total{domain=\"db\"} 0.0
",
    "# TYPE remus_unprotected_now gauge
remus_unprotected_now{domain=\"web\"} 0
",
    "# TYPE remus_lease_requests counter
remus_lease_requests_total{backend=\"etcd\",op=\"renew\",result=\"ok\"} 900
remus_lease_requests_total{backend=\"etcd\",op=\"renew\",result=\"denied\"} 0
remus_lease_requests_total{backend=\"etcd\",op=\"renew\",result=\"failed\"} 2
",
    "# TYPE remus_lease_request_time_seconds counter
# UNIT remus_lease_request_time_seconds seconds
remus_lease_request_time_seconds_total{backend=\"etcd\",op=\"renew\"} 1.8
",
    "remus_lease_request_max_seconds{backend=\"etcd\",op=\"renew\"} 0.041
",
    "# TYPE remus_heartbeat_dropped counter
remus_heartbeat_dropped_total{peer=\"beta\",reason=\"bad_tag\"} 7
remus_heartbeat_dropped_total{peer=\"beta\",reason=\"malformed\"} 0
remus_heartbeat_dropped_total{peer=\"beta\",reason=\"unknown_node\"} 0
remus_heartbeat_dropped_total{peer=\"beta\",reason=\"replayed\"} 2
",
    "# TYPE remus_replication_handshakes_refused counter
remus_replication_handshakes_refused_total 3
",
    "# TYPE remus_replication_connections_shed counter
remus_replication_connections_shed_total 468
",
    "remus_last_epoch_pause_seconds{domain=\"web\"} 0.0095
",
    "remus_last_epoch_stop_seconds{domain=\"web\"} 0.0015
",
    "remus_last_epoch_capture_seconds{domain=\"web\"} 0.00425
",
    "remus_last_epoch_disk_barrier_seconds{domain=\"web\"} 0.000125
",
    "remus_last_epoch_device_save_seconds{domain=\"web\"} 0.003
",
    "remus_last_epoch_ack_latency_seconds{domain=\"web\"} 0.0024
",
    "remus_last_epoch_output_commit_delay_seconds{domain=\"web\"} 0.025
",
    "remus_last_epoch_dirty_pages{domain=\"web\"} 1234
",
    "# TYPE remus_last_epoch_page_raw_bytes gauge
# UNIT remus_last_epoch_page_raw_bytes bytes
remus_last_epoch_page_raw_bytes{domain=\"web\"} 5054464
",
    "remus_last_epoch_page_encoded_bytes{domain=\"web\"} 1200000
",
    "remus_last_epoch_device_bytes{domain=\"web\"} 65536
",
    "remus_last_failover_timestamp_seconds{domain=\"db\"} 1700000000.5
",
    "remus_last_failover_detection_seconds{domain=\"db\"} 0.52
",
    "remus_last_failover_fencing_seconds{domain=\"db\"} 0.035
",
    "remus_last_failover_activation_seconds{domain=\"db\"} 0.78
",
    "remus_resyncs_total{domain=\"web\"} 1
",
    "# TYPE remus_resync_copied_bytes counter
# UNIT remus_resync_copied_bytes bytes
remus_resync_copied_bytes_total{domain=\"web\"} 1048576
",
    "remus_resync_zero_bytes_total{domain=\"web\"} 4096
",
    "remus_alarms{domain=\"web\"} 0
remus_alarms{domain=\"db\"} 1
remus_alarms{domain=\"idle\"} 0
",
    // lease only where the domain fences with a witness
    "# TYPE remus_lease_held gauge
remus_lease_held{domain=\"web\"} 1
# EOF
",
];

#[test]
fn exposition_of_a_representative_snapshot() {
    let text = render(&sample_status());
    for block in BLOCKS {
        assert!(
            text.contains(block),
            "missing block:\n{block}\n--- in ---\n{text}"
        );
    }
    assert!(text.ends_with("# EOF\n"));
    // every family is named remus_*, declared once, with HELP and TYPE
    let mut declared = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(name.starts_with("remus_"), "{line}");
            assert!(
                !declared.contains(&name.to_string()),
                "{name} declared twice"
            );
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no HELP"
            );
            declared.push(name.to_string());
        } else if !line.starts_with('#') {
            assert!(line.starts_with("remus_"), "{line}");
        }
    }
    assert_eq!(declared.len(), 55, "{declared:?}");
    // absent sources give no series rather than a misleading zero
    for absent in [
        "remus_last_acked_epoch{domain=\"db\"}",
        "remus_committed_epoch{domain=\"web\"}",
        "remus_epoch_pause_seconds{domain=\"db\"",
        "remus_last_failover_detection_seconds{domain=\"web\"}",
        "remus_lease_held{domain=\"db\"}",
        "remus_verify_last_differing_regions{domain=\"web\"}",
    ] {
        assert!(!text.contains(absent), "{absent} should be absent");
    }
}

#[test]
fn peer_states_and_label_escaping() {
    // (liveness, the one state set to 1, links_up, whether links configured is reported)
    let cases = [
        (PeerLiveness::Starting, "starting", 0, false),
        (PeerLiveness::Suspect, "suspect", 0, false),
        (
            PeerLiveness::Lost {
                detected_after_ms: 500,
            },
            "lost",
            0,
            false,
        ),
        (
            PeerLiveness::Alive {
                links_up: 2,
                links_total: 2,
            },
            "alive",
            2,
            true,
        ),
    ];
    for (liveness, state, links_up, configured) in cases {
        let mut s = sample_status();
        s.peer_liveness = liveness;
        s.peer = "be\"ta".into();
        let text = render(&s);
        for st in ["starting", "alive", "suspect", "lost"] {
            let line = format!(
                "remus_peer_liveness{{peer=\"be\\\"ta\",state=\"{st}\"}} {}",
                u8::from(st == state)
            );
            assert!(text.contains(&line), "{state}: missing {line}\n{text}");
        }
        assert!(text.contains(&format!(
            "remus_peer_links_up{{peer=\"be\\\"ta\"}} {links_up}\n"
        )));
        assert_eq!(
            text.contains("remus_peer_links{peer="),
            configured,
            "{state}"
        );
    }
}

/// One HTTP/1.1 exchange over a plain TCP socket: (status line, headers, body).
fn get(addr: SocketAddr, method: &str, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (
        status.to_string(),
        headers.to_ascii_lowercase(),
        body.to_string(),
    )
}

#[test]
fn http_scrape_over_tcp() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(MetricsServer::bind("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = rt.spawn(server.run(Stub::new(), async {
        let _ = stopped.await;
    }));

    let (status, headers, body) = get(addr, "GET", "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains(&format!("content-type: {CONTENT_TYPE_OPENMETRICS}")),
        "{headers}"
    );
    assert_eq!(
        body,
        render(&sample_status()),
        "the scrape is the rendered snapshot"
    );
    assert!(body.contains("remus_checkpoints_total{domain=\"web\"} 801\n"));

    let (status, _, body) = get(addr, "GET", "/other");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    assert_eq!(body, "/other not found: the metrics are at /metrics\n");

    let (status, headers, _) = get(addr, "POST", "/metrics");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert!(headers.contains("allow: get, head"), "{headers}");

    stop.send(()).unwrap();
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), task).await })
        .unwrap()
        .unwrap();
    let refused = TcpStream::connect(addr).unwrap_err();
    assert_eq!(
        refused.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "port closed after shutdown"
    );
}

#[test]
fn serve_metrics_serves_until_shutdown_and_reports_a_taken_address() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A port that is free now (taken, read, released); the exporter then binds it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = rt.spawn(serve_metrics(addr, Stub::new(), async {
        let _ = stopped.await;
    }));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "exporter never listened on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, _, body) = get(addr, "GET", "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("remus_domain_role{domain=\"db\",role=\"backup\"} 1\n"));

    // a second exporter on the same address fails with a message naming it
    let second = rt
        .block_on(serve_metrics(addr, Stub::new(), std::future::pending()))
        .unwrap_err();
    assert!(
        second
            .to_string()
            .starts_with(&format!("metrics exporter: bind {addr}: ")),
        "{second}"
    );

    stop.send(()).unwrap();
    rt.block_on(task).unwrap().unwrap();
}
