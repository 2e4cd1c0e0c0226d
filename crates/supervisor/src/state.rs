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
    let path = state_path(dir);
    let tmp = dir.join("state.json.tmp");
    let mut text = serde_json::to_vec_pretty(state).map_err(io::Error::other)?;
    text.push(b'\n');
    {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, &path)?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(n: u32) -> Release {
        Release {
            release: n,
            binary: PathBuf::from(format!("/releases/{n}/handover")),
        }
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
