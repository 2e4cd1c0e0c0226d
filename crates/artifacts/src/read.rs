//! Bounded reads of small files: manifests, signatures, keys.

use handover_core::artifact::{SIGNATURE_BYTES_MAX, SIGNATURE_FILE};
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// Why a small file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {}: it does not exist", path.display())]
    Missing { path: PathBuf },
    #[error("{} is larger than {max} bytes; it is not what it should be", path.display())]
    TooLarge { path: PathBuf, max: usize },
    #[error("cannot read {}: {error}", path.display())]
    Unreadable {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{} is not text (not UTF-8)", path.display())]
    NotText { path: PathBuf },
}

impl ReadError {
    pub fn is_missing(&self) -> bool {
        matches!(self, ReadError::Missing { .. })
    }

    pub(crate) fn io(path: &Path, error: std::io::Error) -> ReadError {
        let path = path.to_path_buf();
        if error.kind() == std::io::ErrorKind::NotFound {
            ReadError::Missing { path }
        } else {
            ReadError::Unreadable { path, error }
        }
    }
}

/// Reads `path` whole, refusing more than `max` bytes (never reading more
/// than one byte past it).
pub fn read_bounded(path: &Path, max: usize) -> Result<Vec<u8>, ReadError> {
    let f = std::fs::File::open(path).map_err(|e| ReadError::io(path, e))?;
    let mut buf = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    f.take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| ReadError::io(path, e))?;
    if buf.len() > max {
        return Err(ReadError::TooLarge {
            path: path.to_path_buf(),
            max,
        });
    }
    Ok(buf)
}

/// [`read_bounded`], as UTF-8 text.
pub fn read_text(path: &Path, max: usize) -> Result<String, ReadError> {
    String::from_utf8(read_bounded(path, max)?).map_err(|_| ReadError::NotText {
        path: path.to_path_buf(),
    })
}

/// `<dir>/manifest.json.minisig`: `None` only when there is no such file
/// (unsigned); present but unreadable, too large or not text is an error.
pub fn read_signature(dir: &Path) -> Result<Option<String>, ReadError> {
    match read_text(&dir.join(SIGNATURE_FILE), SIGNATURE_BYTES_MAX) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.is_missing() => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_own_answer() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("f");
        assert!(matches!(
            read_bounded(&p, 4),
            Err(ReadError::Missing { .. })
        ));
        let e = read_bounded(&p, 4).unwrap_err().to_string();
        assert!(
            e.contains("cannot read") && e.contains("does not exist"),
            "{e}"
        );
        std::fs::write(&p, b"1234").unwrap();
        assert_eq!(read_bounded(&p, 4).unwrap(), b"1234");
        assert_eq!(read_text(&p, 4).unwrap(), "1234");
        assert!(matches!(
            read_bounded(&p, 3),
            Err(ReadError::TooLarge { max: 3, .. })
        ));
        // A directory is there but cannot be read as a file.
        assert!(matches!(
            read_bounded(tmp.path(), 3),
            Err(ReadError::Unreadable { .. })
        ));
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(matches!(read_text(&p, 4), Err(ReadError::NotText { .. })));
    }

    #[test]
    fn only_an_absent_signature_is_unsigned() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(read_signature(tmp.path()).unwrap(), None);
        let sig = tmp.path().join(SIGNATURE_FILE);
        std::fs::write(&sig, "text").unwrap();
        assert_eq!(read_signature(tmp.path()).unwrap().as_deref(), Some("text"));
        std::fs::write(&sig, vec![b'x'; SIGNATURE_BYTES_MAX + 1]).unwrap();
        assert!(matches!(
            read_signature(tmp.path()),
            Err(ReadError::TooLarge { .. })
        ));
        std::fs::write(&sig, [0xff]).unwrap();
        assert!(matches!(
            read_signature(tmp.path()),
            Err(ReadError::NotText { .. })
        ));
        std::fs::remove_file(&sig).unwrap();
        std::fs::create_dir(&sig).unwrap();
        assert!(matches!(
            read_signature(tmp.path()),
            Err(ReadError::Unreadable { .. })
        ));
    }
}
