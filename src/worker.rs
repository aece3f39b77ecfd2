//! Workers: executors that take jobs from the queue, on one host or many,
//! and keep at most once across all of them.
//!
//! The protocol, written once for every store:
//!
//! - **Claim.** A worker claims a submitted job — or a running one whose
//!   lease has run out (a takeover) — for a lease timed by the database's
//!   clock. The claim moves the job's epoch on.
//! - **Fence.** Every append the worker makes for the job carries the epoch
//!   it claimed at, and the store checks it in the append's own
//!   transaction: once another worker has taken the job over, the first can
//!   append nothing more — whether it was paused, partitioned or a zombie.
//! - **Renew.** A thread renews the worker's leases every third of a lease.
//!   When a renewal fails, the worker starts no further step of the job
//!   (the store refuses the `StepStarted`, so no handler starts), though it
//!   still records the outcome of the step in flight if the fence allows.
//! - **Take over.** The new owner reads the job's log: a step in doubt (its
//!   `StepStarted` recorded, its outcome not) is recorded failed
//!   (`interrupted`) and the job halted — never run again; a job stopped
//!   between steps resumes at its next step; a job with no events starts.
//!
//! At most once holds across hosts because a handler only starts after its
//! `StepStarted` is committed under a valid fence, a step is started at most
//! once per job (the state machine, and the store's unique `(job, seq)`),
//! and a takeover never starts a step in doubt again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::clock::{Clock, SystemClock};
use crate::events::{EventRecord, JobClaimed};
use crate::executor::{ExecutorBuilder, ExecutorError, JobExecutor, RunControl};
use crate::handler::StepHandler;
use crate::metrics::Health;
use crate::model::CancelSignal;
use crate::result::ExecutionResult;
use crate::store::{AppendOptions, Claim, EventStore, Fence, JobQueue, Log, QueuedJob, StoreError};

/// How a worker runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerOptions {
    /// Names the worker in leases, in `jobs` and in its claims (default:
    /// host and pid).
    pub worker_id: String,
    /// The host recorded in its claims (default: this host's name).
    pub host: String,
    /// Jobs run at once (default 4).
    pub concurrency: usize,
    /// How long a claim lasts unless renewed (default 30 s).
    pub lease: Duration,
    /// How often an idle worker looks for work (default 200 ms).
    pub idle_poll: Duration,
    /// Exit once nothing is submitted or running, instead of waiting for
    /// more work.
    pub until_idle: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            worker_id: format!("{}:{}", hostname(), std::process::id()),
            host: hostname(),
            concurrency: 4,
            lease: Duration::from_secs(30),
            idle_poll: Duration::from_millis(200),
            until_idle: false,
        }
    }
}

impl WorkerOptions {
    /// With this worker id.
    pub fn with_worker_id(mut self, worker_id: impl Into<String>) -> Self {
        self.worker_id = worker_id.into();
        self
    }

    /// With `concurrency` jobs at once (at least one).
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// With leases of `lease`.
    pub fn with_lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Exiting once nothing is submitted or running.
    pub fn until_idle(mut self) -> Self {
        self.until_idle = true;
        self
    }
}

/// This host's name (`host` where it cannot be read).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".to_owned())
}

/// Submits a job to the queue of `log`; a worker will run it.
///
/// # Errors
/// [`ExecutorError::JobAlreadyExists`] when the job id is already queued or
/// in the log (a job is executed at most once); [`ExecutorError::Store`]
/// for other store failures.
pub fn submit(log: &dyn Log, job: &QueuedJob) -> Result<(), ExecutorError> {
    let job_id = job.job_id;
    match log.submit(job) {
        Err(StoreError::Conflict { .. }) => Err(ExecutorError::already_exists(log, job_id)),
        other => other.map_err(|source| ExecutorError::Store { job_id, source }),
    }
}

/// What a worker did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Jobs it took up (claims, takeovers included).
    pub claimed: usize,
    /// Jobs that ended while it held them.
    pub finished: usize,
    /// Jobs it gave back unfinished when asked to stop.
    pub released: usize,
    /// Jobs taken over from it (its fence no longer held).
    pub lost: usize,
    /// Jobs whose run failed otherwise (the log, a bug); each is left for
    /// another claim once its lease runs out.
    pub failed: Vec<(Uuid, String)>,
}

/// A worker: runs claimed jobs with an executor whose every append is
/// fenced by the claim it holds.
///
/// ```no_run
/// use std::sync::Arc;
/// use job_executor::store::{open, Location, OpenOptions};
/// use job_executor::worker::{Worker, WorkerOptions};
/// use job_executor::NoOpHandler;
///
/// let log = open(&Location::parse("postgres://ops@db/jobs"), &OpenOptions::default())?;
/// let mut worker = Worker::new(log, WorkerOptions::default().until_idle());
/// worker.register_handler("capability_enable", NoOpHandler);
/// let report = worker.run()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// Its building blocks are public, for a fleet loop of an embedder's own:
/// [`Leases`] (claims held, renewed, lost), [`FencedStore`] (the log as a
/// claim allows it), [`JobExecutor::take_up`] under a [`RunControl`], and
/// [`Ended`] (what became of a claimed job):
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use job_executor::executor::RunControl;
/// use job_executor::store::{Log, MemoryStore, QueuedJob};
/// use job_executor::worker::{Ended, FencedStore, Leases, submit};
/// use job_executor::{JobExecutor, JobStep, NoOpHandler};
/// use uuid::Uuid;
///
/// let log: Arc<dyn Log> = Arc::new(MemoryStore::new());
/// let steps = vec![JobStep::new(0, "capability_enable", "billing")];
/// submit(&*log, &QueuedJob::new(Uuid::new_v4(), Uuid::new_v4(), steps, "ops"))?;
///
/// let leases = Arc::new(Leases::new());
/// let fenced = Arc::new(FencedStore::new(log.clone(), leases.clone()));
/// let mut executor = JobExecutor::builder().store(fenced).build();
/// executor.register_handler("capability_enable", NoOpHandler);
/// let lease = Duration::from_secs(30);
/// // (A thread of its own calls `leases.renew(&*log, "me", lease)` every third of a lease.)
/// while let Some(claim) = leases.claim(&*log, "me", lease)? {
///     let job_id = claim.fence.job_id;
///     let control = RunControl::new().cancel_signal(leases.cancel_signal(job_id).unwrap_or_default());
///     let ended = Ended::of(&executor.take_up(&claim.job, "me", control));
///     leases.let_go(job_id);
///     if let Some(finished) = ended.releases() {
///         log.release(claim.fence, finished)?;
///     }
///     assert_eq!(ended, Ended::Finished);
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct Worker {
    log: Arc<dyn Log>,
    leases: Arc<Leases>,
    executor: JobExecutor,
    options: WorkerOptions,
    stop: Arc<AtomicBool>,
    health: Arc<Health>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// A worker on `log`, with no handlers registered.
    pub fn new(log: Arc<dyn Log>, options: WorkerOptions) -> Self {
        Worker::with(log, options, |builder| builder)
    }

    /// A worker whose executor is set up by `configure` (its clock, head key,
    /// handler pool, …: [`ExecutorConfig::configure`](crate::executor::ExecutorConfig::configure)
    /// sets it up as a configuration says); the store is always the fenced
    /// view of `log`.
    pub fn with(
        log: Arc<dyn Log>,
        options: WorkerOptions,
        configure: impl FnOnce(ExecutorBuilder) -> ExecutorBuilder,
    ) -> Self {
        let builder = configure(JobExecutor::builder());
        // Leases are timed, and the worker waits, by the executor's clock.
        let leases = Arc::new(Leases::with_clock(builder.clock_or_system()));
        let fenced = Arc::new(FencedStore::new(log.clone(), leases.clone()));
        let executor = builder.store(fenced).build();
        Worker {
            log,
            leases,
            executor,
            health: Arc::new(Health::new(options.lease)),
            options,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// What the worker tells its probes: live while [`run`](Self::run)'s
    /// loops run; ready while, besides, its store answered within the last
    /// lease and it takes work.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// Registers `handler` for `step_type`.
    pub fn register_handler(
        &mut self,
        step_type: impl Into<String>,
        handler: impl StepHandler + 'static,
    ) {
        self.executor.register_handler(step_type, handler);
    }

    /// The executor the worker runs jobs with.
    pub fn executor_mut(&mut self) -> &mut JobExecutor {
        &mut self.executor
    }

    /// The flag that asks the worker to stop: once raised, it claims
    /// nothing more, lets every step in flight finish and be recorded,
    /// gives its jobs back, and returns. (The CLI raises it on SIGTERM and
    /// SIGINT.)
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Runs until stopped — or, with `until_idle`, until nothing is
    /// submitted or running.
    ///
    /// # Errors
    /// A store failure listing the queue; failures of single jobs are in
    /// the report.
    pub fn run(&self) -> Result<WorkerReport, StoreError> {
        let report = Mutex::new(WorkerReport::default());
        let renewing = AtomicBool::new(true);
        self.health.set_running(true);
        self.health.set_taking_work(true);
        let outcome = std::thread::scope(|scope| {
            let renewer = scope.spawn(|| self.renew_leases(&renewing));
            let slots: Vec<_> = (0..self.options.concurrency)
                .map(|_| scope.spawn(|| self.work(&report)))
                .collect();
            let mut outcome = Ok(());
            for slot in slots {
                if let Ok(Err(e)) = slot.join() {
                    outcome = Err(e);
                }
            }
            renewing.store(false, Ordering::SeqCst);
            let _ = renewer.join();
            outcome
        });
        self.health.set_taking_work(false);
        self.health.set_running(false);
        outcome?;
        Ok(report.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    /// One slot: claims and runs jobs one after the other. A queue that
    /// cannot be reached is tried again, backing off up to ten polls.
    fn work(&self, report: &Mutex<WorkerReport>) -> Result<(), StoreError> {
        let (worker_id, lease) = (&self.options.worker_id, self.options.lease);
        let _worker = tracing::info_span!("worker", worker_id = %worker_id).entered();
        let mut unreachable = 0u32;
        while !self.stop.load(Ordering::SeqCst) {
            let claimed = match self.leases.claim(&*self.log, worker_id, lease) {
                Ok(claimed) => claimed,
                Err(e) if e.is_transient() => {
                    self.health.store_failed(&e);
                    unreachable = (unreachable + 1).min(10);
                    tracing::warn!(error = %e, "cannot claim a job");
                    self.leases
                        .clock
                        .sleep(self.options.idle_poll * unreachable);
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.health.store_answered();
            unreachable = 0;
            let Some(claim) = claimed else {
                if self.options.until_idle && self.log.queued()?.is_empty() {
                    break;
                }
                self.leases.clock.sleep(self.options.idle_poll);
                continue;
            };
            let job_id = claim.fence.job_id;
            // Each claim is a trace of its own (the worker's span lasts
            // as long as the process), so it names its worker itself.
            let _claim = tracing::info_span!(
                parent: None,
                "claim",
                worker_id = %worker_id,
                job_id = %job_id,
                // Signed, so that OpenTelemetry exports a number: an epoch
                // is a database BIGINT, never past i64::MAX.
                epoch = i64::try_from(claim.fence.epoch).unwrap_or(i64::MAX)
            )
            .entered();
            let ended = self.run_claim(&claim);
            self.leases.let_go(job_id);
            if let Some(finished) = ended.releases() {
                self.log.release(claim.fence, finished)?;
            }
            log_end(&ended);
            lock(report).count(job_id, ended);
        }
        self.health.set_taking_work(false);
        Ok(())
    }

    /// Runs one claimed job as far as the worker may take it.
    fn run_claim(&self, claim: &Claim) -> Ended {
        let (job_id, epoch) = (claim.fence.job_id, claim.fence.epoch);
        match &claim.taken_over_from {
            Some(previous) => {
                if let Some(metrics) = self.executor.metrics() {
                    metrics.taken_over();
                }
                tracing::info!(
                    taken_over_from = %previous,
                    "took job {job_id} over from {previous}, whose lease ran out"
                );
            }
            None => tracing::info!("claimed job {job_id} at epoch {epoch}"),
        }
        let mut control = RunControl::new().stop_on(&self.stop).claimed(JobClaimed {
            worker_id: self.options.worker_id.clone(),
            host: self.options.host.clone(),
            epoch: claim.fence.epoch,
            taken_over_from: claim.taken_over_from.clone(),
            // The run fills it in if it records a step left in doubt.
            recorded_outcome: None,
        });
        if let Some(signal) = self.leases.cancel_signal(job_id) {
            control = control.cancel_signal(signal);
        }
        let taken_up = self
            .executor
            .take_up(&claim.job, &self.options.worker_id, control);
        if let Some(result) = taken_up
            .as_ref()
            .ok()
            .filter(|r| r.final_status.is_terminal())
        {
            tracing::info!(
                status = %result.final_status,
                reason = %result.final_reason,
                "job {job_id} ended {}",
                result.final_status
            );
        }
        Ended::of(&taken_up)
    }

    /// Renews the leases held, every third of a lease, until told to stop.
    fn renew_leases(&self, renewing: &AtomicBool) {
        let clock = &self.leases.clock;
        let period = (self.options.lease / 3).max(Duration::from_millis(10));
        let mut last = clock.instant();
        while renewing.load(Ordering::SeqCst) {
            clock.sleep(Duration::from_millis(20).min(period));
            if clock.instant().saturating_duration_since(last) < period {
                continue;
            }
            last = clock.instant();
            let renewed =
                self.leases
                    .renew(&*self.log, &self.options.worker_id, self.options.lease);
            match renewed {
                Ok(0) => {}
                Ok(leases) => {
                    self.health.store_answered();
                    if let Some(metrics) = self.executor.metrics() {
                        metrics.leases_renewed(leases);
                    }
                }
                // Unrenewed, the leases run out on their own: no new step
                // starts once they do.
                Err(e) => {
                    self.health.store_failed(&e);
                    tracing::warn!(worker_id = %self.options.worker_id, error = %e, "cannot renew leases");
                }
            }
        }
    }
}

/// Logs what became of a claimed job (in the job's span).
fn log_end(ended: &Ended) {
    match ended {
        Ended::Finished => tracing::debug!("released the ended job from the queue"),
        Ended::Stopped => tracing::info!("gave the job back between steps, as asked to stop"),
        Ended::Lost => tracing::warn!(
            "fenced off: another worker took the job over; this one appends nothing more to it"
        ),
        Ended::Failed(error) => {
            tracing::error!(%error, "the job's run failed; it is left for another claim once its lease runs out")
        }
    }
}

impl WorkerReport {
    /// Counts a claimed job that came to `ended`.
    fn count(&mut self, job_id: Uuid, ended: Ended) {
        self.claimed += 1;
        match ended {
            Ended::Finished => self.finished += 1,
            Ended::Stopped => self.released += 1,
            Ended::Lost => self.lost += 1,
            Ended::Failed(error) => self.failed.push((job_id, error)),
        }
    }
}

/// What became of a claimed job once its executor returned.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ended {
    /// It ended (or was found ended): it leaves the queue.
    Finished,
    /// It stopped between steps, as asked: back to the queue.
    Stopped,
    /// Another worker took it over (the claim's fence no longer held, or
    /// someone else appended to it).
    Lost,
    /// Its run failed otherwise (the log, a bug): its lease will run out
    /// and another claim try again.
    Failed(String),
}

impl Ended {
    /// What `taken_up` — [`JobExecutor::take_up`]'s answer — means for the
    /// claim.
    pub fn of(taken_up: &Result<ExecutionResult, ExecutorError>) -> Ended {
        match taken_up {
            Ok(result) if result.final_status.is_terminal() => Ended::Finished,
            Ok(_) => Ended::Stopped,
            Err(e) if e.is_taken_over() => Ended::Lost,
            Err(ExecutorError::JobEnded { .. }) => Ended::Finished,
            Err(e) => Ended::Failed(e.to_string()),
        }
    }

    /// How the claim is given up: `Some(true)` — finished, it leaves the
    /// queue; `Some(false)` — back to the queue, to be claimed again at
    /// once; `None` — not at all (lost, or left for its lease to run out).
    pub fn releases(&self) -> Option<bool> {
        match self {
            Ended::Finished => Some(true),
            Ended::Stopped => Some(false),
            Ended::Lost | Ended::Failed(_) => None,
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a single step: a poisoned lock is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The claims a worker holds, with how long each is good for by the
/// worker's own clock: until a renewal made at `asked` was answered, plus
/// the lease, less a margin for clocks that drift.
pub struct Leases {
    held: Mutex<HashMap<Uuid, Held>>,
    /// The worker's clock, which leases are timed by.
    clock: Arc<dyn Clock>,
}

impl Default for Leases {
    fn default() -> Self {
        Leases::with_clock(Arc::new(SystemClock))
    }
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct Held {
    fence: Fence,
    valid_until: Instant,
    cancel_requested: CancelSignal,
}

impl Held {
    /// `fence`'s claim, asked for at `asked`, for `lease`.
    fn new(fence: Fence, asked: Instant, lease: Duration) -> Self {
        Held {
            fence,
            valid_until: asked + lease - margin(lease),
            cancel_requested: CancelSignal::new(),
        }
    }
}

/// The part of a lease not relied on: the server's and this host's clocks
/// may run at slightly different rates.
fn margin(lease: Duration) -> Duration {
    lease / 5
}

impl Leases {
    /// No claims held, timed by the system's monotonic clock.
    pub fn new() -> Self {
        Leases::default()
    }

    /// No claims held, timed by `clock` ([`Clock::instant`]).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Leases {
            held: Mutex::default(),
            clock,
        }
    }

    /// Claims a job of `log`'s queue for `owner`, for `lease`, and holds it.
    ///
    /// A worker holds at most one claim of a job, since its appends are
    /// fenced by the job's claim: a claim of a job it holds already (its
    /// lease ran out while one of its runs still has it) is given back at
    /// once, and `None` returned. That run is fenced off by the store from
    /// then on — the claim moved the job's epoch on — and the job is
    /// claimed afresh, as a takeover, once the run has stopped.
    ///
    /// # Errors
    /// The queue's.
    pub fn claim(
        &self,
        log: &dyn JobQueue,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<Claim>, StoreError> {
        let asked = self.clock.instant();
        let Some(claim) = log.claim(owner, lease)? else {
            return Ok(None);
        };
        let mut held = lock(&self.held);
        if held.contains_key(&claim.fence.job_id) {
            drop(held);
            // Not given back, it is left for its lease to run out.
            let _ = log.release(claim.fence, false);
            return Ok(None);
        }
        held.insert(claim.fence.job_id, Held::new(claim.fence, asked, lease));
        Ok(Some(claim))
    }

    /// Holds `claim`, asked for at `asked` (a reading of the leases'
    /// clock, [`Clock::instant`]), for `lease`.
    pub fn hold(&self, claim: &Claim, asked: Instant, lease: Duration) {
        lock(&self.held).insert(claim.fence.job_id, Held::new(claim.fence, asked, lease));
    }

    /// Holds `job_id`'s claim no more (its appends are no longer fenced).
    pub fn let_go(&self, job_id: Uuid) {
        lock(&self.held).remove(&job_id);
    }

    /// The fences of the claims held.
    pub fn fences(&self) -> Vec<Fence> {
        lock(&self.held).values().map(|h| h.fence).collect()
    }

    /// Renews every claim held, for `owner`, for `lease`: a claim taken
    /// over meanwhile starts no more steps; a job someone asked to cancel
    /// gets its cancel signal raised. One round of what a worker's renewal
    /// thread does every third of a lease.
    ///
    /// Returns how many leases were renewed.
    ///
    /// # Errors
    /// The queue's: the leases were not renewed, and run out on their own.
    pub fn renew(&self, log: &dyn Log, owner: &str, lease: Duration) -> Result<usize, StoreError> {
        let fences = self.fences();
        if fences.is_empty() {
            return Ok(0);
        }
        let asked = self.clock.instant();
        let held = log.renew(owner, &fences, lease)?;
        self.renewed(&fences, &held, asked, lease);
        for fence in &held {
            if cancel_requested(log, fence.job_id) {
                self.raise_cancel(fence.job_id);
            }
        }
        Ok(held.len())
    }

    /// Notes a renewal asked for `asked_for` at `asked` (a reading of the
    /// leases' clock): the claims in `held` are good for another `lease`;
    /// the others were taken over.
    pub fn renewed(&self, asked_for: &[Fence], held: &[Fence], asked: Instant, lease: Duration) {
        let mut leases = lock(&self.held);
        for fence in asked_for {
            if let Some(h) = leases.get_mut(&fence.job_id).filter(|h| h.fence == *fence) {
                h.valid_until = if held.contains(fence) {
                    asked + lease - margin(lease)
                } else {
                    // Taken over: not one more step.
                    asked
                };
            }
        }
    }

    /// The signal raised when `job_id` is asked to cancel, while held.
    pub fn cancel_signal(&self, job_id: Uuid) -> Option<CancelSignal> {
        lock(&self.held)
            .get(&job_id)
            .map(|h| h.cancel_requested.clone())
    }

    /// Raises `job_id`'s cancel signal, if held.
    pub fn raise_cancel(&self, job_id: Uuid) {
        if let Some(h) = lock(&self.held).get(&job_id) {
            h.cancel_requested.cancel();
        }
    }

    /// The fence for an append of `job_id`, and whether a step may start.
    fn fence(&self, job_id: Uuid) -> Option<(Fence, bool)> {
        lock(&self.held)
            .get(&job_id)
            .map(|h| (h.fence, self.clock.instant() < h.valid_until))
    }
}

/// Whether the job's log has a cancel request.
fn cancel_requested(log: &dyn Log, job_id: Uuid) -> bool {
    let mut requested = false;
    let _ = log.visit_job(job_id, &mut |record| {
        requested |= record.kind == "JobCancelRequested";
        true
    });
    requested
}

/// The log as a worker's executor sees it: every append of a claimed job
/// carries the claim's fence, and a step does not start once the claim's
/// lease may have run out. Appends of jobs not held go through unfenced.
pub struct FencedStore {
    inner: Arc<dyn Log>,
    leases: Arc<Leases>,
}

impl FencedStore {
    /// `log`, fenced by the claims in `leases`.
    pub fn new(log: Arc<dyn Log>, leases: Arc<Leases>) -> Self {
        FencedStore { inner: log, leases }
    }
}

impl std::fmt::Debug for FencedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FencedStore")
            .field("leases", &self.leases)
            .finish_non_exhaustive()
    }
}

impl EventStore for FencedStore {
    fn append_with(
        &self,
        records: &[EventRecord],
        mut options: AppendOptions,
    ) -> Result<Vec<u64>, StoreError> {
        let job_id = records.first().map(|r| r.job_id).unwrap_or_default();
        if let Some((fence, lease_valid)) = self.leases.fence(job_id) {
            let starts_step = records.last().is_some_and(|r| r.kind == "StepStarted");
            if starts_step && !lease_valid {
                return Err(StoreError::Fenced {
                    job_id,
                    epoch: fence.epoch,
                    found: None,
                });
            }
            options.fence = Some(fence);
        }
        self.inner.append_with(records, options)
    }

    fn visit_job(
        &self,
        job_id: Uuid,
        visit: &mut dyn FnMut(&EventRecord) -> bool,
    ) -> Result<(), StoreError> {
        self.inner.visit_job(job_id, visit)
    }

    fn last_seq(&self, job_id: Uuid) -> Result<u64, StoreError> {
        self.inner.last_seq(job_id)
    }

    fn load_job(&self, job_id: Uuid) -> Result<Vec<EventRecord>, StoreError> {
        self.inner.load_job(job_id)
    }

    fn scan(
        &self,
        visit: &mut dyn FnMut(u64, Result<&EventRecord, StoreError>),
    ) -> Result<(), StoreError> {
        self.inner.scan(visit)
    }

    fn last_position(&self) -> Result<u64, StoreError> {
        self.inner.last_position()
    }

    fn unfinished_jobs(&self) -> Result<Vec<Uuid>, StoreError> {
        self.inner.unfinished_jobs()
    }

    fn job_ids(&self) -> Result<Vec<Uuid>, StoreError> {
        self.inner.job_ids()
    }
}
