//! The attacks of issue 10 on node identity, with real processes: each
//! fails, and changes nothing (the real nodes' records are all stored
//! exactly once, viewers see no failed request). The controller's own
//! judgement of every hello is tested in the controller crate
//! (`tests/identity.rs`); docs/security.md lists each promise and its test.

mod common;

use common::*;
use handover::viewers::{self, ChannelTarget, ViewerConfig, ViewerReport};
use handover_core::wire::Role;
use serde_json::{json, Value};
use std::time::Duration;

/// A request from the attacker (an HTTP client on the fleet's subnet).
async fn attack(
    http: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    body: Value,
) -> (u16, Value) {
    let mut req = http.post(url).json(&body);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn hello(id: &str, role: &str, group: &str, token: &str, hls_url: &str) -> Value {
    let info = handover_core::ReleaseInfo::of(handover_core::Release(2)).unwrap();
    json!({"v": 1, "node_id": id, "token": token, "release": 2, "schema": 2,
        "protocol": info.protocol, "role": role, "group": group, "hls_url": hls_url,
        "outbox": {"next_seq": 1, "oldest_unacked_seq": null, "count": 0},
        "current_events": [], "param_revision": null, "staged": [],
        "new_credential": "attacker-chosen-credential-0123456789"})
}

fn code(body: &Value) -> &str {
    body["error"].as_str().unwrap_or("")
}

async fn viewers_until_end(s: &Setup) -> ViewerReport {
    sleep_until(s.event_start_ms + i64::from(SEGMENT_MS) + 300).await;
    let config = ViewerConfig {
        targets: vec![ChannelTarget {
            channel: "ch1".into(),
            node_urls: s.fleet.nodes[..2].iter().map(|n| n.url()).collect(),
        }],
        viewers_per_channel: 2,
        duration: Duration::from_millis(s.event_ms + 10_000),
        request_timeout: Duration::from_secs(5),
        steady: None,
    };
    let (_tx, rx) = tokio::sync::watch::channel(false);
    viewers::run(&config, rx).await.unwrap()
}

/// g1-b's credential as its node.db holds it: over TLS, its client
/// certificate's digest (public: anyone who saw the certificate knows it).
async fn node_credential(data_dir: &std::path::Path) -> (String, bool) {
    let db = data_dir.join("node.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display()))
        .await
        .unwrap();
    let get = |key: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT value FROM kv WHERE key = ?")
                .bind(key)
                .fetch_optional(&pool)
                .await
                .unwrap()
        }
    };
    let credential = get("credential").await.unwrap();
    let has_key = get("client_identity").await.is_some();
    pool.close().await;
    (credential, has_key)
}

/// An insider owns a legitimate node (`g2-a`, with its own token and
/// client certificate) and wants g1-b's identity: to fill g1-b's next seqs
/// first so the real records are acknowledged and trimmed but never
/// stored, to report another release, or to point viewers elsewhere. Every
/// way in is refused while g1 runs its event with viewers watching, and
/// afterwards g1-b's registration is its own and every record of g1 is
/// stored once. The real nodes authenticate by their certificates: what
/// their node.db names as credential is public, and refused as a bearer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_one_else_can_claim_a_node_s_identity() {
    let mut s = setup(
        "identity claims",
        SetupSpec {
            controller_release: 2,
            node_release: 2,
            event_ms: 8_000,
            supervised: false,
            window_segments: None,
        },
    )
    .await;
    start_nodes(&mut s.fleet).await;
    let ids = ["g2-a".to_owned()];
    let attacker_token = s.fleet.add_simulated_nodes(&ids).await.unwrap().remove(0);
    let base = s.fleet.controller_url();
    // The attacker is on the path too: TLS, with the cluster's CA, and
    // their own node's client certificate (or another they made).
    let http = s.fleet.http();
    let trust = s.fleet.trust().unwrap().unwrap();
    let with_cert = || {
        let (id, _) = handover_net::tls::ClientIdentity::generate("g2-a").unwrap();
        trust
            .clone()
            .with_identity(id)
            .apply(reqwest::Client::builder())
            .unwrap()
            .build()
            .unwrap()
    };
    let (own, other) = (with_cert(), with_cert());
    let (b_credential, b_has_key) = node_credential(&s.fleet.nodes[1].data_dir).await;
    assert!(
        b_credential.starts_with("cert-sha256:") && b_has_key,
        "over TLS a node's credential is its certificate: {b_credential}"
    );
    let hello_url = format!("{base}/node/v1/hello");
    let (status, welcome) = attack(
        &own,
        &hello_url,
        None,
        hello(
            "g2-a",
            "primary",
            "g2-a",
            &attacker_token,
            "http://127.0.0.1:9/",
        ),
    )
    .await;
    assert_eq!(status, 200, "the attacker's own node joins: {welcome}");
    let attacker_credential = welcome["credential"].as_str().unwrap().to_owned();
    assert!(
        attacker_credential.starts_with("cert-sha256:"),
        "{attacker_credential}"
    );
    let watching = tokio::spawn({
        let s_targets = s.fleet.nodes[..2]
            .iter()
            .map(|n| n.url())
            .collect::<Vec<_>>();
        let (start, event_ms) = (s.event_start_ms, s.event_ms);
        async move {
            sleep_until(start + i64::from(SEGMENT_MS) + 300).await;
            let config = ViewerConfig {
                targets: vec![ChannelTarget {
                    channel: "ch1".into(),
                    node_urls: s_targets,
                }],
                viewers_per_channel: 2,
                duration: Duration::from_millis(event_ms + 10_000),
                request_timeout: Duration::from_secs(5),
                steady: None,
            };
            let (_tx, rx) = tokio::sync::watch::channel(false);
            viewers::run(&config, rx).await.unwrap()
        }
    });
    // Mid-event, when g1-b has records in flight.
    sleep_until(s.event_start_ms + 3_000).await;
    let next_seq = node_status(&s.fleet.nodes[1].url())
        .await
        .and_then(|st| st["outbox"]["next_seq"].as_u64())
        .unwrap();
    let evil_url = "http://attacker.invalid/";
    type Attempt<'a> = (
        &'a str,
        &'a reqwest::Client,
        Value,
        Option<&'a str>,
        u16,
        &'a str,
    );
    let attempts: Vec<Attempt> = vec![
        (
            "hello as g1-b with the attacker's own token (spent, and another node's)",
            &own,
            hello("g1-b", "backup", "g1", &attacker_token, evil_url),
            None,
            401,
            "unauthorized",
        ),
        (
            "hello as g1-b with the attacker's certificate",
            &own,
            hello("g1-b", "backup", "g1", &b_credential, evil_url),
            None,
            401,
            "unauthorized",
        ),
        (
            "hello as g1-b with g1-b's public credential, as token and bearer",
            &http,
            hello("g1-b", "backup", "g1", &b_credential, evil_url),
            Some(&b_credential),
            401,
            "unauthorized",
        ),
        (
            "hello as g1-b with a certificate made for the occasion",
            &other,
            hello("g1-b", "backup", "g1", &b_credential, evil_url),
            Some(&b_credential),
            401,
            "unauthorized",
        ),
        (
            "hello as the attacker's own node, claiming to be g1's primary",
            &own,
            hello("g2-a", "primary", "g1", &attacker_credential, evil_url),
            None,
            403,
            "identity_mismatch",
        ),
        (
            "hello as a new node zz, a third primary of g1",
            &own,
            hello("zz", "primary", "g1", &attacker_credential, evil_url),
            None,
            403,
            "unknown_node",
        ),
    ];
    for (what, client, body, bearer, want_status, want_code) in attempts {
        let (status, body) = attack(client, &hello_url, bearer, body).await;
        assert_eq!(
            (status, code(&body)),
            (want_status, want_code),
            "{what}: {body}"
        );
    }
    // Records for g1-b's next seqs, under the attacker's certificate, and
    // under g1-b's public credential as a bearer.
    let batch = json!({"v": 1, "node_id": "g1-b", "epoch": welcome["epoch"], "schema": 2,
        "first_seq": next_seq, "records": [{"kind": "alert", "channel_id": 1, "node_id": "g1-b",
        "produced_at_ms": now_ms(), "message": "forged"}]});
    for (what, client, bearer) in [
        ("the attacker's certificate", &own, None),
        (
            "g1-b's credential as a bearer",
            &http,
            Some(b_credential.as_str()),
        ),
    ] {
        let (status, body) = attack(
            client,
            &format!("{base}/node/v1/records"),
            bearer,
            batch.clone(),
        )
        .await;
        assert_eq!(
            (status, code(&body)),
            (401, "unauthorized"),
            "forged batch with {what}: {body}"
        );
    }

    let v = watching.await.unwrap();
    judge_viewers(&s.name, &v, Viewing::Clean);
    let status = s.fleet.op.status().await.unwrap();
    let b = status
        .nodes
        .iter()
        .find(|n| n.node.node_id == "g1-b")
        .unwrap();
    assert_eq!(
        b.node.hls_url,
        s.fleet.nodes[1].url(),
        "g1-b's registration is its own"
    );
    assert!(status.nodes.iter().all(|n| n.node.node_id != "zz"));
    stop_and_check(&mut s.fleet, &s.name).await;
    s.fleet.stop_all().await.unwrap();
}

/// Tried as a new user would: a node `zz` started with `--role primary
/// --group g1` on a cluster whose g1 is `g1-a` and `g1-b`, with some token,
/// is refused with a clear error, gets no parameters and produces nothing,
/// while g1 runs on undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_the_groups_do_not_name_is_refused_and_produces_nothing() {
    let mut s = setup(
        "unconfigured node",
        SetupSpec {
            controller_release: 2,
            node_release: 2,
            event_ms: 6_000,
            supervised: false,
            window_segments: None,
        },
    )
    .await;
    start_nodes(&mut s.fleet).await;
    let zz = s.fleet.add_node("zz", Role::Primary, "g1", 2);
    s.fleet.nodes[zz].joined = true;
    s.fleet.nodes[zz].env.push((
        "HANDOVER_BOOTSTRAP_TOKEN".into(),
        "hob_0123456789abcdef0123456789abcdef".into(),
    ));
    s.fleet.start_node(zz).await.unwrap();
    let url = s.fleet.nodes[zz].url();
    let seen = wait_for("zz to be refused", Duration::from_secs(20), || async {
        let st = node_status(&url).await?;
        st["hello_error"].as_str().map(str::to_owned)
    })
    .await;
    assert!(seen.contains("unknown_node"), "{seen}");
    assert!(seen.contains("handover node add zz"), "{seen}");
    let v = viewers_until_end(&s).await;
    judge_viewers(&s.name, &v, Viewing::Clean);
    let st = node_status(&url).await.unwrap();
    assert_eq!(st["grant"], Value::Null, "{st}");
    assert_eq!(st["param_revision"], Value::Null, "no parameters: {st}");
    assert_eq!(st["produced"], 0, "{st}");
    let playlist = reqwest::get(format!("{url}/hls/ch1/index.m3u8"))
        .await
        .unwrap();
    assert_eq!(playlist.status().as_u16(), 404);
    let status = s.fleet.op.status().await.unwrap();
    assert!(
        status.nodes.iter().all(|n| n.node.node_id != "zz"),
        "{status:?}"
    );
    stop_and_check(&mut s.fleet, &s.name).await;
    s.fleet.stop_all().await.unwrap();
}

/// `handover node remove` revokes a running node at once: its certificate
/// and its spent token are refused, the controller forgets it, and what it
/// delivered before stays stored. The operator runs it with the operator
/// certificate of `handover init` and no token; the read-only certificate
/// and one the controller never pinned may not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_remove_revokes_a_running_node() {
    let mut s = setup(
        "node remove",
        SetupSpec {
            controller_release: 2,
            node_release: 2,
            event_ms: 4_000,
            supervised: false,
            window_segments: None,
        },
    )
    .await;
    start_nodes(&mut s.fleet).await;
    sleep_until(s.event_end_ms() + 1_000).await;
    let b_url = s.fleet.nodes[1].url();
    wait_for("g1-b to drain", Duration::from_secs(20), || async {
        let st = node_status(&b_url).await?;
        (st["outbox"]["count"] == 0).then_some(())
    })
    .await;
    let stored_before = s.fleet.stored_records("g1-b").await.unwrap().len();
    assert!(stored_before > 0);
    // The operator removes it with the client certificate of `handover
    // init` (no token); the read-only certificate, a certificate nobody
    // pinned, and a private key others may read are refused first.
    let pki = s.fleet.pki.clone().unwrap();
    let stranger = s.fleet.dir.join("stranger.pem");
    let (made, _) = handover_net::tls::ClientIdentity::generate("operator").unwrap();
    std::fs::write(&stranger, made.pem()).unwrap();
    let loose = s.fleet.dir.join("loose.pem");
    std::fs::copy(pki.join("operator.pem"), &loose).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&stranger, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let remove_with = |identity: &std::path::Path| {
        let out = std::process::Command::new(exe())
            .args(["node", "remove", "g1-b", "--json", "--controller"])
            .arg(s.fleet.controller_url())
            .arg("--identity")
            .arg(identity)
            .env_remove("HANDOVER_OPERATOR_TOKEN")
            .envs(s.fleet.ca_env())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (out, stderr)
    };
    for (identity, refusal) in [
        (pki.join("read-only.pem"), "forbidden"),
        (stranger.clone(), "unauthorized"),
        (loose.clone(), "chmod 600"),
    ] {
        let (out, stderr) = remove_with(&identity);
        assert!(!out.status.success(), "{}", identity.display());
        assert!(stderr.contains(refusal), "{}: {stderr}", identity.display());
    }
    assert!(
        s.fleet
            .op
            .status()
            .await
            .unwrap()
            .nodes
            .iter()
            .any(|n| n.node.node_id == "g1-b"),
        "a refused removal removed nothing"
    );
    let (out, stderr) = remove_with(&pki.join("operator.pem"));
    assert!(out.status.success(), "{stderr}");
    let removed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(removed["node_id"], "g1-b");
    let refused = wait_for("g1-b to be refused", Duration::from_secs(20), || async {
        let st = node_status(&b_url).await?;
        st["hello_error"].as_str().map(str::to_owned)
    })
    .await;
    assert!(refused.contains("unauthorized"), "{refused}");
    let status = s.fleet.op.status().await.unwrap();
    assert!(status.nodes.iter().all(|n| n.node.node_id != "g1-b"));
    // What it delivered stays (it may have delivered more while the refused
    // removals ran); once refused, nothing more of it is stored.
    let after = s.fleet.stored_records("g1-b").await.unwrap().len();
    assert!(after >= stored_before, "{after} < {stored_before}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.fleet.stored_records("g1-b").await.unwrap().len(), after);
    s.fleet.stop_all().await.unwrap();
}
