//! The operator API: status, channels, groups, nodes (bootstrap tokens,
//! removal), events, fence, records.
//! Every call needs `Authorization: Bearer <token>`, checked before any
//! handler runs ([`crate::auth`]: reads take the operator or the read-only
//! token, changes the operator token). Requests and answers are the types
//! of [`handover_core::api`], which the CLI reads too.

use crate::{now_ms, ApiError, ApiResult, Shared};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::Json;
use handover_core::api::{
    ChannelSpec, ClusterInfo, ControllerInfo, ErrorCode, EventSpec, EventView, GroupNodes,
    IssuedToken, NodeAddAnswer, NodeAddRequest, NodeRemoved, NodeStatus, RecordSummary,
    RecordsQuery, Status, StoredRecord,
};
use handover_core::grant::decide_grant;
use handover_core::identity::{
    SecretDigest, BOOTSTRAP_TOKEN_PREFIX, BOOTSTRAP_TTL_MS_DEFAULT, BOOTSTRAP_TTL_MS_MAX,
    BOOTSTRAP_TTL_MS_MIN, NODE_ADD_BATCH_MAX,
};
use handover_core::params::Group;
use handover_store::{NewBootstrapToken, RECORDS_PAGE_MAX};

pub async fn status(State(state): State<Shared>) -> ApiResult<Json<Status>> {
    let cluster = state.refresh_cluster().await?;
    let now = now_ms();
    let lease = i64::try_from(state.config.lease_ms).unwrap_or(i64::MAX);
    let hls_requests = state
        .hls_requests
        .read()
        .map(|m| m.clone())
        .unwrap_or_default();
    let nodes = state
        .store
        .nodes()
        .await?
        .into_iter()
        .map(|row| {
            let d = decide_grant(state.info, row.schema, cluster.fenced);
            NodeStatus {
                grant_now: d.grant,
                grant_reason: d.reason,
                outbox_depth: row.outbox.count,
                lease_expired: now.saturating_sub(row.last_seen_ms) > lease,
                hls_requests: hls_requests.get(&row.node_id).copied(),
                node: row.into(),
            }
        })
        .collect();
    Ok(Json(Status {
        controller: ControllerInfo {
            binary_sha256: state.binary_sha256.clone(),
            supervisor_sha256: handover_supervisor::supervisor_sha256().await,
            ..state.info.into()
        },
        cluster: cluster.into(),
        lease_ms: state.config.lease_ms,
        nodes,
        replicas: crate::replicas::statuses(&state),
    }))
}

pub async fn channels(State(state): State<Shared>) -> ApiResult<Json<Vec<ChannelSpec>>> {
    Ok(Json(state.store.channels().await?))
}

pub async fn create_channel(
    State(state): State<Shared>,
    body: Result<Json<ChannelSpec>, JsonRejection>,
) -> ApiResult<Json<ChannelSpec>> {
    let Json(spec) = body?;
    let created = state.store.create_channel(&spec).await?;
    state.refresh_cluster().await?;
    Ok(Json(created))
}

pub async fn groups(State(state): State<Shared>) -> ApiResult<Json<Vec<Group>>> {
    Ok(Json(state.store.groups().await?))
}

pub async fn create_group(
    State(state): State<Shared>,
    body: Result<Json<Group>, JsonRejection>,
) -> ApiResult<Json<Group>> {
    let Json(group) = body?;
    let update = state.members_update.lock().await;
    let created = state.store.create_group(&group).await?;
    if let Ok(mut m) = state.members.write() {
        m.extend(crate::membership_of(&created));
    }
    drop(update);
    state.refresh_cluster().await?;
    Ok(Json(created))
}

/// `handover node add`: a single-use bootstrap token for each node id a
/// group names. A node that holds a credential gets one only with
/// `replace` (its credential then stops working once the token is traded).
pub async fn add_nodes(
    State(state): State<Shared>,
    body: Result<Json<NodeAddRequest>, JsonRejection>,
) -> ApiResult<Json<NodeAddAnswer>> {
    let Json(req) = body?;
    let invalid = |m: String| ApiError::operator(ErrorCode::InvalidField, m);
    if req.ids.is_empty() || req.ids.len() > NODE_ADD_BATCH_MAX {
        return Err(invalid(format!(
            "ids: give 1 to {NODE_ADD_BATCH_MAX} node ids"
        )));
    }
    let ttl_ms = req.ttl_ms.unwrap_or(BOOTSTRAP_TTL_MS_DEFAULT);
    if !(BOOTSTRAP_TTL_MS_MIN..=BOOTSTRAP_TTL_MS_MAX).contains(&ttl_ms) {
        return Err(invalid(format!(
            "ttl_ms: a bootstrap token is good for {BOOTSTRAP_TTL_MS_MIN} to {BOOTSTRAP_TTL_MS_MAX} ms"
        )));
    }
    let expires_at_ms = now_ms().saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX));
    let mut issued = Vec::with_capacity(req.ids.len());
    let mut rows = Vec::with_capacity(req.ids.len());
    for id in &req.ids {
        let member = state
            .members
            .read()
            .ok()
            .and_then(|m| m.get(id).cloned())
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "no group names node {id:?}: create its group first (`handover group create`)"
                ))
            })?;
        if !req.replace && state.store.credential_of(id).await?.is_some() {
            return Err(ApiError::operator(
                ErrorCode::Exists,
                format!(
                    "node {id:?} already holds a credential; `handover node add {id} --replace` \
                     issues a token that replaces it, `handover node remove {id}` revokes it"
                ),
            ));
        }
        let token = format!(
            "{BOOTSTRAP_TOKEN_PREFIX}{:032x}{:032x}",
            rand::random::<u128>(),
            rand::random::<u128>()
        );
        rows.push(NewBootstrapToken {
            node_id: id.clone(),
            digest: SecretDigest::of(&token),
            expires_ms: expires_at_ms,
        });
        issued.push(IssuedToken {
            node_id: id.clone(),
            group: member.group,
            role: member.role,
            token,
            expires_at_ms,
        });
    }
    state.store.add_bootstrap_tokens(&rows).await?;
    tracing::info!(nodes = ?req.ids, replace = req.replace, "bootstrap tokens issued");
    Ok(Json(NodeAddAnswer { tokens: issued }))
}

/// `handover node remove`: the node's credential and bootstrap token stop
/// working at once and its registration is forgotten; its records stay.
pub async fn remove_node(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<NodeRemoved>> {
    let credential = state.store.credential_of(&id).await?;
    if !state.store.remove_node(&id).await? {
        return Err(ApiError::not_found(format!(
            "node {id:?} holds no credential, token or registration"
        )));
    }
    if let (Some(c), Ok(mut map)) = (credential, state.sessions.write()) {
        map.remove(&c);
    }
    if let Ok(mut m) = state.desired.write() {
        m.remove(&id);
    }
    tracing::warn!(node = %id, "node removed: its credential is revoked");
    Ok(Json(NodeRemoved { node_id: id }))
}

pub async fn group_nodes(
    State(state): State<Shared>,
    Path(name): Path<String>,
) -> ApiResult<Json<GroupNodes>> {
    let group = state
        .store
        .groups()
        .await?
        .into_iter()
        .find(|g| g.name == name)
        .ok_or_else(|| ApiError::not_found(format!("group {name:?} does not exist")))?;
    let nodes = state.store.nodes().await?;
    let url = |id: &str| {
        nodes
            .iter()
            .find(|n| n.node_id == id)
            .map(|n| n.hls_url.clone())
    };
    let hls_urls = [url(&group.primary), url(&group.backup)]
        .into_iter()
        .flatten()
        .collect();
    Ok(Json(GroupNodes {
        group: name,
        hls_urls,
    }))
}

pub async fn events(State(state): State<Shared>) -> ApiResult<Json<Vec<EventView>>> {
    Ok(Json(state.store.events().await?))
}

pub async fn create_event(
    State(state): State<Shared>,
    body: Result<Json<EventSpec>, JsonRejection>,
) -> ApiResult<Json<EventView>> {
    let Json(spec) = body?;
    let created = state.store.create_event(&spec).await?;
    state.refresh_cluster().await?;
    Ok(Json(created))
}

pub async fn fence(State(state): State<Shared>) -> ApiResult<Json<ClusterInfo>> {
    crate::replicas::require_leader(&state)?;
    state.store.set_fence(true).await?;
    let c = state.refresh_cluster().await?;
    tracing::warn!(epoch = c.epoch, "cluster fenced");
    Ok(Json(c.into()))
}

pub async fn unfence(State(state): State<Shared>) -> ApiResult<Json<ClusterInfo>> {
    crate::replicas::require_leader(&state)?;
    state.store.set_fence(false).await?;
    let c = state.refresh_cluster().await?;
    tracing::info!(epoch = c.epoch, "cluster unfenced");
    Ok(Json(c.into()))
}

pub async fn record_summary(State(state): State<Shared>) -> ApiResult<Json<Vec<RecordSummary>>> {
    Ok(Json(state.store.record_summary().await?))
}

pub async fn records(
    State(state): State<Shared>,
    q: Result<Query<RecordsQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<StoredRecord>>> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(RECORDS_PAGE_MAX).min(RECORDS_PAGE_MAX);
    Ok(Json(
        state.store.records(&q.node, q.after_seq, limit).await?,
    ))
}
