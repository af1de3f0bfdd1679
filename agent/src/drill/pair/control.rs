//! A minimal client of a daemon's control socket, for the pair drill's observer.
//!
//! One connection per call: the drill restarts and kills daemons, and a fresh connection per
//! request never leaves a half-read line from a dead daemon behind. Every call is bounded by
//! a timeout, because a daemon that accepts and never answers must show up in the drill as
//! "unreachable" (unknown state), not hang the observer.
//!
//! The protocol is [`crate::api`]: one JSON [`Request`] line, one JSON [`Response`] line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::api::{DaemonStatus, Request, Response, CONTROL_VERSION, MAX_LINE};

/// Why a control call got no usable answer.
#[derive(Debug, Error)]
pub enum CallError {
    /// Nobody answers on the socket (daemon down, or not yet listening).
    #[error("control socket {path}: connect: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The exchange failed half-way.
    #[error("control socket {path}: {op}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// No answer within the timeout.
    #[error("control socket {path}: no answer to {request} within {timeout:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The request's name.
        request: &'static str,
        /// The timeout.
        timeout: Duration,
    },
    /// The daemon closed the connection without answering.
    #[error("control socket {path}: closed without an answer to {request}")]
    Closed {
        /// The socket.
        path: PathBuf,
        /// The request's name.
        request: &'static str,
    },
    /// The answer is not a [`Response`] line.
    #[error("control socket {path}: answer to {request} is not a response: {reason}")]
    BadAnswer {
        /// The socket.
        path: PathBuf,
        /// The request's name.
        request: &'static str,
        /// Why.
        reason: String,
    },
    /// A status of another protocol version, or another answer than a status.
    #[error("control socket {path}: {reason}")]
    Unexpected {
        /// The socket.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// A daemon's control socket.
#[derive(Clone, Debug)]
pub struct Control {
    path: PathBuf,
}

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Status => "status",
        Request::Start { .. } => "start",
        Request::Switchover { .. } => "switchover",
        Request::Failover { .. } => "failover",
        Request::TestActivate { .. } => "test-activate",
    }
}

impl Control {
    /// The socket at `path`.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
        }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `request` and reads its answer, within `timeout` for the whole exchange.
    ///
    /// # Errors
    /// See [`CallError`].
    pub async fn call(&self, request: &Request, timeout: Duration) -> Result<Response, CallError> {
        let name = request_name(request);
        match tokio::time::timeout(timeout, self.exchange(request, name)).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout {
                path: self.path.clone(),
                request: name,
                timeout,
            }),
        }
    }

    async fn exchange(&self, request: &Request, name: &'static str) -> Result<Response, CallError> {
        let io = |op| {
            let path = self.path.clone();
            move |source| CallError::Io { path, op, source }
        };
        let sock = UnixStream::connect(&self.path)
            .await
            .map_err(|source| CallError::Connect {
                path: self.path.clone(),
                source,
            })?;
        let mut sock = BufReader::new(sock);
        let mut line = serde_json::to_vec(request).map_err(|e| CallError::BadAnswer {
            path: self.path.clone(),
            request: name,
            reason: format!("request does not serialise: {e}"),
        })?;
        line.push(b'\n');
        sock.get_mut()
            .write_all(&line)
            .await
            .map_err(io("write request"))?;
        let mut answer = Vec::new();
        let n = (&mut sock)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut answer)
            .await
            .map_err(io("read answer"))?;
        if n == 0 {
            return Err(CallError::Closed {
                path: self.path.clone(),
                request: name,
            });
        }
        serde_json::from_slice(&answer).map_err(|e| CallError::BadAnswer {
            path: self.path.clone(),
            request: name,
            reason: e.to_string(),
        })
    }

    /// The daemon's status snapshot.
    ///
    /// # Errors
    /// See [`CallError`]; a daemon of another protocol version or an answer that is not a
    /// status is [`CallError::Unexpected`].
    pub async fn status(&self, timeout: Duration) -> Result<DaemonStatus, CallError> {
        match self.call(&Request::Status, timeout).await? {
            Response::Status(s) if s.version == CONTROL_VERSION => Ok(s),
            Response::Status(s) => Err(CallError::Unexpected {
                path: self.path.clone(),
                reason: format!(
                    "daemon speaks control protocol {}, this drill {CONTROL_VERSION}",
                    s.version
                ),
            }),
            Response::Done { message } | Response::Error { message } => {
                Err(CallError::Unexpected {
                    path: self.path.clone(),
                    reason: format!("status answered with a message: {message}"),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A real Unix socket server that answers each line with `answer` (or closes).
    async fn serve_once(
        path: &Path,
        answer: Option<&'static str>,
    ) -> tokio::task::JoinHandle<String> {
        let l = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let mut s = BufReader::new(s);
            let mut req = String::new();
            s.read_line(&mut req).await.unwrap();
            if let Some(a) = answer {
                s.get_mut().write_all(a.as_bytes()).await.unwrap();
                s.get_mut().write_all(b"\n").await.unwrap();
            }
            req
        })
    }

    #[tokio::test]
    async fn answers_and_failures() {
        let dir = tempfile::tempdir().unwrap();
        // (case, server answer, expect Ok response kind or error kind)
        let cases: &[(&str, Option<Option<&'static str>>, &str)] = &[
            (
                "done",
                Some(Some(r#"{"response":"done","message":"started"}"#)),
                "done",
            ),
            (
                "error",
                Some(Some(r#"{"response":"error","message":"no"}"#)),
                "error",
            ),
            ("garbage", Some(Some("hello")), "bad-answer"),
            ("closed", Some(None), "closed"),
            ("nobody", None, "connect"),
        ];
        for (i, (name, server, want)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("s{i}.sock"));
            let task = match server {
                Some(a) => Some(serve_once(&path, *a).await),
                None => None,
            };
            let c = Control::new(&path);
            let r = c
                .call(
                    &Request::Start { domain: "d".into() },
                    Duration::from_secs(5),
                )
                .await;
            let got = match &r {
                Ok(Response::Done { .. }) => "done",
                Ok(Response::Error { .. }) => "error",
                Ok(Response::Status(_)) => "status",
                Err(CallError::BadAnswer { .. }) => "bad-answer",
                Err(CallError::Closed { .. }) => "closed",
                Err(CallError::Connect { .. }) => "connect",
                Err(e) => panic!("{name}: {e}"),
            };
            assert_eq!(got, *want, "{name}: {r:?}");
            if let Some(t) = task {
                let req = t.await.unwrap();
                assert_eq!(req.trim(), r#"{"request":"start","domain":"d"}"#, "{name}");
            }
        }
    }

    #[tokio::test]
    async fn silent_daemon_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        let l = UnixListener::bind(&path).unwrap();
        let _keep = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let r = Control::new(&path).status(Duration::from_millis(200)).await;
        assert!(matches!(r, Err(CallError::Timeout { .. })), "{r:?}");
    }
}
