//! The pair drill's access to a daemon's control socket, over [`ControlClient`].
//!
//! One connection per call: the drill restarts and kills daemons, and a fresh connection per
//! request never reuses a connection to a dead daemon (nor one left unusable by a timeout).
//! Every call, connecting included, is bounded by the caller's timeout, because a daemon
//! that accepts and never answers must show up in the drill as "unreachable" (unknown
//! state), not hang the observer.

use std::path::{Path, PathBuf};
use std::time::Duration;

use remus_agent::api::{DaemonStatus, Request, Response};
use remus_agent::control::{ControlClient, ControlError};

/// A daemon's control socket.
#[derive(Clone, Debug)]
pub struct Control {
    path: PathBuf,
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

    /// Connects, sends `request` and reads its answer, all within `timeout`.
    ///
    /// # Errors
    /// See [`ControlError`]; running out of time at any step is [`ControlError::Timeout`].
    pub async fn call(
        &self,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response, ControlError> {
        let exchange = async {
            let mut c = ControlClient::connect(&self.path).await?;
            c.request_with_timeout(request.clone(), timeout).await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(ControlError::Timeout {
                path: self.path.clone(),
                request: format!("{request:?}"),
                after: timeout,
            }),
        }
    }

    /// The daemon's status snapshot, within `timeout`.
    ///
    /// # Errors
    /// As [`Self::call`]; an answer that is not a status is [`ControlError::Protocol`].
    pub async fn status(&self, timeout: Duration) -> Result<DaemonStatus, ControlError> {
        match self.call(&Request::Status, timeout).await? {
            Response::Status(s) => Ok(s),
            Response::Done { message } | Response::Error { message } => {
                Err(ControlError::Protocol {
                    path: self.path.clone(),
                    request: "status".into(),
                    reason: format!("answered with a message instead of a status: {message}"),
                })
            }
            Response::DomainConfig(_) => Err(ControlError::Protocol {
                path: self.path.clone(),
                request: "status".into(),
                reason: "answered with a domain configuration instead of a status".into(),
            }),
            Response::Verified(_) => Err(ControlError::Protocol {
                path: self.path.clone(),
                request: "status".into(),
                reason: "answered with a verify report instead of a status".into(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    /// A real Unix socket server that answers one line with `answer` (or closes).
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
        type Case = (&'static str, Option<Option<&'static str>>, &'static str);
        // (case, server answer (None: no server), expected outcome)
        let cases: &[Case] = &[
            (
                "done",
                Some(Some(r#"{"response":"done","message":"started"}"#)),
                "done",
            ),
            (
                "refused",
                Some(Some(r#"{"response":"error","message":"no"}"#)),
                "error",
            ),
            ("garbage", Some(Some("hello")), "protocol"),
            ("closed", Some(None), "closed"),
            ("nobody", None, "not-running"),
        ];
        for (i, (name, server, want)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("s{i}.sock"));
            let task = match server {
                Some(a) => Some(serve_once(&path, *a).await),
                None => None,
            };
            let r = Control::new(&path)
                .call(
                    &Request::Start {
                        domain: "d".into(),
                        older_copy: false,
                    },
                    Duration::from_secs(5),
                )
                .await;
            let got = match &r {
                Ok(Response::Done { .. }) => "done",
                Ok(Response::Error { .. }) => "error",
                Ok(Response::Status(_) | Response::DomainConfig(_)) => "status",
                Ok(Response::Verified(_)) => "verified",
                Err(ControlError::Protocol { .. }) => "protocol",
                Err(ControlError::Closed { .. }) => "closed",
                Err(ControlError::NotRunning { .. }) => "not-running",
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
        assert!(matches!(r, Err(ControlError::Timeout { .. })), "{r:?}");
    }
}
