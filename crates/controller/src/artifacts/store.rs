//! The artifact store on disk: `DATA_DIR/artifacts/<id>/`, through
//! `handover-artifacts`. Accepting an upload's manifest (validated, and
//! signed by a trusted key when there are any), storing its streamed binary
//! through `DigestCheck` into a temporary directory placed by one rename,
//! and finding, listing and re-verifying what is stored.

use futures_util::Stream;
use handover_artifacts::{
    check_stream, list_ids, load_id, write_checked, write_new, ArtifactDir, BinaryCheck, IoError,
    LoadError, NewDir, PlaceError, StreamError, FILE_MODE,
};
use handover_core::artifact::{
    signature_key_id, verify_manifest, ArtifactError, Manifest, PublicKey, BINARY_FILE,
    MANIFEST_FILE, SIGNATURE_FILE,
};
use std::path::{Path as FsPath, PathBuf};

/// Artifacts the store holds at most; an upload beyond is refused (507).
pub const ARTIFACTS_MAX: usize = 64;
/// An unknown id is shown in an answer up to this many characters: enough
/// for any valid id, and a junk one cannot fill the answer or the log.
const ID_SHOWN_CHARS_MAX: usize = 80;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactStoreError {
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(
        "the upload was cut off after {received} bytes: {reason}; nothing was stored, upload again"
    )]
    Interrupted { received: u64, reason: String },
    #[error(
        "artifact {id} already exists with sha256 {existing}, not {uploaded}; \
         the ids collide: rebuild the artifact or remove {id} from the store"
    )]
    Conflict {
        id: String,
        existing: String,
        uploaded: String,
    },
    #[error(
        "the artifact store holds {ARTIFACTS_MAX} artifacts already; \
         remove old ones from {dir} before uploading more"
    )]
    Full { dir: String },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<IoError> for ArtifactStoreError {
    fn from(e: IoError) -> ArtifactStoreError {
        ArtifactStoreError::Io {
            op: e.op,
            path: e.path.display().to_string(),
            source: e.error,
        }
    }
}

impl From<StreamError> for ArtifactStoreError {
    fn from(e: StreamError) -> ArtifactStoreError {
        match e {
            StreamError::Interrupted { received, reason } => {
                ArtifactStoreError::Interrupted { received, reason }
            }
            StreamError::Check(e) => ArtifactStoreError::Artifact(e),
            StreamError::Io(e) => e.into(),
        }
    }
}
/// Whether [`ArtifactStore::put_stream`] stored a new artifact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Put {
    Created(Manifest),
    /// Already present with the same digest; the stored manifest.
    Existing(Manifest),
}

impl Put {
    pub fn manifest(&self) -> &Manifest {
        match self {
            Put::Created(m) | Put::Existing(m) => m,
        }
    }
}

/// Artifacts as directories `<dir>/<id>/{manifest.json,manifest.json.minisig,handover}`.
#[derive(Debug)]
pub struct ArtifactStore {
    dir: PathBuf,
    /// With any, only artifacts signed by one of these are accepted or served.
    trusted: Vec<PublicKey>,
    /// Who serves the stored binaries to nodes: this controller's download
    /// slots, and the other nodes it names as sources.
    serving: super::sources::Serving,
}

/// An upload's manifest that passed [`ArtifactStore::accept`]: valid, and
/// signed by a trusted key when the store has any. Only this can be stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    manifest: Manifest,
    /// The exact manifest document, as signed; stored as is.
    document: Vec<u8>,
    signature: Option<String>,
}

impl Accepted {
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn is_signed(&self) -> bool {
        self.signature.is_some()
    }
}

/// Why [`ArtifactStore::find`] has no usable artifact.
#[derive(Debug, thiserror::Error)]
pub enum Missing {
    #[error("no artifact {0} on this controller; the operator uploads it with `handover artifact upload`")]
    NotFound(String),
    #[error("artifact {id} is stored but unusable ({reason}); upload it again")]
    Unusable { id: String, reason: String },
    #[error(
        "artifact {id} is stored but refused: {source}; then upload it again \
         (`handover artifact sign`, `handover artifact upload`)"
    )]
    Unverified {
        id: String,
        #[source]
        source: ArtifactError,
    },
}
/// A stored artifact that passed every check [`ArtifactStore::find`] makes.
pub type Stored = ArtifactDir;

impl ArtifactStore {
    /// Opens (creating) the store at `dir`, usually `DATA_DIR/artifacts`,
    /// private to this user (mode 0700, tightened if looser), and removes
    /// what an interrupted upload left behind.
    pub fn open(dir: impl Into<PathBuf>) -> Result<ArtifactStore, ArtifactStoreError> {
        let dir = dir.into();
        handover_private::dir(&dir).map_err(|e| IoError {
            op: e.op,
            path: e.path,
            error: e.source,
        })?;
        for p in handover_artifacts::sweep(&dir, None)? {
            tracing::info!(path = %p.display(), "removed an interrupted artifact upload");
        }
        Ok(ArtifactStore {
            dir,
            trusted: Vec::new(),
            serving: super::sources::Serving::default(),
        })
    }

    /// From now on, accept and serve only artifacts signed by one of `keys`
    /// (none: accept unsigned artifacts, as before).
    pub fn with_trusted_keys(mut self, keys: Vec<PublicKey>) -> ArtifactStore {
        self.trusted = keys;
        self
    }

    /// With at most `downloads_max` binary downloads served at once
    /// (default [`ARTIFACT_DOWNLOADS_MAX`](super::ARTIFACT_DOWNLOADS_MAX)).
    pub fn with_downloads_max(mut self, downloads_max: usize) -> ArtifactStore {
        self.serving = super::sources::Serving::new(downloads_max);
        self
    }

    /// The download slots and the sources of the stored binaries.
    pub fn serving(&self) -> &super::sources::Serving {
        &self.serving
    }

    pub fn trusted_keys(&self) -> &[PublicKey] {
        &self.trusted
    }

    pub fn dir(&self) -> &FsPath {
        &self.dir
    }

    /// Checks an upload's manifest document and signature before anything
    /// of its body is read: with trusted keys, a valid signature by one of
    /// them ([`verify_manifest`]); without, a valid manifest (and, if a
    /// signature is sent, one that parses: nodes may check it).
    pub fn accept(
        &self,
        document: &[u8],
        signature: Option<&str>,
    ) -> Result<Accepted, ArtifactError> {
        let signature = signature.filter(|s| !s.trim().is_empty());
        let manifest = if self.trusted.is_empty() {
            if let Some(text) = signature {
                signature_key_id(text)?;
            }
            Manifest::decode(document)?
        } else {
            verify_manifest(document, signature, &self.trusted)?
        };
        Ok(Accepted {
            manifest,
            document: document.to_vec(),
            signature: signature.map(str::to_owned),
        })
    }

    /// Artifact `id` with every check: stored whole (valid manifest named by
    /// its directory, binary of the right size) and, with trusted keys, its
    /// stored signature verifies. The digest was checked when it was stored;
    /// receivers check it again. Sync IO: call it off the async threads.
    pub fn find(&self, id: &str) -> Result<Stored, Missing> {
        let unusable = |reason: String| Missing::Unusable {
            id: id.to_owned(),
            reason,
        };
        match load_id(&self.dir, id, &self.trusted, BinaryCheck::Size) {
            Ok(stored) => Ok(stored),
            Err(LoadError::BadId(_) | LoadError::Absent { .. }) => Err(Missing::NotFound(
                id.chars().take(ID_SHOWN_CHARS_MAX).collect(),
            )),
            Err(LoadError::Unverified { error, .. }) => Err(Missing::Unverified {
                id: id.to_owned(),
                source: error,
            }),
            Err(LoadError::Misnamed { found, .. }) => Err(unusable(format!(
                "its directory holds the manifest of artifact {found}"
            ))),
            Err(e) => Err(unusable(e.to_string())),
        }
    }

    /// The manifest and binary path of artifact `id`, if [`find`](Self::find)
    /// accepts it; a stored artifact it refuses is logged and ignored.
    pub fn get(&self, id: &str) -> Option<(Manifest, PathBuf)> {
        match self.find(id) {
            Ok(s) => Some((s.manifest, s.binary)),
            Err(Missing::NotFound(_)) => None,
            Err(e) => {
                tracing::warn!(id, error = %e, "stored artifact ignored");
                None
            }
        }
    }

    /// Every whole artifact, oldest release first (at most [`ARTIFACTS_MAX`]).
    pub fn list(&self) -> Result<Vec<Manifest>, ArtifactStoreError> {
        let listing = handover_artifacts::list(&self.dir, &self.trusted)?;
        for (id, e) in &listing.refused {
            tracing::warn!(id, error = %e, "stored artifact ignored");
        }
        let mut all: Vec<Manifest> = listing.artifacts.into_iter().map(|a| a.manifest).collect();
        all.truncate(ARTIFACTS_MAX);
        Ok(all)
    }

    /// Stores an unsigned artifact: `manifest` as pretty JSON and the binary
    /// `body` streams (see [`put_accepted`](Self::put_accepted)). Refused
    /// ([`ArtifactError::Unsigned`]) when the store has trusted keys.
    pub async fn put_stream<St, B, E>(
        &self,
        manifest: &Manifest,
        body: St,
    ) -> Result<Put, ArtifactStoreError>
    where
        St: Stream<Item = Result<B, E>>,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let accepted = self.accept(manifest.to_pretty_json().as_bytes(), None)?;
        self.put_accepted(&accepted, body).await
    }

    /// Stores the binary that `body` streams, checking it against the
    /// accepted manifest on the way, with the manifest document and its
    /// signature exactly as uploaded. Only a verified binary is kept; on any
    /// error (mismatch, body cut off, disk) nothing is. Already stored with
    /// the same digest: the body is still checked, then [`Put::Existing`];
    /// but a stored copy that is unusable now (torn, or not signed by a
    /// trusted key), or whose signature differs from this signed upload's
    /// (unsigned, or signed again), is replaced: manifest, signature and
    /// binary together, so the stored pair always verifies.
    pub async fn put_accepted<St, B, E>(
        &self,
        upload: &Accepted,
        body: St,
    ) -> Result<Put, ArtifactStoreError>
    where
        St: Stream<Item = Result<B, E>>,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let manifest = &upload.manifest;
        let id = manifest.id();
        let (existing, replace) = match self.find(&id) {
            Ok(stored)
                if stored.manifest.sha256 == manifest.sha256
                    && upload.signature.is_some()
                    && stored.signature != upload.signature =>
            {
                (None, true)
            }
            Ok(stored) => (Some(stored.manifest), false),
            Err(Missing::NotFound(_)) => (None, false),
            Err(why) => {
                tracing::info!(id, reason = %why, "replacing a stored artifact with this upload");
                (None, true)
            }
        };
        if let Some(m) = existing {
            if m.sha256 != manifest.sha256 {
                return Err(ArtifactStoreError::Conflict {
                    id,
                    existing: m.sha256,
                    uploaded: manifest.sha256.clone(),
                });
            }
            // Same artifact: read and check the upload, keep the stored one.
            check_stream(manifest, body).await?;
            return Ok(Put::Existing(m));
        }
        if !replace && list_ids(&self.dir)?.len() >= ARTIFACTS_MAX {
            return Err(ArtifactStoreError::Full {
                dir: self.dir.display().to_string(),
            });
        }

        let new = NewDir::create(&self.dir.join(&id))?;
        write_checked(&new.path().join(BINARY_FILE), manifest, body).await?;
        let upload = upload.clone();
        let trusted = self.trusted.clone();
        let dir = self.dir.clone();
        let join =
            tokio::task::spawn_blocking(move || place(new, &dir, &upload, replace, &trusted)).await;
        match join {
            Ok(r) => r,
            Err(e) => Err(ArtifactStoreError::Io {
                op: "store",
                path: self.dir.display().to_string(),
                source: std::io::Error::other(e.to_string()),
            }),
        }
    }
}

/// Writes the manifest (and signature) next to the verified binary in
/// `new` and places it as `<dir>/<id>`; with `replace`, over a stored
/// `<id>/`. A concurrent upload of the same artifact that was placed first
/// makes this one [`Put::Existing`].
pub(super) fn place(
    new: NewDir,
    dir: &FsPath,
    upload: &Accepted,
    replace: bool,
    trusted: &[PublicKey],
) -> Result<Put, ArtifactStoreError> {
    let manifest = &upload.manifest;
    write_new(&new.path().join(MANIFEST_FILE), &upload.document, FILE_MODE)?;
    if let Some(sig) = &upload.signature {
        write_new(&new.path().join(SIGNATURE_FILE), sig.as_bytes(), FILE_MODE)?;
    }
    let placed = if replace {
        new.place_replacing()
    } else {
        new.place()
    };
    let id = manifest.id();
    match placed {
        Ok(_) => {
            tracing::info!(
                id,
                release = manifest.release.0,
                size = manifest.size,
                "artifact stored"
            );
            Ok(Put::Created(manifest.clone()))
        }
        Err(PlaceError::Taken { target, error }) => {
            let store = ArtifactStore {
                dir: dir.to_path_buf(),
                trusted: trusted.to_vec(),
                serving: super::sources::Serving::default(),
            };
            let m =
                store
                    .find(&id)
                    .map(|s| s.manifest)
                    .map_err(|reason| ArtifactStoreError::Io {
                        op: "read",
                        path: target.display().to_string(),
                        source: std::io::Error::other(reason.to_string()),
                    })?;
            if m.sha256 == manifest.sha256 {
                Ok(Put::Existing(m))
            } else {
                tracing::warn!(%error, "artifact id taken while uploading");
                Err(ArtifactStoreError::Conflict {
                    id,
                    existing: m.sha256,
                    uploaded: manifest.sha256.clone(),
                })
            }
        }
        Err(PlaceError::Io(e)) => Err(e.into()),
    }
}
