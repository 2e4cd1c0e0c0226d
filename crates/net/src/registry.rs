//! The open connections of one listener: how many hold a slot, which have
//! a request in flight, and which one makes room at the cap.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// What makes room at the cap.
pub(crate) enum Pick {
    /// Close this connection.
    Evict(Arc<Conn>),
    /// None can be closed yet; one can in this long (or sooner, if a
    /// connection ends or finishes a request).
    Wait(Duration),
    /// Every connection has a request in flight: wait for one to finish.
    Busy,
}

/// One listener's connections. A connection holds a slot from its
/// [`Registry::register`] until it is evicted or its [`Slot`] drops.
pub(crate) struct Registry {
    /// Open connections by id; ids grow, so this is accept order.
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
    /// Connections open and not evicted: what the cap counts.
    occupied: AtomicUsize,
    next_id: AtomicU64,
    started: Instant,
    /// Wakes the one waiter (the accept loop, later the shutdown): a
    /// connection ended or finished a request, so there may be room.
    changed: Arc<Notify>,
}

/// What the registry knows of one connection.
pub(crate) struct Conn {
    in_flight: AtomicUsize,
    /// Requests started on this connection, ever.
    requests: AtomicU64,
    /// When the connection last had no request in flight (accepted, or its
    /// last response finished), in ms since the registry started.
    idle_since_ms: AtomicU64,
    evicted: AtomicBool,
    evict: Notify,
    started: Instant,
    changed: Arc<Notify>,
}

impl Registry {
    pub(crate) fn new() -> Registry {
        Registry {
            open: Mutex::new(BTreeMap::new()),
            occupied: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            started: Instant::now(),
            changed: Arc::new(Notify::new()),
        }
    }

    fn open(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        // A panic elsewhere cannot leave the map half-changed: every change
        // is one insert or remove.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection takes a slot.
    pub(crate) fn register(self: &Arc<Self>) -> Slot {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(ms_since(self.started)),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
            started: self.started,
            changed: self.changed.clone(),
        });
        self.open().insert(id, conn.clone());
        self.occupied.fetch_add(1, Ordering::SeqCst);
        Slot {
            registry: self.clone(),
            id,
            conn,
        }
    }

    /// Connections that count against the cap: open, not evicted.
    pub(crate) fn occupied(&self) -> usize {
        self.occupied.load(Ordering::SeqCst)
    }

    /// Connections still open, evicted or not.
    pub(crate) fn open_count(&self) -> usize {
        self.open().len()
    }

    /// What makes room at the cap: among the connections not evicted yet
    /// that have had no request in flight for at least `grace`, one that
    /// never started a request (a silent or slow client, oldest first),
    /// else the one idle longest.
    pub(crate) fn pick(&self, grace: Duration) -> Pick {
        let now_ms = ms_since(self.started);
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let open = self.open();
        let idle = open
            .values()
            .filter(|c| !c.evicted.load(Ordering::SeqCst) && c.in_flight() == 0);
        let mut soonest: Option<u64> = None;
        let mut best: Option<(&Arc<Conn>, (bool, u64))> = None;
        for c in idle {
            let since = c.idle_since_ms.load(Ordering::SeqCst);
            let idle_ms = now_ms.saturating_sub(since);
            if idle_ms < grace_ms {
                let left = grace_ms - idle_ms;
                soonest = Some(soonest.map_or(left, |s| s.min(left)));
                continue;
            }
            let key = (c.requests() > 0, since);
            if best.as_ref().is_none_or(|(_, k)| key < *k) {
                best = Some((c, key));
            }
        }
        match (best, soonest) {
            (Some((c, _)), _) => Pick::Evict(c.clone()),
            (None, Some(left)) => Pick::Wait(Duration::from_millis(left.max(1))),
            (None, None) => Pick::Busy,
        }
    }

    /// Takes `conn`'s slot and tells its task to close it (at once when it
    /// never started a request, else after the response it may be writing).
    pub(crate) fn evict(&self, conn: &Conn) {
        if !conn.evicted.swap(true, Ordering::SeqCst) {
            self.occupied.fetch_sub(1, Ordering::SeqCst);
        }
        conn.evict.notify_one();
    }

    /// Waits until a connection ends or finishes a request. One waiter at a
    /// time; a change while nobody waits is kept for the next wait.
    pub(crate) async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Waits until every connection has ended.
    pub(crate) async fn all_closed(&self) {
        while self.open_count() > 0 {
            self.changed().await;
        }
    }
}

impl Conn {
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// No request ever started here: closing it loses nothing.
    pub(crate) fn never_requested(&self) -> bool {
        self.requests() == 0
    }

    /// A request starts; it is in flight until the guard drops (when its
    /// response body has been handed to the connection, or abandoned).
    pub(crate) fn begin_request(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight { conn: self.clone() }
    }

    /// Resolves once this connection has been evicted (at once if it
    /// already was).
    pub(crate) async fn evicted(&self) {
        if self.evicted.load(Ordering::SeqCst) {
            return;
        }
        self.evict.notified().await;
    }
}

/// A request in flight on a connection.
pub(crate) struct InFlight {
    conn: Arc<Conn>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let c = &self.conn;
        c.idle_since_ms.store(ms_since(c.started), Ordering::SeqCst);
        if c.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            c.changed.notify_one();
        }
    }
}

/// A connection's place in the registry; dropping it frees the slot.
pub(crate) struct Slot {
    registry: Arc<Registry>,
    id: u64,
    conn: Arc<Conn>,
}

impl Slot {
    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.open().remove(&self.id);
        if !self.conn.evicted.swap(true, Ordering::SeqCst) {
            self.registry.occupied.fetch_sub(1, Ordering::SeqCst);
        }
        self.registry.changed.notify_one();
    }
}

fn ms_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `pick` chose `conn`.
    fn picks(p: Pick, conn: &Arc<Conn>) -> bool {
        matches!(p, Pick::Evict(v) if Arc::ptr_eq(&v, conn))
    }

    #[test]
    fn the_victim_is_a_connection_without_a_request_oldest_first() {
        let r = Arc::new(Registry::new());
        let a = r.register();
        let b = r.register();
        let c = r.register();
        // a served a request and is idle again; b never asked anything;
        // c has a request in flight.
        drop(a.conn().begin_request());
        let _busy = c.conn().begin_request();
        assert!(
            picks(r.pick(Duration::ZERO), b.conn()),
            "a silent one first"
        );
        r.evict(b.conn());
        assert_eq!(r.occupied(), 2);
        assert_eq!(r.open_count(), 3, "b holds no slot but is still open");
        assert!(picks(r.pick(Duration::ZERO), a.conn()), "then the idle one");
        r.evict(a.conn());
        assert!(
            matches!(r.pick(Duration::ZERO), Pick::Busy),
            "never one with a request in flight"
        );
        drop(b);
        drop(a);
        assert_eq!((r.occupied(), r.open_count()), (1, 1));
        drop(c);
        assert_eq!((r.occupied(), r.open_count()), (0, 0));
    }

    #[test]
    fn among_silent_connections_the_oldest_goes_first() {
        let r = Arc::new(Registry::new());
        let first = r.register();
        let _second = r.register();
        assert!(picks(r.pick(Duration::ZERO), first.conn()));
    }

    #[test]
    fn a_connection_is_closed_to_make_room_only_after_the_grace() {
        let r = Arc::new(Registry::new());
        let a = r.register();
        let grace = Duration::from_secs(3_600);
        match r.pick(grace) {
            Pick::Wait(left) => assert!(left <= grace && left > Duration::ZERO),
            _ => panic!("a new connection is not closed to make room"),
        }
        // Its request in flight, then done: idle again from now.
        drop(a.conn().begin_request());
        assert!(matches!(r.pick(grace), Pick::Wait(_)));
        assert!(picks(r.pick(Duration::ZERO), a.conn()));
    }

    #[tokio::test]
    async fn eviction_and_the_end_of_a_request_wake_their_waiters() {
        let r = Arc::new(Registry::new());
        let a = r.register();
        let busy = a.conn().begin_request();
        drop(busy);
        // Kept for the next wait: a change while nobody waits is not lost.
        r.changed().await;
        r.evict(a.conn());
        a.conn().evicted().await;
        r.evict(a.conn());
        assert_eq!(r.occupied(), 0, "evicting twice frees one slot");
        drop(a);
        r.all_closed().await;
    }
}
