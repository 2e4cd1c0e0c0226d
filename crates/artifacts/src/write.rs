//! Durable writes: files written and fsync'd with their directory, and
//! directories built under a temporary name, then placed by one rename.

use crate::TEMP_PREFIX;
use std::fs::OpenOptions;
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// Hex digits of the random part of a temporary name.
const TEMP_HEX_DIGITS: usize = 16;

/// A file-system operation that failed, with what and where.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {}: {error}", path.display())]
pub struct IoError {
    pub op: &'static str,
    pub path: PathBuf,
    pub error: std::io::Error,
}

pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> IoError {
    let path = path.to_path_buf();
    move |error| IoError { op, path, error }
}

/// Why [`NewDir::place`] did not place the directory.
#[derive(Debug, thiserror::Error)]
pub enum PlaceError {
    /// Something non-empty holds the target's name already (say, the same
    /// artifact placed concurrently); the new directory was removed.
    #[error("cannot place {}: it exists already ({error})", target.display())]
    Taken {
        target: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] IoError),
}

/// The directory `path` is in (`.` for a bare name).
pub(crate) fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn name_of(path: &Path) -> Result<&str, IoError> {
    path.file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| IoError {
            op: "name",
            path: path.to_path_buf(),
            error: std::io::Error::new(ErrorKind::InvalidInput, "no UTF-8 file name"),
        })
}

/// Fsyncs a directory, so what was created, renamed or removed in it stays.
pub fn fsync_dir(dir: &Path) -> Result<(), IoError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Removes a file or directory when dropped, unless disarmed: also when a
/// future that owns it is dropped half-way.
#[derive(Debug)]
pub(crate) struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    pub(crate) fn new(path: PathBuf) -> RemoveOnDrop {
        RemoveOnDrop(Some(path))
    }

    pub(crate) fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = remove_any(&p);
        }
    }
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path)?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// A fresh temporary name for `name` in `parent`:
/// `.tmp-<name>-<16 hex digits>`.
pub fn temp_path(parent: &Path, name: &str) -> PathBuf {
    parent.join(format!(
        "{TEMP_PREFIX}{name}-{:016x}",
        rand::random::<u64>()
    ))
}

/// Whether `file_name` is a temporary name ([`temp_path`]): of `name`
/// only, or of anything with `None`.
pub fn is_temporary(file_name: &str, name: Option<&str>) -> bool {
    let Some(rest) = file_name.strip_prefix(TEMP_PREFIX) else {
        return false;
    };
    let Some(name) = name else {
        return true;
    };
    rest.strip_prefix(name)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|hex| {
            hex.len() == TEMP_HEX_DIGITS && hex.bytes().all(|b| b.is_ascii_hexdigit())
        })
}

/// Removes the temporaries under `root` that a crash left behind: those of
/// `name`, or all with `None`. Returns what it removed; a missing root has
/// none. Only call it while nothing else builds the same name.
pub fn sweep(root: &Path, name: Option<&str>) -> Result<Vec<PathBuf>, IoError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", root)(e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list", root))?;
        let temporary = entry
            .file_name()
            .to_str()
            .is_some_and(|n| is_temporary(n, name));
        if temporary {
            let p = entry.path();
            remove_any(&p).map_err(io_err("remove", &p))?;
            removed.push(p);
        }
    }
    if !removed.is_empty() {
        fsync_dir(root)?;
    }
    Ok(removed)
}

/// Creates `path` (it must not exist) with `mode`, writes `bytes`, fsyncs
/// it and its directory. On failure the file is removed.
pub fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IoError> {
    write_file(path, bytes, mode)?;
    fsync_dir(parent_of(path))
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IoError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("create", path))?;
    let mut undo = RemoveOnDrop::new(path.to_path_buf());
    // The umask may have narrowed the mode given at creation.
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err("chmod", path))?;
    f.write_all(bytes).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("fsync", path))?;
    undo.disarm();
    Ok(())
}

/// Writes `bytes` to `path` atomically, replacing what was there: a
/// temporary file beside it (written, fsync'd), one rename, and the
/// directory fsync'd. Readers see the old file or the new one, never a mix.
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IoError> {
    let parent = parent_of(path);
    let tmp = temp_path(parent, name_of(path)?);
    write_file(&tmp, bytes, mode)?;
    let mut undo = RemoveOnDrop::new(tmp.clone());
    std::fs::rename(&tmp, path).map_err(io_err("rename into", path))?;
    undo.disarm();
    fsync_dir(parent)
}

/// A directory built under a temporary name beside its target
/// ([`temp_path`]) and placed by one rename, so the target appears only
/// complete. Dropped unplaced (an error, a dropped future), it is removed.
#[derive(Debug)]
pub struct NewDir {
    tmp: RemoveOnDrop,
    path: PathBuf,
    target: PathBuf,
}

impl NewDir {
    /// Creates the temporary directory for `target` (whose parent must
    /// exist).
    pub fn create(target: &Path) -> Result<NewDir, IoError> {
        let path = temp_path(parent_of(target), name_of(target)?);
        std::fs::create_dir(&path).map_err(io_err("create", &path))?;
        Ok(NewDir {
            tmp: RemoveOnDrop::new(path.clone()),
            path,
            target: target.to_path_buf(),
        })
    }

    /// Where to write the directory's files.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Fsyncs the directory, renames it to the target (absent, or an empty
    /// directory) and fsyncs the parent. A non-empty target is
    /// [`PlaceError::Taken`].
    pub fn place(mut self) -> Result<PathBuf, PlaceError> {
        fsync_dir(&self.path)?;
        match std::fs::rename(&self.path, &self.target) {
            Ok(()) => {
                self.tmp.disarm();
                fsync_dir(parent_of(&self.target))?;
                Ok(self.target.clone())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::DirectoryNotEmpty | ErrorKind::AlreadyExists
                ) =>
            {
                Err(PlaceError::Taken {
                    target: self.target.clone(),
                    error: e,
                })
            }
            Err(e) => Err(io_err("rename into", &self.target)(e).into()),
        }
    }

    /// [`place`](Self::place), replacing what holds the target: it is moved
    /// aside (to a temporary name, removed after, or by [`sweep`]) first.
    pub fn place_replacing(self) -> Result<PathBuf, PlaceError> {
        let aside = temp_path(parent_of(&self.target), name_of(&self.target)?);
        let _old = match std::fs::rename(&self.target, &aside) {
            Ok(()) => Some(RemoveOnDrop::new(aside)),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("move aside", &self.target)(e).into()),
        };
        self.place()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn write_new_never_overwrites_and_keeps_the_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("key");
        write_new(&p, b"secret", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"secret");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = write_new(&p, b"other", 0o600).unwrap_err();
        assert_eq!(e.op, "create");
        assert_eq!(std::fs::read(&p).unwrap(), b"secret");
        let e = write_new(&tmp.path().join("no/such/dir"), b"x", 0o644).unwrap_err();
        assert!(e.to_string().starts_with("cannot create "), "{e}");
    }

    #[test]
    fn replace_file_leaves_no_temporary() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("manifest.json.minisig");
        replace_file(&p, b"one", 0o644).unwrap();
        replace_file(&p, b"two", 0o644).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(entries(tmp.path()), vec!["manifest.json.minisig"]);
        // A directory in the way: refused, and nothing left behind.
        let d = tmp.path().join("d");
        std::fs::create_dir_all(d.join("x")).unwrap();
        replace_file(&d, b"x", 0o644).unwrap_err();
        assert_eq!(entries(tmp.path()), vec!["d", "manifest.json.minisig"]);
    }

    #[test]
    fn a_new_dir_appears_only_when_placed() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("r2-0123456789ab");
        let new = NewDir::create(&target).unwrap();
        let name = new.path().file_name().unwrap().to_str().unwrap().to_owned();
        assert!(is_temporary(&name, Some("r2-0123456789ab")), "{name}");
        write_new(&new.path().join("a"), b"1", 0o644).unwrap();
        assert!(!target.exists());
        assert_eq!(new.place().unwrap(), target);
        assert_eq!(entries(tmp.path()), vec!["r2-0123456789ab"]);
        assert_eq!(entries(&target), vec!["a"]);

        // Dropped unplaced: removed.
        let new = NewDir::create(&target).unwrap();
        write_new(&new.path().join("b"), b"2", 0o644).unwrap();
        drop(new);
        assert_eq!(entries(tmp.path()), vec!["r2-0123456789ab"]);

        // Onto a non-empty target: taken, and removed.
        let new = NewDir::create(&target).unwrap();
        write_new(&new.path().join("b"), b"2", 0o644).unwrap();
        assert!(matches!(new.place(), Err(PlaceError::Taken { .. })));
        assert_eq!(entries(tmp.path()), vec!["r2-0123456789ab"]);
        assert_eq!(entries(&target), vec!["a"]);

        // Replacing: the old one goes.
        let new = NewDir::create(&target).unwrap();
        write_new(&new.path().join("b"), b"2", 0o644).unwrap();
        new.place_replacing().unwrap();
        assert_eq!(entries(tmp.path()), vec!["r2-0123456789ab"]);
        assert_eq!(entries(&target), vec!["b"]);

        // Onto an empty directory: fine.
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        let new = NewDir::create(&empty).unwrap();
        write_new(&new.path().join("c"), b"3", 0o644).unwrap();
        new.place().unwrap();
        assert_eq!(entries(&empty), vec!["c"]);
    }

    #[test]
    fn sweep_removes_temporaries_of_a_name_or_all() {
        let tmp = tempfile::tempdir().unwrap();
        let keep = NewDir::create(&tmp.path().join("r2-0123456789ab")).unwrap();
        let other = NewDir::create(&tmp.path().join("r22-0123456789ab")).unwrap();
        std::fs::write(temp_path(tmp.path(), "r2-0123456789ab"), b"x").unwrap();
        std::fs::create_dir(tmp.path().join("r2-0123456789ab")).unwrap();
        let removed = sweep(tmp.path(), Some("r2-0123456789ab")).unwrap();
        assert_eq!(removed.len(), 2);
        assert!(!keep.path().exists() && other.path().exists());
        assert_eq!(sweep(tmp.path(), None).unwrap().len(), 1);
        assert_eq!(entries(tmp.path()), vec!["r2-0123456789ab"]);
        assert!(sweep(&tmp.path().join("missing"), None).unwrap().is_empty());
        for (name, of, yes) in [
            (".tmp-x-0123456789abcdef", Some("x"), true),
            (".tmp-x-0123456789abcdef", None, true),
            (".tmp-xy-0123456789abcdef", Some("x"), false),
            (".tmp-x-0123", Some("x"), false),
            ("x", None, false),
            (".x.partial", None, false),
        ] {
            assert_eq!(is_temporary(name, of), yes, "{name} {of:?}");
        }
    }
}
