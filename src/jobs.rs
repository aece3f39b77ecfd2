//! The job list: every job of a log, then every job waiting in its queue,
//! one row each — what `job-executor jobs` prints.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::events::{format_timestamp, parse_timestamp};
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
        /// Steps whose outcome is recorded (succeeded or failed).
        steps_done: usize,
        /// Steps in its plan.
        steps_planned: usize,
        /// When it started.
        started_at: DateTime<Utc>,
        /// Its last event's time (its end, once it has ended).
        ended_at: DateTime<Utc>,
        /// The worker running it, while one does.
        owner: Option<String>,
        /// Why it ended as it did (`Job has not finished` until it ends).
        final_reason: String,
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
    /// The status word `jobs` shows: the job's status, `SUBMITTED` or
    /// `RUNNING` for a queued job, `INVALID` for a log that does not fold.
    pub fn status_word(&self) -> &'static str {
        match self {
            JobRow::Logged { status, .. } => status.as_str(),
            JobRow::Queued {
                state: QueueState::Running,
                ..
            } => "RUNNING",
            JobRow::Queued { .. } => "SUBMITTED",
            JobRow::Invalid { .. } => "INVALID",
        }
    }

    /// The row as `jobs --json` prints it: `job_id`, `status`,
    /// `steps_done`, `steps_planned`, `started_at`, `ended_at` (null until
    /// the job ends), `owner` (the worker holding it, while one does),
    /// `final_reason` (null until the job ends; for an invalid log, what is
    /// wrong with it).
    pub fn to_json(&self) -> Value {
        let (done, planned, started, ended, owner, reason) = match self {
            JobRow::Logged {
                status,
                steps_done,
                steps_planned,
                started_at,
                ended_at,
                owner,
                final_reason,
                ..
            } => {
                let ended = status.is_terminal();
                (
                    json!(steps_done),
                    json!(steps_planned),
                    json!(format_timestamp(started_at)),
                    json!(ended.then(|| format_timestamp(ended_at))),
                    json!(owner),
                    json!(ended.then_some(final_reason)),
                )
            }
            JobRow::Queued { steps, owner, .. } => (
                json!(0),
                json!(steps),
                Value::Null,
                Value::Null,
                json!(owner),
                Value::Null,
            ),
            JobRow::Invalid { problem, .. } => {
                let null = Value::Null;
                (
                    null.clone(),
                    null.clone(),
                    null.clone(),
                    null.clone(),
                    null,
                    json!(problem),
                )
            }
        };
        json!({
            "job_id": self.job_id().to_string(),
            "status": self.status_word(),
            "steps_done": done,
            "steps_planned": planned,
            "started_at": started,
            "ended_at": ended,
            "owner": owner,
            "final_reason": reason,
        })
    }

    /// When the job started — for a queued job, when it was submitted.
    fn since(&self) -> Option<DateTime<Utc>> {
        match self {
            JobRow::Logged { started_at, .. } => Some(*started_at),
            JobRow::Queued { submitted_at, .. } => parse_timestamp(submitted_at).ok(),
            JobRow::Invalid { .. } => None,
        }
    }

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
                ..
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
            steps_done: result.steps_succeeded + result.steps_failed,
            steps_planned: result.steps_planned,
            started_at: result.started_at,
            ended_at: result.completed_at,
            owner: self.owner(job_id),
            final_reason: result.final_reason,
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

/// Which rows a listing keeps: `jobs --status S --since TIME --limit N`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobFilter {
    /// Only rows of this status word ([`JobRow::status_word`]), in any case.
    pub status: Option<String>,
    /// Only jobs that started (queued jobs: were submitted) at or after it.
    pub since: Option<DateTime<Utc>>,
    /// At most this many rows, the first in listing order.
    pub limit: Option<usize>,
}

impl JobFilter {
    /// Whether `row` passes the status and time conditions (the limit is
    /// the caller's to count).
    pub fn keeps(&self, row: &JobRow) -> bool {
        let status = self
            .status
            .as_deref()
            .is_none_or(|s| s.eq_ignore_ascii_case(row.status_word()));
        let since = self
            .since
            .is_none_or(|since| row.since().is_some_and(|at| at >= since));
        status && since
    }
}

/// What `job-executor stats` shows of a log and its queue.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// Jobs by status word ([`JobRow::status_word`]), queued ones included.
    pub jobs_by_status: BTreeMap<&'static str, u64>,
    /// How long the oldest submitted job has waited (by the database's
    /// clock), when one waits.
    pub oldest_submitted_age_seconds: Option<f64>,
    /// Jobs running, by the worker holding them.
    pub running_by_owner: BTreeMap<String, u64>,
    /// Events in the log (its last position).
    pub events: u64,
    /// Jobs in the log (started).
    pub jobs: u64,
}

/// The statuses `stats` always shows, in order.
const STATUSES: [&str; 6] = [
    "SUBMITTED",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "INVALID",
];

impl Stats {
    /// As `stats --json` prints it: `jobs_by_status`,
    /// `oldest_submitted_age_seconds` (null when none waits),
    /// `running_by_owner`, `log` {`events`, `jobs`}.
    pub fn to_json(&self) -> Value {
        json!({
            "jobs_by_status": self.jobs_by_status,
            "oldest_submitted_age_seconds": self.oldest_submitted_age_seconds,
            "running_by_owner": self.running_by_owner,
            "log": {"events": self.events, "jobs": self.jobs},
        })
    }
}

/// A few lines for people: jobs by status, the queue's age, the owners, the log.
impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let statuses: Vec<String> = self
            .jobs_by_status
            .iter()
            .map(|(status, n)| format!("{n} {status}"))
            .collect();
        writeln!(f, "jobs: {}", statuses.join(", "))?;
        match self.oldest_submitted_age_seconds {
            Some(age) => writeln!(f, "oldest submitted job: waiting for {age:.1} s")?,
            None => writeln!(f, "oldest submitted job: none waiting")?,
        }
        let owners: Vec<String> = self
            .running_by_owner
            .iter()
            .map(|(owner, n)| format!("{owner} {n}"))
            .collect();
        let owners = if owners.is_empty() {
            "none".to_owned()
        } else {
            owners.join(", ")
        };
        writeln!(f, "running by owner: {owners}")?;
        write!(f, "log: {} events, {} jobs", self.events, self.jobs)
    }
}

/// The stats of `log`: every job folded as `jobs` folds it, the queue
/// counted by the store.
///
/// # Errors
/// The store's.
pub fn stats(log: &dyn Log) -> Result<Stats, StoreError> {
    let mut stats = Stats {
        jobs_by_status: STATUSES.iter().map(|s| (*s, 0)).collect(),
        ..Stats::default()
    };
    for row in job_rows(log)? {
        let row = row?;
        if let JobRow::Logged { .. } | JobRow::Invalid { .. } = row {
            stats.jobs += 1;
        }
        *stats.jobs_by_status.entry(row.status_word()).or_default() += 1;
    }
    for entry in log.queued()? {
        if let (QueueState::Running, Some(owner)) = (entry.state, entry.owner) {
            *stats.running_by_owner.entry(owner).or_default() += 1;
        }
    }
    let queue = log.queue_summary()?;
    stats.oldest_submitted_age_seconds = queue.oldest_submitted_age.map(|a| a.as_secs_f64());
    stats.events = log.last_position()?;
    Ok(stats)
}
