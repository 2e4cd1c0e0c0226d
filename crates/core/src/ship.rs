//! The node's shipping decisions, sans-IO: which channel its grant ships
//! on, how much of the outbox one batch carries, and what an acknowledgement
//! lets it trim. The node's shipper and the simulation's node both call
//! these; neither has its own copy or its own limits.

use crate::admission::Channel;
use crate::grant::Grant;
use crate::release::Schema;
use crate::wire::limits;

/// Records in one batch (the wire allows more; smaller batches ack sooner).
pub const BATCH_RECORDS_MAX: usize = 500;
/// JSON bytes of records in one batch, well under the controller's body limit.
pub const BATCH_BYTES_MAX: usize = limits::BODY_BYTES_MAX / 2;

const _: () = assert!(BATCH_RECORDS_MAX <= limits::BATCH_RECORDS_MAX);

/// The channel a node holding `grant` ships on; `None` (fenced): it queues
/// locally and waits for the grant to change.
pub fn channel_of(grant: Grant) -> Option<Channel> {
    match grant {
        Grant::Full => Some(Channel::Main),
        Grant::Deliver => Some(Channel::Redundant),
        Grant::Fenced => None,
    }
}

/// One queued record as the batching sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queued {
    pub seq: u64,
    pub schema: Schema,
    /// Size of its JSON body.
    pub bytes: usize,
}

/// How many of the oldest queued records (oldest first) the next batch
/// carries: one schema, consecutive seqs, at most [`BATCH_RECORDS_MAX`]
/// records and [`BATCH_BYTES_MAX`] bytes, but always at least one record.
pub fn batch_len(oldest: impl IntoIterator<Item = Queued>) -> usize {
    let mut first: Option<Queued> = None;
    let mut bytes = 0usize;
    let mut n = 0;
    for (i, r) in oldest.into_iter().enumerate().take(BATCH_RECORDS_MAX) {
        let f = *first.get_or_insert(r);
        let consecutive = f.seq.checked_add(i as u64) == Some(r.seq);
        bytes = bytes.saturating_add(r.bytes + 1);
        if r.schema != f.schema || !consecutive || (n > 0 && bytes > BATCH_BYTES_MAX) {
            break;
        }
        n += 1;
    }
    n
}

/// What an acknowledgement of the batch `first..=last` lets the node trim:
/// through `acked_through`, but never past what this batch carried. An
/// answer that acknowledges none of it is an error (nothing is trimmed).
pub fn trim_through(first: u64, last: u64, acked_through: u64) -> Result<u64, String> {
    let through = acked_through.min(last);
    if through < first {
        Err(format!(
            "controller acked through {acked_through} for a batch starting at {first}"
        ))
    } else {
        Ok(through)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(seq: u64, schema: u32, bytes: usize) -> Queued {
        Queued {
            seq,
            schema: Schema(schema),
            bytes,
        }
    }

    #[test]
    fn batches_are_one_schema_consecutive_and_bounded() {
        assert_eq!(batch_len([]), 0);
        assert_eq!(batch_len((1..=700).map(|s| q(s, 1, 10))), BATCH_RECORDS_MAX);
        assert_eq!(batch_len([q(1, 1, 10), q(2, 1, 10), q(3, 2, 10)]), 2);
        assert_eq!(batch_len([q(1, 1, 10), q(3, 1, 10)]), 1);
        assert_eq!(batch_len([q(1, 1, BATCH_BYTES_MAX + 5), q(2, 1, 10)]), 1);
        assert_eq!(
            batch_len([q(1, 1, BATCH_BYTES_MAX / 2), q(2, 1, BATCH_BYTES_MAX / 2)]),
            1
        );
    }

    #[test]
    fn an_ack_trims_only_what_the_batch_carried() {
        assert_eq!(trim_through(10, 20, 20), Ok(20));
        assert_eq!(trim_through(10, 20, 15), Ok(15));
        assert_eq!(trim_through(10, 20, 99), Ok(20));
        assert!(trim_through(10, 20, 9).is_err());
        assert!(trim_through(10, 20, 0).is_err());
    }

    #[test]
    fn only_full_and_deliver_ship() {
        assert_eq!(channel_of(Grant::Full), Some(Channel::Main));
        assert_eq!(channel_of(Grant::Deliver), Some(Channel::Redundant));
        assert_eq!(channel_of(Grant::Fenced), None);
    }
}
