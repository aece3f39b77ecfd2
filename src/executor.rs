//! The executor: drives a job through the state machine, calling handlers and
//! appending each accepted event to the log.
//!
//! The loop is: ask the machine what comes next ([`next_action`]), build that
//! event, pass it through the machine (via the [`Projector`]), append it, and
//! only then act on it. So a `StepStarted` is durable before its handler is
//! called, and nothing the machine refuses ever reaches the log.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use serde_json::Value;
use uuid::Uuid;

use crate::chain::HeadKey;
use crate::clock::{Clock, SystemClock};
use crate::events::{
    Event, EventRecord, Failure, FailureKind, JobCompleted, JobHalted, JobStarted, StepFailed,
    StepStarted, StepSucceeded, truncate_to_micros,
};
use crate::handler::{DEFAULT_STEP_TYPES, HealthObserver, NoOpHandler, StepHandler};
use crate::machine::{NextAction, TransitionError, next_action};
use crate::model::{ExecutionContext, ExecutionResult, JobStep, PlanError, validate_plan};
use crate::projection::{self, Projector, ReplayError};
use crate::store::{EventStore, MemoryStore, StoreError};

/// Version of this executor, recorded in every `JobStarted`.
pub const EXECUTOR_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Why `execute_job` did not run a job to its end.
#[derive(Debug, thiserror::Error)]
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
    /// The event log failed; the events appended before the failure stay in
    /// the log, and the job is left as they describe it.
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

    /// The executor, with no handlers registered.
    pub fn build(self) -> JobExecutor {
        JobExecutor {
            handlers: HashMap::new(),
            store: self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            head_key: self.head_key,
            version: EXECUTOR_VERSION.to_owned(),
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
    ///
    /// # Errors
    /// [`ExecutorError::JobAlreadyExists`] when the job id has events and
    /// [`ExecutorError::InvalidPlan`] for a plan that is not executable (in
    /// both cases nothing is appended and no handler runs);
    /// [`ExecutorError::Store`] when the log fails mid-way.
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
        };
        let observe = || health_observer.map(HealthObserver::observe_health);
        loop {
            match next_action(&run.projector.state()) {
                NextAction::StartJob => {
                    let health_before = observe();
                    run.record(Event::JobStarted(JobStarted {
                        contract_id,
                        plan: steps.to_vec(),
                        executed_by: executed_by.to_owned(),
                        executor_version: self.version.clone(),
                        health_before,
                    }))?;
                }
                NextAction::StartStep(step_index) => {
                    let started_at = run.record(Event::StepStarted(StepStarted { step_index }))?;
                    let step = &steps[step_index as usize];
                    let context = ExecutionContext {
                        job_id,
                        contract_id,
                        step_index,
                        step_type: step.step_type.clone(),
                        target: step.target.clone(),
                        executed_by: executed_by.to_owned(),
                        started_at,
                    };
                    let outcome = self.run_step(step, &context);
                    let health_after = observe();
                    run.record(outcome.into_event(step_index, health_after))?;
                }
                NextAction::RecordOutcome(step_index) => {
                    // Outcomes are recorded in the same iteration as their
                    // start; reaching here means the loop lost its place.
                    unreachable!("step {step_index} started without an outcome being recorded");
                }
                NextAction::Complete => {
                    run.record(Event::JobCompleted(JobCompleted {}))?;
                }
                NextAction::Halt(step_index) => {
                    run.record(Event::JobHalted(JobHalted { step_index }))?;
                }
                NextAction::Done => break,
            }
        }
        Ok(run
            .projector
            .result()
            .expect("a job that ran has a JobStarted event"))
    }

    /// Calls the step's handler, turning a missing handler or a panic into a failure.
    fn run_step(&self, step: &JobStep, context: &ExecutionContext) -> Outcome {
        let Some(handler) = self.handlers.get(&step.step_type) else {
            return Outcome::Failed {
                failure: FailureKind::NoHandler,
                error: format!("No handler registered for step type: {}", step.step_type),
                output: None,
            };
        };
        // The handler only ever sees shared references, so a panic cannot
        // leave executor state half-changed: asserting unwind safety is sound.
        match catch_unwind(AssertUnwindSafe(|| handler.execute(step, context))) {
            Ok(out) if out.success => Outcome::Succeeded(out.output),
            Ok(out) => Outcome::Failed {
                failure: FailureKind::HandlerFailed,
                error: out.error.unwrap_or_else(|| "Step failed".to_owned()),
                output: Some(out.output),
            },
            Err(payload) => Outcome::Failed {
                failure: FailureKind::Panic,
                error: format!("Execution error: {}", panic_message(payload.as_ref())),
                output: None,
            },
        }
    }
}

/// One job's run: the events recorded so far, folded.
struct Run<'a> {
    executor: &'a JobExecutor,
    job_id: Uuid,
    projector: Projector,
}

impl Run<'_> {
    /// Passes `event` through the machine, appends it, and returns its time.
    fn record(&mut self, event: Event) -> Result<chrono::DateTime<chrono::Utc>, ExecutorError> {
        let job_id = self.job_id;
        let recorded_at = truncate_to_micros(self.executor.clock.now());
        let seq = self.projector.events() + 1;
        let refused = |source| ExecutorError::Transition {
            job_id,
            kind: event.kind(),
            source,
        };
        // Judge first, append second: the log only ever receives events the
        // machine accepted. The state is `Copy`, so judging changes nothing.
        crate::machine::apply(self.projector.state(), &event).map_err(refused)?;
        let mut record = EventRecord::encode(job_id, seq, recorded_at, &event);
        self.projector
            .seal(&mut record, self.executor.head_key.as_ref());
        self.executor
            .store
            .append(std::slice::from_ref(&record))
            .map_err(|source| ExecutorError::Store { job_id, source })?;
        self.projector
            .apply_sealed(&record, &event)
            .map_err(refused)?;
        Ok(recorded_at)
    }
}

/// What running a step's handler came to.
enum Outcome {
    Succeeded(Value),
    Failed {
        failure: FailureKind,
        error: String,
        output: Option<Value>,
    },
}

impl Outcome {
    fn into_event(self, step_index: u32, health_after: Option<Value>) -> Event {
        match self {
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
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "handler panicked".to_owned()
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
