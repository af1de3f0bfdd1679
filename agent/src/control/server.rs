//! The daemon's side of the control socket.
//!
//! [`ControlServer::bind`] takes the socket path (replacing a stale socket, refusing one a
//! live daemon answers on), [`ControlServer::run`] accepts connections until `shutdown`
//! resolves, then removes the socket file. Each connection is its own task reading one
//! request per line and writing one response per line, in order; a client may pipeline.
//!
//! Bad input never ends the server and never goes unanswered:
//! - a line that is not JSON: `Response::Error` "invalid JSON …" with serde's line/column;
//! - JSON that is not a known request: "not a valid request …" (names the unknown variant
//!   or the missing field);
//! - a line longer than [`MAX_LINE`]: answered with an error, then the connection is closed,
//!   because the rest of that line cannot be told apart from a next request.
//!
//! The server never cancels a handler call: each runs in its own task, so a client that
//! disconnects (or a server that shuts down) mid-switchover does not abandon the switchover.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tracing::{debug, info, info_span, warn, Instrument};

use super::{describe, read_line, ControlError, LineRead};
use crate::api::{ControlHandler, Request, Response, MAX_LINE};

/// Connections served at once; more are answered with an error and closed. The socket is
/// root's only, so this guards against a runaway script, not an attacker.
pub const MAX_CONNECTIONS: usize = 64;

/// How long binding waits for an answer from whatever holds the path already.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A bound control socket, not yet serving.
#[derive(Debug)]
pub struct ControlServer {
    /// Accepts the clients.
    listener: UnixListener,
    /// Removes the socket file when the server ends, however it ends.
    file: SocketFile,
}

/// The socket file this server created, identified by device and inode so that the server
/// only ever removes its own file (never a successor's that took over the path).
#[derive(Debug)]
struct SocketFile {
    /// The path clients connect to.
    path: PathBuf,
    /// `(st_dev, st_ino)` of the file as bound.
    id: (u64, u64),
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), error = %e, "control socket: cannot remove");
                }
            }
            _ => {}
        }
    }
}

/// Binds `path` and serves `handler` on it until `shutdown` resolves; the socket file is
/// removed on return.
///
/// # Errors
/// See [`ControlServer::bind`]; serving itself only fails on nothing (accept errors are
/// logged and retried).
pub async fn serve(
    path: &Path,
    handler: Arc<dyn ControlHandler>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControlError> {
    ControlServer::bind(path)
        .await?
        .run(handler, shutdown)
        .await
}

impl ControlServer {
    /// Takes `path` for this daemon: probes what is there (a socket nobody answers on is a
    /// crashed daemon's and is removed; one that answers is a live daemon's and is left
    /// alone), creates the parent directory if missing, binds under a temporary name,
    /// restricts it to 0600 and links it into place, so the socket is never reachable with
    /// looser permissions and never replaces a socket that appeared meanwhile.
    ///
    /// # Errors
    /// [`ControlError::AlreadyServing`] when something answers on `path` (or takes it while
    /// binding), [`ControlError::NotASocket`] when `path` is another kind of file,
    /// [`ControlError::Io`] for file-system failures.
    pub async fn bind(path: &Path) -> Result<Self, ControlError> {
        let io_err = |op: &'static str| {
            move |source: io::Error| ControlError::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
                    Ok(Ok(_)) | Err(_) => {
                        return Err(ControlError::AlreadyServing {
                            path: path.to_path_buf(),
                        })
                    }
                    Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        info!(path = %path.display(), "control socket: removing a stale socket nobody answers on");
                        match std::fs::remove_file(path) {
                            Ok(()) => {}
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => return Err(io_err("remove stale socket")(e)),
                        }
                    }
                    Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
                    Ok(Err(e)) => return Err(io_err("probe the existing socket")(e)),
                }
            }
            Ok(_) => {
                return Err(ControlError::NotASocket {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("stat")(e)),
        }

        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(io_err("create the parent directory"))?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "remusd.sock".to_string());
        let temp = parent.join(format!(".{file_name}.{}.bind", std::process::id()));
        let _ = std::fs::remove_file(&temp);

        let listener = UnixListener::bind(&temp).map_err(io_err("bind"))?;
        let placed = std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod 0600"))
            .and_then(|()| {
                // link(2) fails if the path exists: a daemon that bound it since the probe
                // keeps it.
                std::fs::hard_link(&temp, path).map_err(|e| {
                    if e.kind() == io::ErrorKind::AlreadyExists {
                        ControlError::AlreadyServing {
                            path: path.to_path_buf(),
                        }
                    } else {
                        io_err("link into place")(e)
                    }
                })
            });
        let _ = std::fs::remove_file(&temp);
        placed?;
        let m = std::fs::symlink_metadata(path).map_err(io_err("stat after bind"))?;
        info!(path = %path.display(), "control socket: listening");
        Ok(ControlServer {
            listener,
            file: SocketFile {
                path: path.to_path_buf(),
                id: (m.dev(), m.ino()),
            },
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Serves connections until `shutdown` resolves, then closes every connection and
    /// removes the socket file (handler calls already started run to completion on their
    /// own).
    ///
    /// # Errors
    /// None today: accept failures (e.g. out of file descriptors) are logged and retried
    /// after a short pause. The `Result` leaves room for failures worth stopping for.
    pub async fn run(
        self,
        handler: Arc<dyn ControlHandler>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ControlError> {
        let mut connections = JoinSet::new();
        let mut next_id: u64 = 0;
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        next_id += 1;
                        if connections.len() >= MAX_CONNECTIONS {
                            warn!(limit = MAX_CONNECTIONS, "control socket: too many connections; refusing one");
                            connections.spawn(refuse(stream));
                            continue;
                        }
                        let span = info_span!("control_conn", conn = next_id);
                        connections.spawn(connection(stream, handler.clone(), next_id).instrument(span));
                    }
                    Err(e) => {
                        warn!(path = %self.file.path.display(), error = %e, "control socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                Some(done) = connections.join_next(), if !connections.is_empty() => {
                    if let Err(e) = done {
                        if e.is_panic() {
                            warn!(error = %e, "control connection task panicked");
                        }
                    }
                }
            }
        }
        connections.abort_all();
        while connections.join_next().await.is_some() {}
        info!(path = %self.file.path.display(), "control socket: closed");
        Ok(())
        // `self.file` drops here and removes the socket file.
    }
}

/// Answers a connection over [`MAX_CONNECTIONS`] with one error line and closes it.
async fn refuse(mut stream: UnixStream) {
    let response = Response::Error {
        message: format!(
            "remusd: too many control connections (limit {MAX_CONNECTIONS}); try again"
        ),
    };
    let _ = write_response(&mut stream, &response).await;
}

/// Serves one connection: a request per line, a response per line, in order.
async fn connection(stream: UnixStream, handler: Arc<dyn ControlHandler>, id: u64) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    let mut seq: u64 = 0;
    loop {
        let response = match read_line(&mut reader, &mut line, MAX_LINE).await {
            Err(e) => {
                debug!(error = %e, "control connection: read failed");
                return;
            }
            Ok(LineRead::Eof) => return,
            Ok(LineRead::TooLong) => {
                let response = Response::Error {
                    message: format!(
                        "control: request line longer than {MAX_LINE} bytes; closing the connection"
                    ),
                };
                warn!("control connection: over-long request line; closing");
                let _ = write_response(&mut write, &response).await;
                return;
            }
            Ok(LineRead::Line) => {
                seq += 1;
                match parse_request(&line) {
                    Err(e) => {
                        let message = e.to_string();
                        warn!(conn = id, %message, "control: bad request");
                        Response::Error { message }
                    }
                    Ok(request) => {
                        let what = describe(&request);
                        let span = info_span!("control_request", conn = id, seq, request = %what);
                        answer(request, &handler).instrument(span).await
                    }
                }
            }
        };
        if let Err(e) = write_response(&mut write, &response).await {
            debug!(error = %e, "control connection: write failed");
            return;
        }
    }
}

/// Why a request line is refused. Its message is what the client gets back, so it names the
/// operation ("control: bad request") and keeps serde's line and column.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadRequest {
    /// The line is not UTF-8, so it cannot be JSON.
    #[error("control: bad request: not UTF-8 ({0})")]
    NotUtf8(#[source] std::str::Utf8Error),
    /// The line holds only white space.
    #[error("control: bad request: empty line")]
    Empty,
    /// The line is not JSON at all (syntax error or truncated).
    #[error("control: bad request: invalid JSON: {0}")]
    InvalidJson(#[source] serde_json::Error),
    /// The line is JSON but not a known request (unknown variant, missing field, …).
    #[error("control: bad request: not a valid request: {0}")]
    NotARequest(#[source] serde_json::Error),
}

/// Parses one request line.
///
/// # Errors
/// [`BadRequest`], whose message is sent back to the client.
pub(crate) fn parse_request(line: &[u8]) -> Result<Request, BadRequest> {
    let text = std::str::from_utf8(line).map_err(BadRequest::NotUtf8)?;
    if text.trim().is_empty() {
        return Err(BadRequest::Empty);
    }
    serde_json::from_str::<Request>(text).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => BadRequest::NotARequest(e),
        _ => BadRequest::InvalidJson(e),
    })
}

/// Hands a parsed request to the daemon in a task of its own (never cancelled by us) and
/// waits for the answer.
async fn answer(request: Request, handler: &Arc<dyn ControlHandler>) -> Response {
    let what = describe(&request);
    let is_status = matches!(request, Request::Status);
    if is_status {
        debug!("control: status requested");
    } else {
        info!("control: command received");
    }
    let handler = handler.clone();
    let task = tokio::spawn(
        async move {
            match request {
                Request::Status => Response::Status(handler.status().await),
                command => handler.command(command).await,
            }
        }
        .in_current_span(),
    );
    let response = match task.await {
        Ok(r) => r,
        Err(e) => Response::Error {
            message: format!("remusd: the {what} request failed inside the daemon: {e}"),
        },
    };
    match &response {
        Response::Done { message } if !is_status => info!(%message, "control: command done"),
        Response::Error { message } => warn!(%message, "control: request refused or failed"),
        _ => {}
    }
    response
}

/// Writes one response line, replacing an answer too long for the protocol by an error.
async fn write_response<W>(writer: &mut W, response: &Response) -> io::Result<()>
where
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut bytes = encode_response(response);
    if bytes.len() > MAX_LINE {
        warn!(
            bytes = bytes.len(),
            "control: answer exceeds the line limit; sending an error instead"
        );
        bytes = encode_response(&Response::Error {
            message: format!(
                "remusd: the answer ({} bytes) exceeds the control protocol's line limit of {MAX_LINE} bytes",
                bytes.len()
            ),
        });
    }
    bytes.push(b'\n');
    writer.write_all(&bytes).await?;
    writer.flush().await
}

fn encode_response(response: &Response) -> Vec<u8> {
    serde_json::to_vec(response).unwrap_or_else(|e| {
        // Only non-string map keys or failing Serialize impls can get here; none exist in
        // the api types, but an answer is still owed.
        serde_json::to_vec(&Response::Error {
            message: format!("remusd: cannot encode the answer: {e}"),
        })
        .unwrap_or_else(|_| {
            br#"{"response":"error","message":"remusd: cannot encode the answer"}"#.to_vec()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_request_table() {
        // (line, Ok(request) or Err(fragment of the message))
        let cases: &[(&str, Result<Request, &str>)] = &[
            (r#"{"request":"status"}"#, Ok(Request::Status)),
            (
                r#"{"request":"switchover","domain":"web"}"#,
                Ok(Request::Switchover {
                    domain: "web".into(),
                }),
            ),
            (
                r#"  {"domain":"db","request":"test_activate"}  "#,
                Ok(Request::TestActivate { domain: "db".into() }),
            ),
            (r#"{"request":"status""#, Err("invalid JSON: EOF while parsing an object at line 1 column 19")),
            ("xyz", Err("invalid JSON: expected value at line 1 column 1")),
            (r#"{"request":"reboot"}"#, Err("not a valid request: unknown variant `reboot`, expected one of `status`, `start`, `switchover`, `failover`, `test_activate`, `domain_config`, `verify`, `reload` at line 1 column 19")),
            (r#"{"request":"reload"}"#, Ok(Request::Reload)),
            (
                r#"{"request":"domain_config","domain":"web"}"#,
                Ok(Request::DomainConfig {
                    domain: "web".into(),
                }),
            ),
            (r#"{"request":"start"}"#, Err("not a valid request: missing field `domain`")),
            (r#"{"domain":"web"}"#, Err("not a valid request: missing field `request`")),
            ("", Err("empty line")),
        ];
        for (line, expected) in cases {
            let got = parse_request(line.as_bytes());
            match (expected, &got) {
                (Ok(want), Ok(have)) => assert_eq!(want, have, "{line}"),
                (Err(fragment), Err(e)) => {
                    let message = e.to_string();
                    assert!(
                        message.starts_with("control: bad request: "),
                        "{line}: {message}"
                    );
                    assert!(message.contains(fragment), "{line}: {message}")
                }
                _ => panic!("{line}: expected {expected:?}, got {got:?}"),
            }
        }
        let bad = parse_request(&[0xff, 0xfe]).unwrap_err().to_string();
        assert!(bad.contains("not UTF-8"), "{bad}");
    }
}
