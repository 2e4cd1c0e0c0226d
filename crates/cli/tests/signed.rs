//! Signed artifacts on real processes: a release-1 controller and nodes
//! that trust key A refuse, before anything runs, an artifact signed by
//! another key, an unsigned one, one whose binary or manifest changed after
//! signing; the cluster keeps serving and no upgrade starts. A node whose
//! keys differ refuses to stage a properly signed artifact: the upgrade
//! waits in `stage` naming it and the node's /status says why. Once its
//! keys agree, the properly signed artifact upgrades the cluster to
//! release 2.

mod common;

use base64::Engine as _;
use common::{exe, node_status, post_empty, start_upgrade, Site};
use handover::artifact::{self, KeyFiles};
use handover::fleet::Fleet;
use handover_controller::artifacts::{MANIFEST_HEADER, SIGNATURE_HEADER};
use handover_core::api::{ChannelSpec, EventSpec};
use handover_core::artifact::{Manifest, BINARY_FILE, MANIFEST_FILE, SIGNATURE_FILE};
use handover_core::params::Group;
use handover_core::upgrade::{Phase, Status};
use handover_core::wire::Role;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const CHANNEL: &str = "news";

/// A copy of the artifact in `src` at `dst`: the manifest copied, the
/// (large) binary hard-linked.
fn copy_artifact(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join(MANIFEST_FILE), dst.join(MANIFEST_FILE)).unwrap();
    std::fs::hard_link(src.join(BINARY_FILE), dst.join(BINARY_FILE)).unwrap();
}

/// The cluster still serves: every node is healthy and plays the channel,
/// `handover status` works, no upgrade was started and nothing was stored.
async fn assert_still_serving(fleet: &Fleet, after: &str) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for n in &fleet.nodes {
        let health = http
            .get(format!("{}/healthz", n.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status().as_u16(), 200, "{after}: {} /healthz", n.id);
        let playlist = http
            .get(format!("{}/hls/{CHANNEL}/index.m3u8", n.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(
            playlist.status().as_u16(),
            200,
            "{after}: {} stopped serving {CHANNEL}",
            n.id
        );
    }
    let out = tokio::process::Command::new(exe())
        .args(["status", "--controller", &fleet.controller_url()])
        .env("HANDOVER_OPERATOR_TOKEN", &fleet.operator_token)
        .envs(fleet.ca_env())
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{after}: `handover status` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("controller  release 1"), "{after}: {text}");
    let status = fleet.op.status().await.unwrap();
    assert_eq!(status.nodes.len(), fleet.nodes.len(), "{after}");
    assert!(
        status.nodes.iter().all(|n| n.node.release.0 == 1),
        "{after}"
    );
    let up = handover::upgrade::status(&fleet.op).await.unwrap();
    assert!(up.upgrade.is_none(), "{after}: an upgrade started: {up:?}");
    let stored: Vec<Manifest> = fleet.op.get("/api/v1/artifacts").await.unwrap();
    assert!(stored.is_empty(), "{after}: kept {stored:?}");
}

/// Uploads `dir` with the CLI; returns the error text (it must fail).
async fn refused_upload(fleet: &Fleet, dir: &Path) -> String {
    let err = artifact::upload(&fleet.op, dir)
        .await
        .expect_err("the upload should have been refused");
    format!("{err:#}")
}

/// Restarts node `i` trusting only `key`.
async fn restart_node_trusting(fleet: &mut Fleet, i: usize, key: &Path) {
    fleet.nodes[i]
        .proc
        .take()
        .unwrap()
        .terminate()
        .await
        .unwrap();
    let keep = std::mem::replace(&mut fleet.trusted_keys, vec![key.to_path_buf()]);
    let started = fleet.start_node(i).await;
    fleet.trusted_keys = keep;
    started.unwrap();
    fleet.wait_nodes_registered().await.unwrap();
}

fn keygen(dir: &Path, name: &str) -> KeyFiles {
    artifact::keygen(&dir.join(name)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_an_artifact_signed_by_a_trusted_key_upgrades_the_cluster() {
    let site = Site::new("signed artifacts");
    let tmp = site.path();
    let key_a = keygen(tmp, "key-a");
    let key_b = keygen(tmp, "key-b");

    let mut fleet = site.fleet_in(&exe(), &tmp.join("fleet"));
    fleet.trusted_keys = vec![key_a.public.clone()];
    fleet.start_controller(1).await.unwrap();
    let group = Group {
        name: "g1".into(),
        primary: "g1-a".into(),
        backup: "g1-b".into(),
    };
    let _: Value = fleet.op.post("/api/v1/groups", &group).await.unwrap();
    let spec = ChannelSpec {
        name: CHANNEL.into(),
        title: None,
        segment_ms: 1000,
        ladder: vec![],
        window_segments: None,
    };
    let _: Value = fleet.op.post("/api/v1/channels", &spec).await.unwrap();
    let event = EventSpec {
        channel: CHANNEL.into(),
        group: group.name.clone(),
        start_ms: handover::client::now_ms() - 5_000,
        duration_ms: 30 * 60_000,
    };
    let _: Value = fleet.op.post("/api/v1/events", &event).await.unwrap();
    fleet.add_node(&group.primary, Role::Primary, &group.name, 1);
    fleet.add_node(&group.backup, Role::Backup, &group.name, 1);
    for i in 0..fleet.nodes.len() {
        fleet.start_node(i).await.unwrap();
    }
    fleet.wait_nodes_registered().await.unwrap();
    // The nodes' parameters (and so their playlists) arrive after hello.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for n in &fleet.nodes {
        let url = format!("{}/hls/{CHANNEL}/index.m3u8", n.url());
        let mut ok = false;
        for _ in 0..100 {
            if http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "{} never served {CHANNEL}", n.id);
    }
    assert_still_serving(&fleet, "start").await;
    let node = node_status(&fleet.nodes[0].url()).await.unwrap();
    assert_eq!(node["trusted_keys"], serde_json::json!([key_a.key_id]));
    assert_eq!(node["stage_error"], Value::Null);

    // The real release-2 artifact; every case below is a copy of it.
    let real = tmp.join("real");
    let manifest = artifact::create(&exe(), Some(2), &real).unwrap();

    // (1) Signed with key B, which nobody trusts.
    let by_b = tmp.join("by-b");
    copy_artifact(&real, &by_b);
    artifact::sign(&by_b, &key_b.secret).unwrap();
    let err = refused_upload(&fleet, &by_b).await;
    assert!(err.contains("untrusted_key (400"), "{err}");
    assert!(
        err.contains(&key_b.key_id) && err.contains(&key_a.key_id),
        "{err}"
    );
    assert_still_serving(&fleet, "signed by key B").await;
    // Nothing was kept, so no upgrade can start from it.
    let start = handover::upgrade::start(
        &fleet.op,
        &handover_core::api::UpgradeRequest::new(&manifest.id(), "failover"),
    )
    .await;
    assert!(start.is_err(), "{start:?}");
    assert_still_serving(&fleet, "upgrade start refused").await;

    // (2) Unsigned.
    let unsigned = tmp.join("unsigned");
    copy_artifact(&real, &unsigned);
    let err = refused_upload(&fleet, &unsigned).await;
    assert!(err.contains("unsigned (400"), "{err}");
    assert_still_serving(&fleet, "unsigned").await;

    // (3) Signed with A, binary changed after signing: the CLI refuses to
    // send it, and the controller refuses it when sent anyway.
    let tampered_bin = tmp.join("tampered-binary");
    let small = tmp.join("small-binary");
    std::fs::write(&small, vec![7u8; 100_000]).unwrap();
    artifact::create_with_facts(
        &small,
        Some(2),
        &handover_core::release::BinaryFacts::of_this_binary(),
        &tampered_bin,
    )
    .unwrap();
    artifact::sign(&tampered_bin, &key_a.secret).unwrap();
    let mut bytes = std::fs::read(tampered_bin.join(BINARY_FILE)).unwrap();
    bytes[50_000] ^= 1;
    std::fs::write(tampered_bin.join(BINARY_FILE), &bytes).unwrap();
    let err = refused_upload(&fleet, &tampered_bin).await;
    assert!(err.contains("digest mismatch"), "{err}");
    let doc = std::fs::read(tampered_bin.join(MANIFEST_FILE)).unwrap();
    let sig = std::fs::read(tampered_bin.join(SIGNATURE_FILE)).unwrap();
    let m = Manifest::decode(&doc).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let resp = fleet
        .http()
        .put(format!(
            "{}/api/v1/artifacts/{}",
            fleet.controller_url(),
            m.sha256
        ))
        .bearer_auth(&fleet.operator_token)
        .header(MANIFEST_HEADER, b64.encode(&doc))
        .header(SIGNATURE_HEADER, b64.encode(&sig))
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "digest_mismatch", "{body}");
    assert_still_serving(&fleet, "binary changed after signing").await;

    // (4) Signed with A, manifest changed after signing (still a valid
    // manifest naming the same binary).
    let tampered_manifest = tmp.join("tampered-manifest");
    copy_artifact(&real, &tampered_manifest);
    artifact::sign(&tampered_manifest, &key_a.secret).unwrap();
    let mut edited = manifest.clone();
    edited.created_ms += 1;
    std::fs::write(
        tampered_manifest.join(MANIFEST_FILE),
        edited.to_pretty_json(),
    )
    .unwrap();
    let err = refused_upload(&fleet, &tampered_manifest).await;
    assert!(err.contains("bad_signature (400"), "{err}");
    assert_still_serving(&fleet, "manifest changed after signing").await;

    // A node that trusts only key B (its operator got the keys wrong)
    // refuses the properly signed artifact: the upgrade waits in `stage`
    // naming it, the node says why on /status, and it keeps serving.
    let good = tmp.join("good");
    copy_artifact(&real, &good);
    artifact::sign(&good, &key_a.secret).unwrap();
    artifact::verify(&good, std::slice::from_ref(&key_a.public)).unwrap();
    let stored = artifact::upload(&fleet.op, &good).await.unwrap();
    assert_eq!(stored, manifest);
    restart_node_trusting(&mut fleet, 1, &key_b.public).await;
    start_upgrade(&fleet, &stored.id(), "failover", &[]).await;
    let backup = fleet.nodes[1].url();
    let mut seen = None;
    for _ in 0..300 {
        let s = handover::upgrade::status(&fleet.op).await.unwrap();
        let up = s.upgrade.clone().unwrap();
        let node = node_status(&backup).await.unwrap();
        // The primary stages it; the backup refuses it, again and again.
        if up.phase == Phase::Stage
            && up.waiting_for.contains(&group.backup)
            && !up.waiting_for.contains(&group.primary)
            && node["stage_error"].is_string()
        {
            seen = Some((up, node));
            break;
        }
        assert!(!up.status.is_over(), "{up:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (up, node) = seen.expect("the upgrade never showed the node refusing the artifact");
    assert!(up.waiting_for.contains(&stored.id()), "{}", up.waiting_for);
    assert!(
        !up.waiting_for.contains(&group.primary),
        "{}",
        up.waiting_for
    );
    let why = node["stage_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("not trusted here") && why.contains(&key_a.key_id),
        "{why}"
    );
    assert_eq!(node["trusted_keys"], serde_json::json!([key_b.key_id]));
    assert_eq!(node["release"], 1);
    let aborted = post_empty(&fleet, "/api/v1/upgrade/abort").await;
    assert_eq!(aborted["status"]["state"], "aborted", "{aborted}");
    restart_node_trusting(&mut fleet, 1, &key_a.public).await;

    // (5) Properly signed with A, every node trusting A: staged by the
    // nodes (which check the signature themselves) and the cluster upgrades.
    start_upgrade(&fleet, &stored.id(), "failover", &[]).await;
    let s = fleet
        .wait_upgrade_over(Duration::from_secs(150))
        .await
        .unwrap();
    let rendered = handover::upgrade::render_status(&s);
    assert_eq!(
        s.upgrade.as_ref().map(|u| u.status.clone()),
        Some(Status::Finalized),
        "{rendered}"
    );
    for n in &fleet.nodes {
        let staged = n.data_dir.join("releases").join(stored.id());
        assert!(
            staged.join(SIGNATURE_FILE).is_file(),
            "{} staged without its signature",
            n.id
        );
    }
    let status = fleet.op.status().await.unwrap();
    assert_eq!(
        (status.controller.release.0, status.cluster.release.0),
        (2, 2)
    );
    for n in &status.nodes {
        assert_eq!(n.node.release.0, 2, "{n:?}");
    }
    fleet.stop_all().await.unwrap();
}
