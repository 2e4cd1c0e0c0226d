//! The shell around the node machine (`handover_core::node::Machine`): one
//! task that feeds it events (answers, timers, staging and switch results,
//! appends, stop) and performs its actions over HTTP, SQLite and the
//! supervisor, in the order given. Disk writes are awaited before the next
//! action, so "fenced at epoch E" is durable before anything acts on it.
//! Requests run as their own tasks (one per lane at most, the machine's
//! rule) and come back as events; a cancelled one is aborted.

use crate::lifecycle::Lifecycle;
use crate::link::{ParamsCache, View};
use crate::producer::{current_events, fence_alert, runnable};
use crate::session::Controller;
use crate::stage;
use crate::store::{keys, Commit, NewRecord, OutboxRow, Store};
use crate::viewer_counter::ViewerCounter;
use handover_core::agent::SwitchFailure;
use handover_core::artifact::PublicKey;
use handover_core::node::{
    Action, Event, Lane, Level, Machine, Now, Reply, RequestId, StagedArtifact, SwitchResult,
};
use handover_core::ship;
use handover_core::wire::limits::STAGED_MAX;
use handover_core::wire::{Batch, MESSAGE_VERSION};
use handover_supervisor::{Release as SupervisedRelease, SupervisorClient, SwitchOutcome};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::AbortHandle;

/// The machine is ticked at least this often even when no timer is due,
/// so a clock that jumped or a missed wake-up costs at most this long.
pub const TICK_MS_MAX: u64 = 1_000;
/// Events from the tasks the driver started (answers, staging, switch,
/// digests) queue up to this many; each task has at most one in flight,
/// so the bound is never reached in practice.
const EVENTS_QUEUED_MAX: usize = 64;

/// What the driver reports out of the machine.
pub(crate) struct Published {
    pub view: watch::Sender<View>,
    pub params: watch::Sender<Arc<ParamsCache>>,
}

pub(crate) struct Driver {
    pub machine: Machine,
    pub store: Arc<Store>,
    pub controller: Arc<Controller>,
    /// Where artifacts are staged from: the current controller replica.
    pub controller_urls: std::sync::Arc<handover_net::controllers::ControllerUrls>,
    /// The cluster CA, for the staging client (as for the session's).
    pub trust: Option<handover_net::tls::ClientTrust>,
    pub node_id: String,
    pub schema: handover_core::Schema,
    pub data_dir: PathBuf,
    pub trusted: Vec<PublicKey>,
    /// The host's artifact cache, shared with the host's other nodes
    /// (`--artifact-cache`).
    pub artifact_cache: Option<handover_artifacts::HostCache>,
    pub supervisor: Option<SupervisorClient>,
    pub lifecycle: Arc<Lifecycle>,
    pub viewers: Arc<ViewerCounter>,
    pub published: Published,
    /// Notified after every append (the shipper does not wait for a timer).
    pub appended: Arc<Notify>,
    /// The stop request (`Event::Stop`).
    pub stop: watch::Receiver<bool>,
}

/// The artifacts staged in `data_dir`, as the machine sees them: the
/// newest [`STAGED_MAX`] (what a hello may name), even when the disk holds
/// more (a crash between staging and pruning).
pub fn staged_artifacts(data_dir: &std::path::Path, trusted: &[PublicKey]) -> Vec<StagedArtifact> {
    let staged = stage::staged(data_dir, trusted);
    if staged.len() > STAGED_MAX {
        tracing::warn!(
            staged = staged.len(),
            reported = STAGED_MAX,
            "more staged releases than a hello may name; reporting the newest (the next staging prunes the rest)"
        );
    }
    staged
        .into_iter()
        .take(STAGED_MAX)
        .map(|m| StagedArtifact {
            id: m.id(),
            release: m.release,
            sha256: Some(m.sha256),
        })
        .collect()
}

/// Keeps at most [`STAGED_MAX`] staged releases after `just_staged` was
/// staged ([`prune`](crate::prune)): never it, the binary this worker
/// runs, or what the supervisor may start. A failure is logged; the node
/// goes on (it reports the newest anyway).
async fn prune_staged(
    data_dir: &std::path::Path,
    just_staged: &str,
    cache: Option<handover_artifacts::HostCache>,
) {
    let (dir, id) = (data_dir.to_owned(), just_staged.to_owned());
    let pruned = tokio::task::spawn_blocking(move || {
        let running = handover_supervisor::binary_sha256();
        crate::prune::prune(&dir, Some(&id), running.as_deref())
    })
    .await;
    match pruned {
        Ok(Ok(removed)) if !removed.is_empty() => {
            tracing::info!(
                ?removed,
                kept = STAGED_MAX,
                "removed the oldest staged releases"
            );
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "staged releases not pruned"),
        Err(e) => tracing::warn!(error = %e, "staged releases not pruned: the task failed"),
    }
    // What no node of the host stages any more leaves the host's cache.
    let Some(cache) = cache else { return };
    match tokio::task::spawn_blocking(move || cache.prune()).await {
        Ok(Ok(removed)) if !removed.is_empty() => {
            tracing::info!(?removed, "removed cached binaries no node stages any more");
        }
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "the artifact cache was not pruned"),
        Err(e) => tracing::warn!(error = %e, "the artifact cache was not pruned: the task failed"),
    }
}

struct Run {
    d: Driver,
    started: Instant,
    events_tx: mpsc::Sender<Event>,
    in_flight: HashMap<RequestId, AbortHandle>,
    /// The outbox head read last (`Action::ReadOutbox`).
    head: Vec<OutboxRow>,
    staging_http: Option<reqwest::Client>,
    /// Other nodes' peer routes ([`stage::peer_client`]); `None`: binaries
    /// only from the controller.
    peer_http: Option<reqwest::Client>,
    done: bool,
}

impl Driver {
    /// Runs until the machine says `Stopped` (after a stop request and a
    /// bounded drain) or until the worker gives up.
    pub async fn run(self) {
        let (events_tx, mut events_rx) = mpsc::channel(EVENTS_QUEUED_MAX);
        let staging = handover_net::tls::client_for(
            self.controller_urls.current(),
            self.trust.as_ref(),
            reqwest::Client::builder().no_proxy(),
        )
        .map_err(|e| e.to_string())
        .and_then(|b| b.build().map_err(|e| e.to_string()));
        let staging_http = match staging {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "cannot build the staging client; upgrades cannot be staged");
                None
            }
        };
        let peer_http = match stage::peer_client() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the peer client; binaries come from the controller only");
                None
            }
        };
        let mut stop = self.stop.clone();
        let appended = self.appended.clone();
        let mut run = Run {
            d: self,
            started: Instant::now(),
            events_tx,
            in_flight: HashMap::new(),
            head: Vec::new(),
            staging_http,
            peer_http,
            done: false,
        };
        // Who runs this worker, before the first hello says so; then the
        // first step (the hello) at once, not at the first timer.
        let first = match run.d.supervisor {
            Some(_) => Event::SupervisorDigest(handover_supervisor::supervisor_sha256().await),
            None => Event::Tick,
        };
        run.step(first).await;
        let mut stop_sent = false;
        while !run.done {
            let now_ms = run.now_ms();
            let wait_ms = run
                .d
                .machine
                .next_timer_ms(now_ms)
                .map_or(TICK_MS_MAX, |t| t.saturating_sub(now_ms).min(TICK_MS_MAX));
            let event = tokio::select! {
                Some(event) = events_rx.recv() => event,
                _ = appended.notified() => Event::Tick,
                // A stop request, or its sender gone: either way, stop.
                _ = stop.wait_for(|s| *s), if !stop_sent => {
                    stop_sent = true;
                    Event::Stop
                }
                _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => Event::Tick,
            };
            run.step(event).await;
        }
        for (_, task) in run.in_flight.drain() {
            task.abort();
        }
    }
}

impl Run {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn now(&self) -> Now {
        let wall_ms = crate::runtime::wall_clock_ms();
        let params = self.d.published.params.borrow().clone();
        let events = runnable(&params.events, self.d.machine.quiesce_since_ms());
        Now {
            ms: self.now_ms(),
            wall_ms,
            outbox: self.d.store.outbox_state(),
            current_events: current_events(&events, wall_ms),
            hls_requests: self.d.viewers.requests(),
        }
    }

    /// One event and everything it leads to, then the new view is published.
    async fn step(&mut self, event: Event) {
        let mut events = VecDeque::from([event]);
        while let Some(event) = events.pop_front() {
            let now = self.now();
            let actions = self.d.machine.handle(event, &now);
            for action in actions {
                if let Some(next) = self.perform(action).await {
                    events.push_back(next);
                }
            }
        }
        let view = self.d.machine.view();
        self.d.published.view.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
    }

    async fn perform(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Persist {
                grant,
                epoch,
                credential,
                fence_alert: alert,
            } => {
                let mut commit = Commit::default();
                commit
                    .put
                    .push((keys::GRANT.to_owned(), grant.as_str().to_owned()));
                commit.put.push((keys::EPOCH.to_owned(), epoch.to_string()));
                if let Some(c) = credential {
                    commit.put.push((keys::CREDENTIAL.to_owned(), c));
                    commit.delete.push(keys::CREDENTIAL_UNCONFIRMED.to_owned());
                }
                if let Some(a) = alert {
                    let events = self.d.published.params.borrow().events.clone();
                    // An alert belongs to a channel; a node with no events only logs it.
                    if let Some(obs) =
                        fence_alert(&events, crate::runtime::wall_clock_ms(), a.epoch, a.reason)
                    {
                        match NewRecord::encode(self.d.schema, &self.d.node_id, &obs) {
                            Ok(r) => commit.records.push(r),
                            Err(e) => {
                                tracing::warn!(error = %e, "fence alert cannot be encoded; not recorded")
                            }
                        }
                    }
                }
                if let Err(e) = self.d.store.commit(&commit).await {
                    return Some(Event::DiskFailed {
                        lane: Lane::Session,
                        error: format!("cannot persist the grant: {e}"),
                    });
                }
            }
            Action::Send(send) => {
                let batch = match &send.request {
                    handover_core::node::Request::Batch {
                        epoch,
                        schema,
                        first_seq,
                        count,
                        ..
                    } => {
                        let rows = match self.head.get(..*count) {
                            Some(rows) if rows.first().map(|r| r.seq) == Some(*first_seq) => rows,
                            // Not the head the machine was shown: nothing is
                            // sent, and the machine backs off as after a failure.
                            _ => {
                                return Some(Event::Reply {
                                    id: send.id,
                                    reply: Reply::Invalid(format!(
                                        "the outbox head read last does not start at seq {first_seq} with {count} records"
                                    )),
                                })
                            }
                        };
                        Some(Batch {
                            v: MESSAGE_VERSION,
                            node_id: self.d.node_id.clone(),
                            epoch: *epoch,
                            schema: *schema,
                            first_seq: *first_seq,
                            records: rows.iter().map(|r| r.body.clone()).collect(),
                        })
                    }
                    _ => None,
                };
                let heartbeat = matches!(send.request, handover_core::node::Request::Heartbeat(_));
                let controller = self.d.controller.clone();
                let tx = self.events_tx.clone();
                let id = send.id;
                let task = tokio::spawn(async move {
                    let reply = controller.send(&send, batch.as_ref()).await;
                    let _ = tx.send(Event::Reply { id, reply }).await;
                });
                self.in_flight.retain(|_, t| !t.is_finished());
                self.in_flight.insert(id, task.abort_handle());
                // Whether the supervisor was replaced is checked with every heartbeat.
                if heartbeat && self.d.supervisor.is_some() {
                    let tx = self.events_tx.clone();
                    tokio::spawn(async move {
                        let digest = handover_supervisor::supervisor_sha256().await;
                        let _ = tx.send(Event::SupervisorDigest(digest)).await;
                    });
                }
            }
            Action::Cancel(id) => {
                if let Some(task) = self.in_flight.remove(&id) {
                    task.abort();
                }
            }
            Action::ReadOutbox => match self.d.store.oldest(ship::BATCH_RECORDS_MAX).await {
                Ok(rows) => {
                    let head = rows
                        .iter()
                        .map(|r| ship::Queued {
                            seq: r.seq,
                            schema: r.schema,
                            bytes: r.body_bytes,
                        })
                        .collect();
                    self.head = rows;
                    return Some(Event::OutboxHead(head));
                }
                Err(e) => {
                    return Some(Event::DiskFailed {
                        lane: Lane::Shipper,
                        error: format!("cannot read the outbox: {e}"),
                    })
                }
            },
            Action::Trim { through } => {
                return Some(match self.d.store.trim(through).await {
                    // The outbox changed: the machine looks again at once
                    // (the next batch, or the end of a drain).
                    Ok(_) => Event::Tick,
                    Err(e) => Event::DiskFailed {
                        lane: Lane::Shipper,
                        error: format!("cannot trim the outbox: {e}"),
                    },
                });
            }
            Action::CacheParams { revision, params } => {
                let schema = self.d.machine.params().schema;
                let put = vec![
                    (keys::params_revision(schema), revision.to_string()),
                    (keys::params_json(schema), params.to_string()),
                ];
                // The cache in memory serves either way; the next start fetches again.
                let written = self.d.store.kv_put(put).await;
                self.d
                    .published
                    .params
                    .send_replace(Arc::new(self.d.machine.params().clone()));
                if let Err(e) = written {
                    return Some(Event::DiskFailed {
                        lane: Lane::Params,
                        error: format!("cannot cache the parameters: {e}"),
                    });
                }
            }
            Action::Stage { artifact } => self.stage(artifact),
            Action::Quiesce => {
                self.d.lifecycle.stop_producer().await;
                return Some(Event::Quiesced);
            }
            Action::Switch { artifact, to } => self.switch(artifact, to),
            Action::RememberSwitchFailure(failure) => remember(&self.d.store, failure).await,
            Action::Fail(why) => {
                tracing::error!(why, "this worker gives up");
                self.d.lifecycle.fail(why);
            }
            Action::Stopped => self.done = true,
            Action::Log { level, message } => match level {
                Level::Debug => tracing::debug!("{message}"),
                Level::Info => tracing::info!("{message}"),
                Level::Warn => tracing::warn!("{message}"),
                Level::Error => tracing::error!("{message}"),
            },
        }
        None
    }

    fn stage(&mut self, artifact: String) {
        let tx = self.events_tx.clone();
        let Some(http) = self.staging_http.clone() else {
            let _ = tx.try_send(Event::Staged {
                artifact,
                result: Err("no HTTP client for staging".into()),
            });
            return;
        };
        let credential = self.d.machine.credential().unwrap_or_default().to_owned();
        let peers = self.peer_http.clone();
        let cache = self.d.artifact_cache.clone();
        let (url, dir, trusted) = (
            self.d.controller_urls.current().to_owned(),
            self.d.data_dir.clone(),
            self.d.trusted.clone(),
        );
        tokio::spawn(async move {
            let staged = stage::stage(
                &http,
                &url,
                &credential,
                stage::Origins {
                    peers: peers.as_ref(),
                    cache: cache.as_ref(),
                },
                &dir,
                &artifact,
                &trusted,
            )
            .await;
            let result = match staged {
                Ok(staged) => {
                    if trusted.is_empty() {
                        tracing::warn!(
                            artifact,
                            binary = %staged.binary.display(),
                            "artifact staged WITHOUT a signature check (--allow-unsigned-artifacts): \
                             this node will run it as it is"
                        );
                    } else {
                        tracing::info!(artifact, binary = %staged.binary.display(), "artifact staged");
                    }
                    prune_staged(&dir, &artifact, cache).await;
                    Ok(staged_artifacts(&dir, &trusted))
                }
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(Event::Staged { artifact, result }).await;
        });
    }

    /// Asks the supervisor to start the staged release on the same socket.
    fn switch(&mut self, artifact: String, to: handover_core::Release) {
        let tx = self.events_tx.clone();
        let Some(client) = self.d.supervisor.clone() else {
            let _ = tx.try_send(Event::Switch(SwitchResult::Failed(
                "this node runs without a supervisor (--no-supervisor)".into(),
            )));
            return;
        };
        let Some(staged) = stage::staged(&self.d.data_dir, &self.d.trusted)
            .into_iter()
            .find(|m| m.id() == artifact)
        else {
            let _ = tx.try_send(Event::Switch(SwitchResult::Failed(format!(
                "artifact {artifact} is no longer staged"
            ))));
            return;
        };
        let binary = stage::binary_path(&self.d.data_dir, &artifact);
        tracing::info!(release = to.0, binary = %binary.display(), "switching release");
        let release = SupervisedRelease {
            release: staged.release.0,
            binary,
            sha256: Some(staged.sha256.clone()),
            contracts: Some(staged.contracts),
        };
        tokio::spawn(async move {
            #[cfg(feature = "test-hooks")]
            if let Some(ms) = crate::runtime::test_fault_ms("drain_slow_ms") {
                // Test hook (TEST_FAULT_ENV): a quiesced worker slow to switch.
                tracing::warn!(ms, "test hook: draining slowly (the switch waits)");
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            let result = match client.switch(&release).await {
                Ok(SwitchOutcome::Switched { .. } | SwitchOutcome::AlreadyActive { .. }) => {
                    SwitchResult::Switched
                }
                Ok(SwitchOutcome::Failed { reason, .. }) => SwitchResult::Refused(reason),
                Err(e) => SwitchResult::Failed(e.to_string()),
            };
            let _ = tx.send(Event::Switch(result)).await;
        });
    }
}

async fn remember(store: &Store, failure: Option<SwitchFailure>) {
    let written = match failure {
        Some(f) => match serde_json::to_string(&f) {
            Ok(value) => {
                store
                    .kv_put(vec![(keys::SWITCH_FAILED.to_owned(), value)])
                    .await
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise the failed switch");
                return;
            }
        },
        None => {
            let forget = Commit {
                delete: vec![keys::SWITCH_FAILED.to_owned()],
                ..Commit::default()
            };
            store.commit(&forget).await.map(|_| ())
        }
    };
    if let Err(e) = written {
        tracing::error!(error = %e, "cannot keep the failed switch");
    }
}

/// The switch failure kept in node.db, if any.
pub async fn switch_failure(store: &Store) -> Option<SwitchFailure> {
    let raw = store.kv_get(keys::SWITCH_FAILED).await.ok()??;
    serde_json::from_str(&raw).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::testing::{set_staged_ms, stage_on_disk};

    /// A crash between staging and pruning can leave more on disk than a
    /// hello may name: the machine is given the newest STAGED_MAX.
    #[test]
    fn the_machine_is_given_at_most_staged_max_newest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let releases = tmp.path().join(stage::RELEASES_DIR);
        handover_private::dir(&releases).unwrap();
        let all: Vec<_> = (0..20u32)
            .map(|n| {
                let m = stage_on_disk(&releases, n);
                set_staged_ms(&releases, &m, 1_000 * (u64::from(n) + 1));
                m
            })
            .collect();
        let given: Vec<String> = staged_artifacts(tmp.path(), &[])
            .into_iter()
            .map(|s| s.id)
            .collect();
        let newest: Vec<String> = all.iter().rev().take(STAGED_MAX).map(|m| m.id()).collect();
        assert_eq!(given, newest);
        // And so every hello the machine says names at most that many.
        let info = handover_core::ReleaseInfo::of(handover_core::Release(2)).unwrap();
        let hello = handover_core::wire::Hello {
            staged: given,
            ..handover_core::wire::Hello::new(
                "g1-a",
                "credential-0123456789abcdef0123456789",
                info,
                handover_core::role::Role::Primary,
                "g1",
                "http://127.0.0.1:7500",
            )
        };
        handover_core::wire::Validate::validate(&hello).unwrap();
    }
}
