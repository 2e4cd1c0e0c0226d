//! Upgrade artifacts on the controller: an [`ArtifactStore`] over
//! `DATA_DIR/artifacts/<id>/{manifest.json,manifest.json.minisig,handover}`,
//! the operator's upload and listing, and the nodes' download.
//!
//! Routes ([`routes`]):
//!
//! | method | path | who | what |
//! | --- | --- | --- | --- |
//! | `PUT` | `/api/v1/artifacts/{sha256}` | operator token | upload: header [`MANIFEST_HEADER`] = the manifest, header [`SIGNATURE_HEADER`] = its signature (optional), body = the raw binary; 201 + manifest when stored, 200 + the stored manifest when already present |
//! | `GET` | `/api/v1/artifacts` | operator or read-only token | every usable stored manifest |
//! | `GET` | `/api/v1/artifacts/{id}/signature` | operator or read-only token | its stored signature, as for nodes (the CLI skips re-sending an artifact stored with the same signature) |
//! | `GET` | `/node/v1/artifacts/{id}/manifest` | node | one manifest: the exact bytes that were signed |
//! | `GET` | `/node/v1/artifacts/{id}/signature` | node | its minisign signature (`text/plain`); 404 `unsigned` when it has none |
//! | `GET` | `/node/v1/artifacts/{id}/binary` | node | the binary, streamed, with `Content-Length`; zstd-compressed (`Content-Encoding: zstd`) when the node accepts it; 503 `busy` with `Retry-After` while [`ARTIFACT_DOWNLOADS_MAX`] are in flight |
//! | `GET` | `/node/v1/artifacts/{id}/sources` | node | [`ArtifactSources`]: other nodes that staged it and serve its binary (see [`sources`]) |
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
//! Authentication: the operator's routes are checked by the
//! [`crate::auth::guard`] layer the router is built with (it runs before
//! any handler here, so an upload's body is not read for a refused token);
//! the nodes' routes by [`ArtifactHost::check_node`]. An upload is streamed to a temporary directory while
//! [`DigestCheck`] checks it; only a verified, fsync'd artifact is renamed
//! into place, so `<id>/` exists only when complete. A mismatch keeps
//! nothing. Once stored, a zstd copy of the binary ([`compressed_path`])
//! is made for the nodes' downloads: what a node checks and runs is still
//! the binary the manifest names, decompressed as it arrives.

use crate::node_api::NodeProof;
use crate::{ApiError, ApiResult};
use axum::body::{Body, BodyDataStream};
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::StreamExt;
use handover_artifacts::{file_chunks, IoError};
use handover_core::api::ErrorCode;
use handover_core::artifact::{
    check_id, ArtifactError, Manifest, ARTIFACT_BYTES_MAX, MANIFEST_BYTES_MAX, SIGNATURE_BYTES_MAX,
};
use handover_core::wire::{limits::ARTIFACT_SOURCES_MAX, ArtifactSources, MESSAGE_VERSION};
use handover_store::NodeRow;
use std::future::Future;

pub mod sources;
mod store;

pub use sources::{
    Serving, ARTIFACT_DOWNLOADS_MAX, BUSY_RETRY_AFTER_S, SLOT_HOLD_MAX_MS, SOURCES_REFRESH_MS,
};
pub use store::{Accepted, ArtifactStore, ArtifactStoreError, Missing, Put, Stored, ARTIFACTS_MAX};

/// The zstd level of the copy served to nodes: a release binary shrinks to
/// about a third (a stripped one; a tenth with debug info), in about a
/// second per 100 MB, once per upload.
pub const ZSTD_LEVEL: i32 = 3;

/// Where the zstd copy of a stored `binary` lives.
pub fn compressed_path(binary: &std::path::Path) -> std::path::PathBuf {
    let mut name = binary.file_name().unwrap_or_default().to_owned();
    name.push(".zst");
    binary.with_file_name(name)
}

/// Writes the zstd copy of `binary` (to a temporary name, fsync'd, then
/// renamed), unless it is there already.
fn compress_binary(binary: &std::path::Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let out = compressed_path(binary);
    if out.exists() {
        return Ok(());
    }
    let tmp = out.with_extension("zst.tmp");
    let mut input = std::fs::File::open(binary)?;
    let mut file = std::fs::File::create(&tmp)?;
    let mut encoder = zstd::stream::Encoder::new(&mut file, ZSTD_LEVEL)?;
    std::io::copy(&mut input, &mut encoder)?;
    encoder.finish()?;
    file.flush()?;
    file.sync_all()?;
    std::fs::rename(&tmp, &out)
}

/// The request header that carries the manifest of an upload: base64 of
/// the exact `manifest.json` bytes (or, from older clients, one-line JSON).
pub const MANIFEST_HEADER: &str = "x-handover-manifest";
/// The request header that carries the signature of an upload: base64 of
/// the exact `manifest.json.minisig` bytes.
pub const SIGNATURE_HEADER: &str = "x-handover-signature";

/// What the router's state provides to the artifact handlers.
///
/// The controller implements it for its shared state: `artifacts` returns the
/// store, `check_node` resolves the node's bearer credential (as the node
/// API does) and refuses unknown ones with 401, and its
/// [`OperatorAuth`](crate::auth::OperatorAuth) gives the tokens the
/// router's [`crate::auth::guard`] checks the operator's routes with. A
/// node of any grant may download: staging is not a parameter read.
pub trait ArtifactHost: crate::auth::OperatorAuth {
    fn artifacts(&self) -> &ArtifactStore;

    /// Accepts or refuses a node request by its credential (client
    /// certificate or bearer).
    fn check_node(&self, proof: &NodeProof) -> impl Future<Output = ApiResult<()>> + Send;

    /// The node registry (who staged what, and when each was last seen),
    /// for the sources of an artifact.
    fn nodes(&self) -> impl Future<Output = ApiResult<Vec<NodeRow>>> + Send;

    /// How long after it was last seen a node counts as reachable.
    fn lease_ms(&self) -> u64;
}

/// The artifact routes, to merge into the controller's router before
/// `.with_state(..)` and before [`crate::auth::guard`], which checks the
/// operator's routes (these handlers check only node credentials). The upload route lifts the body limit to
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
        .route("/node/v1/artifacts/{id}/sources", get(node_sources::<H>))
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

/// What a node asks for by id: its credential checked first, then the id,
/// then the artifact looked up.
async fn node_lookup<H: ArtifactHost>(
    host: &H,
    id: Result<Path<String>, PathRejection>,
    proof: &NodeProof,
) -> ApiResult<Stored> {
    host.check_node(proof).await?;
    lookup(host, artifact_id(id)?).await
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
    let mut stream = body.into_data_stream();
    let answer = store_upload(&host, sha256, &headers, &mut stream).await;
    if answer.is_err() {
        // An HTTP/1 client still sending its body would see a broken pipe
        // instead of the answer: read (and drop) the rest first. Only for
        // an authenticated operator, and bounded.
        drain(&mut stream).await;
    }
    let put = answer?;
    let id = match &put {
        Put::Created(m) | Put::Existing(m) => m.id(),
    };
    if let Ok(stored) = lookup(&host, id.clone()).await {
        let binary = stored.binary.clone();
        match blocking(move || compress_binary(&binary)).await {
            Ok(Ok(())) => {}
            // The nodes then download the binary as it is.
            Ok(Err(e)) => {
                tracing::warn!(artifact = %id, error = %e, "cannot compress the artifact")
            }
            Err(e) => {
                tracing::warn!(artifact = %id, error = %e.message, "cannot compress the artifact")
            }
        }
    }
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
    let put = host.artifacts().put_accepted(&accepted, stream).await?;
    if host.artifacts().trusted_keys().is_empty() {
        tracing::warn!(
            artifact = %manifest.id(),
            release = manifest.release.0,
            signed = accepted.is_signed(),
            "artifact accepted WITHOUT a signature check (--allow-unsigned-artifacts): \
             nodes will stage and run it as it is"
        );
    }
    Ok(put)
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
pub async fn list<H: ArtifactHost>(State(host): State<H>) -> ApiResult<Json<Vec<Manifest>>> {
    let h = host.clone();
    Ok(Json(blocking(move || h.artifacts().list()).await??))
}

/// `GET /node/v1/artifacts/{id}/manifest`: the stored document, byte for
/// byte (what was signed), as `application/json`.
pub async fn node_manifest<H: ArtifactHost>(
    State(host): State<H>,
    id: Result<Path<String>, PathRejection>,
    proof: NodeProof,
) -> ApiResult<Response> {
    let stored = node_lookup(&host, id, &proof).await?;
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
    proof: NodeProof,
) -> ApiResult<Response> {
    host.check_node(&proof).await?;
    signature_answer(&host, id).await
}

/// `GET /api/v1/artifacts/{id}/signature`: as [`node_signature`], for the operator.
pub async fn operator_signature<H: ArtifactHost>(
    State(host): State<H>,
    id: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
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
/// chunks, exactly `size` bytes with `Content-Length` (or the zstd copy to
/// a node that accepts it). At most [`ARTIFACT_DOWNLOADS_MAX`] at once:
/// one more is answered 503 `busy` with `Retry-After`, and the node takes
/// it from a source ([`node_sources`]) or asks again.
pub async fn node_binary<H: ArtifactHost>(
    State(host): State<H>,
    id: Result<Path<String>, PathRejection>,
    proof: NodeProof,
    headers: HeaderMap,
) -> ApiResult<Response> {
    host.check_node(&proof).await?;
    let id = artifact_id(id)?;
    let Some(slot) = host.artifacts().serving().try_download() else {
        return Ok(busy(&id));
    };
    let Stored {
        manifest: m,
        binary: path,
        ..
    } = lookup(&host, id.clone()).await?;
    let accepts_zstd = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.split(';').next().is_some_and(|e| e.trim() == "zstd"));
    if accepts_zstd {
        let zst = compressed_path(&path);
        if let Ok(file) = tokio::fs::File::open(&zst).await {
            if let Ok(meta) = file.metadata().await {
                let size = meta.len();
                let mut resp =
                    Body::from_stream(holding(&host, &id, size, slot, file_chunks(file, size)))
                        .into_response();
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
                h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
                return Ok(resp);
            }
        }
    }
    let file = tokio::fs::File::open(&path).await.map_err(|error| {
        ApiError::from(ArtifactStoreError::from(IoError {
            op: "open",
            path: path.clone(),
            error,
        }))
    })?;
    let stream = holding(&host, &m.id(), m.size, slot, file_chunks(file, m.size));
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(m.size));
    Ok(resp)
}

/// `stream` (`size` bytes of artifact `id`), holding a download slot
/// until it is dropped: at once if not every byte was sent (the
/// connection closed), else when [`Serving::served_whole`] gives it back,
/// once the node that took it (or enough others) serve the artifact, so
/// the slot does not go at once to the next node waiting (which would
/// take the binary from a source instead). A body of known length may be
/// dropped without being asked for its end, so the bytes sent decide.
fn holding<H: ArtifactHost>(
    host: &H,
    id: &str,
    size: u64,
    slot: tokio::sync::OwnedSemaphorePermit,
    stream: impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static,
) -> impl futures_util::Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    let mut held = Held {
        slot: Some(slot),
        host: host.clone(),
        id: id.to_owned(),
        unsent: size,
    };
    stream.map(move |chunk| {
        // The whole of `held` (not a copy of its count) lives in the closure.
        let held = &mut held;
        if let Ok(bytes) = &chunk {
            held.unsent = held.unsent.saturating_sub(bytes.len() as u64);
        }
        chunk
    })
}

/// A download slot and what its download has yet to send.
struct Held<H: ArtifactHost> {
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    host: H,
    id: String,
    unsent: u64,
}

impl<H: ArtifactHost> Drop for Held<H> {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else { return };
        // Outside a runtime (none drops a body there) it simply goes back.
        if self.unsent == 0 && tokio::runtime::Handle::try_current().is_ok() {
            self.host.artifacts().serving().served_whole(&self.id, slot);
        }
    }
}

/// 503 `busy` with `Retry-After`: every download slot is taken.
fn busy(id: &str) -> Response {
    let mut resp = ApiError::operator(
        ErrorCode::Busy,
        format!(
            "this controller serves {ARTIFACT_DOWNLOADS_MAX} downloads at once; take artifact \
             {id} from a node that staged it (GET /node/v1/artifacts/{id}/sources) or \
             ask again"
        ),
    )
    .into_response();
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(BUSY_RETRY_AFTER_S));
    resp
}

/// `GET /node/v1/artifacts/{id}/sources`: [`ArtifactSources`], at most
/// [`ARTIFACT_SOURCES_MAX`] base URLs of reachable nodes that staged the
/// artifact (from a registry read at most [`SOURCES_REFRESH_MS`] old),
/// each answer starting further along the list so the load spreads. An
/// id nobody staged has none (the artifact itself is not looked up: the
/// node took its manifest already).
pub async fn node_sources<H: ArtifactHost>(
    State(host): State<H>,
    id: Result<Path<String>, PathRejection>,
    proof: NodeProof,
) -> ApiResult<Json<ArtifactSources>> {
    host.check_node(&proof).await?;
    let id = artifact_id(id)?;
    let read = || async {
        let rows = host.nodes().await?;
        Ok::<_, ApiError>(sources::staged_on(
            &rows,
            &id,
            crate::now_ms(),
            host.lease_ms(),
        ))
    };
    let sources = host
        .artifacts()
        .serving()
        .sources(&id, ARTIFACT_SOURCES_MAX, read)
        .await?;
    Ok(Json(ArtifactSources {
        v: MESSAGE_VERSION,
        sources,
    }))
}

#[cfg(test)]
mod tests;
