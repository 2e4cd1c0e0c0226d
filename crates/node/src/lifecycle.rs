//! How the node's moving parts stop: producing first, then (after a bounded
//! drain) the background loops, while HTTP keeps serving; HTTP stops on a
//! signal or when a failed switch makes the worker give up.

use crate::runtime::test_fault_ms;
use crate::{session, store};
use handover_core::Grant;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How long shutdown waits for the loops before closing the database anyway.
pub const LOOPS_STOP_TIMEOUT_MS: u64 = 5_000;
/// On a graceful stop the producer stops first and the shipper gets this
/// long to empty the outbox; whatever is left stays durable for the next start.
pub const DRAIN_ON_STOP_MS: u64 = 3_000;
/// On a stop, every answer says `Connection: close` for this long before the
/// server stops: players drop their keep-alive connections at a request
/// boundary instead of racing a server-side close (a failed request).
pub const CLOSE_CONNECTIONS_MS: u64 = 1_000;
/// How often a drain looks at the outbox again.
const DRAIN_POLL_MS: u64 = 20;

/// Waits (bounded) until the outbox is empty, while the grant lets it ship.
pub(crate) async fn drain_outbox(store: &store::Store, session: &session::Session) {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(DRAIN_ON_STOP_MS);
    while tokio::time::Instant::now() < deadline {
        let can_ship = matches!(session.link_now().grant, Some(Grant::Full | Grant::Deliver));
        if store.outbox_state().count == 0 || !can_ship {
            return;
        }
        tokio::time::sleep(Duration::from_millis(DRAIN_POLL_MS)).await;
    }
    tracing::warn!(
        queued = store.outbox_state().count,
        "stopping with records queued; they ship on the next start"
    );
}

/// The node's moving parts and how they stop: producing first, then (after
/// a bounded drain) the background loops, while HTTP keeps serving; HTTP
/// stops on a signal or when a failed switch makes the worker give up.
pub(crate) struct Lifecycle {
    pub(crate) produce_stop: watch::Sender<bool>,
    pub(crate) producer: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    pub(crate) loops_stop: watch::Sender<bool>,
    pub(crate) http_stop: watch::Sender<bool>,
    /// Set while HTTP is being stopped: answers say `Connection: close`.
    pub(crate) closing: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) failure: Mutex<Option<String>>,
    pub(crate) store: Arc<store::Store>,
    pub(crate) session: Arc<session::Session>,
}

impl Lifecycle {
    /// Stops producing, drains the outbox (bounded) and stops the loops;
    /// HTTP keeps serving from the cache. Idempotent: a switch and a later
    /// shutdown both call it.
    pub(crate) async fn quiesce(&self) {
        self.produce_stop.send_replace(true);
        if let Some(producer) = self.producer.lock().await.take() {
            match tokio::time::timeout(Duration::from_millis(LOOPS_STOP_TIMEOUT_MS), producer).await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "producer ended abnormally"),
                Err(_) => tracing::warn!("producer did not stop in time"),
            }
            if let Some(ms) = test_fault_ms("drain_slow_ms") {
                // Test hook (TEST_FAULT_ENV): a drain that takes a while.
                tracing::warn!(ms, "test hook: draining slowly");
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            drain_outbox(&self.store, &self.session).await;
        }
        self.loops_stop.send_replace(true);
    }

    /// Gives up: HTTP stops gracefully and the worker exits with `why`, so
    /// its supervisor starts the release it knows to work.
    pub(crate) fn fail(self: &Arc<Self>, why: String) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        tokio::spawn(self.clone().stop_http());
    }

    /// Every way HTTP stops: `Connection: close` on every answer for
    /// [`CLOSE_CONNECTIONS_MS`], so players reconnect between requests (to
    /// whichever worker serves the socket), then the graceful stop.
    pub(crate) async fn stop_http(self: Arc<Self>) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(CLOSE_CONNECTIONS_MS)).await;
        self.http_stop.send_replace(true);
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
