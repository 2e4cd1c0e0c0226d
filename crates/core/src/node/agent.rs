//! The node machine's upgrade agent: stage what the controller names,
//! quiesce, drain (bounded) and switch through the supervisor.

use super::*;

impl Machine {
    // ---- upgrade agent: stage, quiesce, switch ----

    /// Whether this worker already runs artifact `id` as release `to`: the
    /// same release from the same bytes.
    pub(super) fn runs(&self, to: Release, id: &str) -> bool {
        if to != self.id.release.release {
            return false;
        }
        let Some(own) = &self.id.binary_sha256 else {
            return true;
        };
        self.staged
            .iter()
            .find(|m| m.id == id)
            .is_none_or(|m| m.sha256.as_ref().is_none_or(|s| s == own))
    }

    pub(super) fn poll_agent(&mut self, now: &Now) {
        if self.phase != Phase::Running {
            return;
        }
        // Once the controller withdraws the switch, a later request is a new try.
        if let Some(f) = self.switch_failure.as_mut().filter(|f| !f.withdrawn) {
            if crate::agent::switch_withdrawn(&self.desired, self.desired_rev.is_some()) {
                f.withdrawn = true;
                let f = f.clone();
                self.out.push(Action::RememberSwitchFailure(Some(f)));
            }
        }
        if self.desired.stage.is_none() {
            self.stage_error = None;
        }
        let already_runs = match (self.desired.switch_to, &self.desired.stage) {
            (Some(to), Some(id)) => self.runs(to, id),
            _ => false,
        };
        let refused = self
            .switch_failure
            .as_ref()
            .filter(|f| !f.withdrawn)
            .map(|f| f.artifact.clone());
        let staged = self.staged_ids();
        let todo = crate::agent::plan(&self.desired, &staged, already_runs, refused.as_deref());
        if let Some(id) = todo.stage {
            if self.credential.is_some()
                && self.staging.is_none()
                && now.ms >= self.stage_not_before_ms
            {
                self.staging = Some(id.clone());
                self.out.push(Action::Stage { artifact: id });
            }
        }
        if let Some((artifact, to)) = todo.switch {
            self.log(
                Level::Info,
                format!("quiescing to switch to release {to} ({artifact})"),
            );
            self.phase = Phase::Draining {
                until_ms: now.ms + DRAIN_ON_STOP_MS,
                then: AfterDrain::Switch { artifact, to },
                quiesced: false,
            };
            self.out.push(Action::Quiesce);
        }
    }

    pub(super) fn on_staged(
        &mut self,
        artifact: String,
        result: Result<Vec<StagedArtifact>, String>,
        now: &Now,
    ) {
        self.staging = None;
        match result {
            Ok(staged) => {
                self.staged = staged;
                self.stage_error = None;
                self.stage_retry_ms = STAGE_RETRY_MS_MIN;
                if self.staged.iter().any(|s| s.id == artifact) {
                    self.log(Level::Info, format!("artifact {artifact} staged"));
                    // Reported at once, not at the next heartbeat: the
                    // controller names this node as a source of it to the
                    // nodes still staging, and counts it staged sooner.
                    if self.next_heartbeat_ms.is_some() {
                        self.next_heartbeat_ms = Some(now.ms);
                    }
                } else {
                    // Staged but not usable here (e.g. its signature no
                    // longer verifies): wait as after a failure, never spin.
                    self.stage_not_before_ms = now.ms + STAGE_RETRY_MS_MAX;
                }
            }
            Err(why) => {
                self.log(
                    Level::Error,
                    format!("cannot stage {artifact}: {why}; this release keeps running"),
                );
                self.stage_error = Some(why);
                self.stage_not_before_ms = now.ms + self.stage_retry_ms;
                self.stage_retry_ms = (self.stage_retry_ms * 2).min(STAGE_RETRY_MS_MAX);
            }
        }
    }

    /// A quiescing node goes on once its producer stopped and the outbox
    /// is drained (or it may not ship), or at the deadline.
    pub(super) fn poll_drain(&mut self, now: &Now) {
        let Phase::Draining {
            until_ms,
            then,
            quiesced,
        } = &self.phase
        else {
            return;
        };
        let (until_ms, then, quiesced) = (*until_ms, then.clone(), *quiesced);
        let can_ship = matches!(self.grant, Some(Grant::Full | Grant::Deliver));
        let queued = now.outbox.count > 0 && can_ship;
        if (!quiesced || queued) && now.ms < until_ms {
            return;
        }
        if !quiesced {
            self.log(
                Level::Warn,
                "going on before the producer stopped (the drain's bound passed)".to_string(),
            );
        }
        if now.outbox.count > 0 {
            self.log(
                Level::Warn,
                format!(
                    "going on with {} records queued; they ship on the next start",
                    now.outbox.count
                ),
            );
        }
        self.cancel_all();
        match then {
            AfterDrain::Switch { artifact, to } => {
                self.phase = Phase::Switching {
                    artifact: artifact.clone(),
                    to,
                };
                self.out.push(Action::Switch { artifact, to });
            }
            AfterDrain::Stop => {
                self.phase = Phase::Stopped;
                self.out.push(Action::Stopped);
            }
        }
    }

    /// The loops end: every request in flight is abandoned.
    pub(super) fn cancel_all(&mut self) {
        for lane in Lane::ALL {
            if let Some(p) = self.lane(lane).pending.take() {
                self.out.push(Action::Cancel(p.id));
            }
        }
        self.reading_outbox = false;
    }

    pub(super) fn on_switch(&mut self, result: SwitchResult, now: &Now) {
        let Phase::Switching { artifact, to } = &self.phase else {
            return;
        };
        let (artifact, to) = (artifact.clone(), *to);
        match result {
            SwitchResult::Switched => self.log(
                Level::Info,
                "the new release is serving; this worker finishes its requests and exits".into(),
            ),
            SwitchResult::Refused(reason) => {
                // This worker has quiesced: it exits, and its supervisor
                // starts the old release again, which remembers not to retry at once.
                let failure = SwitchFailure {
                    artifact,
                    release: to.0,
                    reason: format!("the supervisor refused the switch to release {to}: {reason}"),
                    at_ms: now.wall_ms,
                    withdrawn: false,
                };
                self.switch_failure = Some(failure.clone());
                self.out
                    .push(Action::RememberSwitchFailure(Some(failure.clone())));
                self.out.push(Action::Fail(failure.reason));
            }
            SwitchResult::Failed(why) => self.out.push(Action::Fail(format!(
                "switch to release {to} failed: {why}"
            ))),
        }
    }
}
