//! A binary's bytes as they arrive or leave: checked against the manifest
//! by [`DigestCheck`] while streaming into a file, or read out of one in
//! bounded chunks.

use crate::write::{io_err, IoError, RemoveOnDrop};
use crate::{BINARY_MODE, IO_CHUNK_BYTES};
use futures_util::{Stream, StreamExt as _};
use handover_core::artifact::{ArtifactError, DigestCheck, Manifest};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Why streamed bytes were not accepted.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The stream failed before its end (a body cut off, a timeout).
    #[error("the bytes stopped after {received}: {reason}")]
    Interrupted { received: u64, reason: String },
    /// The bytes are not the ones the manifest names (size or SHA-256).
    #[error(transparent)]
    Check(#[from] ArtifactError),
    #[error(transparent)]
    Io(#[from] IoError),
}

/// Checks what `body` streams against `manifest` (size and SHA-256),
/// keeping nothing. Refuses as soon as it is longer than the manifest says.
pub async fn check_stream<S, B, E>(manifest: &Manifest, body: S) -> Result<(), StreamError>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    pump(manifest, body, None).await
}

/// Streams `body` into the new file `path` (it must not exist; mode
/// [`BINARY_MODE`]) through [`DigestCheck`], then fsyncs it. Only bytes of
/// the manifest's size and SHA-256 are kept: on any failure, or if this
/// future is dropped, the partial file is removed. The caller fsyncs the
/// directory (or places it, [`NewDir`](crate::NewDir)).
pub async fn write_checked<S, B, E>(
    path: &Path,
    manifest: &Manifest,
    body: S,
) -> Result<(), StreamError>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(BINARY_MODE)
        .open(path)
        .await
        .map_err(io_err("create", path))?;
    let mut partial = RemoveOnDrop::new(path.to_path_buf());
    let mut out = tokio::io::BufWriter::with_capacity(IO_CHUNK_BYTES, file);
    pump(manifest, body, Some((path, &mut out))).await?;
    out.flush().await.map_err(io_err("write", path))?;
    let file = out.into_inner();
    // The umask may have narrowed the mode given at creation.
    file.set_permissions(std::fs::Permissions::from_mode(BINARY_MODE))
        .await
        .map_err(io_err("chmod", path))?;
    file.sync_all().await.map_err(io_err("fsync", path))?;
    partial.disarm();
    Ok(())
}

type Sink<'a> = (&'a Path, &'a mut tokio::io::BufWriter<tokio::fs::File>);

async fn pump<S, B, E>(
    manifest: &Manifest,
    body: S,
    mut out: Option<Sink<'_>>,
) -> Result<(), StreamError>
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
{
    let mut check = DigestCheck::new(manifest);
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| StreamError::Interrupted {
            received: check.received(),
            reason: e.to_string(),
        })?;
        check.update(chunk.as_ref())?;
        if let Some((path, w)) = out.as_mut() {
            w.write_all(chunk.as_ref())
                .await
                .map_err(io_err("write", path))?;
        }
    }
    Ok(check.finish()?)
}

/// The first `size` bytes of `file` as a stream of chunks of at most
/// [`IO_CHUNK_BYTES`]: a binary as it is sent (never more than its
/// manifest's size, even if the file grew).
pub fn file_chunks(
    file: tokio::fs::File,
    size: u64,
) -> impl Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    futures_util::stream::unfold(file.take(size), |mut r| async move {
        let mut buf = vec![0u8; IO_CHUNK_BYTES];
        match r.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), r))
            }
            Err(e) => Some((Err(e), r)),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{binary, manifest_of};

    fn chunks(bytes: &[u8], n: usize) -> impl Stream<Item = Result<Vec<u8>, String>> + Unpin {
        let v: Vec<Result<Vec<u8>, String>> = bytes.chunks(n).map(|c| Ok(c.to_vec())).collect();
        futures_util::stream::iter(v)
    }

    #[tokio::test]
    async fn keeps_exactly_the_right_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = binary(100_000);
        let m = manifest_of(&bytes);
        let p = tmp.path().join("handover");
        write_checked(&p, &m, chunks(&bytes, 4096)).await.unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, BINARY_MODE);
        // Never over an existing file.
        let err = write_checked(&p, &m, chunks(&bytes, 4096))
            .await
            .unwrap_err();
        assert!(matches!(err, StreamError::Io(IoError { op: "create", .. })));
        assert_eq!(std::fs::read(&p).unwrap(), bytes);
        check_stream(&m, chunks(&bytes, 7)).await.unwrap();
        // Read back as it is sent.
        let file = tokio::fs::File::open(&p).await.unwrap();
        let sent: Vec<Vec<u8>> = file_chunks(file, 99_999)
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert!(sent.iter().all(|c| c.len() <= IO_CHUNK_BYTES));
        assert_eq!(sent.concat(), bytes[..99_999]);
    }

    #[tokio::test]
    async fn removes_the_partial_file_on_any_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = binary(10_000);
        let m = manifest_of(&bytes);
        let p = tmp.path().join("handover");
        let mut flipped = bytes.clone();
        flipped[1234] ^= 0x80;
        let mut long = bytes.clone();
        long.push(0);
        for (name, body, code) in [
            ("flipped", flipped, "digest_mismatch"),
            ("long", long, "size_mismatch"),
            ("short", bytes[..9_999].to_vec(), "size_mismatch"),
        ] {
            match write_checked(&p, &m, chunks(&body, 1000)).await {
                Err(StreamError::Check(e)) => assert_eq!(e.code(), code, "{name}"),
                other => panic!("{name}: {other:?}"),
            }
            assert!(!p.exists(), "{name}");
            match check_stream(&m, chunks(&body, 1000)).await {
                Err(StreamError::Check(e)) => assert_eq!(e.code(), code, "{name}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        let cut =
            futures_util::stream::iter(vec![Ok(bytes[..10].to_vec()), Err("reset".to_owned())]);
        let err = write_checked(&p, &m, cut).await.unwrap_err();
        assert!(
            matches!(err, StreamError::Interrupted { received: 10, .. }),
            "{err}"
        );
        assert!(!p.exists());
        // A future dropped half-way keeps nothing either.
        let stalled = futures_util::stream::iter(vec![Ok::<_, String>(bytes[..10].to_vec())])
            .chain(futures_util::stream::pending());
        let write = write_checked(&p, &m, stalled);
        let timed_out = tokio::time::timeout(std::time::Duration::from_millis(50), write).await;
        assert!(timed_out.is_err());
        assert!(!p.exists());
    }
}
