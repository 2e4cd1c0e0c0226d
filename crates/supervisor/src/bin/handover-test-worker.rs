//! TEST FIXTURE, not a product binary: a tiny worker for the supervisor's
//! process tests. It serves HTTP/1.1 on the listener the supervisor passed:
//!
//! - `/healthz` → `ok`
//! - `/whoami` → `{"release":N,"pid":P,"role":R}`
//! - `/slow?ms=N` → waits N ms (at most 10 s), then answers like `/whoami`
//! - `/switch?to=N&binary=PATH` → asks the supervisor to switch
//!
//! Flags: `--release N` (appended by the supervisor), `--role NAME`,
//! `--fail-start` (exit 1 before ready), `--never-ready` (serve, never send
//! ready). On SIGTERM it stops accepting, finishes in-flight requests and
//! exits 0.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use handover_supervisor::{inherited_listener, Release, SupervisorClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

/// Bound on a request head.
const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Bound on reading a request head.
const READ_TIMEOUT_MS: u64 = 10_000;
/// Bound on `/slow`.
const MAX_SLOW_MS: u64 = 10_000;
/// Bound on finishing in-flight requests after SIGTERM.
const DRAIN_TIMEOUT_MS: u64 = 15_000;

struct Args {
    release: u32,
    role: String,
    fail_start: bool,
    never_ready: bool,
}

struct Ctx {
    release: u32,
    role: String,
    client: Option<SupervisorClient>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        release: 0,
        role: String::new(),
        fail_start: false,
        never_ready: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--release" => {
                args.release = it
                    .next()
                    .context("--release needs a value")?
                    .parse()
                    .context("--release")?
            }
            "--role" => args.role = it.next().context("--role needs a value")?,
            "--fail-start" => args.fail_start = true,
            "--never-ready" => args.never_ready = true,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if args.release == 0 {
        bail!("--release N is required");
    }
    Ok(args)
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|args| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("runtime")?
            .block_on(serve(args))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("handover-test-worker[{}]: {e:#}", std::process::id());
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let pid = std::process::id();
    let listener = inherited_listener()
        .context("inherited listener")?
        .context("not supervised: no inherited listener")?;
    if args.fail_start {
        bail!("--fail-start: exiting before ready");
    }
    let mut sigterm = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let listener = TcpListener::from_std(listener).context("listener")?;
    let ctx = Arc::new(Ctx {
        release: args.release,
        role: args.role,
        client: SupervisorClient::from_env(),
    });
    eprintln!(
        "handover-test-worker[{pid}]: release {} serving on {}",
        ctx.release,
        listener.local_addr().context("local addr")?
    );

    let mut connections = JoinSet::new();
    if !args.never_ready {
        if let Some(client) = ctx.client.clone() {
            connections.spawn(async move {
                if let Err(e) = client.ready().await {
                    eprintln!("handover-test-worker[{pid}]: ready failed: {e}");
                    std::process::exit(1);
                }
            });
        }
    }
    loop {
        tokio::select! {
            _ = sigterm.recv() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let ctx = ctx.clone();
                    connections.spawn(async move { connection(stream, &ctx).await });
                }
                Err(e) => eprintln!("handover-test-worker[{pid}]: accept: {e}"),
            },
        }
        while connections.try_join_next().is_some() {}
    }
    // Stop accepting: pending connections stay in the shared socket's
    // backlog for the next worker.
    drop(listener);
    eprintln!("handover-test-worker[{pid}]: SIGTERM, finishing in-flight requests");
    let drained = tokio::time::timeout(Duration::from_millis(DRAIN_TIMEOUT_MS), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        bail!("in-flight requests did not finish within {DRAIN_TIMEOUT_MS} ms");
    }
    eprintln!("handover-test-worker[{pid}]: exiting");
    Ok(())
}

async fn connection(mut stream: TcpStream, ctx: &Ctx) {
    let head = match tokio::time::timeout(
        Duration::from_millis(READ_TIMEOUT_MS),
        read_head(&mut stream),
    )
    .await
    {
        Ok(Ok(head)) => head,
        _ => return,
    };
    let target = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_string();
    let (path, query) = target.split_once('?').unwrap_or((target.as_str(), ""));
    let (code, body) = route(path, query, ctx).await;
    let reason = if code == 200 { "OK" } else { "Error" };
    let answer = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD_BYTES {
            return Err(std::io::Error::other("bad request head"));
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

async fn route(path: &str, query: &str, ctx: &Ctx) -> (u16, String) {
    let whoami = || {
        serde_json::json!({
            "release": ctx.release,
            "pid": std::process::id(),
            "role": ctx.role,
        })
        .to_string()
    };
    match path {
        "/healthz" => (200, "ok".to_string()),
        "/whoami" => (200, whoami()),
        "/slow" => {
            let ms = param(query, "ms")
                .and_then(|ms| ms.parse::<u64>().ok())
                .unwrap_or(1_000)
                .min(MAX_SLOW_MS);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (200, whoami())
        }
        "/switch" => {
            let Some(client) = &ctx.client else {
                return (500, "not supervised".to_string());
            };
            let (Some(to), Some(binary)) = (
                param(query, "to").and_then(|n| n.parse::<u32>().ok()),
                param(query, "binary"),
            ) else {
                return (400, "need to=N&binary=PATH".to_string());
            };
            let release = Release {
                release: to,
                binary: binary.into(),
            };
            match client.switch(&release).await {
                Ok(outcome) => (
                    200,
                    serde_json::to_string(&outcome).unwrap_or_else(|e| e.to_string()),
                ),
                Err(e) => (
                    500,
                    serde_json::json!({ "error": e.to_string() }).to_string(),
                ),
            }
        }
        _ => (404, "not found".to_string()),
    }
}

/// A query parameter, percent-decoded.
fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key == name).then(|| percent_decode(value))
    })
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
