//! Upgrade artifacts on the controller: an [`ArtifactStore`] over
//! `DATA_DIR/artifacts/<id>/{manifest.json,manifest.json.minisig,handover}`,
//! the operator's upload and listing, and the nodes' download.
//!
//! Routes ([`routes`]):
//!
//! | method | path | who | what |
//! | --- | --- | --- | --- |
//! | `PUT` | `/api/v1/artifacts/{sha256}` | operator | upload: header [`MANIFEST_HEADER`] = the manifest, header [`SIGNATURE_HEADER`] = its signature (optional), body = the raw binary; 201 + manifest when stored, 200 + the stored manifest when already present |
//! | `GET` | `/api/v1/artifacts` | operator | every usable stored manifest |
//! | `GET` | `/api/v1/artifacts/{id}/signature` | operator | its stored signature, as for nodes (the CLI skips re-sending an artifact stored with the same signature) |
//! | `GET` | `/node/v1/artifacts/{id}/manifest` | node | one manifest: the exact bytes that were signed |
//! | `GET` | `/node/v1/artifacts/{id}/signature` | node | its minisign signature (`text/plain`); 404 `unsigned` when it has none |
//! | `GET` | `/node/v1/artifacts/{id}/binary` | node | the binary, streamed, with `Content-Length` |
//!
//! Headers of an upload (HTTP header values cannot carry newlines):
//!
//! - [`MANIFEST_HEADER`]: the standard base64 (with padding) of the exact
//!   bytes of `manifest.json`, so a signature over the file verifies here.
//!   A value starting with `{` is taken as the manifest JSON itself (one
//!   line), as older clients send it.
//! - [`SIGNATURE_HEADER`]: the standard base64 of the exact bytes of
//!   `manifest.json.minisig` (a standard minisign signature).
//!
//! With trusted keys configured ([`ArtifactStore::with_trusted_keys`]) an
//! upload is refused before its body is read unless its signature is a
//! valid one by a trusted key (400 `unsigned`, `untrusted_key` or
//! `bad_signature`), and the store serves (to nodes, to the upgrade and to
//! the controller's own switch) only artifacts whose stored signature
//! verifies. With none, unsigned artifacts are accepted (and a signature,
//! if sent, is kept for the nodes).
//!
//! Authentication plugs in through [`ArtifactHost`], which the router's
//! state implements. An upload is streamed to a temporary directory while
//! [`DigestCheck`] checks it; only a verified, fsync'd artifact is renamed
//! into place, so `<id>/` exists only when complete. A mismatch keeps
//! nothing.

use crate::{bearer, same_token, ApiError, ApiResult};
use axum::body::{Body, BodyDataStream};
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::{Stream, StreamExt};
use handover_artifacts::{
    check_stream, file_chunks, list_ids, load_id, write_checked, write_new, ArtifactDir,
    BinaryCheck, IoError, LoadError, NewDir, PlaceError, StreamError, FILE_MODE,
};
use handover_core::api::ErrorCode;
use handover_core::artifact::{
    check_id, signature_key_id, verify_manifest, ArtifactError, Manifest, PublicKey,
    ARTIFACT_BYTES_MAX, BINARY_FILE, MANIFEST_BYTES_MAX, MANIFEST_FILE, SIGNATURE_BYTES_MAX,
    SIGNATURE_FILE,
};
use std::future::Future;
use std::path::{Path as FsPath, PathBuf};

/// The request header that carries the manifest of an upload: base64 of
/// the exact `manifest.json` bytes (or, from older clients, one-line JSON).
pub const MANIFEST_HEADER: &str = "x-handover-manifest";
/// The request header that carries the signature of an upload: base64 of
/// the exact `manifest.json.minisig` bytes.
pub const SIGNATURE_HEADER: &str = "x-handover-signature";
/// Artifacts the store holds at most; an upload beyond is refused (507).
pub const ARTIFACTS_MAX: usize = 64;

/// What the router's state provides to the artifact handlers.
///
/// The controller implements it for its shared state: `artifacts` returns the
/// store, `operator_token` the configured token, and `check_node` resolves
/// the node's bearer credential (as the node API does) and refuses unknown
/// ones with 401. A node of any grant may download: staging is not a
/// parameter read.
pub trait ArtifactHost: Clone + Send + Sync + 'static {
    fn artifacts(&self) -> &ArtifactStore;

    fn operator_token(&self) -> &str;

    /// Accepts or refuses a node request by its `Authorization` header.
    fn check_node(&self, headers: &HeaderMap) -> impl Future<Output = ApiResult<()>> + Send;

    /// `Authorization: Bearer <operator token>`, compared in constant time.
    fn check_operator(&self, headers: &HeaderMap) -> ApiResult<()> {
        match bearer(headers) {
            Some(t) if same_token(t, self.operator_token()) => Ok(()),
            Some(_) => Err(ApiError::operator(
                ErrorCode::Unauthorized,
                "wrong operator token",
            )),
            None => Err(ApiError::operator(
                ErrorCode::Unauthorized,
                "missing `Authorization: Bearer <operator token>` (see --operator-token)",
            )),
        }
    }
}

/// The artifact routes, to merge into the controller's router before
/// `.with_state(..)`. The upload route lifts the body limit to
/// [`ARTIFACT_BYTES_MAX`] for itself only (the size is enforced anyway while
/// streaming: never more than the manifest's `size` is read).
pub fn routes<H: ArtifactHost>() -> Router<H> {
    Router::new()
        .route("/api/v1/artifacts", get(list::<H>))
        .route(
            "/api/v1/artifacts/{id}/signature",
            get(operator_signature::<H>),
        )
        .route(
            "/api/v1/artifacts/{sha256}",
            put(upload::<H>).layer(DefaultBodyLimit::max(
                usize::try_from(ARTIFACT_BYTES_MAX).unwrap_or(usize::MAX),
            )),
        )
        .route("/node/v1/artifacts/{id}/manifest", get(node_manifest::<H>))
        .route(
            "/node/v1/artifacts/{id}/signature",
            get(node_signature::<H>),
        )
        .route("/node/v1/artifacts/{id}/binary", get(node_binary::<H>))
}

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

impl From<ArtifactStoreError> for ApiError {
    fn from(e: ArtifactStoreError) -> ApiError {
        let answer = match &e {
            ArtifactStoreError::Artifact(a) => ApiError::artifact(a),
            ArtifactStoreError::Interrupted { .. } => {
                ApiError::operator(ErrorCode::UploadInterrupted, e.to_string())
            }
            ArtifactStoreError::Conflict { .. } => {
                ApiError::operator(ErrorCode::Exists, e.to_string())
            }
            ArtifactStoreError::Full { .. } => {
                ApiError::operator(ErrorCode::StoreFull, e.to_string())
            }
            ArtifactStoreError::Io { .. } => {
                ApiError::operator(ErrorCode::StorageError, e.to_string())
            }
        };
        if answer.status.is_server_error() {
            tracing::error!(error = %e, "artifact store error");
        }
        answer
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

impl From<Missing> for ApiError {
    fn from(m: Missing) -> ApiError {
        match &m {
            Missing::NotFound(_) => ApiError::not_found(m.to_string()),
            Missing::Unusable { .. } => ApiError::operator(ErrorCode::Unusable, m.to_string()),
            Missing::Unverified { source, .. } => ApiError::operator_with_status(
                ErrorCode::of_artifact(source),
                StatusCode::BAD_REQUEST,
                m.to_string(),
            ),
        }
    }
}

/// A stored artifact that passed every check [`ArtifactStore::find`] makes.
pub type Stored = ArtifactDir;

impl ArtifactStore {
    /// Opens (creating) the store at `dir`, usually `DATA_DIR/artifacts`, and
    /// removes what an interrupted upload left behind.
    pub fn open(dir: impl Into<PathBuf>) -> Result<ArtifactStore, ArtifactStoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|error| IoError {
            op: "create",
            path: dir.clone(),
            error,
        })?;
        for p in handover_artifacts::sweep(&dir, None)? {
            tracing::info!(path = %p.display(), "removed an interrupted artifact upload");
        }
        Ok(ArtifactStore {
            dir,
            trusted: Vec::new(),
        })
    }

    /// From now on, accept and serve only artifacts signed by one of `keys`
    /// (none: accept unsigned artifacts, as before).
    pub fn with_trusted_keys(mut self, keys: Vec<PublicKey>) -> ArtifactStore {
        self.trusted = keys;
        self
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
            Err(LoadError::BadId(_) | LoadError::Absent { .. }) => {
                Err(Missing::NotFound(id.chars().take(80).collect()))
            }
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
fn place(
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

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::operator(
            ErrorCode::StorageError,
            format!("artifact store task failed: {e}"),
        )
    })
}

fn path_param(p: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    p.map(|Path(s)| s)
        .map_err(|r| ApiError::operator(ErrorCode::Malformed, r.body_text()))
}

fn artifact_id(p: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    let id = path_param(p)?;
    check_id(&id).map_err(|e| ApiError::artifact(&e))?;
    Ok(id)
}

/// Looks an artifact up for a handler (sync IO off the async threads).
async fn lookup<H: ArtifactHost>(host: &H, id: String) -> ApiResult<Stored> {
    let h = host.clone();
    let found = blocking(move || h.artifacts().find(&id)).await?;
    found.map_err(|m| {
        if !matches!(m, Missing::NotFound(_)) {
            tracing::warn!(error = %m, "a node asked for an artifact this controller refuses to serve");
        }
        ApiError::from(m)
    })
}

/// `PUT /api/v1/artifacts/{sha256}`: the manifest in the
/// [`MANIFEST_HEADER`] header, its signature in [`SIGNATURE_HEADER`], the
/// binary as the body. 201 and the manifest when stored, 200 and the
/// stored manifest when it was already there; 400 `unsigned` /
/// `untrusted_key` / `bad_signature` before the body is read (with trusted
/// keys); 400 `digest_mismatch` / `size_mismatch` and nothing kept when the
/// bytes do not match.
pub async fn upload<H: ArtifactHost>(
    State(host): State<H>,
    sha256: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Manifest>)> {
    host.check_operator(&headers)?;
    let mut stream = body.into_data_stream();
    let answer = store_upload(&host, sha256, &headers, &mut stream).await;
    if answer.is_err() {
        // An HTTP/1 client still sending its body would see a broken pipe
        // instead of the answer: read (and drop) the rest first. Only for
        // an authenticated operator, and bounded.
        drain(&mut stream).await;
    }
    let put = answer?;
    Ok(match put {
        Put::Created(m) => (StatusCode::CREATED, Json(m)),
        Put::Existing(m) => (StatusCode::OK, Json(m)),
    })
}

/// Reads and drops what is left of a refused upload, at most
/// [`ARTIFACT_BYTES_MAX`] bytes, stopping at the first body error.
async fn drain(stream: &mut BodyDataStream) {
    let mut n: u64 = 0;
    while let Some(Ok(chunk)) = stream.next().await {
        n = n.saturating_add(chunk.len() as u64);
        if n > ARTIFACT_BYTES_MAX {
            break;
        }
    }
}

async fn store_upload<H: ArtifactHost>(
    host: &H,
    sha256: Result<Path<String>, PathRejection>,
    headers: &HeaderMap,
    stream: &mut BodyDataStream,
) -> ApiResult<Put> {
    let sha256 = path_param(sha256)?;
    let raw = headers.get(MANIFEST_HEADER).ok_or_else(|| {
        ApiError::operator(
            ErrorCode::MissingManifest,
            format!(
                "send the artifact's manifest in the `{MANIFEST_HEADER}` header \
                 (base64 of manifest.json)"
            ),
        )
    })?;
    let document = manifest_document(raw.as_bytes())?;
    let signature = headers
        .get(SIGNATURE_HEADER)
        .map(|v| signature_text(v.as_bytes()))
        .transpose()?;
    let accepted = host
        .artifacts()
        .accept(&document, signature.as_deref())
        .map_err(|e| {
            if matches!(
                e,
                ArtifactError::Unsigned
                    | ArtifactError::UntrustedKey { .. }
                    | ArtifactError::BadSignature(_)
            ) {
                tracing::warn!(error = %e, "artifact upload refused");
            }
            ApiError::artifact(&e)
        })?;
    let manifest = accepted.manifest().clone();
    if manifest.sha256 != sha256 {
        return Err(ApiError::operator(
            ErrorCode::InvalidManifest,
            format!(
                "the URL names sha256 {sha256} but the manifest says {}; \
                 upload to /api/v1/artifacts/<manifest sha256>",
                manifest.sha256
            ),
        ));
    }
    if let Some(len) = headers.get(header::CONTENT_LENGTH) {
        let len = len.to_str().ok().and_then(|s| s.parse::<u64>().ok());
        if len != Some(manifest.size) {
            let e = ArtifactError::SizeMismatch {
                expected: manifest.size,
                actual: len.unwrap_or(0),
            };
            return Err(ApiError::artifact(&e));
        }
    }
    Ok(host.artifacts().put_accepted(&accepted, stream).await?)
}

/// The manifest document of an upload from its header value: base64 of the
/// exact bytes, or (from older clients) the JSON itself when it starts
/// with `{`.
fn manifest_document(value: &[u8]) -> ApiResult<Vec<u8>> {
    if value.trim_ascii_start().starts_with(b"{") {
        return Ok(value.to_vec());
    }
    // 4 base64 characters per 3 bytes; anything longer cannot be a manifest.
    if value.len() > MANIFEST_BYTES_MAX.div_ceil(3) * 4 {
        let e = ArtifactError::ManifestTooLarge {
            size: value.len() / 4 * 3,
        };
        return Err(ApiError::artifact(&e));
    }
    base64::engine::general_purpose::STANDARD
        .decode(value.trim_ascii())
        .map_err(|e| {
            ApiError::operator(
                ErrorCode::Malformed,
                format!(
                    "the `{MANIFEST_HEADER}` header is neither base64 of manifest.json \
                     nor manifest JSON: {e}"
                ),
            )
        })
}

/// The signature of an upload from its header value: base64 of the exact
/// bytes of `manifest.json.minisig`.
fn signature_text(value: &[u8]) -> ApiResult<String> {
    let bad = |why: String| {
        let e = ArtifactError::BadSignature(format!(
            "the `{SIGNATURE_HEADER}` header must be base64 of manifest.json.minisig: {why}"
        ));
        ApiError::artifact(&e)
    };
    if value.len() > SIGNATURE_BYTES_MAX.div_ceil(3) * 4 {
        return Err(bad(format!("longer than {SIGNATURE_BYTES_MAX} bytes")));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim_ascii())
        .map_err(|e| bad(e.to_string()))?;
    String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))
}

/// `GET /api/v1/artifacts`: every stored manifest.
pub async fn list<H: ArtifactHost>(
    State(host): State<H>,
    headers: HeaderMap,
) -> ApiResult<Json<Vec<Manifest>>> {
    host.check_operator(&headers)?;
    let h = host.clone();
    Ok(Json(blocking(move || h.artifacts().list()).await??))
}

/// `GET /node/v1/artifacts/{id}/manifest`: the stored document, byte for
/// byte (what was signed), as `application/json`.
pub async fn node_manifest<H: ArtifactHost>(
    State(host): State<H>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    host.check_node(&headers).await?;
    let id = artifact_id(id)?;
    let stored = lookup(&host, id).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        stored.document,
    )
        .into_response())
}

/// `GET /node/v1/artifacts/{id}/signature`: the minisign signature of the
/// manifest, byte for byte, as `text/plain`; 404 `unsigned` when the
/// artifact was stored without one.
pub async fn node_signature<H: ArtifactHost>(
    State(host): State<H>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    host.check_node(&headers).await?;
    signature_answer(&host, id).await
}

/// `GET /api/v1/artifacts/{id}/signature`: as [`node_signature`], for the operator.
pub async fn operator_signature<H: ArtifactHost>(
    State(host): State<H>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    host.check_operator(&headers)?;
    signature_answer(&host, id).await
}

async fn signature_answer<H: ArtifactHost>(
    host: &H,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let id = artifact_id(id)?;
    let stored = lookup(host, id.clone()).await?;
    let sig = stored.signature.ok_or_else(|| {
        ApiError::operator_with_status(
            ErrorCode::Unsigned,
            StatusCode::NOT_FOUND,
            format!(
                "artifact {id} was uploaded without a signature; the operator signs it \
                 (`handover artifact sign`) and uploads it again"
            ),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], sig).into_response())
}

/// `GET /node/v1/artifacts/{id}/binary`: the binary, streamed in bounded
/// chunks, exactly `size` bytes with `Content-Length`.
pub async fn node_binary<H: ArtifactHost>(
    State(host): State<H>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    host.check_node(&headers).await?;
    let id = artifact_id(id)?;
    let Stored {
        manifest: m,
        binary: path,
        ..
    } = lookup(&host, id).await?;
    let file = tokio::fs::File::open(&path).await.map_err(|error| {
        ApiError::from(ArtifactStoreError::from(IoError {
            op: "open",
            path: path.clone(),
            error,
        }))
    })?;
    let stream = file_chunks(file, m.size);
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.size));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use handover_core::artifact::sha256_hex;
    use handover_core::Release;
    use std::os::unix::fs::PermissionsExt as _;
    use std::sync::Arc;

    const OP: &str = "operator-token-0123456789";
    const NODE: &str = "node-credential-0123456789";

    #[derive(Clone)]
    struct Host(Arc<ArtifactStore>);

    impl ArtifactHost for Host {
        fn artifacts(&self) -> &ArtifactStore {
            &self.0
        }
        fn operator_token(&self) -> &str {
            OP
        }
        async fn check_node(&self, headers: &HeaderMap) -> ApiResult<()> {
            match bearer(headers) {
                Some(t) if same_token(t, NODE) => Ok(()),
                _ => Err(ApiError::unauthorized("unknown credential")),
            }
        }
    }

    fn binary(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn manifest_of(bytes: &[u8]) -> Manifest {
        Manifest::for_release(
            &handover_core::ReleaseInfo::of(Release(2)).unwrap().facts(),
            handover_core::release::CONTRACTS,
            sha256_hex(bytes),
            bytes.len() as u64,
            1_000,
        )
        .unwrap()
    }

    fn chunks(bytes: &[u8], n: usize) -> impl Stream<Item = Result<Vec<u8>, String>> + Unpin {
        let v: Vec<Result<Vec<u8>, String>> = bytes.chunks(n).map(|c| Ok(c.to_vec())).collect();
        futures_util::stream::iter(v)
    }

    fn entries(dir: &FsPath) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn store_put_get_list_and_idempotence() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(tmp.path().join("artifacts")).unwrap();
        let bytes = binary(100_000);
        let m = manifest_of(&bytes);
        let put = store.put_stream(&m, chunks(&bytes, 4096)).await.unwrap();
        assert_eq!(put, Put::Created(m.clone()));
        let (got, path) = store.get(&m.id()).unwrap();
        assert_eq!(got, m);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(store.list().unwrap(), vec![m.clone()]);
        // Same artifact again (a later created_ms): the stored one stays.
        let mut again = m.clone();
        again.created_ms += 5;
        let put = store.put_stream(&again, chunks(&bytes, 999)).await.unwrap();
        assert_eq!(put, Put::Existing(m.clone()));
        assert_eq!(entries(store.dir()), vec![m.id()]);
        assert!(store.get("r2-000000000000").is_none());
        assert!(store.get("../etc").is_none());
    }

    #[tokio::test]
    async fn store_keeps_nothing_on_a_mismatch() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(tmp.path()).unwrap();
        let bytes = binary(10_000);
        let m = manifest_of(&bytes);
        let mut bad = bytes.clone();
        bad[1234] ^= 0x80;
        let err = store.put_stream(&m, chunks(&bad, 1000)).await.unwrap_err();
        assert!(
            matches!(
                err,
                ArtifactStoreError::Artifact(ArtifactError::DigestMismatch { .. })
            ),
            "{err}"
        );
        let mut long = bytes.clone();
        long.push(0);
        let err = store.put_stream(&m, chunks(&long, 1000)).await.unwrap_err();
        assert!(
            matches!(
                err,
                ArtifactStoreError::Artifact(ArtifactError::SizeMismatch { .. })
            ),
            "{err}"
        );
        let err = store
            .put_stream(&m, chunks(&bytes[..9_999], 1000))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                ArtifactStoreError::Artifact(ArtifactError::SizeMismatch { .. })
            ),
            "{err}"
        );
        let cut =
            futures_util::stream::iter(vec![Ok(bytes[..10].to_vec()), Err("reset".to_owned())]);
        let err = store.put_stream(&m, cut).await.unwrap_err();
        assert!(
            matches!(err, ArtifactStoreError::Interrupted { received: 10, .. }),
            "{err}"
        );
        assert!(
            entries(store.dir()).is_empty(),
            "{:?}",
            entries(store.dir())
        );
        assert!(store.list().unwrap().is_empty());
        // A mismatching re-upload of a stored artifact changes nothing either.
        store.put_stream(&m, chunks(&bytes, 1000)).await.unwrap();
        let err = store.put_stream(&m, chunks(&bad, 1000)).await.unwrap_err();
        assert!(
            matches!(
                err,
                ArtifactStoreError::Artifact(ArtifactError::DigestMismatch { .. })
            ),
            "{err}"
        );
        assert_eq!(std::fs::read(store.get(&m.id()).unwrap().1).unwrap(), bytes);
    }

    #[tokio::test]
    async fn store_refuses_an_id_collision_and_cleans_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ArtifactStore::open(tmp.path()).unwrap();
        let bytes = binary(64);
        let m = manifest_of(&bytes);
        store.put_stream(&m, chunks(&bytes, 10)).await.unwrap();
        let mut other = m.clone();
        let flipped = if other.sha256.ends_with('0') {
            "1"
        } else {
            "0"
        };
        other.sha256.replace_range(63..64, flipped);
        assert_eq!(other.id(), m.id());
        let err = store
            .put_stream(&other, chunks(&bytes, 10))
            .await
            .unwrap_err();
        assert!(matches!(err, ArtifactStoreError::Conflict { .. }), "{err}");
        assert_eq!(ApiError::from(err).status, StatusCode::CONFLICT);

        std::fs::create_dir(store.dir().join(".tmp-r2-abc-1")).unwrap();
        std::fs::write(store.dir().join(".tmp-r2-abc-1/handover"), b"x").unwrap();
        let store = ArtifactStore::open(tmp.path()).unwrap();
        assert_eq!(entries(store.dir()), vec![m.id()]);
        // A torn artifact (binary of the wrong size) is not listed.
        std::fs::write(store.dir().join(m.id()).join(BINARY_FILE), b"short").unwrap();
        assert!(store.list().unwrap().is_empty());
        assert!(store.get(&m.id()).is_none());
    }

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

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    async fn serve(store: ArtifactStore) -> String {
        // As the controller mounts it: merged under a router whose default
        // body limit is small.
        let app = Router::new()
            .merge(routes::<Host>())
            .layer(DefaultBodyLimit::max(1 << 20))
            .with_state(Host(Arc::new(store)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    async fn error_of(resp: reqwest::Response) -> (u16, String, String) {
        let status = resp.status().as_u16();
        let v: serde_json::Value = resp.json().await.unwrap();
        (
            status,
            v["error"].as_str().unwrap().to_owned(),
            v["message"].as_str().unwrap().to_owned(),
        )
    }

    #[tokio::test]
    async fn http_upload_list_and_download() {
        let tmp = tempfile::tempdir().unwrap();
        let base = serve(ArtifactStore::open(tmp.path()).unwrap()).await;
        let http = reqwest::Client::new();
        let bytes = binary(3 << 20); // above the router's 1 MiB default
        let m = manifest_of(&bytes);
        let header = serde_json::to_string(&m).unwrap();
        let url = format!("{base}/api/v1/artifacts/{}", m.sha256);

        let resp = http
            .put(&url)
            .header(MANIFEST_HEADER, &header)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(resp).await.0, 401);
        let resp = http
            .put(&url)
            .bearer_auth(OP)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(resp).await.1, "missing_manifest");
        let resp = http
            .put(&url)
            .bearer_auth(OP)
            .header(MANIFEST_HEADER, header.replace("\"v\":2", "\"v\":3"))
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(resp).await.1, "unsupported_version");
        let resp = http
            .put(format!("{base}/api/v1/artifacts/{}", "0".repeat(64)))
            .bearer_auth(OP)
            .header(MANIFEST_HEADER, &header)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(resp).await.1, "invalid_manifest");

        let mut bad = bytes.clone();
        bad[2 << 20] ^= 1;
        let resp = http
            .put(&url)
            .bearer_auth(OP)
            .header(MANIFEST_HEADER, &header)
            .body(bad)
            .send()
            .await
            .unwrap();
        let (status, code, message) = error_of(resp).await;
        assert_eq!(
            (status, code.as_str()),
            (400, "digest_mismatch"),
            "{message}"
        );
        assert!(entries(tmp.path()).is_empty());

        let resp = http
            .put(&url)
            .bearer_auth(OP)
            .header(MANIFEST_HEADER, &header)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
        assert_eq!(resp.json::<Manifest>().await.unwrap(), m);
        let resp = http
            .put(&url)
            .bearer_auth(OP)
            .header(MANIFEST_HEADER, &header)
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.json::<Manifest>().await.unwrap(), m);

        let resp = http
            .get(format!("{base}/api/v1/artifacts"))
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(resp).await.0, 401);
        let listed: Vec<Manifest> = http
            .get(format!("{base}/api/v1/artifacts"))
            .bearer_auth(OP)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(listed, vec![m.clone()]);

        let murl = format!("{base}/node/v1/artifacts/{}/manifest", m.id());
        let burl = format!("{base}/node/v1/artifacts/{}/binary", m.id());
        assert_eq!(error_of(http.get(&murl).send().await.unwrap()).await.0, 401);
        assert_eq!(
            error_of(http.get(&burl).bearer_auth(OP).send().await.unwrap())
                .await
                .0,
            401
        );
        let got: Manifest = http
            .get(&murl)
            .bearer_auth(NODE)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(got, m);
        let resp = http.get(&burl).bearer_auth(NODE).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert_eq!(resp.content_length(), Some(m.size));
        assert_eq!(resp.bytes().await.unwrap().as_ref(), bytes.as_slice());

        let resp = http
            .get(format!("{base}/node/v1/artifacts/r2-000000000000/binary"))
            .bearer_auth(NODE)
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(resp).await.1, "not_found");
        let resp = http
            .get(format!("{base}/node/v1/artifacts/..%2F..%2Fetc/binary"))
            .bearer_auth(NODE)
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(resp).await.1, "invalid_id");
    }

    /// One upload over HTTP: the manifest document and signature as the CLI
    /// sends them (base64 headers).
    async fn put(
        http: &reqwest::Client,
        base: &str,
        doc: &[u8],
        sig: Option<&str>,
        body: &[u8],
    ) -> reqwest::Response {
        let m = Manifest::decode(doc)
            .or_else(|_| serde_json::from_slice::<Manifest>(doc))
            .unwrap();
        let mut req = http
            .put(format!("{base}/api/v1/artifacts/{}", m.sha256))
            .bearer_auth(OP)
            .header(MANIFEST_HEADER, b64(doc))
            .body(body.to_vec());
        if let Some(sig) = sig {
            req = req.header(SIGNATURE_HEADER, b64(sig.as_bytes()));
        }
        req.send().await.unwrap()
    }

    #[tokio::test]
    async fn with_trusted_keys_only_signed_uploads_are_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let (kp_a, key_a) = keypair();
        let (kp_b, _) = keypair();
        let store = ArtifactStore::open(tmp.path())
            .unwrap()
            .with_trusted_keys(vec![key_a.clone()]);
        let base = serve(store).await;
        let http = reqwest::Client::new();
        let bytes = binary(200_000);
        let m = manifest_of(&bytes);
        let doc = m.to_pretty_json().into_bytes();
        let good_sig = sign(&kp_a, &doc);

        // (case, manifest document, signature, body, expected code)
        type Case = (&'static str, Vec<u8>, Option<String>, Vec<u8>, &'static str);
        let refusals: Vec<Case> = vec![
            ("unsigned", doc.clone(), None, bytes.clone(), "unsigned"),
            (
                "other key",
                doc.clone(),
                Some(sign(&kp_b, &doc)),
                bytes.clone(),
                "untrusted_key",
            ),
            (
                "manifest edited after signing",
                {
                    let mut edited = m.clone();
                    edited.created_ms += 1;
                    edited.to_pretty_json().into_bytes()
                },
                Some(good_sig.clone()),
                bytes.clone(),
                "bad_signature",
            ),
            (
                "binary edited after signing",
                doc.clone(),
                Some(good_sig.clone()),
                {
                    let mut b = bytes.clone();
                    b[100] ^= 1;
                    b
                },
                "digest_mismatch",
            ),
            (
                "not a signature",
                doc.clone(),
                Some("hello".into()),
                bytes.clone(),
                "bad_signature",
            ),
        ];
        for (name, doc, sig, body, want) in refusals {
            let resp = put(&http, &base, &doc, sig.as_deref(), &body).await;
            let (status, code, message) = error_of(resp).await;
            assert_eq!((status, code.as_str()), (400, want), "{name}: {message}");
            assert!(entries(tmp.path()).is_empty(), "{name}: something was kept");
        }
        // The legacy one-line JSON header is unsigned, so refused too.
        let resp = http
            .put(format!("{base}/api/v1/artifacts/{}", m.sha256))
            .bearer_auth(OP)
            .header(MANIFEST_HEADER, serde_json::to_string(&m).unwrap())
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(resp).await.1, "unsigned");
        // A signature header that is not base64.
        let resp = http
            .put(format!("{base}/api/v1/artifacts/{}", m.sha256))
            .bearer_auth(OP)
            .header(MANIFEST_HEADER, b64(&doc))
            .header(SIGNATURE_HEADER, "!!!")
            .body(bytes.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(error_of(resp).await.1, "bad_signature");

        let resp = put(&http, &base, &doc, Some(&good_sig), &bytes).await;
        assert_eq!(resp.status().as_u16(), 201);
        assert_eq!(resp.json::<Manifest>().await.unwrap(), m);
        let dir = tmp.path().join(m.id());
        assert_eq!(std::fs::read(dir.join(MANIFEST_FILE)).unwrap(), doc);
        assert_eq!(
            std::fs::read_to_string(dir.join(SIGNATURE_FILE)).unwrap(),
            good_sig
        );

        // Nodes get the exact bytes that were signed, and the signature.
        let murl = format!("{base}/node/v1/artifacts/{}/manifest", m.id());
        let surl = format!("{base}/node/v1/artifacts/{}/signature", m.id());
        let got_doc = http.get(&murl).bearer_auth(NODE).send().await.unwrap();
        assert_eq!(got_doc.status().as_u16(), 200);
        let got_doc = got_doc.bytes().await.unwrap();
        assert_eq!(got_doc.as_ref(), doc.as_slice());
        let got_sig = http
            .get(&surl)
            .bearer_auth(NODE)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(got_sig, good_sig);
        assert_eq!(
            verify_manifest(&got_doc, Some(&got_sig), &[key_a]),
            Ok(m.clone())
        );
        assert_eq!(error_of(http.get(&surl).send().await.unwrap()).await.0, 401);
    }

    #[tokio::test]
    async fn with_trusted_keys_an_unsigned_stored_artifact_is_not_served_until_signed() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = binary(5_000);
        let m = manifest_of(&bytes);
        // Stored while no key was trusted.
        let open = ArtifactStore::open(tmp.path()).unwrap();
        open.put_stream(&m, chunks(&bytes, 1000)).await.unwrap();
        assert!(open.get(&m.id()).is_some());

        let (kp, key) = keypair();
        let store = ArtifactStore::open(tmp.path())
            .unwrap()
            .with_trusted_keys(vec![key]);
        match store.find(&m.id()) {
            Err(Missing::Unverified { source, .. }) => assert_eq!(source, ArtifactError::Unsigned),
            other => panic!("expected unverified, got {other:?}"),
        }
        assert!(store.get(&m.id()).is_none());
        assert!(store.list().unwrap().is_empty());
        let api = ApiError::from(store.find(&m.id()).unwrap_err());
        assert_eq!(
            (api.status, api.code),
            (StatusCode::BAD_REQUEST, "unsigned")
        );
        let err = store
            .put_stream(&m, chunks(&bytes, 1000))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ArtifactStoreError::Artifact(ArtifactError::Unsigned)),
            "{err}"
        );

        // Uploading it signed replaces the unsigned copy.
        let doc = m.to_pretty_json().into_bytes();
        let sig = sign(&kp, &doc);
        let accepted = store.accept(&doc, Some(&sig)).unwrap();
        let put = store
            .put_accepted(&accepted, chunks(&bytes, 1000))
            .await
            .unwrap();
        assert_eq!(put, Put::Created(m.clone()));
        let stored = store.find(&m.id()).unwrap();
        assert_eq!(stored.signature.as_deref(), Some(sig.as_str()));
        assert_eq!(std::fs::read(&stored.binary).unwrap(), bytes);
        assert_eq!(entries(store.dir()), vec![m.id()]);
        // Again: already there.
        let put = store
            .put_accepted(&accepted, chunks(&bytes, 1000))
            .await
            .unwrap();
        assert_eq!(put, Put::Existing(m.clone()));
    }

    #[tokio::test]
    async fn without_trusted_keys_unsigned_is_served_and_a_signature_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let base = serve(ArtifactStore::open(tmp.path()).unwrap()).await;
        let http = reqwest::Client::new();
        let bytes = binary(4_000);
        let m = manifest_of(&bytes);
        let doc = m.to_pretty_json().into_bytes();
        let resp = put(&http, &base, &doc, None, &bytes).await;
        assert_eq!(resp.status().as_u16(), 201);
        let surl = format!("{base}/node/v1/artifacts/{}/signature", m.id());
        let (status, code, _) =
            error_of(http.get(&surl).bearer_auth(NODE).send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (404, "unsigned"));
        // A malformed signature is refused even here: nodes may check it.
        let resp = put(&http, &base, &doc, Some("not a signature"), &bytes).await;
        assert_eq!(error_of(resp).await.1, "bad_signature");
        // A signed upload of the same artifact adds the signature.
        let (kp, key) = keypair();
        let sig = sign(&kp, &doc);
        let resp = put(&http, &base, &doc, Some(&sig), &bytes).await;
        assert_eq!(resp.status().as_u16(), 201);
        let got = http
            .get(&surl)
            .bearer_auth(NODE)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(verify_manifest(&doc, Some(&got), &[key]), Ok(m.clone()));
        let resp = put(&http, &base, &doc, Some(&sig), &bytes).await;
        assert_eq!(resp.status().as_u16(), 200);
    }
}
