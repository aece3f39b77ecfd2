//! Results and evidence, folded from a job's events.
//!
//! [`Projector`] is the only way an [`ExecutionResult`] is made: the executor
//! feeds it each event as it is recorded, and [`replay`] feeds it the stored
//! log. Every event passes through the state machine on the way in, so a
//! projection of a log that breaks an invariant is refused, never guessed.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::chain::{self, Digest, HeadMac};
use crate::events::{DecodeError, Event, EventRecord, JobClaimed, format_timestamp};
use crate::machine::{self, JobState, Phase, TransitionError};
use crate::model::{FailureKind, StepStatus};
use crate::result::{ClaimRef, Claimed, ExecutionResult, StepResult};
use crate::store::{EventStore, StoreError};

/// `final_reason` of a job whose every step succeeded.
pub const REASON_COMPLETED: &str = "All steps completed successfully";

/// `final_reason` of a job whose log has no terminal event.
pub const REASON_UNFINISHED: &str = "Job has not finished";

/// Why a job's log cannot be projected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The log has no events for the job.
    #[error("unknown job {job_id}: the log has no events for it")]
    UnknownJob {
        /// The job asked for.
        job_id: Uuid,
    },
    /// A stored event cannot be decoded.
    #[error("job {job_id} seq {seq}: {source}")]
    Decode {
        /// The job.
        job_id: Uuid,
        /// The event's seq.
        seq: u64,
        /// What is wrong with it.
        #[source]
        source: DecodeError,
    },
    /// A stored event breaks an invariant.
    #[error("job {job_id} seq {seq}: {invariant}: {source}", invariant = source.invariant())]
    Rejected {
        /// The job.
        job_id: Uuid,
        /// The event's seq.
        seq: u64,
        /// The refusal.
        #[source]
        source: TransitionError,
    },
    /// A stored digest does not match the event's bytes and the chain before it.
    #[error(
        "job {job_id} seq {seq}: hash chain broken: {detail}; run `job-executor verify` for details"
    )]
    Chain {
        /// The job.
        job_id: Uuid,
        /// The event's seq.
        seq: u64,
        /// What does not match.
        detail: String,
    },
    /// The job's seq numbers are not 1, 2, 3, ….
    #[error("job {job_id}: expected seq {expected}, found seq {found}")]
    SeqGap {
        /// The job.
        job_id: Uuid,
        /// The seq that should come next.
        expected: u64,
        /// The seq stored.
        found: u64,
    },
    /// The log could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Incrementally folds one job's events into its [`ExecutionResult`].
#[derive(Clone, Debug)]
pub struct Projector {
    job_id: Uuid,
    state: JobState,
    events: u64,
    contract_id: Uuid,
    executed_by: String,
    executor_version: String,
    health_before: Option<Value>,
    health_after: Option<Value>,
    steps: Vec<StepResult>,
    started_at: Option<DateTime<Utc>>,
    last_at: Option<DateTime<Utc>>,
    head: Digest,
    head_mac: Option<HeadMac>,
    cancel_reason: Option<String>,
    cancel_request_reason: Option<String>,
    claims: Vec<Claimed>,
}

impl Projector {
    /// A projector for `job_id` that has seen no events.
    pub fn new(job_id: Uuid) -> Self {
        Projector {
            job_id,
            state: JobState::new(),
            events: 0,
            contract_id: Uuid::nil(),
            executed_by: String::new(),
            executor_version: String::new(),
            health_before: None,
            health_after: None,
            steps: Vec::new(),
            started_at: None,
            last_at: None,
            head: Digest::GENESIS,
            head_mac: None,
            cancel_reason: None,
            cancel_request_reason: None,
            claims: Vec::new(),
        }
    }

    /// The state machine's view of the job so far.
    pub fn state(&self) -> JobState {
        self.state
    }

    /// Events folded so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// The chain digest of the last event folded ([`Digest::GENESIS`] before any).
    pub fn head(&self) -> Digest {
        self.head
    }

    /// The reason of the cancel request folded so far, if any.
    pub fn cancel_request_reason(&self) -> Option<String> {
        self.cancel_request_reason.clone()
    }

    /// The claim the job is under now: the last `JobClaimed` folded.
    fn current_claim(&self) -> Option<ClaimRef> {
        self.claims.last().map(|c| ClaimRef {
            worker_id: c.worker_id.clone(),
            epoch: c.epoch,
        })
    }

    /// Folds `event`, whose record the caller sealed and appended, without
    /// decoding the record again.
    ///
    /// # Errors
    /// The machine's refusal; the projector is unchanged then.
    pub fn apply_sealed(
        &mut self,
        record: &EventRecord,
        event: &Event,
    ) -> Result<(), TransitionError> {
        // The caller sealed the record after this projector's head: its
        // digest is the chain's, and need not be computed twice.
        let digest = record
            .digest
            .as_deref()
            .and_then(Digest::from_hex)
            .unwrap_or_else(|| chain::chain(&self.head, record));
        debug_assert_eq!(digest, chain::chain(&self.head, record));
        self.apply(record.recorded_at_time(), event.clone())?;
        self.head = digest;
        self.head_mac = record.mac.as_deref().and_then(HeadMac::from_hex);
        Ok(())
    }

    /// Passes `event` through the state machine and folds it in.
    fn apply(&mut self, recorded_at: DateTime<Utc>, event: Event) -> Result<(), TransitionError> {
        self.state = machine::apply(self.state, &event)?;
        self.events += 1;
        self.started_at.get_or_insert(recorded_at);
        self.last_at = Some(recorded_at);
        // The event is ours: its parts move into the result, uncopied.
        match event {
            Event::JobStarted(started) => {
                self.contract_id = started.contract_id;
                self.executed_by = started.executed_by;
                self.executor_version = started.executor_version;
                self.health_before = started.health_before;
            }
            Event::StepStarted(s) => self.steps.push(StepResult {
                step_index: s.step_index,
                status: StepStatus::Running,
                started_at: recorded_at,
                completed_at: recorded_at,
                output: None,
                error: None,
                health_after: None,
                failure_kind: None,
                started_by: self.current_claim(),
                recorded_by: None,
            }),
            Event::StepSucceeded(s) => {
                let recorded_by = self.current_claim();
                if let Some(step) = self.steps.last_mut() {
                    step.recorded_by = recorded_by;
                    step.status = StepStatus::Completed;
                    step.completed_at = recorded_at;
                    step.output = Some(s.output);
                    step.health_after.clone_from(&s.health_after);
                }
                self.health_after = s.health_after;
            }
            Event::StepFailed(f) => {
                // A step is recorded interrupted only by whoever takes the
                // job up after the executor that started it stopped: never
                // under the claim it ran under. A claim that did record it
                // names it (`recorded_outcome`); `recover` claims nothing.
                let recorded_by = match f.failure.kind {
                    FailureKind::Interrupted => None,
                    _ => self.current_claim(),
                };
                if let Some(step) = self.steps.last_mut() {
                    step.recorded_by = recorded_by;
                    step.status = StepStatus::Failed;
                    step.completed_at = recorded_at;
                    step.output = f.output;
                    step.error = Some(f.failure.message);
                    step.health_after = f.health_after;
                    step.failure_kind = Some(f.failure.kind);
                }
            }
            Event::JobCancelled(cancelled) => self.cancel_reason = Some(cancelled.reason),
            Event::JobCancelRequested(request) => {
                self.cancel_request_reason = Some(request.reason);
            }
            Event::JobClaimed(claimed) => self.claim(recorded_at, claimed),
            Event::JobCompleted(_) | Event::JobHalted(_) | Event::JobResumed(_) => {}
        }
        Ok(())
    }

    /// Folds a claim; the outcome it says it recorded on taking the job up
    /// is attributed to it.
    fn claim(&mut self, recorded_at: DateTime<Utc>, claimed: JobClaimed) {
        self.claims.push(Claimed {
            worker_id: claimed.worker_id,
            host: claimed.host,
            epoch: claimed.epoch,
            taken_over_from: claimed.taken_over_from,
            recorded_outcome: claimed.recorded_outcome,
            claimed_at: recorded_at,
        });
        let by = self.current_claim();
        if let Some(step_index) = claimed.recorded_outcome
            && let Some(step) = self.steps.iter_mut().find(|s| s.step_index == step_index)
        {
            step.recorded_by = by;
        }
    }

    /// Decodes a stored record of this job and folds it in, checking that it
    /// is the job's next seq.
    ///
    /// # Errors
    /// [`ReplayError`] for a seq gap, an undecodable record or a refused event.
    pub fn apply_record(&mut self, record: &EventRecord) -> Result<(), ReplayError> {
        let job_id = self.job_id;
        let expected = self.events + 1;
        if record.seq != expected || record.job_id != job_id {
            return Err(ReplayError::SeqGap {
                job_id,
                expected,
                found: record.seq,
            });
        }
        let digest = chain::chain(&self.head, record);
        let chain_error = |detail: String| ReplayError::Chain {
            job_id,
            seq: record.seq,
            detail,
        };
        // Events written before the chain existed carry no digest: their
        // digest is the one computed here.
        if let Some(stored) = &record.digest
            && !digest.matches_hex(stored)
        {
            return Err(chain_error(format!(
                "stored digest {stored} is not {}",
                digest.to_hex()
            )));
        }
        let head_mac = match &record.mac {
            None => None,
            Some(text) => Some(
                HeadMac::from_hex(text)
                    .ok_or_else(|| chain_error(format!("malformed MAC {text:?}")))?,
            ),
        };
        let recorded = record.decode().map_err(|source| ReplayError::Decode {
            job_id,
            seq: record.seq,
            source,
        })?;
        self.apply(recorded.recorded_at, recorded.event)
            .map_err(|source| ReplayError::Rejected {
                job_id,
                seq: record.seq,
                source,
            })?;
        self.head = digest;
        self.head_mac = head_mac;
        Ok(())
    }

    /// The result as of the events folded so far, or `None` before `JobStarted`.
    pub fn result(&self) -> Option<ExecutionResult> {
        self.clone().into_result()
    }

    /// The result as of the events folded so far, moving it out of the
    /// projector; `None` before `JobStarted`.
    pub fn into_result(self) -> Option<ExecutionResult> {
        let started_at = self.started_at?;
        let steps_succeeded = count(&self.steps, StepStatus::Completed);
        let steps_failed = count(&self.steps, StepStatus::Failed);
        let final_reason = match self.state.phase {
            Phase::Completed => REASON_COMPLETED.to_owned(),
            Phase::Halted { step_index } | Phase::StepFailed { step_index } => {
                let error = self
                    .steps
                    .iter()
                    .find(|s| s.step_index == step_index)
                    .and_then(|s| s.error.as_deref())
                    .unwrap_or_default();
                format!("Step {step_index} failed: {error}")
            }
            Phase::Cancelled => format!(
                "Cancelled before step {}: {}",
                self.state.next_step,
                self.cancel_reason.as_deref().unwrap_or_default()
            ),
            Phase::NotStarted | Phase::Idle | Phase::StepRunning { .. } => {
                REASON_UNFINISHED.to_owned()
            }
        };
        Some(ExecutionResult {
            job_id: self.job_id,
            contract_id: self.contract_id,
            executed_by: self.executed_by,
            executor_version: self.executor_version,
            final_status: self.state.status(),
            final_reason,
            steps_executed: self.steps.len(),
            steps_succeeded,
            steps_failed,
            steps_planned: self.state.steps as usize,
            step_results: self.steps,
            health_before: self.health_before,
            health_after: self.health_after,
            started_at,
            completed_at: self.last_at.unwrap_or(started_at),
            events: self.events,
            head: self.head,
            head_mac: self.head_mac,
            claims: self.claims,
        })
    }
}

fn count(steps: &[StepResult], status: StepStatus) -> usize {
    steps.iter().filter(|s| s.status == status).count()
}

/// Rebuilds a stored job's result from its events, through the state machine.
///
/// # Errors
/// [`ReplayError::UnknownJob`] when the log has no events for `job_id`; any
/// other [`ReplayError`] when the log cannot be read or breaks an invariant.
pub fn replay(store: &dyn EventStore, job_id: Uuid) -> Result<ExecutionResult, ReplayError> {
    let mut projector = Projector::new(job_id);
    let mut failure = None;
    store.visit_job(job_id, &mut |record| match projector.apply_record(record) {
        Ok(()) => true,
        Err(e) => {
            failure = Some(e);
            false
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    projector
        .into_result()
        .ok_or(ReplayError::UnknownJob { job_id })
}

/// Replays every job of the log, streaming: each job's result (or why it
/// cannot be replayed) goes to `on_job` as soon as its last event is read, so
/// memory holds one job at a time, whatever the number of jobs. A row that
/// cannot be read at all goes to `on_job` as a [`ReplayError::Store`] of its
/// own (under the nil id when even its job id is unreadable).
///
/// # Errors
/// [`StoreError`] when the log cannot be read.
pub fn replay_all(
    store: &dyn EventStore,
    mut on_job: impl FnMut(Uuid, Result<ExecutionResult, ReplayError>),
) -> Result<(), StoreError> {
    type Job = (u64, Projector, Option<ReplayError>);
    fn finish(
        job: Option<Job>,
        on_job: &mut impl FnMut(Uuid, Result<ExecutionResult, ReplayError>),
    ) {
        if let Some((_, projector, failure)) = job {
            let job_id = projector.job_id;
            let result = match failure {
                Some(e) => Err(e),
                None => projector
                    .into_result()
                    .ok_or(ReplayError::UnknownJob { job_id }),
            };
            on_job(job_id, result);
        }
    }
    let mut current: Option<Job> = None;
    store.scan(&mut |group, row| {
        let record = match row {
            Ok(record) => record,
            // A row that cannot be read is reported, never skipped: under
            // the job id it has, if any can be made out.
            Err(e) => {
                let job_id = match &e {
                    StoreError::BadRow { job_id, .. } => {
                        Uuid::parse_str(job_id).unwrap_or_default()
                    }
                    _ => Uuid::nil(),
                };
                return on_job(job_id, Err(ReplayError::Store(e)));
            }
        };
        if current.as_ref().is_none_or(|(g, _, _)| *g != group) {
            finish(current.take(), &mut on_job);
            current = Some((group, Projector::new(record.job_id), None));
        }
        if let Some((_, projector, failure @ None)) = current.as_mut()
            && let Err(e) = projector.apply_record(record)
        {
            *failure = Some(e);
        }
    })?;
    finish(current.take(), &mut on_job);
    Ok(())
}

fn status_name(status: StepStatus) -> &'static str {
    match status {
        StepStatus::Pending => "PENDING",
        StepStatus::Running => "RUNNING",
        StepStatus::Completed => "COMPLETED",
        StepStatus::Failed => "FAILED",
        StepStatus::Skipped => "SKIPPED",
    }
}

/// The audit evidence of a result: a JSON object whose keys serialise in
/// sorted order, with RFC 3339 UTC timestamps, so the same result always
/// gives the same bytes.
///
/// ```
/// use job_executor::{create_default_executor, execution_result_to_evidence, JobStep};
/// let executor = create_default_executor();
/// let steps = [JobStep::new(0, "capability_enable", "billing")];
/// let result = executor
///     .execute_job(uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), &steps, None, "ops")
///     .unwrap();
/// let evidence = execution_result_to_evidence(&result);
/// assert_eq!(evidence["final_status"], "COMPLETED");
/// assert_eq!(evidence["execution_summary"]["steps_succeeded"], 1);
/// ```
pub fn execution_result_to_evidence(result: &ExecutionResult) -> Value {
    let step_results: Vec<Value> = result
        .step_results
        .iter()
        .map(|step| {
            json!({
                "step_index": step.step_index,
                "status": status_name(step.status),
                "started_at": format_timestamp(&step.started_at),
                "completed_at": format_timestamp(&step.completed_at),
                "output": step.output,
                "error": step.error,
                "failure_kind": step.failure_kind.map(FailureKind::as_str),
                "health_after": step.health_after,
            })
        })
        .collect();
    let mut event_log = json!({
        "events": result.events,
        "head": result.head.to_string(),
    });
    if let Some(mac) = result.head_mac {
        event_log["head_mac"] = json!(mac.to_string());
    }
    let duration = result.completed_at - result.started_at;
    let duration_seconds = duration.num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6;
    let mut evidence = json!({
        "job_id": result.job_id.to_string(),
        "contract_id": result.contract_id.to_string(),
        "executed_by": result.executed_by,
        "executor_version": result.executor_version,
        "final_status": result.final_status.as_str(),
        "final_reason": result.final_reason,
        "execution_summary": {
            "steps_planned": result.steps_planned,
            "steps_executed": result.steps_executed,
            "steps_succeeded": result.steps_succeeded,
            "steps_failed": result.steps_failed,
        },
        "step_results": step_results,
        "health_observations": {
            "before": result.health_before,
            "after": result.health_after,
        },
        "event_log": event_log,
        "timing": {
            "started_at": format_timestamp(&result.started_at),
            "completed_at": format_timestamp(&result.completed_at),
            "duration_seconds": duration_seconds,
        },
    });
    attribute(&mut evidence, result);
    evidence
}

/// Adds to the evidence of a job run by workers who ran it: `claims` (each
/// worker's claim, in order) and, on each step, the claims under which its
/// start and its outcome were appended (`started_by`, `recorded_by`). The
/// evidence of a job run without a worker is left as it is.
fn attribute(evidence: &mut Value, result: &ExecutionResult) {
    if result.claims.is_empty() {
        return;
    }
    let by = |claim: &Option<ClaimRef>| {
        claim.as_ref().map_or(
            Value::Null,
            |c| json!({"worker_id": c.worker_id, "epoch": c.epoch}),
        )
    };
    if let Some(steps) = evidence["step_results"].as_array_mut() {
        for (json, step) in steps.iter_mut().zip(&result.step_results) {
            json["started_by"] = by(&step.started_by);
            json["recorded_by"] = by(&step.recorded_by);
        }
    }
    evidence["claims"] = result
        .claims
        .iter()
        .map(|c| {
            json!({
                "worker_id": c.worker_id,
                "host": c.host,
                "epoch": c.epoch,
                "taken_over_from": c.taken_over_from,
                "recorded_outcome": c.recorded_outcome,
                "claimed_at": format_timestamp(&c.claimed_at),
            })
        })
        .collect();
}
