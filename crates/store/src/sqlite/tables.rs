//! The tables: the ones every release shares, and the product tables of each
//! schema (one explicit arm per schema).

use crate::{Result, StoreError};
use handover_core::Schema;

/// Tables every release shares; their shape never changes. Credentials and
/// bootstrap tokens are kept as SHA-256 digests only (`nodes.credential`
/// is no longer written: [`super::SqliteStore::open`] moves what an older
/// build left there into `credentials` as digests and blanks it).
pub(super) const SHARED_TABLES: &str = "
CREATE TABLE IF NOT EXISTS cluster (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    node_id TEXT PRIMARY KEY, credential TEXT NOT NULL, release INTEGER NOT NULL, schema INTEGER NOT NULL,
    role TEXT NOT NULL, group_name TEXT NOT NULL, hls_url TEXT NOT NULL, grant_name TEXT NOT NULL,
    epoch INTEGER NOT NULL, outbox_next_seq INTEGER NOT NULL, outbox_oldest INTEGER, outbox_count INTEGER NOT NULL,
    current_events TEXT NOT NULL, staged TEXT NOT NULL DEFAULT '[]', last_seen_ms INTEGER NOT NULL,
    acked_through INTEGER NOT NULL DEFAULT 0, binary_sha256 TEXT, supervisor_sha256 TEXT);
CREATE TABLE IF NOT EXISTS node_desired (node_id TEXT PRIMARY KEY, desired TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS upgrades (id INTEGER PRIMARY KEY, state TEXT NOT NULL, updated_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS groups (name TEXT PRIMARY KEY, primary_node TEXT NOT NULL, backup_node TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS credentials (node_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS bootstrap_tokens (node_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL UNIQUE,
    expires_ms INTEGER NOT NULL, used_ms INTEGER);
CREATE TABLE IF NOT EXISTS leader (id INTEGER PRIMARY KEY CHECK (id = 1), holder TEXT NOT NULL, name TEXT NOT NULL, url TEXT NOT NULL,
    term INTEGER NOT NULL, expires_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS replicas (replica TEXT PRIMARY KEY, name TEXT NOT NULL, url TEXT NOT NULL, release INTEGER NOT NULL,
    binary_sha256 TEXT, seen_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS upgrade_steps (step INTEGER PRIMARY KEY, upgrade_id INTEGER NOT NULL, term INTEGER NOT NULL,
    replica TEXT NOT NULL, phase TEXT NOT NULL, status TEXT NOT NULL, at_ms INTEGER NOT NULL);
";

pub(super) const SCHEMA_1: &str = "
CREATE TABLE channels (name TEXT PRIMARY KEY, title TEXT NOT NULL, segment_seconds INTEGER NOT NULL,
    resolution TEXT NOT NULL, bitrate_kbps INTEGER NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY, channel TEXT NOT NULL, group_name TEXT NOT NULL,
    start TEXT NOT NULL, duration_s INTEGER NOT NULL);
CREATE TABLE records (node TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, channel TEXT NOT NULL,
    at TEXT NOT NULL, media_seq INTEGER, viewers INTEGER, event INTEGER, text TEXT NOT NULL,
    natural_key TEXT NOT NULL, PRIMARY KEY (node, seq));
";

pub(super) const SCHEMA_2: &str = "
CREATE TABLE channels (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, segment_ms INTEGER NOT NULL,
    ladder TEXT NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY, channel_id INTEGER NOT NULL, group_name TEXT NOT NULL,
    start_ms INTEGER NOT NULL, duration_ms INTEGER NOT NULL);
CREATE TABLE records (node_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, channel_id INTEGER NOT NULL,
    produced_at_ms INTEGER NOT NULL, media_seq INTEGER, duration_ms INTEGER, viewers INTEGER, event_id INTEGER,
    message TEXT, natural_key TEXT NOT NULL, translated_from INTEGER, PRIMARY KEY (node_id, seq));
";

/// Schema 2's tables, and channels set their playlist window; alerts carry
/// a severity (NULL for every other kind, which the CHECK holds too).
pub(super) const SCHEMA_3: &str = "
CREATE TABLE channels (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, segment_ms INTEGER NOT NULL,
    ladder TEXT NOT NULL, window_segments INTEGER NOT NULL);
CREATE TABLE events (id INTEGER PRIMARY KEY, channel_id INTEGER NOT NULL, group_name TEXT NOT NULL,
    start_ms INTEGER NOT NULL, duration_ms INTEGER NOT NULL);
CREATE TABLE records (node_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, channel_id INTEGER NOT NULL,
    produced_at_ms INTEGER NOT NULL, media_seq INTEGER, duration_ms INTEGER, viewers INTEGER, event_id INTEGER,
    message TEXT, natural_key TEXT NOT NULL, translated_from INTEGER,
    severity TEXT CHECK (CASE WHEN kind = 'alert' THEN COALESCE(severity IN ('info', 'warning', 'critical'), 0)
        ELSE severity IS NULL END),
    PRIMARY KEY (node_id, seq));
";
pub(super) fn product_tables(schema: Schema) -> Result<&'static str> {
    match schema.0 {
        1 => Ok(SCHEMA_1),
        2 => Ok(SCHEMA_2),
        3 => Ok(SCHEMA_3),
        other => Err(StoreError::UnknownSchema(other)),
    }
}
