//! `handover_net::serve` on a loopback port, spoken to over raw TCP: the
//! timeouts close silent, slow and idle connections but never a request in
//! flight; the cap makes room by closing connections without a request;
//! shutdown finishes what is in flight. Every wait is bounded; nothing
//! asserts how long anything took.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use handover_net::{serve, Limits, ServeError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

/// Short timeouts, so the tests that wait for them are quick.
const SHORT_MS: u64 = 300;
/// Long enough that nothing in a test reaches it.
const LONG_MS: u64 = 60_000;
/// The answer of `GET /large`.
const LARGE_BYTES: usize = 64 << 20;
/// Bound on every wait for an answer or a close.
const BOUND: Duration = Duration::from_secs(10);

/// Limits with both timeouts `timeout_ms` and no eviction grace.
fn limits(connections_max: usize, timeout_ms: u64) -> Limits {
    Limits {
        connections_max,
        evictable_idle_ms: 0,
        header_read_timeout_ms: timeout_ms,
        body_read_timeout_ms: timeout_ms,
        write_timeout_ms: timeout_ms,
        drain_idle_ms: 0,
    }
}

struct Server {
    addr: SocketAddr,
    /// `GET /held` answers once this is notified (one permit per answer).
    release: Arc<Notify>,
    stop: Option<oneshot::Sender<()>>,
    served: JoinHandle<Result<(), ServeError>>,
}

async fn start(limits: Limits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let release = Arc::new(Notify::new());
    let held = release.clone();
    let router = Router::new()
        .route("/fast", get(|| async { "ok" }))
        // Far more than the socket buffers of both ends hold, streamed (as
        // artifacts are): the request stays in flight until the last chunk.
        .route(
            "/large",
            get(|| async {
                let chunk = Bytes::from(vec![b'x'; 64 << 10]);
                let chunks = (0..LARGE_BYTES / chunk.len())
                    .map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
                axum::body::Body::from_stream(futures_util::stream::iter(chunks))
            }),
        )
        .route(
            "/held",
            get(move || {
                let held = held.clone();
                async move {
                    held.notified().await;
                    "released"
                }
            }),
        )
        .route(
            "/echo",
            post(|body: Result<Bytes, BytesRejection>| async move {
                match body {
                    Ok(b) => (StatusCode::OK, b.len().to_string()),
                    Err(r) if handover_net::is_body_timeout(&r) => {
                        (StatusCode::REQUEST_TIMEOUT, "body timeout".to_owned())
                    }
                    Err(r) => (StatusCode::BAD_REQUEST, r.body_text()),
                }
            }),
        );
    let (stop, stopped) = oneshot::channel::<()>();
    let served = tokio::spawn(serve(listener, router, limits, None, async move {
        let _ = stopped.await;
    }));
    Server {
        addr,
        release,
        stop: Some(stop),
        served,
    }
}

impl Server {
    async fn connect(&self) -> TcpStream {
        TcpStream::connect(self.addr).await.unwrap()
    }

    /// A connection that has sent `GET path` and not read the answer.
    async fn send_get(&self, path: &str) -> TcpStream {
        let mut s = self.connect().await;
        send_get(&mut s, path).await;
        s
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn send_get(s: &mut TcpStream, path: &str) {
    let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
}

/// Reads one answer (status and body; bodies here carry a content-length).
async fn read_answer(s: &mut TcpStream) -> (u16, String) {
    let (status, _head, body) = read_answer_head(s).await;
    (status, body)
}

/// Reads one answer: status, head (lowercase) and body.
async fn read_answer_head(s: &mut TcpStream) -> (u16, String, String) {
    tokio::time::timeout(BOUND, async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let status: u16 = head[9..12].parse().unwrap();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]);
                    return (status, head, body.into_owned());
                }
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a whole answer: {buf:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("no answer within the bound")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Whether the server closes `s` within the bound (EOF or reset; any bytes
/// before are dropped).
async fn closed_by_server(s: &mut TcpStream) -> bool {
    tokio::time::timeout(BOUND, async {
        let mut chunk = [0u8; 1024];
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Whether `s` stays without an answer for a moment (the server holds it).
async fn no_answer_yet(s: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    tokio::time::timeout(Duration::from_millis(SHORT_MS), s.peek(&mut byte))
        .await
        .is_err()
}

#[tokio::test]
async fn silent_slow_and_idle_connections_are_closed() {
    let s = start(limits(100, SHORT_MS)).await;
    let mut silent = s.connect().await;
    let mut idle = s.connect().await;
    send_get(&mut idle, "/fast").await;
    assert_eq!(read_answer(&mut idle).await, (200, "ok".into()));
    // A header a byte at a time, never finished.
    let mut slow = s.connect().await;
    let (mut rd, mut wr) = slow.split();
    let dripping = async {
        for b in b"GET /fast HTTP/1.1\r\nhost: a-very-long-name"
            .iter()
            .cycle()
        {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(SHORT_MS / 6)).await;
        }
    };
    let closed = tokio::time::timeout(BOUND, async {
        tokio::select! {
            () = dripping => {}
            _ = rd.read_u8() => {}
        }
    })
    .await;
    assert!(closed.is_ok(), "the slow header was not cut");
    assert!(
        closed_by_server(&mut silent).await,
        "silent connection kept"
    );
    assert!(closed_by_server(&mut idle).await, "idle keep-alive kept");
}

#[tokio::test]
async fn a_request_in_flight_is_not_idle() {
    let s = start(limits(100, SHORT_MS)).await;
    let mut held = s.send_get("/held").await;
    // Held past the header read timeout several times over.
    tokio::time::sleep(Duration::from_millis(4 * SHORT_MS)).await;
    assert!(no_answer_yet(&mut held).await);
    s.release.notify_one();
    assert_eq!(read_answer(&mut held).await, (200, "released".into()));
}

#[tokio::test]
async fn a_stalled_body_fails_with_the_body_timeout() {
    let s = start(limits(100, SHORT_MS)).await;
    let mut c = s.connect().await;
    c.write_all(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\n123")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut c).await, (408, "body timeout".into()));
    // A whole body is read as usual.
    let mut c = s.connect().await;
    c.write_all(b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\n\r\n123")
        .await
        .unwrap();
    assert_eq!(read_answer(&mut c).await, (200, "3".into()));
}

#[tokio::test]
async fn at_the_cap_a_connection_without_a_request_makes_room() {
    let s = start(limits(3, LONG_MS)).await;
    let mut silent = s.connect().await;
    let mut kept_alive = s.send_get("/fast").await;
    assert_eq!(read_answer(&mut kept_alive).await, (200, "ok".into()));
    let mut held = s.send_get("/held").await;
    assert!(no_answer_yet(&mut held).await);

    // The cap is reached: the silent connection goes first...
    let mut first = s.send_get("/fast").await;
    assert_eq!(read_answer(&mut first).await, (200, "ok".into()));
    assert!(closed_by_server(&mut silent).await);
    // ...then the one idle longest (kept_alive, idle before `first`).
    let mut second = s.send_get("/fast").await;
    assert_eq!(read_answer(&mut second).await, (200, "ok".into()));
    assert!(closed_by_server(&mut kept_alive).await);
    // The request in flight was never a candidate.
    s.release.notify_one();
    assert_eq!(read_answer(&mut held).await, (200, "released".into()));
}

#[tokio::test]
async fn at_the_cap_with_every_request_in_flight_a_new_connection_waits() {
    let s = start(limits(1, LONG_MS)).await;
    let mut held = s.send_get("/held").await;
    assert!(no_answer_yet(&mut held).await);
    let mut waiting = s.send_get("/fast").await;
    assert!(no_answer_yet(&mut waiting).await, "served past the cap");
    s.release.notify_one();
    assert_eq!(read_answer(&mut held).await, (200, "released".into()));
    // `held` is idle now: it makes room, and the waiting one is served.
    assert_eq!(read_answer(&mut waiting).await, (200, "ok".into()));
    assert!(closed_by_server(&mut held).await);
}

/// A client that asks for a large answer and stops reading it holds a
/// request in flight, which the cap never closes: the write timeout does,
/// so at a cap of 1 the next client is served.
#[tokio::test]
async fn a_client_that_stops_reading_is_closed_by_the_write_timeout() {
    let server = start(limits(1, SHORT_MS)).await;
    let mut stuck = server.send_get("/large").await;
    let mut head = [0u8; 12];
    tokio::time::timeout(BOUND, stuck.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&head[9..12], b"200");
    // `stuck` reads nothing more; the next client waits for its slot.
    let mut next = server.send_get("/fast").await;
    assert_eq!(read_answer(&mut next).await, (200, "ok".into()));
    assert!(closed_by_server(&mut stuck).await);
}

#[tokio::test]
async fn at_the_cap_a_new_connection_is_not_closed_before_its_grace() {
    let s = start(Limits {
        evictable_idle_ms: 2_000,
        ..limits(1, LONG_MS)
    })
    .await;
    let mut silent = s.connect().await;
    // The cap is reached, but `silent` is too young to be closed: the new
    // connection waits for it, and then is served.
    let mut waiting = s.send_get("/fast").await;
    assert!(no_answer_yet(&mut waiting).await, "closed within its grace");
    assert_eq!(read_answer(&mut waiting).await, (200, "ok".into()));
    assert!(closed_by_server(&mut silent).await);
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_finishes_requests_in_flight() {
    let mut s = start(limits(100, LONG_MS)).await;
    let mut silent = s.connect().await;
    let mut idle = s.send_get("/fast").await;
    assert_eq!(read_answer(&mut idle).await, (200, "ok".into()));
    let mut held = s.send_get("/held").await;
    assert!(no_answer_yet(&mut held).await);
    s.stop().await;
    assert!(closed_by_server(&mut silent).await);
    assert!(closed_by_server(&mut idle).await);
    assert!(!s.served.is_finished(), "returned with a request in flight");
    s.release.notify_one();
    assert_eq!(read_answer(&mut held).await, (200, "released".into()));
    let served = tokio::time::timeout(BOUND, &mut s.served).await;
    assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
    assert!(closed_by_server(&mut held).await);
}

/// Waits (bounded) until the server no longer accepts: its listener, the
/// only copy of the socket here, is closed.
async fn refused(addr: SocketAddr) {
    tokio::time::timeout(BOUND, async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("still accepting after the stop");
}

/// A worker handing its socket over: it stops accepting at once, but a
/// client's next request on an idle keep-alive connection is answered
/// (saying `Connection: close`, and the connection closed after it), not
/// cut off by a close racing it.
#[tokio::test]
async fn a_stopping_server_answers_the_next_request_on_an_idle_connection() {
    let mut s = start(Limits {
        drain_idle_ms: LONG_MS,
        ..limits(100, LONG_MS)
    })
    .await;
    let mut kept = s.send_get("/fast").await;
    assert_eq!(read_answer(&mut kept).await, (200, "ok".into()));
    s.stop().await;
    refused(s.addr).await;
    // Time for the connection to see the stop: closed at once, as it was
    // before the drain, it would be closed by now. With the drain the
    // outcome does not hang on this wait.
    tokio::time::sleep(Duration::from_millis(SHORT_MS)).await;
    send_get(&mut kept, "/fast").await;
    let (status, head, body) = read_answer_head(&mut kept).await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert!(head.contains("connection: close"), "{head}");
    assert!(closed_by_server(&mut kept).await);
    let served = tokio::time::timeout(BOUND, &mut s.served).await;
    assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
}

/// A connection that stays idle through the drain is closed when it ends.
#[tokio::test]
async fn a_connection_idle_through_the_drain_is_closed_after_it() {
    let mut s = start(Limits {
        drain_idle_ms: SHORT_MS,
        ..limits(100, LONG_MS)
    })
    .await;
    let mut idle = s.send_get("/fast").await;
    assert_eq!(read_answer(&mut idle).await, (200, "ok".into()));
    let mut silent = s.connect().await;
    s.stop().await;
    assert!(closed_by_server(&mut idle).await);
    assert!(closed_by_server(&mut silent).await);
    let served = tokio::time::timeout(BOUND, &mut s.served).await;
    assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
}

#[tokio::test]
async fn a_zero_limit_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let r = serve(listener, Router::new(), limits(0, SHORT_MS), None, async {}).await;
    assert!(
        matches!(r, Err(ServeError::ZeroLimit("connections_max"))),
        "{r:?}"
    );
}
