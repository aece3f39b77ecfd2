//! What an executor is made from: [`ExecutorBuilder`] takes the parts in
//! code (a store, a clock, drivers), [`ExecutorConfig`] the settings a front
//! end reads from its user (where the log is, how durable a commit is, a
//! key, a deterministic clock, deadlines, pools). The CLI and the Python
//! package both build their executors from an `ExecutorConfig`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use uuid::Uuid;

use super::drive::{Drivers, PoolDrivers};
use super::{EXECUTOR_VERSION, Engine, JobExecutor};
use crate::chain::HeadKey;
use crate::clock::{Clock, LogicalClock, SystemClock, derived_job_id};
use crate::metrics::Metrics;
use crate::model::PlanFile;
use crate::runner::{HandlerPool, PoolOptions};
use crate::store::{
    self, EventStore, Location, Log, MemoryStore, OpenOptions, SqliteStore, StoreError, Synchronous,
};
use crate::watchdog::Watchdog;

/// How long a health observer has to answer, unless the builder says otherwise.
pub const HEALTH_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

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
    drivers: Option<Arc<dyn Drivers>>,
    metrics: Option<Arc<Metrics>>,
}

impl ExecutorBuilder {
    /// A builder of the defaults: a [`MemoryStore`], the [`SystemClock`],
    /// no key.
    pub(super) fn new() -> Self {
        ExecutorBuilder {
            store: None,
            clock: None,
            head_key: None,
            version: None,
            pool: PoolOptions::default(),
            health_timeout: HEALTH_TIMEOUT_DEFAULT,
            drivers: None,
            metrics: None,
        }
    }

    /// The event log (default: a new [`MemoryStore`]).
    pub fn store(mut self, store: Arc<dyn EventStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The clock events are stamped with, and an append waits by before
    /// it is tried again (default: [`SystemClock`]). A worker's leases are
    /// timed by it too.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The clock the executor will have: the one given, or the system's.
    pub(crate) fn clock_or_system(&self) -> Arc<dyn Clock> {
        self.clock.clone().unwrap_or_else(|| Arc::new(SystemClock))
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
    /// the original module's `executor_version` argument does.
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
    /// next step with [`ExecutorError::HealthObserver`](super::ExecutorError::HealthObserver)
    /// (once the observer returns: it runs on the caller's thread, which
    /// nothing can interrupt).
    pub fn health_timeout(mut self, timeout: Duration) -> Self {
        self.health_timeout = timeout;
        self
    }

    /// The threads that drive jobs run without a health observer (default:
    /// a pool of the executor's own, sized as the handler pool). A host
    /// whose handlers must run on threads of its own making gives its own.
    pub fn drivers(mut self, drivers: Arc<dyn Drivers>) -> Self {
        self.drivers = Some(drivers);
        self
    }

    /// Metrics to count into: jobs and steps ended, appends, jobs running
    /// (default: none, and nothing is counted).
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The executor, with no handlers registered.
    pub fn build(self) -> JobExecutor {
        let drivers = self
            .drivers
            .unwrap_or_else(|| Arc::new(PoolDrivers::new(self.pool.clone())));
        let engine = Engine {
            handlers: RwLock::new(HashMap::new()),
            store: self.store.unwrap_or_else(|| Arc::new(MemoryStore::new())),
            clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
            head_key: self.head_key.map(Arc::new),
            drivers,
            pool: HandlerPool::new(self.pool),
            health_timeout: self.health_timeout,
            watchdog: Watchdog::new(),
            unrecorded: Mutex::new(HashMap::new()),
            version: self.version.unwrap_or_else(|| EXECUTOR_VERSION.to_owned()),
            metrics: self.metrics,
        };
        JobExecutor {
            engine: Arc::new(engine),
        }
    }
}

/// Where an executor's log is, as a front end names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogLocation {
    /// In this process's memory ([`MemoryStore`]), gone when it ends.
    #[default]
    Memory,
    /// A private SQLite database in memory.
    SqliteMemory,
    /// A SQLite file or a PostgreSQL database ([`store::open`]).
    At(Location),
}

impl LogLocation {
    /// Reads a log's name: `:memory:` is a private SQLite database in
    /// memory; anything else a file path or a PostgreSQL connection string
    /// ([`Location::parse`]).
    ///
    /// ```
    /// use job_executor::executor::LogLocation;
    /// assert_eq!(LogLocation::parse(":memory:"), LogLocation::SqliteMemory);
    /// assert!(matches!(LogLocation::parse("postgres://ops@db/jobs"), LogLocation::At(_)));
    /// ```
    pub fn parse(name: &str) -> LogLocation {
        match name {
            ":memory:" => LogLocation::SqliteMemory,
            _ => LogLocation::At(Location::parse(name)),
        }
    }
}

/// Everything an executor is made from that a user states: where its log
/// is and how it is opened, the key, the clock, the health deadline, the
/// pools, the version it records.
///
/// ```
/// use job_executor::executor::{ExecutorConfig, LogLocation};
///
/// let executor = ExecutorConfig::new(LogLocation::SqliteMemory)
///     .deterministic(true)
///     .build()?;
/// assert_eq!(executor.version(), job_executor::EXECUTOR_VERSION);
/// # Ok::<(), job_executor::store::StoreError>(())
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ExecutorConfig {
    /// Where the log is (default: in memory).
    pub log: LogLocation,
    /// How a file or a server is opened: created when absent, read only,
    /// SQLite's durability (default: created, writable, `FULL`).
    pub open: OpenOptions,
    /// The key every event's digest is authenticated with.
    pub head_key: Option<HeadKey>,
    /// A logical clock instead of the system's, and a job id derived from
    /// the plan where it has none: the same plan gives the same log.
    pub deterministic: bool,
    /// How long a health observer has to answer.
    pub health_timeout: Duration,
    /// How the handler threads (and the drivers) are pooled.
    pub pool: PoolOptions,
    /// The version recorded in every `JobStarted` and `JobResumed`.
    pub executor_version: String,
    /// The metrics the executor counts into, if any.
    pub metrics: Option<Arc<Metrics>>,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        ExecutorConfig::new(LogLocation::Memory)
    }
}

impl ExecutorConfig {
    /// The defaults, with the log at `log`.
    pub fn new(log: LogLocation) -> Self {
        ExecutorConfig {
            log,
            open: OpenOptions::default(),
            head_key: None,
            deterministic: false,
            health_timeout: HEALTH_TIMEOUT_DEFAULT,
            pool: PoolOptions::default(),
            executor_version: EXECUTOR_VERSION.to_owned(),
            metrics: None,
        }
    }

    /// Opening the log with `open`.
    pub fn with_open(mut self, open: OpenOptions) -> Self {
        self.open = open;
        self
    }

    /// With SQLite's durability `synchronous`.
    pub fn with_synchronous(mut self, synchronous: Synchronous) -> Self {
        self.open = self.open.with_synchronous(synchronous);
        self
    }

    /// With (or without) a key.
    pub fn with_head_key(mut self, key: Option<HeadKey>) -> Self {
        self.head_key = key;
        self
    }

    /// Deterministic or not.
    pub fn deterministic(mut self, deterministic: bool) -> Self {
        self.deterministic = deterministic;
        self
    }

    /// With a health deadline of `timeout`.
    pub fn with_health_timeout(mut self, timeout: Duration) -> Self {
        self.health_timeout = timeout;
        self
    }

    /// With pools sized by `pool`.
    pub fn with_pool(mut self, pool: PoolOptions) -> Self {
        self.pool = pool;
        self
    }

    /// Recording `version` as the executor's.
    pub fn with_executor_version(mut self, version: impl Into<String>) -> Self {
        self.executor_version = version.into();
        self
    }

    /// Counting into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Opens the log (and the queue beside it).
    ///
    /// # Errors
    /// As [`store::open`]; for a private SQLite database in memory, as
    /// [`SqliteStore::open_in_memory`].
    pub fn open_log(&self) -> Result<Arc<dyn Log>, StoreError> {
        Ok(match &self.log {
            LogLocation::Memory => Arc::new(MemoryStore::new()),
            LogLocation::SqliteMemory => Arc::new(SqliteStore::open_in_memory()?),
            LogLocation::At(location) => store::open(location, &self.open)?,
        })
    }

    /// `builder` with everything of this configuration but the log: the
    /// key, the clock, the deadline, the pools, the version, the metrics.
    pub fn configure(&self, builder: ExecutorBuilder) -> ExecutorBuilder {
        let mut builder = builder
            .executor_version(self.executor_version.clone())
            .handler_pool(self.pool.clone())
            .health_timeout(self.health_timeout);
        if self.deterministic {
            builder = builder.clock(Arc::new(LogicalClock::default()));
        }
        if let Some(key) = &self.head_key {
            builder = builder.head_key(key.clone());
        }
        if let Some(metrics) = &self.metrics {
            builder = builder.metrics(metrics.clone());
        }
        builder
    }

    /// A builder on the opened log, configured: for an executor that needs
    /// more than the configuration says (its own drivers).
    ///
    /// # Errors
    /// As [`open_log`](Self::open_log).
    pub fn builder(&self) -> Result<ExecutorBuilder, StoreError> {
        let log: Arc<dyn EventStore> = self.open_log()?;
        Ok(self.configure(JobExecutor::builder().store(log)))
    }

    /// The executor this configuration describes, with no handlers.
    ///
    /// # Errors
    /// As [`open_log`](Self::open_log).
    pub fn build(&self) -> Result<JobExecutor, StoreError> {
        Ok(self.builder()?.build())
    }

    /// The id `plan` runs under: its own; else, when deterministic, one
    /// derived from its contract and steps; else a new random one.
    pub fn job_id(&self, plan: &PlanFile) -> Uuid {
        match plan.job_id {
            Some(id) => id,
            None if self.deterministic => derived_job_id(plan.contract_id, &plan.steps),
            None => Uuid::new_v4(),
        }
    }
}
