//! A route-netlink connection in a chosen network namespace, sending the prepared messages of
//! [`super::msg`] and turning the kernel's answers into typed errors.
//!
//! The socket is created on a thread that entered the namespace (see [`crate::netns`]) and
//! then driven by rtnetlink's connection task on the caller's tokio runtime. Extended acks
//! are switched on so the kernel's own explanation ("Specified qdisc kind is unknown.") is
//! kept in the error next to the errno.

use std::os::fd::{FromRawFd, IntoRawFd};

use futures::StreamExt;
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, TokioSocket};
use thiserror::Error;
use tokio::task::JoinHandle;

use crate::netns::Netns;

/// `NLM_F_CAPPED`: the error echoes only the request's header.
const NLM_F_CAPPED: u16 = 0x100;
/// `NLM_F_ACK_TLVS`: extended-ack attributes follow the echoed request.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the human-readable error string.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// A failed netlink exchange.
#[derive(Debug, Error)]
pub enum RtnlError {
    #[error("netlink: open a route socket in {netns}: {source}")]
    Open {
        netns: Netns,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink {op}: {}{}", std::io::Error::from_raw_os_error(*errno), extack.as_deref().map(|m| format!(" ({m})")).unwrap_or_default())]
    Kernel {
        op: String,
        /// The positive errno the kernel answered.
        errno: i32,
        /// The kernel's extended-ack message, if it gave one.
        extack: Option<String>,
    },
    #[error("netlink {op}: the connection is closed")]
    Closed { op: String },
}

impl RtnlError {
    /// The errno of a kernel refusal.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RtnlError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }

    /// The kernel's extended-ack text of a refusal.
    pub fn extack(&self) -> Option<&str> {
        match self {
            RtnlError::Kernel { extack, .. } => extack.as_deref(),
            _ => None,
        }
    }
}

/// A route-netlink connection bound to one namespace.
pub struct Rtnl {
    /// rtnetlink's request handle.
    handle: rtnetlink::Handle,
    /// The task driving the socket; aborted on drop.
    task: JoinHandle<()>,
    /// Where the socket lives, for messages.
    netns: Netns,
}

impl Drop for Rtnl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Rtnl {
    /// Opens a connection inside `netns`. Must be called within a tokio runtime.
    pub fn open(netns: &Netns) -> Result<Self, RtnlError> {
        let open_err = |source| RtnlError::Open {
            netns: netns.clone(),
            source,
        };
        let socket = netns
            .run(|| {
                let mut s = Socket::new(NETLINK_ROUTE)?;
                s.bind_auto()?;
                // Best effort: older kernels lack extended acks; errors stay errno-only.
                let _ = s.set_ext_ack(true);
                Ok(s)
            })
            .map_err(open_err)?;
        // SAFETY: the fd comes from `into_raw_fd` of a socket we own, so ownership moves to
        // the TokioSocket exactly once. `from_raw_fd` registers it with the runtime's reactor
        // (we are inside a runtime, the documented precondition of this function).
        let socket = unsafe { TokioSocket::from_raw_fd(socket.into_raw_fd()) };
        let (conn, handle, _) = rtnetlink::from_socket(socket);
        let task = tokio::spawn(conn);
        Ok(Self {
            handle,
            task,
            netns: netns.clone(),
        })
    }

    /// rtnetlink's handle on this connection, for requests this crate does not prepare
    /// itself (test topologies).
    pub fn handle(&self) -> rtnetlink::Handle {
        self.handle.clone()
    }

    /// The namespace of this connection.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Sends `msg` and collects every answer that is not an ack; fails on the first NACK.
    /// `op` names the operation in errors (e.g. "add plug qdisc on ifb-tap0").
    pub async fn request(
        &self,
        op: impl Into<String>,
        msg: NetlinkMessage<RouteNetlinkMessage>,
    ) -> Result<Vec<RouteNetlinkMessage>, RtnlError> {
        let op = op.into();
        let mut handle = self.handle.clone();
        let mut answers = handle
            .request(msg)
            .map_err(|_| RtnlError::Closed { op: op.clone() })?;
        let mut out = Vec::new();
        while let Some(answer) = answers.next().await {
            let flags = answer.header.flags;
            match answer.payload {
                NetlinkPayload::InnerMessage(m) => out.push(m),
                NetlinkPayload::Error(e) => {
                    if let Some(code) = e.code {
                        return Err(RtnlError::Kernel {
                            op,
                            errno: code.get().abs(),
                            extack: extack_message(flags, &e.header),
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

/// Extracts `NLMSGERR_ATTR_MSG` from the part of an `NLMSG_ERROR` after the error code:
/// the echoed request (its header only if `NLM_F_CAPPED`), then attributes if
/// `NLM_F_ACK_TLVS`.
pub fn extack_message(flags: u16, after_code: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || after_code.len() < 16 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        let len = u32::from_ne_bytes(after_code[..4].try_into().ok()?) as usize;
        len.checked_add(3)? & !3
    };
    let mut rest = after_code.get(echoed..)?;
    while rest.len() >= 4 {
        let len = u16::from_ne_bytes([rest[0], rest[1]]) as usize;
        let ty = u16::from_ne_bytes([rest[2], rest[3]]) & 0x3fff;
        if len < 4 || len > rest.len() {
            return None;
        }
        if ty == NLMSGERR_ATTR_MSG {
            let text = &rest[4..len];
            let text = text.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        rest = rest.get((len + 3) & !3..).unwrap_or_default();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echoed_header(len: u32) -> Vec<u8> {
        let mut v = len.to_ne_bytes().to_vec();
        v.extend_from_slice(&[0u8; 12]);
        v
    }

    fn msg_attr(text: &str) -> Vec<u8> {
        let mut payload = text.as_bytes().to_vec();
        payload.push(0);
        let mut v = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&1u16.to_ne_bytes());
        v.extend_from_slice(&payload);
        while !v.len().is_multiple_of(4) {
            v.push(0);
        }
        v
    }

    #[test]
    fn extack_table() {
        let capped = [
            echoed_header(40),
            msg_attr("Specified qdisc kind is unknown"),
        ]
        .concat();
        // Not capped: the whole 22-byte request (padded to 24) is echoed before the TLVs.
        let full = [echoed_header(22), vec![0u8; 8], msg_attr("Unknown filter")].concat();
        let rows: Vec<(u16, Vec<u8>, Option<&str>)> = vec![
            (
                NLM_F_CAPPED | NLM_F_ACK_TLVS,
                capped.clone(),
                Some("Specified qdisc kind is unknown"),
            ),
            (NLM_F_ACK_TLVS, full, Some("Unknown filter")),
            (NLM_F_CAPPED, capped, None),
            (NLM_F_ACK_TLVS, vec![1, 2], None),
            // A lying attribute length is not followed.
            (
                NLM_F_CAPPED | NLM_F_ACK_TLVS,
                [echoed_header(16), vec![200, 0, 1, 0]].concat(),
                None,
            ),
            // An echoed length past the end yields nothing instead of panicking.
            (NLM_F_ACK_TLVS, echoed_header(u32::MAX), None),
        ];
        for (i, (flags, data, want)) in rows.into_iter().enumerate() {
            assert_eq!(extack_message(flags, &data).as_deref(), want, "row {i}");
        }
    }
}
