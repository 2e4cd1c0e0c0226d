//! `handover viewers`: a load generator that behaves like HLS players with
//! redundant streams, so an upgrade can be judged by what viewers actually saw
//! (failed requests, failovers, missed segments, latency).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use handover_core::api::{EventView, GroupNodes};
use hdrhistogram::Histogram;
use m3u8_rs::MediaPlaylist;
use reqwest::{Client, StatusCode, Url};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::client::Operator;

/// Upper bound on viewers per channel so a typo cannot exhaust sockets or memory.
pub const MAX_VIEWERS_PER_CHANNEL: usize = 10_000;
/// Real media playlists are a few KiB; anything larger is a broken node.
const MAX_PLAYLIST_BYTES: u64 = 1 << 20;
/// Generous for one segment; bounds memory and time spent on a runaway body.
const MAX_SEGMENT_BYTES: u64 = 16 << 20;
/// Error bodies are only read to find the `error` code.
const MAX_ERROR_BODY_BYTES: u64 = 64 << 10;
const MIN_POLL: Duration = Duration::from_millis(200);
const MAX_POLL: Duration = Duration::from_secs(5);
/// Used until the first playlist tells us its target duration.
const DEFAULT_POLL: Duration = Duration::from_millis(500);
/// A segment that failed on every node this many poll rounds is given up as missed,
/// so a permanently broken segment in an ended stream cannot stall a viewer forever.
const MAX_SEGMENT_ROUNDS: u32 = 3;
/// A viewer's request fails after this long, as a player gives up on a
/// node and tries the other one.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Significant digits the latency histograms keep (0.1 % resolution).
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;
/// Viewer starts are spread over this window so N viewers don't all connect in the same instant.
const START_RAMP: Duration = Duration::from_millis(500);
/// Latency histograms are sharded to keep lock contention low with thousands of viewers.
const LATENCY_SHARDS: usize = 16;
/// Highest trackable latency (1 h in µs); larger values saturate.
const MAX_LATENCY_US: u64 = 3_600_000_000;
/// Failed requests the report describes (the first ones, by viewer), so a
/// run that failed says why without debug logs.
pub const FAILURES_SHOWN_MAX: usize = 8;

/// One channel and the redundancy group nodes that serve it.
#[derive(Debug, Clone)]
pub struct ChannelTarget {
    pub channel: String,
    /// Node base URLs such as `http://127.0.0.5:7000`, primary first.
    pub node_urls: Vec<String>,
}

/// Each channel with an event (only those in `only`, if any), and the HLS
/// URLs of the group running it, as the controller's operator API tells.
pub async fn targets(op: &Operator, only: &[String]) -> Result<Vec<ChannelTarget>> {
    let events: Vec<EventView> = op.get("/api/v1/events").await?;
    let mut targets: Vec<ChannelTarget> = Vec::new();
    for e in events {
        if (!only.is_empty() && !only.contains(&e.channel))
            || targets.iter().any(|t| t.channel == e.channel)
        {
            continue;
        }
        let nodes: GroupNodes = op.get(&format!("/api/v1/groups/{}/nodes", e.group)).await?;
        if nodes.hls_urls.is_empty() {
            bail!("group {} has no node that said hello yet", e.group);
        }
        targets.push(ChannelTarget {
            channel: e.channel,
            node_urls: nodes.hls_urls,
        });
    }
    Ok(targets)
}

#[derive(Debug, Clone)]
pub struct ViewerConfig {
    pub targets: Vec<ChannelTarget>,
    pub viewers_per_channel: usize,
    pub duration: Duration,
    pub request_timeout: Duration,
    /// While this is true, latencies also count as "steady" (no upgrade under way).
    pub steady: Option<Arc<AtomicBool>>,
}

/// Totals over all viewers of all channels.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ViewerReport {
    pub viewers: u64,
    pub requests: u64,
    pub failed_requests: u64,
    pub failovers: u64,
    pub not_live_polls: u64,
    pub playlists: u64,
    pub segments_received: u64,
    pub segments_missed: u64,
    pub bytes_received: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// p99 of the requests made while `steady` was set (0 without it).
    pub steady_p99_ms: f64,
    pub ended_streams: u64,
    /// The first failed requests (at most [`FAILURES_SHOWN_MAX`]): when,
    /// which URL, why.
    #[serde(default)]
    pub failures: Vec<String>,
}

/// Runs `viewers_per_channel` viewers per target until every stream ended,
/// `duration` passed or `stop` turned true, and reports what they saw.
/// Runs `config` from wall-clock `start_at_ms` (Unix ms) in a task of its
/// own, until its duration ends or every stream ended.
pub fn spawn_at(
    config: ViewerConfig,
    start_at_ms: i64,
) -> tokio::task::JoinHandle<Result<ViewerReport>> {
    tokio::spawn(async move {
        let wait = u64::try_from(start_at_ms - crate::client::now_ms()).unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let (_stop_tx, stop_rx) = watch::channel(false);
        run(&config, stop_rx).await
    })
}

pub async fn run(config: &ViewerConfig, stop: watch::Receiver<bool>) -> Result<ViewerReport> {
    let per_channel = config.viewers_per_channel;
    if per_channel > MAX_VIEWERS_PER_CHANNEL {
        bail!("viewers per channel is {per_channel}, at most {MAX_VIEWERS_PER_CHANNEL} allowed");
    }
    if config.request_timeout.is_zero() {
        bail!("request timeout must be greater than zero");
    }
    let mut channels = Vec::with_capacity(config.targets.len());
    for target in &config.targets {
        if target.node_urls.is_empty() {
            bail!("channel {:?} has no node URLs", target.channel);
        }
        let urls = target
            .node_urls
            .iter()
            .map(|base| playlist_url(base, &target.channel))
            .collect::<Result<Vec<_>>>()?;
        channels.push(Arc::<[Url]>::from(urls));
    }

    let client = Client::builder()
        .timeout(config.request_timeout)
        .connect_timeout(config.request_timeout)
        // Nodes are addressed directly; an ambient HTTP_PROXY would measure the proxy instead.
        .no_proxy()
        .build()
        .context("building HTTP client")?;
    let shared = Arc::new(Shared {
        client,
        request_timeout: config.request_timeout,
        latency: (0..LATENCY_SHARDS)
            .map(|_| new_histogram().map(Mutex::new))
            .collect::<Result<_>>()?,
        steady_flag: config.steady.clone(),
        steady: Mutex::new(new_histogram()?),
    });
    // `None` means the duration is too large to represent: run until stopped.
    let deadline = Instant::now().checked_add(config.duration);

    let mut tasks = JoinSet::new();
    let mut spawned = 0u64;
    for playlists in &channels {
        for i in 0..per_channel {
            let viewer = Viewer::new(
                Arc::clone(&shared),
                Arc::clone(playlists),
                i % playlists.len(),
                spawned as usize % LATENCY_SHARDS,
            );
            // per_channel <= MAX_VIEWERS_PER_CHANNEL, so both fit in u32.
            let delay = START_RAMP * i as u32 / per_channel as u32;
            tasks.spawn(viewer.watch(delay, stop.clone(), deadline));
            spawned += 1;
        }
    }

    let mut report = ViewerReport {
        viewers: spawned,
        ..ViewerReport::default()
    };
    while let Some(joined) = tasks.join_next().await {
        joined.context("viewer task failed")?.add_to(&mut report);
    }

    let mut merged = new_histogram()?;
    for shard in shared.latency.iter() {
        let shard = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        merged.add(&*shard).context("merging latency histograms")?;
    }
    if !merged.is_empty() {
        report.p50_ms = merged.value_at_quantile(0.50) as f64 / 1000.0;
        report.p99_ms = merged.value_at_quantile(0.99) as f64 / 1000.0;
        report.max_ms = merged.max() as f64 / 1000.0;
    }
    let steady = shared
        .steady
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !steady.is_empty() {
        report.steady_p99_ms = steady.value_at_quantile(0.99) as f64 / 1000.0;
    }
    Ok(report)
}

fn new_histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, LATENCY_SIGNIFICANT_DIGITS)
        .context("creating latency histogram")
}

/// `{base}/hls/{channel}/index.m3u8`, with the channel percent-encoded as one path segment.
fn playlist_url(base: &str, channel: &str) -> Result<Url> {
    let mut url = Url::parse(base).with_context(|| format!("invalid node URL {base:?}"))?;
    url.path_segments_mut()
        .map_err(|()| anyhow::anyhow!("node URL {base:?} cannot be a base"))?
        .pop_if_empty()
        .extend(["hls", channel, "index.m3u8"]);
    Ok(url)
}

/// Poll about twice per target duration, as players do, within sane bounds.
fn poll_interval(target_duration_secs: u64) -> Duration {
    Duration::from_millis(target_duration_secs.saturating_mul(500)).clamp(MIN_POLL, MAX_POLL)
}

/// State shared by all viewers: one pooled client and the latency histograms.
struct Shared {
    client: Client,
    request_timeout: Duration,
    latency: Vec<Mutex<Histogram<u64>>>,
    steady_flag: Option<Arc<AtomicBool>>,
    steady: Mutex<Histogram<u64>>,
}

enum Outcome {
    /// 2xx with a complete, non-empty body; `body` is only filled when asked for.
    Ok {
        body: Vec<u8>,
        bytes: u64,
    },
    /// 404 with `"error":"not_live"`: the event has not started on that node.
    NotLive,
    Failed(String),
}

#[derive(Deserialize)]
struct NodeError {
    error: String,
}

impl Shared {
    /// One GET, bounded by `request_timeout` end to end (the client timeout alone
    /// would not cover a body trickling in chunk by chunk on every reqwest version).
    async fn fetch(&self, url: Url, limit: u64, keep_body: bool, shard: usize) -> Outcome {
        let started = Instant::now();
        let steady = self
            .steady_flag
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Relaxed));
        let outcome =
            match tokio::time::timeout(self.request_timeout, self.get(url, limit, keep_body)).await
            {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Failed("timed out".to_string()),
            };
        if let Outcome::Ok { .. } = outcome {
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            if let Some(histogram) = self.latency.get(shard) {
                histogram
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .saturating_record(micros.max(1));
            }
            if steady {
                self.steady
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .saturating_record(micros.max(1));
            }
        }
        outcome
    }

    async fn get(&self, url: Url, limit: u64, keep_body: bool) -> Outcome {
        let mut response = match self.client.get(url).send().await {
            Ok(response) => response,
            Err(err) => return Outcome::Failed(format!("request failed: {err}")),
        };
        let status = response.status();
        if !status.is_success() {
            let code = read_body(&mut response, MAX_ERROR_BODY_BYTES, true)
                .await
                .ok()
                .and_then(|(body, _)| serde_json::from_slice::<NodeError>(&body).ok())
                .map(|e| e.error);
            if status == StatusCode::NOT_FOUND
                && code.as_deref() == Some(handover_node::hls::ErrorCode::NotLive.as_str())
            {
                return Outcome::NotLive;
            }
            return Outcome::Failed(format!("status {status} ({})", code.unwrap_or_default()));
        }
        let expected = response.content_length();
        if expected.is_some_and(|len| len > limit) {
            return Outcome::Failed(format!("body larger than {limit} bytes"));
        }
        match read_body(&mut response, limit, keep_body).await {
            Err(reason) => Outcome::Failed(reason),
            Ok((_, 0)) => Outcome::Failed("empty body".to_string()),
            Ok((_, bytes)) if expected.is_some_and(|len| len != bytes) => {
                Outcome::Failed(format!("short body: {bytes} bytes"))
            }
            Ok((body, bytes)) => Outcome::Ok { body, bytes },
        }
    }
}

/// Reads the body chunk by chunk so an oversized one is cut off at `limit`.
async fn read_body(
    response: &mut reqwest::Response,
    limit: u64,
    keep: bool,
) -> std::result::Result<(Vec<u8>, u64), String> {
    let mut body = Vec::new();
    let mut total = 0u64;
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| format!("reading body: {err}"))?
    {
        total = total.saturating_add(chunk.len() as u64);
        if total > limit {
            return Err(format!("body larger than {limit} bytes"));
        }
        if keep {
            body.extend_from_slice(&chunk);
        }
    }
    Ok((body, total))
}

/// Per-viewer counters, summed into the report at the end.
#[derive(Debug, Default)]
struct Counts {
    requests: u64,
    failed_requests: u64,
    failovers: u64,
    not_live_polls: u64,
    playlists: u64,
    segments_received: u64,
    segments_missed: u64,
    bytes_received: u64,
    ended_streams: u64,
    failures: Vec<String>,
}

impl Counts {
    fn add_to(&self, report: &mut ViewerReport) {
        report.requests += self.requests;
        report.failed_requests += self.failed_requests;
        report.failovers += self.failovers;
        report.not_live_polls += self.not_live_polls;
        report.playlists += self.playlists;
        report.segments_received += self.segments_received;
        report.segments_missed += self.segments_missed;
        report.bytes_received += self.bytes_received;
        report.ended_streams += self.ended_streams;
        let room = FAILURES_SHOWN_MAX.saturating_sub(report.failures.len());
        report
            .failures
            .extend(self.failures.iter().take(room).cloned());
    }
}

/// One simulated player following one channel across its redundant nodes.
struct Viewer {
    shared: Arc<Shared>,
    /// Playlist URL per node, primary first.
    playlists: Arc<[Url]>,
    /// Node currently used; sticks until an error moves it on.
    node: usize,
    shard: usize,
    poll: Duration,
    /// Whether a playlist with segments was seen; fixes the starting point.
    started: bool,
    /// Media sequence number of the next segment to fetch.
    next_seq: u64,
    /// Highest media sequence number listed in any playlist seen.
    max_seen: u64,
    /// Skipped sequence numbers never listed in a playlist we saw; they only
    /// count as missed once a later segment arrives (gap between received ones).
    pending_gap: u64,
    /// Segment that failed on all nodes, and in how many poll rounds.
    stuck: Option<(u64, u32)>,
    counts: Counts,
}

impl Viewer {
    fn new(shared: Arc<Shared>, playlists: Arc<[Url]>, node: usize, shard: usize) -> Self {
        Viewer {
            shared,
            playlists,
            node,
            shard,
            poll: DEFAULT_POLL,
            started: false,
            next_seq: 0,
            max_seen: 0,
            pending_gap: 0,
            stuck: None,
            counts: Counts::default(),
        }
    }

    /// Plays until the stream ends or the run is stopped; counters survive cancellation.
    async fn watch(
        mut self,
        delay: Duration,
        stop: watch::Receiver<bool>,
        deadline: Option<Instant>,
    ) -> Counts {
        tokio::select! {
            () = async {
                tokio::time::sleep(delay).await;
                self.play().await;
            } => {}
            () = stopped(stop, deadline) => {}
        }
        self.counts
    }

    async fn play(&mut self) {
        loop {
            let polled_at = Instant::now();
            if let Some(playlist) = self.poll_playlist().await {
                if self.follow(&playlist).await {
                    self.counts.ended_streams += 1;
                    return;
                }
            }
            tokio::time::sleep_until(polled_at + self.poll).await;
        }
    }

    /// Fetches the playlist, trying each node at most once.
    async fn poll_playlist(&mut self) -> Option<MediaPlaylist> {
        for _ in 0..self.playlists.len() {
            let url = self.playlists[self.node].clone();
            self.counts.requests += 1;
            let outcome = self
                .shared
                .fetch(url.clone(), MAX_PLAYLIST_BYTES, true, self.shard)
                .await;
            let reason = match outcome {
                Outcome::Ok { body, .. } => match m3u8_rs::parse_media_playlist_res(&body) {
                    Ok(playlist) => {
                        self.counts.playlists += 1;
                        return Some(playlist);
                    }
                    // The nom error embeds the remaining input; too noisy to log.
                    Err(_) => "unparsable playlist".to_string(),
                },
                Outcome::NotLive if !self.started => {
                    // The event has not begun: expected, not a failure.
                    self.counts.not_live_polls += 1;
                    return None;
                }
                Outcome::NotLive => "not_live after the stream started".to_string(),
                Outcome::Failed(reason) => reason,
            };
            self.fail(&url, &reason);
        }
        None
    }

    /// Fetches the new segments of `playlist` in order; true once the stream has ended
    /// and everything in it was fetched.
    async fn follow(&mut self, playlist: &MediaPlaylist) -> bool {
        self.poll = poll_interval(playlist.target_duration);
        let Some(last_index) = playlist.segments.len().checked_sub(1) else {
            return playlist.end_list;
        };
        let first = playlist.media_sequence;
        let last = first.saturating_add(last_index as u64);
        if !self.started {
            // Join at the live edge, like a player does.
            self.started = true;
            self.next_seq = last;
            self.max_seen = last;
        } else {
            if first > self.next_seq {
                // The window moved past segments we never fetched.
                let skipped = first - self.next_seq;
                let seen = if self.max_seen >= self.next_seq {
                    (self.max_seen + 1).min(first) - self.next_seq
                } else {
                    0
                };
                self.counts.segments_missed += seen;
                self.pending_gap = self.pending_gap.saturating_add(skipped - seen);
                self.next_seq = first;
            }
            self.max_seen = self.max_seen.max(last);
        }

        while self.next_seq <= last {
            let seq = self.next_seq;
            // first <= seq <= last here, so the index is in bounds.
            let Some(segment) = playlist.segments.get((seq - first) as usize) else {
                break;
            };
            if self.fetch_segment(&segment.uri).await {
                self.counts.segments_missed += std::mem::take(&mut self.pending_gap);
                self.next_seq = seq + 1;
                continue;
            }
            let rounds = match self.stuck {
                Some((stuck_seq, rounds)) if stuck_seq == seq => rounds + 1,
                _ => 1,
            };
            if rounds >= MAX_SEGMENT_ROUNDS {
                self.counts.segments_missed += 1;
                self.next_seq = seq + 1;
                self.stuck = None;
            } else {
                self.stuck = Some((seq, rounds));
            }
            // Every node failed: wait for the next poll instead of spinning.
            return false;
        }
        playlist.end_list
    }

    /// Fetches one segment, trying each node at most once; true on success.
    async fn fetch_segment(&mut self, uri: &str) -> bool {
        for _ in 0..self.playlists.len() {
            self.counts.requests += 1;
            let base = &self.playlists[self.node];
            let url = match base.join(uri) {
                Ok(url) => url,
                Err(err) => {
                    let base = base.clone();
                    self.fail(&base, &format!("bad segment URI {uri:?}: {err}"));
                    continue;
                }
            };
            let outcome = self
                .shared
                .fetch(url.clone(), MAX_SEGMENT_BYTES, false, self.shard)
                .await;
            let reason = match outcome {
                Outcome::Ok { bytes, .. } => {
                    self.counts.segments_received += 1;
                    self.counts.bytes_received += bytes;
                    return true;
                }
                Outcome::NotLive => "segment answered not_live".to_string(),
                Outcome::Failed(reason) => reason,
            };
            self.fail(&url, &reason);
        }
        false
    }

    /// Counts a failed request and moves to the next node, as a player with redundant streams does.
    fn fail(&mut self, url: &Url, reason: &str) {
        self.counts.failed_requests += 1;
        tracing::debug!(%url, reason, "viewer request failed");
        if self.counts.failures.len() < FAILURES_SHOWN_MAX {
            let at = handover_core::timefmt::rfc3339_from_ms(crate::client::now_ms())
                .unwrap_or_default();
            self.counts.failures.push(format!("{at} {url}: {reason}"));
        }
        if self.playlists.len() > 1 {
            self.node = (self.node + 1) % self.playlists.len();
            self.counts.failovers += 1;
        }
    }
}

/// Resolves when the deadline passes or `stop` turns true. A dropped sender
/// means nobody will ask us to stop, so only the deadline remains.
async fn stopped(mut stop: watch::Receiver<bool>, deadline: Option<Instant>) {
    let deadline = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    let flag = async {
        if stop.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = deadline => {}
        () = flag => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Path, State};
    use axum::http::{header, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::{Json, Router};
    use std::sync::atomic::{AtomicU64, Ordering};

    const SEGMENT: Duration = Duration::from_millis(200);
    const WINDOW: u64 = 4;
    const LAST_SEGMENT: u64 = 12;

    /// A scripted playlist: media sequence, number of segments, ENDLIST.
    type Step = (u64, u64, bool);

    #[derive(Clone)]
    enum Behaviour {
        /// Live stream computed from time since `live_at`; not live before it.
        Live { live_at: std::time::Instant },
        /// Every request fails with 500.
        Broken,
        /// The n-th playlist request gets `steps[n]` (the last step repeats);
        /// segments in `broken` always fail.
        Scripted { steps: Vec<Step>, broken: Vec<u64> },
    }

    #[derive(Clone)]
    struct Fake {
        behaviour: Behaviour,
        playlist_hits: Arc<AtomicU64>,
        hits: Arc<AtomicU64>,
    }

    fn fake(behaviour: Behaviour) -> Fake {
        Fake {
            behaviour,
            playlist_hits: Arc::new(AtomicU64::new(0)),
            hits: Arc::new(AtomicU64::new(0)),
        }
    }

    fn error(status: StatusCode, code: &str) -> Response {
        let body = serde_json::json!({ "error": code, "message": "fake" });
        (status, Json(body)).into_response()
    }

    /// Segments produced so far on a live timeline, or None before it starts.
    fn produced(live_at: std::time::Instant) -> Option<u64> {
        let elapsed = std::time::Instant::now().checked_duration_since(live_at)?;
        let n = (elapsed.as_millis() / SEGMENT.as_millis()) as u64 + 1;
        Some(n.min(LAST_SEGMENT))
    }

    fn render((media_sequence, count, end): Step) -> String {
        let mut text = format!(
            "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXT-X-MEDIA-SEQUENCE:{media_sequence}\n"
        );
        for seq in media_sequence..media_sequence + count {
            text.push_str(&format!("#EXTINF:0.200,\n{seq}.ts\n"));
        }
        if end {
            text.push_str("#EXT-X-ENDLIST\n");
        }
        text
    }

    async fn playlist(State(fake): State<Fake>) -> Response {
        fake.hits.fetch_add(1, Ordering::Relaxed);
        let hit = fake.playlist_hits.fetch_add(1, Ordering::Relaxed);
        let step = match &fake.behaviour {
            Behaviour::Broken => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            Behaviour::Live { live_at } => {
                let Some(n) = produced(*live_at) else {
                    return error(
                        StatusCode::NOT_FOUND,
                        handover_node::hls::ErrorCode::NotLive.as_str(),
                    );
                };
                let first = n.saturating_sub(WINDOW);
                (first, n - first, n == LAST_SEGMENT)
            }
            Behaviour::Scripted { steps, .. } => steps[(hit as usize).min(steps.len() - 1)],
        };
        let content_type = [(header::CONTENT_TYPE, "application/vnd.apple.mpegurl")];
        (content_type, render(step)).into_response()
    }

    async fn segment(
        State(fake): State<Fake>,
        Path((_channel, file)): Path<(String, String)>,
    ) -> Response {
        fake.hits.fetch_add(1, Ordering::Relaxed);
        let Some(seq) = file
            .strip_suffix(".ts")
            .and_then(|seq| seq.parse::<u64>().ok())
        else {
            return error(StatusCode::NOT_FOUND, "not_found");
        };
        let available = match &fake.behaviour {
            Behaviour::Broken => return error(StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            Behaviour::Live { live_at } => produced(*live_at).is_some_and(|n| seq < n),
            Behaviour::Scripted { broken, .. } => {
                if broken.contains(&seq) {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
                }
                true
            }
        };
        if !available {
            return error(StatusCode::NOT_FOUND, "not_found");
        }
        format!("segment {seq}").into_response()
    }

    /// Serves `fake` on 127.0.0.1:0 and returns its base URL.
    async fn serve(fake: Fake) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/hls/{channel}/index.m3u8", get(playlist))
            .route("/hls/{channel}/{file}", get(segment))
            .with_state(fake);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    fn config(channels: &[&str], node_urls: &[String], viewers: usize) -> ViewerConfig {
        ViewerConfig {
            targets: channels
                .iter()
                .map(|channel| ChannelTarget {
                    channel: channel.to_string(),
                    node_urls: node_urls.to_vec(),
                })
                .collect(),
            viewers_per_channel: viewers,
            duration: Duration::from_secs(10),
            request_timeout: Duration::from_secs(3),
            steady: None,
        }
    }

    async fn run_to_end(config: &ViewerConfig) -> ViewerReport {
        let (_stop_tx, stop) = watch::channel(false);
        run(config, stop).await.unwrap()
    }

    /// Every request is a playlist, a segment or a not_live poll, or failed.
    fn assert_requests_add_up(report: &ViewerReport) {
        assert_eq!(
            report.requests,
            report.playlists
                + report.segments_received
                + report.not_live_polls
                + report.failed_requests,
            "{report:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn healthy_nodes_serve_every_segment() {
        let live_at = std::time::Instant::now();
        let (a, b) = (
            fake(Behaviour::Live { live_at }),
            fake(Behaviour::Live { live_at }),
        );
        let (a_hits, b_hits) = (a.hits.clone(), b.hits.clone());
        let nodes = vec![serve(a).await, serve(b).await];
        let report = run_to_end(&config(&["one", "two"], &nodes, 4)).await;

        assert_eq!(report.viewers, 8, "{report:?}");
        assert_eq!(report.failed_requests, 0, "{report:?}");
        assert_eq!(report.failovers, 0, "{report:?}");
        assert_eq!(report.segments_missed, 0, "{report:?}");
        assert_eq!(report.ended_streams, 8, "{report:?}");
        assert!(report.segments_received >= 8, "{report:?}");
        assert!(
            report.bytes_received >= report.segments_received * 9,
            "{report:?}"
        );
        assert!(report.p50_ms > 0.0, "{report:?}");
        assert!(report.p50_ms <= report.p99_ms && report.p99_ms <= report.max_ms);
        assert_requests_add_up(&report);
        // Viewers are spread over the redundancy group.
        assert!(a_hits.load(Ordering::Relaxed) > 0);
        assert!(b_hits.load(Ordering::Relaxed) > 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failing_node_fails_over_without_missing_segments() {
        let live_at = std::time::Instant::now();
        let nodes = vec![
            serve(fake(Behaviour::Broken)).await,
            serve(fake(Behaviour::Live { live_at })).await,
        ];
        let report = run_to_end(&config(&["one"], &nodes, 4)).await;

        // Viewers 0 and 2 start on the broken node, fail once and stay on the good one.
        assert_eq!(report.failed_requests, 2, "{report:?}");
        assert_eq!(report.failovers, 2, "{report:?}");
        assert_eq!(report.segments_missed, 0, "{report:?}");
        assert_eq!(report.ended_streams, 4, "{report:?}");
        assert_requests_add_up(&report);
    }

    #[tokio::test]
    async fn window_jump_counts_the_gap_as_missed() {
        let steps = vec![(0, 4, false), (2, 4, false), (8, 2, false), (8, 3, true)];
        let nodes = vec![
            serve(fake(Behaviour::Scripted {
                steps,
                broken: vec![],
            }))
            .await,
        ];
        let report = run_to_end(&config(&["one"], &nodes, 1)).await;

        // Received 3 (live edge), 4, 5, 8, 9, 10; 6 and 7 never appeared.
        assert_eq!(report.segments_received, 6, "{report:?}");
        assert_eq!(report.segments_missed, 2, "{report:?}");
        assert_eq!(report.failed_requests, 0, "{report:?}");
        assert_eq!(report.ended_streams, 1, "{report:?}");
        assert_requests_add_up(&report);
    }

    #[tokio::test]
    async fn unfetchable_segment_and_gap_are_counted_once() {
        // Segment 5 is listed but always fails, then drops out in a jump past 6 and 7.
        let steps = vec![(0, 4, false), (2, 4, false), (8, 2, false), (8, 3, true)];
        let fake = fake(Behaviour::Scripted {
            steps,
            broken: vec![5],
        });
        let nodes = vec![serve(fake).await];
        let report = run_to_end(&config(&["one"], &nodes, 1)).await;

        assert_eq!(report.segments_received, 5, "{report:?}");
        assert_eq!(report.segments_missed, 3, "{report:?}");
        assert_eq!(report.failed_requests, 1, "{report:?}");
        assert_eq!(report.failovers, 0, "{report:?}");
        assert_eq!(report.ended_streams, 1, "{report:?}");
        assert_requests_add_up(&report);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn not_live_before_start_is_not_a_failure() {
        let live_at = std::time::Instant::now() + Duration::from_millis(600);
        let nodes = vec![
            serve(fake(Behaviour::Live { live_at })).await,
            serve(fake(Behaviour::Live { live_at })).await,
        ];
        let report = run_to_end(&config(&["one"], &nodes, 3)).await;

        assert!(report.not_live_polls > 0, "{report:?}");
        assert_eq!(report.failed_requests, 0, "{report:?}");
        assert_eq!(report.segments_missed, 0, "{report:?}");
        assert_eq!(report.ended_streams, 3, "{report:?}");
        assert_requests_add_up(&report);
    }

    #[tokio::test]
    async fn stop_signal_ends_the_run() {
        // Never goes live, so only the stop signal can end the run.
        let live_at = std::time::Instant::now() + Duration::from_secs(3600);
        let nodes = vec![serve(fake(Behaviour::Live { live_at })).await];
        let mut config = config(&["one"], &nodes, 2);
        config.duration = Duration::from_secs(3600);
        let (stop_tx, stop) = watch::channel(false);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop_tx.send(true).unwrap();
        });
        let report = tokio::time::timeout(Duration::from_secs(5), run(&config, stop))
            .await
            .expect("run must return once stopped")
            .unwrap();
        assert_eq!(report.viewers, 2);
        assert_eq!(report.ended_streams, 0);
        assert_eq!(report.failed_requests, 0);
    }

    #[tokio::test]
    async fn rejects_too_many_viewers_and_missing_nodes() {
        let (_stop_tx, stop) = watch::channel(false);
        let nodes = vec!["http://127.0.0.1:9".to_string()];
        let too_many = config(&["one"], &nodes, MAX_VIEWERS_PER_CHANNEL + 1);
        assert!(run(&too_many, stop.clone()).await.is_err());
        let no_nodes = config(&["one"], &[], 1);
        assert!(run(&no_nodes, stop).await.is_err());
    }

    #[test]
    fn playlist_url_and_poll_interval() {
        let url = playlist_url("http://127.0.0.5:7000/", "news 1").unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.5:7000/hls/news%201/index.m3u8"
        );
        assert_eq!(
            url.join("7.ts").unwrap().as_str(),
            "http://127.0.0.5:7000/hls/news%201/7.ts"
        );
        assert_eq!(poll_interval(0), MIN_POLL);
        assert_eq!(poll_interval(4), Duration::from_secs(2));
        assert_eq!(poll_interval(60), MAX_POLL);
    }
}
