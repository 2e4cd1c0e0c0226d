//! The node's upgrade agent: stages the artifact the controller names, and
//! switches release through the supervisor when told to. Also tells the
//! supervisor when this worker is ready to serve.

use crate::lifecycle::Lifecycle;
use crate::session::Session;
use crate::stage;
use crate::store::{keys, Commit, Store};
use handover_core::agent;
use handover_core::artifact::PublicKey;
use handover_core::{Grant, Release, ReleaseInfo};
use handover_supervisor::{Release as SupervisedRelease, SupervisorClient, SwitchOutcome};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Staging retries back off up to this.
pub const STAGE_RETRY_MS_MAX: u64 = 5_000;
/// First pause after a failed staging; doubles up to [`STAGE_RETRY_MS_MAX`].
pub const STAGE_RETRY_MS_MIN: u64 = 100;
/// A worker reports ready at the latest this long after start, even if the
/// controller is unreachable: it can serve viewers from its cache.
pub const READY_WAIT_MS: u64 = 10_000;

pub(crate) struct Agent {
    pub session: Arc<Session>,
    pub data_dir: PathBuf,
    pub controller_url: String,
    pub release: &'static ReleaseInfo,
    pub store: Arc<Store>,
    pub lifecycle: Arc<Lifecycle>,
    pub supervisor: Option<SupervisorClient>,
    /// Keys an artifact must be signed by (none: not signature-checked).
    pub trusted: Vec<PublicKey>,
    /// Why the artifact the controller names cannot be staged (shown on
    /// /status); cleared once it is staged or no longer asked for.
    pub stage_error: Arc<Mutex<Option<String>>>,
}

/// A switch the supervisor refused, kept in kv ([`keys::SWITCH_FAILED`]) so
/// the worker restarted on the old release does not try it again at once
/// (each try stops producing and restarts the worker); shown on /status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchFailure {
    pub artifact: String,
    pub release: u32,
    pub reason: String,
    pub at_ms: i64,
    /// The controller withdrew the switch since: a new request is a new try.
    #[serde(default)]
    pub withdrawn: bool,
}

async fn remember(store: &Store, failure: &SwitchFailure) -> Result<(), crate::store::StoreError> {
    let value = serde_json::to_string(failure)
        .map_err(|e| crate::store::StoreError::Corrupt(e.to_string()))?;
    store
        .kv_put(vec![(keys::SWITCH_FAILED.to_owned(), value)])
        .await
}

/// The switch failure this node remembers, if any.
pub async fn switch_failure(store: &Store) -> Option<SwitchFailure> {
    let raw = store.kv_get(keys::SWITCH_FAILED).await.ok()??;
    serde_json::from_str(&raw).ok()
}

impl Agent {
    pub(crate) async fn run(self) {
        self.session.set_staged(
            stage::staged(&self.data_dir, &self.trusted)
                .iter()
                .map(|m| m.id())
                .collect(),
        );
        let http = match reqwest::Client::builder().no_proxy().build() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the staging client; upgrades cannot be staged");
                return;
            }
        };
        let mut rx = self.session.link();
        let mut retry_ms = STAGE_RETRY_MS_MIN;
        let mut failed = switch_failure(&self.store).await;
        if failed
            .as_ref()
            .is_some_and(|f| f.release == self.release.release.0)
        {
            // This worker runs the release that once failed: the failure is history.
            let forget = Commit {
                delete: vec![keys::SWITCH_FAILED.to_owned()],
                ..Commit::default()
            };
            match self.store.commit(&forget).await {
                Ok(_) => failed = None,
                Err(e) => tracing::warn!(error = %e, "cannot forget the failed switch"),
            }
        }
        loop {
            let link = rx.borrow_and_update().clone();
            let desired = link.desired.clone();
            // Once the controller withdraws the switch, a later request is a new try.
            if let Some(f) = failed.as_mut().filter(|f| !f.withdrawn) {
                if agent::switch_withdrawn(&desired, link.desired_rev.is_some()) {
                    f.withdrawn = true;
                    if let Err(e) = remember(&self.store, f).await {
                        tracing::warn!(error = %e, "cannot note that the failed switch was withdrawn");
                    }
                }
            }
            if desired.stage.is_none() {
                self.set_stage_error(None);
            }
            let staged_ids = self.session.staged();
            let already_runs = match (desired.switch_to, &desired.stage) {
                (Some(to), Some(id)) => self.runs(to, id),
                _ => false,
            };
            let refused = failed
                .as_ref()
                .filter(|f| !f.withdrawn)
                .map(|f| f.artifact.as_str());
            let todo = agent::plan(&desired, &staged_ids, already_runs, refused);
            if let (Some(id), Some(credential)) = (&todo.stage, &link.credential) {
                match stage::stage(
                    &http,
                    &self.controller_url,
                    credential,
                    &self.data_dir,
                    id,
                    &self.trusted,
                )
                .await
                {
                    Ok(staged) => {
                        tracing::info!(artifact = %id, binary = %staged.binary.display(), "artifact staged");
                        self.set_stage_error(None);
                        self.session.set_staged(
                            stage::staged(&self.data_dir, &self.trusted)
                                .iter()
                                .map(|m| m.id())
                                .collect(),
                        );
                        retry_ms = STAGE_RETRY_MS_MIN;
                        if !self.session.staged().contains(id) {
                            // Staged but not usable here (e.g. its signature no longer
                            // verifies): wait as after a failure, never spin.
                            tokio::time::sleep(Duration::from_millis(STAGE_RETRY_MS_MAX)).await;
                        }
                    }
                    Err(e) => {
                        tracing::error!(artifact = %id, error = %e, "cannot stage the artifact; this release keeps running");
                        self.set_stage_error(Some(e.to_string()));
                        tokio::time::sleep(Duration::from_millis(retry_ms)).await;
                        retry_ms = (retry_ms * 2).min(STAGE_RETRY_MS_MAX);
                    }
                }
                // Plan again with what is staged now (a switch may be due).
                continue;
            }
            if let Some((id, _)) = &todo.switch {
                self.switch(id).await;
                return;
            }
            if let (Some(f), Some(id)) = (refused, &desired.stage) {
                if f == id && desired.switch_to.is_some() {
                    tracing::warn!(
                        artifact = %id,
                        "not switching again: this switch failed; waiting for the controller to ask anew"
                    );
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Whether this worker already runs artifact `id` as release `to`: the
    /// same release from the same bytes (a patch build has the release of
    /// the one it replaces, so the release alone does not tell).
    fn runs(&self, to: Release, id: &str) -> bool {
        if to != self.release.release {
            return false;
        }
        let Some(own) = handover_supervisor::binary_sha256() else {
            return true;
        };
        stage::staged(&self.data_dir, &self.trusted)
            .iter()
            .find(|m| m.id() == id)
            .is_none_or(|m| m.sha256 == own)
    }

    fn set_stage_error(&self, error: Option<String>) {
        *self.stage_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// Quiesces this worker and asks the supervisor to start the staged
    /// release on the same socket. On success the supervisor stops this
    /// worker; on failure the worker exits so its supervisor restarts the
    /// release it knows to work.
    async fn switch(&self, id: &str) {
        let Some(staged) = stage::staged(&self.data_dir, &self.trusted)
            .into_iter()
            .find(|m| m.id() == id)
        else {
            return;
        };
        let Some(client) = &self.supervisor else {
            tracing::error!(
                "told to switch release, but this node runs without a supervisor (--no-supervisor)"
            );
            return;
        };
        let binary = stage::binary_path(&self.data_dir, id);
        tracing::info!(release = staged.release.0, binary = %binary.display(), "switching release");
        self.lifecycle.quiesce().await;
        let to = SupervisedRelease {
            release: staged.release.0,
            binary,
            sha256: Some(staged.sha256.clone()),
            contracts: Some(staged.contracts),
        };
        match client.switch(&to).await {
            Ok(SwitchOutcome::Switched { .. } | SwitchOutcome::AlreadyActive { .. }) => {
                tracing::info!(
                    "the new release is serving; this worker finishes its requests and exits"
                )
            }
            Ok(SwitchOutcome::Failed { reason, .. }) => {
                // This worker has quiesced: it exits, and its supervisor starts
                // the old release again, which remembers not to retry at once.
                let failure = SwitchFailure {
                    artifact: id.to_owned(),
                    release: staged.release.0,
                    reason: format!(
                        "the supervisor refused the switch to release {}: {reason}",
                        staged.release.0
                    ),
                    at_ms: crate::runtime::wall_clock_ms(),
                    withdrawn: false,
                };
                if let Err(e) = remember(&self.store, &failure).await {
                    tracing::error!(error = %e, "cannot remember the failed switch");
                }
                self.lifecycle.fail(failure.reason)
            }
            Err(e) => self.lifecycle.fail(format!(
                "switch to release {} failed: {e}",
                staged.release.0
            )),
        }
    }
}

/// Tells the supervisor this worker is ready: after its first hello and,
/// with a `full` grant, after its parameters are cached; at the latest after
/// [`READY_WAIT_MS`] (it can serve from its cache).
pub(crate) async fn report_ready(client: SupervisorClient, session: Arc<Session>) {
    let mut link = session.link();
    let mut params = session.params();
    let wait = async {
        loop {
            let l = link.borrow_and_update().clone();
            let cached = params.borrow_and_update().revision.is_some();
            if l.established && (l.grant != Some(Grant::Full) || cached) {
                return;
            }
            tokio::select! {
                r = link.changed() => if r.is_err() { return },
                r = params.changed() => if r.is_err() { return },
            }
        }
    };
    if tokio::time::timeout(Duration::from_millis(READY_WAIT_MS), wait)
        .await
        .is_err()
    {
        tracing::warn!(
            "not welcomed by the controller yet; reporting ready to serve from the cache"
        );
    }
    // Test hooks (crate::runtime::TEST_FAULT_ENV): a release that is slow to become
    // ready, or never does.
    if crate::runtime::test_fault("never_ready").is_some() {
        tracing::warn!("test hook: never reporting ready");
        return;
    }
    if let Some(ms) = crate::runtime::test_fault_ms("ready_delay_ms") {
        tracing::warn!(ms, "test hook: delaying the ready report");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Err(e) = client.ready().await {
        tracing::error!(error = %e, "cannot report ready to the supervisor");
    }
}
