//! Several controller URLs: nodes and operator commands take a list
//! (`--controller a,b`, as for controller replicas) and move to the next
//! URL when one cannot be reached. Here the first URL is dead (nothing
//! listens there): the nodes join, produce and store everything through the
//! second, and an operator command answers.

mod common;

use common::*;
use serde_json::Value;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_operators_move_past_a_dead_controller_url() {
    let mut s = setup(
        "controller urls",
        SetupSpec {
            controller_release: 2,
            node_release: 2,
            event_ms: 4_000,
            supervised: false,
            window_segments: None,
        },
    )
    .await;
    // A port nothing listens on (bound, then closed): connections are refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://{}", l.local_addr().unwrap())
    };
    let urls = format!("{dead},{}", s.fleet.controller_url());
    for n in &mut s.fleet.nodes {
        n.controller_url = Some(urls.clone());
    }
    start_nodes(&mut s.fleet).await;
    sleep_until(s.event_end_ms() + 1_000).await;
    let out = std::process::Command::new(exe())
        .args(["status", "--json", "--controller", &urls])
        .env("HANDOVER_OPERATOR_TOKEN", &s.fleet.operator_token)
        .envs(s.fleet.ca_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    let grants: Vec<&str> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["grant"].as_str())
        .collect();
    assert_eq!(grants.len(), 2, "{status}");
    for url in s.fleet.nodes.iter().map(|n| n.url()).collect::<Vec<_>>() {
        wait_for("the node to drain", Duration::from_secs(20), || async {
            let st = node_status(&url).await?;
            (st["outbox"]["count"] == 0).then_some(())
        })
        .await;
    }
    stop_and_check(&mut s.fleet, &s.name).await;
    s.fleet.stop_all().await.unwrap();
}
