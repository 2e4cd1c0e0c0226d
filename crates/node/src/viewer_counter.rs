//! Viewer requests counted per channel and second: what the producer's
//! `viewer_stats` and the heartbeat's `hls_requests` report. A leaf module,
//! so the HTTP face, the producer and the session all use it one way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Channels whose requests are counted; channels come from the parameters,
/// this only guards the map against a pathological parameter set.
pub const COUNTED_CHANNELS_MAX: usize = 4096;

#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    second: i64,
    n: u32,
    prev_second: i64,
    prev_n: u32,
}

/// HLS requests per channel for the current and the previous whole second:
/// enough for the producer's once-a-second `viewer_stats`; and every HLS
/// request this worker answered since it started (the heartbeat's
/// `hls_requests`).
#[derive(Debug, Default)]
pub struct ViewerCounter {
    inner: Mutex<HashMap<String, Counts>>,
    requests: AtomicU64,
}

impl ViewerCounter {
    /// Counts one request on the HLS route, whatever its answer.
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// HLS requests answered since this worker started.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn hit(&self, channel: &str, now_ms: i64) {
        let second = now_ms.div_euclid(1000);
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(channel) && map.len() >= COUNTED_CHANNELS_MAX {
            return;
        }
        let c = map.entry(channel.to_owned()).or_default();
        if c.second == second {
            c.n = c.n.saturating_add(1);
        } else {
            *c = Counts {
                second,
                n: 1,
                prev_second: c.second,
                prev_n: c.n,
            };
        }
    }

    /// Requests for `channel` during `second` (0 if we no longer know).
    pub fn count(&self, channel: &str, second: i64) -> u32 {
        let map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(channel) {
            Some(c) if c.second == second => c.n,
            Some(c) if c.prev_second == second => c.prev_n,
            _ => 0,
        }
    }
}
