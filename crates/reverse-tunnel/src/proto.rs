//! The tunnel session protocol: the JSON messages exchanged before the byte stream starts,
//! and the offer the broker sends to the device over MQTT.
//!
//! Both ends reach the relay with a WebSocket over TLS at [`PATH`] (subprotocol
//! [`SUBPROTOCOL`]). The first message each way is one JSON text message:
//!
//! | who | request | reply |
//! |---|---|---|
//! | operator | `{"op":"open","device":"gw-17","service":"ssh"}` (+ `username`/`password` without a certificate) | `{"ok":true,"session":"..."}` once the device has joined, or `{"ok":false,"code":"no_grant","error":"..."}` |
//! | operator | `{"op":"list"}` | `{"ok":true,"sessions":[...]}` |
//! | device | `{"op":"accept","session":"...","token":"..."}` | `{"ok":true,"session":"..."}` |
//! | device | `{"op":"refuse","session":"...","token":"...","reason":"service_not_allowed"}` | `{"ok":true}` |
//!
//! After `ok` to `open`/`accept`, every message is binary: the bytes of a yamux session
//! between the operator's CLI (client side) and the agent (server side), which the relay
//! forwards, checking the frame headers ([`crate::frames`]).

use serde::{Deserialize, Serialize};

/// The relay's WebSocket path.
pub const PATH: &str = "/tunnel/v1";
/// The WebSocket subprotocol both ends offer.
pub const SUBPROTOCOL: &str = "bulwark-tunnel.v1";
/// Largest first (JSON) message accepted.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// The first message of a connection to the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// An operator opens a session to `service` on `device`.
    Open {
        device: String,
        service: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        username: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password: Option<String>,
    },
    /// An operator lists the sessions it may see.
    List {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        username: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password: Option<String>,
    },
    /// The device joins the session it was offered.
    Accept { session: String, token: String },
    /// The device declines an offer (the relay tells the operator why).
    Refuse {
        session: String,
        token: String,
        reason: RefuseReason,
    },
}

impl Request {
    /// The request without its password, for logs.
    pub fn redacted(&self) -> Request {
        let mut r = self.clone();
        match &mut r {
            Request::Open { password, .. } | Request::List { password, .. } => {
                if password.is_some() {
                    *password = Some("***".into());
                }
            }
            Request::Accept { token, .. } | Request::Refuse { token, .. } => {
                *token = "***".into();
            }
        }
        r
    }
}

/// Why a device declined an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseReason {
    /// The service is not on the device's allow-list.
    ServiceNotAllowed,
    /// The device already runs `tunnel.max_sessions` sessions.
    TooManySessions,
}

impl RefuseReason {
    pub fn code(self) -> ErrorCode {
        match self {
            RefuseReason::ServiceNotAllowed => ErrorCode::ServiceNotAllowed,
            RefuseReason::TooManySessions => ErrorCode::Limit,
        }
    }
}

/// Machine-readable error codes in replies; the `error` text says what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    AuthFailed,
    NoGrant,
    DeviceOffline,
    ServiceNotAllowed,
    TokenInvalid,
    TokenExpired,
    WrongDevice,
    Limit,
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::AuthFailed => "auth_failed",
            ErrorCode::NoGrant => "no_grant",
            ErrorCode::DeviceOffline => "device_offline",
            ErrorCode::ServiceNotAllowed => "service_not_allowed",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::WrongDevice => "wrong_device",
            ErrorCode::Limit => "limit",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// One session as `list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session: String,
    pub device: String,
    pub service: String,
    pub operator: String,
    /// RFC 3339.
    pub opened: String,
    /// "waiting" (for the device) or "open".
    pub state: String,
    pub bytes_to_device: u64,
    pub bytes_to_operator: u64,
}

/// The relay's reply to the first message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<ErrorCode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<Vec<SessionInfo>>,
}

impl Reply {
    pub fn ok(session: Option<String>) -> Reply {
        Reply {
            ok: true,
            session,
            ..Reply::default()
        }
    }

    pub fn error(code: ErrorCode, error: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            code: Some(code),
            error: Some(error.into()),
            ..Reply::default()
        }
    }
}

/// The offer the broker publishes on `$tunnel/<device>/notify` (QoS 1, not retained).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    pub v: u32,
    pub session: String,
    pub service: String,
    /// Where to join: `wss://HOST:PORT/tunnel/v1`.
    pub relay_url: String,
    /// Single use; valid until `expires`.
    pub token: String,
    /// RFC 3339.
    pub expires: String,
    /// Seconds the token was valid for when issued.
    pub expires_in_secs: u64,
    /// Who asked (for the device's own audit record).
    pub operator: String,
}

/// The notification topic of `device`.
pub fn notify_topic(device: &str) -> String {
    format!("$tunnel/{device}/notify")
}

/// The ACL topic whose write permission grants opening `service` on `device`.
pub fn grant_topic(device: &str, service: &str) -> String {
    format!("$tunnel/{device}/open/{service}")
}

/// Device ids and service names become topic levels: non-empty, at most 128 bytes, no
/// `/ + #`, NUL or control characters, no leading `$`.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('$')
        && !s
            .chars()
            .any(|c| matches!(c, '/' | '+' | '#') || c.is_control())
}

/// A random URL-safe token of 32 bytes (256 bits).
pub fn random_token() -> String {
    use base64::Engine as _;
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_redact() {
        let r: Request = serde_json::from_str(
            r#"{"op":"open","device":"gw-1","service":"ssh","username":"alice","password":"pw"}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::Open {
                device: "gw-1".into(),
                service: "ssh".into(),
                username: Some("alice".into()),
                password: Some("pw".into())
            }
        );
        assert!(!serde_json::to_string(&r.redacted())
            .unwrap()
            .contains("pw\""));
        let a: Request =
            serde_json::from_str(r#"{"op":"accept","session":"s","token":"t"}"#).unwrap();
        assert!(!serde_json::to_string(&a.redacted())
            .unwrap()
            .contains("\"t\""));
        assert!(serde_json::from_str::<Request>(r#"{"op":"open","device":"d"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"list","x":1}"#).is_err());
        let f: Request = serde_json::from_str(
            r#"{"op":"refuse","session":"s","token":"t","reason":"service_not_allowed"}"#,
        )
        .unwrap();
        assert!(matches!(
            f,
            Request::Refuse {
                reason: RefuseReason::ServiceNotAllowed,
                ..
            }
        ));
    }

    #[test]
    fn replies() {
        let e = Reply::error(ErrorCode::NoGrant, "ask for a grant");
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(
            s,
            r#"{"ok":false,"code":"no_grant","error":"ask for a grant"}"#
        );
        assert_eq!(serde_json::from_str::<Reply>(&s).unwrap(), e);
    }

    #[test]
    fn names_and_tokens() {
        assert!(valid_name("gw-17"));
        assert!(!valid_name(""));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("$SYS"));
        assert!(!valid_name("a+"));
        assert!(!valid_name("a\nb"));
        let t = random_token();
        assert_eq!(t.len(), 43);
        assert_ne!(t, random_token());
        assert_eq!(grant_topic("gw-1", "ssh"), "$tunnel/gw-1/open/ssh");
        assert_eq!(notify_topic("gw-1"), "$tunnel/gw-1/notify");
    }
}
