//! The shipper: sends the outbox to the controller in order, one batch at a
//! time, over the channel the grant allows, and trims only what was acked.
//!
//! `full` → `/node/v1/records` (main channel), `deliver` → `/node/v1/deliver`
//! (redundant channel, the controller translates), `fenced` → nothing: wait
//! for the grant to change. Storing is idempotent on (node, seq), so a batch
//! resent after a crash or a timeout never duplicates a record.

use crate::runtime::{sleep_or_stop, Backoff, Stop};
use crate::session::{CallError, Session};
use crate::store::{OutboxRow, Store};
use handover_core::admission::Channel;
use handover_core::ship;
use handover_core::wire::{Batch, BatchAck, MESSAGE_VERSION};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Timeout of one batch request.
pub const SHIP_TIMEOUT_MS: u64 = 15_000;

/// The longest prefix of `rows` that can go in one batch (the core's rule).
pub fn batch_prefix(rows: &[OutboxRow]) -> &[OutboxRow] {
    let n = ship::batch_len(rows.iter().map(|r| ship::Queued {
        seq: r.seq,
        schema: r.schema,
        bytes: r.body_bytes,
    }));
    &rows[..n]
}

pub struct Shipper {
    pub store: Arc<Store>,
    pub session: Arc<Session>,
    pub node_id: String,
    /// Notified after every append, so records do not wait for a timer.
    pub wake: Arc<Notify>,
    /// The last failure, shown on /status; cleared by the next ack.
    pub error: Arc<Mutex<Option<String>>>,
    /// Behave like the manual procedure's nodes (for the demo's comparison):
    /// a record that cannot be stored right now is dropped, not queued, and
    /// nothing goes over the redundant channel.
    pub legacy: bool,
}

impl Shipper {
    /// Legacy mode: forgets queued records up to `through` (they are lost,
    /// which the checker then reports).
    async fn drop_queued(&self, through: u64) {
        let last = match self.store.oldest(ship::BATCH_RECORDS_MAX).await {
            Ok(rows) => rows.last().map(|r| r.seq.min(through)),
            Err(_) => None,
        };
        if let Some(last) = last {
            if let Ok(n) = self.store.trim(last).await {
                tracing::warn!(
                    dropped = n,
                    "legacy mode: records that cannot be stored now are dropped"
                );
            }
        }
    }

    fn set_error(&self, e: Option<String>) {
        *self.error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// Ships until `stop`. Never two batches at once: this loop is the only sender.
    pub async fn run(self, mut stop: Stop) {
        let mut rx = self.session.link();
        let mut backoff = Backoff::new();
        loop {
            if stop.is_set() {
                return;
            }
            let link = rx.borrow_and_update().clone();
            let channel = link.grant.and_then(ship::channel_of);
            let (endpoint, epoch, credential) =
                match (link.established, channel, link.epoch, &link.credential) {
                    (true, Some(ch), Some(e), Some(c))
                        if !(self.legacy && ch == Channel::Redundant) =>
                    {
                        (ch.path(), e, c.clone())
                    }
                    // Fenced or no session: queue locally and wait for the grant to change.
                    _ => {
                        if self.legacy {
                            self.drop_queued(u64::MAX).await;
                        }
                        tokio::select! {
                            _ = self.wake.notified() => {}
                            _ = rx.changed() => {}
                            _ = stop.wait() => return,
                        }
                        continue;
                    }
                };
            let rows = match self.store.oldest(ship::BATCH_RECORDS_MAX).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    if !sleep_or_stop(backoff.next(), &mut stop).await {
                        return;
                    }
                    continue;
                }
            };
            let rows = batch_prefix(&rows);
            let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = rx.changed() => {}
                    _ = stop.wait() => return,
                }
                continue;
            };
            let (first_seq, last_seq) = (first.seq, last.seq);
            let batch = Batch {
                v: MESSAGE_VERSION,
                node_id: self.node_id.clone(),
                epoch,
                schema: first.schema,
                first_seq,
                records: rows.iter().map(|r| r.body.clone()).collect(),
            };
            let r = tokio::select! {
                r = self.session.controller().post::<_, BatchAck>(
                    endpoint,
                    Some(&credential),
                    &batch,
                    Duration::from_millis(SHIP_TIMEOUT_MS),
                ) => r,
                _ = stop.wait() => return,
            };
            self.session.note(&r);
            let failure = match r {
                Ok(ack) if ack.v == MESSAGE_VERSION => {
                    match ship::trim_through(first_seq, last_seq, ack.acked_through) {
                        Err(e) => e,
                        Ok(through) => match self.store.trim(through).await {
                            Ok(_) => {
                                tracing::debug!(
                                    endpoint,
                                    first_seq,
                                    through,
                                    stored = ack.stored,
                                    translated = ack.translated,
                                    "batch acked"
                                );
                                self.set_error(None);
                                backoff.reset();
                                continue;
                            }
                            Err(e) => format!("cannot trim the outbox: {e}"),
                        },
                    }
                }
                Ok(ack) => format!("batch ack of version {}", ack.v),
                Err(e) if e.needs_handshake() || e.forbidden() => {
                    self.set_error(Some(e.to_string()));
                    self.session
                        .request_handshake(link.generation, &e.to_string());
                    continue;
                }
                Err(e @ CallError::Refused { .. }) => {
                    // e.g. 422 untranslatable: the record is kept (never dropped) and retried;
                    // it blocks the records behind it until an operator or a new controller helps.
                    tracing::error!(error = %e, endpoint, first_seq, "batch refused");
                    e.to_string()
                }
                Err(e) => e.to_string(),
            };
            if self.legacy {
                self.drop_queued(last_seq).await;
                continue;
            }
            tracing::warn!(failure, endpoint, first_seq, "batch not acked; retrying");
            self.set_error(Some(failure));
            if !sleep_or_stop(backoff.next(), &mut stop).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use handover_core::Schema;
    use serde_json::json;

    fn row(seq: u64, schema: u32) -> OutboxRow {
        OutboxRow {
            seq,
            schema: Schema(schema),
            body: json!({}),
            body_bytes: 10,
        }
    }

    /// The rule itself is tested in the core (`ship::batch_len`).
    #[test]
    fn the_prefix_is_the_cores_batch() {
        let rows = [row(1, 1), row(2, 1), row(3, 2)];
        assert_eq!(batch_prefix(&rows).len(), 2);
        assert!(batch_prefix(&[]).is_empty());
    }
}
