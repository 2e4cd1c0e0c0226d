//! Readiness: tells the supervisor when this worker is ready to serve.
//! Staging and switching are the node machine's decisions
//! (`handover_core::node`), performed by the driver.

use crate::link::{ParamsCache, View};
use handover_core::Grant;
use handover_supervisor::SupervisorClient;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A worker reports ready at the latest this long after start, even if the
/// controller is unreachable: it can serve viewers from its cache.
pub const READY_WAIT_MS: u64 = 10_000;

/// Tells the supervisor this worker is ready: after its first hello and,
/// with a `full` grant, after its parameters are cached; at the latest after
/// [`READY_WAIT_MS`] (it can serve from its cache).
pub(crate) async fn report_ready(
    client: SupervisorClient,
    mut link: watch::Receiver<View>,
    mut params: watch::Receiver<Arc<ParamsCache>>,
) {
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
    #[cfg(feature = "test-hooks")]
    if crate::runtime::test_fault("never_ready").is_some() {
        tracing::warn!("test hook: never reporting ready");
        return;
    }
    #[cfg(feature = "test-hooks")]
    if let Some(ms) = crate::runtime::test_fault_ms("ready_delay_ms") {
        tracing::warn!(ms, "test hook: delaying the ready report");
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Err(e) = client.ready().await {
        tracing::error!(error = %e, "cannot report ready to the supervisor");
    }
}
