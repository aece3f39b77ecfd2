//! The job queue in the PostgreSQL database, beside the log.

use std::time::Duration;

use uuid::Uuid;

use super::super::sql::{self, EntryRow};
use super::super::{
    Claim, Fence, JobQueue, QueueEntry, QueueState, QueueSummary, QueuedJob, StoreError,
};
use super::PgStore;

/// The queue's rows, in the writer's transactions: a claim locks the row
/// it takes and skips the ones other workers hold (`FOR UPDATE SKIP
/// LOCKED`), and lease times are the server's clock.
impl JobQueue for PgStore {
    fn submit(&self, job: &QueuedJob) -> Result<(), StoreError> {
        sql::submit(job, |text| {
            self.queue_write("submitting a job", |tx| {
                let stored: i64 = tx
                    .query_one(
                        "SELECT count(*) FROM events WHERE job_id = $1 AND seq = 1",
                        &[&job.job_id],
                    )?
                    .get(0);
                if stored > 0 {
                    return Ok(Some(stored));
                }
                let inserted = tx.execute(
                    "INSERT INTO jobs (job_id, job, state) VALUES ($1, $2, 'submitted')
                     ON CONFLICT (job_id) DO NOTHING",
                    &[&job.job_id, &text],
                )?;
                Ok((inserted == 0).then_some(0))
            })
        })
    }

    fn claim(&self, owner: &str, lease: Duration) -> Result<Option<Claim>, StoreError> {
        let seconds = sql::seconds(lease);
        let row = self.queue_write("claiming a job", |tx| {
            let picked = tx.query_opt(
                "SELECT job_id, job, owner, epoch FROM jobs
                 WHERE state = 'submitted'
                    OR (state = 'running' AND lease_until <= clock_timestamp())
                 ORDER BY state = 'running', submitted_no
                 LIMIT 1 FOR UPDATE SKIP LOCKED",
                &[],
            )?;
            if let Some(row) = &picked {
                let job_id: Uuid = row.get(0);
                tx.execute(
                    "UPDATE jobs SET state = 'running', owner = $2, epoch = epoch + 1,
                         lease_until = clock_timestamp() + make_interval(secs => $3)
                     WHERE job_id = $1",
                    &[&job_id, &owner, &seconds],
                )?;
            }
            Ok(picked)
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (job_id, text, previous_owner, epoch): (Uuid, String, Option<String>, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        sql::claim_from_row(&job_id.to_string(), &text, previous_owner, epoch).map(Some)
    }

    fn renew(
        &self,
        owner: &str,
        fences: &[Fence],
        lease: Duration,
    ) -> Result<Vec<Fence>, StoreError> {
        if fences.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = fences.iter().map(|f| f.job_id).collect();
        let epochs: Vec<i64> = fences
            .iter()
            .map(|f| i64::try_from(f.epoch).unwrap_or(i64::MAX))
            .collect();
        let seconds = sql::seconds(lease);
        let rows = self.queue_write("renewing leases", |tx| {
            tx.query(
                "UPDATE jobs SET lease_until = clock_timestamp() + make_interval(secs => $4)
                 FROM unnest($1::uuid[], $2::bigint[]) AS f(job_id, epoch)
                 WHERE jobs.job_id = f.job_id AND jobs.epoch = f.epoch
                   AND jobs.owner = $3 AND jobs.state = 'running'
                 RETURNING jobs.job_id, jobs.epoch",
                &[&ids, &epochs, &owner, &seconds],
            )
        })?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let epoch = u64::try_from(row.get::<_, i64>(1)).ok()?;
                Some(Fence {
                    job_id: row.get(0),
                    epoch,
                })
            })
            .collect())
    }

    fn release(&self, fence: Fence, finished: bool) -> Result<(), StoreError> {
        let epoch = i64::try_from(fence.epoch).unwrap_or(i64::MAX);
        self.queue_write("releasing a job", |tx| {
            tx.execute(
                "UPDATE jobs SET state = CASE WHEN $3 THEN 'finished' ELSE 'submitted' END,
                     owner = NULL, lease_until = NULL
                 WHERE job_id = $1 AND epoch = $2 AND state = 'running'",
                &[&fence.job_id, &epoch, &finished],
            )
        })?;
        Ok(())
    }

    fn queued_job(&self, job_id: Uuid) -> Result<Option<(QueuedJob, QueueState)>, StoreError> {
        let row = self.with_reader(|conn| {
            conn.client
                .query_opt("SELECT job, state FROM jobs WHERE job_id = $1", &[&job_id])
                .map_err(|e| self.classify("reading the job queue", e))
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (text, state): (String, String) = (row.get(0), row.get(1));
        sql::queued_from_row(&job_id.to_string(), &text, &state).map(Some)
    }

    fn queued(&self) -> Result<Vec<QueueEntry>, StoreError> {
        self.with_reader(|conn| {
            let rows = conn
                .client
                .query(
                    "SELECT job_id, state, owner, epoch,
                            coalesce(lease_until <= clock_timestamp(), false),
                            to_char(submitted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                            coalesce(json_array_length(job::json -> 'steps'), 0)
                     FROM jobs WHERE state <> 'finished' ORDER BY submitted_no",
                    &[],
                )
                .map_err(|e| self.classify("listing the job queue", e))?;
            rows.iter()
                .map(|row| {
                    let job_id: Uuid = row.get(0);
                    EntryRow {
                        job_id: job_id.to_string(),
                        state: row.get(1),
                        owner: row.get(2),
                        epoch: row.get(3),
                        lease_expired: row.get(4),
                        submitted_at: row.get(5),
                        steps: i64::from(row.get::<_, i32>(6)),
                    }
                    .entry()
                })
                .collect()
        })
    }

    fn queue_summary(&self) -> Result<QueueSummary, StoreError> {
        self.summarize_queue()
    }
}

impl PgStore {
    /// The queue's counts and the oldest waiting job's age, by the
    /// server's clock, in one statement.
    fn summarize_queue(&self) -> Result<QueueSummary, StoreError> {
        let row = self.with_reader(|conn| {
            conn.client
                .query_one(
                    "SELECT count(*) FILTER (WHERE state = 'submitted'),
                            count(*) FILTER (WHERE state = 'running'),
                            extract(epoch FROM clock_timestamp() - min(submitted_at)
                                    FILTER (WHERE state = 'submitted'))::float8
                     FROM jobs WHERE state <> 'finished'",
                    &[],
                )
                .map_err(|e| self.classify("counting the job queue", e))
        })?;
        let count = |n: i64| u64::try_from(n).unwrap_or(0);
        Ok(QueueSummary {
            submitted: count(row.get(0)),
            running: count(row.get(1)),
            oldest_submitted_age: row
                .get::<_, Option<f64>>(2)
                .map(|age| Duration::try_from_secs_f64(age.max(0.0)).unwrap_or_default()),
        })
    }

    /// Runs `write` in a transaction of the writer's.
    fn queue_write<T>(
        &self,
        context: &'static str,
        write: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut writer = self.writer()?;
        let conn = writer
            .as_mut()
            .ok_or_else(|| self.lost("the writer is gone"))?;
        let mut tx = conn
            .client
            .transaction()
            .map_err(|e| self.classify(context, e))?;
        let value = write(&mut tx).map_err(|e| self.classify(context, e))?;
        tx.commit().map_err(|e| self.classify(context, e))?;
        Ok(value)
    }
}
