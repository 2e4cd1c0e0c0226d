//! Re-executing the supervisor's own image: into the active release's binary
//! once its worker runs it (handing over sockets and worker), or at start
//! into `state.json`'s active binary, once.

#[cfg(feature = "test-hooks")]
use super::TEST_FAULT_ENV;
use super::{blocking, Own, Supervisor, Worker};
use crate::digest::{self, Opened};
use crate::handoff::{HandedWorker, Handoff, HANDOFF_VERSION};
use crate::spawn::{ExecPlan, Spawner};
use crate::state;
use crate::{Release, SupervisorConfig};
use handover_core::release::CONTRACTS;
use std::ffi::OsString;
use std::io;
use std::path::Path;
use tracing::{error, info, warn};

/// What to do about the supervisor's own image.
enum Reexec {
    /// It runs the active release's binary.
    Runs,
    /// It will exec once the reason is gone.
    Wait(String),
    /// It stays on its binary, for the reason given.
    Refused(String),
    /// Exec now.
    Go,
}

impl Supervisor {
    /// Re-executes into the active release's binary when due; records in
    /// `status` why not otherwise. Returns only if it did not exec.
    pub(super) async fn consider_reexec(&mut self, active: &Worker) {
        let reason = match self.reexec_decision(active) {
            Reexec::Runs => None,
            Reexec::Wait(reason) => Some(reason),
            Reexec::Refused(reason) => {
                let mut live = self.shared.live();
                if live.reexec.as_deref() != Some(reason.as_str()) {
                    warn!(supervisor = %self.config.name, "{reason}");
                }
                live.reexec = Some(reason);
                return;
            }
            Reexec::Go => match self.reexec(active).await {
                Ok(()) => return,
                Err(reason) => Some(reason),
            },
        };
        self.shared.live().reexec = reason;
    }

    fn reexec_decision(&self, active: &Worker) -> Reexec {
        if self.own.runs(&active.sha256) {
            return Reexec::Runs;
        }
        let release = active.release.release;
        let stays = "; the supervisor stays on its binary (the worker runs the new one)";
        if let Some((sha256, reason)) = &self.reexec_failed {
            if *sha256 == active.sha256 {
                return Reexec::Refused(reason.clone());
            }
        }
        match &active.release.contracts {
            None => {
                return Reexec::Refused(format!(
                    "release {release}'s contracts are unknown (its switch did not name them){stays}"
                ))
            }
            Some(c) if c.supervisor_handoff != HANDOFF_VERSION => {
                return Reexec::Refused(format!(
                    "release {release} speaks hand-off version {}, this supervisor {HANDOFF_VERSION}{stays}",
                    c.supervisor_handoff
                ))
            }
            Some(_) => {}
        }
        if active.proc.is_adopted() {
            // Forked by what is now the main thread: the exec would end it.
            return Reexec::Refused(format!(
                "the worker of release {release} was adopted from an earlier image{stays}"
            ));
        }
        if !self.retiring.is_empty() {
            return Reexec::Wait(format!(
                "re-executing into release {release}'s binary once {} retiring worker(s) exited",
                self.retiring.len()
            ));
        }
        if self.shared.live().switch_queued {
            return Reexec::Wait("re-executing after the queued switch".to_string());
        }
        Reexec::Go
    }

    /// Replaces this image with the active release's binary, handing over
    /// the sockets and the worker. `state.json` already records the release
    /// as active. Returns only if it did not exec, with the reason.
    async fn reexec(&mut self, active: &Worker) -> Result<(), String> {
        {
            let mut live = self.shared.live();
            if live.switch_queued {
                return Err("re-executing after the queued switch".to_string());
            }
            live.reexecuting = true;
        }
        let result = self.try_reexec(active).await;
        self.shared.live().reexecuting = false;
        let reason = match result {
            Ok(reason) | Err(reason) => reason,
        };
        error!(supervisor = %self.config.name, "{reason}");
        self.reexec_failed = Some((active.sha256.clone(), reason.clone()));
        Err(reason)
    }

    /// The exec; returns only on failure (in either arm), with the reason.
    async fn try_reexec(&mut self, active: &Worker) -> Result<String, String> {
        let release = active.release.release;
        let path = active.release.binary.clone();
        let exec = blocking(move || digest::open_and_hash(&path))
            .await
            .map_err(|e| {
                format!(
                    "cannot open release {release}'s binary {} to re-execute: {e}",
                    active.release.binary.display()
                )
            })?;
        if exec.sha256 != active.sha256 {
            return Err(format!(
                "release {release}'s binary {} changed since its worker started (SHA-256 {}, the worker runs {}); not re-executing",
                active.release.binary.display(),
                exec.sha256,
                active.sha256,
            ));
        }
        let handoff = Handoff {
            v: HANDOFF_VERSION,
            listen_fd: self.listen_fd,
            control_fd: self.control_fd,
            exec_sha256: exec.sha256.clone(),
            worker: HandedWorker {
                pid: active.pid,
                release,
                binary: active.release.binary.clone(),
                sha256: active.sha256.clone(),
            },
            restarts: self.shared.live().restarts,
        };
        let text = handoff
            .encode()
            .map_err(|e| format!("cannot encode the hand-off: {e}"))?;
        let plan = ExecPlan {
            argv: exec_argv(&self.config.argv, &active.release.binary),
            env: exec_env(crate::ENV_SUPERVISOR_HANDOFF, text.into()),
            inherit_fds: vec![self.listen_fd, self.control_fd],
            exec,
        };
        #[cfg(feature = "test-hooks")]
        if std::env::var(TEST_FAULT_ENV).is_ok_and(|f| f == "kill_before_reexec") {
            warn!(supervisor = %self.config.name, "test hook {TEST_FAULT_ENV}=kill_before_reexec: SIGKILL");
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        }
        record_attempt(
            &self.config.state_dir,
            &active.release.binary,
            &active.sha256,
        )
        .await
        .map_err(|e| format!("cannot write reexec.json: {e}; not re-executing"))?;
        info!(
            supervisor = %self.config.name,
            "re-executing into release {release}'s binary {} (SHA-256 {}), handing over worker pid {}",
            active.release.binary.display(), active.sha256, active.pid,
        );
        let e = self.spawner.exec(plan).await;
        forget_attempt(&self.config.state_dir).await;
        Ok(format!(
            "cannot re-execute into release {release}'s binary {}: {e}; the supervisor stays on its binary (the worker runs the new one)",
            active.release.binary.display()
        ))
    }
}
/// At start, before anything is bound: if `state.json`'s active release
/// runs another binary than this one (by digest), that binary exists, and
/// its contracts are known and match this supervisor's, exec into it (no
/// worker yet, nothing to hand over but a marker that forbids doing it
/// again). Returns only if it did not exec.
pub(super) async fn exec_at_start(
    spawner: &Spawner,
    config: &SupervisorConfig,
    active: &Release,
    own: &Own,
    blocked: Option<&str>,
) {
    let name = &config.name;
    let compatible = active.contracts.is_some_and(|c| {
        c.supervisor_handoff == HANDOFF_VERSION
            && c.worker_cli == CONTRACTS.worker_cli
            && c.supervisor_control == CONTRACTS.supervisor_control
    });
    if !compatible {
        return;
    }
    let path = active.binary.clone();
    let exec: Opened = match blocking(move || digest::open_and_hash(&path)).await {
        Ok(exec) => exec,
        Err(e) => {
            warn!(supervisor = %name, "state.json names release {}'s binary {}: {e}; staying on this binary", active.release, active.binary.display());
            return;
        }
    };
    if own.runs(&exec.sha256) || blocked == Some(exec.sha256.as_str()) {
        return;
    }
    if active.sha256.as_ref().is_some_and(|s| *s != exec.sha256) {
        error!(
            supervisor = %name,
            "release {}'s binary {} has SHA-256 {}, not the {} state.json records; not executing it",
            active.release, active.binary.display(), exec.sha256, active.sha256.as_deref().unwrap_or_default(),
        );
        return;
    }
    info!(
        supervisor = %name,
        "state.json's active release {} runs {} (SHA-256 {}), not this binary; re-executing into it",
        active.release, active.binary.display(), exec.sha256,
    );
    if let Err(e) = record_attempt(&config.state_dir, &active.binary, &exec.sha256).await {
        error!(supervisor = %name, "cannot write reexec.json: {e}; staying on this binary");
        return;
    }
    let plan = ExecPlan {
        argv: exec_argv(&config.argv, &active.binary),
        env: exec_env(
            crate::ENV_SUPERVISOR_EXECED_AT_START,
            exec.sha256.clone().into(),
        ),
        inherit_fds: Vec::new(),
        exec,
    };
    let e = spawner.exec(plan).await;
    forget_attempt(&config.state_dir).await;
    error!(supervisor = %name, "cannot re-execute into {}: {e}; staying on this binary", active.binary.display());
}

/// Records, durably, that this process is about to exec into `binary`
/// (one more try, if an earlier exec into the same digest did not come up).
async fn record_attempt(dir: &Path, binary: &Path, sha256: &str) -> io::Result<()> {
    let dir = dir.to_owned();
    let (binary, sha256) = (binary.to_owned(), sha256.to_owned());
    blocking(move || {
        let tries = state::load_attempt(&dir)
            .filter(|a| a.sha256 == sha256)
            .map_or(1, |a| a.tries.saturating_add(1));
        let attempt = state::ReexecAttempt {
            binary,
            sha256,
            tries,
        };
        state::store_attempt(&dir, &attempt)
    })
    .await
}

/// The exec failed: this image goes on, the attempt never happened.
async fn forget_attempt(dir: &Path) {
    let dir = dir.to_owned();
    if let Err(e) = blocking(move || state::clear_attempt(&dir)).await {
        warn!("cannot remove reexec.json after a failed exec: {e}");
    }
}

/// The supervisor's own argv with argv[0] replaced by `binary`.
fn exec_argv(argv: &[OsString], binary: &Path) -> Vec<OsString> {
    let mut argv = argv.to_vec();
    match argv.first_mut() {
        Some(first) => *first = binary.as_os_str().to_owned(),
        None => argv.push(binary.as_os_str().to_owned()),
    }
    argv
}

/// This process's environment without any hand-off marker, plus `key`.
fn exec_env(key: &str, value: OsString) -> Vec<(OsString, OsString)> {
    let markers = [
        crate::ENV_SUPERVISOR_HANDOFF,
        crate::ENV_SUPERVISOR_EXECED_AT_START,
    ];
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !markers.iter().any(|m| k == m))
        .collect();
    env.push((key.into(), value));
    env
}
