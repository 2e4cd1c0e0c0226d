//! Group commit, one mechanism for both backends: whoever holds the store's
//! writer commits every waiting write of a kind (hellos, heartbeats, record
//! batches) in one transaction, and each is answered only after that
//! commit; a failed group is retried write by write, so one bad write fails
//! alone. Each backend says how a write applies to its connection
//! ([`Grouped`]) and keeps one [`Queue`] per kind, with its limit.

use crate::{Result, StoreError};
use sqlx::{Database, Pool};
use tokio::sync::Mutex;

/// A write that may share its transaction with others of its kind.
pub(crate) trait Grouped<DB: Database>: Sized + Send + Sync + 'static {
    type Out: Send + 'static;
    fn apply(
        &self,
        conn: &mut DB::Connection,
    ) -> impl std::future::Future<Output = Result<Self::Out>> + Send;

    /// Every job of a group, in order, on its transaction: one after
    /// another, unless a kind writes a group in fewer statements.
    fn apply_all<'a>(
        jobs: &'a [Self],
        conn: &'a mut DB::Connection,
    ) -> impl std::future::Future<Output = Result<Vec<Self::Out>>> + Send + 'a {
        async move {
            let mut outs = Vec::with_capacity(jobs.len());
            for job in jobs {
                outs.push(job.apply(conn).await?);
            }
            Ok(outs)
        }
    }
}

type Reply<T> = tokio::sync::oneshot::Sender<Result<T>>;

/// Writes of one kind waiting for the writer, with their answers.
pub(crate) struct Queue<J, Out> {
    pending: std::sync::Mutex<Vec<(J, Reply<Out>)>>,
    /// Writes per transaction at most.
    max: usize,
}

impl<J, Out> Queue<J, Out> {
    pub(crate) fn new(max: usize) -> Queue<J, Out> {
        Queue {
            pending: std::sync::Mutex::new(Vec::new()),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(J, Reply<Out>)>> {
        // A plain queue: a panic elsewhere cannot leave it half-written.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Queues `job`; once this caller holds `writer` it commits every job
/// waiting in `queue` (its own, unless an earlier holder took it), in a
/// transaction begun with `begin` (SQLite's takes the write lock at once).
/// Answers after the commit that holds `job`.
pub(crate) async fn grouped<DB, J>(
    writer: &Mutex<()>,
    pool: &Pool<DB>,
    begin: &'static str,
    queue: &Queue<J, J::Out>,
    job: J,
) -> Result<J::Out>
where
    DB: Database,
    J: Grouped<DB>,
{
    let (reply, mut answer) = tokio::sync::oneshot::channel();
    queue.lock().push((job, reply));
    // Whichever comes first: the answer (an earlier holder of the writer
    // committed this job with its group) or the writer. Waiting for the
    // writer even when answered would pass thousands of callers through the
    // lock one by one, each after its write was already committed.
    let answered = tokio::select! {
        biased;
        answered = &mut answer => Some(answered),
        w = writer.lock() => {
            let batch = {
                let mut pending = queue.lock();
                let n = pending.len().min(queue.max);
                pending.drain(..n).collect::<Vec<_>>()
            };
            if !batch.is_empty() {
                // In a task of its own, so a caller that goes away (its
                // client hung up) cannot cancel the commit the others wait for.
                let _ = tokio::spawn(commit_group(pool.clone(), begin, batch)).await;
            }
            drop(w);
            None
        }
    };
    let answered = match answered {
        Some(answered) => answered,
        None => answer.await,
    };
    answered.unwrap_or_else(|_| {
        Err(StoreError::Invalid(
            "the write was not stored (its commit failed); send it again".into(),
        ))
    })
}

/// One transaction for every job in `batch`, each answered after the commit.
/// If it fails, each job is tried in a transaction of its own, so one bad
/// job fails only its own caller.
async fn commit_group<DB, J>(pool: Pool<DB>, begin: &'static str, batch: Vec<(J, Reply<J::Out>)>)
where
    DB: Database,
    J: Grouped<DB>,
{
    let (jobs, replies): (Vec<J>, Vec<Reply<J::Out>>) = batch.into_iter().unzip();
    let together = async {
        let mut tx = pool.begin_with(begin).await?;
        let outs = J::apply_all(&jobs, &mut tx).await?;
        tx.commit().await?;
        Ok::<_, StoreError>(outs)
    }
    .await;
    match together {
        Ok(outs) => {
            for (reply, out) in replies.into_iter().zip(outs) {
                let _ = reply.send(Ok(out));
            }
        }
        Err(e) if jobs.len() == 1 => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(e));
            }
        }
        Err(_) => {
            for (job, reply) in jobs.iter().zip(replies) {
                let alone = async {
                    let mut tx = pool.begin_with(begin).await?;
                    let out = job.apply(&mut tx).await?;
                    tx.commit().await?;
                    Ok(out)
                }
                .await;
                let _ = reply.send(alone);
            }
        }
    }
}
