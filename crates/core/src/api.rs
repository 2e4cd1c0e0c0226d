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
//! artifacts [`crate::artifact::Manifest`] and errors [`crate::wire::ErrorBody`].

use crate::grant::GrantReason;
use crate::params::v2::Rung;
use crate::upgrade::{NodeView, Phase, Plan, Upgrade};
use crate::wire::{OutboxState, Role};
use crate::{Grant, ProtocolRange, Release, ReleaseInfo, Schema};
use serde::{Deserialize, Serialize};

/// `GET /api/v1/status`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Status {
    pub controller: ControllerInfo,
    pub cluster: ClusterInfo,
    pub lease_ms: u64,
    pub nodes: Vec<NodeStatus>,
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
