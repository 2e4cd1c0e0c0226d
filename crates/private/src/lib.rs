//! Private files and directories: what only the process's own user may
//! read or change. Data dirs (and every directory below them that holds
//! state: supervisor state, artifacts, staged releases, snapshots) are
//! [`DIR_MODE`]; databases, their WAL and shared-memory files, snapshots and
//! secret keys are [`FILE_MODE`]. Each is created so; one found with bits
//! for its group or others (made by an older release, by hand, or under a
//! loose umask) is tightened, and a warning says which and from what.
//!
//! Secret files the operator gives (a token file) are not tightened but
//! refused when [`is_private`] says no: the process cannot know who else
//! already read them.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Mode of a private directory: the owner only.
pub const DIR_MODE: u32 = 0o700;
/// Mode of a private file: the owner reads and writes, nobody else.
pub const FILE_MODE: u32 = 0o600;
/// The permission bits that let the group or others in.
pub const SHARED_BITS: u32 = 0o077;
/// Every permission bit (with setuid, setgid and sticky), what `chmod` sets.
const MODE_BITS: u32 = 0o7777;

/// Whether `mode` keeps the group and others out.
pub fn is_private(mode: u32) -> bool {
    mode & SHARED_BITS == 0
}

/// `mode` without the bits of the group and others (the owner's bits kept).
pub fn tightened(mode: u32) -> u32 {
    mode & MODE_BITS & !SHARED_BITS
}

/// A mode changed to keep the group and others out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tightened {
    pub path: PathBuf,
    pub from: u32,
    pub to: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}: {source}", path.display())]
pub struct PrivateError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> PrivateError + 'a {
    move |source| PrivateError {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Creates directory `path` (and any missing parent) with [`DIR_MODE`], or
/// tightens an existing one whose group or others have any access.
/// Returns what it tightened.
pub fn dir(path: &Path) -> Result<Option<Tightened>, PrivateError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .map_err(io_err("create directory", path))?;
    tighten(path)
}

/// Creates an empty file `path` with [`FILE_MODE`] if there is none (an
/// existing file is never truncated), or tightens an existing one. A
/// database created this way before SQLite opens it keeps the mode, and
/// SQLite gives its WAL and shared-memory files the database's mode.
pub fn file(path: &Path) -> Result<Option<Tightened>, PrivateError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(io_err("create", path))?;
    tighten(path)
}

/// Tightens `path` if it exists (a file SQLite made beside a database);
/// `None` when it does not exist or was private already.
pub fn tighten_if_present(path: &Path) -> Result<Option<Tightened>, PrivateError> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read the mode of", path)(e)),
        Ok(_) => tighten(path),
    }
}

/// A SQLite database file private before SQLite opens it: [`file`] (an
/// empty file is a new database), and its `-wal` and `-shm` files
/// tightened if an older release left them looser (new ones get the
/// database's mode from SQLite). Returns what it tightened.
pub fn database(path: &Path) -> Result<Vec<Tightened>, PrivateError> {
    let mut changed: Vec<Tightened> = file(path)?.into_iter().collect();
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        changed.extend(tighten_if_present(Path::new(&side))?);
    }
    Ok(changed)
}

/// Removes the group's and others' bits of `path` if it has any, and says so.
fn tighten(path: &Path) -> Result<Option<Tightened>, PrivateError> {
    let from = std::fs::metadata(path)
        .map_err(io_err("read the mode of", path))?
        .permissions()
        .mode()
        & MODE_BITS;
    if is_private(from) {
        return Ok(None);
    }
    let to = tightened(from);
    std::fs::set_permissions(path, Permissions::from_mode(to))
        .map_err(io_err("restrict the mode of", path))?;
    tracing::warn!(
        path = %path.display(),
        from = format!("{from:04o}"),
        to = format!("{to:04o}"),
        "tightened permissions: only this user may read the data dir, databases and keys"
    );
    Ok(Some(Tightened {
        path: path.to_owned(),
        from,
        to,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & MODE_BITS
    }

    #[test]
    fn the_rule_keeps_the_owner_and_drops_group_and_others() {
        assert!(is_private(0o600));
        assert!(is_private(0o400));
        assert!(is_private(0o700));
        assert!(!is_private(0o640));
        assert!(!is_private(0o604));
        assert!(!is_private(0o620));
        assert!(!is_private(0o755));
        assert_eq!(tightened(0o755), 0o700);
        assert_eq!(tightened(0o644), 0o600);
        assert_eq!(tightened(0o440), 0o400);
        assert_eq!(tightened(0o1777), 0o1700);
    }

    #[test]
    fn a_new_dir_is_private_and_an_old_loose_one_is_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("a/b");
        assert_eq!(dir(&d).unwrap(), None);
        assert_eq!(mode(&d), DIR_MODE);
        assert_eq!(mode(&tmp.path().join("a")), DIR_MODE);

        let loose = tmp.path().join("loose");
        std::fs::create_dir(&loose).unwrap();
        std::fs::set_permissions(&loose, Permissions::from_mode(0o755)).unwrap();
        let t = dir(&loose).unwrap().unwrap();
        assert_eq!((t.from, t.to), (0o755, 0o700));
        assert_eq!(mode(&loose), 0o700);
        assert_eq!(dir(&loose).unwrap(), None, "already private");
    }

    #[test]
    fn a_file_is_created_private_never_truncated_and_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("x.db");
        assert_eq!(file(&f).unwrap(), None);
        assert_eq!(mode(&f), FILE_MODE);
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 0);

        std::fs::write(&f, b"kept").unwrap();
        std::fs::set_permissions(&f, Permissions::from_mode(0o644)).unwrap();
        let t = file(&f).unwrap().unwrap();
        assert_eq!((t.from, t.to), (0o644, 0o600));
        assert_eq!(std::fs::read(&f).unwrap(), b"kept");
    }

    #[test]
    fn a_database_and_the_files_beside_it_are_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("controller.db");
        assert_eq!(database(&db).unwrap(), vec![]);
        assert_eq!(mode(&db), FILE_MODE);
        assert!(!tmp.path().join("controller.db-wal").exists());
        for f in ["controller.db", "controller.db-wal", "controller.db-shm"] {
            let p = tmp.path().join(f);
            std::fs::write(&p, b"").unwrap();
            std::fs::set_permissions(&p, Permissions::from_mode(0o644)).unwrap();
        }
        assert_eq!(database(&db).unwrap().len(), 3);
        for f in ["controller.db", "controller.db-wal", "controller.db-shm"] {
            assert_eq!(mode(&tmp.path().join(f)), FILE_MODE, "{f}");
        }
    }

    #[test]
    fn only_present_files_are_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let wal = tmp.path().join("x.db-wal");
        assert_eq!(tighten_if_present(&wal).unwrap(), None);
        assert!(!wal.exists(), "not created");
        std::fs::write(&wal, b"").unwrap();
        std::fs::set_permissions(&wal, Permissions::from_mode(0o664)).unwrap();
        assert_eq!(tighten_if_present(&wal).unwrap().map(|t| t.to), Some(0o600));
    }
}
