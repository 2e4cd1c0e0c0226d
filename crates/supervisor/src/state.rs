//! `<state_dir>/state.json`: which release is active and which switch is
//! under way, written atomically before each step so a supervisor killed at
//! any point restarts into a runnable release.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Release;

/// Bound on the size of `state.json` we are willing to read.
const MAX_STATE_FILE_BYTES: u64 = 64 * 1024;

/// The persisted supervisor state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct State {
    pub active: Release,
    /// Set before the new worker is spawned, cleared once the switch is
    /// committed or abandoned.
    pub switching: Option<Release>,
}

pub(crate) fn state_path(dir: &Path) -> PathBuf {
    dir.join("state.json")
}

/// The stored state, or None when the supervisor never ran here.
pub(crate) fn load(dir: &Path) -> io::Result<Option<State>> {
    let path = state_path(dir);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut text = Vec::new();
    file.take(MAX_STATE_FILE_BYTES + 1).read_to_end(&mut text)?;
    if text.len() as u64 > MAX_STATE_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is longer than {MAX_STATE_FILE_BYTES} bytes",
                path.display()
            ),
        ));
    }
    serde_json::from_slice(&text).map(Some).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a supervisor state: {e}", path.display()),
        )
    })
}

/// Replaces the stored state atomically: temp file, fsync, rename, fsync of
/// the directory, so a crash leaves either the old or the new state.
pub(crate) fn store(dir: &Path, state: &State) -> io::Result<()> {
    let mut text = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    text.push(b'\n');
    write_atomically(dir, &state_path(dir), &text)
}

fn write_atomically(dir: &Path, path: &Path, text: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(text)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// `<state_dir>/reexec.json`: written right before the supervisor execs
/// itself into a binary, removed by the new image once it serves. Found at
/// start, it means that exec did not come up: the new image crashed, or the
/// whole process was killed at that moment (a host crash, an operator's
/// SIGKILL), and the service manager started the old binary again. Since
/// the two cannot be told apart, the supervisor tries the same binary again
/// until it has tried [`REEXEC_TRIES_MAX`] times; then it stays on its own,
/// so a broken new supervisor costs a few restarts, not a crash loop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReexecAttempt {
    pub binary: PathBuf,
    pub sha256: String,
    /// Execs into this binary that did not come up, this one included (a
    /// file written before this field counts as one).
    #[serde(default = "one")]
    pub tries: u32,
}

/// Execs into one binary a supervisor makes before it stays on its own:
/// one kill at the wrong moment is survived, a binary that never comes up
/// is not retried forever.
pub(crate) const REEXEC_TRIES_MAX: u32 = 2;

fn one() -> u32 {
    1
}

impl ReexecAttempt {
    /// This binary did not come up often enough to stop trying it.
    pub fn exhausted(&self) -> bool {
        self.tries >= REEXEC_TRIES_MAX
    }
}

fn attempt_path(dir: &Path) -> PathBuf {
    dir.join("reexec.json")
}

/// The attempt a previous image left, if any (an unreadable one counts as
/// none: it only ever stops an exec).
pub(crate) fn load_attempt(dir: &Path) -> Option<ReexecAttempt> {
    let file = File::open(attempt_path(dir)).ok()?;
    let mut text = Vec::new();
    file.take(MAX_STATE_FILE_BYTES)
        .read_to_end(&mut text)
        .ok()?;
    serde_json::from_slice(&text).ok()
}

pub(crate) fn store_attempt(dir: &Path, attempt: &ReexecAttempt) -> io::Result<()> {
    let text = serde_json::to_vec(attempt).map_err(io::Error::other)?;
    write_atomically(dir, &attempt_path(dir), &text)
}

pub(crate) fn clear_attempt(dir: &Path) -> io::Result<()> {
    match fs::remove_file(attempt_path(dir)) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(n: u32) -> Release {
        Release::new(n, format!("/releases/{n}/handover"))
    }

    /// `state.json` as every supervisor before digests and contracts wrote
    /// it (golden, checked in): it must still load, and a state without the
    /// new fields must still write exactly that shape, so an older binary
    /// reads it too.
    #[test]
    fn state_written_before_digests_still_loads() -> io::Result<()> {
        let cases = [
            (
                &include_bytes!("../fixtures/state-before-digests.json")[..],
                State {
                    active: Release::new(1, "/var/lib/handover/node/releases/initial/handover"),
                    switching: None,
                },
            ),
            (
                &include_bytes!("../fixtures/state-before-digests-switching.json")[..],
                State {
                    active: Release::new(1, "/usr/bin/handover"),
                    switching: Some(Release::new(
                        2,
                        "/var/lib/handover/node/releases/a2/handover",
                    )),
                },
            ),
        ];
        for (bytes, expected) in cases {
            let dir = tempfile::tempdir()?;
            fs::write(state_path(dir.path()), bytes)?;
            assert_eq!(load(dir.path())?, Some(expected.clone()));
            store(dir.path(), &expected)?;
            assert_eq!(fs::read(state_path(dir.path()))?, bytes);
        }
        Ok(())
    }

    #[test]
    fn digests_and_contracts_read_back() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let state = State {
            active: Release {
                sha256: Some("0f".repeat(32)),
                contracts: Some(handover_core::release::CONTRACTS),
                ..release(3)
            },
            switching: None,
        };
        store(dir.path(), &state)?;
        assert_eq!(load(dir.path())?, Some(state));
        Ok(())
    }

    #[test]
    fn releases_named_are_the_active_and_the_switching_one() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(crate::releases_named(dir.path())?, vec![]);
        store(
            dir.path(),
            &State {
                active: release(1),
                switching: Some(release(2)),
            },
        )?;
        assert_eq!(
            crate::releases_named(dir.path())?,
            vec![release(1), release(2)]
        );
        store(
            dir.path(),
            &State {
                active: release(2),
                switching: None,
            },
        )?;
        assert_eq!(crate::releases_named(dir.path())?, vec![release(2)]);
        fs::write(state_path(dir.path()), b"{")?;
        assert!(crate::releases_named(dir.path()).is_err());
        Ok(())
    }

    #[test]
    fn missing_state_is_none_and_stored_state_reads_back() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(load(dir.path())?, None);
        let state = State {
            active: release(1),
            switching: Some(release(2)),
        };
        store(dir.path(), &state)?;
        assert_eq!(load(dir.path())?, Some(state.clone()));
        let committed = State {
            active: release(2),
            switching: None,
        };
        store(dir.path(), &committed)?;
        assert_eq!(load(dir.path())?, Some(committed));
        assert!(!dir.path().join("state.json.tmp").exists());
        Ok(())
    }

    #[test]
    fn a_reexec_attempt_is_stored_and_cleared() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        assert_eq!(load_attempt(dir.path()), None);
        clear_attempt(dir.path())?;
        let attempt = ReexecAttempt {
            binary: PathBuf::from("/r/3/handover"),
            sha256: "0f".repeat(32),
            tries: 1,
        };
        store_attempt(dir.path(), &attempt)?;
        assert_eq!(load_attempt(dir.path()), Some(attempt));
        // A file of a supervisor before `tries` counts one try.
        fs::write(
            dir.path().join("reexec.json"),
            br#"{"binary":"/r/3/handover","sha256":"0f0f"}"#,
        )?;
        assert_eq!(load_attempt(dir.path()).map(|a| a.tries), Some(1));
        clear_attempt(dir.path())?;
        assert_eq!(load_attempt(dir.path()), None);
        Ok(())
    }

    #[test]
    fn a_corrupt_state_is_an_error_not_a_guess() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        fs::write(state_path(dir.path()), b"{\"active\":")?;
        assert!(load(dir.path()).is_err());
        fs::write(
            state_path(dir.path()),
            br#"{"active":{"release":1,"binary":"/x"},"switching":null,"extra":1}"#,
        )?;
        assert!(load(dir.path()).is_err());
        Ok(())
    }
}
