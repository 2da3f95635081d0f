//! Remote commands: applications and operators publish to `devices/<id>/cmd/<name>`, the
//! agent answers on `devices/<id>/cmd-result/<name>`.
//!
//! Only built-in commands exist ([`crate::config::BUILTIN_COMMANDS`]), and only those in
//! `commands.allow` are answered; the agent never runs a command it received as text.
//!
//! | command | result |
//! |---|---|
//! | `ping` | `{"pong":true}` |
//! | `health` | the health report (see [`crate::health`]) |
//!
//! The request payload is empty or a JSON object; its `"id"` (any JSON value) is echoed in
//! the result so a caller can match answers to requests. Every result is
//! `{"command":NAME,"id":ID,"ok":true,"ts":...,"result":...}` or
//! `{"command":NAME,"id":ID,"ok":false,"ts":...,"error":"..."}`. Refusals (a command not
//! allowed, a malformed request) are answered and logged to the `audit` target as
//! `command_refused`. Commands beyond `commands.max_per_minute` get no answer at all (a
//! flood of commands must not turn into a flood of answers); they are counted in a
//! `command_rate_limited` audit line logged at power-of-two counts.

use std::time::{Duration, Instant};

use bulwark_protocol::envelope::format_ts;
use serde_json::{json, Value};

/// Longest command name accepted (one topic level).
const MAX_NAME_BYTES: usize = 64;
/// Largest request payload read.
pub const MAX_REQUEST_BYTES: usize = 4096;

/// What the agent should do with a command message.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Ping {
        id: Value,
    },
    Health {
        id: Value,
    },
    /// Answer with an error (and audit it).
    Refuse {
        name: String,
        id: Value,
        reason: String,
    },
}

/// The command name in `topic` if it is `devices/<device>/cmd/<name>`.
pub fn command_name<'a>(device: &str, topic: &'a str) -> Option<&'a str> {
    topic
        .strip_prefix("devices/")?
        .strip_prefix(device)?
        .strip_prefix("/cmd/")
}

/// The topic of a command's result. `name` is sanitised into one topic level.
pub fn result_topic(device: &str, name: &str) -> String {
    let level: String = name
        .chars()
        .take(MAX_NAME_BYTES)
        .map(|c| match c {
            '/' | '+' | '#' | '\0' => '_',
            c => c,
        })
        .collect();
    let level = if level.is_empty() {
        "_".to_string()
    } else {
        level
    };
    format!("devices/{device}/cmd-result/{level}")
}

/// Counts commands in a sliding minute.
#[derive(Debug)]
pub struct CommandLimiter {
    per_minute: u32,
    window_start: Instant,
    used: u32,
}

impl CommandLimiter {
    pub fn new(per_minute: u32) -> CommandLimiter {
        CommandLimiter {
            per_minute,
            window_start: Instant::now(),
            used: 0,
        }
    }

    /// Whether one more command may be answered now.
    pub fn allow(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window_start) >= Duration::from_secs(60) {
            self.window_start = now;
            self.used = 0;
        }
        if self.used >= self.per_minute {
            return false;
        }
        self.used += 1;
        true
    }
}

/// Decides what to do with a command `name` carrying `payload`.
pub fn parse_request(name: &str, payload: &[u8], allow: &[String]) -> Request {
    let refuse = |id: Value, reason: String| Request::Refuse {
        name: name.to_string(),
        id,
        reason,
    };
    let id = if payload.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else if payload.len() > MAX_REQUEST_BYTES {
        return refuse(
            Value::Null,
            format!("request larger than {MAX_REQUEST_BYTES} bytes"),
        );
    } else {
        match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(m)) => m.get("id").cloned().unwrap_or(Value::Null),
            Ok(_) => {
                return refuse(
                    Value::Null,
                    "the request must be empty or a JSON object like {\"id\":1}".into(),
                )
            }
            Err(e) => return refuse(Value::Null, format!("the request is not JSON: {e}")),
        }
    };
    if name.is_empty() || name.len() > MAX_NAME_BYTES || name.contains('/') {
        return refuse(id, "command names are one topic level".into());
    }
    if !allow.iter().any(|a| a == name) {
        return refuse(
            id,
            format!(
                "command {name:?} is not allowed on this gateway; allowed: {}",
                if allow.is_empty() {
                    "none".to_string()
                } else {
                    allow.join(", ")
                }
            ),
        );
    }
    match name {
        "ping" => Request::Ping { id },
        "health" => Request::Health { id },
        // Config validation keeps `allow` to built-in names.
        other => refuse(id, format!("command {other:?} is not built in")),
    }
}

/// A successful result payload.
pub fn ok_result(name: &str, id: &Value, result: Value, now_ms: u64) -> Vec<u8> {
    json!({"command": name, "id": id, "ok": true, "ts": format_ts(now_ms), "result": result})
        .to_string()
        .into_bytes()
}

/// A refusal payload.
pub fn error_result(name: &str, id: &Value, error: &str, now_ms: u64) -> Vec<u8> {
    json!({"command": name, "id": id, "ok": false, "ts": format_ts(now_ms), "error": error})
        .to_string()
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow() -> Vec<String> {
        vec!["ping".into(), "health".into()]
    }

    #[test]
    fn topics() {
        assert_eq!(command_name("gw-1", "devices/gw-1/cmd/ping"), Some("ping"));
        assert_eq!(command_name("gw-1", "devices/gw-2/cmd/ping"), None);
        assert_eq!(command_name("gw-1", "devices/gw-10/cmd/ping"), None);
        assert_eq!(command_name("gw-1", "devices/gw-1/data/x"), None);
        assert_eq!(result_topic("gw-1", "ping"), "devices/gw-1/cmd-result/ping");
        assert_eq!(result_topic("gw-1", "a/b"), "devices/gw-1/cmd-result/a_b");
        assert_eq!(result_topic("gw-1", ""), "devices/gw-1/cmd-result/_");
    }

    #[test]
    fn requests() {
        assert_eq!(
            parse_request("ping", b"", &allow()),
            Request::Ping { id: Value::Null }
        );
        assert_eq!(
            parse_request("health", br#"{"id":"abc"}"#, &allow()),
            Request::Health { id: json!("abc") }
        );
        match parse_request("reboot", br#"{"id":7}"#, &allow()) {
            Request::Refuse { id, reason, .. } => {
                assert_eq!(id, json!(7));
                assert!(reason.contains("not allowed"), "{reason}");
                assert!(reason.contains("ping, health"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_request("ping", b"[1]", &allow()),
            Request::Refuse { .. }
        ));
        assert!(matches!(
            parse_request("ping", b"{not json", &allow()),
            Request::Refuse { .. }
        ));
        assert!(matches!(
            parse_request("ping", b"", &[]),
            Request::Refuse { .. }
        ));
        let big = vec![b' '; MAX_REQUEST_BYTES + 10];
        assert_eq!(
            parse_request("ping", &big, &allow()),
            Request::Ping { id: Value::Null }
        );
        let mut big = b"{\"id\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'x', MAX_REQUEST_BYTES));
        big.extend(b"\"}");
        assert!(matches!(
            parse_request("ping", &big, &allow()),
            Request::Refuse { .. }
        ));
    }

    #[test]
    fn limiter() {
        let t = Instant::now();
        let mut l = CommandLimiter::new(2);
        assert!(l.allow(t));
        assert!(l.allow(t));
        assert!(!l.allow(t));
        assert!(l.allow(t + Duration::from_secs(61)));
    }
}
