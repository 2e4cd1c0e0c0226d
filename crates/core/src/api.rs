//! The operator API's requests and answers (`/api/v1/…`), as plain serde
//! types: the controller's handlers answer with them and the CLI's client
//! reads them, both from here. Their JSON is a promise to every operator
//! script reading `--json`, so a field never changes meaning; the tests
//! below pin each type against a literal JSON text.
//!
//! They live in the core rather than in a crate of their own because they
//! are built only from core types (releases, grants, the upgrade's plan and
//! state) and serde, with no IO: a separate crate would add a boundary with
//! no dependency of its own behind it.
//!
//! The store does not own any of them. It takes [`ChannelSpec`] and
//! [`EventSpec`] as its inputs, because they are exactly what it stores, and
//! answers with [`ChannelSpec`], [`EventView`], [`RecordSummary`] and
//! [`StoredRecord`], which are read-only views made for the operator with
//! nothing of the storage in them. The rows the controller itself works
//! with keep their own types in the store (`ClusterState`, the cluster row in
//! the controller's watch channel; `NodeRow`, the registry row the upgrade
//! and the node protocol read), converted at the store's edge into
//! [`ClusterInfo`] and [`NodeInfo`], so the database and the API can each
//! change without the other.
//!
//! Other API bodies already had a home in the core and stay there: groups
//! are [`crate::params::Group`], upgrade answers [`crate::upgrade::Upgrade`],
//! artifacts [`crate::artifact::Manifest`] and errors [`crate::wire::ErrorBody`],
//! whose `error` is one of this API's [`ErrorCode`]s (or, on the routes the
//! nodes call, one of [`crate::admission::ErrorCode`]).

use crate::artifact::ArtifactError;
use crate::grant::GrantReason;
use crate::params::v2::Rung;
use crate::upgrade::{NodeView, Phase, Plan, Upgrade};
use crate::wire::{OutboxState, Role};
use crate::{Grant, ProtocolRange, Release, ReleaseInfo, Schema};
use serde::{Deserialize, Serialize};
use std::fmt;

/// `GET /api/v1/status`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Status {
    pub controller: ControllerInfo,
    pub cluster: ClusterInfo,
    pub lease_ms: u64,
    pub nodes: Vec<NodeStatus>,
    /// The controller replicas alive on the database (one without replicas).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaStatus>,
}

/// One controller replica, as the one answering saw it at its last sync.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// `NAME/PID/RANDOM`: the replica's worker shown (its leading one, or its newest).
    pub replica: String,
    pub url: String,
    pub release: Release,
    /// Holds the upgrade orchestrator's lease, in this term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leads_term: Option<u64>,
    /// The replica that answered this status (one of its workers).
    #[serde(default)]
    pub answering: bool,
}

/// The running controller's release, as the operator sees it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ControllerInfo {
    pub release: Release,
    pub semver: String,
    pub schema: Schema,
    pub protocol: ProtocolRange,
    pub window_min_schema: Schema,
    /// SHA-256 of the binary this controller's worker runs.
    #[serde(default)]
    pub binary_sha256: Option<String>,
    /// SHA-256 of the binary its supervisor runs (None without one).
    #[serde(default)]
    pub supervisor_sha256: Option<String>,
}

impl From<&ReleaseInfo> for ControllerInfo {
    fn from(i: &ReleaseInfo) -> ControllerInfo {
        ControllerInfo {
            release: i.release,
            semver: i.semver.to_owned(),
            schema: i.schema,
            protocol: i.protocol,
            window_min_schema: i.window_min_schema,
            binary_sha256: None,
            supervisor_sha256: None,
        }
    }
}

/// Cluster-wide state: in the status, and the answer to `POST
/// /api/v1/fence` and `/unfence`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The cluster release: moves only when an upgrade finalizes.
    pub release: Release,
    pub schema: Schema,
    pub epoch: u64,
    pub fenced: bool,
    pub param_revision: u64,
}

/// One node as the operator sees it: its registry entry plus the grant in
/// force now (a fence changes it before the node's next heartbeat).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct NodeStatus {
    #[serde(flatten)]
    pub node: NodeInfo,
    pub grant_now: Grant,
    pub grant_reason: GrantReason,
    pub outbox_depth: u64,
    pub lease_expired: bool,
    /// HLS requests the node's worker answered, as its last heartbeat said
    /// (nodes of protocol 3 and newer; none before this controller heard one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hls_requests: Option<u64>,
}

/// A node's entry in the registry, as of its last hello or heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub node_id: String,
    pub release: Release,
    pub schema: Schema,
    pub role: Role,
    pub group: String,
    pub hls_url: String,
    /// The grant the node was last given.
    pub grant: Grant,
    pub epoch: u64,
    pub outbox: OutboxState,
    pub current_events: Vec<i64>,
    pub staged: Vec<String>,
    pub last_seen_ms: i64,
    /// Highest sequence acknowledged to this node.
    pub acked_through: u64,
    /// SHA-256 of the binary the node's worker runs, if it said.
    #[serde(default)]
    pub binary_sha256: Option<String>,
    /// SHA-256 of the binary the node's supervisor runs, if it said.
    #[serde(default)]
    pub supervisor_sha256: Option<String>,
}

/// A channel as the operator describes it, whatever the schema: the body of
/// `POST /api/v1/channels` and each item of `GET /api/v1/channels`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelSpec {
    pub name: String,
    #[serde(default)]
    pub title: Option<String>,
    pub segment_ms: u32,
    /// Renditions, highest first; release 1 keeps only the first.
    #[serde(default)]
    pub ladder: Vec<Rung>,
    /// Segments the channel's live playlist lists (its DVR window), from
    /// schema 3 on (default `params::v3::WINDOW_SEGMENTS_DEFAULT`); refused
    /// by a database of an older schema, where every channel lists
    /// `hls::WINDOW_SEGMENTS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_segments: Option<u32>,
}

/// An event as the operator describes it: the body of `POST /api/v1/events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSpec {
    pub channel: String,
    pub group: String,
    pub start_ms: i64,
    pub duration_ms: u64,
}

/// A stored event: the answer to `POST /api/v1/events` and each item of
/// `GET /api/v1/events`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventView {
    pub id: i64,
    pub channel: String,
    pub group: String,
    pub start_ms: i64,
    pub duration_ms: u64,
}

/// `GET /api/v1/groups/{name}/nodes`: where viewers of a group's channels go.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct GroupNodes {
    pub group: String,
    /// HLS base URLs, primary first; a node that never said hello is missing.
    pub hls_urls: Vec<String>,
}

/// Per-node totals of what the database holds: each item of `GET
/// /api/v1/records/summary`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordSummary {
    pub node_id: String,
    pub records: u64,
    pub max_seq: u64,
    pub translated: u64,
}

/// The query of `GET /api/v1/records`: one node's records after a sequence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsQuery {
    pub node: String,
    #[serde(default)]
    pub after_seq: u64,
    /// At most this many (and never more than the store's page).
    pub limit: Option<u32>,
}

/// One stored record, reduced to what a checker compares: each item of
/// `GET /api/v1/records`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRecord {
    pub node_id: String,
    pub seq: u64,
    pub kind: String,
    pub natural_key: String,
    /// Schema the node wrote it in, when it was translated on the way in.
    pub translated_from: Option<u32>,
}

/// The body of `POST /api/v1/nodes` (`handover node add`): a bootstrap
/// token for each node id, which some group must name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeAddRequest {
    /// At most [`crate::identity::NODE_ADD_BATCH_MAX`].
    pub ids: Vec<String>,
    /// How long each token is good [default: a day].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Also for nodes that hold a credential: the token, once traded,
    /// replaces it (a node that lost its data dir).
    #[serde(default)]
    pub replace: bool,
}

/// The answer to `POST /api/v1/nodes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddAnswer {
    pub tokens: Vec<IssuedToken>,
}

/// One bootstrap token: shown once, stored only as its digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedToken {
    pub node_id: String,
    pub group: String,
    pub role: Role,
    pub token: String,
    pub expires_at_ms: i64,
}

/// The answer to `DELETE /api/v1/nodes/{id}` (`handover node remove`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRemoved {
    pub node_id: String,
}

/// The body of `POST /api/v1/upgrade` and `/api/v1/upgrade/plan`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeRequest {
    /// Artifact id, as `handover artifact upload` printed it.
    pub artifact: String,
    /// `wait` (default), `failover` or `deadline=MS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Phases to pause at (e.g. `["primaries"]`), to look before going on.
    #[serde(default)]
    pub pause_at: Vec<Phase>,
}

impl UpgradeRequest {
    /// To `artifact` with primary policy `policy`, pausing nowhere.
    pub fn new(artifact: &str, policy: &str) -> UpgradeRequest {
        UpgradeRequest {
            artifact: artifact.to_owned(),
            policy: Some(policy.to_owned()),
            pause_at: Vec::new(),
        }
    }
}

/// `POST /api/v1/upgrade/plan`: the dry run.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct PlanAnswer {
    pub plan: Plan,
    /// `None` when preflight passes now; otherwise why it would stop.
    pub preflight_error: Option<String>,
    /// The ordered steps, per group, with what each waits for.
    pub steps: Vec<String>,
}

/// `GET /api/v1/upgrade`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct UpgradeStatus {
    pub upgrade: Option<Upgrade>,
    pub nodes: Vec<NodeView>,
    /// What abort would do now (or why it is refused).
    pub abort: Option<String>,
}

/// Every error code of the operator API (`/api/v1/…`, artifacts included),
/// the `error` of its [`crate::wire::ErrorBody`], with the HTTP status it is
/// answered with. The strings are a promise to operator scripts: never
/// renamed. Two answers take another status than their code's own: an
/// extractor's rejection (`malformed`, `too_large`) keeps axum's status, and
/// an artifact refusal ([`ErrorCode::of_artifact`]) is always 400 (404 for
/// the signature of an unsigned artifact).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request is not of the expected shape (path, query, JSON, header).
    Malformed,
    /// The body is over its limit.
    TooLarge,
    /// A field is out of its bounds.
    InvalidField,
    /// No or the wrong operator token.
    Unauthorized,
    /// A token that may not do this: the read-only token on a change
    /// (anything but `GET`), which needs the operator token.
    Forbidden,
    /// No such endpoint, group, upgrade, channel, event or artifact.
    NotFound,
    /// The endpoint does not take that method.
    MethodNotAllowed,
    /// Created already (a channel, an event, another artifact with the id).
    Exists,
    /// Another upgrade is under way.
    UpgradeRunning,
    /// Abort is refused in this phase (the answer says why).
    AbortRefused,
    /// The stored artifact cannot be served (torn or refused on reload).
    Unusable,
    /// A stored record cannot be translated to the schema asked for.
    Untranslatable,
    /// The database refused in a way no request can fix.
    StoreError,
    /// The artifact store (files) failed.
    StorageError,
    /// The database cannot be reached now; retry.
    StoreUnavailable,
    /// An upgrade or fence command sent to a controller replica that does
    /// not lead the orchestrator: nothing was done; send it to the leader
    /// (a client given every replica's URL moves on by itself).
    NotLeader,
    /// The artifact store is out of space.
    StoreFull,
    /// An upload without its manifest header.
    MissingManifest,
    /// The artifact's manifest is not valid (or does not match its URL).
    InvalidManifest,
    /// The upload's body ended before its size.
    UploadInterrupted,
    /// The manifest's version is not one this release reads.
    UnsupportedVersion,
    /// The manifest names a release this binary does not carry.
    UnknownRelease,
    /// The manifest's facts contradict the release it names.
    ReleaseMismatch,
    /// Not a valid artifact id.
    InvalidId,
    /// The binary's size is not the manifest's.
    SizeMismatch,
    /// The binary's SHA-256 is not the manifest's.
    DigestMismatch,
    /// Not signed, where only signed artifacts are taken.
    Unsigned,
    /// Signed by a key that is not trusted here.
    UntrustedKey,
    /// The signature does not verify or cannot be read.
    BadSignature,
    /// Not a minisign public key.
    BadPublicKey,
    /// The request body stopped arriving for longer than the listener's
    /// body read timeout (`handover_net::Limits::body_read_timeout_ms`).
    BodyTimeout,
    /// Serving as many artifact downloads as the server allows at once;
    /// retry later (`Retry-After`) or from another source.
    Busy,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 32] = [
        ErrorCode::Malformed,
        ErrorCode::TooLarge,
        ErrorCode::InvalidField,
        ErrorCode::Unauthorized,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::Exists,
        ErrorCode::UpgradeRunning,
        ErrorCode::AbortRefused,
        ErrorCode::Unusable,
        ErrorCode::Untranslatable,
        ErrorCode::StoreError,
        ErrorCode::StorageError,
        ErrorCode::StoreUnavailable,
        ErrorCode::StoreFull,
        ErrorCode::MissingManifest,
        ErrorCode::InvalidManifest,
        ErrorCode::UploadInterrupted,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownRelease,
        ErrorCode::ReleaseMismatch,
        ErrorCode::InvalidId,
        ErrorCode::SizeMismatch,
        ErrorCode::DigestMismatch,
        ErrorCode::Unsigned,
        ErrorCode::UntrustedKey,
        ErrorCode::BadSignature,
        ErrorCode::BadPublicKey,
        ErrorCode::BodyTimeout,
        ErrorCode::Forbidden,
        ErrorCode::NotLeader,
        ErrorCode::Busy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::InvalidField => "invalid_field",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::Exists => "exists",
            ErrorCode::UpgradeRunning => "upgrade_running",
            ErrorCode::AbortRefused => "abort_refused",
            ErrorCode::Unusable => "unusable",
            ErrorCode::Untranslatable => "untranslatable",
            ErrorCode::StoreError => "store_error",
            ErrorCode::StorageError => "storage_error",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::StoreFull => "store_full",
            ErrorCode::MissingManifest => "missing_manifest",
            ErrorCode::InvalidManifest => "invalid_manifest",
            ErrorCode::UploadInterrupted => "upload_interrupted",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownRelease => "unknown_release",
            ErrorCode::ReleaseMismatch => "release_mismatch",
            ErrorCode::InvalidId => "invalid_id",
            ErrorCode::SizeMismatch => "size_mismatch",
            ErrorCode::DigestMismatch => "digest_mismatch",
            ErrorCode::Unsigned => "unsigned",
            ErrorCode::UntrustedKey => "untrusted_key",
            ErrorCode::BadSignature => "bad_signature",
            ErrorCode::BadPublicKey => "bad_public_key",
            ErrorCode::BodyTimeout => "body_timeout",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotLeader => "not_leader",
            ErrorCode::Busy => "busy",
        }
    }

    /// The code an answer carried, if it is one of ours.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == code)
    }

    /// The HTTP status the code is answered with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::Malformed
            | ErrorCode::InvalidField
            | ErrorCode::MissingManifest
            | ErrorCode::InvalidManifest
            | ErrorCode::UploadInterrupted
            | ErrorCode::UnsupportedVersion
            | ErrorCode::UnknownRelease
            | ErrorCode::ReleaseMismatch
            | ErrorCode::InvalidId
            | ErrorCode::SizeMismatch
            | ErrorCode::DigestMismatch
            | ErrorCode::Unsigned
            | ErrorCode::UntrustedKey
            | ErrorCode::BadSignature
            | ErrorCode::BadPublicKey => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::BodyTimeout => 408,
            ErrorCode::Exists
            | ErrorCode::UpgradeRunning
            | ErrorCode::AbortRefused
            | ErrorCode::Unusable => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::Untranslatable => 422,
            ErrorCode::StoreError | ErrorCode::StorageError => 500,
            ErrorCode::StoreUnavailable | ErrorCode::NotLeader | ErrorCode::Busy => 503,
            ErrorCode::StoreFull => 507,
        }
    }

    /// The code of an artifact refusal (answered with 400 whatever the
    /// code's own status: the artifact, not the request, is at fault).
    pub fn of_artifact(e: &ArtifactError) -> ErrorCode {
        match e {
            ArtifactError::Malformed(_) => ErrorCode::Malformed,
            ArtifactError::ManifestTooLarge { .. } => ErrorCode::TooLarge,
            ArtifactError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            ArtifactError::UnknownRelease { .. } => ErrorCode::UnknownRelease,
            ArtifactError::ReleaseMismatch { .. } => ErrorCode::ReleaseMismatch,
            ArtifactError::BadSemver(_)
            | ArtifactError::BadSha256(_)
            | ArtifactError::BadSize(_)
            | ArtifactError::BadCreated(_)
            | ArtifactError::BadFacts(_) => ErrorCode::InvalidManifest,
            ArtifactError::BadId(_) => ErrorCode::InvalidId,
            ArtifactError::SizeMismatch { .. } => ErrorCode::SizeMismatch,
            ArtifactError::DigestMismatch { .. } => ErrorCode::DigestMismatch,
            ArtifactError::Unsigned => ErrorCode::Unsigned,
            ArtifactError::UntrustedKey { .. } => ErrorCode::UntrustedKey,
            ArtifactError::BadSignature(_) => ErrorCode::BadSignature,
            ArtifactError::BadPublicKey(_) => ErrorCode::BadPublicKey,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::DeserializeOwned;
    use serde_json::Value;

    /// `json` decodes as a `T` that encodes back to the same JSON: field
    /// names, optional fields, enum spellings and nesting are all pinned.
    fn check<T: Serialize + DeserializeOwned>(json: &str) {
        let want: Value = serde_json::from_str(json).expect("the literal is JSON");
        let decoded: T = serde_json::from_str(json).expect("the literal decodes");
        let got = serde_json::to_value(&decoded).expect("encodes");
        assert_eq!(got, want, "{}", std::any::type_name::<T>());
    }

    #[test]
    fn node_add_and_remove_keep_their_shape() {
        check::<NodeAddRequest>(r#"{"ids":["g1-a","g1-b"],"ttl_ms":60000,"replace":false}"#);
        check::<NodeAddAnswer>(
            r#"{"tokens":[{"node_id":"g1-a","group":"g1","role":"primary","token":"hob_x","expires_at_ms":5}]}"#,
        );
        check::<NodeRemoved>(r#"{"node_id":"g1-a"}"#);
    }

    #[test]
    fn error_codes_round_trip_and_carry_their_status() {
        let want: [(&str, u16); 32] = [
            ("malformed", 400),
            ("too_large", 413),
            ("invalid_field", 400),
            ("unauthorized", 401),
            ("not_found", 404),
            ("method_not_allowed", 405),
            ("exists", 409),
            ("upgrade_running", 409),
            ("abort_refused", 409),
            ("unusable", 409),
            ("untranslatable", 422),
            ("store_error", 500),
            ("storage_error", 500),
            ("store_unavailable", 503),
            ("store_full", 507),
            ("missing_manifest", 400),
            ("invalid_manifest", 400),
            ("upload_interrupted", 400),
            ("unsupported_version", 400),
            ("unknown_release", 400),
            ("release_mismatch", 400),
            ("invalid_id", 400),
            ("size_mismatch", 400),
            ("digest_mismatch", 400),
            ("unsigned", 400),
            ("untrusted_key", 400),
            ("bad_signature", 400),
            ("bad_public_key", 400),
            ("body_timeout", 408),
            ("forbidden", 403),
            ("not_leader", 503),
            ("busy", 503),
        ];
        for (code, (text, status)) in ErrorCode::ALL.into_iter().zip(want) {
            assert_eq!(code.as_str(), text);
            assert_eq!(code.to_string(), text);
            assert_eq!(ErrorCode::parse(text), Some(code));
            assert_eq!(code.status(), status, "{code}");
        }
        assert_eq!(ErrorCode::parse("stale_epoch"), None);
        // Codes the node protocol shares have the same status there.
        for code in crate::admission::ErrorCode::ALL {
            if let Some(ours) = ErrorCode::parse(code.as_str()) {
                assert_eq!(ours.status(), code.status(), "{code}");
            }
        }
    }

    #[test]
    fn artifact_refusals_keep_their_codes() {
        let text = || String::from("x");
        let every = [
            ArtifactError::Malformed(text()),
            ArtifactError::ManifestTooLarge { size: 1 },
            ArtifactError::UnsupportedVersion { found: 9 },
            ArtifactError::UnknownRelease {
                release: 9,
                carried: text(),
            },
            ArtifactError::BadFacts(text()),
            ArtifactError::ReleaseMismatch {
                release: 1,
                field: "schema",
                expected: text(),
                found: text(),
            },
            ArtifactError::BadSemver(text()),
            ArtifactError::BadSha256(text()),
            ArtifactError::BadSize(0),
            ArtifactError::BadCreated(-1),
            ArtifactError::BadId(text()),
            ArtifactError::SizeMismatch {
                expected: 1,
                actual: 2,
            },
            ArtifactError::DigestMismatch {
                expected: text(),
                actual: text(),
            },
            ArtifactError::Unsigned,
            ArtifactError::UntrustedKey {
                key_id: text(),
                trusted: text(),
            },
            ArtifactError::BadSignature(text()),
            ArtifactError::BadPublicKey(text()),
        ];
        for e in &every {
            assert_eq!(ErrorCode::of_artifact(e).as_str(), e.code(), "{e}");
        }
    }

    const NODE_STATUS: &str = r#"{
        "node_id": "g1-a", "release": 2, "schema": 2, "role": "primary", "group": "g1",
        "hls_url": "http://127.0.0.2:8080", "grant": "full", "epoch": 3,
        "outbox": {"next_seq": 11, "oldest_unacked_seq": 9, "count": 2},
        "current_events": [1], "staged": ["r2-abc"], "last_seen_ms": 1700000000000,
        "acked_through": 8, "binary_sha256": "ab12", "supervisor_sha256": null,
        "grant_now": "full", "grant_reason": "same_schema", "outbox_depth": 2,
        "lease_expired": false, "hls_requests": 40
    }"#;

    #[test]
    fn status() {
        check::<Status>(&format!(
            r#"{{
            "controller": {{"release": 2, "semver": "2.0.0", "schema": 2,
                "protocol": {{"min": 2, "max": 3}}, "window_min_schema": 1,
                "binary_sha256": "ab12", "supervisor_sha256": null}},
            "cluster": {{"release": 2, "schema": 2, "epoch": 3, "fenced": false, "param_revision": 5}},
            "lease_ms": 3000,
            "nodes": [{NODE_STATUS}]
        }}"#
        ));
    }

    #[test]
    fn node_status_leaves_out_unknown_hls_requests() {
        check::<NodeStatus>(
            r#"{"node_id": "g1-b", "release": 1, "schema": 1, "role": "backup", "group": "g1",
            "hls_url": "http://127.0.0.3:8080", "grant": "deliver", "epoch": 4,
            "outbox": {"next_seq": 1, "oldest_unacked_seq": null, "count": 0},
            "current_events": [], "staged": [], "last_seen_ms": 0, "acked_through": 0,
            "binary_sha256": null, "supervisor_sha256": null,
            "grant_now": "fenced", "grant_reason": "fence_in_force", "outbox_depth": 0,
            "lease_expired": true}"#,
        );
    }

    #[test]
    fn cluster_info() {
        check::<ClusterInfo>(
            r#"{"release": 1, "schema": 1, "epoch": 2, "fenced": true, "param_revision": 0}"#,
        );
    }

    #[test]
    fn channels_and_events() {
        check::<ChannelSpec>(
            r#"{"name": "news", "title": "News", "segment_ms": 2000,
            "ladder": [{"height": 720, "kbps": 3000}], "window_segments": 30}"#,
        );
        check::<ChannelSpec>(
            r#"{"name": "news", "title": null, "segment_ms": 2000, "ladder": []}"#,
        );
        check::<EventSpec>(
            r#"{"channel": "news", "group": "g1", "start_ms": 1700000000000, "duration_ms": 60000}"#,
        );
        check::<EventView>(
            r#"{"id": 7, "channel": "news", "group": "g1", "start_ms": 1700000000000, "duration_ms": 60000}"#,
        );
        check::<GroupNodes>(
            r#"{"group": "g1", "hls_urls": ["http://127.0.0.2:8080", "http://127.0.0.3:8080"]}"#,
        );
    }

    #[test]
    fn records() {
        check::<RecordSummary>(
            r#"{"node_id": "g1-a", "records": 120, "max_seq": 120, "translated": 40}"#,
        );
        check::<RecordsQuery>(r#"{"node": "g1-a", "after_seq": 100, "limit": 50}"#);
        check::<StoredRecord>(
            r#"{"node_id": "g1-a", "seq": 101, "kind": "segment", "natural_key": "news/51",
            "translated_from": 1}"#,
        );
    }

    #[test]
    fn upgrade_request() {
        check::<UpgradeRequest>(
            r#"{"artifact": "r2-0123456789ab", "policy": "deadline=60000",
            "pause_at": ["backups", "primaries"]}"#,
        );
        check::<UpgradeRequest>(r#"{"artifact": "r2-0123456789ab", "pause_at": []}"#);
    }

    #[test]
    fn plan_answer() {
        check::<PlanAnswer>(
            r#"{"plan": {"target": {"artifact_id": "r2-0123456789ab", "release": 2, "schema": 2,
                "size": 1000, "sha256": "0123456789ab"},
              "from_release": 1, "policy": {"policy": "deadline", "ms": 60000},
              "groups": [{"name": "g1", "primary": "g1-a", "backup": "g1-b"}],
              "pause_at": ["primaries"], "node_switch_wait_ms": 30000},
            "preflight_error": null,
            "steps": ["1. preflight"]}"#,
        );
    }

    #[test]
    fn upgrade_status() {
        check::<UpgradeStatus>(
            r#"{"upgrade": null,
            "nodes": [{"id": "g1-a", "role": "primary", "group": "g1", "release": 1, "schema": 1,
              "reachable": true, "grant": "full", "epoch": 1, "staged": [], "outbox_count": 0,
              "current_events": [3], "binary_sha256": "ab12", "supervisor_sha256": null}],
            "abort": null}"#,
        );
    }
}
