//! The watches each node holds: at most [`WATCHES_PER_NODE_MAX`] at once.
//! A new watch beyond the cap ends the node's oldest at once (it is
//! answered with the current grant state), so a node whose old connection
//! half-died is never refused, and nobody holds more.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Watches one node may hold at once: its own, plus the one of the worker
/// it is switching to (both run for a moment during a switch). A third is
/// a watch whose connection died without the controller noticing; it ends.
pub const WATCHES_PER_NODE_MAX: usize = 2;

/// Node → its watches, oldest first. Only nodes with a watch have an entry.
#[derive(Default)]
pub(crate) struct Watches {
    held: Mutex<HashMap<String, VecDeque<Held>>>,
    next_id: AtomicU64,
}

struct Held {
    id: u64,
    ended: Arc<Notify>,
}

impl Watches {
    fn held(&self) -> MutexGuard<'_, HashMap<String, VecDeque<Held>>> {
        // Every change is one push or removal: nothing is half-done.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `node_id` starts a watch; beyond the cap its oldest watch is told to
    /// answer now. The watch is held until the returned guard drops.
    pub(crate) fn begin(&self, node_id: &str) -> Watch<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ended = Arc::new(Notify::new());
        let mut held = self.held();
        let mine = held.entry(node_id.to_owned()).or_default();
        mine.push_back(Held {
            id,
            ended: ended.clone(),
        });
        while mine.len() > WATCHES_PER_NODE_MAX {
            if let Some(oldest) = mine.pop_front() {
                // A permit: it ends even if it is not waiting this instant.
                oldest.ended.notify_one();
            }
        }
        Watch {
            watches: self,
            node_id: node_id.to_owned(),
            id,
            ended,
        }
    }

    /// Watches `node_id` holds now.
    #[cfg(test)]
    fn count(&self, node_id: &str) -> usize {
        self.held().get(node_id).map_or(0, VecDeque::len)
    }
}

/// One watch in progress.
pub(crate) struct Watch<'a> {
    watches: &'a Watches,
    node_id: String,
    id: u64,
    ended: Arc<Notify>,
}

impl Watch<'_> {
    /// Resolves when a newer watch of the same node took this one's place.
    pub(crate) async fn superseded(&self) {
        self.ended.notified().await;
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        let mut held = self.watches.held();
        if let Some(mine) = held.get_mut(&self.node_id) {
            mine.retain(|h| h.id != self.id);
            if mine.is_empty() {
                held.remove(&self.node_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Whether `w` has been superseded (without waiting for it).
    async fn is_superseded(w: &Watch<'_>) -> bool {
        tokio::time::timeout(Duration::ZERO, w.superseded())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_watch_beyond_the_cap_ends_the_oldest() {
        let watches = Watches::default();
        let first = watches.begin("n1");
        let second = watches.begin("n1");
        let other = watches.begin("n2");
        assert!(!is_superseded(&first).await);
        assert_eq!(watches.count("n1"), 2);

        let third = watches.begin("n1");
        assert!(is_superseded(&first).await, "the oldest ends");
        assert!(!is_superseded(&second).await);
        assert!(!is_superseded(&third).await);
        assert!(
            !is_superseded(&other).await,
            "another node's watch is its own"
        );
        assert_eq!(watches.count("n1"), WATCHES_PER_NODE_MAX);

        // The superseded one answering does not take a newer one with it.
        drop(first);
        assert_eq!(watches.count("n1"), 2);
        let fourth = watches.begin("n1");
        assert!(is_superseded(&second).await);
        assert!(!is_superseded(&third).await);
        drop((second, third, fourth, other));
        assert!(
            watches.held().is_empty(),
            "nodes without a watch leave no entry"
        );
    }
}
