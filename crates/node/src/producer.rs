//! The producer: turns the clock and the cached events into observations.
//!
//! [`decide`] is a pure function of (events, persisted progress, now, HLS
//! counts): the shell ([`run`]) reads the clock, commits the outcome's records
//! and progress in one transaction and only then applies the outcome to its
//! in-memory state. A failed commit therefore changes nothing and the next
//! tick decides again: no record is produced twice, none is lost.

use crate::link::{ParamsCache, View};
use crate::runtime::Stop;
use crate::store::{keys, Commit, NewRecord, Store, StoreError};
use crate::viewer_counter::ViewerCounter;
use handover_core::grant::{Grant, GrantReason};
use handover_core::params::LiveEvent;
use handover_core::record::{v2::Kind, v3::Severity, Observation};
use handover_core::wire::limits;
use handover_core::Schema;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// How often the producer looks at the clock.
pub const TICK_MS: u64 = 200;
/// Segments a stalled producer catches up at most: one playlist window of
/// the event (`LiveEvent::window_segments`; older ones were never in a
/// playlist a viewer could see), and never more than the longest window a
/// channel may have.
pub const SEGMENTS_CATCHUP_MAX: u64 = handover_core::params::v3::WINDOW_SEGMENTS_MAX as u64;
/// How long an ended event's progress is kept, so a late tick cannot
/// publish its segments again.
pub const PROGRESS_RETENTION_MS: i64 = 24 * 3_600_000;

/// Records the outbox may hold (a few GB at most). While it is full (fenced
/// or cut off for days) the producer records nothing new rather than fill the
/// disk and starve the writes that matter (grant, trims); HLS goes on.
pub const OUTBOX_RECORDS_MAX: u64 = 5_000_000;
/// How often the "outbox full" error is logged while it lasts.
pub const OUTBOX_FULL_WARN_EVERY_MS: i64 = 60_000;

/// What the node has already recorded about one event; persisted in kv.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventProgress {
    pub started: bool,
    pub finished: bool,
    /// The newest media seq published; never published again.
    pub last_seq: Option<u64>,
    /// The event's end, to know when the row may be dropped.
    pub end_ms: i64,
}

/// The producer's state: persisted progress plus what this process has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProducerState {
    pub progress: BTreeMap<i64, EventProgress>,
    /// The last whole second viewer_stats were written for.
    pub last_stats_second: Option<i64>,
    /// Events this process has already ticked over (not persisted). An event
    /// not in it is *resumed*: segments completed before this process looked
    /// at it (node down, parameters not yet cached) are not back-filled.
    pub seen: BTreeSet<i64>,
}

/// Everything one tick looks at.
#[derive(Clone, Copy, Debug)]
pub struct TickInput<'a> {
    pub now_ms: i64,
    pub events: &'a [LiveEvent],
    /// HLS requests per channel during the second before `now_ms`.
    pub viewers_last_second: &'a HashMap<String, u32>,
}

/// What one tick decided: observations (in order) and the state change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TickOutcome {
    pub observations: Vec<Observation>,
    pub changed: Vec<(i64, EventProgress)>,
    pub removed: Vec<i64>,
    pub stats_second: Option<i64>,
    /// The events of this tick: becomes [`ProducerState::seen`].
    pub seen: BTreeSet<i64>,
}

impl TickOutcome {
    /// Whether the outcome has anything to make durable.
    pub fn needs_commit(&self) -> bool {
        !self.is_empty()
    }

    fn is_empty(&self) -> bool {
        self.observations.is_empty()
            && self.changed.is_empty()
            && self.removed.is_empty()
            && self.stats_second.is_none()
    }
}

impl ProducerState {
    /// What survives a restart: the persisted part only.
    pub fn restarted(&self) -> ProducerState {
        ProducerState {
            seen: BTreeSet::new(),
            ..self.clone()
        }
    }

    /// Applies an outcome once it is durable.
    pub fn apply(&mut self, out: &TickOutcome) {
        self.seen.clone_from(&out.seen);
        for (id, p) in &out.changed {
            self.progress.insert(*id, *p);
        }
        for id in &out.removed {
            self.progress.remove(id);
        }
        if let Some(s) = out.stats_second {
            self.last_stats_second = Some(s);
        }
    }
}

fn observation(kind: Kind, e: &LiveEvent, at_ms: i64) -> Observation {
    Observation {
        kind,
        channel: e.channel.clone(),
        channel_id: e.channel_id,
        at_ms,
        media_seq: None,
        duration_ms: None,
        viewers: None,
        event_id: Some(e.event_id),
        message: None,
        severity: None,
    }
}

/// The producer's decision for one tick. Pure: same inputs, same outcome.
///
/// * `event_started` the first time an event is seen live (once);
/// * `segment_published` for each newly completed segment, never a media seq
///   twice, catching up at most one playlist window after a restart; for an
///   event never published before, from the newest completed one on, and
///   none at all after a restart if it already ended;
/// * `event_finished` once the event ended, only if it was seen started;
/// * `viewer_stats` per live channel once per whole second.
pub fn decide(state: &ProducerState, input: &TickInput<'_>) -> TickOutcome {
    let now = input.now_ms;
    let mut out = TickOutcome::default();
    for e in input.events {
        if !out.seen.insert(e.event_id) {
            continue; // a duplicate id in the parameters: the first one wins
        }
        let resumed = !state.seen.contains(&e.event_id);
        let old = state.progress.get(&e.event_id).copied();
        let mut p = old.unwrap_or(EventProgress {
            started: false,
            finished: false,
            last_seq: None,
            end_ms: e.end_ms(),
        });
        p.end_ms = e.end_ms();
        if !p.finished {
            if !p.started && e.is_live(now) {
                out.observations
                    .push(observation(Kind::EventStarted, e, now));
                p.started = true;
            }
            if p.started {
                let ended = e.has_ended(now);
                let completed = e.completed_segments(now);
                // After a restart an ended event gets no segments: they all completed while we were down.
                if completed > 0 && !(resumed && ended) {
                    let newest = completed - 1;
                    // Catch up at most one playlist window: a short restart (a
                    // release switch) publishes every segment it missed.
                    let from = match p.last_seq {
                        Some(last) => last.saturating_add(1).max(
                            completed.saturating_sub(e.window_segments.min(SEGMENTS_CATCHUP_MAX)),
                        ),
                        None => newest,
                    };
                    for seq in from..completed {
                        let mut o = observation(Kind::SegmentPublished, e, now);
                        o.media_seq = Some(seq);
                        o.duration_ms = Some(e.segment_duration_ms(seq));
                        out.observations.push(o);
                        p.last_seq = Some(seq);
                    }
                }
                if ended {
                    out.observations
                        .push(observation(Kind::EventFinished, e, now));
                    p.finished = true;
                }
            }
        }
        if old != Some(p) && (old.is_some() || p.started) {
            out.changed.push((e.event_id, p));
        }
    }

    // Viewer stats for the last whole second, per channel live in it; never
    // for an older second (counts of a second we did not watch are unknown).
    let second = now.div_euclid(1000) - 1;
    if state.last_stats_second.is_none_or(|last| last < second) {
        let from_ms = second.saturating_mul(1000);
        let to_ms = from_ms.saturating_add(1000);
        let mut channels: BTreeMap<&str, &LiveEvent> = BTreeMap::new();
        for e in input.events {
            let started = out
                .changed
                .iter()
                .find(|(id, _)| *id == e.event_id)
                .map(|(_, p)| p.started)
                .or_else(|| state.progress.get(&e.event_id).map(|p| p.started))
                .unwrap_or(false);
            if started && e.start_ms < to_ms && e.end_ms() > from_ms {
                channels.entry(e.channel.as_str()).or_insert(e);
            }
        }
        for (channel, e) in &channels {
            let mut o = observation(Kind::ViewerStats, e, from_ms);
            o.event_id = None;
            o.viewers = Some(
                input
                    .viewers_last_second
                    .get(*channel)
                    .copied()
                    .unwrap_or(0),
            );
            out.observations.push(o);
        }
        if !channels.is_empty() {
            out.stats_second = Some(second);
        }
    }

    for (id, p) in &state.progress {
        let touched = out.changed.iter().any(|(c, _)| c == id);
        if !touched && p.end_ms.saturating_add(PROGRESS_RETENTION_MS) < now {
            out.removed.push(*id);
        }
    }
    out
}

fn reason_text(reason: GrantReason) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("{reason:?}"))
}

/// The alert written when the grant changes to fenced, of severity
/// `warning` (nothing is lost, but nothing is stored either until the
/// controller grants again). Channel: the first channel of the group's
/// events; none when the node runs no event.
pub fn fence_alert(
    events: &[LiveEvent],
    now_ms: i64,
    epoch: u64,
    reason: GrantReason,
) -> Option<Observation> {
    let first = events.first()?;
    Some(Observation {
        kind: Kind::Alert,
        channel: first.channel.clone(),
        channel_id: first.channel_id,
        at_ms: now_ms,
        media_seq: None,
        duration_ms: None,
        viewers: None,
        event_id: None,
        message: Some(format!(
            "grant changed to {} at epoch {epoch}: {}; records are queued locally until the controller grants again",
            Grant::Fenced,
            reason_text(reason)
        )),
        severity: Some(Severity::Warning),
    })
}

/// Events live at `now_ms` (bounded as the wire allows), for hello, heartbeat and /status.
/// The events a node may run: all of them, or once quiesced (a primary
/// waiting for its switch) only those that started before.
pub fn runnable(events: &[LiveEvent], quiesce_since_ms: Option<i64>) -> Vec<LiveEvent> {
    events
        .iter()
        .filter(|e| quiesce_since_ms.is_none_or(|q| e.start_ms < q))
        .cloned()
        .collect()
}

pub fn current_events(events: &[LiveEvent], now_ms: i64) -> Vec<i64> {
    let mut ids: Vec<i64> = events
        .iter()
        .filter(|e| e.is_live(now_ms))
        .map(|e| e.event_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.truncate(limits::CURRENT_EVENTS_MAX);
    ids
}

/// Reads the persisted progress. A row that does not parse is dropped with a
/// warning rather than stopping the node (its event would restart its flags).
pub async fn load_state(store: &Store) -> Result<ProducerState, StoreError> {
    let mut state = ProducerState::default();
    for (key, value) in store.kv_prefix(keys::PROGRESS_PREFIX).await? {
        let id = key
            .strip_prefix(keys::PROGRESS_PREFIX)
            .and_then(|id| id.parse::<i64>().ok());
        match (id, serde_json::from_str::<EventProgress>(&value)) {
            (Some(id), Ok(p)) => {
                state.progress.insert(id, p);
            }
            _ => tracing::warn!(key, value, "ignoring unreadable progress row"),
        }
    }
    state.last_stats_second = store
        .kv_get(keys::LAST_STATS_SECOND)
        .await?
        .and_then(|v| v.parse().ok());
    Ok(state)
}

/// The transaction that makes one tick durable.
fn tick_commit(
    schema: Schema,
    node_id: &str,
    out: &TickOutcome,
) -> Result<Commit, serde_json::Error> {
    let mut c = Commit::default();
    for o in &out.observations {
        match NewRecord::encode(schema, node_id, o) {
            Ok(r) => c.records.push(r),
            // Cannot happen for events of our own schema; refuse loudly rather than stop producing.
            Err(e) => {
                tracing::error!(error = %e, kind = o.kind.as_str(), "observation cannot be encoded; skipped")
            }
        }
    }
    for (id, p) in &out.changed {
        c.put.push((keys::progress(*id), serde_json::to_string(p)?));
    }
    if let Some(s) = out.stats_second {
        c.put
            .push((keys::LAST_STATS_SECOND.to_owned(), s.to_string()));
    }
    c.delete = out.removed.iter().map(|id| keys::progress(*id)).collect();
    Ok(c)
}

/// What the producer loop needs.
pub struct Producer {
    pub store: Arc<Store>,
    pub schema: Schema,
    pub node_id: String,
    pub params: watch::Receiver<Arc<ParamsCache>>,
    /// For the quiesce mark: a quiesced node starts no new event.
    pub link: watch::Receiver<View>,
    pub viewers: Arc<ViewerCounter>,
    pub shipper_wake: Arc<Notify>,
}

impl Producer {
    /// Ticks every [`TICK_MS`] from the persisted `state` until `stop`. The commit is never raced
    /// against `stop`, so a tick is either durable and applied or not at all.
    pub async fn run(self, mut state: ProducerState, mut stop: Stop) {
        let mut full_warned_at: Option<i64> = None;
        let mut ticker = tokio::time::interval(Duration::from_millis(TICK_MS));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait() => return,
            }
            let now_ms = crate::runtime::wall_clock_ms();
            if self.store.outbox_state().count >= OUTBOX_RECORDS_MAX {
                if full_warned_at.is_none_or(|t| now_ms - t >= OUTBOX_FULL_WARN_EVERY_MS) {
                    tracing::error!(
                        limit = OUTBOX_RECORDS_MAX,
                        "outbox full: producing nothing until the controller takes records"
                    );
                    full_warned_at = Some(now_ms);
                }
                continue;
            }
            let cache = self.params.borrow().clone();
            let events = runnable(&cache.events, self.link.borrow().quiesce_since_ms);
            let second = now_ms.div_euclid(1000) - 1;
            let viewers: HashMap<String, u32> = events
                .iter()
                .map(|e| (e.channel.clone(), self.viewers.count(&e.channel, second)))
                .collect();
            let out = decide(
                &state,
                &TickInput {
                    now_ms,
                    events: &events,
                    viewers_last_second: &viewers,
                },
            );
            if !out.needs_commit() {
                state.apply(&out);
                continue;
            }
            let commit = match tick_commit(self.schema, &self.node_id, &out) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "cannot serialise producer progress");
                    continue;
                }
            };
            match self.store.commit(&commit).await {
                Ok(seqs) => {
                    state.apply(&out);
                    if seqs.is_some() {
                        self.shipper_wake.notify_one();
                    }
                }
                // Nothing applied: the next tick decides the same facts again.
                Err(e) => tracing::error!(error = %e, "producer tick not recorded; retrying"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: i64 = 1_795_000_000_000;

    fn event(id: i64, channel: &str, start_ms: i64, duration_ms: u64) -> LiveEvent {
        LiveEvent {
            event_id: id,
            channel: channel.into(),
            channel_id: Some(id * 10),
            start_ms,
            duration_ms,
            segment_ms: 2_000,
            window_segments: handover_core::hls::WINDOW_SEGMENTS,
        }
    }

    /// Runs one tick and applies it, as the shell does after a commit.
    fn tick(
        state: &mut ProducerState,
        events: &[LiveEvent],
        now_ms: i64,
        restarted: bool,
    ) -> Vec<Observation> {
        if restarted {
            *state = state.restarted();
        }
        let none = HashMap::new();
        let out = decide(
            state,
            &TickInput {
                now_ms,
                events,
                viewers_last_second: &none,
            },
        );
        state.apply(&out);
        out.observations
    }

    fn keys_of(obs: &[Observation]) -> Vec<String> {
        obs.iter().map(Observation::natural_key).collect()
    }

    fn segments(obs: &[Observation]) -> Vec<u64> {
        obs.iter()
            .filter(|o| o.kind == Kind::SegmentPublished)
            .filter_map(|o| o.media_seq)
            .collect()
    }

    #[test]
    fn whole_event_once_each_without_duplicates() {
        let events = [event(1, "news", START, 9_000)];
        let mut state = ProducerState::default();
        let mut all = Vec::new();
        assert!(tick(&mut state, &events, START - 500, false).is_empty());
        let mut now = START + 50;
        while now < START + 12_000 {
            let got = tick(&mut state, &events, now, false);
            // The same instant again changes nothing.
            assert!(tick(&mut state, &events, now, false).is_empty(), "at {now}");
            all.extend(got);
            now += 200;
        }
        let k = keys_of(&all);
        let unique: BTreeSet<_> = k.iter().collect();
        assert_eq!(unique.len(), k.len(), "duplicates in {k:?}");
        assert_eq!(segments(&all), vec![0, 1, 2, 3, 4]);
        let kinds = |kind| all.iter().filter(|o| o.kind == kind).count();
        assert_eq!(kinds(Kind::EventStarted), 1);
        assert_eq!(kinds(Kind::EventFinished), 1);
        // One stats row per whole second the event was live (9 s).
        assert_eq!(kinds(Kind::ViewerStats), 9);
        let last_seg = all.iter().find(|o| o.media_seq == Some(4)).unwrap();
        assert_eq!(last_seg.duration_ms, Some(1_000));
        assert_eq!(all[0].kind, Kind::EventStarted);
        let last = all.iter().rev().find(|o| o.kind != Kind::ViewerStats);
        assert_eq!(last.map(|o| o.kind), Some(Kind::EventFinished));
        // Nothing after the end, ever.
        assert!(tick(&mut state, &events, START + 60_000, false).is_empty());
    }

    #[test]
    fn restart_back_fills_at_most_one_window_and_never_repeats() {
        let events = [event(1, "news", START, 600_000)];
        let mut state = ProducerState::default();
        tick(&mut state, &events, START + 100, false);
        tick(&mut state, &events, START + 6_100, false);
        assert_eq!(state.progress[&1].last_seq, Some(2));
        // "Crash": only the persisted state survives; 20 s later we resume.
        let mut restarted = state.clone();
        let got = tick(&mut restarted, &events, START + 26_100, true);
        assert_eq!(segments(&got), vec![7, 8, 9, 10, 11, 12]);
        assert!(!got.iter().any(|o| o.kind == Kind::EventStarted));
        let got = tick(&mut restarted, &events, START + 28_100, false);
        assert_eq!(segments(&got), vec![13]);
        // A restart within the same segment publishes nothing again.
        let got = tick(&mut restarted.clone(), &events, START + 28_300, true);
        assert_eq!(segments(&got), Vec::<u64>::new());
    }

    #[test]
    fn restarts_and_late_parameters_never_duplicate() {
        let events = [event(1, "news", START, 30_000)];
        let mut state = ProducerState::default();
        let mut all = Vec::new();
        let mut now = START - 1_000;
        let mut i = 0u64;
        while now < START + 40_000 {
            // Restart every 7th tick; every 11th tick the parameters are not cached yet.
            let shown: &[LiveEvent] = if i % 11 == 5 { &[] } else { &events };
            all.extend(tick(&mut state, shown, now, i % 7 == 3));
            now += 200 + (i % 5) as i64 * 130;
            i += 1;
        }
        let k = keys_of(&all);
        let unique: BTreeSet<_> = k.iter().collect();
        assert_eq!(unique.len(), k.len(), "duplicates in {k:?}");
        let segs = segments(&all);
        assert!(segs.windows(2).all(|w| w[0] < w[1]), "{segs:?}");
        let count = |kind| all.iter().filter(|o| o.kind == kind).count();
        assert_eq!(
            (count(Kind::EventStarted), count(Kind::EventFinished)),
            (1, 1)
        );
    }

    #[test]
    fn parameters_cached_late_catch_up_at_most_the_window() {
        let events = [event(1, "news", START, 600_000)];
        let mut state = ProducerState::default();
        tick(&mut state, &events, START + 2_100, false);
        // The same process, but the event vanished from the cache for a while.
        tick(&mut state, &[], START + 4_100, false);
        let got = tick(&mut state, &events, START + 20_100, false);
        assert_eq!(segments(&got), vec![4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn first_seen_mid_event_starts_from_newest() {
        let events = [event(1, "news", START, 600_000)];
        let mut state = ProducerState::default();
        let got = tick(&mut state, &events, START + 30_500, false);
        assert_eq!(got[0].kind, Kind::EventStarted);
        assert_eq!(segments(&got), vec![14]);
    }

    #[test]
    fn a_stall_catches_up_at_most_the_window() {
        let events = [event(1, "news", START, 600_000)];
        let mut state = ProducerState::default();
        tick(&mut state, &events, START + 2_100, false);
        let got = tick(&mut state, &events, START + 8_100, false);
        assert_eq!(segments(&got), vec![1, 2, 3]);
        let got = tick(&mut state, &events, START + 60_100, false);
        assert_eq!(segments(&got), vec![24, 25, 26, 27, 28, 29]);
    }

    /// The window is the event's own (schema 3): a deeper DVR window keeps
    /// more segments in the playlist, so a stall catches up more.
    #[test]
    fn a_stall_catches_up_the_events_own_window() {
        let events = [LiveEvent {
            window_segments: 10,
            ..event(1, "news", START, 600_000)
        }];
        let mut state = ProducerState::default();
        tick(&mut state, &events, START + 2_100, false);
        let got = tick(&mut state, &events, START + 60_100, false);
        assert_eq!(segments(&got), (20..30).collect::<Vec<u64>>());
    }

    #[test]
    fn ended_while_down_finishes_without_segments() {
        let events = [event(1, "news", START, 10_000)];
        let mut state = ProducerState::default();
        tick(&mut state, &events, START + 4_100, false);
        let got = tick(&mut state.clone(), &events, START + 30_000, true);
        assert_eq!(
            got.iter().map(|o| o.kind).collect::<Vec<_>>(),
            vec![Kind::EventFinished]
        );
        // An event that started and ended while the node never saw it live: nothing.
        let unseen = [event(2, "sport", START, 10_000)];
        assert!(tick(&mut ProducerState::default(), &unseen, START + 30_000, true).is_empty());
    }

    #[test]
    fn viewer_stats_once_per_second_per_channel_with_counts() {
        // Two events on one channel overlap: one stats row for the channel.
        let events = [
            event(1, "news", START, 60_000),
            event(2, "news", START, 30_000),
            event(3, "sport", START + 100_000, 60_000),
        ];
        let mut state = ProducerState::default();
        tick(&mut state, &events, START + 100, false);
        let counts = HashMap::from([("news".to_owned(), 7)]);
        let input = TickInput {
            now_ms: START + 1_100,
            events: &events,
            viewers_last_second: &counts,
        };
        let out = decide(&state, &input);
        let stats: Vec<_> = out
            .observations
            .iter()
            .filter(|o| o.kind == Kind::ViewerStats)
            .collect();
        assert_eq!(stats.len(), 1);
        assert_eq!(
            (stats[0].channel.as_str(), stats[0].viewers, stats[0].at_ms),
            ("news", Some(7), START)
        );
        state.apply(&out);
        assert!(decide(&state, &input).observations.is_empty());
        // After a long gap only the last whole second is reported.
        let got = tick(&mut state, &events, START + 5_300, false);
        let stats: Vec<_> = got.iter().filter(|o| o.kind == Kind::ViewerStats).collect();
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].at_ms, START + 4_000);
        assert_eq!(stats[0].viewers, Some(0));
    }

    #[test]
    fn old_progress_is_dropped_without_reproducing() {
        let events = [event(1, "news", START, 4_000)];
        let mut state = ProducerState::default();
        tick(&mut state, &events, START + 100, false);
        tick(&mut state, &events, START + 5_000, false);
        assert!(state.progress[&1].finished);
        let later = START + 4_000 + PROGRESS_RETENTION_MS + 1;
        let none = HashMap::new();
        let out = decide(
            &state,
            &TickInput {
                now_ms: later,
                events: &events,
                viewers_last_second: &none,
            },
        );
        assert_eq!(out.removed, vec![1]);
        assert!(out.observations.is_empty());
        state.apply(&out);
        assert!(tick(&mut state, &events, later + 200, false).is_empty());
        assert!(state.progress.is_empty());
    }

    #[test]
    fn fence_alert_names_first_channel_or_none() {
        let events = [event(1, "news", START, 4_000)];
        let a = fence_alert(&events, START, 7, GrantReason::FenceInForce).unwrap();
        assert_eq!((a.channel.as_str(), a.channel_id), ("news", Some(10)));
        assert!(a
            .message
            .as_deref()
            .unwrap_or("")
            .contains("fence_in_force"));
        assert_eq!(a.severity, Some(Severity::Warning));
        assert_eq!(fence_alert(&[], START, 7, GrantReason::FenceInForce), None);
    }

    #[test]
    fn current_events_are_the_live_ones() {
        let events = [
            event(2, "a", START, 4_000),
            event(1, "b", START + 10_000, 1),
        ];
        assert_eq!(current_events(&events, START + 1), vec![2]);
        assert!(current_events(&events, START - 1).is_empty());
    }
}
