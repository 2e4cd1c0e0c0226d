//! At most [`STAGED_MAX`] staged releases in `DATA_DIR/releases`: a node
//! reports what it holds in every hello, and the controller refuses a hello
//! that names more (`Hello.staged`), so a node that kept every release it
//! was ever upgraded to would, after that many upgrades, never talk to its
//! controller again.
//!
//! After each staging the node removes the oldest staged artifacts (by
//! staging time) beyond [`STAGED_MAX`], never one it must keep ([`Keep`]):
//! the one just staged, the one whose binary this worker runs, and those
//! its supervisor's `state.json` names (the active release and, during a
//! switch, the one switched to: what the supervisor may start again or
//! exec into). When `state.json` cannot be read nothing is removed. An
//! artifact leaves in one rename (to a temporary name [`sweep`] knows, then
//! removed), so a crash never leaves a torn `releases/<id>/`.
//!
//! [`sweep`]: handover_artifacts::sweep

use crate::stage::{staged_dirs, Claim, StagedDir, RELEASES_DIR};
use handover_artifacts::{fsync_dir, temp_path, IoError};
use handover_core::wire::limits::STAGED_MAX;
use handover_supervisor::Release;
use std::path::Path;

/// What is never removed, whatever its age.
#[derive(Clone, Debug, Default)]
pub struct Keep<'a> {
    /// The artifact just staged (the controller wants it).
    pub just_staged: Option<&'a str>,
    /// The SHA-256 of the binary this worker runs
    /// (`handover_supervisor::binary_sha256`).
    pub running_sha256: Option<&'a str>,
    /// The releases the supervisor's state names
    /// (`handover_supervisor::releases_named`): by digest, or by a binary
    /// at `releases/<id>/…`.
    pub supervisor: &'a [Release],
}

impl Keep<'_> {
    pub fn keeps(&self, dir: &StagedDir) -> bool {
        let id = dir.manifest.id();
        let sha256 = dir.manifest.sha256.as_str();
        self.just_staged == Some(id.as_str())
            || self.running_sha256 == Some(sha256)
            || self.supervisor.iter().any(|r| {
                r.sha256.as_deref() == Some(sha256)
                    || r.binary
                        .parent()
                        .and_then(Path::file_name)
                        .is_some_and(|name| name == id.as_str())
            })
    }
}

/// The pure choice: the ids to remove so that at most `max` of `staged`
/// remain, oldest staging first, none that `keep` keeps (if more than
/// `max` are kept, more than `max` remain).
pub fn choose(staged: &[StagedDir], keep: &Keep<'_>, max: usize) -> Vec<String> {
    let mut oldest_first = staged.to_vec();
    crate::stage::newest_first(&mut oldest_first);
    oldest_first.reverse();
    let mut excess = staged.len().saturating_sub(max);
    let mut remove = Vec::new();
    for dir in oldest_first {
        if excess == 0 {
            break;
        }
        if !keep.keeps(&dir) {
            remove.push(dir.manifest.id());
            excess -= 1;
        }
    }
    remove
}

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(
        "cannot read the supervisor's state in {dir}: {source}; no staged release is \
         removed while it is unknown which the supervisor may start"
    )]
    SupervisorState {
        dir: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prune the staged releases: {0}")]
    Io(#[from] IoError),
}

/// Removes the staged artifacts under `data_dir` beyond [`STAGED_MAX`],
/// oldest first, never one `just_staged` / `running_sha256` / the
/// supervisor's state keeps ([`Keep`]); returns the ids removed. Every
/// artifact that loads counts, signed by a trusted key or not (what a
/// hello reports is a part of them). One being staged by this process
/// now is skipped. Sync: call it off the async threads.
pub fn prune(
    data_dir: &Path,
    just_staged: Option<&str>,
    running_sha256: Option<&str>,
) -> Result<Vec<String>, PruneError> {
    let state_dir = data_dir.join(handover_supervisor::STATE_DIR_NAME);
    let supervisor = handover_supervisor::releases_named(&state_dir).map_err(|source| {
        PruneError::SupervisorState {
            dir: state_dir.display().to_string(),
            source,
        }
    })?;
    let keep = Keep {
        just_staged,
        running_sha256,
        supervisor: &supervisor,
    };
    let releases = data_dir.join(RELEASES_DIR);
    let dirs = staged_dirs(&releases, &[])?.dirs;
    let mut removed = Vec::new();
    for id in choose(&dirs, &keep, STAGED_MAX) {
        let target = releases.join(&id);
        let Ok(_claim) = Claim::take(target.clone(), &id) else {
            continue;
        };
        let aside = temp_path(&releases, &id);
        std::fs::rename(&target, &aside).map_err(|error| IoError {
            op: "move aside",
            path: target.clone(),
            error,
        })?;
        fsync_dir(&releases)?;
        if let Err(e) = std::fs::remove_dir_all(&aside) {
            // Gone from releases/ already; the temporary is swept when
            // this artifact is staged again.
            tracing::warn!(path = %aside.display(), error = %e, "cannot remove a pruned release");
        }
        removed.push(id);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::staged;
    use crate::stage::testing::{manifest, set_staged_ms, stage_on_disk};
    use handover_core::artifact::Manifest;

    /// Staged artifact `n` (its binary one distinct byte string), staged at `ms`.
    fn dir(n: u32, ms: u64) -> StagedDir {
        StagedDir {
            manifest: manifest(&n.to_le_bytes()),
            staged_ms: ms,
        }
    }

    fn ids(dirs: &[&StagedDir]) -> Vec<String> {
        dirs.iter().map(|d| d.manifest.id()).collect()
    }

    #[test]
    fn nothing_goes_at_or_under_the_bound() {
        let staged: Vec<StagedDir> = (0..4).map(|n| dir(n, u64::from(n))).collect();
        assert!(choose(&staged, &Keep::default(), 4).is_empty());
        assert!(choose(&staged, &Keep::default(), 5).is_empty());
        assert!(choose(&[], &Keep::default(), 0).is_empty());
    }

    #[test]
    fn the_oldest_go_first_in_any_listing_order() {
        // Listed in no particular order; staged at 10 * n.
        let staged: Vec<StagedDir> = [3, 0, 5, 1, 4, 2]
            .into_iter()
            .map(|n| dir(n, 10 * u64::from(n)))
            .collect();
        let by_n = |n: u32| {
            staged
                .iter()
                .find(|d| d.staged_ms == 10 * u64::from(n))
                .unwrap()
        };
        assert_eq!(
            choose(&staged, &Keep::default(), 4),
            ids(&[by_n(0), by_n(1)])
        );
        assert_eq!(
            choose(&staged, &Keep::default(), 0),
            ids(&[by_n(0), by_n(1), by_n(2), by_n(3), by_n(4), by_n(5)])
        );
    }

    #[test]
    fn what_is_kept_stays_and_the_next_oldest_goes_instead() {
        let staged: Vec<StagedDir> = (0..6).map(|n| dir(n, u64::from(n))).collect();
        let d = |n: usize| &staged[n];
        let (id0, sha1) = (d(0).manifest.id(), d(1).manifest.sha256.clone());
        // The supervisor's active release by its binary's directory, the
        // one it switches to by digest only.
        let supervisor = [
            Release::new(2, format!("/data/releases/{}/handover", d(2).manifest.id())),
            Release {
                sha256: Some(d(3).manifest.sha256.clone()),
                ..Release::new(2, "/elsewhere/handover")
            },
        ];
        let keep = Keep {
            just_staged: Some(&id0),
            running_sha256: Some(&sha1),
            supervisor: &supervisor,
        };
        for n in 0..4 {
            assert!(keep.keeps(d(n)), "{n}");
        }
        assert!(!keep.keeps(d(4)) && !keep.keeps(d(5)));
        assert_eq!(choose(&staged, &keep, 4), ids(&[d(4), d(5)]));
        // More kept than the bound: those stay, all others go.
        assert_eq!(choose(&staged, &keep, 2), ids(&[d(4), d(5)]));
        // A binary outside releases/ (the first release's) keeps nothing.
        let outside = [Release::new(1, "/usr/bin/handover")];
        let keep = Keep {
            supervisor: &outside,
            ..Keep::default()
        };
        assert_eq!(choose(&staged, &keep, 5), ids(&[d(0)]));
    }

    #[test]
    fn twenty_staged_on_disk_keep_the_newest_sixteen_and_what_must_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let data_dir = tmp.path();
        let releases = data_dir.join(RELEASES_DIR);
        handover_private::dir(&releases).unwrap();
        // Staged at 1_000 * (n + 1) ms: artifact 0 is the oldest.
        let all: Vec<Manifest> = (0..20)
            .map(|n| {
                let m = stage_on_disk(&releases, n);
                set_staged_ms(&releases, &m, 1_000 * (u64::from(n) + 1));
                m
            })
            .collect();
        assert_eq!(staged(data_dir, &[]).len(), 20);
        assert_eq!(staged(data_dir, &[])[0], all[19], "newest first");

        // The supervisor runs artifact 1 (active) and switches to 2; this
        // worker runs 3; 0 was just staged (again).
        let state_dir = data_dir.join(handover_supervisor::STATE_DIR_NAME);
        handover_private::dir(&state_dir).unwrap();
        let release_of = |m: &Manifest| Release {
            sha256: Some(m.sha256.clone()),
            ..Release::new(2, crate::stage::binary_path(data_dir, &m.id()))
        };
        let state = serde_json::json!({
            "active": release_of(&all[1]),
            "switching": release_of(&all[2]),
        });
        std::fs::write(
            state_dir.join("state.json"),
            serde_json::to_vec(&state).unwrap(),
        )
        .unwrap();
        let removed = prune(data_dir, Some(&all[0].id()), Some(&all[3].sha256)).unwrap();
        // 4 must stay, so 12 of the 16 others: 4..=7, the oldest of those, go.
        let want: Vec<String> = all[4..8].iter().map(Manifest::id).collect();
        assert_eq!(removed, want);
        let left = staged(data_dir, &[]);
        assert_eq!(left.len(), STAGED_MAX);
        for m in all[..4].iter().chain(&all[8..]) {
            assert!(left.contains(m), "{} was removed", m.id());
        }
        // Nothing else is left behind: no temporary, no torn directory.
        let mut names: Vec<String> = std::fs::read_dir(&releases)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        let mut want: Vec<String> = left.iter().map(Manifest::id).collect();
        want.sort();
        assert_eq!(names, want);

        // At the bound: nothing more goes.
        assert!(prune(data_dir, None, None).unwrap().is_empty());

        // A state.json that does not read: nothing is removed.
        stage_on_disk(&releases, 20);
        std::fs::write(state_dir.join("state.json"), b"{").unwrap();
        let err = prune(data_dir, None, None).unwrap_err();
        assert!(matches!(err, PruneError::SupervisorState { .. }), "{err}");
        assert_eq!(staged(data_dir, &[]).len(), STAGED_MAX + 1);
        // No supervisor ever ran here (a bare node): only age decides.
        std::fs::remove_file(state_dir.join("state.json")).unwrap();
        assert_eq!(prune(data_dir, None, None).unwrap(), vec![all[0].id()]);
    }
}
