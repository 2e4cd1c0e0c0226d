//! Process tests: the controller and every node are separate OS processes of
//! the real binary, each on its own 127.x.0.y address and data dir. Every
//! test claims its own subnet (`handover_testkit::subnet`) so tests can run
//! in parallel, and its fleet kills every process it started when dropped.

mod common;

use common::*;
use handover::fleet::Fleet;
use handover::viewers::{self, ChannelTarget, ViewerConfig, ViewerReport};
use serde_json::Value;
use std::time::Duration;

/// [`common::setup`] under supervisors: a controller of `controller_release`,
/// one group `g1` of two nodes of `node_release` (not started yet), one
/// channel `ch1` with an event starting soon.
async fn setup(name: &str, controller_release: u32, node_release: u32, event_ms: u64) -> Setup {
    setup_with(
        name,
        controller_release,
        node_release,
        event_ms,
        true,
        Backend::from_env(),
    )
    .await
}

async fn setup_with(
    name: &str,
    controller_release: u32,
    node_release: u32,
    event_ms: u64,
    supervised: bool,
    backend: Backend,
) -> Setup {
    common::setup_on(
        name,
        SetupSpec {
            controller_release,
            node_release,
            event_ms,
            supervised,
            window_segments: None,
        },
        backend,
    )
    .await
}

/// Viewers on `ch1` against both nodes, until the event's ENDLIST (bounded).
async fn watch_to_end(s: &Setup, per_channel: usize) -> ViewerReport {
    sleep_until(s.event_start_ms + i64::from(SEGMENT_MS) + 300).await;
    let config = ViewerConfig {
        targets: vec![ChannelTarget {
            channel: "ch1".into(),
            node_urls: s.fleet.nodes.iter().map(|n| n.url()).collect(),
        }],
        viewers_per_channel: per_channel,
        duration: Duration::from_millis(s.event_ms + 10_000),
        request_timeout: Duration::from_secs(5),
        steady: None,
    };
    let (_tx, rx) = tokio::sync::watch::channel(false);
    viewers::run(&config, rx).await.unwrap()
}

fn assert_clean_viewing(v: &ViewerReport, viewers: u64) {
    assert_eq!(v.failed_requests, 0, "{v:?}");
    assert_eq!(v.segments_missed, 0, "{v:?}");
    assert_eq!(v.ended_streams, viewers, "{v:?}");
    assert!(v.segments_received > 0, "{v:?}");
}

async fn grant_of(fleet: &Fleet, node: &str) -> String {
    let status = fleet.op.status().await.unwrap();
    let n = status
        .nodes
        .iter()
        .find(|n| n.node.node_id == node)
        .unwrap();
    n.grant_now.as_str().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_2_group_serves_both_nodes_and_stores_every_record_once() {
    release_2_group_serves(Backend::from_env()).await;
}

/// The same with the controller's store on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_2_group_serves_both_nodes_and_stores_every_record_once_on_postgres() {
    release_2_group_serves(Backend::Postgres).await;
}

async fn release_2_group_serves(backend: Backend) {
    let name = format!("release 2 group on {backend:?}");
    let mut s = setup_with(&name, 2, 2, 6_000, true, backend).await;
    let sqlite_file = s.fleet.dir.join("controller").join("controller.db");
    assert_eq!(sqlite_file.exists(), backend == Backend::Sqlite);
    start_nodes(&mut s.fleet).await;
    let v = watch_to_end(&s, 4).await;
    assert_clean_viewing(&v, 4);

    // Primary and backup serve byte-identical segments, and ffprobe accepts them.
    let a = reqwest::get(format!("{}/hls/ch1/2.ts", s.fleet.nodes[0].url()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let b = reqwest::get(format!("{}/hls/ch1/2.ts", s.fleet.nodes[1].url()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(
        a.len() > 188 && a == b,
        "segments differ: {} vs {} bytes",
        a.len(),
        b.len()
    );
    let file = s.fleet.dir.join("segment.ts");
    std::fs::write(&file, &a).unwrap();
    let probe = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-show_streams", "-of", "json"])
        .arg(&file)
        .output()
        .expect("ffprobe is needed: apt-get install ffmpeg (.ci/run installs it)");
    assert!(
        probe.status.success(),
        "ffprobe refused the segment: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    assert!(String::from_utf8_lossy(&probe.stdout).contains("\"codec_name\": \"mp3\""));

    let r = stop_and_check(&mut s.fleet, &s.name).await;
    assert_eq!(r.translated, 0, "{r:?}");
    s.fleet.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_1_nodes_get_deliver_from_a_release_2_controller_and_their_records_land_translated()
{
    release_1_nodes_under_release_2(Backend::from_env()).await;
}

/// The same with the controller's store on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_1_nodes_get_deliver_from_a_release_2_controller_on_postgres() {
    release_1_nodes_under_release_2(Backend::Postgres).await;
}

async fn release_1_nodes_under_release_2(backend: Backend) {
    // A release-1 cluster, so the nodes hold release-1 parameters in their cache.
    // The controller's binary is swapped by hand here (no supervisor, no upgrade):
    // this is the handshake between releases, not the upgrade.
    let name = format!("release 1 nodes, release 2 controller, on {backend:?}");
    let mut s = setup_with(&name, 1, 1, 14_000, false, backend).await;
    start_nodes(&mut s.fleet).await;
    for n in ["g1-a", "g1-b"] {
        assert_eq!(grant_of(&s.fleet, n).await, "full");
    }
    sleep_until(s.event_start_ms + 2_500).await;
    // Replace the controller with release 2 on the same database: it migrates 1 -> 2.
    replace_controller(&mut s.fleet, 2, "deliver").await;
    let status = s.fleet.op.status().await.unwrap();
    assert_eq!(status.controller.schema.0, 2);
    // Nodes keep serving their release-1 parameters from the cache all the way to the end.
    let v = watch_to_end(&s, 2).await;
    assert_clean_viewing(&v, 2);

    // A release-1 node is refused parameter reads with a clear error.
    let probe = Probe::hello(&s.fleet, "probe-r1", 1).await;
    assert_eq!(probe.welcome["grant"], "deliver");
    let (code, body) = probe
        .get(
            &s.fleet,
            &format!("/node/v1/params?epoch={}", probe.epoch()),
        )
        .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (403, Some("grant_forbids_read")),
        "{body}"
    );

    let r = stop_and_check(&mut s.fleet, &s.name).await;
    assert!(r.translated > 0, "{r:?}");
    assert_eq!(
        r.translated, r.stored,
        "every release-1 record is stored translated: {r:?}"
    );
    s.fleet.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_2_node_is_fenced_by_a_release_1_controller_and_stores_nothing() {
    let mut s = setup("release 2 node, release 1 controller", 1, 2, 4_000).await;
    start_nodes(&mut s.fleet).await;
    let status = s.fleet.op.status().await.unwrap();
    for n in &status.nodes {
        assert_eq!(n.grant_now.as_str(), "fenced", "{n:?}");
        assert_eq!(format!("{:?}", n.grant_reason), "NodeNewerThanDatabase");
    }
    wait_fleet_grant(&s.fleet, "fenced").await;
    let summary: Vec<Value> = s.fleet.op.get("/api/v1/records/summary").await.unwrap();
    assert!(summary.is_empty(), "{summary:?}");
    s.fleet.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_reaches_nodes_at_once_they_queue_and_drain_after_unfence() {
    let mut s = setup("fence and unfence", 2, 2, 10_000).await;
    start_nodes(&mut s.fleet).await;
    sleep_until(s.event_start_ms + 2_000).await;
    set_fence(&s.fleet, true).await;
    let before: Vec<Value> = s.fleet.op.get("/api/v1/records/summary").await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let during: Vec<Value> = s.fleet.op.get("/api/v1/records/summary").await.unwrap();
    assert_eq!(before, during, "nothing is stored while fenced");
    let queued = node_status(&s.fleet.nodes[0].url()).await.unwrap()["outbox"]["count"]
        .as_u64()
        .unwrap();
    assert!(queued > 0, "a fenced node queues its records");
    set_fence(&s.fleet, false).await;
    let v = watch_to_end(&s, 2).await;
    assert_eq!(v.failed_requests, 0, "{v:?}");
    stop_and_check(&mut s.fleet, &s.name).await;
    s.fleet.stop_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_sigkill_and_restarted_loses_and_duplicates_nothing() {
    let mut s = setup("node SIGKILLed", 2, 2, 10_000).await;
    start_nodes(&mut s.fleet).await;
    sleep_until(s.event_start_ms + 3_000).await;
    for round in 0..2 {
        let node = s.fleet.node("g1-a").unwrap();
        node.proc.as_mut().unwrap().kill().await.unwrap();
        node.proc = None;
        tokio::time::sleep(Duration::from_millis(300 + 400 * round)).await;
        s.fleet.start_node(0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    sleep_until(s.event_start_ms + 11_000).await;
    stop_and_check(&mut s.fleet, &s.name).await;
    s.fleet.stop_all().await.unwrap();
}

/// A hand-made node speaking the protocol directly, to probe the controller.
struct Probe {
    welcome: Value,
}

impl Probe {
    /// A node that is only this test: its own group, its token traded.
    async fn hello(fleet: &Fleet, id: &str, release: u32) -> Probe {
        let ids = [id.to_owned()];
        let token = fleet.add_simulated_nodes(&ids).await.unwrap().remove(0);
        let mut body = hello_body(id, release, &token);
        body["new_credential"] = serde_json::json!(format!("{id}-credential-0123456789abcdef"));
        let (code, welcome) = post(fleet, "/node/v1/hello", None, body).await;
        assert_eq!(code, 200, "{welcome}");
        Probe { welcome }
    }

    fn credential(&self) -> &str {
        self.welcome["credential"].as_str().unwrap()
    }

    fn epoch(&self) -> u64 {
        self.welcome["epoch"].as_u64().unwrap()
    }

    async fn get(&self, fleet: &Fleet, path: &str) -> (u16, Value) {
        let r = fleet
            .http()
            .get(format!("{}{path}", fleet.controller_url()))
            .bearer_auth(self.credential())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }
}

/// A hello of node `id`, the primary of a group of its own name.
fn hello_body(id: &str, release: u32, token: &str) -> Value {
    let info = handover_core::ReleaseInfo::of(handover_core::Release(release)).unwrap();
    serde_json::json!({"v": 1, "node_id": id, "token": token, "release": release, "schema": info.schema,
        "protocol": info.protocol, "role": "primary", "group": id, "hls_url": "http://127.0.0.1:9",
        "outbox": {"next_seq": 1, "oldest_unacked_seq": null, "count": 0}, "current_events": [], "param_revision": null, "staged": []})
}

async fn post(fleet: &Fleet, path: &str, bearer: Option<&str>, body: Value) -> (u16, Value) {
    post_raw(fleet, path, bearer, serde_json::to_vec(&body).unwrap()).await
}

async fn post_raw(fleet: &Fleet, path: &str, bearer: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut req = fleet
        .http_unpooled()
        .unwrap()
        .post(format!("{}{path}", fleet.controller_url()))
        .body(body);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    let text = r.text().await.unwrap();
    let json: Value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("error answer is not JSON: {code} {text:?}"));
    (code, json)
}

/// (what, path, bearer, body, expected status, expected error code)
type BadInput<'a> = (&'a str, &'a str, Option<&'a str>, Vec<u8>, u16, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_json_error_and_changes_nothing() {
    let site = Site::new("bad input");
    let mut fleet = site.fleet();
    // Plain HTTP (loopback): what is judged is the node protocol's answers.
    // Over TLS the oversized body's 413 races the client's write: the
    // controller answers and closes before the client has sent its 2 MiB,
    // and the client sees a broken pipe instead of reading the answer.
    fleet.plain_http().unwrap();
    fleet.start_controller(2).await.unwrap();
    let probe = Probe::hello(&fleet, "probe", 2).await;
    let cred = probe.credential().to_owned();
    let epoch = probe.epoch();
    let nodes_before = fleet.op.status().await.unwrap().nodes.len();

    let mut future = hello_body("n2", 2, "token");
    future["v"] = serde_json::json!(9);
    let wrong_token = hello_body("probe", 2, "not-the-probe-s-credential");
    let mut bad_id = hello_body("../n4", 2, "token");
    bad_id["hls_url"] = serde_json::json!("http://x");
    let batch = |epoch: u64, schema: u32| {
        serde_json::json!({"v": 1, "node_id": "probe", "epoch": epoch, "schema": schema, "first_seq": 1,
            "records": [{"kind": "alert", "channel_id": 1, "node_id": "probe", "produced_at_ms": 1}]})
    };
    let cases: Vec<BadInput> = vec![
        (
            "malformed hello",
            "/node/v1/hello",
            None,
            b"{not json".to_vec(),
            400,
            "malformed",
        ),
        (
            "unknown version",
            "/node/v1/hello",
            None,
            serde_json::to_vec(&future).unwrap(),
            400,
            "unsupported_version",
        ),
        (
            "wrong token",
            "/node/v1/hello",
            None,
            serde_json::to_vec(&wrong_token).unwrap(),
            401,
            "unauthorized",
        ),
        (
            "bad node id",
            "/node/v1/hello",
            None,
            serde_json::to_vec(&bad_id).unwrap(),
            400,
            "invalid_field",
        ),
        (
            "oversized hello",
            "/node/v1/hello",
            None,
            vec![b' '; 2 << 20],
            413,
            "too_large",
        ),
        (
            "batch without credential",
            "/node/v1/records",
            None,
            serde_json::to_vec(&batch(epoch, 2)).unwrap(),
            401,
            "unauthorized",
        ),
        (
            "batch, stale epoch",
            "/node/v1/records",
            Some(&cred),
            serde_json::to_vec(&batch(epoch + 7, 2)).unwrap(),
            409,
            "stale_epoch",
        ),
        (
            "batch, unknown channel",
            "/node/v1/records",
            Some(&cred),
            serde_json::to_vec(&batch(epoch, 2)).unwrap(),
            422,
            "untranslatable",
        ),
        (
            "batch, wrong schema",
            "/node/v1/records",
            Some(&cred),
            serde_json::to_vec(&batch(epoch, 3)).unwrap(),
            400,
            "schema_mismatch",
        ),
        (
            "deliver with grant full",
            "/node/v1/deliver",
            Some(&cred),
            serde_json::to_vec(&batch(epoch, 2)).unwrap(),
            403,
            "grant_forbids_write",
        ),
        (
            "oversized batch",
            "/node/v1/records",
            Some(&cred),
            vec![b' '; 2 << 20],
            413,
            "too_large",
        ),
        (
            "unknown endpoint",
            "/node/v9/hello",
            None,
            b"{}".to_vec(),
            404,
            "not_found",
        ),
    ];
    for (what, path, bearer, body, status, code) in cases {
        let (got_status, got) = post_raw(&fleet, path, bearer, body).await;
        assert_eq!(
            (got_status, got["error"].as_str()),
            (status, Some(code)),
            "{what}: {got}"
        );
        assert!(
            got["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {got}"
        );
    }
    // Stale epoch after a real fence, on the heartbeat too.
    post_empty(&fleet, "/api/v1/fence").await;
    let hb = serde_json::json!({"v": 1, "node_id": "probe", "epoch": epoch, "outbox": {"next_seq": 1, "oldest_unacked_seq": null, "count": 0}, "current_events": [], "staged": []});
    let (code, body) = post(&fleet, "/node/v1/heartbeat", Some(&cred), hb).await;
    assert_eq!(
        (code, body["error"].as_str()),
        (409, Some("stale_epoch")),
        "{body}"
    );
    assert!(body["message"]
        .as_str()
        .unwrap()
        .contains("handshake again"));

    let status = fleet.op.status().await.unwrap();
    assert_eq!(
        status.nodes.len(),
        nodes_before,
        "no node was registered by bad input"
    );
    let summary: Vec<Value> = fleet.op.get("/api/v1/records/summary").await.unwrap();
    assert!(
        summary.is_empty(),
        "no record was stored by bad input: {summary:?}"
    );
    let (code, _) = probe.get(&fleet, "/healthz").await;
    assert_eq!(code, 200, "the controller is still up");
    fleet.stop_all().await.unwrap();
}

/// The checker itself: records removed behind the system's back, one from
/// the database and one from a node's outbox, are each reported lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_the_checker_reports_records_removed_behind_the_systems_back() {
    // On SQLite whatever the backend asked: it edits the database file by hand.
    let mut s = setup_with("checker canary", 2, 2, 8_000, true, Backend::Sqlite).await;
    start_nodes(&mut s.fleet).await;
    sleep_until(s.event_start_ms + 2_500).await;
    // Fenced, the nodes queue: their outboxes hold records that were never stored.
    set_fence(&s.fleet, true).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    s.fleet.stop_nodes().await.unwrap();
    let clean = s.fleet.check().await.unwrap();
    assert_eq!(
        (clean.lost, clean.duplicated, clean.unexpected),
        (0, 0, 0),
        "{clean:?}"
    );
    assert!(clean.queued > 0 && clean.stored > 0, "{clean:?}");

    let db = s.fleet.dir.join("controller").join("controller.db");
    let ctl = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let gone = sqlx::query("DELETE FROM records WHERE node_id = 'g1-a' AND seq = 1")
        .execute(&ctl)
        .await
        .unwrap();
    assert_eq!(gone.rows_affected(), 1);
    ctl.close().await;
    let node_db = s.fleet.nodes[1].data_dir.join("node.db");
    let node = sqlx::SqlitePool::connect(&format!("sqlite://{}", node_db.display()))
        .await
        .unwrap();
    let gone = sqlx::query("DELETE FROM outbox WHERE seq = (SELECT MAX(seq) FROM outbox)")
        .execute(&node)
        .await
        .unwrap();
    assert_eq!(gone.rows_affected(), 1);
    node.close().await;

    let r = s.fleet.check().await.unwrap();
    assert_eq!(
        r.lost, 2,
        "one stored record and one queued record are missing: {r:?}"
    );
    assert_eq!(
        (r.stored, r.queued),
        (clean.stored - 1, clean.queued - 1),
        "{r:?}"
    );
    s.fleet.stop_all().await.unwrap();
}

/// On PostgreSQL, a store a newer controller migrated goes back to the copy
/// taken before the migration (`handover db restore-pre-upgrade`, refused
/// while a controller is connected), and the old release serves it again
/// with every record it held, exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_store_goes_back_to_its_pre_upgrade_copy() {
    let name = "PostgreSQL store restored to its pre-upgrade copy";
    let mut s = setup_with(name, 1, 1, 4_000, false, Backend::Postgres).await;
    start_nodes(&mut s.fleet).await;
    sleep_until(s.event_end_ms() + 1_000).await;
    let before = stop_and_check(&mut s.fleet, name).await;
    assert!(before.stored > 0, "{before:?}");

    // Release 2 migrates the store, after copying it.
    s.fleet
        .controller
        .take()
        .unwrap()
        .terminate()
        .await
        .unwrap();
    s.fleet.start_controller(2).await.unwrap();
    let status = s.fleet.op.status().await.unwrap();
    assert_eq!(status.cluster.schema.0, 2);
    let db = |args: &[&str]| {
        let url = s.fleet.database.as_ref().unwrap().url().to_owned();
        std::process::Command::new(exe())
            .arg("db")
            .args(args)
            .env("HANDOVER_DATABASE", url)
            .output()
            .unwrap()
    };
    let copies = db(&["copies"]);
    let listed = String::from_utf8_lossy(&copies.stdout);
    assert!(
        copies.status.success() && listed.contains("schema 1:"),
        "{listed}"
    );
    let refused = db(&["restore-pre-upgrade", "--schema", "1"]);
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && why.contains("a controller is connected"),
        "{why}"
    );

    s.fleet
        .controller
        .take()
        .unwrap()
        .terminate()
        .await
        .unwrap();
    let restored = db(&["restore-pre-upgrade", "--schema", "1"]);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    s.fleet.start_controller(1).await.unwrap();
    let status = s.fleet.op.status().await.unwrap();
    assert_eq!((status.cluster.schema.0, status.cluster.release.0), (1, 1));
    let after = s.fleet.check().await.unwrap();
    assert_exact(name, &after);
    assert_eq!(after.stored, before.stored, "{after:?}");
    s.fleet.stop_all().await.unwrap();
}
