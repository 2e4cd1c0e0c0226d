//! The exactly-once check: what each node says it produced against what the
//! database holds. Computed from both sides, never from success counters.

use handover_core::api::StoredRecord;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap, HashSet};

/// One record as its node's journal remembers it.
pub use handover_node::Produced;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    pub produced: u64,
    pub stored: u64,
    /// Still in a node's durable outbox: not stored yet, not lost.
    pub queued: u64,
    /// Produced, neither stored nor queued.
    pub lost: u64,
    /// Stored more than once under any key: the same (node, seq) or the same
    /// natural key (e.g. one segment published twice by one node).
    pub duplicated: u64,
    /// Stored, but the node never produced it.
    pub unexpected: u64,
    pub translated: u64,
}

impl CheckReport {
    pub fn add(&mut self, o: &CheckReport) {
        self.produced += o.produced;
        self.stored += o.stored;
        self.queued += o.queued;
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.unexpected += o.unexpected;
        self.translated += o.translated;
    }

    pub fn is_exact(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.unexpected == 0
    }
}

/// Checks one node. `queued` are the sequence numbers still in its outbox.
pub fn check_node(produced: &[Produced], queued: &[u64], stored: &[StoredRecord]) -> CheckReport {
    let queued: HashSet<u64> = queued.iter().copied().collect();
    let produced_by_seq: HashMap<u64, &str> = produced
        .iter()
        .map(|p| (p.seq, p.natural_key.as_str()))
        .collect();
    let mut seen_seq = BTreeSet::new();
    let mut seen_key = HashSet::new();
    let mut r = CheckReport {
        produced: produced.len() as u64,
        stored: stored.len() as u64,
        ..CheckReport::default()
    };
    for s in stored {
        if !seen_seq.insert(s.seq) || !seen_key.insert(s.natural_key.as_str()) {
            r.duplicated += 1;
        }
        if produced_by_seq.get(&s.seq) != Some(&s.natural_key.as_str()) {
            r.unexpected += 1;
        }
        if s.translated_from.is_some() {
            r.translated += 1;
        }
    }
    for p in produced {
        if !seen_seq.contains(&p.seq) {
            if queued.contains(&p.seq) {
                r.queued += 1;
            } else {
                r.lost += 1;
            }
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produced(n: u64) -> Vec<Produced> {
        (1..=n)
            .map(|seq| Produced {
                seq,
                natural_key: format!("k{seq}"),
            })
            .collect()
    }

    fn stored(seqs: &[u64]) -> Vec<StoredRecord> {
        seqs.iter()
            .map(|&seq| StoredRecord {
                node_id: "n".into(),
                seq,
                kind: "x".into(),
                natural_key: format!("k{seq}"),
                translated_from: None,
            })
            .collect()
    }

    #[test]
    fn exact() {
        let r = check_node(&produced(3), &[], &stored(&[1, 2, 3]));
        assert!(r.is_exact());
        assert_eq!((r.produced, r.stored), (3, 3));
    }

    #[test]
    fn lost_and_queued_are_told_apart() {
        let r = check_node(&produced(4), &[4], &stored(&[1, 3]));
        assert_eq!((r.lost, r.queued), (1, 1));
    }

    #[test]
    fn duplicates_under_any_key() {
        let mut s = stored(&[1, 2]);
        s.push(StoredRecord {
            node_id: "n".into(),
            seq: 3,
            kind: "x".into(),
            natural_key: "k1".into(),
            translated_from: None,
        });
        let mut p = produced(2);
        p.push(Produced {
            seq: 3,
            natural_key: "k1".into(),
        });
        let r = check_node(&p, &[], &s);
        assert_eq!((r.duplicated, r.unexpected, r.lost), (1, 0, 0));
    }

    #[test]
    fn unexpected_records() {
        let r = check_node(&produced(1), &[], &stored(&[1, 9]));
        assert_eq!(r.unexpected, 1);
    }
}
