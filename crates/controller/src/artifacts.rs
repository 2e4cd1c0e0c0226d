//! Upgrade artifacts on the controller: an [`ArtifactStore`] over
//! `DATA_DIR/artifacts/<id>/{manifest.json,handover}`, the operator's upload
//! and listing, and the nodes' download.
//!
//! Routes ([`routes`]):
//!
//! | method | path | who | what |
//! | --- | --- | --- | --- |
//! | `PUT` | `/api/v1/artifacts/{sha256}` | operator | upload: header [`MANIFEST_HEADER`] = the manifest JSON, body = the raw binary; 201 + manifest when stored, 200 + the stored manifest when already present |
//! | `GET` | `/api/v1/artifacts` | operator | every stored manifest |
//! | `GET` | `/node/v1/artifacts/{id}/manifest` | node | one manifest |
//! | `GET` | `/node/v1/artifacts/{id}/binary` | node | the binary, streamed, with `Content-Length` |
//!
//! Authentication plugs in through [`ArtifactHost`], which the router's
//! state implements. An upload is streamed to a temporary directory while
//! [`DigestCheck`] checks it; only a verified, fsync'd artifact is renamed
//! into place, so `<id>/` exists only when complete. A mismatch keeps
//! nothing.

use crate::{bearer, same_token, ApiError, ApiResult};
use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use futures_util::{Stream, StreamExt};
use handover_core::artifact::{
    check_id, ArtifactError, DigestCheck, Manifest, ARTIFACT_BYTES_MAX, BINARY_FILE,
    MANIFEST_BYTES_MAX, MANIFEST_FILE,
};
use std::future::Future;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path as FsPath, PathBuf};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The request header that carries the manifest JSON of an upload.
pub const MANIFEST_HEADER: &str = "x-handover-manifest";
/// Artifacts the store holds at most; an upload beyond is refused (507).
pub const ARTIFACTS_MAX: usize = 64;
/// Write buffer of an upload, and read chunk of a download.
const IO_CHUNK_BYTES: usize = 256 << 10;
/// Temporary upload directories start with this (never a valid id).
const TMP_PREFIX: &str = ".tmp-";

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
            Some(_) => Err(ApiError::unauthorized("wrong operator token")),
            None => Err(ApiError::unauthorized(
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
            "/api/v1/artifacts/{sha256}",
            put(upload::<H>).layer(DefaultBodyLimit::max(
                usize::try_from(ARTIFACT_BYTES_MAX).unwrap_or(usize::MAX),
            )),
        )
        .route("/node/v1/artifacts/{id}/manifest", get(node_manifest::<H>))
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

fn io_err(op: &'static str, path: &FsPath) -> impl FnOnce(std::io::Error) -> ArtifactStoreError {
    let path = path.display().to_string();
    move |source| ArtifactStoreError::Io { op, path, source }
}

impl From<ArtifactStoreError> for ApiError {
    fn from(e: ArtifactStoreError) -> ApiError {
        let (status, code) = match &e {
            ArtifactStoreError::Artifact(a) => (StatusCode::BAD_REQUEST, a.code()),
            ArtifactStoreError::Interrupted { .. } => {
                (StatusCode::BAD_REQUEST, "upload_interrupted")
            }
            ArtifactStoreError::Conflict { .. } => (StatusCode::CONFLICT, "exists"),
            ArtifactStoreError::Full { .. } => (StatusCode::INSUFFICIENT_STORAGE, "store_full"),
            ArtifactStoreError::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error"),
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "artifact store error");
        }
        ApiError::new(status, code, e.to_string())
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

/// Artifacts as directories `<dir>/<id>/{manifest.json,handover}`.
#[derive(Debug)]
pub struct ArtifactStore {
    dir: PathBuf,
}

/// Removes a temporary upload directory unless disarmed, also when the
/// upload future is dropped (client gone).
struct TmpDir(Option<PathBuf>);

impl Drop for TmpDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(&p);
        }
    }
}

fn fsync_dir(dir: &FsPath) -> Result<(), ArtifactStoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Reads `<dir>/manifest.json` (bounded) and validates it.
fn read_manifest(dir: &FsPath) -> Result<Manifest, String> {
    let path = dir.join(MANIFEST_FILE);
    let mut f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(&mut f, MANIFEST_BYTES_MAX as u64 + 1),
        &mut buf,
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    Manifest::decode(&buf).map_err(|e| format!("{}: {e}", path.display()))
}

impl ArtifactStore {
    /// Opens (creating) the store at `dir`, usually `DATA_DIR/artifacts`, and
    /// removes what an interrupted upload left behind.
    pub fn open(dir: impl Into<PathBuf>) -> Result<ArtifactStore, ArtifactStoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        for entry in std::fs::read_dir(&dir).map_err(io_err("list", &dir))? {
            let entry = entry.map_err(io_err("list", &dir))?;
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                let p = entry.path();
                tracing::info!(path = %p.display(), "removing an interrupted artifact upload");
                std::fs::remove_dir_all(&p).map_err(io_err("remove", &p))?;
            }
        }
        Ok(ArtifactStore { dir })
    }

    pub fn dir(&self) -> &FsPath {
        &self.dir
    }

    /// The manifest and binary path of artifact `id`, if it is stored and
    /// whole (valid manifest named by its directory, binary of the right
    /// size). The digest was checked when it was stored; receivers check it
    /// again.
    pub fn get(&self, id: &str) -> Option<(Manifest, PathBuf)> {
        check_id(id).ok()?;
        let dir = self.dir.join(id);
        if !dir.is_dir() {
            return None;
        }
        let m = match read_manifest(&dir) {
            Ok(m) if m.id() == id => m,
            Ok(m) => {
                tracing::warn!(
                    id,
                    manifest_id = m.id(),
                    "artifact directory holds another artifact's manifest; ignored"
                );
                return None;
            }
            Err(e) => {
                tracing::warn!(id, error = e, "unreadable artifact; ignored");
                return None;
            }
        };
        let bin = dir.join(BINARY_FILE);
        match std::fs::metadata(&bin) {
            Ok(md) if md.is_file() && md.len() == m.size => Some((m, bin)),
            Ok(md) => {
                tracing::warn!(
                    id,
                    size = md.len(),
                    expected = m.size,
                    "artifact binary has the wrong size; ignored"
                );
                None
            }
            Err(e) => {
                tracing::warn!(id, error = %e, "artifact binary missing; ignored");
                None
            }
        }
    }

    fn ids(&self) -> Result<Vec<String>, ArtifactStoreError> {
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            if let Ok(name) = entry.file_name().into_string() {
                if check_id(&name).is_ok() {
                    ids.push(name);
                }
            }
        }
        Ok(ids)
    }

    /// Every whole artifact, oldest release first (at most [`ARTIFACTS_MAX`]).
    pub fn list(&self) -> Result<Vec<Manifest>, ArtifactStoreError> {
        let mut all: Vec<Manifest> = self
            .ids()?
            .iter()
            .filter_map(|id| self.get(id).map(|(m, _)| m))
            .collect();
        all.sort_by_key(|m| (m.release, m.created_ms, m.id()));
        all.truncate(ARTIFACTS_MAX);
        Ok(all)
    }

    /// Stores the binary that `body` streams, checking it against `manifest`
    /// on the way. Only a verified binary is kept; on any error (mismatch,
    /// body cut off, disk) nothing is. Already stored with the same digest:
    /// the body is still checked, then [`Put::Existing`].
    pub async fn put_stream<St, B, E>(
        &self,
        manifest: &Manifest,
        mut body: St,
    ) -> Result<Put, ArtifactStoreError>
    where
        St: Stream<Item = Result<B, E>> + Unpin,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        manifest.validate()?;
        let id = manifest.id();
        let mut check = DigestCheck::new(manifest);
        let existing = self.get(&id);
        if let Some((m, _)) = &existing {
            if m.sha256 != manifest.sha256 {
                return Err(ArtifactStoreError::Conflict {
                    id,
                    existing: m.sha256.clone(),
                    uploaded: manifest.sha256.clone(),
                });
            }
            // Same artifact: read and check the upload, keep the stored one.
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ArtifactStoreError::Interrupted {
                    received: check.received(),
                    reason: e.to_string(),
                })?;
                check.update(chunk.as_ref())?;
            }
            check.finish()?;
            return Ok(Put::Existing(m.clone()));
        }
        if self.ids()?.len() >= ARTIFACTS_MAX {
            return Err(ArtifactStoreError::Full {
                dir: self.dir.display().to_string(),
            });
        }

        let tmp_path = self
            .dir
            .join(format!("{TMP_PREFIX}{id}-{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&tmp_path).map_err(io_err("create", &tmp_path))?;
        let tmp = TmpDir(Some(tmp_path.clone()));
        let bin_path = tmp_path.join(BINARY_FILE);
        let file = tokio::fs::File::create(&bin_path)
            .await
            .map_err(io_err("create", &bin_path))?;
        let mut out = tokio::io::BufWriter::with_capacity(IO_CHUNK_BYTES, file);
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ArtifactStoreError::Interrupted {
                received: check.received(),
                reason: e.to_string(),
            })?;
            check.update(chunk.as_ref())?;
            out.write_all(chunk.as_ref())
                .await
                .map_err(io_err("write", &bin_path))?;
        }
        check.finish()?;
        out.flush().await.map_err(io_err("write", &bin_path))?;
        let file = out.into_inner();
        file.set_permissions(std::fs::Permissions::from_mode(0o755))
            .await
            .map_err(io_err("chmod", &bin_path))?;
        file.sync_all().await.map_err(io_err("fsync", &bin_path))?;
        drop(file);

        let dir = self.dir.clone();
        let manifest = manifest.clone();
        let join = tokio::task::spawn_blocking(move || {
            let placed = place(&dir, &tmp_path, &manifest);
            drop(tmp);
            placed
        })
        .await;
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

/// Writes the manifest next to the verified binary in `tmp`, fsyncs, and
/// renames `tmp` to `<dir>/<id>`. A concurrent upload of the same artifact
/// that won the rename makes this one [`Put::Existing`].
fn place(dir: &FsPath, tmp: &FsPath, manifest: &Manifest) -> Result<Put, ArtifactStoreError> {
    let mpath = tmp.join(MANIFEST_FILE);
    let mut f = std::fs::File::create(&mpath).map_err(io_err("create", &mpath))?;
    f.write_all(manifest.to_pretty_json().as_bytes())
        .map_err(io_err("write", &mpath))?;
    f.sync_all().map_err(io_err("fsync", &mpath))?;
    drop(f);
    fsync_dir(tmp)?;
    let id = manifest.id();
    let target = dir.join(&id);
    match std::fs::rename(tmp, &target) {
        Ok(()) => {
            fsync_dir(dir)?;
            tracing::info!(
                id,
                release = manifest.release.0,
                size = manifest.size,
                "artifact stored"
            );
            Ok(Put::Created(manifest.clone()))
        }
        Err(e) if target.is_dir() => {
            let m = read_manifest(&target).map_err(|reason| ArtifactStoreError::Io {
                op: "read",
                path: target.display().to_string(),
                source: std::io::Error::other(reason),
            })?;
            if m.sha256 == manifest.sha256 {
                Ok(Put::Existing(m))
            } else {
                tracing::warn!(error = %e, "artifact id taken while uploading");
                Err(ArtifactStoreError::Conflict {
                    id,
                    existing: m.sha256,
                    uploaded: manifest.sha256.clone(),
                })
            }
        }
        Err(e) => Err(io_err("rename into", &target)(e)),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "storage_error",
            format!("artifact store task failed: {e}"),
        )
    })
}

fn path_param(p: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    p.map(|Path(s)| s)
        .map_err(|r| ApiError::new(StatusCode::BAD_REQUEST, "malformed", r.body_text()))
}

fn artifact_id(p: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    let id = path_param(p)?;
    check_id(&id).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    Ok(id)
}

/// Looks an artifact up for a handler (sync IO off the async threads).
async fn lookup<H: ArtifactHost>(host: &H, id: String) -> ApiResult<(Manifest, PathBuf)> {
    let h = host.clone();
    let found = blocking(move || h.artifacts().get(&id).ok_or(id)).await?;
    found.map_err(|id| {
        ApiError::not_found(format!(
            "no artifact {id} on this controller; the operator uploads it with `handover artifact upload`"
        ))
    })
}

/// `PUT /api/v1/artifacts/{sha256}`: the manifest in the
/// `x-handover-manifest` header (compact JSON), the binary as the body.
/// 201 and the manifest when stored, 200 and the stored manifest when it
/// was already there; 400 `digest_mismatch` / `size_mismatch` and nothing
/// kept when the bytes do not match.
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
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "missing_manifest",
            format!("send the artifact's manifest JSON in the `{MANIFEST_HEADER}` header"),
        )
    })?;
    let manifest = Manifest::decode(raw.as_bytes())
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.code(), e.to_string()))?;
    if manifest.sha256 != sha256 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_manifest",
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
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                e.code(),
                e.to_string(),
            ));
        }
    }
    Ok(host.artifacts().put_stream(&manifest, stream).await?)
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

/// `GET /node/v1/artifacts/{id}/manifest`.
pub async fn node_manifest<H: ArtifactHost>(
    State(host): State<H>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> ApiResult<Json<Manifest>> {
    host.check_node(&headers).await?;
    let id = artifact_id(id)?;
    Ok(Json(lookup(&host, id).await?.0))
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
    let (m, path) = lookup(&host, id).await?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::from(io_err("open", &path)(e)))?;
    let reader = file.take(m.size);
    let stream = futures_util::stream::unfold(reader, |mut r| async move {
        let mut buf = vec![0u8; IO_CHUNK_BYTES];
        match r.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), r))
            }
            Err(e) => Some((Err(e), r)),
        }
    });
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
        Manifest::for_release(Release(2), sha256_hex(bytes), bytes.len() as u64, 1_000).unwrap()
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
            .header(MANIFEST_HEADER, header.replace("\"v\":1", "\"v\":3"))
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
}
