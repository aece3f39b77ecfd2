//! What the executor answers besides a result: its errors, what `recover`
//! did, what a cancel did, and a step outcome it could not record.

use uuid::Uuid;

use crate::events::Event;
use crate::machine::TransitionError;
use crate::model::PlanError;
use crate::projection::ReplayError;
use crate::store::{EventStore, StoreError};

/// Why the executor did not do what it was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecutorError {
    /// The job id already has events: a job is executed at most once (EXEC-006).
    /// Nothing was appended and no handler ran.
    #[error(
        "job {job_id} already has {events} events in the log: a job id is executed at most once"
    )]
    JobAlreadyExists {
        /// The job.
        job_id: Uuid,
        /// Its stored event count.
        events: u64,
    },
    /// The plan is not executable. Nothing was appended.
    #[error("invalid plan for job {job_id}: {source}")]
    InvalidPlan {
        /// The job.
        job_id: Uuid,
        /// What is wrong with the plan.
        #[source]
        source: PlanError,
    },
    /// The log has no events for the job.
    #[error("unknown job {job_id}: the log has no events for it")]
    UnknownJob {
        /// The job.
        job_id: Uuid,
    },
    /// The job has ended; nothing more can happen to it.
    #[error("job {job_id} has already ended ({status})")]
    JobEnded {
        /// The job.
        job_id: Uuid,
        /// How it ended.
        status: crate::model::JobStatus,
    },
    /// A step's outcome is unknown: the executor stopped while it ran.
    #[error(
        "job {job_id}: step {step_index} is in doubt (the executor stopped while it ran); run `recover` first"
    )]
    StepInDoubt {
        /// The job.
        job_id: Uuid,
        /// The step.
        step_index: u32,
    },
    /// Another executor appended to the job: it is running elsewhere.
    #[error(
        "conflict on job {job_id}: another executor appended {kind} at seq {seq}; this one stopped"
    )]
    Conflict {
        /// The job.
        job_id: Uuid,
        /// The seq of the other executor's event.
        seq: u64,
        /// Its kind.
        kind: String,
    },
    /// Others kept appending to the job while this executor tried to: every
    /// one of its appends found another writer's event first. What it
    /// appended before stands; it appended nothing more.
    #[error(
        "job {job_id}: {attempts} appends in a row found another writer's event first; this executor gave up"
    )]
    Contended {
        /// The job.
        job_id: Uuid,
        /// The appends tried.
        attempts: usize,
    },
    /// The event log failed; the events appended before the failure stay in
    /// the log, and the job is left as they describe it (a step may be in
    /// doubt: `recover` closes it).
    #[error("event log failure for job {job_id}: {source}")]
    Store {
        /// The job.
        job_id: Uuid,
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// The state machine refused an event the executor built. This is a bug
    /// in the executor; nothing was appended for that event.
    #[error("internal error for job {job_id}: the state machine refused {kind}: {source}")]
    Transition {
        /// The job.
        job_id: Uuid,
        /// The refused kind.
        kind: &'static str,
        /// The refusal.
        #[source]
        source: TransitionError,
    },
    /// The event log failed on an operation about no single job (listing
    /// the unfinished jobs, for `recover`). Nothing was appended.
    #[error("event log failure: {source}")]
    Log {
        /// The store's error.
        #[source]
        source: StoreError,
    },
    /// A stored job cannot be replayed.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The health observer panicked, or did not answer within the health
    /// deadline. Before the job's first step (or a resumed job's next one),
    /// nothing was appended. After a step, the step's outcome was recorded
    /// without health — by the executor's watchdog at the deadline, if the
    /// observer was still running then — and the job stopped before its next
    /// step: `resume` goes on (`recover` first, to halt it, if the step
    /// failed).
    #[error(
        "job {job_id}: the health observer failed ({message}); any step outcome is recorded, and the job stopped before its next step"
    )]
    HealthObserver {
        /// The job.
        job_id: Uuid,
        /// What went wrong: a panic and its message, or the deadline.
        message: String,
    },
    /// The thread driving a job stopped without finishing it (a panic in
    /// the engine itself). What was recorded stands; `recover` closes a
    /// step left in doubt.
    #[error("job {job_id}: the thread driving it stopped: {message}")]
    Driver {
        /// The job.
        job_id: Uuid,
        /// The panic's message.
        message: String,
    },
    /// The thread a job was handed to went away without answering for it.
    /// What it recorded stands; `recover` closes a step left in doubt.
    #[error(
        "job {job_id}: the thread driving it stopped without an answer; its log may hold a step in doubt (`recover` closes it)"
    )]
    Unanswered {
        /// The job.
        job_id: Uuid,
    },
    /// A step's outcome is known but could not be appended, even after
    /// [`APPEND_RETRIES_MAX`](super::APPEND_RETRIES_MAX) tries. The outcome
    /// is in the error, and the executor keeps it: its `recover` records it
    /// (rather than declaring the step interrupted); another executor's
    /// `recover_with` can be given it.
    #[error("job {}: the outcome of step {} could not be recorded: {source}", outcome.job_id, outcome.step_index)]
    OutcomeNotRecorded {
        /// The outcome, ready to be recorded.
        outcome: Box<UnrecordedOutcome>,
        /// Why the append failed.
        #[source]
        source: StoreError,
    },
}

impl ExecutorError {
    /// The event log's failure behind this error, if it is one
    /// ([`ExecutorError::Store`], [`ExecutorError::Log`] or
    /// [`ExecutorError::OutcomeNotRecorded`]).
    pub fn store_error(&self) -> Option<&StoreError> {
        match self {
            ExecutorError::Store { source, .. }
            | ExecutorError::Log { source }
            | ExecutorError::OutcomeNotRecorded { source, .. } => Some(source),
            _ => None,
        }
    }

    /// Whether the job went on elsewhere: another executor appended to it
    /// ([`Conflict`](ExecutorError::Conflict),
    /// [`Contended`](ExecutorError::Contended)) or took its claim over
    /// ([`StoreError::Fenced`]).
    pub fn is_taken_over(&self) -> bool {
        matches!(self.store_error(), Some(StoreError::Fenced { .. }))
            || matches!(
                self,
                ExecutorError::Conflict { .. } | ExecutorError::Contended { .. }
            )
    }

    /// The refusal of a job id that already has events (or is queued):
    /// a job is executed at most once.
    pub(crate) fn already_exists(store: &dyn EventStore, job_id: Uuid) -> ExecutorError {
        ExecutorError::JobAlreadyExists {
            job_id,
            events: store.last_seq(job_id).unwrap_or(1),
        }
    }
}

/// A step's outcome that is known but not in the log yet.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct UnrecordedOutcome {
    /// The job.
    pub job_id: Uuid,
    /// The step.
    pub step_index: u32,
    /// The outcome: `StepSucceeded` or `StepFailed`.
    pub event: Event,
}

/// What `recover` did to one job.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Recovery {
    /// The step was in doubt: recorded as failed (interrupted), and the job halted.
    Interrupted {
        /// The job.
        job_id: Uuid,
        /// The step.
        step_index: u32,
    },
    /// A failed step's job had not halted yet: halted.
    Halted {
        /// The job.
        job_id: Uuid,
        /// The failed step.
        step_index: u32,
    },
    /// A job stopped between steps had a cancel request: cancelled.
    Cancelled {
        /// The job.
        job_id: Uuid,
    },
    /// A job stopped between steps: left as it is, to be resumed.
    Resumable {
        /// The job.
        job_id: Uuid,
        /// The step `resume` would start.
        next_step: u32,
    },
    /// A step's outcome, known but not recorded when it came, was recorded
    /// (then the job is halted, or left to be resumed, as it goes on).
    OutcomeRecorded {
        /// The job.
        job_id: Uuid,
        /// The step.
        step_index: u32,
    },
    /// The job's log could not be read or replayed; it was left untouched.
    Unreadable {
        /// The job.
        job_id: Uuid,
        /// Why.
        error: String,
    },
}

impl Recovery {
    /// The job this is about.
    pub fn job_id(&self) -> Uuid {
        match self {
            Recovery::Interrupted { job_id, .. }
            | Recovery::Halted { job_id, .. }
            | Recovery::Cancelled { job_id }
            | Recovery::Resumable { job_id, .. }
            | Recovery::OutcomeRecorded { job_id, .. }
            | Recovery::Unreadable { job_id, .. } => *job_id,
        }
    }
}

/// One line, as `job-executor recover` prints it.
impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Recovery::Interrupted { job_id, step_index } => write!(
                f,
                "{job_id}: step {step_index} was in doubt: recorded as failed (interrupted), job halted"
            ),
            Recovery::Halted { job_id, step_index } => {
                write!(f, "{job_id}: step {step_index} had failed: job halted")
            }
            Recovery::Cancelled { job_id } => {
                write!(f, "{job_id}: cancel request honoured: job cancelled")
            }
            Recovery::Resumable { job_id, next_step } => write!(
                f,
                "{job_id}: stopped between steps; `job-executor resume {job_id}` continues at step {next_step}"
            ),
            Recovery::OutcomeRecorded { job_id, step_index } => write!(
                f,
                "{job_id}: step {step_index}'s known outcome, not recorded when it came, is now recorded"
            ),
            Recovery::Unreadable { job_id, error } => {
                write!(f, "{job_id}: cannot be read, left as it is: {error}")
            }
        }
    }
}

/// What `request_cancel` or `cancel` did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelRequest {
    /// The request was recorded at this seq.
    Recorded {
        /// Its seq in the job's log.
        seq: u64,
    },
    /// A request was already recorded; nothing was appended.
    AlreadyRequested,
    /// The job was queued and had not started: it ended before it started
    /// (`JobStarted`, the request and `JobCancelled` in one commit).
    CancelledBeforeStart,
}

impl CancelRequest {
    /// One line about `job_id`, as `job-executor cancel` prints it.
    pub fn line(&self, job_id: Uuid) -> String {
        match self {
            CancelRequest::Recorded { seq } => {
                format!("cancel requested for job {job_id} (seq {seq})")
            }
            CancelRequest::AlreadyRequested => format!("cancel already requested for job {job_id}"),
            CancelRequest::CancelledBeforeStart => {
                format!("job {job_id} cancelled before it started")
            }
        }
    }
}
