//! The node's HTTP face: HLS playlists and segments for viewers, plus
//! `/healthz` and `/status` for the supervisor and operators.
//!
//! Everything is served from the in-memory parameter cache and core's pure
//! schedule, so viewers keep playing whatever the grant or the controller's
//! health. Every answer that is not content is JSON; nothing here panics.

use crate::link::{ParamsCache, View};
use crate::producer::current_events;
use crate::store::Store;
use crate::viewer_counter::ViewerCounter;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use handover_core::params::LiveEvent;
use handover_core::wire::{ErrorBody, Role};
use handover_core::ReleaseInfo;
use std::sync::Arc;
use tokio::sync::watch;

/// An event that ended less than this long ago still has its playlist served
/// (with ENDLIST), so players finish cleanly.
pub const RECENTLY_ENDED_MS: i64 = 120_000;
/// Segments older than this many playlist windows (of the event's own
/// window) are no longer served.
pub const SEGMENT_WINDOWS_SERVED: u64 = 3;
pub const PLAYLIST_CONTENT_TYPE: &str = "application/vnd.apple.mpegurl";
pub const SEGMENT_CONTENT_TYPE: &str = "video/mp2t";

/// The event whose playlist `channel` shows at `now_ms`: the one live now
/// (the latest started if several), else the one that ended most recently
/// within [`RECENTLY_ENDED_MS`]; none if nothing on the channel has started.
pub fn select_event<'a>(
    events: &'a [LiveEvent],
    channel: &str,
    now_ms: i64,
) -> Option<&'a LiveEvent> {
    let on_channel = || events.iter().filter(move |e| e.channel == channel);
    on_channel()
        .filter(|e| e.is_live(now_ms))
        .max_by_key(|e| e.start_ms)
        .or_else(|| {
            on_channel()
                .filter(|e| e.has_ended(now_ms) && now_ms - e.end_ms() <= RECENTLY_ENDED_MS)
                .max_by_key(|e| e.end_ms())
        })
}

/// Whether `seq` of `e` may be served at `now_ms`: completed, and not older
/// than [`SEGMENT_WINDOWS_SERVED`] of the event's playlist windows.
pub fn segment_servable(e: &LiveEvent, seq: u64, now_ms: i64) -> bool {
    let done = e.completed_segments(now_ms);
    let kept = SEGMENT_WINDOWS_SERVED.saturating_mul(e.window_segments);
    seq < done && seq >= done.saturating_sub(kept)
}

/// Everything the HTTP handlers read.
pub struct HttpState {
    pub node_id: String,
    pub release: &'static ReleaseInfo,
    pub role: Role,
    pub group: String,
    pub store: Arc<Store>,
    /// The node machine's view: grant, epoch, reachability, and why the
    /// outbox does not ship or the named artifact does not stage.
    pub view: watch::Receiver<View>,
    pub params: watch::Receiver<Arc<ParamsCache>>,
    pub viewers: Arc<ViewerCounter>,
    /// Ids of the keys artifacts must be signed by (empty: not checked).
    pub trusted_key_ids: Vec<String>,
}

type Shared = Arc<HttpState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/status", get(status))
        .route("/hls/{channel}/{file}", get(hls))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Every error code a node answers viewers and operators with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    NotFound,
    MethodNotAllowed,
    /// The channel has no live or recently ended event here.
    NotLive,
    /// The segment is not (or no longer) in the window served.
    NoSuchSegment,
    /// Not a valid artifact id (peer serving).
    InvalidId,
    /// No artifact of that id is staged here (peer serving).
    NotStaged,
    /// Serving as many artifact downloads as it allows at once; try
    /// another source (peer serving).
    Busy,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::NotLive,
        ErrorCode::NoSuchSegment,
        ErrorCode::InvalidId,
        ErrorCode::NotStaged,
        ErrorCode::Busy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::NotLive => "not_live",
            ErrorCode::NoSuchSegment => "no_such_segment",
            ErrorCode::InvalidId => "invalid_id",
            ErrorCode::NotStaged => "not_staged",
            ErrorCode::Busy => "busy",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::NotFound
            | ErrorCode::NotLive
            | ErrorCode::NoSuchSegment
            | ErrorCode::NotStaged => StatusCode::NOT_FOUND,
            ErrorCode::InvalidId => StatusCode::BAD_REQUEST,
            ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Busy => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

pub(crate) fn error(code: ErrorCode, message: impl Into<String>) -> Response {
    (
        code.status(),
        Json(ErrorBody {
            error: code.as_str().to_owned(),
            message: message.into(),
        }),
    )
        .into_response()
}

async fn not_found() -> Response {
    error(ErrorCode::NotFound, "no such resource")
}

async fn method_not_allowed() -> Response {
    error(ErrorCode::MethodNotAllowed, "only GET is served here")
}

async fn healthz() -> &'static str {
    "ok"
}

async fn status(State(s): State<Shared>) -> Response {
    let link = s.view.borrow().clone();
    let outbox = s.store.outbox_state();
    let params = s.params.borrow().clone();
    Json(serde_json::json!({
        "node_id": s.node_id,
        "release": s.release.release,
        "schema": s.release.schema,
        "role": s.role,
        "group": s.group,
        "grant": link.grant,
        "grant_reason": link.reason,
        "epoch": link.epoch,
        "outbox": outbox,
        "produced": outbox.next_seq.saturating_sub(1),
        "current_events": current_events(&params.events, crate::runtime::wall_clock_ms()),
        "param_revision": params.revision,
        "controller_reachable": link.reachable,
        "ship_error": link.ship_error,
        "switch_error": link.switch_failure,
        "stage_error": link.stage_error,
        "hello_error": link.hello_error,
        "trusted_keys": s.trusted_key_ids,
    }))
    .into_response()
}

async fn hls(
    State(s): State<Shared>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let Ok(Path((channel, file))) = path else {
        return not_found().await;
    };
    s.viewers.request();
    let now = crate::runtime::wall_clock_ms();
    let params = s.params.borrow().clone();
    if params.events.iter().any(|e| e.channel == channel) {
        s.viewers.hit(&channel, now);
    }
    let event = select_event(&params.events, &channel, now);
    if file == "index.m3u8" {
        return match event.and_then(|e| e.media_playlist(now)) {
            Some(body) => (
                [
                    (header::CONTENT_TYPE, PLAYLIST_CONTENT_TYPE),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                body,
            )
                .into_response(),
            None => error(
                ErrorCode::NotLive,
                format!("channel {channel:?} has no live or recently ended event on this node"),
            ),
        };
    }
    let Some(seq) = file
        .strip_suffix(".ts")
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|d| d.parse::<u64>().ok())
    else {
        return not_found().await;
    };
    match event {
        Some(e) if segment_servable(e, seq, now) => (
            [
                (header::CONTENT_TYPE, SEGMENT_CONTENT_TYPE),
                (header::CACHE_CONTROL, "max-age=60"),
            ],
            handover_core::ts::segment(&channel, seq, e.segment_duration_ms(seq)),
        )
            .into_response(),
        _ => error(
            ErrorCode::NoSuchSegment,
            format!("segment {seq} of channel {channel:?} is not available"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: i64, start_ms: i64, duration_ms: u64) -> LiveEvent {
        LiveEvent {
            event_id: id,
            channel: "news".into(),
            channel_id: None,
            start_ms,
            duration_ms,
            segment_ms: 2_000,
            window_segments: handover_core::hls::WINDOW_SEGMENTS,
        }
    }

    #[test]
    fn playlist_event_selection() {
        let events = [event(1, 0, 10_000), event(2, 50_000, 10_000)];
        assert_eq!(
            select_event(&events, "news", 5_000).map(|e| e.event_id),
            Some(1)
        );
        assert_eq!(
            select_event(&events, "news", 40_000).map(|e| e.event_id),
            Some(1)
        );
        assert_eq!(
            select_event(&events, "news", 55_000).map(|e| e.event_id),
            Some(2)
        );
        assert_eq!(
            select_event(&events, "news", 60_000 + RECENTLY_ENDED_MS).map(|e| e.event_id),
            Some(2)
        );
        assert_eq!(
            select_event(&events, "news", 60_000 + RECENTLY_ENDED_MS + 1),
            None
        );
        assert_eq!(select_event(&events, "news", -1), None);
        assert_eq!(select_event(&events, "sport", 5_000), None);
    }

    #[test]
    fn servable_segments() {
        let e = event(1, 0, 600_000);
        assert!(!segment_servable(&e, 0, 1_999));
        assert!(segment_servable(&e, 0, 2_000));
        assert!(!segment_servable(&e, 1, 2_000));
        let now = 100_000; // 50 completed
        assert!(segment_servable(&e, 49, now));
        assert!(segment_servable(&e, 50 - 18, now));
        assert!(!segment_servable(&e, 50 - 19, now));
        // A channel's own window (schema 3): three of its windows are kept.
        let deep = LiveEvent {
            window_segments: 10,
            ..e
        };
        assert!(segment_servable(&deep, 50 - 30, now));
        assert!(!segment_servable(&deep, 50 - 31, now));
    }

    #[test]
    fn counter_keeps_two_seconds() {
        let c = ViewerCounter::default();
        c.hit("news", 1_000);
        c.hit("news", 1_999);
        c.hit("news", 2_100);
        assert_eq!(c.count("news", 1), 2);
        assert_eq!(c.count("news", 2), 1);
        assert_eq!(c.count("news", 0), 0);
        assert_eq!(c.count("sport", 1), 0);
        c.hit("news", 5_000);
        assert_eq!(c.count("news", 1), 0);
        assert_eq!(c.count("news", 2), 1);
        assert_eq!(c.requests(), 0);
        c.request();
        c.request();
        assert_eq!(c.requests(), 2);
    }
}
