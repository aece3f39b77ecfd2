//! The job list: every job of a log, then every job waiting in its queue,
//! one row each — what `job-executor jobs` prints.

use std::fmt;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::events::format_timestamp;
use crate::model::JobStatus;
use crate::projection::Projector;
use crate::store::{Log, QueueEntry, QueueState, StoreError};

/// One job, as the list shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum JobRow {
    /// A job in the log: what its events fold to.
    Logged {
        /// The job.
        job_id: Uuid,
        /// Its status so far.
        status: JobStatus,
        /// Steps that succeeded.
        steps_succeeded: usize,
        /// Steps in its plan.
        steps_planned: usize,
        /// When it started.
        started_at: DateTime<Utc>,
        /// Its last event's time (its end, once it has ended).
        ended_at: DateTime<Utc>,
        /// The worker running it, while one does.
        owner: Option<String>,
    },
    /// A job submitted and not started: it has no events yet.
    Queued {
        /// The job.
        job_id: Uuid,
        /// Waiting, or claimed by a worker that has not started it yet.
        state: QueueState,
        /// Steps in its plan.
        steps: usize,
        /// When it was submitted (RFC 3339, UTC).
        submitted_at: String,
        /// The worker holding it, while one does.
        owner: Option<String>,
    },
    /// A job whose log does not fold: what is wrong with it.
    Invalid {
        /// The job.
        job_id: Uuid,
        /// Why (`no events`, or the replay's refusal).
        problem: String,
    },
}

impl JobRow {
    /// The job this row is about.
    pub fn job_id(&self) -> Uuid {
        match self {
            JobRow::Logged { job_id, .. }
            | JobRow::Queued { job_id, .. }
            | JobRow::Invalid { job_id, .. } => *job_id,
        }
    }
}

/// One line, tab-separated: id, status, steps, times, and `owner=…` while a
/// worker holds the job.
impl fmt::Display for JobRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let owner = |owner: &Option<String>| {
            owner
                .as_deref()
                .map(|owner| format!("\towner={owner}"))
                .unwrap_or_default()
        };
        match self {
            JobRow::Logged {
                job_id,
                status,
                steps_succeeded,
                steps_planned,
                started_at,
                ended_at,
                owner: held_by,
            } => write!(
                f,
                "{job_id}\t{status}\t{steps_succeeded}/{steps_planned} steps\t{}\t{}{}",
                format_timestamp(started_at),
                format_timestamp(ended_at),
                owner(held_by),
            ),
            JobRow::Queued {
                job_id,
                state,
                steps,
                submitted_at,
                owner: held_by,
            } => {
                let status = match state {
                    QueueState::Running => "RUNNING",
                    _ => "SUBMITTED",
                };
                let held_by = owner(held_by);
                write!(
                    f,
                    "{job_id}\t{status}\t0/{steps} steps\t{submitted_at}\t-{held_by}"
                )
            }
            JobRow::Invalid { job_id, problem } => write!(f, "{job_id}\tINVALID\t{problem}"),
        }
    }
}

/// The rows of `log`: its jobs in start order, each folded as it is read,
/// then the jobs queued and not started.
///
/// ```
/// use job_executor::jobs::{job_rows, JobRow};
/// use job_executor::store::{Log, MemoryStore, QueuedJob};
/// use uuid::Uuid;
///
/// let log = MemoryStore::new();
/// let job = QueuedJob::new(Uuid::new_v4(), Uuid::new_v4(), Vec::new(), "ops");
/// job_executor::worker::submit(&log, &job)?;
/// let rows: Vec<JobRow> = job_rows(&log)?.collect::<Result<_, _>>()?;
/// assert_eq!(rows[0].to_string().split('\t').nth(1), Some("SUBMITTED"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// The store's, listing the jobs and the queue; each row may fail to be
/// read on its own.
pub fn job_rows(log: &dyn Log) -> Result<JobRows<'_>, StoreError> {
    let queued = log.queued()?;
    let logged = log.job_ids()?;
    Ok(JobRows {
        log,
        queued,
        logged,
        next_logged: 0,
        next_queued: 0,
    })
}

/// The rows of a log, read one at a time ([`job_rows`]).
pub struct JobRows<'a> {
    log: &'a dyn Log,
    queued: Vec<QueueEntry>,
    logged: Vec<Uuid>,
    next_logged: usize,
    next_queued: usize,
}

impl fmt::Debug for JobRows<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobRows")
            .field("logged", &self.logged.len())
            .field("queued", &self.queued.len())
            .finish_non_exhaustive()
    }
}

impl JobRows<'_> {
    /// The worker running `job_id`, if one is.
    fn owner(&self, job_id: Uuid) -> Option<String> {
        self.queued
            .iter()
            .find(|e| e.job_id == job_id && e.state == QueueState::Running)
            .and_then(|e| e.owner.clone())
    }

    /// A logged job's row, folded from its events.
    fn logged(&self, job_id: Uuid) -> Result<JobRow, StoreError> {
        let mut projector = Projector::new(job_id);
        for record in self.log.load_job(job_id)? {
            if let Err(e) = projector.apply_record(&record) {
                let problem = e.to_string();
                return Ok(JobRow::Invalid { job_id, problem });
            }
        }
        let Some(result) = projector.into_result() else {
            let problem = "no events".to_owned();
            return Ok(JobRow::Invalid { job_id, problem });
        };
        Ok(JobRow::Logged {
            job_id,
            status: result.final_status,
            steps_succeeded: result.steps_succeeded,
            steps_planned: result.steps_planned,
            started_at: result.started_at,
            ended_at: result.completed_at,
            owner: self.owner(job_id),
        })
    }
}

impl Iterator for JobRows<'_> {
    type Item = Result<JobRow, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(&job_id) = self.logged.get(self.next_logged) {
            self.next_logged += 1;
            return Some(self.logged(job_id));
        }
        while let Some(entry) = self.queued.get(self.next_queued) {
            self.next_queued += 1;
            if self.logged.contains(&entry.job_id) {
                continue;
            }
            return Some(Ok(JobRow::Queued {
                job_id: entry.job_id,
                state: entry.state,
                steps: entry.steps,
                submitted_at: entry.submitted_at.clone(),
                owner: self.owner(entry.job_id),
            }));
        }
        None
    }
}
