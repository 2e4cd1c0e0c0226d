//! The operator's upgrade API: plan (a dry run), start, status, pause,
//! resume and abort. The same state `handover upgrade status` shows; the
//! requests and answers are [`handover_core::api`]'s. Who may call them is
//! [`crate::auth`]'s (status: either token; the rest: the operator's).

use crate::orchestrator::{self, cluster_view, node_views, now_ms_u64};
use crate::{ApiError, ApiResult, Shared};
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;
use handover_core::api::{ErrorCode, PlanAnswer, UpgradeRequest, UpgradeStatus};
use handover_core::upgrade::{
    preflight, Input, NodeView, Path, Plan, PlanGroup, PrimaryPolicy, Target, Upgrade,
};

async fn plan_of(state: &Shared, req: &UpgradeRequest) -> ApiResult<Plan> {
    // With trusted keys, only an artifact whose stored signature verifies
    // is found: an unsigned or untrusted one is refused here, before any
    // upgrade starts (400 `unsigned`, `untrusted_key` or `bad_signature`).
    let s = state.clone();
    let id = req.artifact.clone();
    let manifest = tokio::task::spawn_blocking(move || s.artifacts.find(&id))
        .await
        .map_err(|e| {
            ApiError::operator(
                ErrorCode::StorageError,
                format!("artifact store task failed: {e}"),
            )
        })??
        .manifest;
    let policy = match req.policy.as_deref() {
        None => PrimaryPolicy::Wait,
        Some(text) => PrimaryPolicy::parse(text)
            .map_err(|e| ApiError::operator(ErrorCode::InvalidField, e))?,
    };
    let groups = state
        .store
        .groups()
        .await?
        .into_iter()
        .map(|g| PlanGroup {
            name: g.name,
            primary: g.primary,
            backup: g.backup,
        })
        .collect();
    Ok(Plan {
        target: Target::of(&manifest),
        from_release: state.info.release,
        policy,
        groups,
        pause_at: req.pause_at.clone(),
        node_switch_wait_ms: state.config.node_switch_wait_ms,
    })
}

fn steps(plan: &Plan, nodes: &[NodeView], path: Path) -> Vec<String> {
    let t = &plan.target;
    let events = |id: &str| {
        nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| format!("{:?}", n.current_events))
            .unwrap_or_else(|| "[]".into())
    };
    let mut out = vec![
        format!("1. preflight: artifact {} (release {}, schema {}), judged by its manifest: every node inside its support window, the database among the schemas it migrates from, contracts, disk room", t.artifact_id, t.release, t.schema),
        format!("2. stage: every node downloads and verifies {} ahead of time", t.artifact_id),
    ];
    match path {
        Path::Incompatible => out.extend([
            "3. fence: epoch + 1; wait for every node to persist the fence (a silent node is fenced by the epoch)".to_owned(),
            format!("4. controller: snapshot the database, start release {} on the same socket, migrate in one transaction, self-check; on failure roll back and unfence", t.release),
            format!("5. deliver: release-{} nodes get `deliver` and drain their outboxes through the controller, translated", plan.from_release),
        ]),
        Path::Compatible => out.push(format!(
            "3-5. controller: same schema, so no fence and no deliver: start release {} on the same socket and self-check; nodes keep `full` throughout",
            t.release
        )),
    }
    for g in &plan.groups {
        out.push(format!("6. backups/{}: {} drains, switches to release {}, says hello, gets `full`, passes its health gate", g.name, g.backup, t.release));
    }
    let wait = match plan.policy {
        PrimaryPolicy::Wait => "waits for its current events to end".to_owned(),
        PrimaryPolicy::Failover => {
            "switches as soon as its backup passed its health gate".to_owned()
        }
        PrimaryPolicy::Deadline { ms } => {
            format!("waits for its current events to end, at most {ms} ms, then switches")
        }
    };
    for g in &plan.groups {
        out.push(format!("7. primaries/{}: {} takes no new event, {wait} (now running {}), then switches the same way", g.name, g.primary, events(&g.primary)));
    }
    out.push(format!(
        "8. finalize: every node on release {}: the cluster release moves (the point of no return)",
        t.release
    ));
    out
}

pub async fn plan(
    State(state): State<Shared>,
    body: Result<Json<UpgradeRequest>, JsonRejection>,
) -> ApiResult<Json<PlanAnswer>> {
    let Json(req) = body?;
    let plan = plan_of(&state, &req).await?;
    let nodes = node_views(&state).await?;
    let checked = preflight(&plan, &nodes, &cluster_view(&state).await?);
    let steps = steps(&plan, &nodes, checked.clone().unwrap_or_default());
    let preflight_error = checked.err();
    Ok(Json(PlanAnswer {
        plan,
        preflight_error,
        steps,
    }))
}

pub async fn start(
    State(state): State<Shared>,
    body: Result<Json<UpgradeRequest>, JsonRejection>,
) -> ApiResult<Json<Upgrade>> {
    let Json(req) = body?;
    let plan = plan_of(&state, &req).await?;
    Ok(Json(
        orchestrator::start(&state, Upgrade::new(plan, now_ms_u64())).await?,
    ))
}

pub async fn status(State(state): State<Shared>) -> ApiResult<Json<UpgradeStatus>> {
    let upgrade = state
        .upgrade
        .lock()
        .await
        .as_ref()
        .map(|(_, up)| up.clone());
    let abort = upgrade.as_ref().map(|u| match u.abort_answer() {
        Ok(a) => a.to_owned(),
        Err(refused) => format!("refused: {refused}"),
    });
    Ok(Json(UpgradeStatus {
        upgrade,
        nodes: node_views(&state).await?,
        abort,
    }))
}

async fn control(state: Shared, input: Input) -> ApiResult<Json<Upgrade>> {
    let refused = match &input {
        Input::Abort => state
            .upgrade
            .lock()
            .await
            .as_ref()
            .and_then(|(_, u)| u.abort_answer().err()),
        _ => None,
    };
    if let Some(why) = refused {
        return Err(ApiError::operator(ErrorCode::AbortRefused, why));
    }
    let up = orchestrator::step(&state, input)
        .await?
        .ok_or_else(|| ApiError::not_found("no upgrade was ever started"))?;
    Ok(Json(up))
}

pub async fn pause(State(state): State<Shared>) -> ApiResult<Json<Upgrade>> {
    control(state, Input::Pause).await
}

pub async fn resume(State(state): State<Shared>) -> ApiResult<Json<Upgrade>> {
    control(state, Input::Resume).await
}

pub async fn abort(State(state): State<Shared>) -> ApiResult<Json<Upgrade>> {
    control(state, Input::Abort).await
}
