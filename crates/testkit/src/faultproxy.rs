//! A fault-injecting TCP proxy for process tests: it listens on one address
//! and forwards every connection to the controller, until it is told to
//! [`FaultProxy::partition`] (every connection is dropped and new ones are
//! black-holed: accepted, never answered) or to
//! [`FaultProxy::reset_connections`] / [`FaultProxy::reset_busy_connections`]
//! (as a load balancer forgets connections during a long pause).
//! [`FaultProxy::heal`] forwards again.
//!
//! It also watches the HTTP/1.1 exchanges it forwards (request line, the
//! `epoch` a node request carries in its query or JSON body, answer status
//! and error code), so a test can assert what the controller answered to a
//! node that wrote with a stale epoch. Observing never changes a byte.
//!
//! Bounded: at most [`CONNECTIONS_MAX`] connections (forwarded or held) at a
//! time, more are closed at once; at most [`EXCHANGES_MAX`] exchanges kept.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};

/// Connections forwarded or held at once; more are closed on accept.
pub const CONNECTIONS_MAX: usize = 256;
/// Exchanges remembered; later ones are counted but not kept.
pub const EXCHANGES_MAX: usize = 100_000;
/// Bound on connecting to the target.
const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// Read buffer of one direction of one connection.
const BUFFER_BYTES: usize = 16 << 10;
/// Longest HTTP head (or chunk-size / trailer line) the observer parses;
/// a longer one stops observing that direction (bytes still flow).
const HEAD_BYTES_MAX: usize = 64 << 10;
/// Bytes of a body kept to find `"epoch":` or `"error":` in it.
const BODY_PREFIX_BYTES: usize = 4 << 10;

/// One request a node (or anyone) sent through the proxy, with its answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    /// When the request's head reached the proxy.
    pub at: Instant,
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// `epoch=N` in the query or `"epoch":N` in the JSON body.
    pub epoch: Option<u64>,
    pub status: u16,
    /// `"error":"code"` of a JSON error answer.
    pub error: Option<String>,
}

impl Exchange {
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or(&self.target)
    }
}

struct Inner {
    target: SocketAddr,
    partitioned: AtomicBool,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
    live: Mutex<HashMap<u64, Conn>>,
    held: Mutex<Vec<(TcpStream, OwnedSemaphorePermit)>>,
    exchanges: Mutex<Vec<Exchange>>,
    forwarded: AtomicU64,
}

/// One forwarded connection: its task, and the requests it forwarded that
/// have not been answered yet.
struct Conn {
    task: AbortHandle,
    pending: Arc<Mutex<VecDeque<Message>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Drops every connection (`busy_only`: those waiting for an answer).
    fn drop_live(&self, busy_only: bool) -> usize {
        let mut live = lock(&self.live);
        let ids: Vec<u64> = live
            .iter()
            .filter(|(_, c)| !busy_only || !lock(&c.pending).is_empty())
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            if let Some(conn) = live.remove(id) {
                conn.task.abort();
            }
        }
        ids.len()
    }
}

/// The proxy; dropping it stops it and closes every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    inner: Arc<Inner>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `listen` (port 0 picks one) and forwards to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            target,
            partitioned: AtomicBool::new(false),
            slots: Arc::new(Semaphore::new(CONNECTIONS_MAX)),
            next_id: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            held: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
            forwarded: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, inner.clone()));
        Ok(FaultProxy {
            addr,
            inner,
            accept,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts the link: every connection is dropped; new ones are accepted
    /// and held without a byte forwarded (a black hole) until [`heal`].
    ///
    /// [`heal`]: FaultProxy::heal
    pub fn partition(&self) {
        self.inner.partitioned.store(true, Ordering::SeqCst);
        self.inner.drop_live(false);
        tracing::info!(addr = %self.addr, "fault proxy: partitioned");
    }

    /// Forwards again; connections held during the partition are closed.
    pub fn heal(&self) {
        self.inner.partitioned.store(false, Ordering::SeqCst);
        lock(&self.inner.held).clear();
        tracing::info!(addr = %self.addr, "fault proxy: healed");
    }

    pub fn is_partitioned(&self) -> bool {
        self.inner.partitioned.load(Ordering::SeqCst)
    }

    /// Drops every connection (answers in flight are lost) and goes on forwarding.
    pub fn reset_connections(&self) {
        self.inner.drop_live(false);
        tracing::info!(addr = %self.addr, "fault proxy: connections reset");
    }

    /// Drops the connections whose request waits for its answer (e.g. a
    /// long-poll: the answer is lost), keeps the idle ones, goes on
    /// forwarding; returns how many were dropped.
    pub fn reset_busy_connections(&self) -> usize {
        let n = self.inner.drop_live(true);
        tracing::info!(addr = %self.addr, dropped = n, "fault proxy: busy connections reset");
        n
    }

    /// Every exchange seen so far (at most [`EXCHANGES_MAX`]), in answer order.
    pub fn exchanges(&self) -> Vec<Exchange> {
        lock(&self.inner.exchanges).clone()
    }

    /// Connections forwarded to the target so far.
    pub fn forwarded_connections(&self) -> u64 {
        self.inner.forwarded.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.inner.drop_live(false);
        lock(&self.inner.held).clear();
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let (client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "fault proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = inner.slots.clone().try_acquire_owned() else {
            // Over the bound: closed at once.
            continue;
        };
        if inner.partitioned.load(Ordering::SeqCst) {
            lock(&inner.held).push((client, permit));
            continue;
        }
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = inner.clone();
        let pending = Arc::new(Mutex::new(VecDeque::new()));
        let waiting = pending.clone();
        // Registered under the lock before it can finish and unregister itself.
        let mut live = lock(&inner.live);
        let task = tokio::spawn(async move {
            forward(client, &conn, &waiting).await;
            drop(permit);
            lock(&conn.live).remove(&id);
        });
        live.insert(
            id,
            Conn {
                task: task.abort_handle(),
                pending,
            },
        );
    }
}

async fn forward(client: TcpStream, inner: &Inner, pending: &Mutex<VecDeque<Message>>) {
    let server = match tokio::time::timeout(
        Duration::from_millis(CONNECT_TIMEOUT_MS),
        TcpStream::connect(inner.target),
    )
    .await
    {
        Ok(Ok(s)) => s,
        _ => return,
    };
    inner.forwarded.fetch_add(1, Ordering::Relaxed);
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let mut requests = Parser::new(Kind::Request);
    let mut answers = Parser::new(Kind::Response);
    let up = pipe(cr, sw, |bytes| {
        for m in requests.feed(bytes) {
            lock(pending).push_back(m);
        }
    });
    let down = pipe(sr, cw, |bytes| {
        for answer in answers.feed(bytes) {
            let request = lock(pending).pop_front();
            record(inner, request, answer);
        }
    });
    tokio::pin!(up, down);
    // One side closing cleanly lets the other finish; an error ends both.
    tokio::select! {
        r = &mut up => if r.is_ok() { let _ = down.await; },
        r = &mut down => if r.is_ok() { let _ = up.await; },
    }
}

fn record(inner: &Inner, request: Option<Message>, answer: Message) {
    let mut log = lock(&inner.exchanges);
    if log.len() >= EXCHANGES_MAX {
        return;
    }
    let request = request.unwrap_or_default();
    log.push(Exchange {
        at: request.at.unwrap_or(answer.at.unwrap_or_else(Instant::now)),
        method: request.method,
        epoch: epoch_of(&request.target, &request.body),
        target: request.target,
        status: answer.status,
        error: json_string_field(&answer.body, "error"),
    });
}

/// Copies `from` to `to`, showing every chunk to `observe` after it was written.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut observe: impl FnMut(&[u8]),
) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER_BYTES];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        let bytes = buf.get(..n).unwrap_or_default();
        to.write_all(bytes).await?;
        observe(bytes);
    }
}

fn epoch_of(target: &str, body: &[u8]) -> Option<u64> {
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("epoch="))
        .and_then(|v| v.parse().ok())
        .or_else(|| json_number_field(body, "epoch"))
}

/// The first `"name":` in `body` (a JSON prefix), with optional spaces.
fn json_value_after<'a>(body: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let key = format!("\"{name}\"");
    let at = body.windows(key.len()).position(|w| w == key.as_bytes())?;
    let rest = body.get(at + key.len()..)?;
    let rest = trim_start(rest);
    let rest = trim_start(rest.strip_prefix(b":")?);
    Some(rest)
}

fn trim_start(b: &[u8]) -> &[u8] {
    let skip = b.iter().take_while(|c| c.is_ascii_whitespace()).count();
    b.get(skip..).unwrap_or_default()
}

fn json_number_field(body: &[u8], name: &str) -> Option<u64> {
    let rest = json_value_after(body, name)?;
    let digits: Vec<u8> = rest
        .iter()
        .copied()
        .take_while(u8::is_ascii_digit)
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

fn json_string_field(body: &[u8], name: &str) -> Option<String> {
    let rest = json_value_after(body, name)?.strip_prefix(b"\"")?;
    let end = rest.iter().position(|c| *c == b'"')?;
    Some(String::from_utf8_lossy(rest.get(..end)?).into_owned())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Request,
    Response,
}

/// One HTTP message as the observer saw it.
#[derive(Clone, Debug, Default)]
struct Message {
    at: Option<Instant>,
    method: String,
    target: String,
    status: u16,
    /// The first [`BODY_PREFIX_BYTES`] of the (de-chunked) body.
    body: Vec<u8>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Part {
    Head,
    Body {
        left: u64,
    },
    ChunkSize,
    ChunkData {
        left: u64,
    },
    ChunkEnd {
        left: u8,
    },
    Trailer,
    /// A framing the observer does not follow: it stops, bytes still flow.
    Lost,
}

/// An incremental HTTP/1.1 message parser that only observes.
struct Parser {
    kind: Kind,
    part: Part,
    line: Vec<u8>,
    message: Message,
}

impl Parser {
    fn new(kind: Kind) -> Parser {
        Parser {
            kind,
            part: Part::Head,
            line: Vec::new(),
            message: Message::default(),
        }
    }

    /// The bytes of `data` up to `end` (which is consumed too), joined to
    /// what earlier calls kept; `None` when `data` ends first: it is all
    /// kept, and a line longer than `HEAD_BYTES_MAX` loses the stream.
    fn take_line(&mut self, data: &mut &[u8], end: &[u8]) -> Option<Vec<u8>> {
        let bytes = std::mem::take(data);
        match take_until(&mut self.line, bytes, end) {
            Some((line, rest)) => {
                *data = rest;
                Some(line)
            }
            None => {
                if self.line.len() > HEAD_BYTES_MAX {
                    self.part = Part::Lost;
                }
                None
            }
        }
    }

    /// Keeps up to `left` bytes of `data` as body and advances past them;
    /// how many bytes of body are still to come.
    fn keep_body(&mut self, data: &mut &[u8], left: u64) -> u64 {
        let bytes = std::mem::take(data);
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
        self.keep(bytes.get(..n).unwrap_or_default());
        *data = bytes.get(n..).unwrap_or_default();
        left - n as u64
    }

    /// Feeds bytes; returns every message they completed.
    fn feed(&mut self, mut data: &[u8]) -> Vec<Message> {
        let mut done = Vec::new();
        while !data.is_empty() {
            match self.part {
                Part::Lost => return done,
                Part::Head => {
                    if self.line.is_empty() {
                        self.message.at = Some(Instant::now());
                    }
                    let Some(line) = self.take_line(&mut data, b"\r\n\r\n") else {
                        continue;
                    };
                    self.part = self.head(&line);
                    if self.part == (Part::Body { left: 0 }) {
                        done.push(self.finish());
                    }
                }
                Part::Body { left } => {
                    let left = self.keep_body(&mut data, left);
                    self.part = Part::Body { left };
                    if left == 0 {
                        done.push(self.finish());
                    }
                }
                Part::ChunkSize => {
                    let Some(line) = self.take_line(&mut data, b"\r\n") else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(&line);
                    let size = text.split(';').next().unwrap_or("").trim();
                    self.part = match u64::from_str_radix(size, 16) {
                        Ok(0) => Part::Trailer,
                        Ok(left) => Part::ChunkData { left },
                        Err(_) => Part::Lost,
                    };
                }
                Part::ChunkData { left } => {
                    let left = self.keep_body(&mut data, left);
                    self.part = if left == 0 {
                        Part::ChunkEnd { left: 2 }
                    } else {
                        Part::ChunkData { left }
                    };
                }
                Part::ChunkEnd { left } => {
                    let n = usize::from(left).min(data.len());
                    data = data.get(n..).unwrap_or_default();
                    let left = left - n as u8;
                    self.part = if left == 0 {
                        Part::ChunkSize
                    } else {
                        Part::ChunkEnd { left }
                    };
                }
                Part::Trailer => {
                    let Some(line) = self.take_line(&mut data, b"\r\n") else {
                        continue;
                    };
                    // An empty line ends the trailer (and the message).
                    if line.is_empty() {
                        done.push(self.finish());
                    }
                }
            }
        }
        done
    }

    fn keep(&mut self, bytes: &[u8]) {
        let room = BODY_PREFIX_BYTES.saturating_sub(self.message.body.len());
        self.message
            .body
            .extend_from_slice(bytes.get(..room.min(bytes.len())).unwrap_or_default());
    }

    fn finish(&mut self) -> Message {
        self.part = Part::Head;
        std::mem::take(&mut self.message)
    }

    /// Reads the head (without its final blank line); returns how the body is framed.
    fn head(&mut self, head: &[u8]) -> Part {
        let text = String::from_utf8_lossy(head);
        let mut lines = text.split("\r\n");
        let first = lines.next().unwrap_or("");
        let mut words = first.split_whitespace();
        match self.kind {
            Kind::Request => {
                self.message.method = words.next().unwrap_or("").to_owned();
                self.message.target = words.next().unwrap_or("").to_owned();
            }
            Kind::Response => {
                let _version = words.next();
                self.message.status = words.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            }
        }
        let mut length = None;
        let mut chunked = false;
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<u64>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.to_ascii_lowercase().contains("chunked");
            }
        }
        let status = self.message.status;
        let bodiless =
            self.kind == Kind::Response && (status < 200 || status == 204 || status == 304);
        if bodiless {
            // 1xx answers come before the real one; they are not exchanges.
            if status < 200 {
                self.message = Message::default();
                return Part::Head;
            }
            return Part::Body { left: 0 };
        }
        match (chunked, length, self.kind) {
            (true, _, _) => Part::ChunkSize,
            (false, Some(left), _) => Part::Body { left },
            (false, None, Kind::Request) => Part::Body { left: 0 },
            // Delimited by the connection's end: not followed.
            (false, None, Kind::Response) => Part::Lost,
        }
    }
}

/// Appends `data` to `line` up to and including `end`; when found, returns
/// the line without `end` (and clears `line`) and the bytes after it.
fn take_until<'a>(line: &mut Vec<u8>, data: &'a [u8], end: &[u8]) -> Option<(Vec<u8>, &'a [u8])> {
    let before = line.len();
    line.extend_from_slice(data);
    let from = before.saturating_sub(end.len() - 1);
    let at = line
        .get(from..)
        .and_then(|tail| tail.windows(end.len()).position(|w| w == end))
        .map(|p| p + from)?;
    let used = at + end.len() - before;
    let found = line.get(..at).unwrap_or_default().to_vec();
    line.clear();
    Some((found, data.get(used..).unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(kind: Kind, bytes: &[u8], step: usize) -> Vec<Message> {
        let mut p = Parser::new(kind);
        bytes.chunks(step).flat_map(|c| p.feed(c)).collect()
    }

    #[test]
    fn requests_with_bodies_and_queries_are_observed_in_any_slicing() {
        let stream = b"POST /node/v1/records HTTP/1.1\r\nhost: x\r\ncontent-length: 25\r\n\r\n{\"v\":1,\"epoch\":7,\"x\":[1]}GET /node/v1/watch?epoch=9&grant=full HTTP/1.1\r\nhost: x\r\n\r\n";
        for step in [1, 2, 3, 7, 1000] {
            let got = feed_all(Kind::Request, stream, step);
            assert_eq!(got.len(), 2, "step {step}");
            assert_eq!(got[0].target, "/node/v1/records");
            assert_eq!(epoch_of(&got[0].target, &got[0].body), Some(7));
            assert_eq!(got[1].method, "GET");
            assert_eq!(epoch_of(&got[1].target, &got[1].body), Some(9));
        }
    }

    #[test]
    fn chunked_and_bodiless_answers_are_observed() {
        let stream = b"HTTP/1.1 409 Conflict\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"err\r\n1a\r\nor\": \"stale_epoch\", \"m\":1}\r\n0\r\n\r\nHTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        for step in [1, 4, 1000] {
            let got = feed_all(Kind::Response, stream, step);
            let statuses: Vec<u16> = got.iter().map(|m| m.status).collect();
            assert_eq!(statuses, vec![409, 204, 200], "step {step}");
            assert_eq!(
                json_string_field(&got[0].body, "error").as_deref(),
                Some("stale_epoch")
            );
        }
    }

    #[test]
    fn unframed_answers_stop_the_observer_only() {
        let mut p = Parser::new(Kind::Response);
        assert!(p.feed(b"HTTP/1.0 200 OK\r\n\r\nbody").is_empty());
        assert_eq!(p.part, Part::Lost);
        assert!(p
            .feed(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .is_empty());
    }

    #[tokio::test]
    async fn forwards_partitions_and_heals() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = backend.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = backend.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let answer = b"HTTP/1.1 409 Conflict\r\ncontent-length: 23\r\n\r\n{\"error\":\"stale_epoch\"}";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), target)
            .await
            .unwrap();
        let ask = |addr: SocketAddr| async move {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(
                b"POST /node/v1/heartbeat HTTP/1.1\r\ncontent-length: 11\r\n\r\n{\"epoch\":3}",
            )
            .await?;
            let mut buf = vec![0u8; 256];
            let n = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf))
                .await
                .map_err(|_| io::Error::other("no answer"))??;
            Ok::<_, io::Error>(String::from_utf8_lossy(&buf[..n]).into_owned())
        };
        assert!(ask(proxy.addr()).await.unwrap().contains("409"));
        proxy.partition();
        assert!(ask(proxy.addr()).await.is_err(), "black-holed");
        proxy.heal();
        assert!(ask(proxy.addr()).await.unwrap().contains("stale_epoch"));
        // The observer pairs answers with requests after the bytes went through.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let seen = proxy.exchanges();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen.iter().all(|e| e.path() == "/node/v1/heartbeat"
            && e.epoch == Some(3)
            && e.status == 409
            && e.error.as_deref() == Some("stale_epoch")));
    }
}
