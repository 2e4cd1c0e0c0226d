//! The end-of-run invariants: exactly-once storage against the nodes'
//! journals, and the state the upgrade must leave the cluster in.

use crate::controller::{directory, Controller};
use crate::node::Node;
use handover_core::grant::Grant;
use handover_core::record;
use handover_core::release::Release;
use handover_core::upgrade::Status;
use std::collections::{BTreeMap, BTreeSet};

/// Diffs listed in a failure before "and N more".
const DIFFS_SHOWN_MAX: usize = 5;

pub struct Expected {
    /// This seed injected a failing controller switch.
    pub failed_switch: bool,
    pub from: Release,
    pub target: Release,
}

impl Expected {
    fn release(&self) -> Release {
        if self.failed_switch {
            self.from
        } else {
            self.target
        }
    }
}

/// Whether the cluster has come to rest: everyone up, drained and granted `full`.
pub fn settled(ctl: &Controller, nodes: &[Node], expect: &Expected) -> Result<(), String> {
    if !ctl.is_up() {
        return Err("the controller is down".into());
    }
    if ctl.durable.fenced {
        return Err(format!(
            "the fence is in force at epoch {}",
            ctl.durable.epoch
        ));
    }
    let mut waiting = Vec::new();
    for n in nodes {
        let id = &n.spec.id;
        let d = &n.durable;
        if !n.is_up() {
            waiting.push(format!("{id} is down"));
        } else if !n.established() {
            waiting.push(format!("{id} has no session"));
        } else if d.release != expect.release() {
            waiting.push(format!("{id} runs release {}", d.release));
        } else if d.grant != Some(Grant::Full) || d.epoch != Some(ctl.durable.epoch) {
            waiting.push(format!(
                "{id} holds {:?} at epoch {:?} (controller at {})",
                d.grant, d.epoch, ctl.durable.epoch
            ));
        } else if !d.outbox.is_empty() {
            waiting.push(format!("{id} has {} records queued", d.outbox.len()));
        }
    }
    if waiting.is_empty() {
        Ok(())
    } else {
        Err(format!("not settled: {}", waiting.join("; ")))
    }
}

/// Every invariant that must hold when a run is over.
pub fn final_state(ctl: &Controller, nodes: &[Node], expect: &Expected) -> Result<(), String> {
    let up = ctl.upgrade().ok_or("no upgrade ever started")?;
    match (&up.status, expect.failed_switch) {
        (Status::Finalized, false) => {
            if ctl.durable.cluster_release != expect.target {
                return Err(format!(
                    "finalized, but the cluster release is {}",
                    ctl.durable.cluster_release
                ));
            }
        }
        (Status::Failed { reason }, true) if reason.contains("did not come up") => {}
        (status, failed_switch) => {
            return Err(format!(
                "the upgrade ended {status:?} (failing switch injected: {failed_switch})"
            ))
        }
    }
    if ctl.info().release != expect.release() {
        return Err(format!(
            "the controller runs release {}, expected {}",
            ctl.info().release,
            expect.release()
        ));
    }
    settled(ctl, nodes, expect)?;
    exactly_once(ctl, nodes)
}

/// The store holds, per node, exactly the journal: same seqs, same natural
/// keys, no natural key twice, and each record as a node of the database's
/// schema would have written it.
fn exactly_once(ctl: &Controller, nodes: &[Node]) -> Result<(), String> {
    let mut stored: BTreeMap<&str, BTreeMap<u64, &str>> = BTreeMap::new();
    for ((node, seq), s) in &ctl.durable.records {
        stored
            .entry(node.as_str())
            .or_default()
            .insert(*seq, s.natural_key.as_str());
    }
    let known: BTreeSet<&str> = nodes.iter().map(|n| n.spec.id.as_str()).collect();
    if let Some(stranger) = stored.keys().find(|n| !known.contains(*n)) {
        return Err(format!("records stored for unknown node {stranger}"));
    }
    let schema = ctl.durable.schema;
    let (dir, _) = directory(schema);
    let mut problems = Vec::new();
    for n in nodes {
        let id = n.spec.id.as_str();
        let journal: BTreeMap<u64, &str> = n
            .durable
            .journal
            .iter()
            .map(|(s, k)| (*s, k.as_str()))
            .collect();
        let empty = BTreeMap::new();
        let store = stored.get(id).unwrap_or(&empty);
        for (seq, key) in &journal {
            match store.get(seq) {
                None => problems.push(format!("{id} seq {seq} ({key}) was lost")),
                Some(k) if k != key => {
                    problems.push(format!("{id} seq {seq} stored as {k}, produced as {key}"))
                }
                Some(_) => {}
            }
        }
        for (seq, key) in store {
            if !journal.contains_key(seq) {
                problems.push(format!("{id} seq {seq} ({key}) stored but never produced"));
            }
        }
        let mut keys = BTreeSet::new();
        for key in store.values() {
            if !keys.insert(*key) {
                problems.push(format!("{id}: natural key {key} stored twice"));
            }
        }
        // Content: what a node of the database's schema writes for the same observation.
        for (seq, o) in &n.durable.ledger {
            let Some(s) = ctl.durable.records.get(&(id.to_owned(), *seq)) else {
                continue;
            };
            let native = record::encode(schema, id, o)
                .and_then(|raw| record::upcast(schema, schema, &raw, id, &dir));
            match native {
                Ok(r) if r == s.record => {}
                Ok(r) => problems.push(format!(
                    "{id} seq {seq} stored as {:?}, a native record is {r:?}",
                    s.record
                )),
                Err(e) => problems.push(format!("{id} seq {seq}: no native record: {e}")),
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let more = problems.len().saturating_sub(DIFFS_SHOWN_MAX);
    let mut text = problems
        .into_iter()
        .take(DIFFS_SHOWN_MAX)
        .collect::<Vec<_>>()
        .join("; ");
    if more > 0 {
        text.push_str(&format!("; and {more} more"));
    }
    Err(format!("exactly-once violated: {text}"))
}
