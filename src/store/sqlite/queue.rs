//! The job queue in the SQLite file, beside the log.

use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use uuid::Uuid;

use super::super::sql::{self, EntryRow};
use super::super::{
    Claim, Fence, JobQueue, QueueEntry, QueueState, QueueSummary, QueuedJob, StoreError,
};
use super::{SqliteStore, classify};

/// The queue's rows, in the writer's transactions: `BEGIN IMMEDIATE` takes
/// the database's write lock, so two workers never claim one job, and the
/// clock is SQLite's own (`unixepoch('subsec')`), the same for every
/// process on the host.
impl JobQueue for SqliteStore {
    fn submit(&self, job: &QueuedJob) -> Result<(), StoreError> {
        let job_id = job.job_id.to_string();
        sql::submit(job, |text| {
            self.queue_write("submitting a job", |tx| {
                let stored: i64 = tx.query_row(
                    "SELECT count(*) FROM events WHERE job_id = ?1 AND seq = 1",
                    [&job_id],
                    |row| row.get(0),
                )?;
                let queued: i64 = tx.query_row(
                    "SELECT count(*) FROM jobs WHERE job_id = ?1",
                    [&job_id],
                    |row| row.get(0),
                )?;
                if stored + queued > 0 {
                    return Ok(Some(stored));
                }
                tx.execute(
                    "INSERT INTO jobs (job_id, submitted_no, job, state, epoch, submitted_at)
                     VALUES (?1, (SELECT coalesce(max(submitted_no), 0) + 1 FROM jobs), ?2,
                             'submitted', 0, strftime('%Y-%m-%dT%H:%M:%f000Z', 'now'))",
                    params![job_id, text],
                )?;
                Ok(None)
            })
        })
    }

    fn claim(&self, owner: &str, lease: Duration) -> Result<Option<Claim>, StoreError> {
        let row = self.queue_write("claiming a job", |tx| {
            let pick = |sql: &str| {
                tx.query_row(sql, [], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Option<String>>(2)?,
                        row.get::<_, i64>(3)?,
                    ))
                })
                .optional()
            };
            let picked = match pick(
                "SELECT job_id, job, owner, epoch FROM jobs WHERE state = 'submitted'
                 ORDER BY submitted_no LIMIT 1",
            )? {
                Some(row) => Some(row),
                None => pick(
                    "SELECT job_id, job, owner, epoch FROM jobs
                     WHERE state = 'running' AND lease_until <= unixepoch('subsec')
                     ORDER BY submitted_no LIMIT 1",
                )?,
            };
            if let Some((job_id, _, _, _)) = &picked {
                tx.execute(
                    "UPDATE jobs SET state = 'running', owner = ?2, epoch = epoch + 1,
                         lease_until = unixepoch('subsec') + ?3
                     WHERE job_id = ?1",
                    params![job_id, owner, sql::seconds(lease)],
                )?;
            }
            Ok(picked)
        })?;
        row.map(|(job_id, text, previous_owner, epoch)| {
            sql::claim_from_row(&job_id, &text, previous_owner, epoch)
        })
        .transpose()
    }

    fn renew(
        &self,
        owner: &str,
        fences: &[Fence],
        lease: Duration,
    ) -> Result<Vec<Fence>, StoreError> {
        self.queue_write("renewing leases", |tx| {
            let mut renew = tx.prepare_cached(
                "UPDATE jobs SET lease_until = unixepoch('subsec') + ?4
                 WHERE job_id = ?1 AND epoch = ?2 AND owner = ?3 AND state = 'running'",
            )?;
            let mut held = Vec::new();
            for fence in fences {
                let epoch = i64::try_from(fence.epoch).unwrap_or(i64::MAX);
                let changed = renew.execute(params![
                    fence.job_id.to_string(),
                    epoch,
                    owner,
                    sql::seconds(lease)
                ])?;
                if changed == 1 {
                    held.push(*fence);
                }
            }
            Ok(held)
        })
    }

    fn release(&self, fence: Fence, finished: bool) -> Result<(), StoreError> {
        self.queue_write("releasing a job", |tx| {
            tx.execute(
                "UPDATE jobs SET state = CASE WHEN ?3 THEN 'finished' ELSE 'submitted' END,
                     owner = NULL, lease_until = NULL
                 WHERE job_id = ?1 AND epoch = ?2 AND state = 'running'",
                params![
                    fence.job_id.to_string(),
                    i64::try_from(fence.epoch).unwrap_or(i64::MAX),
                    finished
                ],
            )?;
            Ok(())
        })
    }

    fn queued_job(&self, job_id: Uuid) -> Result<Option<(QueuedJob, QueueState)>, StoreError> {
        let row = self.with_reader("reading the job queue", |conn| {
            let read = |e| classify(&self.path, "reading the job queue", e);
            if !has_queue(conn).map_err(read)? {
                return Ok(None);
            }
            conn.query_row(
                "SELECT job, state FROM jobs WHERE job_id = ?1",
                [job_id.to_string()],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)),
            )
            .optional()
            .map_err(read)
        })?;
        row.map(|(text, state)| sql::queued_from_row(&job_id.to_string(), &text, &state))
            .transpose()
    }

    fn queued(&self) -> Result<Vec<QueueEntry>, StoreError> {
        self.with_reader("listing the job queue", |conn| {
            let read = |e| classify(&self.path, "listing the job queue", e);
            if !has_queue(conn).map_err(read)? {
                // A log written before the queue existed: nothing is queued.
                return Ok(Vec::new());
            }
            let mut stmt = conn
                .prepare_cached(
                    "SELECT job_id, state, owner, epoch, coalesce(lease_until <= unixepoch('subsec'), 0),
                            submitted_at, coalesce(json_array_length(job, '$.steps'), 0)
                     FROM jobs WHERE state <> 'finished' ORDER BY submitted_no",
                )
                .map_err(read)?;
            let rows = stmt
                .query_map([], |row| {
                    Ok(EntryRow {
                        job_id: row.get(0)?,
                        state: row.get(1)?,
                        owner: row.get(2)?,
                        epoch: row.get(3)?,
                        lease_expired: row.get(4)?,
                        submitted_at: row.get(5)?,
                        steps: row.get(6)?,
                    })
                })
                .map_err(read)?;
            let mut entries = Vec::new();
            for row in rows {
                entries.push(row.map_err(read)?.entry()?);
            }
            Ok(entries)
        })
    }

    fn queue_summary(&self) -> Result<QueueSummary, StoreError> {
        self.with_reader("counting the job queue", |conn| {
            queue_summary(conn).map_err(|e| classify(&self.path, "counting the job queue", e))
        })
    }
}

/// How many jobs wait and run, and the oldest waiting one's age by
/// SQLite's clock, in one read of the queue's index.
fn queue_summary(conn: &Connection) -> rusqlite::Result<QueueSummary> {
    if !has_queue(conn)? {
        return Ok(QueueSummary::default());
    }
    conn.query_row(
        "SELECT count(*) FILTER (WHERE state = 'submitted'),
                count(*) FILTER (WHERE state = 'running'),
                unixepoch('subsec') - (SELECT unixepoch(submitted_at, 'subsec') FROM jobs
                                       WHERE state = 'submitted' ORDER BY submitted_no LIMIT 1)
         FROM jobs WHERE state <> 'finished'",
        [],
        |row| {
            Ok(QueueSummary {
                submitted: row.get::<_, i64>(0)?.try_into().unwrap_or(0),
                running: row.get::<_, i64>(1)?.try_into().unwrap_or(0),
                oldest_submitted_age: row
                    .get::<_, Option<f64>>(2)?
                    .map(|age| Duration::try_from_secs_f64(age.max(0.0)).unwrap_or_default()),
            })
        },
    )
}

impl SqliteStore {
    /// Runs `write` in a transaction of the writer's that holds the write
    /// lock from its start.
    fn queue_write<T>(
        &self,
        context: &'static str,
        write: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| classify(&self.path, context, e))?;
        let value = write(&tx).map_err(|e| classify(&self.path, context, e))?;
        tx.commit().map_err(|e| classify(&self.path, context, e))?;
        Ok(value)
    }
}

/// Whether the database has the job queue's table (a log written before the
/// queue existed has none: nothing is queued there).
fn has_queue(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'jobs'",
        [],
        |row| row.get(0),
    )
}
