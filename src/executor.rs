//! The executor: drives a job through the state machine, calling handlers and
//! appending each accepted event to the log.
//!
//! The loop is: ask the machine what comes next ([`next_action`]), build that
//! event, have the machine judge it, append it, and only then act on it. So a
//! `StepStarted` is durable before its handler is called, and nothing the
//! machine refuses ever reaches the log.
//!
//! Appends use optimistic concurrency. When another process appended to the
//! job first, the executor reads what it appended: a cancel request is folded
//! in and honoured before the next step; anything else means another
//! executor is running the job, and this one stops.

use std::borrow::Cow;
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::chain::HeadKey;
use crate::clock::{Clock, SystemClock};
use crate::events::{
    Event, EventRecord, Failure, JobCancelRequested, JobCancelled, JobCompleted, JobHalted,
    JobResumed, JobStarted, StepFailed, StepStarted, StepSucceeded, truncate_to_micros,
};
use crate::handler::{DEFAULT_STEP_TYPES, HealthObserver, NoOpHandler, StepHandler};
use crate::machine::{self, NextAction, Phase, TransitionError, next_action};
use crate::model::{
    CancelSignal, ExecutionContext, FailureKind, JobStep, PlanError, validate_plan,
};
use crate::projection::{self, Projector, ReplayError};
use crate::result::ExecutionResult;
use crate::runner::{Dispatch, HandlerPool, Outcome, panic_message};
use crate::store::{EventStore, MemoryStore, StoreError};

/// Version of this executor, recorded in every `JobStarted`.
pub const EXECUTOR_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How often a conflicting append is retried after catching up with the log.
const CONFLICT_RETRIES_MAX: usize = 16;

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
    /// A stored job cannot be replayed.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The health observer panicked. Before the job's first step (or a
    /// resumed job's next one), nothing was appended. After a step, the
    /// step's outcome was recorded without health and the job stopped
    /// before its next step: `resume` goes on (`recover` first, to halt it,
    /// if the step failed).
    #[error(
        "job {job_id}: the health observer panicked ({message}); any step outcome is recorded, and the job stopped before its next step"
    )]
    HealthObserver {
        /// The job.
        job_id: Uuid,
        /// The panic's message.
        message: String,
    },
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
}

/// What `request_cancel` did.
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
}

/// Runs job plans step by step, recording every fact in an event log.
///
/// One executor can be shared by threads running different jobs: it is
/// `Send + Sync`, and `execute_job` takes `&self`.
///
/// ```
/// use job_executor::{JobExecutor, JobStatus, JobStep, NoOpHandler};
/// use uuid::Uuid;
///
/// let mut executor = JobExecutor::new();
/// executor.register_handler("capability_enable", NoOpHandler);
/// let steps = vec![JobStep::new(0, "capability_enable", "billing")];
/// let result = executor
///     .execute_job(Uuid::new_v4(), Uuid::new_v4(), &steps, None, "ops@example.com")
///     .unwrap();
/// assert_eq!(result.final_status, JobStatus::Completed);
/// assert_eq!(result.final_reason, "All steps completed successfully");
/// ```
pub struct JobExecutor {
    handlers: HashMap<String, Arc<dyn StepHandler>>,
    store: Arc<dyn EventStore>,
    clock: Arc<dyn Clock>,
    head_key: Option<HeadKey>,
    pool: HandlerPool,
    version: String,
}

impl std::fmt::Debug for JobExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut types: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        types.sort_unstable();
        f.debug_struct("JobExecutor")
            .field("handlers", &types)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

impl Default for JobExecutor {
    fn default() -> Self {
        JobExecutor::new()
    }
}

/// Builds a [`JobExecutor`] with a chosen store and clock.
///
/// ```
/// use std::sync::Arc;
/// use job_executor::{JobExecutor, clock::LogicalClock, store::SqliteStore};
///
/// let executor = JobExecutor::builder()
///     .store(Arc::new(SqliteStore::open_in_memory().unwrap()))
///     .clock(Arc::new(LogicalClock::default()))
///     .build();
/// ```
pub struct ExecutorBuilder {
    store: Option<Arc<dyn EventStore>>,
    clock: Option<Arc<dyn Clock>>,
    head_key: Option<HeadKey>,
    version: Option<String>,
}

impl ExecutorBuilder {
    /// The event log (default: a new [`MemoryStore`]).
    pub fn store(mut self, store: Arc<dyn EventStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The clock events are stamped with (default: [`SystemClock`]).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// A key that authenticates every event's chain digest with HMAC-SHA256,
    /// so that whoever lacks it cannot forge a log that verifies under it.
    pub fn head_key(mut self, key: HeadKey) -> Self {
        self.head_key = Some(key);
        self
    }

    /// The version this executor records in every `JobStarted` and
    /// `JobResumed` (default: [`EXECUTOR_VERSION`]). An embedding that
    /// ships the engine under its own release number records that one, as
    /// the original module's `executor_version` argument did.
    ///
    /// ```
    /// let executor = job_executor::JobExecutor::builder().executor_version("2.4.1").build();
    /// assert_eq!(executor.version(), "2.4.1");
    /// ```
    pub fn executor_version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// The executor, with no handlers registered.
    pub fn build(self) -> JobExecutor {
        JobExecutor {
            handlers: HashMap::new(),
            store: self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            head_key: self.head_key,
            pool: HandlerPool::new(),
            version: self.version.unwrap_or_else(|| EXECUTOR_VERSION.to_owned()),
        }
    }
}

impl JobExecutor {
    /// An executor with an in-memory event log, the system clock and no handlers.
    pub fn new() -> Self {
        JobExecutor::builder().build()
    }

    /// A builder to choose the store and the clock.
    pub fn builder() -> ExecutorBuilder {
        ExecutorBuilder {
            store: None,
            clock: None,
            head_key: None,
            version: None,
        }
    }

    /// The executor version recorded in `JobStarted`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The event log this executor appends to.
    pub fn store(&self) -> &dyn EventStore {
        self.store.as_ref()
    }

    /// The key this executor authenticates every event's digest with, if
    /// it was given one: what a check of the logs it wrote must use.
    pub fn head_key(&self) -> Option<&HeadKey> {
        self.head_key.as_ref()
    }

    /// Registers `handler` for `step_type`, replacing any earlier one.
    pub fn register_handler(
        &mut self,
        step_type: impl Into<String>,
        handler: impl StepHandler + 'static,
    ) {
        self.handlers.insert(step_type.into(), Arc::new(handler));
    }

    /// Rebuilds a stored job's result from the log.
    ///
    /// # Errors
    /// [`ExecutorError::Replay`] for an unknown job, an unreadable log or a
    /// log that breaks an invariant.
    pub fn replay(&self, job_id: Uuid) -> Result<ExecutionResult, ExecutorError> {
        Ok(projection::replay(self.store.as_ref(), job_id)?)
    }

    /// Executes `steps` in order as job `job_id`, stopping at the first failure.
    ///
    /// Health is observed once before the first step and once after every
    /// executed step. Every fact is appended to the log before the executor
    /// acts on it; the returned result is the projection of those events.
    /// Each handler runs on a pooled thread against its step's deadline.
    ///
    /// # Errors
    /// [`ExecutorError::JobAlreadyExists`] when the job id has events (also
    /// when another process starts it at the same moment) and
    /// [`ExecutorError::InvalidPlan`] for a plan that is not executable (in
    /// both cases nothing is appended and no handler runs);
    /// [`ExecutorError::Store`] when the log fails mid-way;
    /// [`ExecutorError::Conflict`] when another executor appends to the job.
    pub fn execute_job(
        &self,
        job_id: Uuid,
        contract_id: Uuid,
        steps: &[JobStep],
        health_observer: Option<&dyn HealthObserver>,
        executed_by: &str,
    ) -> Result<ExecutionResult, ExecutorError> {
        validate_plan(steps).map_err(|source| ExecutorError::InvalidPlan { job_id, source })?;
        let stored = self
            .store
            .last_seq(job_id)
            .map_err(|source| ExecutorError::Store { job_id, source })?;
        if stored > 0 {
            return Err(ExecutorError::JobAlreadyExists {
                job_id,
                events: stored,
            });
        }
        let mut run = Run {
            executor: self,
            job_id,
            projector: Projector::new(job_id),
            plan: Cow::Borrowed(steps),
            contract_id,
            executed_by: executed_by.to_owned(),
            observer: health_observer,
        };
        let started = Event::JobStarted(JobStarted {
            contract_id,
            plan: steps.to_vec(),
            executed_by: executed_by.to_owned(),
            executor_version: self.version.clone(),
            health_before: run.observe()?,
        });
        match run.drive(vec![started]) {
            Ok(result) => Ok(result),
            // Another process started the same job id at the same moment.
            Err(ExecutorError::Conflict { seq: 1, .. }) => Err(ExecutorError::JobAlreadyExists {
                job_id,
                events: self.store.last_seq(job_id).unwrap_or(1),
            }),
            Err(e) => Err(e),
        }
    }

    /// Continues a job that stopped between steps (no step in doubt) at its
    /// next step, with the plan recorded in its log. Appends `JobResumed`,
    /// observes health before the next step, then runs as `execute_job` does.
    ///
    /// # Errors
    /// [`ExecutorError::UnknownJob`]; [`ExecutorError::JobEnded`] for a
    /// finished job; [`ExecutorError::StepInDoubt`] when a step's outcome is
    /// unknown (run [`JobExecutor::recover`] first) or a failed step awaits
    /// its halt; store failures and conflicts as for `execute_job`.
    pub fn resume(
        &self,
        job_id: Uuid,
        health_observer: Option<&dyn HealthObserver>,
        executed_by: &str,
    ) -> Result<ExecutionResult, ExecutorError> {
        let mut run = self.stored_run(job_id, Some(executed_by), health_observer)?;
        let state = run.projector.state();
        match state.phase {
            Phase::Idle => {}
            Phase::StepRunning { step_index } | Phase::StepFailed { step_index } => {
                return Err(ExecutorError::StepInDoubt { job_id, step_index });
            }
            _ => {
                return Err(ExecutorError::JobEnded {
                    job_id,
                    status: state.status(),
                });
            }
        }
        let resumed = Event::JobResumed(JobResumed {
            executed_by: executed_by.to_owned(),
            executor_version: self.version.clone(),
            health_before: run.observe()?,
        });
        run.drive(vec![resumed])
    }

    /// Closes every job left in doubt by an executor that stopped (crashed,
    /// was killed, lost its disk): a step whose outcome is unknown is recorded
    /// as failed (kind `interrupted`) and its job halted — it is never run
    /// again; a failed step's job is halted; a job stopped between steps with
    /// a cancel request is cancelled. Jobs stopped between steps otherwise are
    /// left to `resume`. Calls no handler.
    ///
    /// Run it when no executor is running jobs on this log: a step still
    /// running elsewhere would be declared interrupted (that executor then
    /// stops on a conflict instead of recording its outcome).
    ///
    /// # Errors
    /// Store failures; [`ExecutorError::Replay`] for a job whose log does
    /// not replay.
    pub fn recover(&self) -> Result<Vec<Recovery>, ExecutorError> {
        let unfinished = self
            .store
            .unfinished_jobs()
            .map_err(|source| ExecutorError::Store {
                job_id: Uuid::nil(),
                source,
            })?;
        let mut recovered = Vec::new();
        for job_id in unfinished {
            let mut run = self.stored_run(job_id, None, None)?;
            let state = run.projector.state();
            let action = match state.phase {
                Phase::StepRunning { step_index } => {
                    run.drive(vec![Event::StepFailed(StepFailed {
                        step_index,
                        failure: Failure {
                            kind: FailureKind::Interrupted,
                            message: format!(
                                "outcome unknown: the executor stopped while step {step_index} ran; it is not run again"
                            ),
                        },
                        output: None,
                        health_after: None,
                    })])?;
                    Recovery::Interrupted { job_id, step_index }
                }
                Phase::StepFailed { step_index } => {
                    run.drive(Vec::new())?;
                    Recovery::Halted { job_id, step_index }
                }
                Phase::Idle if next_action(&state) == NextAction::Cancel => {
                    run.drive(Vec::new())?;
                    Recovery::Cancelled { job_id }
                }
                _ => Recovery::Resumable {
                    job_id,
                    next_step: state.next_step,
                },
            };
            recovered.push(action);
        }
        Ok(recovered)
    }

    /// Records a request to cancel `job_id`. An executor running the job
    /// honours it before it would start the next step (the step in flight
    /// finishes and is recorded) and ends the job `JobCancelled`. Safe to
    /// call from any process at any time.
    ///
    /// # Errors
    /// [`ExecutorError::UnknownJob`]; [`ExecutorError::JobEnded`] when the
    /// job has already ended; store failures.
    pub fn request_cancel(
        &self,
        job_id: Uuid,
        reason: &str,
    ) -> Result<CancelRequest, ExecutorError> {
        for _ in 0..CONFLICT_RETRIES_MAX {
            let mut run = self.stored_run(job_id, None, None)?;
            let state = run.projector.state();
            if state.is_terminal() {
                return Err(ExecutorError::JobEnded {
                    job_id,
                    status: state.status(),
                });
            }
            if state.cancel_requested {
                return Ok(CancelRequest::AlreadyRequested);
            }
            let event = Event::JobCancelRequested(JobCancelRequested {
                reason: reason.to_owned(),
            });
            match run.append_now(std::slice::from_ref(&event)) {
                Ok(_) => {
                    return Ok(CancelRequest::Recorded {
                        seq: run.projector.events(),
                    });
                }
                // The job moved on meanwhile: look again.
                Err(ExecutorError::Store { source, .. }) if source.is_conflict() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ExecutorError::Conflict {
            job_id,
            seq: 0,
            kind: "events, too busy to record a cancel request".into(),
        })
    }

    /// A run of a stored job, folded from its log, with the plan and
    /// contract of its `JobStarted`; `executed_by` defaults to who started it.
    fn stored_run<'a>(
        &'a self,
        job_id: Uuid,
        executed_by: Option<&str>,
        observer: Option<&'a dyn HealthObserver>,
    ) -> Result<Run<'a>, ExecutorError> {
        let records = self
            .store
            .load_job(job_id)
            .map_err(|source| ExecutorError::Store { job_id, source })?;
        let mut projector = Projector::new(job_id);
        for record in &records {
            projector.apply_record(record)?;
        }
        let started = match records.first().map(EventRecord::decode) {
            Some(Ok(recorded)) => match recorded.event {
                Event::JobStarted(started) => started,
                // apply_record has checked that the log begins with JobStarted.
                _ => unreachable!("a replayed log begins with JobStarted"),
            },
            _ => return Err(ExecutorError::UnknownJob { job_id }),
        };
        Ok(Run {
            executor: self,
            job_id,
            projector,
            plan: Cow::Owned(started.plan),
            contract_id: started.contract_id,
            executed_by: executed_by.map_or(started.executed_by, str::to_owned),
            observer,
        })
    }
}

/// A step whose start was just recorded; its handler, if it has one, has
/// been handed to a worker.
struct Started {
    step_index: u32,
    dispatch: Option<Dispatch>,
}

/// One job's run: the events recorded so far, folded, and what it needs to
/// go on.
struct Run<'a> {
    executor: &'a JobExecutor,
    job_id: Uuid,
    projector: Projector,
    plan: Cow<'a, [JobStep]>,
    contract_id: Uuid,
    executed_by: String,
    observer: Option<&'a dyn HealthObserver>,
}

impl Run<'_> {
    /// Observes health, if there is an observer. An observer that panics
    /// is reported as [`ExecutorError::HealthObserver`].
    fn observe(&self) -> Result<Option<Value>, ExecutorError> {
        let Some(observer) = self.observer else {
            return Ok(None);
        };
        // The observer only gets `&self`: a panic cannot leave anything of
        // the executor half-changed.
        catch_unwind(AssertUnwindSafe(|| observer.observe_health()))
            .map(Some)
            .map_err(|payload| ExecutorError::HealthObserver {
                job_id: self.job_id,
                message: panic_message(payload.as_ref()),
            })
    }

    /// Drives the job until the machine says it is done, starting with
    /// `first` (events the caller has decided, such as `JobStarted`).
    ///
    /// Each append carries what the machine decides up to the next point
    /// where something outside must happen: a step's outcome goes in one
    /// commit with the next step's start (or the job's end), and a handler
    /// runs only once its `StepStarted` is committed. So every step costs
    /// one commit, and nothing about at-most-once changes.
    fn drive(&mut self, first: Vec<Event>) -> Result<ExecutionResult, ExecutorError> {
        let _running = self.executor.pool.job();
        let mut batch = first;
        loop {
            self.decide_more(&mut batch);
            if batch.is_empty() {
                break;
            }
            let started = self.record(&batch)?;
            batch.clear();
            if let Some(started) = started {
                let (outcome, observed) = self.outcome(started);
                if let Err(e) = observed {
                    // The step's outcome is a fact: record it (without
                    // health), then stop before the next step.
                    self.record(std::slice::from_ref(&outcome))?;
                    return Err(e);
                }
                batch.push(outcome);
            }
        }
        Ok(self
            .projector
            .result()
            .expect("a job that ran has a JobStarted event"))
    }

    /// Appends to `batch` what the machine decides after it, up to the next
    /// step's start or the job's end.
    fn decide_more(&self, batch: &mut Vec<Event>) {
        let mut state = self.projector.state();
        for event in batch.iter() {
            match machine::apply(state, event) {
                Ok(next) => state = next,
                // `record` reports the refusal.
                Err(_) => return,
            }
        }
        let next = match next_action(&state) {
            NextAction::StartStep(step_index) => Event::StepStarted(StepStarted { step_index }),
            NextAction::Complete => Event::JobCompleted(JobCompleted {}),
            NextAction::Halt(step_index) => Event::JobHalted(JobHalted { step_index }),
            NextAction::Cancel => Event::JobCancelled(JobCancelled {
                reason: self.projector.cancel_request_reason().unwrap_or_default(),
            }),
            NextAction::StartJob | NextAction::RecordOutcome(_) | NextAction::Done => return,
        };
        batch.push(next);
    }

    /// Prepares the handler of a step about to start at `started_at`: the
    /// hook that hands it to a worker once its start is committed, and what
    /// to wait on. `None` when no handler is registered for its type.
    fn prepare_step(
        &self,
        step_index: u32,
        started_at: DateTime<Utc>,
    ) -> Option<(Box<dyn FnOnce() + Send>, Dispatch)> {
        let step = &self.plan[step_index as usize];
        let handler = self.executor.handlers.get(&step.step_type)?;
        let context = ExecutionContext {
            job_id: self.job_id,
            contract_id: self.contract_id,
            step_index,
            step_type: step.step_type.clone(),
            target: step.target.clone(),
            executed_by: self.executed_by.clone(),
            started_at,
            // Set when the step is handed over.
            deadline: None,
            cancel: CancelSignal::new(),
        };
        Some(self.executor.pool.prepare(handler.clone(), step, context))
    }

    /// Waits for a started step's outcome (its handler runs off-thread
    /// against its deadline) and returns its outcome event, with health
    /// observed after it — or without, and why, when the observer panicked.
    fn outcome(&self, started: Started) -> (Event, Result<(), ExecutorError>) {
        let outcome = match started.dispatch {
            Some(dispatch) => self.executor.pool.wait(dispatch),
            None => Outcome::Failed {
                failure: FailureKind::NoHandler,
                error: format!(
                    "No handler registered for step type: {}",
                    self.plan[started.step_index as usize].step_type
                ),
                output: None,
            },
        };
        let (health_after, observed) = match self.observe() {
            Ok(health) => (health, Ok(())),
            Err(e) => (None, Err(e)),
        };
        (
            outcome_event(outcome, started.step_index, health_after),
            observed,
        )
    }

    /// Judges, appends (in one commit) and folds `events`. On a conflict,
    /// catches up with what others appended (a cancel request) and tries
    /// again with what the machine still accepts: all of `events`, or the
    /// prefix that a caught-up cancel request left valid. Returns the step
    /// started, when the events recorded end with a `StepStarted`.
    fn record(&mut self, events: &[Event]) -> Result<Option<Started>, ExecutorError> {
        let mut caught_up = false;
        for _ in 0..CONFLICT_RETRIES_MAX {
            let mut state = self.projector.state();
            let mut accepted = 0;
            for event in events {
                match machine::apply(state, event) {
                    Ok(next) => {
                        state = next;
                        accepted += 1;
                    }
                    Err(_) if caught_up => break,
                    Err(source) => {
                        return Err(ExecutorError::Transition {
                            job_id: self.job_id,
                            kind: event.kind(),
                            source,
                        });
                    }
                }
            }
            match self.append_now(&events[..accepted]) {
                Ok(started) => return Ok(started),
                Err(ExecutorError::Store { source, .. }) if source.is_conflict() => {
                    self.catch_up()?;
                    caught_up = true;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ExecutorError::Conflict {
            job_id: self.job_id,
            seq: self.projector.events() + 1,
            kind: "events, faster than this executor could append".into(),
        })
    }

    /// Appends `events` (which the machine has accepted) in one commit and
    /// folds them. When they end with a `StepStarted`, its handler is handed
    /// to a worker as soon as they are committed; returns that step.
    fn append_now(&mut self, events: &[Event]) -> Result<Option<Started>, ExecutorError> {
        if events.is_empty() {
            return Ok(None);
        }
        let job_id = self.job_id;
        let first_seq = self.projector.events() + 1;
        let mut records = Vec::with_capacity(events.len());
        let mut last_at = None;
        for (offset, event) in events.iter().enumerate() {
            let recorded_at = truncate_to_micros(self.executor.clock.now());
            last_at = Some(recorded_at);
            records.push(EventRecord::encode(
                job_id,
                first_seq + offset as u64,
                recorded_at,
                event,
            ));
        }
        self.projector
            .seal(&mut records, self.executor.head_key.as_ref());
        let started = match (events.last(), last_at) {
            (Some(Event::StepStarted(s)), Some(at)) => Some((s.step_index, at)),
            _ => None,
        };
        let (hook, started) = match started {
            Some((step_index, at)) => {
                let (hook, dispatch) = self.prepare_step(step_index, at).unzip();
                (
                    hook,
                    Some(Started {
                        step_index,
                        dispatch,
                    }),
                )
            }
            None => (None, None),
        };
        let store = &self.executor.store;
        match hook {
            Some(hook) => store.append_then(&records, hook),
            None => store.append(&records),
        }
        .map_err(|source| ExecutorError::Store { job_id, source })?;
        for (record, event) in records.iter().zip(events) {
            self.projector
                .apply_sealed(record, event)
                .map_err(|source| ExecutorError::Transition {
                    job_id,
                    kind: event.kind(),
                    source,
                })?;
        }
        Ok(started)
    }

    /// Folds in what others appended to the job since this run last looked.
    /// Only a cancel request may come from elsewhere.
    fn catch_up(&mut self) -> Result<(), ExecutorError> {
        let job_id = self.job_id;
        let records = self
            .executor
            .store
            .load_job(job_id)
            .map_err(|source| ExecutorError::Store { job_id, source })?;
        for record in records.iter().skip(self.projector.events() as usize) {
            if record.kind != "JobCancelRequested" {
                return Err(ExecutorError::Conflict {
                    job_id,
                    seq: record.seq,
                    kind: record.kind.clone(),
                });
            }
            self.projector.apply_record(record)?;
        }
        Ok(())
    }
}

fn outcome_event(outcome: Outcome, step_index: u32, health_after: Option<Value>) -> Event {
    match outcome {
        Outcome::Succeeded(output) => Event::StepSucceeded(StepSucceeded {
            step_index,
            output,
            health_after,
        }),
        Outcome::Failed {
            failure,
            error,
            output,
        } => Event::StepFailed(StepFailed {
            step_index,
            failure: Failure {
                kind: failure,
                message: error,
            },
            output,
            health_after,
        }),
    }
}

/// An executor with the no-op handler registered for the default step types
/// (`capability_enable`, `capability_disable`, `capability_add`,
/// `capability_remove`, `configuration_change`, `unknown`).
pub fn create_default_executor() -> JobExecutor {
    let mut executor = JobExecutor::new();
    register_defaults(&mut executor);
    executor
}

/// Registers the no-op handler for every default step type.
pub fn register_defaults(executor: &mut JobExecutor) {
    for step_type in DEFAULT_STEP_TYPES {
        executor.register_handler(step_type, NoOpHandler);
    }
}
