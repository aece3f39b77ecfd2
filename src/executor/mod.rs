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

mod run;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use uuid::Uuid;

use crate::chain::HeadKey;
use crate::clock::{Clock, SystemClock};
use crate::events::{
    Event, EventRecord, Failure, JobCancelRequested, JobResumed, JobStarted, StepFailed,
};
use crate::handler::{DEFAULT_STEP_TYPES, HealthObserver, NoOpHandler, StepHandler};
use crate::machine::{NextAction, Phase, TransitionError, next_action};
use crate::model::{FailureKind, JobStep, PlanError, validate_plan};
use crate::projection::{self, Projector, ReplayError};
use crate::result::ExecutionResult;
use crate::runner::{HandlerPool, PoolOptions};
use crate::store::QueuedJob;
use crate::store::{EventStore, MemoryStore, StoreError};
use crate::watchdog::Watchdog;
pub use run::APPEND_RETRIES_MAX;
use run::Answer;
use run::Run;
pub(crate) use run::RunControl;

/// Version of this executor, recorded in every `JobStarted`.
pub const EXECUTOR_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How often a cancel request is tried again when the job moved on meanwhile.
const CANCEL_RETRIES_MAX: usize = 16;

/// How long a health observer has to answer, unless the builder says otherwise.
pub const HEALTH_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

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
        /// Why.
        message: String,
    },
    /// A step's outcome is known but could not be appended, even after
    /// [`APPEND_RETRIES_MAX`] tries. The outcome is in the error, and the
    /// executor keeps it: its `recover` records it (rather than declaring
    /// the step interrupted); another executor's `recover_with` can be given
    /// it.
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
    /// ([`ExecutorError::Store`] or [`ExecutorError::OutcomeNotRecorded`]).
    pub fn store_error(&self) -> Option<&StoreError> {
        match self {
            ExecutorError::Store { source, .. }
            | ExecutorError::OutcomeNotRecorded { source, .. } => Some(source),
            _ => None,
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
pub(crate) struct Engine {
    handlers: RwLock<HashMap<String, Arc<dyn StepHandler>>>,
    store: Arc<dyn EventStore>,
    clock: Arc<dyn Clock>,
    head_key: Option<HeadKey>,
    pool: HandlerPool,
    /// Threads that drive whole jobs (calling their handlers themselves):
    /// a pool of its own, so that drivers never take the threads that
    /// steps handed over need.
    drivers: HandlerPool,
    health_timeout: Duration,
    watchdog: Watchdog,
    /// Step outcomes known but not recorded, for `recover`.
    unrecorded: Mutex<HashMap<(Uuid, u32), UnrecordedOutcome>>,
    version: String,
}

impl Engine {
    /// Starts `job` as `execute_job` does, under `control`.
    pub(crate) fn start(
        &self,
        job: &QueuedJob,
        health_observer: Option<&dyn HealthObserver>,
        control: RunControl<'_>,
    ) -> Result<ExecutionResult, ExecutorError> {
        let (job_id, contract_id, steps, executed_by) = (
            job.job_id,
            job.contract_id,
            &job.steps[..],
            job.executed_by.as_str(),
        );
        validate_plan(steps).map_err(|source| ExecutorError::InvalidPlan { job_id, source })?;
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
        let mut run = Run {
            engine: self,
            job_id,
            projector: Projector::new(job_id),
            plan: Cow::Borrowed(steps),
            contract_id,
            executed_by: executed_by.to_owned(),
            observer: health_observer,
            control,
        };
        let started = Event::JobStarted(JobStarted {
            contract_id,
            plan: steps.to_vec(),
            executed_by: executed_by.to_owned(),
            executor_version: self.version.clone(),
            health_before: run.observe_before()?,
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

    /// Drives `job` on this thread, calling its handlers here, and returns
    /// the result for `answer` — which the watchdog answers itself if it
    /// ends the job at a step's deadline while this thread is still in the
    /// handler. A panic of the engine's own is returned as
    /// [`ExecutorError::Driver`].
    fn drive_here(
        &self,
        job: &QueuedJob,
        answer: &Answer,
    ) -> Result<ExecutionResult, ExecutorError> {
        let control = RunControl {
            answer: Some(answer.clone()),
            ..RunControl::default()
        };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.start(job, None, control)
        }))
        .unwrap_or_else(|payload| {
            Err(ExecutorError::Driver {
                job_id: job.job_id,
                message: crate::sync::panic_message(payload.as_ref()),
            })
        })
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
    pool: PoolOptions,
    health_timeout: Duration,
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

    /// How the handler threads are pooled: their cap, how long an idle one
    /// lives, and whether they poll (see [`PoolOptions`] for the defaults
    /// and what happens at the cap).
    pub fn handler_pool(mut self, options: PoolOptions) -> Self {
        self.pool = options;
        self
    }

    /// How long the health observer has to answer
    /// ([`HEALTH_TIMEOUT_DEFAULT`]). Past it after a step, the step's
    /// outcome is recorded without health, and the job stops before its
    /// next step with [`ExecutorError::HealthObserver`] (once the observer
    /// returns: it runs on the caller's thread, which nothing can interrupt).
    pub fn health_timeout(mut self, timeout: Duration) -> Self {
        self.health_timeout = timeout;
        self
    }

    /// The executor, with no handlers registered.
    pub fn build(self) -> JobExecutor {
        let engine = Engine {
            handlers: RwLock::new(HashMap::new()),
            store: self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            head_key: self.head_key,
            drivers: HandlerPool::new(self.pool.clone()),
            pool: HandlerPool::new(self.pool),
            health_timeout: self.health_timeout,
            watchdog: Watchdog::new(),
            unrecorded: Mutex::new(HashMap::new()),
            version: self.version.unwrap_or_else(|| EXECUTOR_VERSION.to_owned()),
        };
        JobExecutor {
            engine: Arc::new(engine),
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
            pool: PoolOptions::default(),
            health_timeout: HEALTH_TIMEOUT_DEFAULT,
        }
    }

    /// The executor version recorded in `JobStarted`.
    pub fn version(&self) -> &str {
        &self.engine.version
    }

    /// The event log this executor appends to.
    pub fn store(&self) -> &dyn EventStore {
        self.engine.store.as_ref()
    }

    /// The key this executor authenticates every event's digest with, if
    /// it was given one: what a check of the logs it wrote must use.
    pub fn head_key(&self) -> Option<&HeadKey> {
        self.engine.head_key.as_ref()
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
        let plan = QueuedJob::new(job_id, contract_id, steps.to_vec(), executed_by);
        if health_observer.is_none()
            && let Some(result) = self.start_driven(&plan)
        {
            return result;
        }
        self.start(&plan, health_observer, RunControl::default())
    }

    /// Starts `job` as `execute_job` does, under `control`.
    pub(crate) fn start(
        &self,
        job: &QueuedJob,
        health_observer: Option<&dyn HealthObserver>,
        control: RunControl<'_>,
    ) -> Result<ExecutionResult, ExecutorError> {
        self.engine.start(job, health_observer, control)
    }

    /// Runs a job as `execute_job` does, but on the calling thread, calling
    /// each step's handler right here (no hand-over per step), and gives
    /// the result to `answer` — called exactly once. At a step's deadline,
    /// if its handler has not returned, the watchdog records the timeout,
    /// ends the job and calls `answer` itself, so whoever waits is answered
    /// on time while this thread stays inside the handler. For hosts whose
    /// handlers must run on threads of their own making (an interpreter's):
    /// they drive jobs on those threads and wait elsewhere.
    ///
    /// ```
    /// use std::sync::mpsc;
    /// use job_executor::{create_default_executor, JobStatus, JobStep};
    /// use uuid::Uuid;
    ///
    /// let executor = create_default_executor();
    /// let (tx, rx) = mpsc::channel();
    /// let steps = [JobStep::new(0, "capability_enable", "billing")];
    /// executor.drive_here(Uuid::new_v4(), Uuid::new_v4(), &steps, "ops", move |result| {
    ///     let _ = tx.send(result);
    /// });
    /// assert_eq!(rx.recv().unwrap().unwrap().final_status, JobStatus::Completed);
    /// ```
    pub fn drive_here(
        &self,
        job_id: Uuid,
        contract_id: Uuid,
        steps: &[JobStep],
        executed_by: &str,
        answer: impl FnOnce(Result<ExecutionResult, ExecutorError>) + Send + 'static,
    ) {
        self.clone()
            .drive(job_id, contract_id, steps, executed_by, answer);
    }

    /// As [`JobExecutor::drive_here`], consuming this handle (a clone): it
    /// lets go of the executor before answering, so that a caller which
    /// drops its own executor on the answer closes the store on its thread
    /// (SQLite folds its write-ahead log into the file then), not whenever
    /// this thread ends.
    pub fn drive(
        self,
        job_id: Uuid,
        contract_id: Uuid,
        steps: &[JobStep],
        executed_by: &str,
        answer: impl FnOnce(Result<ExecutionResult, ExecutorError>) + Send + 'static,
    ) {
        let job = QueuedJob::new(job_id, contract_id, steps.to_vec(), executed_by);
        let answer = Answer::new(answer);
        let result = self.engine.drive_here(&job, &answer);
        drop(self);
        answer.give(result);
    }

    /// Runs `job` on a pool thread that calls each step's handler itself —
    /// no hand-over per step — while the executor's watchdog keeps every
    /// deadline: at a step's deadline it records the timeout, ends the job
    /// and answers here, whatever the handler does. `None` when the pool is
    /// at its cap (the caller's thread runs the job then).
    fn start_driven(&self, job: &QueuedJob) -> Option<Result<ExecutionResult, ExecutorError>> {
        let (reply, answer) = std::sync::mpsc::sync_channel(1);
        let engine = self.engine.clone();
        let driven = job.clone();
        let work: crate::runner::Work = Box::new(move || {
            let answer = Answer::new(move |result| {
                let _ = reply.send(result);
            });
            let result = engine.drive_here(&driven, &answer);
            // The caller may drop the executor the moment it has the answer,
            // and its process end right after: it must then hold the last
            // reference, so that the store is closed (SQLite checkpoints its
            // log into the file) on its thread, not whenever this one runs
            // again.
            drop(engine);
            answer.give(result);
        });
        self.engine.drivers.try_run(work).ok()?;
        Some(answer.recv().unwrap_or_else(|_| {
            Err(ExecutorError::Driver {
                job_id: job.job_id,
                message: "its thread stopped without an answer".into(),
            })
        }))
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
        self.resume_run(&mut run)
    }

    /// Resumes a stored run that stopped between steps.
    fn resume_run(&self, run: &mut Run<'_>) -> Result<ExecutionResult, ExecutorError> {
        let job_id = run.job_id;
        let executed_by = run.executed_by.clone();
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
            executed_by,
            executor_version: self.engine.version.clone(),
            health_before: run.observe_before()?,
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
    /// A step whose outcome this executor knows but could not record
    /// ([`ExecutorError::OutcomeNotRecorded`]) gets that outcome instead of
    /// `interrupted`. A job whose log cannot be read or replayed is left
    /// untouched and reported ([`Recovery::Unreadable`]); the others are
    /// still recovered.
    ///
    /// Run it when no executor is running jobs on this log: a step still
    /// running elsewhere would be declared interrupted (that executor then
    /// stops on a conflict instead of recording its outcome).
    ///
    /// # Errors
    /// Store failures listing or appending to the jobs.
    pub fn recover(&self) -> Result<Vec<Recovery>, ExecutorError> {
        let known: Vec<UnrecordedOutcome> = self.engine.unrecorded().values().cloned().collect();
        self.recover_with(&known)
    }

    /// As [`recover`](Self::recover), with outcomes known elsewhere (taken
    /// from [`ExecutorError::OutcomeNotRecorded`] errors of other executors).
    ///
    /// # Errors
    /// As [`recover`](Self::recover).
    pub fn recover_with(
        &self,
        known: &[UnrecordedOutcome],
    ) -> Result<Vec<Recovery>, ExecutorError> {
        let unfinished =
            self.engine
                .store
                .unfinished_jobs()
                .map_err(|source| ExecutorError::Store {
                    job_id: Uuid::nil(),
                    source,
                })?;
        let mut recovered = Vec::new();
        for job_id in unfinished {
            self.recover_job(job_id, known, &mut recovered)?;
        }
        Ok(recovered)
    }

    /// Recovers one unfinished job, saying what was done in `recovered`.
    fn recover_job(
        &self,
        job_id: Uuid,
        known: &[UnrecordedOutcome],
        recovered: &mut Vec<Recovery>,
    ) -> Result<(), ExecutorError> {
        let mut run = match self.stored_run(job_id, None, None) {
            Ok(run) => run,
            Err(e) => {
                recovered.push(Recovery::Unreadable {
                    job_id,
                    error: e.to_string(),
                });
                return Ok(());
            }
        };
        let mut state = run.projector.state();
        if let Phase::StepRunning { step_index } = state.phase
            && let Some(outcome) = known
                .iter()
                .find(|o| o.job_id == job_id && o.step_index == step_index)
        {
            run.record(std::slice::from_ref(&outcome.event))?;
            self.engine.unrecorded().remove(&(job_id, step_index));
            recovered.push(Recovery::OutcomeRecorded { job_id, step_index });
            state = run.projector.state();
        }
        let action = match state.phase {
            Phase::StepRunning { step_index } => {
                run.drive(vec![interrupted(step_index)])?;
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
        Ok(())
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
        for _ in 0..CANCEL_RETRIES_MAX {
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
            match run.append(std::slice::from_ref(&event)) {
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

    /// Cancels a job that was submitted but has not started: its log gets
    /// its `JobStarted`, the request and `JobCancelled` in one commit, so no
    /// worker runs it (one that claims it finds it ended). No handler runs.
    ///
    /// # Errors
    /// [`ExecutorError::JobAlreadyExists`] when the job started meanwhile
    /// (cancel it with [`request_cancel`](Self::request_cancel) then);
    /// store failures.
    pub fn cancel_queued(
        &self,
        job: &QueuedJob,
        reason: &str,
    ) -> Result<ExecutionResult, ExecutorError> {
        let job_id = job.job_id;
        validate_plan(&job.steps)
            .map_err(|source| ExecutorError::InvalidPlan { job_id, source })?;
        let mut run = Run {
            engine: &self.engine,
            job_id,
            projector: Projector::new(job_id),
            plan: Cow::Borrowed(&job.steps),
            contract_id: job.contract_id,
            executed_by: job.executed_by.clone(),
            observer: None,
            control: RunControl::default(),
        };
        let started = Event::JobStarted(JobStarted {
            contract_id: job.contract_id,
            plan: job.steps.clone(),
            executed_by: job.executed_by.clone(),
            executor_version: self.engine.version.clone(),
            health_before: None,
        });
        let request = Event::JobCancelRequested(JobCancelRequested {
            reason: reason.to_owned(),
        });
        match run.drive(vec![started, request]) {
            Err(ExecutorError::Conflict { seq: 1, .. }) => Err(ExecutorError::JobAlreadyExists {
                job_id,
                events: self.engine.store.last_seq(job_id).unwrap_or(1),
            }),
            other => other,
        }
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
            .engine
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
            engine: &self.engine,
            job_id,
            projector,
            plan: Cow::Owned(started.plan),
            contract_id: started.contract_id,
            executed_by: executed_by.map_or(started.executed_by, str::to_owned),
            observer,
            control: RunControl::default(),
        })
    }

    /// Takes up a claimed job from wherever its log says it is: started
    /// afresh when it has no events; a step in doubt recorded interrupted
    /// and the job halted — never run again; a failed step's job halted; a
    /// requested cancellation honoured; otherwise resumed at its next step
    /// by `resumer`. A terminal job is left as it is.
    pub(crate) fn run_claimed(
        &self,
        job: &QueuedJob,
        resumer: &str,
        control: RunControl<'_>,
    ) -> Result<ExecutionResult, ExecutorError> {
        let job_id = job.job_id;
        let stored = self
            .engine
            .store
            .last_seq(job_id)
            .map_err(|source| ExecutorError::Store { job_id, source })?;
        if stored == 0 {
            match self.start(job, None, control.clone()) {
                // Started elsewhere meanwhile (a cancel of the queued job):
                // take it up from its log.
                Err(ExecutorError::JobAlreadyExists { .. }) => {}
                other => return other,
            }
        }
        let mut run = self.stored_run(job_id, Some(resumer), None)?;
        run.control = control;
        let mut state = run.projector.state();
        if let Phase::StepRunning { step_index } = state.phase {
            // An outcome this executor knows but could not record is the
            // truth, not "interrupted".
            let known = self.engine.unrecorded().get(&(job_id, step_index)).cloned();
            if let Some(outcome) = known {
                run.record(std::slice::from_ref(&outcome.event))?;
                self.engine.unrecorded().remove(&(job_id, step_index));
                state = run.projector.state();
            }
        }
        match state.phase {
            Phase::StepRunning { step_index } => run.drive(vec![interrupted(step_index)]),
            Phase::StepFailed { .. } => run.drive(Vec::new()),
            Phase::Idle if next_action(&state) == NextAction::Cancel => run.drive(Vec::new()),
            Phase::Idle => self.resume_run(&mut run),
            _ => Ok(run
                .projector
                .into_result()
                .ok_or(ExecutorError::UnknownJob { job_id })?),
        }
    }
}

/// The failure recorded for a step in doubt: its outcome is unknown, and it
/// is never run again.
fn interrupted(step_index: u32) -> Event {
    Event::StepFailed(StepFailed {
        step_index,
        failure: Failure {
            kind: FailureKind::Interrupted,
            message: format!(
                "outcome unknown: the executor stopped while step {step_index} ran; it is not run again"
            ),
        },
        output: None,
        health_after: None,
    })
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
