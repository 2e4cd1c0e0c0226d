//! Limits on every listener, with real processes: while 2,000 connections
//! that never send a whole request (half silent, half sending a header a
//! byte a second) are opened to the primary node and to the controller,
//! both running with a connection cap below that, viewers see no failed
//! request, the nodes keep their `full` grant, the primary's records keep
//! reaching the database and are all stored exactly once, and the servers
//! close every attack connection (by making room at the cap, or by the
//! header read timeout), each within a bound.

mod common;

use anyhow::Context;
use common::*;
use handover::fleet::Fleet;
use handover_net::limits::{CONTROLLER_HEADER_READ_TIMEOUT_MS, NODE_HEADER_READ_TIMEOUT_MS};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// Attack connections per target: half silent, half slow.
const ATTACK_CONNECTIONS: usize = 2_000;
/// The cap the primary and the controller run with here
/// (`HANDOVER_CONNECTIONS_MAX`): below the attack, so a full listener's
/// rule (a connection without a request makes room) is exercised as well
/// as the timeouts.
const CONNECTIONS_MAX: &str = "1500";
/// A slow connection sends one more byte of its header this often.
const DRIP: Duration = Duration::from_secs(1);
/// What a slow connection drips: a request header that never ends.
const SLOW_HEADER: &[u8] = b"GET /hls/ch1/index.m3u8 HTTP/1.1\r\nhost: node\r\nx-slow: ";
/// Open files the test process needs: the attack on both targets, the
/// viewers and the fleet's own, with room.
const OPEN_FILES_NEEDED: u64 = 2 * ATTACK_CONNECTIONS as u64 + 1_024;
/// The event: long enough to hold the whole attack and its closing.
const EVENT_MS: u64 = 45_000;
/// How often the test checks the grants while the attack runs.
const GRANT_POLL: Duration = Duration::from_millis(500);
/// A request of the test's, like a viewer's (`spawn_viewers`), may take
/// this long: a new connection may wait in the backlog while the listener
/// is at its cap until a connection becomes evictable
/// (`Limits::evictable_idle_ms`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on the server closing one attack connection after it opened: the
/// longer header read timeout of the two targets, plus room for a loaded
/// machine.
fn close_bound() -> Duration {
    Duration::from_millis(CONTROLLER_HEADER_READ_TIMEOUT_MS.max(NODE_HEADER_READ_TIMEOUT_MS))
        + Duration::from_secs(20)
}

/// Raises the soft open-file limit to what the test needs (up to the hard
/// limit); the fleet's processes inherit it.
fn raise_open_files() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft >= OPEN_FILES_NEEDED {
        return;
    }
    assert!(
        hard >= OPEN_FILES_NEEDED,
        "this test needs {OPEN_FILES_NEEDED} open files; the hard limit is {hard} (raise `ulimit -Hn`)"
    );
    setrlimit(Resource::RLIMIT_NOFILE, OPEN_FILES_NEEDED, hard).unwrap();
}

/// How one attack connection ended.
#[derive(Debug, Default)]
struct Attack {
    opened: usize,
    /// Closed by the server (EOF or reset) within the bound.
    closed: usize,
    /// Still open when the bound passed.
    kept: usize,
    /// Could not even connect.
    refused: usize,
}

/// Opens `n` connections to `to`, half silent and half slow, each waiting
/// (bounded) for the server to close it.
fn attack(to: SocketAddr, n: usize) -> tokio::task::JoinHandle<Attack> {
    tokio::spawn(async move {
        let bound = close_bound();
        let mut conns = JoinSet::new();
        for k in 0..n {
            let slow = k % 2 == 1;
            conns.spawn(async move {
                let Ok(mut tcp) = TcpStream::connect(to).await else {
                    return None;
                };
                Some(
                    tokio::time::timeout(bound, closed_by_server(&mut tcp, slow))
                        .await
                        .is_ok(),
                )
            });
        }
        let mut a = Attack::default();
        while let Some(r) = conns.join_next().await {
            match r.unwrap() {
                None => a.refused += 1,
                Some(true) => {
                    a.opened += 1;
                    a.closed += 1;
                }
                Some(false) => {
                    a.opened += 1;
                    a.kept += 1;
                }
            }
        }
        a
    })
}

/// Sends nothing (silent) or a byte of a header every [`DRIP`] (slow)
/// until the server closes the connection.
async fn closed_by_server(tcp: &mut TcpStream, slow: bool) {
    let (mut rd, mut wr) = tcp.split();
    let drip = async {
        if !slow {
            return std::future::pending().await;
        }
        for b in SLOW_HEADER.iter().chain(std::iter::repeat(&b'a')) {
            if wr.write_all(&[*b]).await.is_err() {
                return;
            }
            tokio::time::sleep(DRIP).await;
        }
    };
    let eof = async {
        let mut buf = [0u8; 512];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        () = drip => {}
        () = eof => {}
    }
}

/// The grant every node has, as the operator sees it and as the node says
/// on its own `/status` (asked on a new connection each time, as a viewer
/// that joins).
async fn grants(fleet: &Fleet) -> anyhow::Result<Vec<String>> {
    let status = fleet.op.status().await?;
    let mut seen: Vec<String> = status
        .nodes
        .iter()
        .map(|n| format!("{}: {}", n.node.node_id, n.grant_now.as_str()))
        .collect();
    for n in &fleet.nodes {
        let own: serde_json::Value = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .build()?
            .get(format!("{}/status", n.url()))
            .send()
            .await
            .with_context(|| format!("{}'s /status", n.id))?
            .json()
            .await?;
        let grant = own["grant"].as_str().unwrap_or("?");
        seen.push(format!("{} says: {grant}", n.id));
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_connections_starve_no_viewer_and_no_node() {
    raise_open_files();
    let mut c = cluster(
        "limits",
        Options {
            groups: 1,
            event_ms: EVENT_MS,
            release: 2,
            controller_env: vec![("HANDOVER_CONNECTIONS_MAX", CONNECTIONS_MAX)],
            node_env: Some(("g1-a", vec![("HANDOVER_CONNECTIONS_MAX", CONNECTIONS_MAX)])),
            viewer_slack_ms: 20_000,
            ..Options::default()
        },
    )
    .await;
    let viewers = spawn_viewers(&c, REQUEST_TIMEOUT);
    // Viewers playing and records flowing before the attack starts.
    sleep_until(c.event_start_ms + 3_000).await;
    let stored_before = c.fleet.stored_records("g1-a").await.unwrap().len();

    let primary = c.fleet.nodes.iter().find(|n| n.id == "g1-a").unwrap().addr;
    let on_node = attack(primary, ATTACK_CONNECTIONS);
    let on_controller = attack(c.fleet.controller_addr(), ATTACK_CONNECTIONS);
    let mut checks = 0;
    while !(on_node.is_finished() && on_controller.is_finished()) {
        let seen = grants(&c.fleet)
            .await
            .unwrap_or_else(|e| panic!("a request failed under the attack: {e:#}"));
        assert!(
            seen.iter().all(|g| g.ends_with(": full")),
            "a node lost its grant under the attack: {seen:?}"
        );
        checks += 1;
        tokio::time::sleep(GRANT_POLL).await;
    }
    let (on_node, on_controller) = (on_node.await.unwrap(), on_controller.await.unwrap());
    eprintln!("limits: attack on the primary {on_node:?}, on the controller {on_controller:?}; grants checked {checks} times");
    for (target, a) in [("primary", &on_node), ("controller", &on_controller)] {
        assert_eq!(a.refused, 0, "{target}: connections refused: {a:?}");
        assert_eq!(
            (a.closed, a.kept),
            (ATTACK_CONNECTIONS, 0),
            "{target}: every attack connection is closed by the server within {:?}: {a:?}",
            close_bound()
        );
    }
    let stored_after = c.fleet.stored_records("g1-a").await.unwrap().len();
    assert!(
        stored_after > stored_before,
        "the primary's records kept reaching the database ({stored_before} before, {stored_after} after)"
    );
    let seen = grants(&c.fleet).await.unwrap();
    assert!(seen.iter().all(|g| g.ends_with(": full")), "{seen:?}");

    let v = viewers.await.unwrap().unwrap();
    judge_viewers(&c.name, &v, Viewing::Clean);
    stop_and_check(&mut c.fleet, &c.name).await;
    c.fleet.stop_all().await.unwrap();
}
