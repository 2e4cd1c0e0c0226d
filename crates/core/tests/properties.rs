//! Property tests of every decoder the network reaches, and of the
//! invariants the pure core promises: no input panics, every refusal is a
//! known error code, and valid messages round-trip.

use handover_core::params::{events_for_group, LiveEvent};
use handover_core::record::{
    self, v2::Kind, v3::Severity, ChannelDirectory, ChannelRef, Observation,
};
use handover_core::wire::{self, Batch, Heartbeat, Hello, OutboxState, Role, MESSAGE_VERSION};
use handover_core::{ProtocolRange, Release, Schema};
use proptest::prelude::*;
use serde_json::Value;

const WIRE_CODES: [&str; 3] = ["malformed", "unsupported_version", "invalid_field"];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,16}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        id(),
        id(),
        1u32..3,
        prop::collection::vec(any::<i64>(), 0..8),
        any::<u64>(),
        prop::option::of(any::<u64>()),
    )
        .prop_map(
            |(node_id, group, release, current_events, next_seq, param_revision)| Hello {
                v: MESSAGE_VERSION,
                node_id,
                token: "hob_bootstrap-token-0123456789".into(),
                release: Release(release),
                schema: Schema(release),
                protocol: ProtocolRange {
                    min: 1,
                    max: release,
                },
                role: if next_seq % 2 == 0 {
                    Role::Primary
                } else {
                    Role::Backup
                },
                group,
                hls_url: "http://127.0.0.1:7500".into(),
                outbox: OutboxState {
                    next_seq,
                    oldest_unacked_seq: None,
                    count: 0,
                },
                current_events,
                param_revision,
                staged: vec![],
                binary_sha256: None,
                supervisor_sha256: None,
                new_credential: (next_seq % 3 == 0).then(|| "c".repeat(64)),
            },
        )
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::SegmentPublished),
        Just(Kind::ViewerStats),
        Just(Kind::Alert),
        Just(Kind::EventStarted),
        Just(Kind::EventFinished),
    ]
}

/// Observations a node can make: times within the RFC 3339 range, text within limits.
fn observation() -> impl Strategy<Value = Observation> {
    (
        kind(),
        0i64..4_102_444_800_000,
        any::<u64>(),
        500u32..60_000,
        any::<u32>(),
        any::<i64>(),
        "[ -~]{1,100}",
    )
        .prop_map(
            |(kind, at_ms, seq, duration_ms, viewers, event_id, message)| Observation {
                kind,
                channel: "news".into(),
                channel_id: Some(4),
                at_ms,
                media_seq: (kind == Kind::SegmentPublished).then_some(seq),
                duration_ms: (kind == Kind::SegmentPublished).then_some(duration_ms),
                viewers: (kind == Kind::ViewerStats).then_some(viewers),
                event_id: matches!(kind, Kind::EventStarted | Kind::EventFinished)
                    .then_some(event_id),
                message: (kind == Kind::Alert).then_some(message),
                severity: (kind == Kind::Alert).then_some(Severity::Warning),
            },
        )
}

fn directory(segment_ms: u32) -> ChannelDirectory {
    ChannelDirectory::from([("news".to_owned(), ChannelRef { id: 4, segment_ms })])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_the_wire_decoders(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        for code in [
            wire::decode::<Hello>(&bytes).err().map(|e| e.code()),
            wire::decode::<Heartbeat>(&bytes).err().map(|e| e.code()),
            wire::decode::<Batch>(&bytes).err().map(|e| e.code()),
        ].into_iter().flatten() {
            prop_assert!(WIRE_CODES.contains(&code), "{code}");
        }
        let _ = handover_core::artifact::Manifest::decode(&bytes);
    }

    #[test]
    fn arbitrary_json_never_panics_the_decoders(v in json_value(), schema in 0u32..5) {
        let body = serde_json::to_vec(&v).unwrap();
        let _ = wire::decode::<Hello>(&body);
        let _ = wire::decode::<Batch>(&body);
        let _ = wire::decode::<Heartbeat>(&body);
        let _ = record::decode(Schema(schema), &v);
        let _ = record::upcast(Schema(schema), Schema(2), &v, "n1", &directory(2000));
        let _ = record::upcast(Schema(schema), Schema(3), &v, "n1", &directory(2000));
        let _ = events_for_group(Schema(schema), &v, "g1");
    }

    #[test]
    fn valid_hellos_round_trip(h in hello()) {
        let body = serde_json::to_vec(&h).unwrap();
        prop_assert_eq!(wire::decode::<Hello>(&body), Ok(h));
    }

    #[test]
    fn a_hello_from_the_future_is_refused_as_such(h in hello(), v in 2u32..1000) {
        let mut value = serde_json::to_value(&h).unwrap();
        value["v"] = Value::from(v);
        let code = wire::decode::<Hello>(&serde_json::to_vec(&value).unwrap()).unwrap_err().code();
        prop_assert_eq!(code, "unsupported_version");
    }

    /// The upcaster: whatever a release-1 node writes lands exactly as the
    /// record a release-2 node writes for the same observation (segment
    /// durations come from the channel, so full-length segments only).
    #[test]
    fn upcast_1_to_2_equals_native_release_2(mut o in observation()) {
        if let Some(d) = o.duration_ms.as_mut() { *d = 2000; }
        let old = record::encode(Schema(1), "n1", &o).unwrap();
        let native = record::encode(Schema(2), "n1", &o).unwrap();
        let translated = record::upcast(Schema(1), Schema(2), &old, "n1", &directory(2000)).unwrap();
        prop_assert_eq!(translated, record::decode(Schema(2), &native).unwrap());
    }

    /// The upcaster `2 → 3`: whatever a release-2 node writes lands exactly
    /// as the record a release-3 node writes for the same observation
    /// (alerts of release 2 become `warning`, so the observation says so),
    /// and a release-1 record through both upcasters lands the same.
    #[test]
    fn upcast_2_to_3_equals_native_release_3(mut o in observation()) {
        let native = record::decode(Schema(3), &record::encode(Schema(3), "n1", &o).unwrap()).unwrap();
        let old = record::encode(Schema(2), "n1", &o).unwrap();
        let translated = record::upcast(Schema(2), Schema(3), &old, "n1", &directory(2000)).unwrap();
        prop_assert_eq!(&translated, &native);
        if let Some(d) = o.duration_ms.as_mut() { *d = 2000; }
        let native = record::decode(Schema(3), &record::encode(Schema(3), "n1", &o).unwrap()).unwrap();
        let oldest = record::encode(Schema(1), "n1", &o).unwrap();
        let translated = record::upcast(Schema(1), Schema(3), &oldest, "n1", &directory(2000)).unwrap();
        prop_assert_eq!(translated, native);
    }

    /// A live playlist is a window of contiguous sequence numbers, as long
    /// as the event's window once that many segments are done, with ENDLIST exactly when the event ended.
    #[test]
    fn playlists_are_contiguous_windows(segment_ms in 500u32..60_000, duration_ms in 1u64..10_000_000, at in 0i64..20_000_000, window_segments in 3u64..=720) {
        let e = LiveEvent { event_id: 1, channel: "news".into(), channel_id: None, start_ms: 1_000_000, duration_ms, segment_ms, window_segments };
        let now = 1_000_000 - 1_000 + at;
        match e.media_playlist(now) {
            None => prop_assert!(now < e.start_ms),
            Some(p) => {
                let seqs: Vec<u64> = p.lines().filter_map(|l| l.strip_suffix(".ts")).map(|s| s.parse().unwrap()).collect();
                prop_assert!(seqs.len() as u64 <= window_segments);
                prop_assert_eq!(seqs.len() as u64, e.completed_segments(now).min(window_segments));
                prop_assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
                prop_assert_eq!(p.contains("#EXT-X-ENDLIST"), e.has_ended(now));
                if let Some(last) = seqs.last() {
                    prop_assert!(*last < e.total_segments());
                    prop_assert_eq!(*last + 1, e.completed_segments(now));
                }
            }
        }
    }

    #[test]
    fn segments_are_whole_transport_packets(channel in "[a-z0-9]{0,64}", seq in any::<u64>(), duration_ms in 0u32..20_000) {
        let bytes = handover_core::ts::segment(&channel, seq, duration_ms);
        prop_assert!(!bytes.is_empty());
        prop_assert_eq!(bytes.len() % handover_core::ts::TS_PACKET_BYTES, 0);
        prop_assert!(bytes.chunks(188).all(|p| p[0] == 0x47));
    }
}
