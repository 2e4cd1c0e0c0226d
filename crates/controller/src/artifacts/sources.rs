//! Staging at fleet scale: the controller serves at most
//! [`ARTIFACT_DOWNLOADS_MAX`] binary downloads at once (one more is
//! answered 503 `busy` with `Retry-After`), and tells nodes where else the
//! binary is: `GET /node/v1/artifacts/{id}/sources` names the `hls_url`s
//! of reachable nodes whose registry row lists the artifact staged (each
//! serves it at `/peer/v1/artifacts/{id}/binary`). A node still takes the
//! manifest and its signature from the controller and checks every byte it
//! gets against them, so a source is only ever a hint: the controller's
//! outgoing bytes stay a few copies of the binary whatever the fleet size.

use handover_store::NodeRow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
// tokio's clock, so tests can pause it.
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Binary downloads the controller serves at once. Each costs the
/// controller's CPU (TLS) and upload for as long as it lasts. Four serve a
/// small fleet (a group or two) as at once as before, and start a large
/// one: the first nodes that staged serve the rest (each serves a few at
/// once, so the staged count multiplies every round).
pub const ARTIFACT_DOWNLOADS_MAX: usize = 4;

/// A slot whose download ended goes to the next node only once the fleet
/// names at least as many sources of the artifact as the controller served
/// whole copies of it (each copy's node reports it staged, and then
/// serves it), and while nodes still ask for sources (a fleet whose nodes
/// do not, an older release, waits for no source); at most this long, for
/// a node that took a copy and never became a source. Without it, every
/// download that ends starts another from the controller until the first
/// sources show (a second or more while 100 nodes write to their disks).
pub const SLOT_HOLD_MAX_MS: u64 = 10_000;

/// How often a held slot looks at the sources again.
const SLOT_HOLD_CHECK_MS: u64 = 100;

/// Nodes count as still asking for sources while the last answer was
/// built this recently.
const SOURCES_ASKED_WITHIN_MS: u64 = 4 * SOURCES_REFRESH_MS;

/// The `Retry-After` (seconds, the header's unit) of a `busy` answer. A
/// node of this build does not wait that long: it asks for sources again
/// after its own shorter, jittered pause (nodes stage in a fraction of a
/// second on a LAN).
pub const BUSY_RETRY_AFTER_S: u64 = 1;

/// A sources answer is built from a registry read at most this old: one
/// read serves every node asking meanwhile (a fleet of 10,000 nodes asks
/// many times a second while it stages), and a node staged this much
/// earlier is named a little later, which costs nothing.
pub const SOURCES_REFRESH_MS: u64 = 250;

/// A node that staged counts as a source while it was seen within this
/// many leases: one that missed a heartbeat on a loaded controller still
/// serves, and one that is really gone costs a staging node one short
/// attempt (its connection refused or its connect timeout), never the
/// binary's integrity.
pub const SOURCE_SEEN_LEASES_MAX: u64 = 2;

/// Artifacts whose sources are kept between reads: an upgrade stages one;
/// more than a handful means ids nobody staged (each one asked costs one
/// registry read per refresh), so the cache then starts over.
const SOURCES_CACHED_ARTIFACTS_MAX: usize = 8;

/// The controller's side of staging at scale: the download slots and the
/// cached sources (one per controller process, in the artifact store).
#[derive(Debug)]
pub struct Serving {
    downloads: Arc<Semaphore>,
    sources: Arc<tokio::sync::Mutex<HashMap<String, Cached>>>,
    /// Whole copies of each artifact served (this process).
    served: std::sync::Mutex<HashMap<String, usize>>,
    /// Where the next answer starts in a list longer than an answer, so
    /// consecutive answers name different sources.
    turn: AtomicUsize,
}

#[derive(Debug)]
struct Cached {
    at: Instant,
    urls: Vec<String>,
}

impl Default for Serving {
    fn default() -> Serving {
        Serving::new(ARTIFACT_DOWNLOADS_MAX)
    }
}

impl Serving {
    /// Serving at most `downloads_max` binaries at once (at least one).
    pub fn new(downloads_max: usize) -> Serving {
        Serving {
            downloads: Arc::new(Semaphore::new(downloads_max.max(1))),
            sources: Arc::new(tokio::sync::Mutex::new(HashMap::new())),
            served: std::sync::Mutex::new(HashMap::new()),
            turn: AtomicUsize::new(0),
        }
    }

    /// A download slot, held until the binary's body is sent or dropped;
    /// `None` while [`ARTIFACT_DOWNLOADS_MAX`] are in flight.
    pub fn try_download(&self) -> Option<OwnedSemaphorePermit> {
        self.downloads.clone().try_acquire_owned().ok()
    }

    /// The slot of a whole copy of artifact `id` just served: given back
    /// once the sources named are at least the copies served, or nodes no
    /// longer ask for sources, or after [`SLOT_HOLD_MAX_MS`].
    pub fn served_whole(&self, id: &str, slot: OwnedSemaphorePermit) {
        let served = {
            // A plain counter: a panic elsewhere cannot leave it half-written.
            let mut served = self.served.lock().unwrap_or_else(|e| e.into_inner());
            if served.len() >= SOURCES_CACHED_ARTIFACTS_MAX && !served.contains_key(id) {
                served.clear();
            }
            let n = served.entry(id.to_owned()).or_insert(0);
            *n += 1;
            *n
        };
        let (sources, id) = (self.sources.clone(), id.to_owned());
        tokio::spawn(async move {
            let until = Instant::now() + Duration::from_millis(SLOT_HOLD_MAX_MS);
            while Instant::now() < until {
                let hold = sources.lock().await.get(&id).is_some_and(|c| {
                    c.urls.len() < served
                        && c.at.elapsed() < Duration::from_millis(SOURCES_ASKED_WITHIN_MS)
                });
                if !hold {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(SLOT_HOLD_CHECK_MS)).await;
            }
            drop(slot);
        });
    }

    /// At most `max` sources of artifact `id`: from a registry read at
    /// most [`SOURCES_REFRESH_MS`] old (`rows` reads it again), each answer
    /// starting further along the list. One read at a time: those asking
    /// meanwhile wait for it and share it.
    pub async fn sources<F, Fut, E>(&self, id: &str, max: usize, rows: F) -> Result<Vec<String>, E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Vec<String>, E>>,
    {
        let mut cache = self.sources.lock().await;
        let fresh = cache
            .get(id)
            .is_some_and(|c| c.at.elapsed() < Duration::from_millis(SOURCES_REFRESH_MS));
        if !fresh {
            let urls = rows().await?;
            if cache.len() >= SOURCES_CACHED_ARTIFACTS_MAX && !cache.contains_key(id) {
                cache.clear();
            }
            cache.insert(
                id.to_owned(),
                Cached {
                    at: Instant::now(),
                    urls,
                },
            );
        }
        let urls = cache.get(id).map(|c| c.urls.as_slice()).unwrap_or_default();
        let start = self.turn.fetch_add(max.max(1), Ordering::Relaxed);
        Ok(window(urls, start, max))
    }
}

/// The `hls_url`s of the nodes in `rows` that list artifact `id` staged
/// and were seen within [`SOURCE_SEEN_LEASES_MAX`] leases (`lease_ms`) of
/// `now_ms`, in registry order.
pub fn staged_on(rows: &[NodeRow], id: &str, now_ms: i64, lease_ms: u64) -> Vec<String> {
    let lease = i64::try_from(lease_ms.saturating_mul(SOURCE_SEEN_LEASES_MAX)).unwrap_or(i64::MAX);
    rows.iter()
        .filter(|n| now_ms.saturating_sub(n.last_seen_ms) <= lease)
        .filter(|n| n.staged.iter().any(|s| s == id))
        .map(|n| n.hls_url.clone())
        .collect()
}

/// At most `max` of `all`, starting at `start` (modulo its length) and
/// wrapping around.
pub fn window(all: &[String], start: usize, max: usize) -> Vec<String> {
    if all.is_empty() {
        return Vec::new();
    }
    let first = start % all.len();
    all.iter()
        .cycle()
        .skip(first)
        .take(max.min(all.len()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("http://127.0.0.{i}:7000")).collect()
    }

    #[test]
    fn windows_wrap_and_are_bounded() {
        let all = urls(5);
        let cases: [(usize, usize, &[usize]); 6] = [
            (0, 2, &[0, 1]),
            (2, 2, &[2, 3]),
            (4, 2, &[4, 0]),
            (7, 3, &[2, 3, 4]),
            (1, 16, &[1, 2, 3, 4, 0]),
            (0, 0, &[]),
        ];
        for (start, max, want) in cases {
            let want: Vec<String> = want.iter().map(|&i| all[i].clone()).collect();
            assert_eq!(window(&all, start, max), want, "start {start}, max {max}");
        }
        assert!(window(&[], 3, 16).is_empty());
    }

    #[tokio::test]
    async fn one_registry_read_serves_every_answer_meanwhile_and_answers_rotate() {
        let serving = Serving::new(2);
        let reads = AtomicUsize::new(0);
        let read = || async {
            reads.fetch_add(1, Ordering::SeqCst);
            Ok::<_, ()>(urls(5))
        };
        let a = serving.sources("r2-0123456789ab", 2, read).await.unwrap();
        let b = serving.sources("r2-0123456789ab", 2, read).await.unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert_eq!(a.len(), 2);
        assert_ne!(a, b, "consecutive answers name other sources");
        // Another artifact has its own read.
        serving.sources("r2-ba9876543210", 2, read).await.unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 2);
        // A failed read answers the error and caches nothing.
        let failed = serving
            .sources("r2-000000000000", 2, || async {
                Err::<Vec<String>, _>("down")
            })
            .await;
        assert_eq!(failed, Err("down"));
    }

    /// A whole copy's slot waits for sources while nodes ask for them,
    /// and comes back once as many are named as copies were served, or
    /// once nobody asks, or after the bound.
    #[tokio::test(start_paused = true)]
    async fn a_served_slot_comes_back_once_sources_show() {
        let id = "r2-0123456789ab";
        let serving = Serving::new(1);
        let back = |serving: &Serving| serving.try_download().map(drop).is_some();
        // Nobody asked for sources (nodes of an older release): back at once.
        serving.served_whole(id, serving.try_download().unwrap());
        tokio::time::sleep(Duration::from_millis(SLOT_HOLD_CHECK_MS)).await;
        assert!(back(&serving));
        // Nodes ask and none is named yet: held while they ask.
        serving
            .sources(id, 2, || async { Ok::<_, ()>(vec![]) })
            .await
            .unwrap();
        serving.served_whole(id, serving.try_download().unwrap());
        tokio::time::sleep(Duration::from_millis(SOURCES_REFRESH_MS + 10)).await;
        assert!(!back(&serving), "held while no source is named");
        // One is named, but two copies were served: still held.
        serving
            .sources(id, 2, || async { Ok::<_, ()>(urls(1)) })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(SLOT_HOLD_CHECK_MS * 2)).await;
        assert!(!back(&serving), "held: 1 source for 2 copies");
        tokio::time::sleep(Duration::from_millis(SOURCES_REFRESH_MS)).await;
        serving
            .sources(id, 2, || async { Ok::<_, ()>(urls(2)) })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(SLOT_HOLD_CHECK_MS * 2)).await;
        assert!(back(&serving), "2 sources for 2 copies");
        // Asked, never named, and nodes keep asking: back after the bound.
        serving.served_whole(id, serving.try_download().unwrap());
        let asking = async {
            loop {
                serving
                    .sources(id, 2, || async { Ok::<_, ()>(urls(2)) })
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(SOURCES_REFRESH_MS)).await;
            }
        };
        let waited = async {
            let start = Instant::now();
            while !back(&serving) {
                tokio::time::sleep(Duration::from_millis(SLOT_HOLD_CHECK_MS)).await;
            }
            start.elapsed()
        };
        let waited = tokio::select! {
            w = waited => w,
            () = asking => unreachable!(),
        };
        assert!(
            waited >= Duration::from_millis(SLOT_HOLD_MAX_MS - SLOT_HOLD_CHECK_MS)
                && waited <= Duration::from_millis(SLOT_HOLD_MAX_MS + 2 * SLOT_HOLD_CHECK_MS),
            "{waited:?}"
        );
    }

    #[test]
    fn download_slots_are_bounded_and_come_back() {
        let serving = Serving::new(2);
        let a = serving.try_download().unwrap();
        let _b = serving.try_download().unwrap();
        assert!(serving.try_download().is_none());
        drop(a);
        assert!(serving.try_download().is_some());
    }
}
