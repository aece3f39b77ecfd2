//! The result of a job, as users read it: a projection of its event log,
//! never assembled by hand (the `projection` module folds it).

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::chain::{Digest, HeadMac};
use crate::model::{FailureKind, JobStatus, StepStatus};

/// The recorded outcome of one executed step.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct StepResult {
    /// Index of the step.
    pub step_index: u32,
    /// `Completed`, `Failed`, or `Running` for a step whose outcome is not recorded.
    pub status: StepStatus,
    /// When the step's `StepStarted` was recorded.
    pub started_at: DateTime<Utc>,
    /// When its outcome was recorded (equals `started_at` while running).
    pub completed_at: DateTime<Utc>,
    /// Handler output, when the handler returned one.
    pub output: Option<Value>,
    /// Failure message, when the step failed.
    pub error: Option<String>,
    /// Health observed right after the step, when an observer was given.
    pub health_after: Option<Value>,
    /// Why the step failed, when it did.
    pub failure_kind: Option<FailureKind>,
    /// The claim under which its `StepStarted` was appended, for a job
    /// run by workers.
    pub started_by: Option<ClaimRef>,
    /// The claim under which its outcome was appended (another worker's
    /// after a takeover), once recorded; none for a step `recover` recorded
    /// interrupted.
    pub recorded_by: Option<ClaimRef>,
}

/// A worker's claim on a job, as its `JobClaimed` records it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Claimed {
    /// The worker.
    pub worker_id: String,
    /// Its host.
    pub host: String,
    /// The claim's epoch.
    pub epoch: u64,
    /// The worker whose lease ran out, when this claim was a takeover.
    pub taken_over_from: Option<String>,
    /// The step left in doubt whose outcome was recorded on taking the job
    /// up, just before the claim.
    pub recorded_outcome: Option<u32>,
    /// When the claim was recorded.
    pub claimed_at: DateTime<Utc>,
}

/// Which claim appended an event: its worker and epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClaimRef {
    /// The worker.
    pub worker_id: String,
    /// The claim's epoch.
    pub epoch: u64,
}

/// The result of a job, folded from its event log.
///
/// `execute_job` returns exactly the fold that `replay` computes from
/// the stored events, so a live result and a replayed one cannot differ.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ExecutionResult {
    /// The job.
    pub job_id: Uuid,
    /// The contract recorded at `JobStarted`.
    pub contract_id: Uuid,
    /// Who started the job.
    pub executed_by: String,
    /// Version of the executor that started the job.
    pub executor_version: String,
    /// Terminal status, or `Running` for a job whose log has no terminal event.
    pub final_status: JobStatus,
    /// `All steps completed successfully`, or `Step <index> failed: <error>`.
    pub final_reason: String,
    /// Steps started.
    pub steps_executed: usize,
    /// Steps that succeeded.
    pub steps_succeeded: usize,
    /// Steps that failed.
    pub steps_failed: usize,
    /// Steps in the plan.
    pub steps_planned: usize,
    /// One entry per started step, in order.
    pub step_results: Vec<StepResult>,
    /// Health observed before the first step.
    pub health_before: Option<Value>,
    /// Health observed after the last successful step.
    pub health_after: Option<Value>,
    /// When `JobStarted` was recorded.
    pub started_at: DateTime<Utc>,
    /// When the terminal event was recorded (the last event, for an unfinished job).
    pub completed_at: DateTime<Utc>,
    /// Number of events in the job's log.
    pub events: u64,
    /// Chain digest of the job's last event: commits to the whole log.
    pub head: Digest,
    /// HMAC of `head`, when the last event was written with a key.
    pub head_mac: Option<HeadMac>,
    /// The workers' claims on the job, in order (none for a job run
    /// without a worker).
    pub claims: Vec<Claimed>,
}
