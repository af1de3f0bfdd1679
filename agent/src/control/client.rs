//! `remusctl`'s side of the control socket.
//!
//! A [`ControlClient`] is one connection; requests are sent one at a time and each waits
//! for its answer with a timeout: [`ControlClient::STATUS_TIMEOUT`] for a status (the
//! daemon builds it from memory), a caller-chosen one for commands, which may take long
//! (a switchover waits for the last checkpoint, the peer's activation and its confirmation).
//!
//! Every status answer is checked against [`CONTROL_VERSION`] before it is decoded, so a
//! daemon of another release gets a clear "speaks version N" rather than a decoding error.
//! After a timeout the connection is unusable (its answer may still arrive and would be
//! taken for the next one): further requests fail until the caller reconnects.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::{describe, read_line, ControlError, LineRead};
use crate::api::{DaemonStatus, Request, Response, CONTROL_VERSION, MAX_LINE};

/// A connection to `remusd`'s control socket.
#[derive(Debug)]
pub struct ControlClient {
    /// The socket, for error messages.
    path: PathBuf,
    /// Answers, one per line.
    reader: BufReader<OwnedReadHalf>,
    /// Requests, one per line.
    writer: OwnedWriteHalf,
    /// The last answer line (reused).
    line: Vec<u8>,
    /// Set when a request timed out or failed half-way: the stream may hold a late answer.
    broken: bool,
}

impl ControlClient {
    /// How long a status may take.
    pub const STATUS_TIMEOUT: Duration = Duration::from_secs(5);
    /// Default for commands: a switchover of a busy guest must fit.
    pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
    /// How long connecting may take.
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Connects to the daemon's socket.
    ///
    /// # Errors
    /// [`ControlError::NotRunning`] when no socket exists or nobody accepts on it ("no remusd
    /// listening on /run/remus/remusd.sock: connection refused"),
    /// [`ControlError::PermissionDenied`] when this user may not use it, [`ControlError::Timeout`]
    /// when the daemon does not accept in time, [`ControlError::Io`] otherwise.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, ControlError> {
        let path = path.as_ref().to_path_buf();
        let stream =
            match tokio::time::timeout(Self::CONNECT_TIMEOUT, UnixStream::connect(&path)).await {
                Err(_) => {
                    return Err(ControlError::Timeout {
                        path,
                        request: "connect".to_string(),
                        after: Self::CONNECT_TIMEOUT,
                    })
                }
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(connect_error(path, e)),
            };
        let (read, writer) = stream.into_split();
        Ok(ControlClient {
            path,
            reader: BufReader::new(read),
            writer,
            line: Vec::new(),
            broken: false,
        })
    }

    /// The socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The daemon's status snapshot.
    ///
    /// # Errors
    /// Transport errors as for [`Self::request_with_timeout`];
    /// [`ControlError::VersionMismatch`] for a daemon of another protocol version;
    /// [`ControlError::Protocol`] when the daemon answers something other than a status.
    pub async fn status(&mut self) -> Result<DaemonStatus, ControlError> {
        match self.request(Request::Status).await? {
            Response::Status(status) => Ok(status),
            Response::Error { message } => Err(ControlError::Protocol {
                path: self.path.clone(),
                request: "status".to_string(),
                reason: format!("the daemon answered with an error: {message}"),
            }),
            Response::Done { .. } | Response::DomainConfig(_) | Response::Verified(_) => {
                Err(ControlError::Protocol {
                    path: self.path.clone(),
                    request: "status".to_string(),
                    reason: "the daemon answered something other than a status".to_string(),
                })
            }
        }
    }

    /// Sends `request` with the default timeout of its kind ([`Self::STATUS_TIMEOUT`] for a
    /// status, [`Self::COMMAND_TIMEOUT`] for commands).
    ///
    /// # Errors
    /// As [`Self::request_with_timeout`].
    pub async fn request(&mut self, request: Request) -> Result<Response, ControlError> {
        let timeout = match request {
            Request::Status => Self::STATUS_TIMEOUT,
            _ => Self::COMMAND_TIMEOUT,
        };
        self.request_with_timeout(request, timeout).await
    }

    /// Sends `request` and waits at most `timeout` for its answer. A daemon's refusal is an
    /// `Ok(Response::Error)`: only transport and protocol failures are errors here.
    ///
    /// # Errors
    /// [`ControlError::Timeout`], [`ControlError::Closed`] (the daemon hung up),
    /// [`ControlError::Protocol`] (an unreadable or over-long answer, or a connection left
    /// unusable by an earlier failure), [`ControlError::VersionMismatch`],
    /// [`ControlError::Io`].
    pub async fn request_with_timeout(
        &mut self,
        request: Request,
        timeout: Duration,
    ) -> Result<Response, ControlError> {
        let what = describe(&request);
        if self.broken {
            return Err(self.protocol(
                &what,
                "the connection is unusable after an earlier failure; reconnect".to_string(),
            ));
        }
        self.broken = true;
        let mut bytes = serde_json::to_vec(&request)
            .map_err(|e| self.protocol(&what, format!("cannot encode the request: {e}")))?;
        bytes.push(b'\n');
        let path = self.path.clone();
        let exchange = async {
            self.writer
                .write_all(&bytes)
                .await
                .map_err(|source| ControlError::Io {
                    path: path.clone(),
                    op: "send request",
                    source,
                })?;
            read_line(&mut self.reader, &mut self.line, MAX_LINE)
                .await
                .map_err(|source| ControlError::Io {
                    path: path.clone(),
                    op: "read answer",
                    source,
                })
        };
        let read = match tokio::time::timeout(timeout, exchange).await {
            Err(_) => {
                return Err(ControlError::Timeout {
                    path,
                    request: what,
                    after: timeout,
                })
            }
            Ok(r) => r?,
        };
        match read {
            LineRead::Eof => Err(ControlError::Closed {
                path,
                request: what,
            }),
            LineRead::TooLong => {
                Err(self.protocol(&what, format!("answer longer than {MAX_LINE} bytes")))
            }
            LineRead::Line => {
                let response =
                    decode_response(&self.line).map_err(|e| self.version_or_protocol(&what, e))?;
                self.broken = false;
                Ok(response)
            }
        }
    }

    fn protocol(&self, what: &str, reason: String) -> ControlError {
        ControlError::Protocol {
            path: self.path.clone(),
            request: what.to_string(),
            reason,
        }
    }

    fn version_or_protocol(&self, what: &str, e: DecodeError) -> ControlError {
        match e {
            DecodeError::Version(daemon) => ControlError::VersionMismatch {
                path: self.path.clone(),
                daemon,
                client: CONTROL_VERSION,
            },
            DecodeError::Invalid(reason) => self.protocol(what, reason),
        }
    }
}

/// Why an answer line could not be used.
#[derive(Debug)]
enum DecodeError {
    /// A status of another protocol version.
    Version(u64),
    /// Not a response.
    Invalid(String),
}

/// Decodes an answer; a status is version-checked before its body is decoded.
fn decode_response(line: &[u8]) -> Result<Response, DecodeError> {
    let value: serde_json::Value = serde_json::from_slice(line)
        .map_err(|e| DecodeError::Invalid(format!("invalid JSON: {e}")))?;
    if value.get("response").and_then(|r| r.as_str()) == Some("status") {
        match value.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == u64::from(CONTROL_VERSION) => {}
            Some(v) => return Err(DecodeError::Version(v)),
            None => {
                return Err(DecodeError::Invalid(
                    "status without a protocol version".to_string(),
                ))
            }
        }
    }
    serde_json::from_value(value).map_err(|e| DecodeError::Invalid(format!("not a response: {e}")))
}

/// Turns a failed connect into the message an operator needs.
fn connect_error(path: PathBuf, e: io::Error) -> ControlError {
    match e.kind() {
        io::ErrorKind::NotFound => ControlError::NotRunning {
            path,
            reason: "no such socket (is remusd running?)".to_string(),
        },
        io::ErrorKind::ConnectionRefused => ControlError::NotRunning {
            path,
            reason: "connection refused".to_string(),
        },
        io::ErrorKind::PermissionDenied => ControlError::PermissionDenied { path },
        _ => ControlError::Io {
            path,
            op: "connect",
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_response_table() {
        // (line, Ok(kind) or Err(fragment))
        let cases: &[(&str, Result<&str, &str>)] = &[
            (r#"{"response":"done","message":"ok"}"#, Ok("done")),
            (r#"{"response":"error","message":"no"}"#, Ok("error")),
            (
                r#"{"response":"status","version":99,"node":"a"}"#,
                Err("version 99"),
            ),
            (
                r#"{"response":"status","node":"a"}"#,
                Err("without a protocol version"),
            ),
            (
                r#"{"response":"status","version":1,"node":"a"}"#,
                Err("not a response: missing field"),
            ),
            (
                r#"{"response":"maybe"}"#,
                Err("not a response: unknown variant `maybe`"),
            ),
            ("{", Err("invalid JSON")),
        ];
        for (line, expected) in cases {
            let got = decode_response(line.as_bytes());
            match (expected, got) {
                (Ok("done"), Ok(Response::Done { .. }))
                | (Ok("error"), Ok(Response::Error { .. })) => {}
                (Err(fragment), Err(DecodeError::Version(v))) => {
                    assert!(format!("version {v}").contains(fragment), "{line}")
                }
                (Err(fragment), Err(DecodeError::Invalid(reason))) => {
                    assert!(reason.contains(fragment), "{line}: {reason}")
                }
                (want, got) => panic!("{line}: expected {want:?}, got {got:?}"),
            }
        }
    }
}
