//! The executor: runs a job through the state machine, calling handlers and
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
//!
//! [`next_action`]: crate::machine::next_action

mod append;
mod config;
mod drive;
mod error;
mod run;
mod stored;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use uuid::Uuid;

pub use append::APPEND_RETRIES_MAX;
pub use config::{ExecutorBuilder, ExecutorConfig, HEALTH_TIMEOUT_DEFAULT, LogLocation};
pub use drive::{DriveJob, Drivers};
pub use error::{CancelRequest, ExecutorError, Recovery, UnrecordedOutcome};
pub use run::RunControl;

use crate::chain::HeadKey;
use crate::clock::Clock;
use crate::handler::{DEFAULT_STEP_TYPES, HealthObserver, NoOpHandler, StepHandler};
use crate::metrics::Metrics;
use crate::model::{JobStep, validate_plan};
use crate::projection;
use crate::result::ExecutionResult;
use crate::runner::HandlerPool;
use crate::store::{EventStore, QueuedJob};
use crate::watchdog::Watchdog;
use run::Run;

/// Version of this executor, recorded in every `JobStarted`.
pub const EXECUTOR_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs job plans step by step, recording every fact in an event log.
///
/// One executor can be shared by threads running different jobs: it is
/// `Send + Sync`, and `execute_job` takes `&self`. A clone is another handle
/// on the same executor: the same handlers, store, clock and threads.
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
#[derive(Clone)]
pub struct JobExecutor {
    engine: Arc<Engine>,
}

/// What an executor runs jobs with, shared with the threads that drive
/// them.
struct Engine {
    handlers: RwLock<HashMap<String, Arc<dyn StepHandler>>>,
    store: Arc<dyn EventStore>,
    clock: Arc<dyn Clock>,
    head_key: Option<Arc<HeadKey>>,
    pool: HandlerPool,
    /// Threads that drive whole jobs (calling their handlers themselves).
    drivers: Arc<dyn Drivers>,
    health_timeout: Duration,
    watchdog: Watchdog,
    /// Step outcomes known but not recorded, for `recover`.
    unrecorded: Mutex<HashMap<(Uuid, u32), UnrecordedOutcome>>,
    version: String,
    /// Where jobs, steps and appends are counted, if anywhere.
    metrics: Option<Arc<Metrics>>,
}

impl Engine {
    /// Starts `job` as `execute_job` does, under `control`.
    fn start(
        &self,
        job: &QueuedJob,
        health_observer: Option<&dyn HealthObserver>,
        control: RunControl<'_>,
    ) -> Result<ExecutionResult, ExecutorError> {
        let job_id = job.job_id;
        validate_plan(&job.steps)
            .map_err(|source| ExecutorError::InvalidPlan { job_id, source })?;
        // A job id already in the log is refused by its first append (the
        // log's (job, seq) check; nothing is recorded and no handler runs),
        // which saves a read per job. With an observer, the log is asked
        // first, so that a refused job costs no health observation.
        if health_observer.is_some() {
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
        }
        let mut run = Run::fresh(self, job)
            .observed_by(health_observer)
            .under(control);
        let started = run.job_started(run.observe_before()?);
        run.start(vec![started])
    }

    /// The handler registered for `step_type`.
    fn handler(&self, step_type: &str) -> Option<Arc<dyn StepHandler>> {
        // Handlers are inserted whole: a poisoned map is consistent.
        self.handlers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(step_type)
            .cloned()
    }

    /// Remembers an outcome that could not be recorded, for `recover`.
    fn remember(&self, outcome: UnrecordedOutcome) {
        self.unrecorded()
            .insert((outcome.job_id, outcome.step_index), outcome);
    }

    fn unrecorded(&self) -> std::sync::MutexGuard<'_, HashMap<(Uuid, u32), UnrecordedOutcome>> {
        // Entries are inserted and removed whole: a poisoned map is consistent.
        self.unrecorded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for JobExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let handlers = self
            .engine
            .handlers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut types: Vec<&str> = handlers.keys().map(String::as_str).collect();
        types.sort_unstable();
        f.debug_struct("JobExecutor")
            .field("handlers", &types)
            .field("version", &self.engine.version)
            .finish_non_exhaustive()
    }
}

impl Default for JobExecutor {
    fn default() -> Self {
        JobExecutor::new()
    }
}

impl JobExecutor {
    /// An executor with an in-memory event log, the system clock and no handlers.
    pub fn new() -> Self {
        JobExecutor::builder().build()
    }

    /// A builder to choose the store and the clock.
    pub fn builder() -> ExecutorBuilder {
        ExecutorBuilder::new()
    }

    /// The executor version recorded in `JobStarted`.
    pub fn version(&self) -> &str {
        &self.engine.version
    }

    /// The event log this executor appends to.
    pub fn store(&self) -> &dyn EventStore {
        self.engine.store.as_ref()
    }

    /// The metrics this executor counts into, if it was given any.
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.engine.metrics.as_ref()
    }

    /// The key this executor authenticates every event's digest with, if
    /// it was given one: what a check of the logs it wrote must use.
    pub fn head_key(&self) -> Option<&HeadKey> {
        self.engine.head_key.as_deref()
    }

    /// Registers `handler` for `step_type`, replacing any earlier one.
    pub fn register_handler(
        &mut self,
        step_type: impl Into<String>,
        handler: impl StepHandler + 'static,
    ) {
        self.engine
            .handlers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(step_type.into(), Arc::new(handler));
    }

    /// Rebuilds a stored job's result from the log.
    ///
    /// # Errors
    /// [`ExecutorError::Replay`] for an unknown job, an unreadable log or a
    /// log that breaks an invariant.
    pub fn replay(&self, job_id: Uuid) -> Result<ExecutionResult, ExecutorError> {
        Ok(projection::replay(self.engine.store.as_ref(), job_id)?)
    }

    /// Executes `steps` in order as job `job_id`, stopping at the first failure.
    ///
    /// Health is observed once before the first step and once after every
    /// executed step. Every fact is appended to the log before the executor
    /// acts on it; the returned result is the projection of those events.
    /// Without a health observer the whole job is handed to a driver thread
    /// ([`Drivers`]), which calls each handler itself; with one, or when no
    /// driver takes the job, it runs on this thread, and each handler on a
    /// pooled thread against its step's deadline.
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
        let job = QueuedJob::new(job_id, contract_id, steps.to_vec(), executed_by);
        if health_observer.is_none()
            && let Some(result) = self.drive_elsewhere(&job)
        {
            return result;
        }
        self.engine
            .start(&job, health_observer, RunControl::default())
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
