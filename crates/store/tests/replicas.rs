//! Controller replicas on one store, on both backends: the orchestrator's
//! lease and the term that fences a deposed leader's writes. (Batches
//! judged against the epoch in their own transaction: `store.rs`.)

mod support;

use handover_core::upgrade::{Desired, Phase, Plan, PlanGroup, PrimaryPolicy, Target, Upgrade};
use handover_core::{Release, Schema};
use handover_store::replicas::ReplicaBeat;
use handover_store::StoreError;

fn beat(replica: &str, lease_ms: u64, bid: bool) -> ReplicaBeat {
    ReplicaBeat {
        replica: replica.into(),
        name: replica.trim_end_matches(char::is_numeric).into(),
        url: format!("https://{replica}:7400"),
        release: Release(2),
        binary_sha256: None,
        lease_ms,
        bid,
    }
}

fn upgrade() -> Upgrade {
    Upgrade::new(
        Plan {
            target: Target {
                artifact_id: "r3-0123456789ab".into(),
                release: Release(3),
                schema: Schema(3),
                size: 1000,
                facts: None,
                sha256: None,
                contracts: None,
            },
            from_release: Release(2),
            policy: PrimaryPolicy::Wait,
            groups: vec![PlanGroup {
                name: "g1".into(),
                primary: "p".into(),
                backup: "b".into(),
            }],
            pause_at: vec![],
            node_switch_wait_ms: 60_000,
        },
        1_000,
    )
}

/// Long enough never to expire during a test.
const LONG_MS: u64 = 600_000;

fn not_leader<T: std::fmt::Debug>(r: Result<T, StoreError>) -> bool {
    matches!(r, Err(StoreError::NotLeader { .. }))
}

on_both! {
    async fn a_takeover_raises_the_term_and_the_deposed_leader_changes_nothing(db) {
        let a = db.open(2).await;
        let b = db.open(2).await;
        let sa = a.sync_replica(&beat("a", LONG_MS, true)).await.unwrap();
        assert_eq!(sa.leading, Some(1));
        let sb = b.sync_replica(&beat("b", LONG_MS, true)).await.unwrap();
        assert_eq!(sb.leading, None, "a's lease holds");
        assert_eq!(sb.leader.as_ref().map(|l| (l.replica.as_str(), l.term)), Some(("a", 1)));
        assert_eq!(sb.replicas.len(), 2);
        // b follows: its orchestrator writes are refused before they start.
        assert!(not_leader(b.set_fence(true).await));
        let mut up = upgrade();
        let id = a.save_upgrade(None, &up, 1_000).await.unwrap();
        a.set_fence(true).await.unwrap();
        // a's lease runs out (it renews with a lease of 1 ms) and b takes over.
        a.sync_replica(&beat("a", 1, true)).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let sb = b.sync_replica(&beat("b", LONG_MS, true)).await.unwrap();
        assert_eq!(sb.leading, Some(2));
        // a has not synced since: every late write of it is refused.
        let before = a.cluster().await.unwrap();
        assert!(not_leader(a.set_fence(false).await));
        assert!(not_leader(a.set_desired(&[("p".into(), Desired { quiesce: true, ..Desired::default() })]).await));
        assert!(not_leader(a.set_cluster_release(Release(3)).await));
        up.phase = Phase::Stage;
        assert!(not_leader(a.save_upgrade(Some(id), &up, 2_000).await));
        assert_eq!(b.cluster().await.unwrap(), before, "nothing a wrote landed");
        assert_eq!(b.desired("p").await.unwrap(), Desired::default());
        assert_eq!(b.upgrade().await.unwrap().map(|(_, u)| u.phase), Some(Phase::Preflight));
        // a's next sync finds b's lease and follows.
        let sa = a.sync_replica(&beat("a", LONG_MS, true)).await.unwrap();
        assert_eq!(sa.leading, None);
        // b drives on, in its term; the log shows each term's transitions in order.
        b.save_upgrade(Some(id), &up, 3_000).await.unwrap();
        b.set_fence(false).await.unwrap();
        let steps = b.upgrade_steps(id).await.unwrap();
        let terms: Vec<(u64, &str, &str)> = steps
            .iter()
            .map(|s| (s.term, s.replica.as_str(), s.phase.as_str()))
            .collect();
        assert_eq!(terms, [(1, "a", "preflight"), (2, "b", "stage")]);
    }
}

on_both! {
    async fn a_replica_that_stops_bidding_hands_the_lease_over_at_once(db) {
        let a = db.open(2).await;
        let b = db.open(2).await;
        assert_eq!(a.sync_replica(&beat("a", LONG_MS, true)).await.unwrap().leading, Some(1));
        assert_eq!(a.sync_replica(&beat("a", LONG_MS, true)).await.unwrap().leading, Some(1), "a renewal keeps the term");
        assert_eq!(a.sync_replica(&beat("a", LONG_MS, false)).await.unwrap().leading, None);
        assert!(not_leader(a.set_fence(true).await));
        assert_eq!(b.sync_replica(&beat("b", LONG_MS, true)).await.unwrap().leading, Some(2));
        // A worker of another replica waits for b's lease; a new worker
        // of b (a restart) takes it at once, in a new term.
        assert_eq!(a.sync_replica(&beat("a2", LONG_MS, true)).await.unwrap().leading, None);
        assert_eq!(a.sync_replica(&beat("b2", LONG_MS, true)).await.unwrap().leading, Some(3));
        assert!(not_leader(b.set_fence(true).await), "the old worker is fenced");
    }
}

on_both! {
    async fn a_migration_holds_the_old_releases_writes_until_it_commits(db) {
        // A replica still on the old release keeps writing while a new
        // one migrates the store (here: a new replica row each time, so
        // every write changes a row count the self-check compares).
        let old = db.open(1).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writing = stop.clone();
        let writer = tokio::spawn(async move {
            let mut writes = 0u32;
            while !writing.load(std::sync::atomic::Ordering::Relaxed) {
                old.sync_replica(&beat(&format!("old{writes}"), LONG_MS, false)).await?;
                writes += 1;
            }
            Ok::<u32, StoreError>(writes)
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let migrated = db.try_open(2).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let writes = writer.await.unwrap().unwrap();
        let new = migrated.unwrap();
        assert_eq!(new.cluster().await.unwrap().schema, Schema(2));
        assert!(writes > 0);
        assert!(db.has_pre_upgrade_copy(1).await);
    }
}
