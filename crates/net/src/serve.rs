//! The accept loop and one task per connection: accept, make room at the
//! cap, establish the transport, serve HTTP/1.1 with hyper under the
//! limits, close gracefully.

use crate::limits::{raise_open_files_limit, Limits, READ_BUF_BYTES_MAX};
use crate::registry::{Conn, InFlight, Pick, Registry, Slot};
use crate::tls::PeerCertificate;
use crate::ServeError;
use axum::body::{Body, Bytes};
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tower::ServiceExt;
use tower_http::timeout::RequestBodyTimeout;

/// After an accept fails for want of resources (descriptors, memory), the
/// loop pauses this long before it accepts again, instead of spinning; the
/// connections meanwhile wait in the kernel's backlog.
pub const ACCEPT_RETRY_MS: u64 = 100;

/// The application as every connection calls it: the router behind the
/// request body timeout.
type App = RequestBodyTimeout<Router>;

/// Serves `router` on `listener` under `limits` until `shutdown` resolves;
/// then stops accepting (the listener is dropped: a supervisor's own copy
/// of the socket keeps queuing connections for the next worker), answers
/// every request from then on with `Connection: close`, lets each request
/// in flight finish, keeps a connection with none open for
/// [`Limits::drain_idle_ms`] (its client's next request is answered, not
/// cut off) and then closes it, and returns once all are closed.
///
/// Raises the process's soft open-file limit to its hard limit first (see
/// [`raise_open_files_limit`]), and keeps the cap in force below it.
pub async fn serve<F>(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send + 'static,
{
    limits.validate()?;
    let cap = limits.connections_in_force(raise_open_files_limit());
    tracing::info!(
        addr = ?listener.local_addr().ok(),
        connections_max = cap,
        evictable_idle_ms = limits.evictable_idle_ms,
        header_read_timeout_ms = limits.header_read_timeout_ms,
        body_read_timeout_ms = limits.body_read_timeout_ms,
        tls = tls.is_some(),
        "serving HTTP with limits"
    );
    let handshake = Handshake {
        acceptor: tls.map(tokio_rustls::TlsAcceptor::from),
        timeout: limits.header_read_timeout(),
        write_timeout: limits.write_timeout(),
    };
    let app: App = RequestBodyTimeout::new(router, limits.body_read_timeout());
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout())
        .max_buf_size(READ_BUF_BYTES_MAX);
    let registry = Arc::new(Registry::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut at_cap = false;
    'accept: loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut shutdown => break 'accept,
        };
        let tcp = match accepted {
            Ok((tcp, _peer)) => tcp,
            Err(e) => {
                accept_failed(&e).await;
                continue;
            }
        };
        // At the cap: close a connection that has been without a request
        // long enough, or wait until there is one (this connection
        // accepted and unread, the next ones in the kernel's backlog).
        loop {
            if registry.occupied() < cap {
                at_cap = false;
                break;
            }
            if !at_cap {
                at_cap = true;
                tracing::warn!(
                    connections_max = cap,
                    "connection cap reached: a new connection closes one without a request"
                );
            }
            let wait = match registry.pick(limits.evictable_idle()) {
                Pick::Evict(victim) => {
                    registry.evict(&victim);
                    break;
                }
                Pick::Wait(left) => left,
                // Woken by `changed` when a request finishes.
                Pick::Busy => limits.evictable_idle(),
            };
            tokio::select! {
                () = registry.changed() => {}
                () = tokio::time::sleep(wait) => {}
                () = &mut shutdown => break 'accept,
            }
        }
        let slot = registry.register();
        tokio::spawn(connection(
            tcp,
            handshake.clone(),
            app.clone(),
            http.clone(),
            slot,
            stop_rx.clone(),
            limits.drain_idle(),
        ));
    }
    // Stopping first: whoever finds the socket closed finds every answer
    // from then on saying `Connection: close`.
    stop_tx.send_replace(true);
    drop(listener);
    let open = registry.open_count();
    if open > 0 {
        tracing::info!(
            connections = open,
            drain_idle_ms = limits.drain_idle_ms,
            "stopped accepting; finishing requests in flight, draining the other connections"
        );
    }
    registry.all_closed().await;
    Ok(())
}

/// An accept that failed: a connection that died in the backlog is
/// skipped; anything else (out of descriptors or memory) is logged and
/// retried after [`ACCEPT_RETRY_MS`].
async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::error!(error = %e, retry_ms = ACCEPT_RETRY_MS, "cannot accept a connection");
    tokio::time::sleep(Duration::from_millis(ACCEPT_RETRY_MS)).await;
}

/// A connection's byte stream, plain or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// What a connection goes through between accept and HTTP: the write
/// timeout on its socket (under TLS too); for TLS, the handshake, bounded
/// like a header read (a client that never finishes it holds a slot no
/// longer, and having no request, is the first to make room at the cap).
#[derive(Clone)]
struct Handshake {
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    timeout: Duration,
    write_timeout: Duration,
}

impl Handshake {
    /// The stream, and the client certificate the client proved it holds
    /// (TLS only, if it presented one).
    async fn establish(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<(Box<dyn Io>, Option<PeerCertificate>)> {
        let mut timed = tokio_io_timeout::TimeoutStream::new(tcp);
        timed.set_write_timeout(Some(self.write_timeout));
        let tcp = Box::pin(timed);
        let Some(acceptor) = &self.acceptor else {
            return Ok((Box::new(tcp), None));
        };
        match tokio::time::timeout(self.timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => {
                let peer = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|der| PeerCertificate::of_der(der));
                Ok((Box::new(tls), peer))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake timed out",
            )),
        }
    }
}

/// One connection, from accept to close. Evicted, a connection that never
/// started a request is closed at once; any other gets hyper's graceful
/// shutdown (closed at once when idle, else after the response in flight).
/// Told to stop, one with a request in flight closes after its response;
/// one without waits up to `drain_idle` for a request (answered with
/// `Connection: close`, after which hyper closes it) before it is closed.
async fn connection(
    tcp: TcpStream,
    handshake: Handshake,
    app: App,
    http: http1::Builder,
    slot: Slot,
    mut stop: watch::Receiver<bool>,
    drain_idle: Duration,
) {
    let conn = slot.conn().clone();
    let (io, peer) = tokio::select! {
        io = handshake.establish(tcp) => match io {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(error = %e, "connection not established");
                return;
            }
        },
        () = conn.evicted() => return,
        _ = stop.wait_for(|s| *s), if drain_idle.is_zero() => return,
    };
    let service = Tracked {
        app,
        conn: conn.clone(),
        peer,
        stop: stop.clone(),
    };
    let served = http.serve_connection(TokioIo::new(io), service);
    let mut served = std::pin::pin!(served);
    // Set once the server stops: until then, the drain's end never comes.
    let mut drain_ends: Option<tokio::time::Instant> = None;
    let mut closing = false;
    loop {
        let drained = async {
            match drain_ends {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = served.as_mut() => {
                if let Err(e) = r {
                    // Timeouts, resets, malformed requests: the client's
                    // business, not the server's health.
                    tracing::debug!(error = %e, "connection closed");
                }
                break;
            }
            () = conn.evicted(), if !closing => {
                if conn.never_requested() {
                    break;
                }
                closing = true;
                served.as_mut().graceful_shutdown();
            }
            _ = stop.wait_for(|s| *s), if !closing && drain_ends.is_none() => {
                if conn.in_flight() > 0 {
                    closing = true;
                    served.as_mut().graceful_shutdown();
                } else if drain_idle.is_zero() && conn.never_requested() {
                    break;
                } else {
                    drain_ends = Some(tokio::time::Instant::now() + drain_idle);
                }
            }
            () = drained, if !closing => {
                closing = true;
                served.as_mut().graceful_shutdown();
            }
        }
    }
    drop(slot);
}

/// The application as hyper calls it on one connection: every request is
/// counted in flight until its response body is done, and carries the
/// connection's client certificate, if any, in its extensions. Once the
/// server stops, every response says `Connection: close` (hyper then closes
/// the connection after it).
struct Tracked {
    app: App,
    conn: Arc<Conn>,
    peer: Option<PeerCertificate>,
    stop: watch::Receiver<bool>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        let in_flight = self.conn.begin_request();
        if let Some(peer) = &self.peer {
            req.extensions_mut().insert(peer.clone());
        }
        let app = self.app.clone();
        let stop = self.stop.clone();
        Box::pin(async move {
            let mut response = app.oneshot(req).await?;
            if *stop.borrow() {
                response.headers_mut().insert(
                    hyper::header::CONNECTION,
                    hyper::header::HeaderValue::from_static("close"),
                );
            }
            Ok(response.map(|body| {
                Body::new(Guarded {
                    body,
                    _in_flight: in_flight,
                })
            }))
        })
    }
}

/// A response body that keeps its request in flight until it is done.
struct Guarded {
    body: Body,
    _in_flight: InFlight,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
