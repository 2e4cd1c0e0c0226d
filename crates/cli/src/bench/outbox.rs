//! 2. outbox: the node's durable appends against a raw insert.

use super::*;

/// What the producer commits in one tick of a node running two channels, at
/// a second boundary: a segment and viewer stats per channel, and the
/// progress rows (`producer::tick_commit`).
pub(super) fn tick_commit(
    node_id: &str,
    tick: usize,
) -> anyhow::Result<handover_node::store::Commit> {
    use handover_node::store::{keys, Commit, NewRecord};
    let mut c = Commit::default();
    let at_ms = 1_800_000_000_000 + (tick as i64) * 1000;
    for (ch, id) in [("ch1", 1i64), ("ch2", 2)] {
        let seg = Observation {
            kind: Kind::SegmentPublished,
            channel: ch.into(),
            channel_id: Some(id),
            at_ms,
            media_seq: Some(tick as u64),
            duration_ms: Some(1000),
            viewers: None,
            event_id: Some(id),
            message: None,
            severity: None,
        };
        let stats = Observation {
            kind: Kind::ViewerStats,
            media_seq: None,
            duration_ms: None,
            viewers: Some(40),
            event_id: None,
            ..seg.clone()
        };
        c.records.push(NewRecord::encode(Schema(2), node_id, &seg)?);
        c.records
            .push(NewRecord::encode(Schema(2), node_id, &stats)?);
        c.put.push((
            keys::progress(id),
            format!(
                r#"{{"started":true,"finished":false,"last_seq":{tick},"end_ms":1800003600000}}"#
            ),
        ));
    }
    c.put.push((
        keys::LAST_STATS_SECOND.to_owned(),
        (at_ms / 1000 - 1).to_string(),
    ));
    Ok(c)
}

pub(super) fn single_commit(
    node_id: &str,
    k: usize,
) -> anyhow::Result<handover_node::store::Commit> {
    use handover_node::store::{Commit, NewRecord};
    let o = Observation {
        kind: Kind::Alert,
        channel: "ch1".into(),
        channel_id: Some(1),
        at_ms: 1_800_000_000_000 + k as i64,
        media_seq: None,
        duration_ms: None,
        viewers: None,
        event_id: None,
        message: Some(format!("alert {k}")),
        severity: Some(Severity::Warning),
    };
    Ok(Commit {
        records: vec![NewRecord::encode(Schema(2), node_id, &o)?],
        ..Commit::default()
    })
}

pub(super) async fn outbox(dir: &Path, s: &Sizes) -> anyhow::Result<Figures> {
    use handover_node::store::{RawOutbox, Store};
    let mut f = Figures::new();
    let mut ratios = Vec::new();
    for name in ["tick", "single"] {
        let commits = (0..s.outbox_commits)
            .map(|k| {
                if name == "tick" {
                    tick_commit("bench-node", k)
                } else {
                    single_commit("bench-node", k)
                }
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let records: usize = commits.iter().map(|c| c.records.len()).sum();

        let store = Store::open(&dir.join(format!("outbox-{name}"))).await?;
        let t = Instant::now();
        for c in &commits {
            store.commit(c).await?;
        }
        let spent = t.elapsed();
        store.close().await;

        let mut raw = RawOutbox::open(&dir.join(format!("outbox-{name}-raw"))).await?;
        let t = Instant::now();
        for c in &commits {
            raw.append(&c.records).await?;
        }
        let raw_spent = t.elapsed();
        raw.close().await;

        let rate = records as f64 / spent.as_secs_f64();
        let limit = records as f64 / raw_spent.as_secs_f64();
        ratios.push(rate / limit);
        put(&mut f, &format!("outbox.{name}_per_s"), rate);
        put(&mut f, &format!("outbox.{name}_limit_per_s"), limit);
        put(&mut f, &format!("outbox.{name}_ratio"), rate / limit);
        put(
            &mut f,
            &format!("outbox.{name}_records_per_commit"),
            records as f64 / commits.len() as f64,
        );
    }
    put(
        &mut f,
        "outbox.ratio",
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
    );
    Ok(f)
}
