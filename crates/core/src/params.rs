//! Parameters a node reads from the controller, one type per schema.
//!
//! Release 2 restructured channels (segment duration in ms and a bitrate
//! ladder instead of whole seconds and one size) and events (start as Unix ms,
//! channel by id). Release 3 gives every channel its own DVR window
//! (`window_segments`). The types reject unknown fields, so a node that
//! somehow got another release's parameters fails loudly instead of guessing.

/// What [`events_for_group`] gives: one event as a node runs it (defined
/// beside its schedule in `hls`, which depends on nothing here).
pub use crate::hls::LiveEvent;
use crate::release::Schema;
use serde::{Deserialize, Serialize};

/// A redundancy group: one primary and one backup node running the same events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    pub primary: String,
    pub backup: String,
}

pub mod v1 {
    use super::Group;
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Channel {
        pub name: String,
        pub title: String,
        pub segment_seconds: u32,
        /// One output size, e.g. "1280x720".
        pub resolution: String,
        pub bitrate_kbps: u32,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Event {
        pub id: i64,
        pub channel: String,
        pub group: String,
        /// RFC 3339 text.
        pub start: String,
        pub duration_s: u32,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Params {
        pub revision: u64,
        pub channels: Vec<Channel>,
        pub groups: Vec<Group>,
        pub events: Vec<Event>,
    }
}

pub mod v2 {
    use super::Group;
    use serde::{Deserialize, Serialize};

    /// One rendition of the bitrate ladder.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Rung {
        pub height: u32,
        pub kbps: u32,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Channel {
        pub id: i64,
        pub name: String,
        pub segment_ms: u32,
        pub ladder: Vec<Rung>,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Event {
        pub id: i64,
        pub channel_id: i64,
        pub group: String,
        pub start_ms: i64,
        pub duration_ms: u64,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Params {
        pub revision: u64,
        pub channels: Vec<Channel>,
        pub groups: Vec<Group>,
        pub events: Vec<Event>,
    }
}

pub mod v3 {
    //! Release 3: release 2's parameters, and each channel sets how many
    //! segments its live playlist lists (the DVR / timeshift depth).
    pub use super::v2::{Event, Rung};
    use super::Group;
    use serde::{Deserialize, Serialize};

    /// The shortest window a channel may have: fewer segments than this and
    /// players stall at every segment boundary (RFC 8216 asks for three
    /// target durations of playlist).
    pub const WINDOW_SEGMENTS_MIN: u32 = 3;
    /// The longest window a channel may have (an hour of 5-second segments):
    /// bounds the playlist a node renders per request and the segments it
    /// keeps servable.
    pub const WINDOW_SEGMENTS_MAX: u32 = 720;
    /// The window of a channel the operator gave none, and of every channel
    /// a migration from schema 2 carries over: release 2's fixed window.
    pub const WINDOW_SEGMENTS_DEFAULT: u32 = 6;
    const _: () = assert!(WINDOW_SEGMENTS_DEFAULT as u64 == crate::hls::WINDOW_SEGMENTS);

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Channel {
        pub id: i64,
        pub name: String,
        pub segment_ms: u32,
        pub ladder: Vec<Rung>,
        /// Segments the live media playlist lists, within
        /// [`WINDOW_SEGMENTS_MIN`]..=[`WINDOW_SEGMENTS_MAX`].
        pub window_segments: u32,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Params {
        pub revision: u64,
        pub channels: Vec<Channel>,
        pub groups: Vec<Group>,
        pub events: Vec<Event>,
    }

    /// Whether `window_segments` is a window a channel may have.
    pub fn check_window(window_segments: u32) -> Result<(), String> {
        if (WINDOW_SEGMENTS_MIN..=WINDOW_SEGMENTS_MAX).contains(&window_segments) {
            Ok(())
        } else {
            Err(format!(
                "window_segments must be between {WINDOW_SEGMENTS_MIN} and {WINDOW_SEGMENTS_MAX}, not {window_segments}"
            ))
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParamsError {
    #[error("parameters of schema {schema} cannot be read by this release: {reason}")]
    Unreadable { schema: u32, reason: String },
    #[error("event {event} names channel {channel:?}, which the parameters do not define")]
    UnknownChannel { event: i64, channel: String },
    #[error("event {event} has a bad start time: {reason}")]
    BadStart { event: i64, reason: String },
    #[error("channel {channel:?}: {reason}")]
    BadWindow { channel: String, reason: String },
}

/// The events of `group` whose channel `channel` finds by id (schema 2 on),
/// each made live by `live`.
fn by_channel_id<'p, C: 'p>(
    events: &[v2::Event],
    group: &str,
    channel: impl Fn(i64) -> Option<&'p C>,
    live: impl Fn(&v2::Event, &'p C) -> Result<LiveEvent, ParamsError>,
) -> Result<Vec<LiveEvent>, ParamsError> {
    events
        .iter()
        .filter(|e| e.group == group)
        .map(|e| {
            let ch = channel(e.channel_id).ok_or_else(|| ParamsError::UnknownChannel {
                event: e.id,
                channel: e.channel_id.to_string(),
            })?;
            live(e, ch)
        })
        .collect()
}

/// Decodes parameters of `schema` and returns the events of `group`.
/// `reader` is the schema the calling release understands: a node only reads
/// parameters of its own schema.
pub fn events_for_group(
    reader: Schema,
    raw: &serde_json::Value,
    group: &str,
) -> Result<Vec<LiveEvent>, ParamsError> {
    let unreadable = |reason: String| ParamsError::Unreadable {
        schema: reader.0,
        reason,
    };
    match reader {
        Schema(1) => {
            let p: v1::Params =
                serde_json::from_value(raw.clone()).map_err(|e| unreadable(e.to_string()))?;
            p.events
                .iter()
                .filter(|e| e.group == group)
                .map(|e| {
                    let ch = p
                        .channels
                        .iter()
                        .find(|c| c.name == e.channel)
                        .ok_or_else(|| ParamsError::UnknownChannel {
                            event: e.id,
                            channel: e.channel.clone(),
                        })?;
                    let start_ms = crate::timefmt::ms_from_rfc3339(&e.start).map_err(|err| {
                        ParamsError::BadStart {
                            event: e.id,
                            reason: err.to_string(),
                        }
                    })?;
                    Ok(LiveEvent {
                        event_id: e.id,
                        channel: ch.name.clone(),
                        channel_id: None,
                        start_ms,
                        duration_ms: u64::from(e.duration_s) * 1000,
                        segment_ms: ch.segment_seconds.saturating_mul(1000),
                        window_segments: crate::hls::WINDOW_SEGMENTS,
                    })
                })
                .collect()
        }
        Schema(2) => {
            let p: v2::Params =
                serde_json::from_value(raw.clone()).map_err(|e| unreadable(e.to_string()))?;
            by_channel_id(
                &p.events,
                group,
                |id| p.channels.iter().find(|c| c.id == id),
                |e, ch| {
                    Ok(LiveEvent {
                        event_id: e.id,
                        channel: ch.name.clone(),
                        channel_id: Some(ch.id),
                        start_ms: e.start_ms,
                        duration_ms: e.duration_ms,
                        segment_ms: ch.segment_ms,
                        window_segments: crate::hls::WINDOW_SEGMENTS,
                    })
                },
            )
        }
        Schema(3) => {
            let p: v3::Params =
                serde_json::from_value(raw.clone()).map_err(|e| unreadable(e.to_string()))?;
            by_channel_id(
                &p.events,
                group,
                |id| p.channels.iter().find(|c| c.id == id),
                |e, ch| {
                    v3::check_window(ch.window_segments).map_err(|reason| {
                        ParamsError::BadWindow {
                            channel: ch.name.clone(),
                            reason,
                        }
                    })?;
                    Ok(LiveEvent {
                        event_id: e.id,
                        channel: ch.name.clone(),
                        channel_id: Some(ch.id),
                        start_ms: e.start_ms,
                        duration_ms: e.duration_ms,
                        segment_ms: ch.segment_ms,
                        window_segments: u64::from(ch.window_segments),
                    })
                },
            )
        }
        other => Err(unreadable(format!(
            "schema {other} is unknown to this release"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v1_params() -> serde_json::Value {
        json!({"revision": 3, "channels": [{"name": "news", "title": "News", "segment_seconds": 2,
            "resolution": "1280x720", "bitrate_kbps": 3000}],
            "groups": [{"name": "g1", "primary": "n1", "backup": "n2"}],
            "events": [{"id": 7, "channel": "news", "group": "g1", "start": "2026-11-25T23:00:00Z", "duration_s": 60},
                       {"id": 8, "channel": "news", "group": "g2", "start": "2026-11-25T23:00:00Z", "duration_s": 60}]})
    }

    fn v2_params() -> serde_json::Value {
        json!({"revision": 4, "channels": [{"id": 1, "name": "news", "segment_ms": 2000,
            "ladder": [{"height": 720, "kbps": 3000}]}],
            "groups": [{"name": "g1", "primary": "n1", "backup": "n2"}],
            "events": [{"id": 7, "channel_id": 1, "group": "g1", "start_ms": 1_795_000_000_000_i64, "duration_ms": 60000}]})
    }

    fn v3_params() -> serde_json::Value {
        json!({"revision": 5, "channels": [{"id": 1, "name": "news", "segment_ms": 2000,
            "ladder": [{"height": 720, "kbps": 3000}], "window_segments": 30}],
            "groups": [{"name": "g1", "primary": "n1", "backup": "n2"}],
            "events": [{"id": 7, "channel_id": 1, "group": "g1", "start_ms": 1_795_000_000_000_i64, "duration_ms": 60000}]})
    }

    #[test]
    fn each_release_reads_its_own_schema() {
        let e1 = events_for_group(Schema(1), &v1_params(), "g1").unwrap();
        assert_eq!(e1.len(), 1);
        assert_eq!(
            (e1[0].segment_ms, e1[0].duration_ms, e1[0].channel_id),
            (2000, 60000, None)
        );
        let e2 = events_for_group(Schema(2), &v2_params(), "g1").unwrap();
        assert_eq!(
            (e2[0].channel.as_str(), e2[0].channel_id),
            ("news", Some(1))
        );
        let window = crate::hls::WINDOW_SEGMENTS;
        assert_eq!(
            (e1[0].window_segments, e2[0].window_segments),
            (window, window)
        );
        let e3 = events_for_group(Schema(3), &v3_params(), "g1").unwrap();
        assert_eq!(
            (
                e3[0].channel.as_str(),
                e3[0].segment_ms,
                e3[0].window_segments
            ),
            ("news", 2000, 30)
        );
    }

    #[test]
    fn release_3_windows_are_bounded() {
        for (window, ok) in [(2, false), (3, true), (720, true), (721, false), (0, false)] {
            let mut p = v3_params();
            p["channels"][0]["window_segments"] = json!(window);
            let got = events_for_group(Schema(3), &p, "g1");
            assert_eq!(got.is_ok(), ok, "{window}: {got:?}");
            if !ok {
                assert!(matches!(got, Err(ParamsError::BadWindow { .. })), "{got:?}");
            }
        }
    }

    #[test]
    fn incompatible_in_both_directions() {
        // Release 2 and release 3 cannot read each other's parameters either.
        for (schema, params) in [
            (1, v2_params()),
            (2, v1_params()),
            (3, v2_params()),
            (2, v3_params()),
            (3, v1_params()),
        ] {
            let got = events_for_group(Schema(schema), &params, "g1");
            assert!(
                matches!(got, Err(ParamsError::Unreadable { .. })),
                "schema {schema}: {got:?}"
            );
        }
        assert!(events_for_group(Schema(4), &v3_params(), "g1").is_err());
    }

    #[test]
    fn dangling_channel_is_an_error() {
        let mut p = v2_params();
        p["events"][0]["channel_id"] = json!(99);
        assert!(matches!(
            events_for_group(Schema(2), &p, "g1"),
            Err(ParamsError::UnknownChannel { .. })
        ));
    }
}
