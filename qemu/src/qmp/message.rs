//! QMP wire messages: classification of one received line, and events.
//!
//! QEMU sends one JSON object per line: a greeting (`{"QMP": ...}`) once, then replies
//! (`{"return": ..., "id": ...}` or `{"error": {"class", "desc"}, "id": ...}`) and
//! asynchronous events (`{"event": NAME, "data": ..., "timestamp": ...}`). [`parse`] turns a
//! line into a [`Message`] or a typed [`ParseError`]; it never panics and allocates no more
//! than the line itself (the transport bounds the line length). Replies carry the numeric id
//! the client chose, which is how they are matched to their command; a reply without an id
//! (or with a foreign one) cannot be matched and is reported by the client.
//!
//! Events are decoded into [`Event`]: the handful the driver acts on are typed (using
//! qapi-qmp's generated types for their payloads), every other event is kept raw so a new
//! QEMU event never breaks the connection.

use qapi_qmp::{MigrationStatus, ShutdownCause};
use serde_json::{Map, Value};

/// One message received from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// The first line after connecting: the server's version and capabilities.
    Greeting {
        /// `major.minor.micro` as QEMU reports it (`"unknown"` if the greeting lacks it).
        version: String,
    },
    /// A successful reply.
    Return { id: Option<u64>, value: Value },
    /// A failed command.
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    /// An asynchronous event.
    Event(Event),
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The VM stopped (`stop`, migration completion, I/O error ...).
    Stop,
    /// The VM resumed.
    Resume,
    /// The guest or the host asked QEMU to shut down.
    Shutdown { guest: bool, reason: ShutdownCause },
    /// A migration (outgoing or incoming) changed state. Sent only when the `events`
    /// migration capability is on.
    Migration { status: MigrationStatus },
    /// Any other event, or one of the above whose payload did not decode.
    Other { name: String, data: Value },
}

impl Event {
    /// Builds an event from its name and payload.
    pub fn decode(name: &str, data: Value) -> Event {
        let typed = match name {
            "STOP" => Some(Event::Stop),
            "RESUME" => Some(Event::Resume),
            "SHUTDOWN" => serde_json::from_value::<qapi_qmp::SHUTDOWN>(data.clone())
                .ok()
                .map(|s| Event::Shutdown {
                    guest: s.guest,
                    reason: s.reason,
                }),
            "MIGRATION" => serde_json::from_value::<qapi_qmp::MIGRATION>(data.clone())
                .ok()
                .map(|m| Event::Migration { status: m.status }),
            _ => None,
        };
        typed.unwrap_or_else(|| Event::Other {
            name: name.to_string(),
            data,
        })
    }
}

/// Why a received line is not a QMP message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("not a JSON object but {0}")]
    NotObject(&'static str),
    #[error("field {field:?} of a {kind} is {problem}")]
    BadField {
        kind: &'static str,
        field: &'static str,
        problem: &'static str,
    },
    #[error("object with none of QMP, return, error, event (keys: {0})")]
    Unrecognized(String),
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn string_field(
    obj: &Map<String, Value>,
    kind: &'static str,
    field: &'static str,
) -> Result<String, ParseError> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ParseError::BadField {
            kind,
            field,
            problem: "not a string",
        }),
        None => Err(ParseError::BadField {
            kind,
            field,
            problem: "missing",
        }),
    }
}

/// Parses one line (without or with its trailing newline).
pub fn parse(line: &[u8]) -> Result<Message, ParseError> {
    let value: Value =
        serde_json::from_slice(line).map_err(|e| ParseError::NotJson(e.to_string()))?;
    let Value::Object(mut obj) = value else {
        return Err(ParseError::NotObject(kind_of(&value)));
    };
    // Ids the client did not send as unsigned integers are foreign: keep them unmatched.
    let id = obj.get("id").and_then(Value::as_u64);
    if let Some(greeting) = obj.get("QMP") {
        let version = greeting
            .pointer("/version/qemu")
            .and_then(|q| {
                Some(format!(
                    "{}.{}.{}",
                    q.get("major")?.as_u64()?,
                    q.get("minor")?.as_u64()?,
                    q.get("micro")?.as_u64()?
                ))
            })
            .unwrap_or_else(|| "unknown".into());
        return Ok(Message::Greeting { version });
    }
    if let Some(value) = obj.remove("return") {
        return Ok(Message::Return { id, value });
    }
    if let Some(error) = obj.get("error") {
        let Value::Object(error) = error else {
            return Err(ParseError::BadField {
                kind: "error reply",
                field: "error",
                problem: "not an object",
            });
        };
        return Ok(Message::Error {
            id,
            class: string_field(error, "error reply", "class")?,
            desc: string_field(error, "error reply", "desc")?,
        });
    }
    if obj.contains_key("event") {
        let name = string_field(&obj, "event", "event")?;
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Ok(Message::Event(Event::decode(&name, data)));
    }
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).take(8).collect();
    keys.sort_unstable();
    Err(ParseError::Unrecognized(keys.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn well_formed_messages_are_classified() {
        // (line, expected message)
        let cases: Vec<(&str, Message)> = vec![
            (
                r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#,
                Message::Greeting {
                    version: "7.2.22".into(),
                },
            ),
            (
                r#"{"QMP": {}}"#,
                Message::Greeting {
                    version: "unknown".into(),
                },
            ),
            (
                r#"{"return": {}, "id": 3}"#,
                Message::Return {
                    id: Some(3),
                    value: json!({}),
                },
            ),
            (
                r#"{"return": {"status": "running", "running": true}}"#,
                Message::Return {
                    id: None,
                    value: json!({"status": "running", "running": true}),
                },
            ),
            (
                r#"{"return": {}, "id": "foreign"}"#,
                Message::Return {
                    id: None,
                    value: json!({}),
                },
            ),
            (
                r#"{"id": 9, "error": {"class": "GenericError", "desc": "No such fd"}}"#,
                Message::Error {
                    id: Some(9),
                    class: "GenericError".into(),
                    desc: "No such fd".into(),
                },
            ),
            (
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
                Message::Event(Event::Stop),
            ),
            (
                r#"{"event": "RESUME", "data": {}}"#,
                Message::Event(Event::Resume),
            ),
            (
                r#"{"event": "MIGRATION", "data": {"status": "completed"}}"#,
                Message::Event(Event::Migration {
                    status: MigrationStatus::completed,
                }),
            ),
            (
                r#"{"event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#,
                Message::Event(Event::Shutdown {
                    guest: true,
                    reason: ShutdownCause::guest_shutdown,
                }),
            ),
            (
                // A status this qapi schema does not know stays raw instead of failing.
                r#"{"event": "MIGRATION", "data": {"status": "warp-speed"}}"#,
                Message::Event(Event::Other {
                    name: "MIGRATION".into(),
                    data: json!({"status": "warp-speed"}),
                }),
            ),
            (
                r#"{"event": "NIC_RX_FILTER_CHANGED", "data": {"path": "/x"}}"#,
                Message::Event(Event::Other {
                    name: "NIC_RX_FILTER_CHANGED".into(),
                    data: json!({"path": "/x"}),
                }),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse(line.as_bytes()), Ok(want), "{line}");
        }
    }

    #[test]
    fn malformed_lines_yield_errors_not_panics() {
        // (line, expected error)
        let cases: Vec<(&[u8], ParseError)> = vec![
            (b"", ParseError::NotJson(String::new())),
            (b"{\"return\": ", ParseError::NotJson(String::new())),
            (b"\xff\xfe", ParseError::NotJson(String::new())),
            (b"[1, 2]", ParseError::NotObject("an array")),
            (b"42", ParseError::NotObject("a number")),
            (b"null", ParseError::NotObject("null")),
            (
                br#"{"error": "boom"}"#,
                ParseError::BadField {
                    kind: "error reply",
                    field: "error",
                    problem: "not an object",
                },
            ),
            (
                br#"{"error": {"desc": "x"}}"#,
                ParseError::BadField {
                    kind: "error reply",
                    field: "class",
                    problem: "missing",
                },
            ),
            (
                br#"{"error": {"class": 1, "desc": "x"}}"#,
                ParseError::BadField {
                    kind: "error reply",
                    field: "class",
                    problem: "not a string",
                },
            ),
            (
                br#"{"event": 7}"#,
                ParseError::BadField {
                    kind: "event",
                    field: "event",
                    problem: "not a string",
                },
            ),
            (
                br#"{"b": 1, "a": 2}"#,
                ParseError::Unrecognized("a, b".into()),
            ),
        ];
        for (line, want) in cases {
            let got = parse(line);
            match (&got, &want) {
                // serde_json's wording is not ours to pin down: only the variant matters.
                (Err(ParseError::NotJson(_)), ParseError::NotJson(_)) => {}
                _ => assert_eq!(got, Err(want), "{}", String::from_utf8_lossy(line)),
            }
        }
    }

    #[test]
    fn deeply_nested_input_is_rejected_without_overflowing_the_stack() {
        let mut line = "[".repeat(100_000);
        line.push_str(&"]".repeat(100_000));
        assert!(matches!(
            parse(line.as_bytes()),
            Err(ParseError::NotJson(_))
        ));
    }
}
