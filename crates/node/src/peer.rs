//! Peer serving: the artifacts this node staged, served to other nodes on
//! its viewers' listener, so a fleet does not download every binary from
//! the controller.
//!
//! `GET /peer/v1/artifacts/{id}/binary` answers the binary of
//! `DATA_DIR/releases/<id>/` (a directory that appears only once its binary
//! matched the manifest's size and SHA-256; with trusted keys, served only
//! while its signature still verifies) as it is, uncompressed, streamed
//! from the open file with `Content-Length`: on a LAN bandwidth is cheap and
//! CPU is not, and the receiver hashes the bytes anyway. No secret is
//! asked: whoever may reach the viewers' port may have the binary, and a
//! receiver checks every byte against the manifest and signature it took
//! from the controller (docs/security.md). At most [`PEER_UPLOADS_MAX`]
//! at once, so viewers keep the listener; one more is answered 503 `busy`
//! and the asking node tries another source. `--no-peer-serving` leaves the
//! route out (404).

use crate::hls::{error, ErrorCode};
use crate::stage::RELEASES_DIR;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt as _;
use handover_artifacts::{file_chunks, load_id, BinaryCheck, LoadError};
use handover_core::artifact::{check_id, PublicKey};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Binaries this node serves to other nodes at once. The listener is the
/// viewers': two keep a peer's download at LAN speed while leaving the
/// CPU (two cores) and the connections to playlists and segments; a fleet
/// still multiplies its staged nodes every round (each staged node serves
/// two more).
pub const PEER_UPLOADS_MAX: usize = 2;

/// The `Retry-After` (seconds) of a `busy` answer; nodes of this build do
/// not wait for it, they try their next source.
pub const PEER_BUSY_RETRY_AFTER_S: u64 = 1;

/// What the peer route reads.
pub struct PeerState {
    pub data_dir: PathBuf,
    /// With any, only artifacts whose signature one of these verifies are
    /// served (as [`crate::stage::staged`] lists them).
    pub trusted: Vec<PublicKey>,
    uploads: Arc<Semaphore>,
}

impl PeerState {
    pub fn new(data_dir: PathBuf, trusted: Vec<PublicKey>) -> PeerState {
        PeerState {
            data_dir,
            trusted,
            uploads: Arc::new(Semaphore::new(PEER_UPLOADS_MAX)),
        }
    }
}

/// The peer route ([`crate::stage::peer_binary_path`] is where a stager
/// asks it), to merge into the node's HTTP router.
pub fn router(state: Arc<PeerState>) -> Router {
    Router::new()
        .route("/peer/v1/artifacts/{id}/binary", get(binary))
        .with_state(state)
}

async fn binary(
    State(state): State<Arc<PeerState>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let Ok(Path(id)) = id else {
        return error(ErrorCode::InvalidId, "not an artifact id");
    };
    if let Err(e) = check_id(&id) {
        return error(ErrorCode::InvalidId, e.to_string());
    }
    let Ok(slot) = state.uploads.clone().try_acquire_owned() else {
        let mut resp = error(
            ErrorCode::Busy,
            format!("serving {PEER_UPLOADS_MAX} artifact downloads already; try another source"),
        );
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(PEER_BUSY_RETRY_AFTER_S),
        );
        return resp;
    };
    let releases = state.data_dir.join(RELEASES_DIR);
    let (trusted, key) = (state.trusted.clone(), id.clone());
    // The manifest read (and its signature checked) and the binary opened
    // together, so a staged copy pruned meanwhile is either served whole
    // from its open file or not at all.
    let opened = tokio::task::spawn_blocking(move || {
        let found = match load_id(&releases, &key, &trusted, BinaryCheck::Size) {
            Ok(found) => found,
            Err(LoadError::Absent { .. }) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        };
        let file = std::fs::File::open(&found.binary)
            .map_err(|e| format!("cannot open {}: {e}", found.binary.display()))?;
        Ok(Some((found.manifest.size, file)))
    })
    .await
    .unwrap_or_else(|e| Err(format!("the lookup task failed: {e}")));
    let (size, file) = match opened {
        Ok(Some(found)) => found,
        Ok(None) => {
            return error(
                ErrorCode::NotStaged,
                format!("artifact {id} is not staged here"),
            )
        }
        Err(why) => {
            tracing::warn!(id, error = %why, "a staged artifact a peer asked for is not served");
            return error(
                ErrorCode::NotStaged,
                format!("artifact {id} is not served here"),
            );
        }
    };
    let chunks = file_chunks(tokio::fs::File::from_std(file), size).map(move |chunk| {
        let _held = &slot;
        chunk
    });
    let mut resp = Body::from_stream(chunks).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::peer_binary_path;
    use crate::stage::testing::stage_on_disk;

    async fn serve(state: Arc<PeerState>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = router(state);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    async fn get(url: &str) -> (u16, Option<String>, Vec<u8>) {
        let resp = reqwest::get(url).await.unwrap();
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get(header::RETRY_AFTER)
            .map(|v| v.to_str().unwrap().to_owned());
        (status, retry, resp.bytes().await.unwrap().to_vec())
    }

    fn code(body: &[u8]) -> String {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        v["error"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn serves_what_is_staged_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(RELEASES_DIR)).unwrap();
        let m = stage_on_disk(&dir.path().join(RELEASES_DIR), 7);
        let state = Arc::new(PeerState::new(dir.path().to_owned(), Vec::new()));
        let base = serve(state.clone()).await;

        let (status, _, body) = get(&format!("{base}{}", peer_binary_path(&m.id()))).await;
        assert_eq!(status, 200);
        assert_eq!(body, 7u32.to_le_bytes());

        let cases = [
            ("r2-000000000000", 404, "not_staged"),
            ("..%2F..%2Fetc", 400, "invalid_id"),
            ("r2-..", 400, "invalid_id"),
        ];
        for (id, want_status, want_code) in cases {
            let (status, _, body) = get(&format!("{base}{}", peer_binary_path(id))).await;
            assert_eq!(
                (status, code(&body).as_str()),
                (want_status, want_code),
                "{id}"
            );
        }

        // Every slot taken: busy, with Retry-After; a slot back, served.
        let a = state.uploads.clone().try_acquire_owned().unwrap();
        let _b = state.uploads.clone().try_acquire_owned().unwrap();
        let (status, retry, body) = get(&format!("{base}{}", peer_binary_path(&m.id()))).await;
        assert_eq!((status, code(&body).as_str()), (503, "busy"));
        assert_eq!(retry.as_deref(), Some("1"));
        drop(a);
        let (status, _, _) = get(&format!("{base}{}", peer_binary_path(&m.id()))).await;
        assert_eq!(status, 200);
        // The slot of a finished download is given back.
        assert_eq!(state.uploads.available_permits(), 1);
    }

    /// With trusted keys, a staged copy whose signature does not verify
    /// (here: none) is not served.
    #[tokio::test]
    async fn with_trusted_keys_only_verified_copies_are_served() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(RELEASES_DIR)).unwrap();
        let m = stage_on_disk(&dir.path().join(RELEASES_DIR), 7);
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let key = PublicKey::decode(&kp.pk.to_box().unwrap().into_string()).unwrap();
        let state = Arc::new(PeerState::new(dir.path().to_owned(), vec![key]));
        let base = serve(state).await;
        let (status, _, body) = get(&format!("{base}{}", peer_binary_path(&m.id()))).await;
        assert_eq!((status, code(&body).as_str()), (404, "not_staged"));
    }
}
