//! The node machine's decisions, one interleaving per test; the simulation
//! drives the same machine through thousands of random ones.

use super::*;
use crate::release::Release;

const BOOTSTRAP: &str = "hob_bootstrap-token";

fn identity(release: u32) -> Identity {
    Identity {
        node_id: "g1-a".into(),
        release: ReleaseInfo::of(Release(release)).expect("a known release"),
        role: Role::Primary,
        group: "g1".into(),
        hls_url: "http://127.0.0.1:7000".into(),
        bootstrap_token: Some(BOOTSTRAP.into()),
        binary_sha256: None,
    }
}

fn machine_with(durable: Durable, staged: Vec<StagedArtifact>) -> Machine {
    let id = identity(2);
    // The revision grant states announce unless a test says otherwise.
    let params = ParamsCache {
        schema: id.release.schema,
        revision: Some(0),
        events: vec![],
    };
    Machine::new(
        id,
        Config {
            legacy: false,
            heal_stale_registration: true,
        },
        durable,
        params,
        staged,
    )
}

fn at(ms: u64) -> Now {
    Now {
        ms,
        wall_ms: 1_800_000_000_000 + ms as i64,
        ..Now::default()
    }
}

fn queued(ms: u64, count: u64) -> Now {
    Now {
        outbox: OutboxState {
            next_seq: count + 1,
            oldest_unacked_seq: Some(1),
            count,
        },
        ..at(ms)
    }
}

fn sends(actions: &[Action]) -> Vec<&Send> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send(s) => Some(s.as_ref()),
            _ => None,
        })
        .collect()
}

fn only_send(actions: &[Action]) -> Send {
    let s = sends(actions);
    assert_eq!(s.len(), 1, "one request expected in {actions:?}");
    s[0].clone()
}

/// The watch among `actions`.
fn watch_in(actions: &[Action]) -> RequestId {
    sends(actions)
        .into_iter()
        .find(|s| matches!(s.request, Request::Watch { .. }))
        .map(|s| s.id)
        .expect("a watch is sent")
}

fn grant_state(grant: Grant, epoch: u64, desired: Desired) -> GrantState {
    GrantState {
        v: MESSAGE_VERSION,
        grant,
        grant_reason: GrantReason::SameSchema,
        epoch,
        lease_ms: 3_000,
        param_revision: 0,
        desired,
        desired_rev: 1,
    }
}

fn ok<T: serde::Serialize>(t: &T) -> Reply {
    Reply::Ok(serde_json::to_vec(t).expect("serializes"))
}

fn welcome(grant: Grant, epoch: u64, credential: &str) -> Reply {
    ok(&Welcome {
        v: MESSAGE_VERSION,
        controller_release: Release(2),
        controller_schema: Schema(2),
        protocol: 2,
        grant,
        grant_reason: GrantReason::SameSchema,
        epoch,
        lease_ms: 3_000,
        desired: Desired::default(),
        desired_rev: 1,
        param_revision: 0,
        credential: credential.into(),
    })
}

fn refused(status: u16, code: &str) -> Reply {
    Reply::Refused {
        status,
        code: code.into(),
        message: "no".into(),
    }
}

/// A machine welcomed with `grant` at epoch 5, its watch in flight.
fn established(grant: Grant) -> (Machine, RequestId) {
    let mut m = machine_with(Durable::default(), vec![]);
    let hello = only_send(&m.handle(Event::Tick, &at(0)));
    let a = m.handle(
        Event::Reply {
            id: hello.id,
            reply: welcome(grant, 5, "cred"),
        },
        &at(10),
    );
    let watch = only_send(&a);
    assert!(matches!(watch.request, Request::Watch { epoch: 5, .. }));
    (m, watch.id)
}

#[test]
fn hello_with_the_bootstrap_token_then_persist_then_watch() {
    let mut m = machine_with(Durable::default(), vec![]);
    let a = m.handle(Event::Tick, &at(0));
    let hello = only_send(&a);
    let Request::Hello(h) = &hello.request else {
        panic!("hello first, got {hello:?}");
    };
    assert_eq!(h.token, BOOTSTRAP);
    assert_eq!(hello.credential, None);
    // Nothing else goes out while the hello is in flight.
    assert!(sends(&m.handle(Event::Tick, &at(5))).is_empty());
    let a = m.handle(
        Event::Reply {
            id: hello.id,
            reply: welcome(Grant::Full, 5, "cred"),
        },
        &at(10),
    );
    // Persisted before the watch that acts on it.
    let persist = a
        .iter()
        .position(|a| matches!(a, Action::Persist { grant: Grant::Full, epoch: 5, credential: Some(c), fence_alert: None } if c == "cred"));
    let watch = a
        .iter()
        .position(|a| matches!(a, Action::Send(s) if matches!(s.request, Request::Watch { .. })));
    assert!(
        persist.is_some() && watch.is_some() && persist < watch,
        "{a:?}"
    );
    let v = m.view();
    assert!(v.established);
    assert_eq!((v.grant, v.epoch), (Some(Grant::Full), Some(5)));
}

#[test]
fn a_refused_credential_says_hello_with_the_bootstrap_token() {
    let durable = Durable {
        credential: Some("old".into()),
        credential_confirmed: true,
        ..Durable::default()
    };
    let mut m = machine_with(durable, vec![]);
    let hello = only_send(&m.handle(Event::Tick, &at(0)));
    let Request::Hello(h) = &hello.request else {
        panic!("hello first");
    };
    assert_eq!(h.token, "old");
    let a = m.handle(
        Event::Reply {
            id: hello.id,
            reply: refused(401, "unauthorized"),
        },
        &at(1),
    );
    let Request::Hello(h) = only_send(&a).request else {
        panic!("hello again");
    };
    assert_eq!(h.token, BOOTSTRAP);
}

#[test]
fn shipping_follows_the_grant_and_an_ack_trims_only_the_batch() {
    for (grant, channel) in [
        (Grant::Full, Some(Channel::Main)),
        (Grant::Deliver, Some(Channel::Redundant)),
        (Grant::Fenced, None),
    ] {
        let (mut m, _) = established(grant);
        let a = m.handle(Event::Tick, &queued(20, 3));
        if channel.is_none() {
            assert!(!a.contains(&Action::ReadOutbox), "fenced queues locally");
            continue;
        }
        assert!(a.contains(&Action::ReadOutbox));
        let head = (1..=3)
            .map(|seq| ship::Queued {
                seq,
                schema: Schema(2),
                bytes: 10,
            })
            .collect();
        let batch = only_send(&m.handle(Event::OutboxHead(head), &queued(21, 3)));
        assert_eq!(
            batch.request,
            Request::Batch {
                channel: channel.expect("ships"),
                epoch: 5,
                schema: Schema(2),
                first_seq: 1,
                count: 3
            }
        );
        // One batch at a time.
        assert!(!m
            .handle(Event::Tick, &queued(22, 4))
            .contains(&Action::ReadOutbox));
        let ack = |acked_through| {
            ok(&BatchAck {
                v: MESSAGE_VERSION,
                acked_through,
                stored: 3,
                translated: 0,
            })
        };
        let a = m.handle(
            Event::Reply {
                id: batch.id,
                reply: ack(99),
            },
            &queued(30, 3),
        );
        // The next batch is read at once, after the trim (actions run in order).
        let trim = a.iter().position(|a| *a == Action::Trim { through: 3 });
        let read = a.iter().position(|a| *a == Action::ReadOutbox);
        assert!(trim.is_some() && read > trim, "{a:?}");
    }
}

/// One queued record (`seq`), read and sent as a batch.
fn one_record_in_flight(m: &mut Machine, seq: u64) -> Send {
    assert!(m
        .handle(Event::Tick, &queued(20, 1))
        .contains(&Action::ReadOutbox));
    let head = vec![ship::Queued {
        seq,
        schema: Schema(2),
        bytes: 10,
    }];
    only_send(&m.handle(Event::OutboxHead(head), &queued(20, 1)))
}

#[test]
fn an_ack_of_nothing_in_the_batch_trims_nothing_and_backs_off() {
    let (mut m, _) = established(Grant::Full);
    let batch = one_record_in_flight(&mut m, 7);
    let a = m.handle(
        Event::Reply {
            id: batch.id,
            reply: ok(&BatchAck {
                v: MESSAGE_VERSION,
                acked_through: 3,
                stored: 0,
                translated: 0,
            }),
        },
        &queued(21, 1),
    );
    assert!(!a.iter().any(|a| matches!(a, Action::Trim { .. })));
    assert!(m.view().ship_error.is_some());
    // Backed off: no new read before BACKOFF_MS_MIN.
    assert!(!m
        .handle(Event::Tick, &queued(22, 1))
        .contains(&Action::ReadOutbox));
    assert!(m
        .handle(Event::Tick, &queued(21 + BACKOFF_MS_MIN, 1))
        .contains(&Action::ReadOutbox));
}

#[test]
fn stale_epoch_abandons_the_watch_and_says_hello_again() {
    let (mut m, watch) = established(Grant::Full);
    let batch = one_record_in_flight(&mut m, 1);
    let a = m.handle(
        Event::Reply {
            id: batch.id,
            reply: refused(409, "stale_epoch"),
        },
        &queued(21, 1),
    );
    assert!(a.contains(&Action::Cancel(watch)), "{a:?}");
    assert!(matches!(
        sends(&a).first().map(|s| &s.request),
        Some(Request::Hello(_))
    ));
    assert!(!m.view().established);
}

#[test]
fn a_fence_is_persisted_with_its_alert_and_acknowledged_at_once() {
    let (mut m, watch) = established(Grant::Full);
    // The heartbeat timer starts with the session.
    m.handle(Event::Tick, &at(20));
    let a = m.handle(
        Event::Reply {
            id: watch,
            reply: ok(&grant_state(Grant::Fenced, 6, Desired::default())),
        },
        &at(30),
    );
    assert!(a.contains(&Action::Persist {
        grant: Grant::Fenced,
        epoch: 6,
        credential: None,
        fence_alert: Some(FenceAlert {
            epoch: 6,
            reason: GrantReason::SameSchema
        }),
    }));
    let hb = sends(&a)
        .into_iter()
        .find(|s| s.lane == Lane::Heartbeat)
        .map(|s| s.request.clone());
    assert!(
        matches!(hb, Some(Request::Heartbeat(Heartbeat { epoch: 6, .. }))),
        "{a:?}"
    );
}

#[test]
fn an_older_epoch_than_held_is_ignored() {
    let (mut m, watch) = established(Grant::Full);
    let a = m.handle(
        Event::Reply {
            id: watch,
            reply: ok(&grant_state(Grant::Fenced, 4, Desired::default())),
        },
        &at(30),
    );
    assert!(!a.iter().any(|a| matches!(a, Action::Persist { .. })));
    assert_eq!(m.view().epoch, Some(5));
}

#[test]
fn a_lost_lease_asks_for_a_new_hello() {
    let (mut m, _) = established(Grant::Full);
    m.handle(Event::Tick, &at(20));
    // The heartbeat goes out after lease/3 and times out unanswered.
    let hb = only_send(&m.handle(Event::Tick, &at(1_020)));
    assert_eq!(hb.lane, Lane::Heartbeat);
    let a = m.handle(Event::Tick, &at(1_020 + hb.timeout_ms));
    assert!(a.contains(&Action::Cancel(hb.id)));
    assert!(!m.view().established, "lease of 3 s without an answer");
}

#[test]
fn parameters_are_fetched_with_full_only_and_a_wrong_schema_is_not_cached() {
    let (mut m, watch) = established(Grant::Full);
    let mut gs = grant_state(Grant::Full, 5, Desired::default());
    gs.param_revision = 4;
    let a = m.handle(
        Event::Reply {
            id: watch,
            reply: ok(&gs),
        },
        &at(30),
    );
    let fetch = sends(&a)
        .into_iter()
        .find(|s| s.lane == Lane::Params)
        .cloned()
        .expect("params fetched");
    assert_eq!(fetch.request, Request::Params { epoch: 5 });
    let a = m.handle(
        Event::Reply {
            id: fetch.id,
            reply: ok(&ParamsAnswer {
                schema: Schema(1),
                revision: 4,
                params: serde_json::json!({}),
            }),
        },
        &at(40),
    );
    assert!(!a.iter().any(|a| matches!(a, Action::CacheParams { .. })));
    // Refused once, not fetched again for the same revision.
    assert!(!sends(&m.handle(Event::Tick, &at(1_000)))
        .iter()
        .any(|s| s.lane == Lane::Params));

    let (mut m, watch) = established(Grant::Deliver);
    let a = m.handle(
        Event::Reply {
            id: watch,
            reply: ok(&GrantState {
                param_revision: 4,
                ..grant_state(Grant::Deliver, 5, Desired::default())
            }),
        },
        &at(30),
    );
    assert!(!sends(&a).iter().any(|s| s.lane == Lane::Params));
}

fn staged(id: &str, release: u32) -> StagedArtifact {
    StagedArtifact {
        id: id.into(),
        release: Release(release),
        sha256: None,
    }
}

fn switch_to(id: &str, release: u32) -> Desired {
    Desired {
        stage: Some(id.into()),
        quiesce: true,
        switch_to: Some(Release(release)),
    }
}

/// A staged artifact is reported in a heartbeat at once (other nodes may
/// take it from this one as soon as the controller knows).
#[test]
fn a_staged_artifact_is_reported_at_once() {
    let (mut m, watch) = established(Grant::Full);
    m.handle(Event::Tick, &at(20));
    let stage_only = Desired {
        stage: Some("r3".into()),
        ..Desired::default()
    };
    let a = m.handle(
        Event::Reply {
            id: watch,
            reply: ok(&grant_state(Grant::Full, 5, stage_only)),
        },
        &at(30),
    );
    assert!(a.contains(&Action::Stage {
        artifact: "r3".into()
    }));
    let a = m.handle(
        Event::Staged {
            artifact: "r3".into(),
            result: Ok(vec![staged("r3", 3)]),
        },
        &at(40),
    );
    let hb = sends(&a)
        .into_iter()
        .find(|s| s.lane == Lane::Heartbeat)
        .map(|s| s.request.clone());
    match hb {
        Some(Request::Heartbeat(h)) => assert_eq!(h.staged, vec!["r3".to_owned()]),
        other => panic!("expected a heartbeat at once, got {other:?} in {a:?}"),
    }
}

#[test]
fn stage_then_quiesce_drain_and_switch() {
    let (mut m, watch) = established(Grant::Full);
    let stage_only = Desired {
        stage: Some("r3".into()),
        ..Desired::default()
    };
    let a = m.handle(
        Event::Reply {
            id: watch,
            reply: ok(&grant_state(Grant::Full, 5, stage_only)),
        },
        &at(30),
    );
    assert!(a.contains(&Action::Stage {
        artifact: "r3".into()
    }));
    // A changed answer is watched again at once.
    let watch = watch_in(&a);
    m.handle(
        Event::Staged {
            artifact: "r3".into(),
            result: Ok(vec![staged("r3", 3)]),
        },
        &at(40),
    );
    let a = m.handle(
        Event::Reply {
            id: watch,
            reply: ok(&grant_state(Grant::Full, 5, switch_to("r3", 3))),
        },
        &queued(310, 2),
    );
    assert!(a.contains(&Action::Quiesce), "{a:?}");
    assert!(m.view().quiesce_since_ms.is_some());
    // Not before the producer stopped...
    assert!(!m
        .handle(Event::Tick, &at(315))
        .iter()
        .any(|a| matches!(a, Action::Switch { .. })));
    m.handle(Event::Quiesced, &queued(316, 2));
    // ...nor before the outbox is empty (or the drain's bound)...
    assert!(!m
        .handle(Event::Tick, &queued(320, 2))
        .iter()
        .any(|a| matches!(a, Action::Switch { .. })));
    let a = m.handle(Event::Tick, &at(330));
    assert!(a.contains(&Action::Switch {
        artifact: "r3".into(),
        to: Release(3)
    }));
    // ...and no request after it.
    assert!(sends(&m.handle(Event::Tick, &at(10_000))).is_empty());
    let a = m.handle(
        Event::Switch(SwitchResult::Refused("never ready".into())),
        &at(10_001),
    );
    assert!(a
        .iter()
        .any(|a| matches!(a, Action::RememberSwitchFailure(Some(f)) if f.artifact == "r3" && !f.withdrawn)));
    assert!(a.iter().any(|a| matches!(a, Action::Fail(_))));
}

/// A stop with an empty outbox still waits for the producer: its last
/// tick may append a record, which ships before the node stops.
#[test]
fn a_stop_waits_for_the_producers_last_record() {
    let (mut m, _) = established(Grant::Full);
    let a = m.handle(Event::Stop, &at(20));
    assert!(a.contains(&Action::Quiesce), "{a:?}");
    assert!(
        !a.contains(&Action::Stopped),
        "stopped before quiesced: {a:?}"
    );
    let a = m.handle(Event::Quiesced, &queued(21, 1));
    assert!(!a.contains(&Action::Stopped), "{a:?}");
    let a = m.handle(Event::Tick, &at(22));
    assert!(a.contains(&Action::Stopped), "{a:?}");
}

/// A producer that never reports stopping holds a stop no longer than
/// the drain's bound.
#[test]
fn a_stop_goes_on_at_the_bound_without_the_quiesce() {
    let (mut m, _) = established(Grant::Full);
    m.handle(Event::Stop, &at(20));
    assert!(!m.handle(Event::Tick, &at(21)).contains(&Action::Stopped));
    let a = m.handle(Event::Tick, &at(20 + DRAIN_ON_STOP_MS));
    assert!(a.contains(&Action::Stopped), "{a:?}");
}

#[test]
fn a_drain_ends_at_its_bound() {
    let (mut m, _) = established(Grant::Full);
    m.handle(Event::Stop, &queued(20, 5));
    assert!(!m
        .handle(Event::Tick, &queued(21, 5))
        .contains(&Action::Stopped));
    let a = m.handle(Event::Tick, &queued(20 + DRAIN_ON_STOP_MS, 5));
    assert!(a.contains(&Action::Stopped), "{a:?}");
}

#[test]
fn a_failed_switch_is_not_retried_until_asked_anew() {
    let failure = SwitchFailure {
        artifact: "r3".into(),
        release: 3,
        reason: "never ready".into(),
        at_ms: 0,
        withdrawn: false,
    };
    let durable = Durable {
        switch_failure: Some(failure),
        ..Durable::default()
    };
    let mut m = machine_with(durable, vec![staged("r3", 3)]);
    let hello = only_send(&m.handle(Event::Tick, &at(0)));
    let mut w: Welcome = match welcome(Grant::Full, 5, "cred") {
        Reply::Ok(b) => serde_json::from_slice(&b).expect("welcome"),
        _ => unreachable!(),
    };
    w.desired = switch_to("r3", 3);
    let a = m.handle(
        Event::Reply {
            id: hello.id,
            reply: ok(&w),
        },
        &at(10),
    );
    assert!(
        !a.contains(&Action::Quiesce),
        "the same switch again: {a:?}"
    );
    // The controller withdraws it, then asks again: a new try.
    let watch = only_send(&a).id;
    let a = m.handle(
        Event::Reply {
            id: watch,
            reply: ok(&grant_state(Grant::Full, 5, Desired::default())),
        },
        &at(20),
    );
    assert!(a
        .iter()
        .any(|a| matches!(a, Action::RememberSwitchFailure(Some(f)) if f.withdrawn)));
    let watch = watch_in(&a);
    let a = m.handle(
        Event::Reply {
            id: watch,
            reply: ok(&grant_state(Grant::Full, 5, switch_to("r3", 3))),
        },
        &at(410),
    );
    assert!(a.contains(&Action::Quiesce), "{a:?}");
}

#[test]
fn a_worker_of_the_release_that_failed_forgets_the_failure() {
    let durable = Durable {
        switch_failure: Some(SwitchFailure {
            artifact: "r2".into(),
            release: 2,
            reason: "x".into(),
            at_ms: 0,
            withdrawn: false,
        }),
        ..Durable::default()
    };
    let mut m = machine_with(durable, vec![]);
    assert!(m
        .handle(Event::Tick, &at(0))
        .contains(&Action::RememberSwitchFailure(None)));
    assert_eq!(m.view().switch_failure, None);
}

#[test]
fn a_grant_contradicting_the_own_schema_says_hello_again() {
    let (mut m, watch) = established(Grant::Full);
    // A release-2 controller would grant a schema-2 node full, never deliver.
    let a = m.handle(
        Event::Reply {
            id: watch,
            reply: ok(&grant_state(Grant::Deliver, 5, Desired::default())),
        },
        &at(30),
    );
    assert!(!a.iter().any(|a| matches!(a, Action::Persist { .. })));
    assert!(!m.view().established);
    // After the watch's spin guard, hello.
    let a = m.handle(Event::Tick, &at(30 + WATCH_SPIN_GUARD_MS));
    assert!(matches!(
        sends(&a).first().map(|s| &s.request),
        Some(Request::Hello(_))
    ));
}

#[test]
fn the_next_timer_is_a_future_deadline_never_the_past() {
    let (m, _) = established(Grant::Full);
    let t = m.next_timer_ms(10).expect("the watch has a deadline");
    assert!(t > 10 && t <= 10 + WATCH_TIMEOUT_MS);
}

#[test]
fn a_refused_credential_and_no_bootstrap_token_waits_for_the_operator() {
    let durable = Durable {
        credential: Some("revoked".into()),
        credential_confirmed: true,
        ..Durable::default()
    };
    let mut m = machine_with(durable, vec![]);
    m.id.bootstrap_token = None;
    let hello = only_send(&m.handle(Event::Tick, &at(0)));
    let a = m.handle(
        Event::Reply {
            id: hello.id,
            reply: refused(401, "unauthorized"),
        },
        &at(1),
    );
    // No hello without something to prove the id with; the operator is told.
    assert!(!a.iter().any(|a| matches!(a, Action::Send(_))), "{a:?}");
    assert!(
        a.iter().any(|a| matches!(a, Action::Log { message, .. } if message.contains("handover node add g1-a"))),
        "{a:?}"
    );
    let later = m.handle(Event::Tick, &at(2));
    assert!(
        !later.iter().any(|a| matches!(a, Action::Send(_))),
        "{later:?}"
    );
}

/// A welcome lost after the controller took the token: the token is spent,
/// and the credential the node chose (kept before its first hello) works.
#[test]
fn a_lost_welcome_costs_nothing_the_chosen_credential_works() {
    let chosen = "chosen-credential-0123456789abcdef";
    let durable = Durable {
        credential: Some(chosen.into()),
        credential_confirmed: false,
        ..Durable::default()
    };
    let mut m = machine_with(durable, vec![]);
    let first = only_send(&m.handle(Event::Tick, &at(0)));
    let Request::Hello(h) = &first.request else {
        panic!("hello first");
    };
    assert_eq!(
        (h.token.as_str(), h.new_credential.as_deref()),
        (BOOTSTRAP, Some(chosen))
    );
    // The welcome never arrives; the retry's token is refused as used.
    let a = m.handle(
        Event::Reply {
            id: first.id,
            reply: Reply::Unreachable("connection reset".into()),
        },
        &at(1),
    );
    assert!(
        !a.iter().any(|a| matches!(a, Action::Send(_))),
        "backs off first"
    );
    let retry = only_send(&m.handle(Event::Tick, &at(10_000)));
    let Request::Hello(h) = &retry.request else {
        panic!("hello again");
    };
    assert_eq!(h.token, BOOTSTRAP);
    let a = m.handle(
        Event::Reply {
            id: retry.id,
            reply: refused(401, "unauthorized"),
        },
        &at(10_001),
    );
    assert!(
        !a.iter().any(|a| matches!(a, Action::Send(_))),
        "backs off again"
    );
    let third = only_send(&m.handle(Event::Tick, &at(20_000)));
    let Request::Hello(h) = &third.request else {
        panic!("hello with the credential");
    };
    assert_eq!(
        (h.token.as_str(), h.new_credential.as_deref()),
        (chosen, None)
    );
}
