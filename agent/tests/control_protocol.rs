//! The control socket end to end: the real server and client over a real Unix socket, with a
//! stub daemon behind them. Each test uses its own temporary directory, so parallel runs
//! never share a socket.

mod control_support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use control_support::{sample_status, Stub, TOGETHER};
use remus_agent::api::{ControlHandler, Request, Response, MAX_LINE};
use remus_agent::control::{ControlClient, ControlError, ControlServer};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Bounds every wait of these tests: a hung server fails the test instead of hanging CI.
const LIMIT: Duration = Duration::from_secs(20);

/// A running server; dropping it without `stop` aborts the task (the socket file is still
/// removed by the server's own drop guard).
struct Running {
    dir: tempfile::TempDir,
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ControlError>>,
}

impl Running {
    async fn start(handler: Arc<dyn ControlHandler>) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("remusd.sock");
        Self::start_at(dir, path, handler).await
    }

    async fn start_at(
        dir: tempfile::TempDir,
        path: PathBuf,
        handler: Arc<dyn ControlHandler>,
    ) -> Running {
        let server = ControlServer::bind(&path).await.unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(handler, async {
            let _ = rx.await;
        }));
        Running {
            dir,
            path,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = &mut self.task;
        tokio::time::timeout(LIMIT, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(path: &Path) -> ControlClient {
    ControlClient::connect(path).await.unwrap()
}

/// A raw connection, for lines no client would send.
async fn raw(
    path: &Path,
) -> (
    BufReader<tokio::net::unix::OwnedReadHalf>,
    tokio::net::unix::OwnedWriteHalf,
) {
    let (r, w) = UnixStream::connect(path).await.unwrap().into_split();
    (BufReader::new(r), w)
}

async fn answer(reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Option<Response> {
    let mut line = String::new();
    let n = tokio::time::timeout(LIMIT, reader.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    (n > 0).then(|| serde_json::from_str(&line).unwrap())
}

fn error_message(r: Option<Response>) -> String {
    match r {
        Some(Response::Error { message }) => message,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn status_round_trip_and_socket_lifecycle() {
    let stub = Stub::new();
    let server = Running::start(stub.clone()).await;
    let meta = std::fs::metadata(&server.path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "socket must be root's only"
    );
    // no temporary bind name left behind
    let names: Vec<_> = std::fs::read_dir(server.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("remusd.sock")]);

    let mut client = connect(&server.path).await;
    let status = client.status().await.unwrap();
    assert_eq!(
        serde_json::to_value(&status).unwrap(),
        serde_json::to_value(sample_status()).unwrap()
    );
    // the same connection serves a second request
    let again = client.status().await.unwrap();
    assert_eq!(again.domains.len(), 3);
    assert!(
        stub.commands.lock().unwrap().is_empty(),
        "status must not reach command()"
    );

    let path = server.path.clone();
    server.stop().await;
    assert!(!path.exists(), "socket file removed on shutdown");
}

#[tokio::test]
async fn commands_answered_in_order_on_one_connection() {
    let stub = Stub::new();
    let server = Running::start(stub.clone()).await;
    let mut client = connect(&server.path).await;
    // (request, Ok(done message) | Err(error message))
    let cases: Vec<(Request, Result<&str, &str>)> = vec![
        (
            Request::Start {
                domain: "idle".into(),
                older_copy: false,
            },
            Ok("idle: started on alpha, protection to beta pending"),
        ),
        (
            Request::Start {
                domain: "web".into(),
                older_copy: false,
            },
            Err("start web: refused: role is not stopped"),
        ),
        (
            Request::Switchover {
                domain: "web".into(),
            },
            Ok("web: primary role handed to beta at epoch 812"),
        ),
        (
            Request::Failover {
                domain: "db".into(),
            },
            Ok("db: activated from checkpoint 300"),
        ),
        (
            Request::Failover {
                domain: "web".into(),
            },
            Err("failover web: refused: this node is not the backup"),
        ),
        (
            Request::TestActivate {
                domain: "db".into(),
            },
            Ok("db: test activation passed"),
        ),
    ];
    for (request, expected) in &cases {
        let got = client.request(request.clone()).await.unwrap();
        match (expected, got) {
            (Ok(want), Response::Done { message }) => assert_eq!(&message, want),
            (Err(want), Response::Error { message }) => assert_eq!(&message, want),
            (want, got) => panic!("{request:?}: expected {want:?}, got {got:?}"),
        }
    }
    let seen = stub.commands.lock().unwrap().clone();
    assert_eq!(
        seen,
        cases.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>()
    );
    server.stop().await;
}

#[tokio::test]
async fn malformed_and_unknown_lines_are_answered_and_the_connection_stays_usable() {
    let server = Running::start(Stub::new()).await;
    let (mut r, mut w) = raw(&server.path).await;
    // (line sent, fragments the error must contain)
    let cases: &[(&str, &[&str])] = &[
        (
            "xyz",
            &["invalid JSON", "expected value at line 1 column 1"],
        ),
        (
            r#"{"request":"status""#,
            &[
                "invalid JSON",
                "EOF while parsing an object at line 1 column 19",
            ],
        ),
        (
            r#"{"request":"reboot","domain":"web"}"#,
            &[
                "not a valid request",
                "unknown variant `reboot`",
                "line 1 column 19",
            ],
        ),
        (
            r#"{"request":"failover"}"#,
            &["not a valid request", "missing field `domain`"],
        ),
        ("", &["empty line"]),
    ];
    for (line, fragments) in cases {
        w.write_all(format!("{line}\n").as_bytes()).await.unwrap();
        let message = error_message(answer(&mut r).await);
        for f in *fragments {
            assert!(message.contains(f), "{line:?}: {message:?} lacks {f:?}");
        }
    }
    // still usable: a valid request on the same connection
    w.write_all(b"{\"request\":\"status\"}\n").await.unwrap();
    assert!(matches!(answer(&mut r).await, Some(Response::Status(_))));
    // pipelined requests are answered in order
    w.write_all(b"{\"request\":\"test_activate\",\"domain\":\"a\"}\n{\"request\":\"test_activate\",\"domain\":\"b\"}\n")
        .await
        .unwrap();
    for d in ["a", "b"] {
        match answer(&mut r).await {
            Some(Response::Done { message }) => {
                assert_eq!(message, format!("{d}: test activation passed"))
            }
            other => panic!("{other:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn over_long_line_is_answered_then_the_connection_closed() {
    let server = Running::start(Stub::new()).await;
    let (mut r, mut w) = raw(&server.path).await;
    let writer = tokio::spawn(async move {
        let mut big = vec![b'a'; MAX_LINE + 1];
        big.push(b'\n');
        // the server may close before reading it all; only the answer matters
        let _ = w.write_all(&big).await;
        w
    });
    let message = error_message(answer(&mut r).await);
    assert!(
        message.contains(&format!("longer than {MAX_LINE} bytes")),
        "{message}"
    );
    assert!(
        answer(&mut r).await.is_none(),
        "connection closed after an over-long line"
    );
    drop(writer.await.unwrap());
    // the server itself goes on
    assert_eq!(
        connect(&server.path).await.status().await.unwrap().node,
        "alpha"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_line_of_exactly_max_line_bytes_is_parsed_not_refused_for_length() {
    let server = Running::start(Stub::new()).await;
    let (mut r, mut w) = raw(&server.path).await;
    // valid JSON padded with spaces to exactly MAX_LINE bytes
    let mut line = br#"{"request":"status"}"#.to_vec();
    line.resize(MAX_LINE, b' ');
    line.push(b'\n');
    let writer = tokio::spawn(async move { w.write_all(&line).await.map(|()| w) });
    assert!(matches!(answer(&mut r).await, Some(Response::Status(_))));
    writer.await.unwrap().unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_served_concurrently() {
    let stub = Stub::new();
    let server = Running::start(stub.clone()).await;
    // TOGETHER commands that can only finish once all of them are inside the handler at the
    // same time: a server handling connections one by one would never answer.
    let mut tasks = Vec::new();
    for _ in 0..TOGETHER {
        let path = server.path.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = ControlClient::connect(&path).await.unwrap();
            c.request(Request::TestActivate {
                domain: "together".into(),
            })
            .await
            .unwrap()
        }));
    }
    // meanwhile other clients get their status
    for _ in 0..4 {
        assert_eq!(
            connect(&server.path).await.status().await.unwrap().peer,
            "beta"
        );
    }
    for t in tasks {
        let r = tokio::time::timeout(LIMIT, t)
            .await
            .expect("requests were not served concurrently")
            .unwrap();
        assert!(
            matches!(r, Response::Done { ref message } if message == "together: all in flight at once"),
            "{r:?}"
        );
    }
    assert_eq!(stub.finished.lock().unwrap().len(), TOGETHER);
    server.stop().await;
}

#[tokio::test]
async fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("remusd.sock");
    // a crashed daemon's socket: the file exists, nobody listens
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(std::fs::symlink_metadata(&path)
        .unwrap()
        .file_type()
        .is_socket());
    match ControlClient::connect(&path).await {
        Err(e @ ControlError::NotRunning { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "no remusd listening on {}: connection refused",
                path.display()
            )
        ),
        other => panic!("{other:?}"),
    }
    let server = Running::start_at(dir, path.clone(), Stub::new()).await;
    assert_eq!(connect(&path).await.status().await.unwrap().node, "alpha");
    server.stop().await;
    assert!(!path.exists());
}

#[tokio::test]
async fn a_second_server_is_refused_while_the_first_serves() {
    let server = Running::start(Stub::new()).await;
    match ControlServer::bind(&server.path).await {
        Err(e @ ControlError::AlreadyServing { .. }) => assert_eq!(
            e.to_string(),
            format!(
                "control socket {}: another remusd is already listening there",
                server.path.display()
            )
        ),
        other => panic!("expected AlreadyServing, got {other:?}"),
    }
    // the first one was not disturbed
    assert_eq!(
        connect(&server.path).await.status().await.unwrap().node,
        "alpha"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_path_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("remusd.sock");
    std::fs::write(&path, b"precious").unwrap();
    match ControlServer::bind(&path).await {
        Err(ControlError::NotASocket { .. }) => {}
        other => panic!("expected NotASocket, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[tokio::test]
async fn missing_socket_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("remusd.sock");
    let e = ControlClient::connect(&path).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "no remusd listening on {}: no such socket (is remusd running?)",
            path.display()
        )
    );
}

#[tokio::test]
async fn timeout_leaves_the_connection_unusable_and_the_command_running() {
    let stub = Stub::new();
    let server = Running::start(stub.clone()).await;
    let mut client = connect(&server.path).await;
    let slow = Request::TestActivate {
        domain: "slow".into(),
    };
    match client
        .request_with_timeout(slow.clone(), Duration::from_millis(200))
        .await
    {
        Err(ControlError::Timeout { request, after, .. }) => {
            assert_eq!(request, "test-activate slow");
            assert_eq!(after, Duration::from_millis(200));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    match client.status().await {
        Err(ControlError::Protocol { reason, .. }) => {
            assert!(reason.contains("reconnect"), "{reason}")
        }
        other => panic!("expected the connection to be refused after a timeout, got {other:?}"),
    }
    drop(client);
    // the client is gone; the daemon's work goes on and completes when released
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(stub.finished.lock().unwrap().is_empty());
    stub.release.notify_one();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while stub.finished.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handler was cancelled with its client"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stub.finished.lock().unwrap().clone(), vec![slow]);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_does_not_cancel_a_command_in_progress() {
    let stub = Stub::new();
    let server = Running::start(stub.clone()).await;
    let path = server.path.clone();
    let pending = tokio::spawn(async move {
        let mut c = ControlClient::connect(&path).await.unwrap();
        c.request(Request::TestActivate {
            domain: "slow".into(),
        })
        .await
    });
    let deadline = tokio::time::Instant::now() + LIMIT;
    while stub.commands.lock().unwrap().is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
    // the client sees the connection closed …
    match tokio::time::timeout(LIMIT, pending).await.unwrap().unwrap() {
        Err(ControlError::Closed { request, .. }) => assert_eq!(request, "test-activate slow"),
        other => panic!("expected Closed, got {other:?}"),
    }
    // … but the daemon's command still completes
    stub.release.notify_one();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while stub.finished.lock().unwrap().is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "handler was cancelled by shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_daemon_of_another_protocol_version_is_refused_by_the_client() {
    // A hand-made daemon of a future release: only the version and the framing matter.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("future.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let fake = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut line = String::new();
        BufReader::new(r).read_line(&mut line).await.unwrap();
        w.write_all(
            b"{\"response\":\"status\",\"version\":2,\"node\":\"alpha\",\"new_field\":[]}\n",
        )
        .await
        .unwrap();
        line
    });
    let e = connect(&path).await.status().await.unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "remusd on {} speaks control protocol version 2, this remusctl speaks 1: use the remusctl of the same release as the daemon",
            path.display()
        )
    );
    assert_eq!(fake.await.unwrap(), "{\"request\":\"status\"}\n");
}

#[tokio::test]
async fn serve_binds_serves_and_cleans_up_as_the_daemon_calls_it() {
    // The daemon spawns `serve` on a multi-threaded runtime: the future must be Send.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("remusd.sock");
    let (stop, stopped) = oneshot::channel::<()>();
    let handler: Arc<dyn ControlHandler> = Stub::new();
    let task = tokio::spawn({
        let path = path.clone();
        async move {
            remus_agent::control::serve(&path, handler, async {
                let _ = stopped.await;
            })
            .await
        }
    });
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut client = loop {
        match ControlClient::connect(&path).await {
            Ok(c) => break c,
            Err(_) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "serve never listened"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    assert_eq!(client.status().await.unwrap().node, "alpha");
    stop.send(()).unwrap();
    tokio::time::timeout(LIMIT, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!path.exists());
}
