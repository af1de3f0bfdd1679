//! The control plane's transport: the daemon's Unix socket server and `remusctl`'s client.
//!
//! The protocol itself (messages, version, line limit) is [`crate::api`]; this module moves
//! it over `[node] control_socket`:
//! - [`server`]: `remusd` side. One task per connection; each line is one [`Request`], each
//!   answered by exactly one [`Response`] line, in order. Bad input (invalid JSON, an unknown
//!   request, a line over [`MAX_LINE`]) is answered with [`Response::Error`] naming what was
//!   wrong; the connection stays usable except after an over-long line, which closes it
//!   (the rest of such a line cannot be told apart from the next request).
//! - [`client`]: `remusctl` side, with per-request timeouts and the protocol version check.
//!
//! Invariants:
//! - At most one daemon serves a socket path: binding refuses a path on which something
//!   answers, and replaces only a socket file nobody answers on (left by a crashed daemon).
//! - The socket is 0600 from the moment it is reachable under its name (it is bound under a
//!   temporary name, restricted, then renamed): the file mode is the access control, since
//!   the protocol carries no credentials.
//! - A command handed to the [`ControlHandler`] runs to completion even if the client goes
//!   away or the server shuts down: abandoning a switchover half-way because an operator
//!   pressed Ctrl-C would leave the pair between roles.
//!
//! [`Request`]: crate::api::Request
//! [`Response`]: crate::api::Response
//! [`Response::Error`]: crate::api::Response::Error
//! [`MAX_LINE`]: crate::api::MAX_LINE
//! [`ControlHandler`]: crate::api::ControlHandler

pub mod client;
pub mod server;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

pub use client::ControlClient;
pub use server::{serve, ControlServer};

/// Where the daemon listens when no configuration says otherwise (`[node] control_socket`'s
/// default).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/remus/remusd.sock";

/// Errors of the control server and client; each names the socket.
#[derive(Debug, Error)]
pub enum ControlError {
    /// Another process answers on the socket: a second daemon must not take it over.
    #[error("control socket {path}: another remusd is already listening there")]
    AlreadyServing {
        /// The socket.
        path: PathBuf,
    },
    /// The path exists and is not a socket: refusing to delete an unrelated file.
    #[error("control socket {path}: exists and is not a socket; refusing to replace it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A file-system or socket operation of the server failed.
    #[error("control socket {path}: {op}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What was being done ("bind", "chmod 0600", "remove stale socket", …).
        op: &'static str,
        /// The cause.
        source: io::Error,
    },
    /// Nothing listens on the socket (no file, or a file nobody accepts on).
    #[error("no remusd listening on {path}: {reason}")]
    NotRunning {
        /// The socket.
        path: PathBuf,
        /// "connection refused", "no such socket", …
        reason: String,
    },
    /// The socket exists but this user may not use it.
    #[error(
        "cannot connect to remusd on {path}: permission denied (the control socket is root's only)"
    )]
    PermissionDenied {
        /// The socket.
        path: PathBuf,
    },
    /// The daemon did not answer in time.
    #[error("remusd on {path}: no answer to {request} within {after:?}")]
    Timeout {
        /// The socket.
        path: PathBuf,
        /// The request's kind ("status", "switchover web", …).
        request: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The daemon closed the connection before answering.
    #[error("remusd on {path}: connection closed before the answer to {request}")]
    Closed {
        /// The socket.
        path: PathBuf,
        /// The request's kind.
        request: String,
    },
    /// The daemon's answer is not a valid response line.
    #[error("remusd on {path}: unreadable answer to {request}: {reason}")]
    Protocol {
        /// The socket.
        path: PathBuf,
        /// The request's kind.
        request: String,
        /// What was wrong with it.
        reason: String,
    },
    /// The daemon speaks another version of the control protocol.
    #[error(
        "remusd on {path} speaks control protocol version {daemon}, this remusctl speaks {client}: \
         use the remusctl of the same release as the daemon"
    )]
    VersionMismatch {
        /// The socket.
        path: PathBuf,
        /// The daemon's [`crate::api::CONTROL_VERSION`].
        daemon: u64,
        /// Ours.
        client: u32,
    },
}

/// Short description of a request for logs and errors: "status", "switchover web".
pub fn describe(request: &crate::api::Request) -> String {
    use crate::api::Request;
    match request {
        Request::Status => "status".to_string(),
        Request::Start { domain, .. } => format!("start {domain}"),
        Request::Switchover { domain } => format!("switchover {domain}"),
        Request::Failover { domain } => format!("failover {domain}"),
        Request::TestActivate { domain } => format!("test-activate {domain}"),
        Request::Verify { domain, resync } => {
            format!("verify {domain}{}", if *resync { " --resync" } else { "" })
        }
        Request::Reload => "reload".to_string(),
        Request::DomainConfig { domain } => format!("domain config {domain}"),
    }
}

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LineRead {
    /// A line (without its newline) is in the buffer; a last line without a newline before
    /// the end of the stream counts too.
    Line,
    /// The stream ended on a line boundary.
    Eof,
    /// The line exceeded the limit; what was read of it is discarded.
    TooLong,
}

/// Reads one `\n`-terminated line into `buf` (cleared first), never holding more than `max`
/// bytes of it: the peer cannot make us allocate more than the protocol allows.
pub(crate) async fn read_line<R>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<LineRead>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    use tokio::io::AsyncBufReadExt;
    buf.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if buf.is_empty() {
                LineRead::Eof
            } else {
                LineRead::Line
            });
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if buf.len() + take > max {
            let used = if done { take + 1 } else { take };
            reader.consume(used);
            return Ok(LineRead::TooLong);
        }
        buf.extend_from_slice(&available[..take]);
        reader.consume(if done { take + 1 } else { take });
        if done {
            return Ok(LineRead::Line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_line_cases() {
        // (input, limit, expected sequence of (result, line))
        type Case = (&'static [u8], usize, &'static [(LineRead, &'static [u8])]);
        let cases: &[Case] = &[
            (b"", 8, &[(LineRead::Eof, b"")]),
            (
                b"ab\ncd\n",
                8,
                &[
                    (LineRead::Line, b"ab"),
                    (LineRead::Line, b"cd"),
                    (LineRead::Eof, b""),
                ],
            ),
            // a last line without newline is still a line
            (
                b"ab\ncd",
                8,
                &[
                    (LineRead::Line, b"ab"),
                    (LineRead::Line, b"cd"),
                    (LineRead::Eof, b""),
                ],
            ),
            // exactly the limit passes, one more byte does not
            (
                b"abcd\n",
                4,
                &[(LineRead::Line, b"abcd"), (LineRead::Eof, b"")],
            ),
            (b"abcde\nx\n", 4, &[(LineRead::TooLong, b"")]),
            (b"\n", 4, &[(LineRead::Line, b""), (LineRead::Eof, b"")]),
        ];
        for (input, limit, expected) in cases {
            // a 2-byte buffer makes lines span several fills
            let mut reader = tokio::io::BufReader::with_capacity(2, *input);
            let mut buf = Vec::new();
            for (want, line) in expected.iter() {
                let got = read_line(&mut reader, &mut buf, *limit).await.unwrap();
                assert_eq!(&got, want, "{input:?}");
                if got == LineRead::Line {
                    assert_eq!(&buf[..], *line, "{input:?}");
                }
            }
        }
    }
}
