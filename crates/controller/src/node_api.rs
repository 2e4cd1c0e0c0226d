//! The node protocol: hello, heartbeat, watch, params and the two channels.

use crate::{bearer, now_ms, ApiError, ApiResult, Session, Shared};
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::FromRequestParts;
use axum::extract::{Query, State};
use axum::http::request::Parts;
use axum::Json;
use handover_core::admission::{Channel, ErrorCode};
use handover_core::identity::{self, Proof, SecretDigest};
use handover_core::wire::{
    self, limits, Batch, GrantState, Heartbeat, Hello, ParamsAnswer, Welcome,
};
use handover_core::Grant;
use handover_net::tls::PeerCertificate;
use handover_store::NodeRegistration;
use serde::Deserialize;
use std::time::Duration;

/// What a node request presents as its credential: the client certificate
/// its connection proved it holds, if any (then a bearer is not looked at),
/// else its `Authorization: Bearer` credential.
#[derive(Clone, Debug, Default)]
pub struct NodeProof {
    certificate: Option<SecretDigest>,
    bearer: Option<SecretDigest>,
}

impl NodeProof {
    /// The digest to look the node up by.
    pub fn credential(&self) -> Option<&SecretDigest> {
        self.certificate.as_ref().or(self.bearer.as_ref())
    }
}

impl<S: Send + Sync> FromRequestParts<S> for NodeProof {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<NodeProof, Self::Rejection> {
        Ok(NodeProof {
            certificate: parts
                .extensions
                .get::<PeerCertificate>()
                .map(|c| SecretDigest::of_certificate(&c.sha256_hex)),
            bearer: bearer(&parts.headers).map(SecretDigest::of),
        })
    }
}

/// Finds the session a credential belongs to, from memory or, after a
/// controller restart, from the registry (by the credential's digest).
pub(crate) async fn session(
    state: &Shared,
    proof: &NodeProof,
    node_hint: Option<&str>,
) -> ApiResult<Session> {
    crate::replicas::require_attached(state)?;
    let digest = proof.credential().cloned().ok_or_else(|| {
        ApiError::unauthorized(
            "no credential: present this node's client certificate (https) or \
             `Authorization: Bearer <credential>`; send hello first",
        )
    })?;
    let cached = state
        .sessions
        .read()
        .ok()
        .and_then(|map| map.get(&digest).cloned());
    let s = match cached {
        Some(s) => s,
        None => {
            let (node_id, schema) = state
                .store
                .node_by_credential(&digest)
                .await?
                .ok_or_else(|| {
                    ApiError::unauthorized(
                        "unknown or revoked credential; send hello again with this node's credential \
                         or its bootstrap token",
                    )
                })?;
            let s = Session { node_id, schema };
            if let Ok(mut map) = state.sessions.write() {
                map.insert(digest, s.clone());
            }
            s
        }
    };
    if node_hint.is_some_and(|n| n != s.node_id) {
        return Err(ApiError::unauthorized(
            "this credential belongs to another node",
        ));
    }
    Ok(s)
}

/// The handshake. Who the node is comes first ([`identity::admit_hello`]:
/// the groups name it, in that role, and it proves the id with its
/// credential or its unused bootstrap token); only then is anything it says
/// about itself registered.
pub async fn hello(
    State(state): State<Shared>,
    proof: NodeProof,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<Welcome>> {
    crate::replicas::require_attached(&state)?;
    let hello: Hello = wire::decode(&body?)?;
    let id = &hello.node_id;
    let membership = state.members.read().ok().and_then(|m| m.get(id).cloned());
    let existing = state.store.credential_of(id).await?;
    let presented = match proof.certificate {
        Some(certificate) => identity::Presented::certificate(&hello, certificate),
        None => identity::Presented::bearer(&hello),
    };
    // A node's own credential (every hello but its first) needs no second
    // read: the bootstrap token matters only when the credential does not
    // match (a reconnect storm is 10,000 such hellos).
    let bootstrap = match &existing {
        Some(c) if c.matches(&presented.credential) => None,
        _ => state.store.bootstrap_token(id).await?,
    };
    let known = identity::Known {
        membership: membership.as_ref(),
        credential: existing.as_ref(),
        bootstrap: bootstrap.as_ref(),
    };
    let now = now_ms();
    // What the welcome hands back as the node's credential: its bearer
    // secret, or its certificate's digest (public: the certificate proves it).
    let handed_back = |digest: &SecretDigest, secret: &str| {
        if digest.is_certificate() {
            digest.as_str().to_owned()
        } else {
            secret.to_owned()
        }
    };
    let (credential, digest) = match identity::admit_hello(&hello, &presented, known, now) {
        Err(refusal) => {
            tracing::warn!(node = %id, code = %refusal.code, "hello refused: {}", refusal.message);
            return Err(refusal.into());
        }
        Ok(Proof::Credential) => (
            handed_back(&presented.credential, &hello.token),
            presented.credential,
        ),
        Ok(Proof::Bootstrap) => {
            // admit_hello admits a bootstrap token only with a new credential.
            let Some(digest) = presented.new_credential else {
                return Err(ApiError::unauthorized(
                    "no credential to trade the token for",
                ));
            };
            let credential =
                handed_back(&digest, hello.new_credential.as_deref().unwrap_or_default());
            if !state
                .store
                .trade_bootstrap_token(id, &presented.token, &digest, now)
                .await?
            {
                // Another hello traded it (or it expired) since it was read.
                return Err(ApiError::unauthorized(format!(
                    "the bootstrap token of node {id:?} was used or expired just now; \
                     issue a new one with `handover node add {id} --replace`"
                )));
            }
            tracing::info!(
                node = %id,
                certificate = digest.is_certificate(),
                "bootstrap token traded for the node's credential"
            );
            (credential, digest)
        }
    };
    state.refresh_cluster().await?;
    let view = state.view();
    let desired = state.desired_of(id).await?;
    let welcome = wire::welcome(&view, &hello, credential, desired)
        .map_err(|e| ApiError::node(ErrorCode::NoCommonProtocol, e.to_string()))?;
    state
        .store
        .register_node(&NodeRegistration {
            node_id: hello.node_id.clone(),
            release: hello.release,
            schema: hello.schema,
            role: hello.role,
            group: hello.group.clone(),
            hls_url: hello.hls_url.clone(),
            grant: welcome.grant,
            epoch: welcome.epoch,
            outbox: hello.outbox,
            current_events: hello.current_events.clone(),
            staged: hello.staged.clone(),
            now_ms: now,
            binary_sha256: hello.binary_sha256.clone(),
            supervisor_sha256: hello.supervisor_sha256.clone(),
        })
        .await?;
    if let Ok(mut map) = state.sessions.write() {
        // The credential this hello replaced (if any) stops working. Removed
        // by key: a scan of every session made 10,000 hellos quadratic.
        if let Some(old) = existing.as_ref().filter(|old| **old != digest) {
            map.remove(old);
        }
        map.insert(
            digest,
            Session {
                node_id: hello.node_id.clone(),
                schema: hello.schema,
            },
        );
    }
    tracing::info!(node = %hello.node_id, release = hello.release.0, grant = %welcome.grant, epoch = welcome.epoch, "hello");
    Ok(Json(welcome))
}

pub async fn heartbeat(
    State(state): State<Shared>,
    proof: NodeProof,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<GrantState>> {
    let hb: Heartbeat = wire::decode(&body?)?;
    let s = session(&state, &proof, Some(&hb.node_id)).await?;
    state.admission().heartbeat(hb.epoch)?;
    let grant = state
        .view()
        .grant_state(s.schema, state.desired_of(&s.node_id).await?);
    state
        .store
        .heartbeat(&s.node_id, &hb, grant.grant, now_ms())
        .await?;
    if let (Some(n), Ok(mut map)) = (hb.hls_requests, state.hls_requests.write()) {
        map.insert(s.node_id.clone(), n);
    }
    Ok(Json(grant))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    node: Option<String>,
    epoch: u64,
    grant: Grant,
    wait_ms: Option<u64>,
    /// The desired-state revision the node holds; a newer one answers at once.
    desired_rev: Option<u64>,
}

/// Long-poll: answers as soon as the node's grant or epoch differs from what
/// it holds, or when the wait ends. This is how a fence reaches a node in
/// milliseconds rather than at its next heartbeat. A node holds at most
/// [`crate::watches::WATCHES_PER_NODE_MAX`] watches: a newer one makes the
/// oldest answer at once with the current state.
pub async fn watch(
    State(state): State<Shared>,
    proof: NodeProof,
    q: Result<Query<WatchQuery>, QueryRejection>,
) -> ApiResult<Json<GrantState>> {
    let Query(q) = q?;
    let s = session(&state, &proof, q.node.as_deref()).await?;
    let wait = Duration::from_millis(
        q.wait_ms
            .unwrap_or(limits::WATCH_WAIT_MS_MAX)
            .min(limits::WATCH_WAIT_MS_MAX),
    );
    let mut cluster = state.cluster.subscribe();
    let mut desired = state.desired_rev.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    // At most `WATCHES_PER_NODE_MAX` per node: a newer one ends this one.
    let held = state.watches.begin(&s.node_id);
    loop {
        let current = state
            .view()
            .grant_state(s.schema, state.desired_of(&s.node_id).await?);
        let desired_moved = q.desired_rev.is_some_and(|r| r != current.desired_rev);
        if current.epoch != q.epoch || current.grant != q.grant || desired_moved {
            return Ok(Json(current));
        }
        let changed = tokio::time::timeout_at(deadline, async {
            tokio::select! {
                r = cluster.changed() => r.map(|()| true),
                r = desired.changed() => r.map(|()| true),
                () = held.superseded() => Ok(false),
            }
        });
        match changed.await {
            Ok(Ok(true)) => continue,
            Ok(Ok(false)) | Ok(Err(_)) | Err(_) => return Ok(Json(current)),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamsQuery {
    node: Option<String>,
    epoch: u64,
}

pub async fn params(
    State(state): State<Shared>,
    proof: NodeProof,
    q: Result<Query<ParamsQuery>, QueryRejection>,
) -> ApiResult<Json<ParamsAnswer>> {
    let Query(q) = q?;
    let s = session(&state, &proof, q.node.as_deref()).await?;
    let view = state.view();
    state.admission().params(s.schema, q.epoch)?;
    let params = state.store.params().await?;
    Ok(Json(ParamsAnswer {
        schema: state.info.schema,
        revision: view.param_revision,
        params,
    }))
}

async fn ingest(
    state: Shared,
    proof: NodeProof,
    body: Result<Bytes, BytesRejection>,
    channel: Channel,
) -> ApiResult<Json<wire::BatchAck>> {
    let batch: Batch = wire::decode(&body?)?;
    let s = session(&state, &proof, Some(&batch.node_id)).await?;
    state
        .admission()
        .batch(channel, s.schema, batch.epoch, batch.schema)?;
    let out = state
        .store
        .store_batch(
            &s.node_id,
            batch.schema,
            batch.first_seq,
            &batch.records,
            batch.epoch,
        )
        .await?;
    Ok(Json(wire::BatchAck {
        v: wire::MESSAGE_VERSION,
        acked_through: out.acked_through,
        stored: out.stored,
        translated: out.translated,
    }))
}

pub async fn records(
    State(state): State<Shared>,
    proof: NodeProof,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<wire::BatchAck>> {
    ingest(state, proof, body, Channel::Main).await
}

pub async fn deliver(
    State(state): State<Shared>,
    proof: NodeProof,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Json<wire::BatchAck>> {
    ingest(state, proof, body, Channel::Redundant).await
}
