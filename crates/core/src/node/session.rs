//! The node machine's session: hello (and again), the watch long-poll,
//! heartbeats and the lease, and the parameter cache.

use super::*;

impl Machine {
    // ---- session: hello, then the watch long-poll ----

    pub(super) fn hello(&self, token: String, now: &Now) -> Hello {
        let id = &self.id;
        Hello {
            outbox: now.outbox,
            current_events: now.current_events.clone(),
            param_revision: self.params.revision,
            staged: self.staged_ids(),
            binary_sha256: id.binary_sha256.clone(),
            supervisor_sha256: self.supervisor_now.clone(),
            ..Hello::new(
                &id.node_id,
                &token,
                id.release,
                id.role,
                &id.group,
                &id.hls_url,
            )
        }
    }

    pub(super) fn poll_session(&mut self, now: &Now) {
        let lane = &self.lanes[lane_ix(Lane::Session)];
        if lane.pending.is_some() || now.ms < lane.not_before_ms {
            return;
        }
        if !self.established {
            let (token, with_credential) = match (&self.credential, self.bootstrap_next) {
                (Some(c), false) => (c.clone(), true),
                _ => match &self.id.bootstrap_token {
                    Some(t) => (t.clone(), false),
                    None => {
                        // Nothing to prove who this node is: only the operator
                        // can help (`handover node add`), so ask rarely.
                        self.log(
                            Level::Error,
                            format!(
                                "no usable credential and no bootstrap token: run `handover node add {}` \
                                 and restart this node with HANDOVER_BOOTSTRAP_TOKEN",
                                self.id.node_id
                            ),
                        );
                        let lane = self.lane(Lane::Session);
                        lane.backoff_ms = BACKOFF_MS_MAX;
                        lane.back_off(now.ms);
                        return;
                    }
                },
            };
            self.supervisor_said.clone_from(&self.supervisor_now);
            let mut hello = self.hello(token, now);
            if !with_credential {
                // The credential the shell chose and persisted; the
                // controller takes it in exchange for the token.
                hello.new_credential.clone_from(&self.credential);
            }
            self.send(
                Lane::Session,
                Kind::Hello { with_credential },
                REQUEST_TIMEOUT_MS,
                None,
                Request::Hello(hello),
                now,
            );
            return;
        }
        let (Some(epoch), Some(grant), Some(credential)) =
            (self.epoch, self.grant, self.credential.clone())
        else {
            self.request_handshake(self.generation, "incomplete session state", now);
            return;
        };
        let request = Request::Watch {
            epoch,
            grant,
            wait_ms: WATCH_WAIT_MS,
            desired_rev: self.desired_rev,
        };
        self.send(
            Lane::Session,
            Kind::Watch,
            WATCH_TIMEOUT_MS,
            Some(credential),
            request,
            now,
        );
    }

    pub(super) fn hello_done(&mut self, with_credential: bool, reply: Reply, now: &Now) {
        let welcome = match &reply {
            Reply::Ok(body) => decode::<Welcome>(body, |w| w.v),
            Reply::Refused { status: 401, .. } if with_credential => {
                self.hello_error = Some(describe(&reply));
                self.log(
                    Level::Info,
                    "credential refused; saying hello with the bootstrap token".into(),
                );
                self.bootstrap_next = true;
                self.lane(Lane::Session).not_before_ms = now.ms;
                return;
            }
            Reply::Refused { status: 401, .. } => {
                self.hello_error = Some(describe(&reply));
                // The bootstrap token was refused: used, perhaps by this
                // very node whose welcome was lost. The credential it chose
                // then works: try it next, after a pause.
                self.log(
                    Level::Warn,
                    format!(
                        "bootstrap token refused ({}); trying the credential next",
                        describe(&reply)
                    ),
                );
                self.bootstrap_next = false;
                self.lane(Lane::Session).back_off(now.ms);
                return;
            }
            other => Err(describe(other)),
        };
        match welcome {
            Ok(w) => {
                self.log(
                    Level::Info,
                    format!(
                        "welcomed: grant {} at epoch {} by controller release {} (protocol {})",
                        w.grant, w.epoch, w.controller_release, w.protocol
                    ),
                );
                self.bootstrap_next = false;
                self.hello_error = None;
                self.controller_release = Some(w.controller_release);
                self.protocol = Some(w.protocol);
                self.adopt(
                    Adopt {
                        grant: w.grant,
                        reason: w.grant_reason,
                        epoch: w.epoch,
                        lease_ms: w.lease_ms,
                        param_revision: w.param_revision,
                        desired: w.desired,
                        desired_rev: w.desired_rev,
                        credential: Some(w.credential),
                    },
                    now,
                );
                self.lane(Lane::Session).reset(now.ms);
            }
            Err(why) => {
                self.log(Level::Warn, format!("hello failed: {why}; retrying"));
                if matches!(reply, Reply::Refused { .. }) {
                    self.hello_error = Some(why);
                }
                self.lane(Lane::Session).back_off(now.ms);
            }
        }
    }

    pub(super) fn watch_done(&mut self, p: &Pending, reply: Reply, now: &Now) {
        match &reply {
            Reply::Ok(body) => match decode::<GrantState>(body, |g| g.v) {
                Ok(gs) => {
                    let changed = self.adopt_state(gs, now);
                    let quick = now.ms.saturating_sub(p.sent_ms) < WATCH_SPIN_GUARD_MS;
                    let session = self.lane(Lane::Session);
                    session.backoff_ms = BACKOFF_MS_MIN;
                    session.not_before_ms = if !changed && quick {
                        now.ms + WATCH_SPIN_GUARD_MS
                    } else {
                        now.ms
                    };
                }
                Err(why) => {
                    self.log(Level::Warn, format!("watch: {why}"));
                    self.lane(Lane::Session).back_off(now.ms);
                }
            },
            r if needs_handshake(r) || forbidden(r) => {
                self.request_handshake(p.generation, &describe(r), now);
                self.lane(Lane::Session).not_before_ms = now.ms;
            }
            r => {
                self.log(Level::Debug, format!("watch failed: {}", describe(r)));
                self.lane(Lane::Session).back_off(now.ms);
            }
        }
    }

    /// Adopts a grant state from heartbeat or watch. Returns whether grant,
    /// epoch or the desired state changed.
    pub(super) fn adopt_state(&mut self, gs: GrantState, now: &Now) -> bool {
        if self.config.heal_stale_registration && gs.grant != Grant::Fenced {
            // A grant that contradicts this release's schema means the
            // controller holds another registration for this node (a late
            // hello of its previous release overtook ours): hello again.
            let expected = self
                .controller_release
                .and_then(|r| ReleaseInfo::of(r).ok())
                .map(|c| decide_grant(c, self.id.release.schema, false).grant);
            if expected.is_some_and(|g| g != gs.grant) {
                let why = format!("grant {} contradicts this release's schema", gs.grant);
                self.request_handshake(self.generation, &why, now);
                return false;
            }
        }
        self.adopt(
            Adopt {
                grant: gs.grant,
                reason: gs.grant_reason,
                epoch: gs.epoch,
                lease_ms: gs.lease_ms,
                param_revision: gs.param_revision,
                desired: gs.desired,
                desired_rev: gs.desired_rev,
                credential: None,
            },
            now,
        )
    }

    /// Takes grant, epoch (and credential) and has them persisted before
    /// anything acts on them, with the fence alert in the same write. An
    /// answer with an older epoch than the one held lost a race and is
    /// ignored (a welcome is authoritative).
    pub(super) fn adopt(&mut self, a: Adopt, now: &Now) -> bool {
        let from_hello = a.credential.is_some();
        let held = self.epoch;
        if held.is_some_and(|e| a.epoch < e) {
            if !from_hello {
                return false;
            }
            self.epoch_regressions += 1;
            self.log(
                Level::Warn,
                format!(
                    "welcome at epoch {} after holding {}",
                    a.epoch,
                    held.unwrap_or(0)
                ),
            );
        }
        let grant_changed = self.grant != Some(a.grant);
        let epoch_changed = held != Some(a.epoch);
        let credential = a
            .credential
            .clone()
            .filter(|c| self.credential.as_ref() != Some(c));
        let fence_alert = (a.grant == Grant::Fenced && self.grant != Some(Grant::Fenced))
            .then_some(FenceAlert {
                epoch: a.epoch,
                reason: a.reason,
            });
        if grant_changed || epoch_changed || credential.is_some() || fence_alert.is_some() {
            self.out.push(Action::Persist {
                grant: a.grant,
                epoch: a.epoch,
                credential,
                fence_alert,
            });
        }
        if grant_changed || epoch_changed {
            let level = if a.grant == Grant::Fenced {
                Level::Warn
            } else {
                Level::Info
            };
            self.log(
                level,
                format!("adopts {} at epoch {} ({:?})", a.grant, a.epoch, a.reason),
            );
            // Acknowledged at once, not at the next heartbeat: a fence
            // completes in milliseconds.
            if self.next_heartbeat_ms.is_some() {
                self.next_heartbeat_ms = Some(now.ms);
            }
        }
        let desired_changed = self.desired != a.desired;
        self.grant = Some(a.grant);
        self.reason = Some(a.reason);
        self.epoch = Some(a.epoch);
        self.lease_ms = a.lease_ms;
        self.controller_param_revision = Some(a.param_revision);
        self.quiesce_since_ms = match (a.desired.quiesce, self.quiesce_since_ms) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(now.wall_ms),
            (false, _) => None,
        };
        self.desired = a.desired;
        self.desired_rev = Some(a.desired_rev);
        if let Some(c) = a.credential {
            self.credential = Some(c);
            self.established = true;
            self.generation = self.generation.wrapping_add(1);
        }
        grant_changed || epoch_changed || desired_changed
    }

    // ---- heartbeat and lease ----

    pub(super) fn heartbeat_period_ms(&self) -> u64 {
        (self.lease_ms / 3).clamp(HEARTBEAT_MS_MIN, HEARTBEAT_MS_MAX)
    }

    pub(super) fn poll_heartbeat(&mut self, now: &Now) {
        if self.lanes[lane_ix(Lane::Heartbeat)].pending.is_some() {
            return;
        }
        if !self.established {
            self.next_heartbeat_ms = None;
            return;
        }
        let Some(at) = self.next_heartbeat_ms else {
            self.next_heartbeat_ms = Some(now.ms + self.heartbeat_period_ms());
            return;
        };
        let (Some(epoch), Some(credential)) = (self.epoch, self.credential.clone()) else {
            return;
        };
        if now.ms < at {
            return;
        }
        let heartbeat = Heartbeat {
            v: MESSAGE_VERSION,
            node_id: self.id.node_id.clone(),
            epoch,
            outbox: now.outbox,
            current_events: now.current_events.clone(),
            staged: self.staged_ids(),
            hls_requests: if_protocol(self.protocol, HLS_REQUESTS_PROTOCOL, now.hls_requests),
        };
        let timeout = self
            .lease_ms
            .clamp(HEARTBEAT_TIMEOUT_MS_MIN, REQUEST_TIMEOUT_MS);
        self.send(
            Lane::Heartbeat,
            Kind::Heartbeat,
            timeout,
            Some(credential),
            Request::Heartbeat(heartbeat),
            now,
        );
    }

    pub(super) fn heartbeat_done(&mut self, p: &Pending, reply: Reply, now: &Now) {
        match &reply {
            Reply::Ok(body) => match decode::<GrantState>(body, |g| g.v) {
                Ok(gs) => {
                    self.adopt_state(gs, now);
                }
                Err(why) => self.log(Level::Warn, format!("heartbeat: {why}")),
            },
            r if needs_handshake(r) || forbidden(r) => {
                self.request_handshake(p.generation, &describe(r), now);
            }
            r => self.log(Level::Debug, format!("heartbeat failed: {}", describe(r))),
        }
        // A lease without any answer for lease_ms is lost.
        let lease = self.lease_ms.max(HEARTBEAT_MS_MIN);
        if self
            .last_contact_ms
            .is_some_and(|t| now.ms.saturating_sub(t) > lease)
        {
            self.request_handshake(p.generation, "lease lost", now);
        }
        // Who this node is changed under it: say so in a new hello.
        if self.supervisor_now != self.supervisor_said {
            self.request_handshake(p.generation, "the supervisor now runs another binary", now);
        }
        self.next_heartbeat_ms = Some(now.ms + self.heartbeat_period_ms());
    }

    // ---- parameters ----

    pub(super) fn poll_params(&mut self, now: &Now) {
        let lane = &self.lanes[lane_ix(Lane::Params)];
        if lane.pending.is_some() || now.ms < lane.not_before_ms {
            return;
        }
        let want = match (
            self.established,
            self.grant,
            self.epoch,
            &self.credential,
            self.controller_param_revision,
        ) {
            (true, Some(Grant::Full), Some(epoch), Some(credential), Some(rev))
                if Some(rev) != self.params.revision && Some(rev) != self.params_settled =>
            {
                Some((rev, epoch, credential.clone()))
            }
            _ => None,
        };
        // Never asks with any other grant.
        if let Some((revision, epoch, credential)) = want {
            self.send(
                Lane::Params,
                Kind::Params { revision },
                REQUEST_TIMEOUT_MS,
                Some(credential),
                Request::Params { epoch },
                now,
            );
        }
    }

    pub(super) fn params_done(&mut self, p: &Pending, announced: u64, reply: Reply, now: &Now) {
        let answer = match &reply {
            Reply::Ok(body) => decode::<ParamsAnswer>(body, |_| MESSAGE_VERSION),
            r if needs_handshake(r) || forbidden(r) => {
                self.request_handshake(p.generation, &describe(r), now);
                return;
            }
            r => Err(describe(r)),
        };
        let answer = match answer {
            Ok(a) => a,
            Err(why) => {
                self.log(
                    Level::Warn,
                    format!("parameter fetch failed: {why}; retrying"),
                );
                self.lane(Lane::Params).back_off(now.ms);
                return;
            }
        };
        // A revision refused is not fetched again and again.
        self.params_settled = Some(announced);
        self.lane(Lane::Params).reset(now.ms);
        let own = self.id.release.schema;
        let events = if answer.schema == own {
            events_for_group(own, &answer.params, &self.id.group).map_err(|e| e.to_string())
        } else {
            Err(format!(
                "they are of schema {}, this release reads schema {own}",
                answer.schema
            ))
        };
        match events {
            Ok(events) => {
                self.log(
                    Level::Info,
                    format!("parameters cached: revision {}", answer.revision),
                );
                self.params = ParamsCache {
                    schema: own,
                    revision: Some(answer.revision),
                    events,
                };
                self.out.push(Action::CacheParams {
                    revision: answer.revision,
                    params: answer.params,
                });
            }
            Err(why) => self.log(
                Level::Error,
                format!(
                    "parameters of revision {} refused ({why}); keeping the cache",
                    answer.revision
                ),
            ),
        }
    }
}
