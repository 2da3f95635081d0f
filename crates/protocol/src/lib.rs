//! bulwark-protocol: the sans-IO heart of Bulwark.
//!
//! Nothing here touches a socket, a file or a runtime. The broker and the agent drive it.
//!
//! - [`packet`]: the fourteen MQTT 3.1.1 control packets as plain Rust values.
//! - [`codec`]: `decode(&mut BytesMut, limits) -> Result<Option<Packet>, DecodeError>` and
//!   `encode(&Packet, &mut BytesMut)`. The fixed header and the size limit are checked
//!   before anything is allocated; every normative "MUST" of the spec that a receiver can
//!   check is a [`DecodeError`].
//! - [`topic`]: validated [`TopicName`] (no wildcards) and [`TopicFilter`] types.
//! - [`envelope`]: the JSON [`TelemetryEnvelope`] agents publish on
//!   `devices/<device>/data/<series>`, and its timestamp format.
//! - [`trie`]: [`SubscriptionTrie`], whose matching cost grows with topic depth, not with
//!   the number of subscriptions.
//!
//! `fuzzing` (hidden) holds the checks the fuzz targets in `fuzz/` and the corpus replay test
//! share.
//!
//! The protocol level is a parameter ([`ProtocolLevel`]) so MQTT 5 can slot in beside 3.1.1.
#![forbid(unsafe_code)]

pub mod acl;
pub mod codec;
pub mod envelope;
#[doc(hidden)]
pub mod fuzzing;
pub mod packet;
pub mod topic;
pub mod trie;

pub use acl::{
    filter_contains, filters_intersect, AclError, AclFile, Decision, Principal, Reason, RuleRef,
};
pub use codec::{decode, encode, encoded_len, DecodeError, DecodeLimits, EncodeError};
pub use envelope::{EnvelopeError, Payload, TelemetryEnvelope};
pub use packet::*;
pub use topic::{TopicError, TopicFilter, TopicName};
pub use trie::SubscriptionTrie;
