//! Loading one artifact directory, and listing those under a root.

use crate::read::{read_bounded, read_signature, ReadError};
use crate::write::{io_err, IoError};
use crate::IO_CHUNK_BYTES;
use handover_core::artifact::{
    check_id, verify_manifest, ArtifactError, DigestCheck, Manifest, PublicKey, BINARY_FILE,
    MANIFEST_BYTES_MAX, MANIFEST_FILE, SIGNATURE_FILE,
};
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// How [`load`] checks the binary against the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryCheck {
    /// A regular file of the manifest's size: cheap, for listings and for
    /// serving (the digest was checked when it was stored, and every
    /// receiver checks it again).
    Size,
    /// Size and SHA-256, reading the whole binary: before it is signed,
    /// sent, or run.
    Digest,
}

/// An artifact directory that passed [`load`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArtifactDir {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// `manifest.json` exactly as stored (what is signed).
    pub document: Vec<u8>,
    /// `manifest.json.minisig`, if there is one.
    pub signature: Option<String>,
    /// `<dir>/handover`.
    pub binary: PathBuf,
}

/// Why [`load`] refused an artifact directory. The files' own read errors
/// (missing, too large, unreadable) are [`LoadError::Read`].
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    BadId(ArtifactError),
    /// There is no such directory: no artifact, rather than a broken one.
    #[error("there is no artifact directory {}", dir.display())]
    Absent { dir: PathBuf },
    #[error("{} is not a directory", dir.display())]
    NotADirectory { dir: PathBuf },
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The manifest does not decode or validate (no trusted keys).
    #[error("{} is not a valid artifact manifest: {error}", path.display())]
    Manifest { path: PathBuf, error: ArtifactError },
    /// With trusted keys: the signature (or the manifest it signs) is refused.
    #[error("{} does not verify{}: {error}", dir.display(), signature_hint(.error))]
    Unverified { dir: PathBuf, error: ArtifactError },
    #[error("{} describes artifact {found}, not {expected}", path.display())]
    Misnamed {
        path: PathBuf,
        found: String,
        expected: String,
    },
    /// The binary is not the one the manifest names.
    #[error("{} does not match {}: {error}", binary.display(), manifest.display())]
    Binary {
        binary: PathBuf,
        manifest: PathBuf,
        error: ArtifactError,
    },
}

fn signature_hint(e: &ArtifactError) -> String {
    if *e == ArtifactError::Unsigned {
        format!(" (there is no {SIGNATURE_FILE})")
    } else {
        String::new()
    }
}

/// Loads the artifact directory `dir`: its manifest (bounded) decoded and
/// validated, or, with `trusted` keys, its signature verified by one of
/// them ([`verify_manifest`]); its signature if present; and its binary
/// checked as `check` says. Missing files follow the crate's one rule.
pub fn load(
    dir: &Path,
    trusted: &[PublicKey],
    check: BinaryCheck,
) -> Result<ArtifactDir, LoadError> {
    load_inner(dir, None, trusted, check)
}

/// [`load`] of `<root>/<id>`, whose manifest must name `id`
/// ([`Manifest::id`]); an `id` of another shape is [`LoadError::BadId`].
pub fn load_id(
    root: &Path,
    id: &str,
    trusted: &[PublicKey],
    check: BinaryCheck,
) -> Result<ArtifactDir, LoadError> {
    check_id(id).map_err(LoadError::BadId)?;
    load_inner(&root.join(id), Some(id), trusted, check)
}

fn load_inner(
    dir: &Path,
    id: Option<&str>,
    trusted: &[PublicKey],
    check: BinaryCheck,
) -> Result<ArtifactDir, LoadError> {
    match std::fs::metadata(dir) {
        Ok(md) if md.is_dir() => {}
        Ok(_) => {
            return Err(LoadError::NotADirectory {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(LoadError::Absent {
                dir: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(ReadError::io(dir, e).into()),
    }
    let mpath = dir.join(MANIFEST_FILE);
    let document = read_bounded(&mpath, MANIFEST_BYTES_MAX)?;
    let signature = read_signature(dir)?;
    let manifest = if trusted.is_empty() {
        Manifest::decode(&document).map_err(|error| LoadError::Manifest {
            path: mpath.clone(),
            error,
        })?
    } else {
        verify_manifest(&document, signature.as_deref(), trusted).map_err(|error| {
            LoadError::Unverified {
                dir: dir.to_path_buf(),
                error,
            }
        })?
    };
    if let Some(id) = id.filter(|id| *id != manifest.id()) {
        return Err(LoadError::Misnamed {
            path: mpath,
            found: manifest.id(),
            expected: id.to_owned(),
        });
    }
    let binary = dir.join(BINARY_FILE);
    check_binary(&binary, &mpath, &manifest, check)?;
    Ok(ArtifactDir {
        dir: dir.to_path_buf(),
        manifest,
        document,
        signature,
        binary,
    })
}

/// Checks the file `binary` against `manifest` as `check` says;
/// `mpath` names the manifest in an error (where it is, or will be).
pub fn check_binary(
    binary: &Path,
    mpath: &Path,
    manifest: &Manifest,
    check: BinaryCheck,
) -> Result<(), LoadError> {
    let mismatch = |error| LoadError::Binary {
        binary: binary.to_path_buf(),
        manifest: mpath.to_path_buf(),
        error,
    };
    let md = std::fs::metadata(binary).map_err(|e| ReadError::io(binary, e))?;
    if !md.is_file() {
        return Err(ReadError::Unreadable {
            path: binary.to_path_buf(),
            error: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        }
        .into());
    }
    match check {
        BinaryCheck::Size if md.len() == manifest.size => Ok(()),
        BinaryCheck::Size => Err(mismatch(ArtifactError::SizeMismatch {
            expected: manifest.size,
            actual: md.len(),
        })),
        BinaryCheck::Digest => {
            let mut f = std::fs::File::open(binary).map_err(|e| ReadError::io(binary, e))?;
            let mut digest = DigestCheck::new(manifest);
            let mut buf = vec![0u8; IO_CHUNK_BYTES];
            loop {
                let n = f.read(&mut buf).map_err(|e| ReadError::io(binary, e))?;
                if n == 0 {
                    return digest.finish().map_err(mismatch);
                }
                digest.update(&buf[..n]).map_err(mismatch)?;
            }
        }
    }
}

/// The names under `root` that are artifact ids ([`check_id`]), sorted;
/// temporaries and foreign names are left out. A missing root has none.
pub fn list_ids(root: &Path) -> Result<Vec<String>, IoError> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("list", root)(e)),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("list", root))?;
        if let Ok(name) = entry.file_name().into_string() {
            if check_id(&name).is_ok() {
                ids.push(name);
            }
        }
    }
    ids.sort();
    Ok(ids)
}

/// What [`list`] found under a root.
#[derive(Debug, Default)]
pub struct Listing {
    /// The artifacts that load, oldest release first (then by creation).
    pub artifacts: Vec<ArtifactDir>,
    /// The artifact directories that do not, and why.
    pub refused: Vec<(String, LoadError)>,
}

/// Every artifact directory under `root` ([`list_ids`]), loaded by
/// [`load_id`] with [`BinaryCheck::Size`].
pub fn list(root: &Path, trusted: &[PublicKey]) -> Result<Listing, IoError> {
    let mut listing = Listing::default();
    for id in list_ids(root)? {
        match load_id(root, &id, trusted, BinaryCheck::Size) {
            Ok(a) => listing.artifacts.push(a),
            Err(e) => listing.refused.push((id, e)),
        }
    }
    listing
        .artifacts
        .sort_by_key(|a| (a.manifest.release, a.manifest.created_ms, a.manifest.id()));
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{binary, manifest_of};
    use crate::{write_new, NewDir, BINARY_MODE, FILE_MODE};

    fn keypair() -> (minisign::KeyPair, PublicKey) {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let key = PublicKey::decode(&kp.pk.to_box().unwrap().into_string()).unwrap();
        (kp, key)
    }

    fn sign(kp: &minisign::KeyPair, doc: &[u8]) -> String {
        minisign::sign(None, &kp.sk, doc, None, None)
            .unwrap()
            .into_string()
    }

    /// Writes `<root>/<id>/` for `bytes`, signed with `kp` if given.
    fn put(root: &Path, bytes: &[u8], kp: Option<&minisign::KeyPair>) -> Manifest {
        let m = manifest_of(bytes);
        let new = NewDir::create(&root.join(m.id())).unwrap();
        let doc = m.to_pretty_json();
        write_new(&new.path().join(MANIFEST_FILE), doc.as_bytes(), FILE_MODE).unwrap();
        if let Some(kp) = kp {
            let sig = sign(kp, doc.as_bytes());
            write_new(&new.path().join(SIGNATURE_FILE), sig.as_bytes(), FILE_MODE).unwrap();
        }
        write_new(&new.path().join(BINARY_FILE), bytes, BINARY_MODE).unwrap();
        new.place().unwrap();
        m
    }

    #[test]
    fn loads_a_whole_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = binary(5_000);
        let m = put(tmp.path(), &bytes, None);
        let dir = tmp.path().join(m.id());
        for check in [BinaryCheck::Size, BinaryCheck::Digest] {
            let a = load(&dir, &[], check).unwrap();
            assert_eq!(a.manifest, m);
            assert_eq!(a.document, m.to_pretty_json().into_bytes());
            assert_eq!(a.signature, None);
            assert_eq!(a.binary, dir.join(BINARY_FILE));
            assert_eq!(load_id(tmp.path(), &m.id(), &[], check).unwrap(), a);
        }
    }

    #[test]
    fn one_rule_for_missing_files() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = binary(5_000);
        let m = put(tmp.path(), &bytes, None);
        let dir = tmp.path().join(m.id());
        let all = [BinaryCheck::Size, BinaryCheck::Digest];

        // No directory: absent, not broken.
        let none = tmp.path().join("r2-000000000000");
        assert!(matches!(
            load(&none, &[], BinaryCheck::Size),
            Err(LoadError::Absent { .. })
        ));
        assert!(matches!(
            load(&dir.join(BINARY_FILE), &[], BinaryCheck::Size),
            Err(LoadError::NotADirectory { .. })
        ));
        assert!(matches!(
            load_id(tmp.path(), "../etc", &[], BinaryCheck::Size),
            Err(LoadError::BadId(_))
        ));

        // No binary: missing, whatever the check.
        std::fs::rename(dir.join(BINARY_FILE), tmp.path().join("aside")).unwrap();
        for check in all {
            match load(&dir, &[], check) {
                Err(LoadError::Read(ReadError::Missing { path })) => {
                    assert_eq!(path, dir.join(BINARY_FILE))
                }
                other => panic!("{other:?}"),
            }
        }
        std::fs::rename(tmp.path().join("aside"), dir.join(BINARY_FILE)).unwrap();

        // No signature: unsigned, refused only with trusted keys.
        let (_, key) = keypair();
        for check in all {
            assert_eq!(load(&dir, &[], check).unwrap().signature, None);
            match load(&dir, std::slice::from_ref(&key), check) {
                Err(e @ LoadError::Unverified { .. }) => {
                    assert!(
                        e.to_string().contains("there is no manifest.json.minisig"),
                        "{e}"
                    );
                }
                other => panic!("{other:?}"),
            }
        }
        // A signature that is there but unreadable is never "unsigned".
        std::fs::write(dir.join(SIGNATURE_FILE), [0xff, 0xfe]).unwrap();
        for check in all {
            assert!(matches!(
                load(&dir, &[], check),
                Err(LoadError::Read(ReadError::NotText { .. }))
            ));
        }
        std::fs::remove_file(dir.join(SIGNATURE_FILE)).unwrap();

        // No manifest: missing, whatever the check.
        std::fs::remove_file(dir.join(MANIFEST_FILE)).unwrap();
        for check in all {
            match load(&dir, &[], check) {
                Err(e @ LoadError::Read(ReadError::Missing { .. })) => {
                    assert!(e.to_string().contains("cannot read"), "{e}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn refuses_what_does_not_match() {
        let tmp = tempfile::tempdir().unwrap();
        let mut bytes = binary(5_000);
        let m = put(tmp.path(), &bytes, None);
        let dir = tmp.path().join(m.id());
        bytes[100] ^= 4;
        std::fs::write(dir.join(BINARY_FILE), &bytes).unwrap();
        // Same size: only the digest check sees it.
        load(&dir, &[], BinaryCheck::Size).unwrap();
        match load(&dir, &[], BinaryCheck::Digest) {
            Err(LoadError::Binary { error, .. }) => assert_eq!(error.code(), "digest_mismatch"),
            other => panic!("{other:?}"),
        }
        bytes.push(0);
        std::fs::write(dir.join(BINARY_FILE), &bytes).unwrap();
        for check in [BinaryCheck::Size, BinaryCheck::Digest] {
            match load(&dir, &[], check) {
                Err(LoadError::Binary { error, .. }) => assert_eq!(error.code(), "size_mismatch"),
                other => panic!("{other:?}"),
            }
        }
        // A manifest edited into an invalid one; one of another artifact.
        let mut edited = m.clone();
        edited.schema = handover_core::Schema(1);
        std::fs::write(dir.join(MANIFEST_FILE), edited.to_pretty_json()).unwrap();
        let e = load(&dir, &[], BinaryCheck::Size).unwrap_err();
        assert!(
            e.to_string().contains("not a valid artifact manifest"),
            "{e}"
        );
        let mut other = m.clone();
        other.sha256 = "f".repeat(64);
        std::fs::write(dir.join(MANIFEST_FILE), other.to_pretty_json()).unwrap();
        assert!(matches!(
            load_id(tmp.path(), &m.id(), &[], BinaryCheck::Size),
            Err(LoadError::Misnamed { .. })
        ));
        std::fs::write(dir.join(MANIFEST_FILE), vec![b' '; MANIFEST_BYTES_MAX + 1]).unwrap();
        assert!(matches!(
            load(&dir, &[], BinaryCheck::Size),
            Err(LoadError::Read(ReadError::TooLarge { .. }))
        ));
    }

    #[test]
    fn with_trusted_keys_only_a_verifying_signature_loads() {
        let tmp = tempfile::tempdir().unwrap();
        let (kp_a, key_a) = keypair();
        let (_, key_b) = keypair();
        let m = put(tmp.path(), &binary(3_000), Some(&kp_a));
        let dir = tmp.path().join(m.id());
        let a = load(&dir, std::slice::from_ref(&key_a), BinaryCheck::Digest).unwrap();
        assert!(a.signature.is_some());
        match load(&dir, &[key_b], BinaryCheck::Size) {
            Err(LoadError::Unverified { error, .. }) => assert_eq!(error.code(), "untrusted_key"),
            other => panic!("{other:?}"),
        }
        let mut edited = m.clone();
        edited.created_ms += 1;
        std::fs::write(dir.join(MANIFEST_FILE), edited.to_pretty_json()).unwrap();
        match load(&dir, &[key_a], BinaryCheck::Size) {
            Err(LoadError::Unverified { error, .. }) => assert_eq!(error.code(), "bad_signature"),
            other => panic!("{other:?}"),
        }
        // Without keys, the edited manifest is still a valid one.
        load(&dir, &[], BinaryCheck::Size).unwrap();
    }

    #[test]
    fn lists_whole_artifacts_oldest_first() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(list(&tmp.path().join("missing"), &[])
            .unwrap()
            .artifacts
            .is_empty());
        let a = put(tmp.path(), &binary(1_000), None);
        let b = put(tmp.path(), &binary(2_000), None);
        let torn = put(tmp.path(), &binary(3_000), None);
        std::fs::write(tmp.path().join(torn.id()).join(BINARY_FILE), b"short").unwrap();
        std::fs::create_dir(tmp.path().join("r2-0123456789ab")).unwrap();
        std::fs::create_dir(tmp.path().join("something-else")).unwrap();
        let _building = NewDir::create(&tmp.path().join("r2-abcdefabcdef")).unwrap();
        let listing = list(tmp.path(), &[]).unwrap();
        let mut want = vec![a.clone(), b.clone()];
        want.sort_by_key(|m| (m.release, m.created_ms, m.id()));
        let got: Vec<Manifest> = listing.artifacts.into_iter().map(|x| x.manifest).collect();
        assert_eq!(got, want);
        let mut refused: Vec<String> = listing.refused.into_iter().map(|(id, _)| id).collect();
        refused.sort();
        let mut want_refused = vec![torn.id(), "r2-0123456789ab".to_owned()];
        want_refused.sort();
        assert_eq!(refused, want_refused);
    }
}
