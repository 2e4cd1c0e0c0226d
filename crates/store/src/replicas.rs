//! Controller replicas on one database: who leads the upgrade
//! orchestrator, and the fencing token every effect of it is written with.
//!
//! The lease is one row (`leader`). A replica that holds it, or finds it
//! expired, takes it at each sync; a takeover by another replica raises its
//! `term`. The term is the fencing token: every write of the orchestrator
//! ([`Store::set_fence`](crate::Store::set_fence), `set_desired`,
//! `save_upgrade`, `set_cluster_release`) checks, in its own transaction,
//! that the row still names this replica at this term (PostgreSQL locks the
//! row `FOR SHARE`, so a takeover waits for a write under way and every
//! later write of the deposed leader is refused). A deposed leader's late
//! write therefore changes nothing, whatever its clock or its pauses.
//!
//! The SQL is the same text for both backends (`$N` parameters, which
//! sqlx's SQLite binds by number too); only the clock differs: PostgreSQL
//! judges leases by the database server's clock, one clock for replicas on
//! different hosts; SQLite, one process by construction, by its own.

use crate::{ClusterState, Result, StoreError};
use handover_core::Release;

/// What a replica says at each sync, and whether it bids for the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaBeat {
    /// Unique per process (`NAME/PID/RANDOM`): a new worker of the same
    /// replica is another holder, so it never inherits the old one's term.
    pub replica: String,
    /// The replica's own name, the same for every worker it runs (kept in
    /// its data dir): a new worker takes the lease from an earlier one of
    /// the same replica at once, without waiting for it to expire. The
    /// earlier one is dead (a crash, a restart) or switching (then it does
    /// not bid), and the raised term fences whatever it still writes.
    pub name: String,
    /// Where operators and nodes reach it.
    pub url: String,
    pub release: Release,
    pub binary_sha256: Option<String>,
    /// How long the lease holds without a renewal.
    pub lease_ms: u64,
    /// False while this replica switches release (or stops): it resigns.
    pub bid: bool,
}

/// The lease row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    pub replica: String,
    pub url: String,
    pub term: u64,
    pub expires_ms: i64,
}

/// A replica seen within the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaRow {
    pub replica: String,
    /// The replica this worker belongs to ([`ReplicaBeat::name`]).
    pub name: String,
    pub url: String,
    pub release: Release,
    pub binary_sha256: Option<String>,
    pub seen_ms: i64,
}

/// What one sync learns: the cluster row, the lease, the live replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaSync {
    pub cluster: ClusterState,
    pub leader: Option<Leader>,
    /// The term this replica leads in, if it does.
    pub leading: Option<u64>,
    /// Replicas whose last sync is within the lease, this one included.
    pub replicas: Vec<ReplicaRow>,
}

/// One transition of an upgrade as its leader wrote it: the test's and the
/// operator's evidence of who drove each phase.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpgradeStep {
    pub upgrade_id: i64,
    pub term: u64,
    pub replica: String,
    pub phase: String,
    pub status: String,
    pub at_ms: i64,
}

/// Whose writes this store makes: nobody's in particular (tests, tools, a
/// store not yet synced), or a replica's, leading or not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum Guard {
    #[default]
    Unguarded,
    Leading {
        replica: String,
        term: u64,
    },
    Following {
        replica: String,
    },
}

/// The guard of a store, changed by each sync.
#[derive(Debug, Default)]
pub(crate) struct GuardCell(std::sync::Mutex<Guard>);

impl GuardCell {
    pub(crate) fn get(&self) -> Guard {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set(&self, guard: Guard) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = guard;
    }

    /// After a sync of `replica`: leading in `term`, or following.
    pub(crate) fn synced(&self, replica: &str, leading: Option<u64>) {
        self.set(match leading {
            Some(term) => Guard::Leading {
                replica: replica.to_owned(),
                term,
            },
            None => Guard::Following {
                replica: replica.to_owned(),
            },
        });
    }

    /// Judges the lease row read (and locked) in a write's transaction:
    /// Ok(Some(term)) to write as that term's leader, Ok(None) unguarded.
    pub(crate) fn check(&self, row: Option<(String, i64)>) -> Result<Option<(String, u64)>> {
        match self.get() {
            Guard::Unguarded => Ok(None),
            Guard::Following { .. } => Err(not_leader(None, row)),
            Guard::Leading { replica, term } => match row {
                Some((holder, t)) if holder == replica && u64::try_from(t).ok() == Some(term) => {
                    Ok(Some((replica, term)))
                }
                other => {
                    self.set(Guard::Following { replica });
                    Err(not_leader(Some(term), other))
                }
            },
        }
    }
}

fn not_leader(term: Option<u64>, row: Option<(String, i64)>) -> StoreError {
    StoreError::NotLeader {
        term,
        leader: row.map_or_else(|| "nobody".into(), |(r, t)| format!("{r} (term {t})")),
    }
}

/// The lease row, for a guarded write (PostgreSQL appends `FOR SHARE`).
pub(crate) const LEASE_ROW: &str = "SELECT holder, term FROM leader WHERE id = 1";

/// Takes or renews the lease: $1 replica, $2 url, $3 now, $4 lease, $5
/// name. Returns the term, or no row when another replica holds an
/// unexpired lease.
pub(crate) const TAKE_LEASE: &str = "
INSERT INTO leader (id, holder, name, url, term, expires_ms) VALUES (1, $1, $5, $2, 1, $3 + $4)
ON CONFLICT (id) DO UPDATE SET
    term = CASE WHEN leader.holder = excluded.holder THEN leader.term ELSE leader.term + 1 END,
    holder = excluded.holder, name = excluded.name, url = excluded.url,
    expires_ms = excluded.expires_ms
WHERE leader.holder = excluded.holder OR leader.expires_ms < $3 OR leader.name = excluded.name
RETURNING term";

/// Gives the lease up (expires now): $1 replica.
pub(crate) const RESIGN: &str = "UPDATE leader SET expires_ms = 0 WHERE id = 1 AND holder = $1";

/// $1 replica, $2 url, $3 release, $4 sha256, $5 now, $6 name.
pub(crate) const BEAT: &str = "
INSERT INTO replicas (replica, name, url, release, binary_sha256, seen_ms) VALUES ($1, $6, $2, $3, $4, $5)
ON CONFLICT (replica) DO UPDATE SET name = excluded.name, url = excluded.url, release = excluded.release,
    binary_sha256 = excluded.binary_sha256, seen_ms = excluded.seen_ms";

/// Forgets replicas silent for long ($1: before this time): a stopped
/// worker's row goes, so the table holds live replicas and a few recent.
pub(crate) const FORGET: &str = "DELETE FROM replicas WHERE seen_ms < $1";

/// A replica's row is forgotten after this many leases of silence.
pub(crate) const FORGET_AFTER_LEASES: i64 = 20;

/// Live replicas ($1: seen since), 16 at most: replicas are a handful (a
/// client takes at most `handover_net::controllers::CONTROLLER_URLS_MAX`).
pub(crate) const LIVE: &str =
    "SELECT replica, name, url, release, binary_sha256, seen_ms FROM replicas
    WHERE seen_ms >= $1 ORDER BY replica LIMIT 16";

pub(crate) const LEADER: &str = "SELECT holder, url, term, expires_ms FROM leader WHERE id = 1";

/// Records a transition once per (upgrade, term, phase, status): $1 id,
/// $2 term, $3 replica, $4 phase, $5 status, $6 now.
pub(crate) const STEP: &str = "
INSERT INTO upgrade_steps (upgrade_id, term, replica, phase, status, at_ms)
SELECT $1, $2, $3, $4, $5, $6
WHERE NOT EXISTS (SELECT 1 FROM upgrade_steps WHERE upgrade_id = $1 AND term = $2 AND phase = $4 AND status = $5)";

pub(crate) const STEPS: &str =
    "SELECT upgrade_id, term, replica, phase, status, at_ms FROM upgrade_steps
    WHERE upgrade_id = $1 ORDER BY step";

/// Bumps a revision counter of the `cluster` table (`desired_revision`,
/// `registry_revision`) that replicas watch to drop what they cached.
pub(crate) const BUMP: &str = "UPDATE cluster SET value = value + 1 WHERE key = $1";

/// The counters [`BUMP`] moves, created at 0 where missing (a database an
/// earlier build made).
pub(crate) const COUNTERS: [&str; 2] = ["desired_revision", "registry_revision"];

/// The phase and status of a state, as the step log names them.
pub(crate) fn step_names(up: &handover_core::upgrade::Upgrade) -> (String, String) {
    use handover_core::upgrade::Status;
    let status = match &up.status {
        Status::Running => "running",
        Status::Paused => "paused",
        Status::Finalized => "finalized",
        Status::Aborted { .. } => "aborted",
        Status::Failed { .. } => "failed",
    };
    (up.phase.as_str().to_owned(), status.to_owned())
}

/// The live replicas' rows seen since `now - lease`.
pub(crate) fn seen_since(now_ms: i64, lease_ms: u64) -> i64 {
    now_ms.saturating_sub(i64::try_from(lease_ms).unwrap_or(i64::MAX))
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// One sync of `beat` at `now_ms` (the backend's clock): its row, the
/// lease taken, renewed or resigned, the lease row and the live replicas.
/// Each statement commits on its own, so no lock outlives it.
pub(crate) async fn sync<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    guard: &GuardCell,
    beat: &ReplicaBeat,
    now_ms: i64,
) -> Result<(Option<Leader>, Option<u64>, Vec<ReplicaRow>)>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB> + for<'r> sqlx::Decode<'r, DB>,
    Option<String>: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
    (String, String, i64, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
    (String, String, String, i64, Option<String>, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let lease = i64::try_from(beat.lease_ms).unwrap_or(i64::MAX / 4);
    sqlx::query(BEAT)
        .bind(beat.replica.clone())
        .bind(beat.url.clone())
        .bind(i64::from(beat.release.0))
        .bind(beat.binary_sha256.clone())
        .bind(now_ms)
        .bind(beat.name.clone())
        .execute(&mut *conn)
        .await?;
    sqlx::query(FORGET)
        .bind(now_ms.saturating_sub(lease.saturating_mul(FORGET_AFTER_LEASES)))
        .execute(&mut *conn)
        .await?;
    let leading = if beat.bid {
        sqlx::query_as::<DB, (i64,)>(TAKE_LEASE)
            .bind(beat.replica.clone())
            .bind(beat.url.clone())
            .bind(now_ms)
            .bind(lease)
            .bind(beat.name.clone())
            .fetch_optional(&mut *conn)
            .await?
            .map(|(term,)| to_u64(term))
    } else {
        sqlx::query(RESIGN)
            .bind(beat.replica.clone())
            .execute(&mut *conn)
            .await?;
        None
    };
    guard.synced(&beat.replica, leading);
    let leader = sqlx::query_as::<DB, (String, String, i64, i64)>(LEADER)
        .fetch_optional(&mut *conn)
        .await?
        .map(|(replica, url, term, expires_ms)| Leader {
            replica,
            url,
            term: to_u64(term),
            expires_ms,
        });
    let replicas = sqlx::query_as::<DB, (String, String, String, i64, Option<String>, i64)>(LIVE)
        .bind(seen_since(now_ms, beat.lease_ms))
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(
            |(replica, name, url, release, binary_sha256, seen_ms)| ReplicaRow {
                replica,
                name,
                url,
                release: Release(u32::try_from(release).unwrap_or(0)),
                binary_sha256,
                seen_ms,
            },
        )
        .collect();
    Ok((leader, leading, replicas))
}

/// The step log of upgrade `id`.
pub(crate) async fn steps<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    id: i64,
) -> Result<Vec<UpgradeStep>>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (i64, i64, String, String, String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    Ok(
        sqlx::query_as::<DB, (i64, i64, String, String, String, i64)>(STEPS)
            .bind(id)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .map(
                |(upgrade_id, term, replica, phase, status, at_ms)| UpgradeStep {
                    upgrade_id,
                    term: to_u64(term),
                    replica,
                    phase,
                    status,
                    at_ms,
                },
            )
            .collect(),
    )
}

/// In a guarded write's transaction: the lease row (read with `lock`, e.g.
/// ` FOR SHARE`), judged by `guard`; then, for a state of upgrade `id`,
/// its step logged under the term. Ok(None): unguarded.
pub(crate) async fn check_lease<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    guard: &GuardCell,
    lock: &str,
) -> Result<Option<(String, u64)>>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    (String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    if guard.get() == Guard::Unguarded {
        return Ok(None);
    }
    let sql = format!("{LEASE_ROW}{lock}");
    let row = sqlx::query_as::<DB, (String, i64)>(&sql)
        .fetch_optional(&mut *conn)
        .await?;
    guard.check(row)
}

/// In a batch's transaction: the cluster's epoch and fence (read with
/// `lock`: PostgreSQL's ` FOR SHARE` makes a fence wait for the batches
/// under way, and every batch after it see it), judged against the epoch
/// the batch was sent at. Whichever replica took the batch, no record is
/// stored across a fence.
pub(crate) async fn check_epoch<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    sent: i64,
    lock: &str,
) -> Result<()>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    (String, i64): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let sql = format!("SELECT key, value FROM cluster WHERE key IN ('epoch', 'fenced'){lock}");
    let rows = sqlx::query_as::<DB, (String, i64)>(&sql)
        .fetch_all(&mut *conn)
        .await?;
    let value = |k: &str| rows.iter().find(|(key, _)| key == k).map(|(_, v)| *v);
    let (Some(epoch), Some(fenced)) = (value("epoch"), value("fenced")) else {
        return Err(StoreError::Corrupt(
            "cluster.epoch or cluster.fenced missing".into(),
        ));
    };
    if epoch != sent || fenced != 0 {
        return Err(StoreError::StaleEpoch {
            sent: to_u64(sent),
            current: to_u64(epoch),
            fenced: fenced != 0,
        });
    }
    Ok(())
}

/// In a guarded write's transaction: stores an upgrade's state (a new row
/// when `id` is None) and, under a leader's term, logs its transition.
pub(crate) async fn save_upgrade<DB: sqlx::Database>(
    conn: &mut DB::Connection,
    leader: Option<(String, u64)>,
    id: Option<i64>,
    up: &handover_core::upgrade::Upgrade,
    now_ms: i64,
) -> Result<i64>
where
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    for<'c> &'c mut <DB as sqlx::Database>::Connection: sqlx::Executor<'c, Database = DB>,
    i64: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: for<'q> sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let state = serde_json::to_string(up)
        .map_err(|e| StoreError::Invalid(format!("upgrade state: {e}")))?;
    let id = match id {
        Some(id) => {
            sqlx::query("UPDATE upgrades SET state = $1, updated_ms = $2 WHERE id = $3")
                .bind(state)
                .bind(now_ms)
                .bind(id)
                .execute(&mut *conn)
                .await?;
            id
        }
        None => {
            sqlx::query_as::<DB, (i64,)>(
                "INSERT INTO upgrades (state, updated_ms) VALUES ($1, $2) RETURNING id",
            )
            .bind(state)
            .bind(now_ms)
            .fetch_one(&mut *conn)
            .await?
            .0
        }
    };
    if let Some((replica, term)) = leader {
        let (phase, status) = step_names(up);
        sqlx::query(STEP)
            .bind(id)
            .bind(i64::try_from(term).unwrap_or(i64::MAX))
            .bind(replica)
            .bind(phase)
            .bind(status)
            .bind(now_ms)
            .execute(&mut *conn)
            .await?;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_whose_row_moved_on_is_refused_and_stays_refused() {
        let g = GuardCell::default();
        assert_eq!(g.check(None).unwrap(), None, "unguarded writes freely");
        g.synced("a", Some(3));
        assert_eq!(
            g.check(Some(("a".into(), 3))).unwrap(),
            Some(("a".into(), 3))
        );
        // b took over at term 4: a's write is refused, and so is every later one.
        assert!(matches!(
            g.check(Some(("b".into(), 4))),
            Err(StoreError::NotLeader { term: Some(3), .. })
        ));
        assert!(matches!(
            g.check(Some(("a".into(), 3))),
            Err(StoreError::NotLeader { term: None, .. })
        ));
        g.synced("a", None);
        assert!(g.check(Some(("a".into(), 3))).is_err());
    }
}
