//! Record formats, one type per schema, and the upcasters between them.
//!
//! A node produces [`Observation`]s and encodes them in its own schema. The
//! controller decodes a record of schema k with that schema's type and walks
//! the upcasters `k → k+1` until it reaches the schema of its database.

use crate::release::Schema;
use crate::wire::limits;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub mod v1 {
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Kind {
        Segment,
        Stats,
        Alert,
        EventStart,
        EventEnd,
    }

    /// Release 1 names channels and writes text timestamps.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Record {
        pub kind: Kind,
        pub channel: String,
        /// RFC 3339 text.
        pub at: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub viewers: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub event: Option<i64>,
        pub text: String,
    }
}

pub mod v2 {
    use serde::{Deserialize, Serialize};

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Kind {
        SegmentPublished,
        ViewerStats,
        Alert,
        EventStarted,
        EventFinished,
    }

    impl Kind {
        pub fn as_str(self) -> &'static str {
            match self {
                Kind::SegmentPublished => "segment_published",
                Kind::ViewerStats => "viewer_stats",
                Kind::Alert => "alert",
                Kind::EventStarted => "event_started",
                Kind::EventFinished => "event_finished",
            }
        }
    }

    /// Release 2 keys records by channel id and carries node and timing fields.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Record {
        pub kind: Kind,
        pub channel_id: i64,
        pub node_id: String,
        pub produced_at_ms: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub media_seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub duration_ms: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub viewers: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub event_id: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub message: Option<String>,
    }
}

pub mod v3 {
    //! Release 3: release 2's records, and every alert carries a severity.
    //! The kinds are release 2's ([`super::v2::Kind`]).
    use super::v2::Kind;
    use serde::{Deserialize, Serialize};

    /// How urgent an alert is.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum Severity {
        Info,
        Warning,
        Critical,
    }

    impl Severity {
        pub fn as_str(self) -> &'static str {
            match self {
                Severity::Info => "info",
                Severity::Warning => "warning",
                Severity::Critical => "critical",
            }
        }

        /// The inverse of [`Severity::as_str`] (for the store's column).
        pub fn parse(s: &str) -> Option<Severity> {
            match s {
                "info" => Some(Severity::Info),
                "warning" => Some(Severity::Warning),
                "critical" => Some(Severity::Critical),
                _ => None,
            }
        }
    }

    /// Release 3's record: release 2's fields plus `severity`, which an
    /// alert must carry and no other kind may.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Record {
        pub kind: Kind,
        pub channel_id: i64,
        pub node_id: String,
        pub produced_at_ms: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub media_seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub duration_ms: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub viewers: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub event_id: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub message: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub severity: Option<Severity>,
    }

    impl Record {
        /// The rule of release 3: severity exactly on alerts.
        pub fn check_severity(&self) -> Result<(), String> {
            match (self.kind, self.severity) {
                (Kind::Alert, None) => Err("an alert must carry a severity".into()),
                (Kind::Alert, Some(_)) | (_, None) => Ok(()),
                (kind, Some(_)) => Err(format!(
                    "a {} record carries no severity (only alerts do)",
                    kind.as_str()
                )),
            }
        }
    }
}

/// The one mapping between the kinds of the two schemas, used by the
/// encoder, the upcaster and the store.
impl From<v1::Kind> for v2::Kind {
    fn from(k: v1::Kind) -> v2::Kind {
        match k {
            v1::Kind::Segment => v2::Kind::SegmentPublished,
            v1::Kind::Stats => v2::Kind::ViewerStats,
            v1::Kind::Alert => v2::Kind::Alert,
            v1::Kind::EventStart => v2::Kind::EventStarted,
            v1::Kind::EventEnd => v2::Kind::EventFinished,
        }
    }
}

impl From<v2::Kind> for v1::Kind {
    fn from(k: v2::Kind) -> v1::Kind {
        match k {
            v2::Kind::SegmentPublished => v1::Kind::Segment,
            v2::Kind::ViewerStats => v1::Kind::Stats,
            v2::Kind::Alert => v1::Kind::Alert,
            v2::Kind::EventStarted => v1::Kind::EventStart,
            v2::Kind::EventFinished => v1::Kind::EventEnd,
        }
    }
}

/// What a node saw happen, before it is written in any schema.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub kind: v2::Kind,
    pub channel: String,
    pub channel_id: Option<i64>,
    pub at_ms: i64,
    pub media_seq: Option<u64>,
    pub duration_ms: Option<u32>,
    pub viewers: Option<u32>,
    pub event_id: Option<i64>,
    pub message: Option<String>,
    /// How urgent an alert is; only alerts carry one. Written from schema 3
    /// on (older schemas have no place for it).
    #[serde(default)]
    pub severity: Option<v3::Severity>,
}

impl Observation {
    /// Identity of the fact itself, independent of schema and sequence
    /// number: the same segment published twice by one node is a duplicate
    /// even under two sequence numbers.
    pub fn natural_key(&self) -> String {
        natural_key(
            self.kind,
            &self.channel,
            self.at_ms,
            self.media_seq,
            self.event_id,
        )
    }
}

/// See [`Observation::natural_key`]; shared with the store so both sides agree.
pub fn natural_key(
    kind: v2::Kind,
    channel: &str,
    at_ms: i64,
    media_seq: Option<u64>,
    event_id: Option<i64>,
) -> String {
    let k = kind.as_str();
    match kind {
        v2::Kind::SegmentPublished => format!("{k}/{channel}/{}", media_seq.unwrap_or(0)),
        v2::Kind::ViewerStats => format!("{k}/{channel}/{}", at_ms.div_euclid(1000)),
        v2::Kind::Alert => format!("{k}/{channel}/{at_ms}"),
        v2::Kind::EventStarted | v2::Kind::EventFinished => {
            format!("{k}/{}", event_id.unwrap_or(0))
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record of schema {schema} is malformed: {reason}")]
    Malformed { schema: u32, reason: String },
    #[error("no record format for schema {0}")]
    UnknownSchema(u32),
    #[error("cannot translate a record of schema {from} down to schema {to}")]
    Downcast { from: u32, to: u32 },
    #[error("record names channel {0:?}, which the database does not know")]
    UnknownChannel(String),
    #[error("record claims node {claimed:?} but was sent by node {sender:?}")]
    WrongNode { claimed: String, sender: String },
    #[error("this release needs a channel id to write the record of channel {0:?}")]
    MissingChannelId(String),
}

/// A record in the format of some schema; what the store writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnyRecord {
    V1(v1::Record),
    V2(v2::Record),
    V3(v3::Record),
}

impl AnyRecord {
    pub fn schema(&self) -> Schema {
        match self {
            AnyRecord::V1(_) => Schema(1),
            AnyRecord::V2(_) => Schema(2),
            AnyRecord::V3(_) => Schema(3),
        }
    }

    /// The id of the record's channel (schema 2 on; schema 1 names it).
    pub fn channel_id(&self) -> Option<i64> {
        match self {
            AnyRecord::V1(_) => None,
            AnyRecord::V2(r) => Some(r.channel_id),
            AnyRecord::V3(r) => Some(r.channel_id),
        }
    }

    /// The node the record says produced it (schema 2 on).
    fn claimed_node(&self) -> Option<&str> {
        match self {
            AnyRecord::V1(_) => None,
            AnyRecord::V2(r) => Some(&r.node_id),
            AnyRecord::V3(r) => Some(&r.node_id),
        }
    }
}

/// What the upcaster `1 → 2` needs from the database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelRef {
    pub id: i64,
    pub segment_ms: u32,
}

/// Channel names to ids, as the controller's database has them.
pub type ChannelDirectory = HashMap<String, ChannelRef>;

fn malformed(schema: u32, reason: impl ToString) -> RecordError {
    RecordError::Malformed {
        schema,
        reason: reason.to_string(),
    }
}

fn check_text(schema: u32, field: &str, text: &str) -> Result<(), RecordError> {
    if text.chars().count() > limits::TEXT_CHARS_MAX {
        return Err(malformed(
            schema,
            format!("{field} longer than {} characters", limits::TEXT_CHARS_MAX),
        ));
    }
    Ok(())
}

/// Decodes one record as `schema` says it is, validating its sizes.
/// Reads `raw` in place: no copy of the JSON tree per record.
pub fn decode(schema: Schema, raw: &serde_json::Value) -> Result<AnyRecord, RecordError> {
    match schema.0 {
        1 => {
            let r = v1::Record::deserialize(raw).map_err(|e| malformed(1, e))?;
            check_text(1, "channel", &r.channel)?;
            check_text(1, "text", &r.text)?;
            crate::timefmt::ms_from_rfc3339(&r.at).map_err(|e| malformed(1, e))?;
            Ok(AnyRecord::V1(r))
        }
        2 => {
            let r = v2::Record::deserialize(raw).map_err(|e| malformed(2, e))?;
            check_text(2, "node_id", &r.node_id)?;
            if let Some(m) = &r.message {
                check_text(2, "message", m)?;
            }
            Ok(AnyRecord::V2(r))
        }
        3 => {
            let r = v3::Record::deserialize(raw).map_err(|e| malformed(3, e))?;
            check_v3(&r)?;
            Ok(AnyRecord::V3(r))
        }
        other => Err(RecordError::UnknownSchema(other)),
    }
}

/// What `decode` checks of a schema-3 record beyond its fields, also applied
/// by `encode`: a node never writes what the controller would refuse.
fn check_v3(r: &v3::Record) -> Result<(), RecordError> {
    check_text(3, "node_id", &r.node_id)?;
    if let Some(m) = &r.message {
        check_text(3, "message", m)?;
    }
    r.check_severity().map_err(|e| malformed(3, e))
}

/// Upcaster `1 → 2`: channel name to id, text time to Unix ms, kinds renamed,
/// the sending node written into the record, segment duration from the channel.
pub fn upcast_1_to_2(
    r: v1::Record,
    node_id: &str,
    channels: &ChannelDirectory,
) -> Result<v2::Record, RecordError> {
    let channel = channels
        .get(&r.channel)
        .ok_or_else(|| RecordError::UnknownChannel(r.channel.clone()))?;
    let produced_at_ms = crate::timefmt::ms_from_rfc3339(&r.at).map_err(|e| malformed(1, e))?;
    let kind = v2::Kind::from(r.kind);
    let is_segment = kind == v2::Kind::SegmentPublished;
    Ok(v2::Record {
        kind,
        channel_id: channel.id,
        node_id: node_id.to_owned(),
        produced_at_ms,
        media_seq: r.seq,
        duration_ms: is_segment.then_some(channel.segment_ms),
        viewers: r.viewers,
        event_id: r.event,
        message: (!r.text.is_empty()).then_some(r.text),
    })
}

/// Upcaster `2 → 3`: alerts get severity `warning` (release 2 did not say,
/// and an alert is worth a look); every other field and kind is unchanged.
pub fn upcast_2_to_3(r: v2::Record) -> v3::Record {
    let severity = (r.kind == v2::Kind::Alert).then_some(v3::Severity::Warning);
    v3::Record {
        kind: r.kind,
        channel_id: r.channel_id,
        node_id: r.node_id,
        produced_at_ms: r.produced_at_ms,
        media_seq: r.media_seq,
        duration_ms: r.duration_ms,
        viewers: r.viewers,
        event_id: r.event_id,
        message: r.message,
        severity,
    }
}

/// Decodes a record of `from` and translates it up to `to` by composing the
/// upcasters. A record already in `to` passes through unchanged.
pub fn upcast(
    from: Schema,
    to: Schema,
    raw: &serde_json::Value,
    node_id: &str,
    channels: &ChannelDirectory,
) -> Result<AnyRecord, RecordError> {
    if from > to {
        return Err(RecordError::Downcast {
            from: from.0,
            to: to.0,
        });
    }
    let mut record = decode(from, raw)?;
    while record.schema() < to {
        record = match record {
            AnyRecord::V1(r) => AnyRecord::V2(upcast_1_to_2(r, node_id, channels)?),
            AnyRecord::V2(r) => AnyRecord::V3(upcast_2_to_3(r)),
            AnyRecord::V3(_) => return Err(RecordError::UnknownSchema(to.0)),
        };
    }
    if let Some(claimed) = record.claimed_node() {
        if claimed != node_id {
            return Err(RecordError::WrongNode {
                claimed: claimed.to_owned(),
                sender: node_id.to_owned(),
            });
        }
    }
    Ok(record)
}

/// Writes an observation in the record format of `schema` (the node side).
pub fn encode(
    schema: Schema,
    node_id: &str,
    o: &Observation,
) -> Result<serde_json::Value, RecordError> {
    let value = match schema.0 {
        1 => serde_json::to_value(v1::Record {
            kind: v1::Kind::from(o.kind),
            channel: o.channel.clone(),
            at: crate::timefmt::rfc3339_from_ms(o.at_ms).map_err(|e| malformed(1, e))?,
            seq: o.media_seq,
            viewers: o.viewers,
            event: o.event_id,
            text: o.message.clone().unwrap_or_default(),
        }),
        2 => serde_json::to_value(v2::Record {
            kind: o.kind,
            channel_id: o
                .channel_id
                .ok_or_else(|| RecordError::MissingChannelId(o.channel.clone()))?,
            node_id: node_id.to_owned(),
            produced_at_ms: o.at_ms,
            media_seq: o.media_seq,
            duration_ms: o.duration_ms,
            viewers: o.viewers,
            event_id: o.event_id,
            message: o.message.clone(),
        }),
        3 => {
            let r = v3::Record {
                kind: o.kind,
                channel_id: o
                    .channel_id
                    .ok_or_else(|| RecordError::MissingChannelId(o.channel.clone()))?,
                node_id: node_id.to_owned(),
                produced_at_ms: o.at_ms,
                media_seq: o.media_seq,
                duration_ms: o.duration_ms,
                viewers: o.viewers,
                event_id: o.event_id,
                message: o.message.clone(),
                severity: o.severity,
            };
            check_v3(&r)?;
            serde_json::to_value(r)
        }
        other => return Err(RecordError::UnknownSchema(other)),
    };
    value.map_err(|e| malformed(schema.0, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dir() -> ChannelDirectory {
        HashMap::from([(
            "news".to_owned(),
            ChannelRef {
                id: 4,
                segment_ms: 2000,
            },
        )])
    }

    fn obs(kind: v2::Kind) -> Observation {
        Observation {
            kind,
            channel: "news".into(),
            channel_id: Some(4),
            at_ms: 1_795_000_000_250,
            media_seq: (kind == v2::Kind::SegmentPublished).then_some(42),
            duration_ms: (kind == v2::Kind::SegmentPublished).then_some(2000),
            viewers: (kind == v2::Kind::ViewerStats).then_some(17),
            event_id: matches!(kind, v2::Kind::EventStarted | v2::Kind::EventFinished).then_some(9),
            message: (kind == v2::Kind::Alert).then(|| "outbox above 80%".to_owned()),
            severity: (kind == v2::Kind::Alert).then_some(v3::Severity::Warning),
        }
    }

    const KINDS: [v2::Kind; 5] = [
        v2::Kind::SegmentPublished,
        v2::Kind::ViewerStats,
        v2::Kind::Alert,
        v2::Kind::EventStarted,
        v2::Kind::EventFinished,
    ];

    /// Every kind written by a release-1 node lands as the record a
    /// release-2 node would have written for the same observation.
    #[test]
    fn upcaster_1_to_2_matches_native_release_2_records() {
        for kind in KINDS {
            let o = obs(kind);
            let old = encode(Schema(1), "n1", &o).unwrap();
            let native = encode(Schema(2), "n1", &o).unwrap();
            let translated = upcast(Schema(1), Schema(2), &old, "n1", &dir()).unwrap();
            assert_eq!(translated, decode(Schema(2), &native).unwrap(), "{kind:?}");
        }
    }

    /// Every kind written by a release-2 node lands as the record a
    /// release-3 node writes for the same observation (alerts: `warning`);
    /// a release-1 record goes through both upcasters.
    #[test]
    fn upcaster_2_to_3_matches_native_release_3_records() {
        for kind in KINDS {
            let o = obs(kind);
            let native = decode(Schema(3), &encode(Schema(3), "n1", &o).unwrap()).unwrap();
            for from in [1, 2] {
                let old = encode(Schema(from), "n1", &o).unwrap();
                let translated = upcast(Schema(from), Schema(3), &old, "n1", &dir()).unwrap();
                assert_eq!(translated, native, "{kind:?} from schema {from}");
            }
        }
        let AnyRecord::V3(alert) = decode(
            Schema(3),
            &encode(Schema(3), "n1", &obs(v2::Kind::Alert)).unwrap(),
        )
        .unwrap() else {
            panic!("not a v3 record")
        };
        assert_eq!(alert.severity, Some(v3::Severity::Warning));
    }

    /// Records of schema 2 cannot be stored as schema 3 without
    /// translation, nor the other way round.
    #[test]
    fn release_2_and_3_records_are_incompatible() {
        let v2_alert = encode(Schema(2), "n1", &obs(v2::Kind::Alert)).unwrap();
        assert!(matches!(
            decode(Schema(3), &v2_alert),
            Err(RecordError::Malformed { schema: 3, .. })
        ));
        let v3_alert = encode(Schema(3), "n1", &obs(v2::Kind::Alert)).unwrap();
        assert!(matches!(
            decode(Schema(2), &v3_alert),
            Err(RecordError::Malformed { schema: 2, .. })
        ));
        assert_eq!(
            upcast(Schema(3), Schema(2), &v3_alert, "n1", &dir()),
            Err(RecordError::Downcast { from: 3, to: 2 })
        );
        let mut stats = encode(Schema(3), "n1", &obs(v2::Kind::ViewerStats)).unwrap();
        stats["severity"] = json!("info");
        assert!(matches!(
            decode(Schema(3), &stats),
            Err(RecordError::Malformed { schema: 3, .. })
        ));
        let mut unknown = v3_alert.clone();
        unknown["severity"] = json!("fatal");
        assert!(matches!(
            decode(Schema(3), &unknown),
            Err(RecordError::Malformed { schema: 3, .. })
        ));
        assert!(matches!(
            upcast(Schema(3), Schema(3), &v3_alert, "n2", &dir()),
            Err(RecordError::WrongNode { .. })
        ));
    }

    /// A node of release 3 never writes what its controller would refuse.
    #[test]
    fn release_3_encodes_severity_on_alerts_only() {
        let mut alert = obs(v2::Kind::Alert);
        alert.severity = None;
        assert!(matches!(
            encode(Schema(3), "n1", &alert),
            Err(RecordError::Malformed { schema: 3, .. })
        ));
        let mut stats = obs(v2::Kind::ViewerStats);
        stats.severity = Some(v3::Severity::Critical);
        assert!(matches!(
            encode(Schema(3), "n1", &stats),
            Err(RecordError::Malformed { schema: 3, .. })
        ));
        for severity in [
            v3::Severity::Info,
            v3::Severity::Warning,
            v3::Severity::Critical,
        ] {
            let mut o = obs(v2::Kind::Alert);
            o.severity = Some(severity);
            let raw = encode(Schema(3), "n1", &o).unwrap();
            assert_eq!(raw["severity"], json!(severity.as_str()));
            assert_eq!(v3::Severity::parse(severity.as_str()), Some(severity));
        }
        // Older schemas have no place for a severity: it is not written.
        let raw = encode(Schema(2), "n1", &obs(v2::Kind::Alert)).unwrap();
        assert!(raw.get("severity").is_none());
    }

    #[test]
    fn same_schema_passes_through() {
        let raw = encode(Schema(2), "n1", &obs(v2::Kind::ViewerStats)).unwrap();
        assert!(matches!(
            upcast(Schema(2), Schema(2), &raw, "n1", &dir()),
            Ok(AnyRecord::V2(_))
        ));
        let raw = encode(Schema(1), "n1", &obs(v2::Kind::ViewerStats)).unwrap();
        assert!(matches!(
            upcast(Schema(1), Schema(1), &raw, "n1", &dir()),
            Ok(AnyRecord::V1(_))
        ));
    }

    #[test]
    fn refusals() {
        let raw = encode(Schema(1), "n1", &obs(v2::Kind::Alert)).unwrap();
        assert_eq!(
            upcast(Schema(2), Schema(1), &raw, "n1", &dir()),
            Err(RecordError::Downcast { from: 2, to: 1 })
        );
        assert_eq!(
            upcast(Schema(1), Schema(2), &raw, "n1", &ChannelDirectory::new()),
            Err(RecordError::UnknownChannel("news".into()))
        );
        let v2raw = encode(Schema(2), "n1", &obs(v2::Kind::Alert)).unwrap();
        assert!(matches!(
            upcast(Schema(2), Schema(2), &v2raw, "n2", &dir()),
            Err(RecordError::WrongNode { .. })
        ));
        assert!(matches!(
            decode(Schema(1), &v2raw),
            Err(RecordError::Malformed { .. })
        ));
        assert!(matches!(
            decode(Schema(2), &raw),
            Err(RecordError::Malformed { .. })
        ));
        assert_eq!(decode(Schema(7), &raw), Err(RecordError::UnknownSchema(7)));
        let bad_time = json!({"kind": "alert", "channel": "news", "at": "noon", "text": ""});
        assert!(matches!(
            decode(Schema(1), &bad_time),
            Err(RecordError::Malformed { .. })
        ));
        let long = json!({"kind": "alert", "channel": "news", "at": "2026-11-25T23:00:00Z", "text": "x".repeat(5000)});
        assert!(matches!(
            decode(Schema(1), &long),
            Err(RecordError::Malformed { .. })
        ));
    }

    #[test]
    fn release_2_needs_channel_ids() {
        let mut o = obs(v2::Kind::Alert);
        o.channel_id = None;
        assert_eq!(
            encode(Schema(2), "n1", &o),
            Err(RecordError::MissingChannelId("news".into()))
        );
    }

    #[test]
    fn natural_keys_ignore_time_for_segments() {
        let a = obs(v2::Kind::SegmentPublished);
        let mut b = a.clone();
        b.at_ms += 5;
        assert_eq!(a.natural_key(), b.natural_key());
        assert_eq!(a.natural_key(), "segment_published/news/42");
    }
}
