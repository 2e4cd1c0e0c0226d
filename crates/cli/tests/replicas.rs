//! Several controller URLs: nodes and operator commands take a list
//! (`--controller a,b`, as for controller replicas) and move to the next
//! URL when one cannot be reached. Here the first URL is dead (nothing
//! listens there): the nodes join, produce and store everything through the
//! second, and an operator command answers. Then three controller
//! replicas on one PostgreSQL store, whose leader dies mid-upgrade.

mod common;

use common::*;
use handover_core::upgrade::Phase;
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

/// What happens to a replica while the upgrade is paused.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The leader is SIGKILLed and never comes back.
    KillLeader,
    /// The leader is cut off from PostgreSQL (its proxy black-holes every
    /// connection) for a few seconds, then the link heals.
    PartitionLeader,
    /// A follower is stopped for good.
    StopFollower,
}

/// Three controller replicas on one PostgreSQL store (each through a proxy
/// of its own), a release-1 fleet of two groups with viewers, the upgrade
/// to release 2 paused at `phase`; `fault` happens to a replica there. The
/// operator resumes through any replica (the CLI moves past a dead one and
/// past followers), and the upgrade finalizes: viewers see no failure,
/// every record is stored once.
///
/// Two leaders never drove it at once: every transition the orchestrator
/// wrote is logged in its own transaction with the lease's term (the
/// fencing token, checked in that transaction); read back in commit order
/// the terms never go down, and after a lost leader's successor began, the
/// lost leader wrote nothing more, even once it reached the database again.
async fn survive(name: &'static str, phase: Phase, fault: Fault) {
    // One three-replica fleet at a time: 14 processes each, and two of
    // them on 2 cores slowed takeovers past the upgrade's bound.
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut c = cluster(
        name,
        Options {
            groups: 2,
            event_ms: 20_000,
            artifact: Artifact::Plain,
            replicas: 2,
            database_proxies: true,
            ..Options::default()
        },
    )
    .await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    start_upgrade(&c.fleet, &c.artifact, "wait", &[phase.as_str()]).await;
    wait_paused_at(&c, phase).await;
    // In the controller phase the leader hands the lease to its new worker:
    // for a moment no replica leads.
    let status = wait_for(
        &format!("{name}: a leader"),
        Duration::from_secs(30),
        || async {
            let s = c.fleet.op.status().await.ok()?;
            s.replicas
                .iter()
                .any(|r| r.leads_term.is_some())
                .then_some(s)
        },
    )
    .await;
    assert_eq!(status.replicas.len(), 3, "{name}: {:?}", status.replicas);
    let leader = status
        .replicas
        .iter()
        .find(|r| r.leads_term.is_some())
        .cloned()
        .unwrap();
    let follower = status
        .replicas
        .iter()
        .find(|r| r.leads_term.is_none())
        .cloned()
        .unwrap();
    // The process name of a replica, from its URL.
    let process = |url: &str| -> Option<usize> {
        if url == c.fleet.controller_url() {
            return None;
        }
        (0..c.fleet.replicas.len()).find(|k| url.ends_with(&c.fleet.replica_addr(*k).to_string()))
    };
    eprintln!("{name}: {fault:?} (leader {leader:?})");
    let fault_at_ms = now_ms();
    match fault {
        Fault::KillLeader => match process(&leader.url) {
            None => c.fleet.kill_controller().await.unwrap(),
            Some(k) => c.fleet.kill_replica(k).await.unwrap(),
        },
        Fault::StopFollower => match process(&follower.url) {
            None => c
                .fleet
                .controller
                .take()
                .unwrap()
                .terminate()
                .await
                .map(|_| ())
                .unwrap(),
            Some(k) => c.fleet.replicas[k]
                .take()
                .unwrap()
                .terminate()
                .await
                .map(|_| ())
                .unwrap(),
        },
        Fault::PartitionLeader => {
            let proxy_name = match process(&leader.url) {
                None => "controller".to_owned(),
                Some(k) => format!("controller-{}", k + 1),
            };
            let (_, proxy) = c
                .database_proxies
                .iter()
                .find(|(n, _)| *n == proxy_name)
                .unwrap();
            proxy.partition();
        }
    }
    resume_when_back(&c.fleet).await;
    if let Fault::PartitionLeader = fault {
        // Long enough for a successor to lead and drive; then the cut-off
        // leader reaches the database again with its old term.
        tokio::time::sleep(Duration::from_millis(4_000)).await;
        for (_, proxy) in &c.database_proxies {
            proxy.heal();
        }
    }
    wait_finalized(&c).await;
    // Read while the fleet (and its schema) still exists.
    let db = c.fleet.database.as_ref().unwrap().url().to_owned();
    let store = handover_store::postgres::PostgresStore::open(&db, handover_core::Release(2))
        .await
        .unwrap();
    use handover_store::Store as _;
    let (id, _) = store.upgrade().await.unwrap().unwrap();
    let steps = store.upgrade_steps(id).await.unwrap();
    store.close().await;
    eprintln!("{name}: steps {steps:#?}");
    let seen = finish(c, viewers, Viewing::Clean, 2).await;
    let terms: Vec<u64> = steps.iter().map(|s| s.term).collect();
    assert!(
        terms.windows(2).all(|w| w[0] <= w[1]),
        "{name}: terms went down: {terms:?}"
    );
    assert_eq!(steps.last().map(|s| s.status.as_str()), Some("finalized"));
    if let Fault::KillLeader | Fault::PartitionLeader = fault {
        let lost_term = leader.leads_term.unwrap();
        let first_after = steps
            .iter()
            .position(|s| s.term > lost_term)
            .unwrap_or_else(|| panic!("{name}: no step by a later leader: {steps:?}"));
        // A figure, not a limit (timings belong in benchmarks): the next
        // leader's first step is its claim, at the operator's resume here.
        eprintln!(
            "{name}: fault to the next term's first step: {} ms",
            steps[first_after].at_ms - fault_at_ms
        );
        assert!(
            steps[first_after..]
                .iter()
                .all(|s| s.replica != leader.replica),
            "{name}: the lost leader wrote after its successor began: {steps:?}"
        );
    }
    eprintln!("{name}: {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_the_leader_killed_in_stage() {
    survive("leader killed in stage", Phase::Stage, Fault::KillLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_the_leader_killed_in_deliver() {
    survive(
        "leader killed in deliver",
        Phase::Deliver,
        Fault::KillLeader,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_the_leader_killed_in_finalize() {
    survive(
        "leader killed in finalize",
        Phase::Finalize,
        Fault::KillLeader,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_the_leader_killed_in_fence() {
    survive("leader killed in fence", Phase::Fence, Fault::KillLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_the_leader_killed_in_controller() {
    survive(
        "leader killed in controller",
        Phase::Controller,
        Fault::KillLeader,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_the_leader_killed_in_backups() {
    survive(
        "leader killed in backups",
        Phase::Backups,
        Fault::KillLeader,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_the_leader_killed_in_primaries() {
    survive(
        "leader killed in primaries",
        Phase::Primaries,
        Fault::KillLeader,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_the_leader_cut_off_from_the_database() {
    survive("leader partitioned", Phase::Backups, Fault::PartitionLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_survive_a_follower_stopped_for_good() {
    survive("follower stopped", Phase::Stage, Fault::StopFollower).await;
}
