//! The operator API: status, channels, groups, events, fence, records.
//! Every call needs `Authorization: Bearer <operator token>`. Requests and
//! answers are the types of [`handover_core::api`], which the CLI reads too.

use crate::{check_operator_token, now_ms, ApiError, ApiResult, Shared};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::Json;
use handover_core::api::{
    ChannelSpec, ClusterInfo, ControllerInfo, EventSpec, EventView, GroupNodes, NodeStatus,
    RecordSummary, RecordsQuery, Status, StoredRecord,
};
use handover_core::grant::decide_grant;
use handover_core::params::Group;
use handover_store::RECORDS_PAGE_MAX;

pub(crate) fn operator(state: &Shared, headers: &HeaderMap) -> ApiResult<()> {
    check_operator_token(headers, &state.config.operator_token)
}

pub async fn status(State(state): State<Shared>, headers: HeaderMap) -> ApiResult<Json<Status>> {
    operator(&state, &headers)?;
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
    }))
}

pub async fn channels(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<ChannelSpec>>> {
    operator(&state, &headers)?;
    Ok(Json(state.store.channels().await?))
}

pub async fn create_channel(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Json<ChannelSpec>, JsonRejection>,
) -> ApiResult<Json<ChannelSpec>> {
    operator(&state, &headers)?;
    let Json(spec) = body?;
    let created = state.store.create_channel(&spec).await?;
    state.refresh_cluster().await?;
    Ok(Json(created))
}

pub async fn groups(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<Group>>> {
    operator(&state, &headers)?;
    Ok(Json(state.store.groups().await?))
}

pub async fn create_group(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Json<Group>, JsonRejection>,
) -> ApiResult<Json<Group>> {
    operator(&state, &headers)?;
    let Json(group) = body?;
    let created = state.store.create_group(&group).await?;
    state.refresh_cluster().await?;
    Ok(Json(created))
}

pub async fn group_nodes(
    State(state): State<Shared>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<GroupNodes>> {
    operator(&state, &headers)?;
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

pub async fn events(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<EventView>>> {
    operator(&state, &headers)?;
    Ok(Json(state.store.events().await?))
}

pub async fn create_event(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Json<EventSpec>, JsonRejection>,
) -> ApiResult<Json<EventView>> {
    operator(&state, &headers)?;
    let Json(spec) = body?;
    let created = state.store.create_event(&spec).await?;
    state.refresh_cluster().await?;
    Ok(Json(created))
}

pub async fn fence(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> ApiResult<Json<ClusterInfo>> {
    operator(&state, &headers)?;
    state.store.set_fence(true).await?;
    let c = state.refresh_cluster().await?;
    tracing::warn!(epoch = c.epoch, "cluster fenced");
    Ok(Json(c.into()))
}

pub async fn unfence(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> ApiResult<Json<ClusterInfo>> {
    operator(&state, &headers)?;
    state.store.set_fence(false).await?;
    let c = state.refresh_cluster().await?;
    tracing::info!(epoch = c.epoch, "cluster unfenced");
    Ok(Json(c.into()))
}

pub async fn record_summary(
    State(state): State<Shared>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<RecordSummary>>> {
    operator(&state, &headers)?;
    Ok(Json(state.store.record_summary().await?))
}

pub async fn records(
    State(state): State<Shared>,
    headers: HeaderMap,
    q: Result<Query<RecordsQuery>, QueryRejection>,
) -> ApiResult<Json<Vec<StoredRecord>>> {
    operator(&state, &headers)?;
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(RECORDS_PAGE_MAX).min(RECORDS_PAGE_MAX);
    Ok(Json(
        state.store.records(&q.node, q.after_seq, limit).await?,
    ))
}
