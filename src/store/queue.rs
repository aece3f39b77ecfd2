//! The job queue beside the log: what `submit` records and workers claim.
//!
//! This is storage only — rows of submitted jobs, their owners, lease ends
//! and epochs, changed atomically by the database. The protocol built on it
//! (who claims what, when a lease is renewed, what a takeover records) is
//! `crate::worker`'s, written once for every store.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::StoreError;
use crate::model::JobStep;

/// A claim on a job, held by one worker. Every append made under it checks,
/// in the same transaction, that the job's epoch is still this one: once
/// another worker has taken the job over (and so moved its epoch on), the
/// old owner can append nothing more.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The job.
    pub job_id: Uuid,
    /// The job's epoch when it was claimed.
    pub epoch: u64,
}

/// A job as submitted to the queue: everything a worker needs to run it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct QueuedJob {
    /// The job.
    pub job_id: Uuid,
    /// The contract the plan was made under.
    pub contract_id: Uuid,
    /// The plan.
    pub steps: Vec<JobStep>,
    /// Who submitted it; recorded as `executed_by` when it starts.
    pub executed_by: String,
}

impl QueuedJob {
    /// A job to submit.
    pub fn new(
        job_id: Uuid,
        contract_id: Uuid,
        steps: Vec<JobStep>,
        executed_by: impl Into<String>,
    ) -> Self {
        QueuedJob {
            job_id,
            contract_id,
            steps,
            executed_by: executed_by.into(),
        }
    }
}

/// A job a worker claimed.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Claim {
    /// The job as submitted.
    pub job: QueuedJob,
    /// Appends for the job must carry this fence.
    pub fence: Fence,
    /// The worker whose expired lease this claim took over, if any.
    pub taken_over_from: Option<String>,
}

/// Where a queued job is.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueState {
    /// Waiting for a worker.
    Submitted,
    /// Claimed by a worker.
    Running,
    /// Done with: its log tells how it ended.
    Finished,
}

impl QueueState {
    /// As stored: `submitted`, `running`, `finished`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueState::Submitted => "submitted",
            QueueState::Running => "running",
            QueueState::Finished => "finished",
        }
    }

    /// The stored form, back.
    pub fn parse(text: &str) -> Option<QueueState> {
        match text {
            "submitted" => Some(QueueState::Submitted),
            "running" => Some(QueueState::Running),
            "finished" => Some(QueueState::Finished),
            _ => None,
        }
    }
}

/// A job in the queue, as `jobs` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueEntry {
    /// The job.
    pub job_id: Uuid,
    /// Where it is.
    pub state: QueueState,
    /// The worker holding it, while running.
    pub owner: Option<String>,
    /// Claims so far (each claim or takeover moves it on).
    pub epoch: u64,
    /// Whether its lease has run out (by the database's clock).
    pub lease_expired: bool,
    /// When it was submitted (RFC 3339, UTC).
    pub submitted_at: String,
    /// Steps in its plan.
    pub steps: usize,
}

/// How many jobs wait and run, and how long the oldest has waited: what a
/// fleet's dashboard shows of the queue.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct QueueSummary {
    /// Jobs submitted and not claimed.
    pub submitted: u64,
    /// Jobs claimed by a worker (leases run out or not).
    pub running: u64,
    /// How long the oldest submitted job has waited, by the database's
    /// clock; `None` when none waits.
    pub oldest_submitted_age: Option<Duration>,
}

/// The queue's side of a store. Every change is one transaction of the
/// database, and lease times are the database's clock, so workers on many
/// hosts agree on them.
pub trait JobQueue: Send + Sync {
    /// Records `job` as submitted.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the job id is already queued or in the
    /// log (nothing is recorded); other store failures.
    fn submit(&self, job: &QueuedJob) -> Result<(), StoreError>;

    /// Claims for `owner`, until `lease` from now, the oldest submitted job
    /// — or, failing that, the oldest running job whose lease has run out
    /// (a takeover). The claim moves the job's epoch on, fencing off any
    /// earlier owner. `None` when there is nothing to claim.
    ///
    /// # Errors
    /// Store failures.
    fn claim(&self, owner: &str, lease: Duration) -> Result<Option<Claim>, StoreError>;

    /// Extends, until `lease` from now, the leases `owner` holds under
    /// `fences`; returns the fences still held (a job taken over meanwhile
    /// is not among them).
    ///
    /// # Errors
    /// Store failures.
    fn renew(
        &self,
        owner: &str,
        fences: &[Fence],
        lease: Duration,
    ) -> Result<Vec<Fence>, StoreError>;

    /// Gives a claim up: a `finished` job leaves the queue; any other can be
    /// claimed again at once. Nothing happens if the claim was lost.
    ///
    /// # Errors
    /// Store failures.
    fn release(&self, fence: Fence, finished: bool) -> Result<(), StoreError>;

    /// The job `job_id` as submitted, and where it is, if it is queued.
    ///
    /// # Errors
    /// Store failures.
    fn queued_job(&self, job_id: Uuid) -> Result<Option<(QueuedJob, QueueState)>, StoreError>;

    /// The jobs that are submitted or running, in the order they were
    /// submitted.
    ///
    /// # Errors
    /// Store failures.
    fn queued(&self) -> Result<Vec<QueueEntry>, StoreError>;

    /// How many jobs are submitted and running, and the oldest submitted
    /// one's age. By default from [`queued`](Self::queued) and this host's
    /// clock; the SQL stores count in the database, by its clock.
    ///
    /// # Errors
    /// Store failures.
    fn queue_summary(&self) -> Result<QueueSummary, StoreError> {
        let mut summary = QueueSummary::default();
        for entry in self.queued()? {
            match entry.state {
                QueueState::Submitted => {
                    summary.submitted += 1;
                    if summary.submitted == 1 {
                        let waited = chrono::DateTime::parse_from_rfc3339(&entry.submitted_at)
                            .map(|at| chrono::Utc::now() - at.with_timezone(&chrono::Utc));
                        summary.oldest_submitted_age = Some(
                            waited
                                .ok()
                                .and_then(|w| w.to_std().ok())
                                .unwrap_or_default(),
                        );
                    }
                }
                QueueState::Running => summary.running += 1,
                QueueState::Finished => {}
            }
        }
        Ok(summary)
    }
}
