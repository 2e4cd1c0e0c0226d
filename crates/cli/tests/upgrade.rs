//! The upgrade end to end on real processes: a release-1 controller and
//! nodes under their supervisors, viewers throughout, the upgrade to
//! release 2, then the exactly-once check. One helper ([`run`]) runs every
//! case: a policy, optionally with the controller SIGKILLed where the
//! upgrade pauses.

mod common;

use common::*;
use handover_core::upgrade::Phase;
use std::time::Duration;

const GROUPS: usize = 2;

struct Case {
    name: &'static str,
    policy: &'static str,
    event_ms: u64,
    /// How long into the event the upgrade starts.
    lead_ms: u64,
    /// The upgrade pauses here, the controller is SIGKILLed and started
    /// again, then the upgrade resumes.
    crash_at: Option<Phase>,
    /// The primaries waited for their events (the `wait` and `deadline` policies).
    primaries_wait: bool,
    /// The controller's store on PostgreSQL (else as `HANDOVER_TEST_BACKEND` says).
    postgres: bool,
}

/// A release-1 cluster of `GROUPS` groups upgraded to release 2 as `case`
/// says; viewers see no failure, every record is stored once, release-1
/// records land translated and release-2 nodes write natively.
async fn run(case: Case) {
    let mut c = cluster(
        case.name,
        Options {
            groups: GROUPS,
            event_ms: case.event_ms,
            artifact: Artifact::Plain,
            postgres: case.postgres,
            ..Options::default()
        },
    )
    .await;
    let viewers = spawn_viewers(&c, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(case.lead_ms)).await;
    let pause_at: Vec<&str> = case.crash_at.iter().map(|p| p.as_str()).collect();
    start_upgrade(&c.fleet, &c.artifact, case.policy, &pause_at).await;
    if let Some(phase) = case.crash_at {
        wait_paused_at(&c, phase).await;
        crash_controller(&mut c).await;
        resume(&c.fleet).await;
    }
    let seen = finish(c, viewers, Viewing::Clean, 2).await;
    eprintln!("{}: {seen:?}", case.name);
    let r = &seen.records;
    assert!(
        r.translated < r.stored,
        "{}: release-2 nodes write natively after their switch: {r:?}",
        case.name
    );
    if case.primaries_wait {
        assert!(
            seen.upgrade.waiting_for_operations_ms > 0,
            "{}: primaries waited for their events: {:?}",
            case.name,
            seen.upgrade
        );
    }
}

fn policy(name: &'static str, policy: &'static str, primaries_wait: bool) -> Case {
    Case {
        name,
        policy,
        event_ms: 22_000,
        lead_ms: 3_000,
        crash_at: None,
        primaries_wait,
        postgres: false,
    }
}

fn crash_at(name: &'static str, phase: Phase) -> Case {
    Case {
        name,
        policy: "wait",
        // Outlasts the crash, the restart and the resume with room to
        // spare, so backups switch mid-event and write natively before it
        // ends (at 20 s, a loaded CI machine on PostgreSQL once switched
        // them after it: no native record to see).
        event_ms: 30_000,
        lead_ms: 2_000,
        crash_at: Some(phase),
        primaries_wait: false,
        postgres: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_policy_wait_switches_primaries_after_their_events() {
    run(policy("policy wait", "wait", true)).await;
}

/// The same with the controller's store on PostgreSQL: the migration 1 → 2
/// runs there, in one transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_policy_wait_on_postgres_loses_nothing() {
    run(Case {
        postgres: true,
        ..policy("policy wait on PostgreSQL", "wait", true)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_policy_failover_switches_primaries_mid_event() {
    run(policy("policy failover", "failover", false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_policy_deadline_fails_over_after_the_deadline() {
    run(policy("policy deadline", "deadline=3000", true)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_in_the_deliver_phase_resumes_and_loses_nothing() {
    run(crash_at("controller killed in deliver", Phase::Deliver)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_in_the_backups_phase_resumes_and_loses_nothing() {
    run(crash_at("controller killed in backups", Phase::Backups)).await;
}
