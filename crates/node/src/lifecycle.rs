//! How the node's moving parts stop: producing first, then (after a bounded
//! drain) the background loops, while HTTP keeps serving; HTTP stops on a
//! signal or when a failed switch makes the worker give up.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How long shutdown waits for the loops before closing the database anyway.
pub const LOOPS_STOP_TIMEOUT_MS: u64 = 5_000;
/// On a graceful stop the producer stops first and the shipper gets this
/// long to empty the outbox (the node machine's bound); whatever is left
/// stays durable for the next start.
pub use handover_core::node::DRAIN_ON_STOP_MS;
/// The node's moving parts and how they stop: producing first, then (after
/// a bounded drain, the machine's) its driver, while HTTP keeps serving;
/// HTTP stops on a signal or when a failed switch makes the worker give up.
pub(crate) struct Lifecycle {
    pub(crate) produce_stop: watch::Sender<bool>,
    pub(crate) producer: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Asks the driver to stop (drain, then end).
    pub(crate) driver_stop: watch::Sender<bool>,
    pub(crate) http_stop: watch::Sender<bool>,
    pub(crate) failure: Mutex<Option<String>>,
}

impl Lifecycle {
    /// Stops producing and waits (bounded) for the producer's last tick.
    /// Idempotent: a switch and a later shutdown both reach it.
    pub(crate) async fn stop_producer(&self) {
        self.produce_stop.send_replace(true);
        if let Some(producer) = self.producer.lock().await.take() {
            match tokio::time::timeout(Duration::from_millis(LOOPS_STOP_TIMEOUT_MS), producer).await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "producer ended abnormally"),
                Err(_) => tracing::warn!("producer did not stop in time"),
            }
        }
    }

    /// Gives up: HTTP stops gracefully and the worker exits with `why`, so
    /// its supervisor starts the release it knows to work.
    pub(crate) fn fail(self: &Arc<Self>, why: String) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        self.stop_http();
    }

    /// Every way HTTP stops. The server stops accepting at once (the
    /// socket's next connections wait for the successor) and drains its
    /// connections for [`handover_net::Limits::drain_idle_ms`], so players
    /// reconnect between requests instead of racing a close.
    pub(crate) fn stop_http(&self) {
        self.http_stop.send_replace(true);
    }

    pub(crate) fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
