//! The node's upgrade agent: stages the artifact the controller names, and
//! switches release through the supervisor when told to. Also tells the
//! supervisor when this worker is ready to serve.

use crate::session::Session;
use crate::stage;
use crate::Lifecycle;
use handover_core::{Grant, ReleaseInfo};
use handover_supervisor::{Release as SupervisedRelease, SupervisorClient};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Staging retries back off up to this.
pub const STAGE_RETRY_MS_MAX: u64 = 5_000;
/// A worker reports ready at the latest this long after start, even if the
/// controller is unreachable: it can serve viewers from its cache.
pub const READY_WAIT_MS: u64 = 10_000;

pub(crate) struct Agent {
    pub session: Arc<Session>,
    pub data_dir: PathBuf,
    pub controller_url: String,
    pub release: &'static ReleaseInfo,
    pub lifecycle: Arc<Lifecycle>,
    pub supervisor: Option<SupervisorClient>,
}

impl Agent {
    pub(crate) async fn run(self) {
        self.session.set_staged(
            stage::staged(&self.data_dir)
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
        let mut retry_ms = 100;
        loop {
            let link = rx.borrow_and_update().clone();
            let desired = link.desired.clone();
            if let (Some(id), Some(credential)) = (&desired.stage, &link.credential) {
                if !self.session.staged().contains(id) {
                    match stage::stage(&http, &self.controller_url, credential, &self.data_dir, id)
                        .await
                    {
                        Ok(staged) => {
                            tracing::info!(artifact = %id, binary = %staged.binary.display(), "artifact staged");
                            self.session.set_staged(
                                stage::staged(&self.data_dir)
                                    .iter()
                                    .map(|m| m.id())
                                    .collect(),
                            );
                            retry_ms = 100;
                        }
                        Err(e) => {
                            tracing::error!(artifact = %id, error = %e, "cannot stage the artifact; this release keeps running");
                            tokio::time::sleep(Duration::from_millis(retry_ms)).await;
                            retry_ms = (retry_ms * 2).min(STAGE_RETRY_MS_MAX);
                            continue;
                        }
                    }
                }
            }
            if let (Some(to), Some(id)) = (desired.switch_to, &desired.stage) {
                if to != self.release.release && self.session.staged().contains(id) {
                    self.switch(id).await;
                    return;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Quiesces this worker and asks the supervisor to start the staged
    /// release on the same socket. On success the supervisor stops this
    /// worker; on failure the worker exits so its supervisor restarts the
    /// release it knows to work.
    async fn switch(&self, id: &str) {
        let Some(staged) = stage::staged(&self.data_dir)
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
        };
        match client.switch(&to).await {
            Ok(_) => tracing::info!(
                "the new release is serving; this worker finishes its requests and exits"
            ),
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
    if let Err(e) = client.ready().await {
        tracing::error!(error = %e, "cannot report ready to the supervisor");
    }
}
