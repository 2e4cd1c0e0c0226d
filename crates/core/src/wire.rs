//! Node-protocol messages and the handshake decision.
//!
//! Every message carries `v` (its format version) and rejects unknown
//! fields: a message this release does not understand is refused with a
//! clear error and changes nothing.
//!
//! How messages grow without breaking older peers:
//!
//! * Messages stay strict: an unknown field is refused, never ignored.
//! * A field added at protocol N is optional (`#[serde(default,
//!   skip_serializing_if = "Option::is_none")]`) and is written only to a
//!   peer whose negotiated protocol is at least N. The node learns the
//!   negotiated protocol from [`Welcome::protocol`]; the controller from
//!   the same negotiation at hello. A peer of protocol N-1 therefore never
//!   sees the field, and a peer of protocol N reads a message without it.
//! * [`Hello`] is sent before any negotiation, so it never gains a
//!   required field: anything new in it is optional, and the controller
//!   answers a hello without it as it did before.
//! * A field never changes meaning; a new meaning is a new field.
//!
//! Fields added so far: protocol 3 — [`Heartbeat::hls_requests`]. Optional
//! in the hello since message version 1 (before release 3 shipped, so every
//! controller of this code reads it): [`Hello::binary_sha256`],
//! [`Hello::supervisor_sha256`].

use crate::grant::{decide_grant, Grant, GrantReason};
use crate::release::{ProtocolRange, Release, ReleaseInfo, Schema};
use crate::upgrade::Desired;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The one message-format version both releases speak.
pub const MESSAGE_VERSION: u32 = 1;

/// Bounds on everything that crosses the network.
pub mod limits {
    /// Largest request body any endpoint reads.
    pub const BODY_BYTES_MAX: usize = 1 << 20;
    /// Records in one batch on either channel.
    pub const BATCH_RECORDS_MAX: usize = 1000;
    /// Node, group and channel ids.
    pub const ID_CHARS_MAX: usize = 64;
    pub const TOKEN_CHARS_MAX: usize = 256;
    /// Shortest credential a node may choose: 32 hex digits are 128 random
    /// bits, out of reach of guessing.
    pub const CREDENTIAL_CHARS_MIN: usize = 32;
    pub const URL_CHARS_MAX: usize = 256;
    /// Free text inside a record.
    pub const TEXT_CHARS_MAX: usize = 1024;
    /// Events a node may report running at once.
    pub const CURRENT_EVENTS_MAX: usize = 256;
    /// Artifacts a node may report staged.
    pub const STAGED_MAX: usize = 16;
    /// Longest a watch request is held open before it answers "unchanged".
    pub const WATCH_WAIT_MS_MAX: u64 = 30_000;
    /// Sources one [`ArtifactSources`](super::ArtifactSources) names at
    /// most: plenty to spread a fleet's downloads (each source serves a
    /// few at once, and a node tries the next on a refusal), and a bounded
    /// answer however large the fleet.
    pub const ARTIFACT_SOURCES_MAX: usize = 16;
}

pub use crate::role::Role;

/// A node's durable outbox as it reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxState {
    pub next_seq: u64,
    pub oldest_unacked_seq: Option<u64>,
    pub count: u64,
}

/// Node → controller, first message of a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub v: u32,
    pub node_id: String,
    /// The node's own credential; on first contact (or after its
    /// credential was refused), the bootstrap token `handover node add`
    /// issued for this id.
    pub token: String,
    pub release: Release,
    pub schema: Schema,
    pub protocol: ProtocolRange,
    pub role: Role,
    pub group: String,
    /// Where viewers reach this node's HLS output.
    pub hls_url: String,
    pub outbox: OutboxState,
    pub current_events: Vec<i64>,
    pub param_revision: Option<u64>,
    /// Ids of the artifacts staged in the node's data dir.
    pub staged: Vec<String>,
    /// SHA-256 of the binary the node's worker runs, as its supervisor
    /// hashed it at exec time: with the release, what tells a patch build
    /// from the one it replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary_sha256: Option<String>,
    /// SHA-256 of the binary the node's supervisor runs (it re-executes
    /// itself after an upgrade; the node says hello again when it did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub supervisor_sha256: Option<String>,
    /// With a bootstrap token only: the credential the node chose, and
    /// persisted before it sent this hello, to use from now on. Because the
    /// node chose it, a welcome lost on the way changes nothing: the node's
    /// next hello presents that credential, which the controller now holds.
    /// (Sent only with a bootstrap token, which only a controller that knows
    /// this field issues.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_credential: Option<String>,
}

/// Controller → node, answer to [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    pub v: u32,
    pub controller_release: Release,
    pub controller_schema: Schema,
    pub protocol: u32,
    pub grant: Grant,
    pub grant_reason: GrantReason,
    pub epoch: u64,
    pub lease_ms: u64,
    pub desired: Desired,
    pub desired_rev: u64,
    pub param_revision: u64,
    /// The node's own credential: every later request presents it.
    pub credential: String,
}

/// Node → controller, every `lease_ms / 3`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub v: u32,
    pub node_id: String,
    pub epoch: u64,
    pub outbox: OutboxState,
    pub current_events: Vec<i64>,
    pub staged: Vec<String>,
    /// Protocol 3: HLS requests this node's worker answered since it
    /// started. Sent only when the negotiated protocol is at least
    /// [`HLS_REQUESTS_PROTOCOL`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hls_requests: Option<u64>,
}

/// The protocol that added [`Heartbeat::hls_requests`].
pub const HLS_REQUESTS_PROTOCOL: u32 = 3;

/// The rule for a field added at protocol `added_at`: `value` is written
/// only to a peer whose negotiated protocol is at least `added_at` (none
/// negotiated yet: not written).
pub fn if_protocol<T>(negotiated: Option<u32>, added_at: u32, value: T) -> Option<T> {
    negotiated.is_some_and(|p| p >= added_at).then_some(value)
}

/// Controller → node: the grant in force now (also the watch answer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantState {
    pub v: u32,
    pub grant: Grant,
    pub grant_reason: GrantReason,
    pub epoch: u64,
    pub lease_ms: u64,
    pub param_revision: u64,
    /// What the node should do about upgrades (stage, quiesce, switch).
    pub desired: Desired,
    /// Changes whenever any node's desired state changes; a watch that
    /// names an older one answers at once.
    pub desired_rev: u64,
}

/// Records on either channel: main (`full`, database schema) or redundant
/// (`deliver`, the node's older schema, translated by the controller).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Batch {
    pub v: u32,
    pub node_id: String,
    pub epoch: u64,
    pub schema: Schema,
    pub first_seq: u64,
    pub records: Vec<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchAck {
    pub v: u32,
    /// Every record with `seq <= acked_through` is stored; trim them.
    pub acked_through: u64,
    /// Records in this batch newly stored (the rest were already there).
    pub stored: u64,
    pub translated: u64,
}

/// Controller → node: the answer of `GET /node/v1/params`, parameters in
/// the controller's schema (a node caches only its own schema's).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamsAnswer {
    pub schema: Schema,
    pub revision: u64,
    pub params: serde_json::Value,
}

/// Controller → node: the answer of `GET /node/v1/artifacts/{id}/sources`,
/// the base URLs (their `hls_url`) of reachable nodes that staged the
/// artifact and may serve its binary at `/peer/v1/artifacts/{id}/binary`,
/// in an order that spreads the load. New in this build (no field of an
/// older message changes); an older controller answers 404, and the node
/// takes the binary from the controller as before. A source's bytes are
/// checked against the manifest the controller served, so a source is
/// only ever a hint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactSources {
    pub v: u32,
    pub sources: Vec<String>,
}

impl Validate for ArtifactSources {
    fn validate(&self) -> Result<(), WireError> {
        validate_version(self.v)?;
        if self.sources.len() > limits::ARTIFACT_SOURCES_MAX {
            return Err(invalid(
                "sources",
                format!("more than {}", limits::ARTIFACT_SOURCES_MAX),
            ));
        }
        for url in &self.sources {
            validate_len("sources", url, limits::URL_CHARS_MAX)?;
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(invalid("sources", "must be http:// or https:// URLs"));
            }
        }
        Ok(())
    }
}

/// The JSON body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message is not valid: {0}")]
    Malformed(String),
    #[error("message version {got} is not supported (this release speaks {MESSAGE_VERSION})")]
    UnsupportedVersion { got: u32 },
    #[error("field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn invalid(field: &'static str, reason: impl Into<String>) -> WireError {
    WireError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Ids are short and plain so they can sit in paths, file names and logs.
pub fn validate_id(field: &'static str, id: &str) -> Result<(), WireError> {
    if id.is_empty() || id.len() > limits::ID_CHARS_MAX {
        return Err(invalid(
            field,
            format!("must be 1 to {} characters", limits::ID_CHARS_MAX),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(invalid(
            field,
            "may hold only letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

fn validate_len(field: &'static str, text: &str, max: usize) -> Result<(), WireError> {
    if text.len() > max {
        return Err(invalid(field, format!("longer than {max} bytes")));
    }
    Ok(())
}

fn validate_version(v: u32) -> Result<(), WireError> {
    if v != MESSAGE_VERSION {
        return Err(WireError::UnsupportedVersion { got: v });
    }
    Ok(())
}

/// A message that can check its own bounds after decoding.
pub trait Validate {
    fn validate(&self) -> Result<(), WireError>;
}

impl Hello {
    /// A node's hello with nothing to report yet (empty outbox, no events,
    /// no parameter cache, nothing staged, no digests); the node machine
    /// fills in what it has.
    pub fn new(
        node_id: &str,
        token: &str,
        info: &ReleaseInfo,
        role: Role,
        group: &str,
        hls_url: &str,
    ) -> Hello {
        Hello {
            v: MESSAGE_VERSION,
            node_id: node_id.to_owned(),
            token: token.to_owned(),
            release: info.release,
            schema: info.schema,
            protocol: info.protocol,
            role,
            group: group.to_owned(),
            hls_url: hls_url.to_owned(),
            outbox: OutboxState::default(),
            current_events: vec![],
            param_revision: None,
            staged: vec![],
            binary_sha256: None,
            supervisor_sha256: None,
            new_credential: None,
        }
    }
}

impl Validate for Hello {
    fn validate(&self) -> Result<(), WireError> {
        validate_version(self.v)?;
        validate_id("node_id", &self.node_id)?;
        validate_id("group", &self.group)?;
        validate_len("token", &self.token, limits::TOKEN_CHARS_MAX)?;
        if let Some(c) = &self.new_credential {
            if c.len() < limits::CREDENTIAL_CHARS_MIN || c.len() > limits::TOKEN_CHARS_MAX {
                return Err(invalid(
                    "new_credential",
                    format!(
                        "must be {} to {} characters",
                        limits::CREDENTIAL_CHARS_MIN,
                        limits::TOKEN_CHARS_MAX
                    ),
                ));
            }
        }
        validate_len("hls_url", &self.hls_url, limits::URL_CHARS_MAX)?;
        if !self.hls_url.starts_with("http://") && !self.hls_url.starts_with("https://") {
            return Err(invalid("hls_url", "must be an http:// or https:// URL"));
        }
        if self.current_events.len() > limits::CURRENT_EVENTS_MAX {
            return Err(invalid(
                "current_events",
                format!("more than {}", limits::CURRENT_EVENTS_MAX),
            ));
        }
        if self.staged.len() > limits::STAGED_MAX {
            return Err(invalid(
                "staged",
                format!("more than {}", limits::STAGED_MAX),
            ));
        }
        for (field, sha) in [
            ("binary_sha256", &self.binary_sha256),
            ("supervisor_sha256", &self.supervisor_sha256),
        ] {
            if sha.as_ref().is_some_and(|s| {
                s.len() != 64 || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            }) {
                return Err(invalid(field, "must be 64 lowercase hex digits"));
            }
        }
        Ok(())
    }
}

impl Validate for Heartbeat {
    fn validate(&self) -> Result<(), WireError> {
        validate_version(self.v)?;
        validate_id("node_id", &self.node_id)?;
        if self.current_events.len() > limits::CURRENT_EVENTS_MAX {
            return Err(invalid(
                "current_events",
                format!("more than {}", limits::CURRENT_EVENTS_MAX),
            ));
        }
        Ok(())
    }
}

impl Validate for Batch {
    fn validate(&self) -> Result<(), WireError> {
        validate_version(self.v)?;
        validate_id("node_id", &self.node_id)?;
        if self.records.is_empty() {
            return Err(invalid("records", "a batch holds at least one record"));
        }
        if self.records.len() > limits::BATCH_RECORDS_MAX {
            return Err(invalid(
                "records",
                format!("more than {} in one batch", limits::BATCH_RECORDS_MAX),
            ));
        }
        if self.first_seq == 0
            || self
                .first_seq
                .checked_add(self.records.len() as u64)
                .is_none()
        {
            return Err(invalid(
                "first_seq",
                "sequence numbers start at 1 and must not overflow",
            ));
        }
        Ok(())
    }
}

/// Decodes and validates one message; the only way the shells read messages.
pub fn decode<T: DeserializeOwned + Validate>(body: &[u8]) -> Result<T, WireError> {
    if body.len() > limits::BODY_BYTES_MAX {
        return Err(WireError::Malformed(format!(
            "body larger than {} bytes",
            limits::BODY_BYTES_MAX
        )));
    }
    // Read the version first so a future message gets "unsupported version", not a field error.
    #[derive(Deserialize)]
    struct Versioned {
        v: Option<u32>,
    }
    let versioned: Versioned =
        serde_json::from_slice(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    validate_version(
        versioned
            .v
            .ok_or_else(|| WireError::Malformed("missing field `v`".into()))?,
    )?;
    let msg: T = serde_json::from_slice(body).map_err(|e| WireError::Malformed(e.to_string()))?;
    msg.validate()?;
    Ok(msg)
}

/// What the controller knows when it answers a handshake.
#[derive(Clone, Copy, Debug)]
pub struct ControllerView {
    pub info: &'static ReleaseInfo,
    pub desired_rev: u64,
    pub epoch: u64,
    pub fenced: bool,
    pub lease_ms: u64,
    pub param_revision: u64,
}

impl ControllerView {
    pub fn grant_state(&self, node_schema: Schema, desired: Desired) -> GrantState {
        let d = decide_grant(self.info, node_schema, self.fenced);
        GrantState {
            v: MESSAGE_VERSION,
            grant: d.grant,
            grant_reason: d.reason,
            epoch: self.epoch,
            lease_ms: self.lease_ms,
            param_revision: self.param_revision,
            desired,
            desired_rev: self.desired_rev,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    #[error("no common protocol: node speaks {node:?}, controller speaks {controller:?}")]
    NoCommonProtocol {
        node: ProtocolRange,
        controller: ProtocolRange,
    },
}

/// The controller's half of the handshake: negotiate a protocol and decide
/// the grant. Authentication happened before; `credential` is the node's.
pub fn welcome(
    view: &ControllerView,
    hello: &Hello,
    credential: String,
    desired: Desired,
) -> Result<Welcome, HandshakeError> {
    let protocol =
        view.info
            .protocol
            .negotiate(hello.protocol)
            .ok_or(HandshakeError::NoCommonProtocol {
                node: hello.protocol,
                controller: view.info.protocol,
            })?;
    let g = view.grant_state(hello.schema, desired);
    Ok(Welcome {
        v: MESSAGE_VERSION,
        controller_release: view.info.release,
        controller_schema: view.info.schema,
        protocol,
        grant: g.grant,
        grant_reason: g.grant_reason,
        epoch: view.epoch,
        lease_ms: view.lease_ms,
        desired: g.desired,
        desired_rev: g.desired_rev,
        param_revision: view.param_revision,
        credential,
    })
}

/// Fencing token check: a request made under any epoch but the current one
/// is refused, so a node that missed a fence can never write across it.
pub fn check_epoch(held: u64, current: u64) -> Result<(), StaleEpoch> {
    if held == current {
        Ok(())
    } else {
        Err(StaleEpoch { held, current })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("request made under epoch {held}, but the cluster is at epoch {current}: handshake again (POST /node/v1/hello)")]
pub struct StaleEpoch {
    pub held: u64,
    pub current: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hello(release: u32) -> Hello {
        let info = ReleaseInfo::of(Release(release)).unwrap();
        Hello::new(
            "n1",
            "t",
            info,
            Role::Primary,
            "g1",
            "http://127.0.0.2:7000",
        )
    }

    /// Nodes of every release read this answer (the controller wrote it
    /// with `json!` before the type existed): its shape must not move.
    #[test]
    fn the_params_answer_keeps_the_shape_older_nodes_read() {
        let text = r#"{"schema":2,"revision":7,"params":{"channels":[]}}"#;
        let answer: ParamsAnswer = serde_json::from_str(text).unwrap();
        assert_eq!(answer.schema, Schema(2));
        assert_eq!(serde_json::to_string(&answer).unwrap(), text);
    }

    fn view(release: u32, fenced: bool) -> ControllerView {
        ControllerView {
            info: ReleaseInfo::of(Release(release)).unwrap(),
            desired_rev: 0,
            epoch: 5,
            fenced,
            lease_ms: 3000,
            param_revision: 1,
        }
    }

    #[test]
    fn handshake_across_releases() {
        let cases = [
            (2, 2, false, Grant::Full, 2),
            (2, 1, false, Grant::Deliver, 1),
            (1, 2, false, Grant::Fenced, 1),
            (2, 2, true, Grant::Fenced, 2),
        ];
        for (ctl, node, fenced, grant, protocol) in cases {
            let w = welcome(
                &view(ctl, fenced),
                &hello(node),
                "c".into(),
                Desired::default(),
            )
            .unwrap();
            assert_eq!(
                (w.grant, w.protocol, w.epoch),
                (grant, protocol, 5),
                "controller r{ctl}, node r{node}"
            );
        }
    }

    #[test]
    fn no_common_protocol_is_refused() {
        let mut h = hello(2);
        h.protocol = ProtocolRange { min: 7, max: 9 };
        assert!(matches!(
            welcome(&view(2, false), &h, "c".into(), Desired::default()),
            Err(HandshakeError::NoCommonProtocol { .. })
        ));
    }

    fn check_decode(body: serde_json::Value, code: &str) {
        let bytes = serde_json::to_vec(&body).unwrap();
        let got = decode::<Hello>(&bytes)
            .map(|_| "ok")
            .unwrap_or_else(|e| e.code());
        assert_eq!(got, code, "{body}");
    }

    #[test]
    fn hello_decoding() {
        let good = serde_json::to_value(hello(1)).unwrap();
        check_decode(good.clone(), "ok");
        let mut future = good.clone();
        future["v"] = json!(2);
        check_decode(future, "unsupported_version");
        let mut extra = good.clone();
        extra["surprise"] = json!(true);
        check_decode(extra, "malformed");
        let mut bad_id = good.clone();
        bad_id["node_id"] = json!("../etc");
        check_decode(bad_id, "invalid_field");
        let mut long_id = good.clone();
        long_id["node_id"] = json!("n".repeat(65));
        check_decode(long_id, "invalid_field");
        let mut bad_url = good;
        bad_url["hls_url"] = json!("ftp://x");
        check_decode(bad_url, "invalid_field");
        check_decode(json!({"node_id": "n1"}), "malformed");
        assert_eq!(
            decode::<Hello>(b"not json").unwrap_err().code(),
            "malformed"
        );
        assert_eq!(
            decode::<Hello>(&vec![b' '; limits::BODY_BYTES_MAX + 1])
                .unwrap_err()
                .code(),
            "malformed"
        );
    }

    fn heartbeat(hls_requests: Option<u64>) -> Heartbeat {
        Heartbeat {
            v: 1,
            node_id: "n1".into(),
            epoch: 2,
            outbox: OutboxState::default(),
            current_events: vec![],
            staged: vec![],
            hls_requests,
        }
    }

    /// A heartbeat without `hls_requests` (protocol 2 and older) is what an
    /// older peer writes and reads; with it, it round-trips.
    #[test]
    fn heartbeat_optional_field() {
        let old = serde_json::to_value(heartbeat(None)).unwrap();
        assert!(old.get("hls_requests").is_none(), "{old}");
        assert_eq!(
            decode::<Heartbeat>(&serde_json::to_vec(&old).unwrap()),
            Ok(heartbeat(None))
        );
        let new = serde_json::to_vec(&heartbeat(Some(42))).unwrap();
        assert_eq!(decode::<Heartbeat>(&new), Ok(heartbeat(Some(42))));
        let mut unknown = old;
        unknown["hls_requests_v2"] = json!(1);
        assert_eq!(
            decode::<Heartbeat>(&serde_json::to_vec(&unknown).unwrap())
                .unwrap_err()
                .code(),
            "malformed"
        );
    }

    /// The sources answer, as the literal JSON both sides agree on, and
    /// its bounds.
    #[test]
    fn artifact_sources_pinned_and_bounded() {
        let text = r#"{"v":1,"sources":["http://127.0.0.5:7000","https://n2.example:7000"]}"#;
        let answer = ArtifactSources {
            v: MESSAGE_VERSION,
            sources: vec![
                "http://127.0.0.5:7000".into(),
                "https://n2.example:7000".into(),
            ],
        };
        assert_eq!(serde_json::to_string(&answer).unwrap(), text);
        assert_eq!(decode::<ArtifactSources>(text.as_bytes()), Ok(answer));
        let code = |v: serde_json::Value| {
            decode::<ArtifactSources>(&serde_json::to_vec(&v).unwrap())
                .map(|_| "ok")
                .unwrap_or_else(|e| e.code())
        };
        let many: Vec<String> = (0..=limits::ARTIFACT_SOURCES_MAX)
            .map(|i| format!("http://127.0.0.{i}:7000"))
            .collect();
        assert_eq!(code(json!({"v": 1, "sources": many[1..]})), "ok");
        assert_eq!(code(json!({"v": 1, "sources": many})), "invalid_field");
        assert_eq!(
            code(json!({"v": 1, "sources": ["file:///etc"]})),
            "invalid_field"
        );
        let long = format!("http://{}", "a".repeat(limits::URL_CHARS_MAX));
        assert_eq!(code(json!({"v": 1, "sources": [long]})), "invalid_field");
        assert_eq!(code(json!({"v": 1, "sources": [], "more": 1})), "malformed");
        assert_eq!(code(json!({"v": 2, "sources": []})), "unsupported_version");
    }

    #[test]
    fn fields_follow_the_negotiated_protocol() {
        assert_eq!(if_protocol(None, HLS_REQUESTS_PROTOCOL, 7), None);
        assert_eq!(if_protocol(Some(1), HLS_REQUESTS_PROTOCOL, 7), None);
        assert_eq!(if_protocol(Some(2), HLS_REQUESTS_PROTOCOL, 7), None);
        assert_eq!(if_protocol(Some(3), HLS_REQUESTS_PROTOCOL, 7), Some(7));
        assert_eq!(if_protocol(Some(4), HLS_REQUESTS_PROTOCOL, 7), Some(7));
    }

    #[test]
    fn batch_bounds() {
        let batch = |first_seq: u64, n: usize| {
            serde_json::to_vec(&Batch {
                v: 1,
                node_id: "n1".into(),
                epoch: 1,
                schema: Schema(1),
                first_seq,
                records: vec![json!({}); n],
            })
            .unwrap()
        };
        assert!(decode::<Batch>(&batch(1, 1)).is_ok());
        assert_eq!(
            decode::<Batch>(&batch(1, 0)).unwrap_err().code(),
            "invalid_field"
        );
        assert_eq!(
            decode::<Batch>(&batch(0, 1)).unwrap_err().code(),
            "invalid_field"
        );
        assert_eq!(
            decode::<Batch>(&batch(u64::MAX, 2)).unwrap_err().code(),
            "invalid_field"
        );
        assert_eq!(
            decode::<Batch>(&batch(1, limits::BATCH_RECORDS_MAX + 1))
                .unwrap_err()
                .code(),
            "invalid_field"
        );
    }

    #[test]
    fn epochs() {
        assert_eq!(check_epoch(3, 3), Ok(()));
        assert_eq!(
            check_epoch(2, 3),
            Err(StaleEpoch {
                held: 2,
                current: 3
            })
        );
        assert_eq!(
            check_epoch(4, 3),
            Err(StaleEpoch {
                held: 4,
                current: 3
            })
        );
    }
}
