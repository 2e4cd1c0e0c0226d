//! The live schedule of an event and its HLS media playlist.
//!
//! Segment numbers come from the wall clock and the event start only, so the
//! primary and the backup of a group publish the same sequence at the same
//! moment and viewers can switch between them without a gap.

use serde::{Deserialize, Serialize};

/// Segments listed in a live playlist (the sliding window) of every channel
/// before schema 3, and the default window of a schema-3 channel.
pub const WINDOW_SEGMENTS: u64 = 6;

/// One event as a node runs it, whatever schema its parameters came in
/// (`params::events_for_group` makes them; this module only schedules them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveEvent {
    pub event_id: i64,
    pub channel: String,
    /// Known from schema 2 on; release-1 records name channels instead.
    pub channel_id: Option<i64>,
    pub start_ms: i64,
    pub duration_ms: u64,
    pub segment_ms: u32,
    /// Segments the live playlist lists: the channel's own from schema 3
    /// on, [`WINDOW_SEGMENTS`] before.
    pub window_segments: u64,
}

impl LiveEvent {
    /// Number of segments in the whole event; the last may be shorter.
    pub fn total_segments(&self) -> u64 {
        let seg = u64::from(self.segment_ms.max(1));
        self.duration_ms.div_ceil(seg)
    }

    pub fn end_ms(&self) -> i64 {
        self.start_ms
            .saturating_add(i64::try_from(self.duration_ms).unwrap_or(i64::MAX))
    }

    /// Segments complete (and so servable) at `now_ms`.
    pub fn completed_segments(&self, now_ms: i64) -> u64 {
        if now_ms < self.start_ms {
            return 0;
        }
        if now_ms >= self.end_ms() {
            return self.total_segments();
        }
        let elapsed = u64::try_from(now_ms - self.start_ms).unwrap_or(0);
        (elapsed / u64::from(self.segment_ms.max(1))).min(self.total_segments())
    }

    pub fn is_live(&self, now_ms: i64) -> bool {
        now_ms >= self.start_ms && now_ms < self.end_ms()
    }

    pub fn has_ended(&self, now_ms: i64) -> bool {
        now_ms >= self.end_ms()
    }

    /// Duration of segment `seq` in ms (the last one may be shorter).
    pub fn segment_duration_ms(&self, seq: u64) -> u32 {
        let seg = u64::from(self.segment_ms.max(1));
        let left = self.duration_ms.saturating_sub(seq.saturating_mul(seg));
        u32::try_from(left.min(seg)).unwrap_or(self.segment_ms)
    }

    /// The live media playlist at `now_ms`, or `None` before the event
    /// starts; it lists the event's last `window_segments` segments.
    pub fn media_playlist(&self, now_ms: i64) -> Option<String> {
        if now_ms < self.start_ms {
            return None;
        }
        let done = self.completed_segments(now_ms);
        let first = done.saturating_sub(self.window_segments);
        let target_s = u64::from(self.segment_ms).div_ceil(1000).max(1);
        let mut out = format!(
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:{target_s}\n#EXT-X-MEDIA-SEQUENCE:{first}\n"
        );
        for seq in first..done {
            let secs = f64::from(self.segment_duration_ms(seq)) / 1000.0;
            out.push_str(&format!("#EXTINF:{secs:.3},\n{seq}.ts\n"));
        }
        if self.has_ended(now_ms) {
            out.push_str("#EXT-X-ENDLIST\n");
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> LiveEvent {
        LiveEvent {
            event_id: 1,
            channel: "news".into(),
            channel_id: None,
            start_ms: 10_000,
            duration_ms: 9_000,
            segment_ms: 2_000,
            window_segments: WINDOW_SEGMENTS,
        }
    }

    #[test]
    fn schedule() {
        let e = event();
        assert_eq!(e.total_segments(), 5);
        assert_eq!(e.completed_segments(9_999), 0);
        assert_eq!(e.completed_segments(11_999), 0);
        assert_eq!(e.completed_segments(12_000), 1);
        assert_eq!(e.completed_segments(18_999), 4);
        assert_eq!(e.completed_segments(19_000), 5);
        assert_eq!(e.segment_duration_ms(3), 2_000);
        assert_eq!(e.segment_duration_ms(4), 1_000);
        assert!(e.is_live(10_000) && !e.is_live(19_000) && e.has_ended(19_000));
    }

    #[test]
    fn playlists() {
        let e = event();
        assert_eq!(e.media_playlist(9_000), None);
        let live = e.media_playlist(14_500).unwrap();
        assert!(
            live.contains("#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:2.000,\n0.ts\n#EXTINF:2.000,\n1.ts\n"),
            "{live}"
        );
        assert!(!live.contains("ENDLIST"));
        let ended = e.media_playlist(30_000).unwrap();
        assert!(
            ended.ends_with("#EXTINF:1.000,\n4.ts\n#EXT-X-ENDLIST\n"),
            "{ended}"
        );
        let long = LiveEvent {
            duration_ms: 60_000,
            ..e
        };
        let p = long.media_playlist(10_000 + 30_000).unwrap();
        assert!(p.contains("#EXT-X-MEDIA-SEQUENCE:9\n"), "{p}");
        assert_eq!(p.matches(".ts").count() as u64, WINDOW_SEGMENTS);
        // A channel's own window (schema 3): the playlist lists that many.
        let deep = LiveEvent {
            window_segments: 12,
            ..long
        };
        let p = deep.media_playlist(10_000 + 30_000).unwrap();
        assert!(p.contains("#EXT-X-MEDIA-SEQUENCE:3\n"), "{p}");
        assert_eq!(p.matches(".ts").count(), 12);
    }
}
