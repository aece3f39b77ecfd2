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

use crate::chain::HeadKey;
use crate::clock::Clock;
use crate::events::EventRecord;
use crate::executor::{ExecutorError, JobExecutor, RunControl};
use crate::handler::StepHandler;
use crate::model::{CancelSignal, JobStatus};
use crate::store::{AppendOptions, Claim, EventStore, Fence, JobQueue, Log, QueuedJob, StoreError};

/// How a worker runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct WorkerOptions {
    /// Names the worker in leases and in `jobs` (default: host and pid).
    pub worker_id: String,
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
            worker_id: default_worker_id(),
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

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".to_owned());
    format!("{host}:{}", std::process::id())
}

/// Submits a job to the queue of `log`; a worker will run it.
///
/// # Errors
/// [`StoreError::Conflict`] when the job id is already queued or in the
/// log; other store failures.
pub fn submit(log: &dyn JobQueue, job: &QueuedJob) -> Result<(), StoreError> {
    log.submit(job)
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
pub struct Worker {
    log: Arc<dyn Log>,
    leases: Arc<Leases>,
    executor: JobExecutor,
    options: WorkerOptions,
    stop: Arc<AtomicBool>,
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
    /// handler pool, …); the store is always the fenced view of `log`.
    pub fn with(
        log: Arc<dyn Log>,
        options: WorkerOptions,
        configure: impl FnOnce(crate::ExecutorBuilder) -> crate::ExecutorBuilder,
    ) -> Self {
        let leases = Arc::new(Leases::default());
        let fenced = Arc::new(FencedStore {
            inner: log.clone(),
            leases: leases.clone(),
        });
        let executor = configure(JobExecutor::builder()).store(fenced).build();
        Worker {
            log,
            leases,
            executor,
            options,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A worker with a head key and a clock, as the CLI builds it.
    pub fn with_key_and_clock(
        log: Arc<dyn Log>,
        options: WorkerOptions,
        key: Option<HeadKey>,
        clock: Option<Arc<dyn Clock>>,
    ) -> Self {
        Worker::with(log, options, |mut builder| {
            if let Some(key) = key {
                builder = builder.head_key(key);
            }
            if let Some(clock) = clock {
                builder = builder.clock(clock);
            }
            builder
        })
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
        outcome?;
        Ok(report.into_inner().unwrap_or_else(|p| p.into_inner()))
    }

    /// One slot: claims and runs jobs one after the other. A queue that
    /// cannot be reached is tried again, backing off up to ten polls.
    fn work(&self, report: &Mutex<WorkerReport>) -> Result<(), StoreError> {
        let mut unreachable = 0u32;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            let asked = Instant::now();
            let claimed = match self.log.claim(&self.options.worker_id, self.options.lease) {
                Ok(claimed) => {
                    unreachable = 0;
                    claimed
                }
                Err(e) if e.is_transient() => {
                    unreachable = (unreachable + 1).min(10);
                    eprintln!(
                        "job-executor worker {}: cannot claim a job: {e}",
                        self.options.worker_id
                    );
                    std::thread::sleep(self.options.idle_poll * unreachable);
                    continue;
                }
                Err(e) => return Err(e),
            };
            match claimed {
                Some(claim) => {
                    self.leases.hold(&claim, asked, self.options.lease);
                    let ended = self.run_claim(&claim);
                    self.leases.drop_job(claim.fence.job_id);
                    let mut report = lock(report);
                    report.claimed += 1;
                    match ended {
                        Ended::Finished => {
                            report.finished += 1;
                            self.log.release(claim.fence, true)?;
                        }
                        Ended::Stopped => {
                            report.released += 1;
                            self.log.release(claim.fence, false)?;
                        }
                        Ended::Lost => report.lost += 1,
                        Ended::Failed(error) => {
                            eprintln!(
                                "job-executor worker {}: job {}: {error}",
                                self.options.worker_id, claim.fence.job_id
                            );
                            report.failed.push((claim.fence.job_id, error));
                        }
                    }
                }
                None if self.options.until_idle && self.log.queued()?.is_empty() => return Ok(()),
                None => std::thread::sleep(self.options.idle_poll),
            }
        }
    }

    /// Runs one claimed job as far as the worker may take it.
    fn run_claim(&self, claim: &Claim) -> Ended {
        let job_id = claim.fence.job_id;
        if let Some(previous) = &claim.taken_over_from {
            eprintln!(
                "job-executor worker {}: took job {job_id} over from {previous}, whose lease ran out",
                self.options.worker_id
            );
        }
        let control = RunControl {
            stop: Some(&self.stop),
            cancel_requested: self.leases.cancel_signal(job_id),
            answer: None,
        };
        match self
            .executor
            .run_claimed(&claim.job, &self.options.worker_id, control)
        {
            Ok(result) if is_terminal(result.final_status) => Ended::Finished,
            Ok(_) => Ended::Stopped,
            Err(e) if fenced(&e) => Ended::Lost,
            Err(ExecutorError::JobEnded { .. }) => Ended::Finished,
            Err(e) => Ended::Failed(e.to_string()),
        }
    }

    /// Renews the leases held, every third of a lease, until told to stop;
    /// marks the ones lost, and raises the cancel signal of jobs someone
    /// asked to cancel.
    fn renew_leases(&self, renewing: &AtomicBool) {
        let period = (self.options.lease / 3).max(Duration::from_millis(10));
        let mut last = Instant::now();
        while renewing.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20).min(period));
            if last.elapsed() < period {
                continue;
            }
            last = Instant::now();
            let fences = self.leases.fences();
            if fences.is_empty() {
                continue;
            }
            match self
                .log
                .renew(&self.options.worker_id, &fences, self.options.lease)
            {
                Ok(held) => {
                    self.leases
                        .renewed(&fences, &held, last, self.options.lease);
                    for fence in &held {
                        if self.cancel_requested(fence.job_id) {
                            self.leases.cancel_requested(fence.job_id);
                        }
                    }
                }
                // Unrenewed, the leases run out on their own: no new step
                // starts once they do.
                Err(e) => eprintln!(
                    "job-executor worker {}: cannot renew leases: {e}",
                    self.options.worker_id
                ),
            }
        }
    }

    /// Whether the job's log has a cancel request.
    fn cancel_requested(&self, job_id: Uuid) -> bool {
        let mut requested = false;
        let _ = self.log.visit_job(job_id, &mut |record| {
            requested |= record.kind == "JobCancelRequested";
            true
        });
        requested
    }
}

/// How far a claimed job got.
enum Ended {
    /// Terminal (or found so): it leaves the queue.
    Finished,
    /// Stopped between steps, as asked: back to the queue.
    Stopped,
    /// Taken over by another worker.
    Lost,
    /// Its run failed; its lease will run out and someone else try.
    Failed(String),
}

fn is_terminal(status: JobStatus) -> bool {
    matches!(
        status,
        JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
    )
}

fn fenced(error: &ExecutorError) -> bool {
    matches!(error.store_error(), Some(StoreError::Fenced { .. }))
        || matches!(error, ExecutorError::Conflict { .. })
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
#[derive(Default)]
struct Leases {
    held: Mutex<HashMap<Uuid, Held>>,
}

struct Held {
    fence: Fence,
    valid_until: Instant,
    cancel_requested: CancelSignal,
}

/// The part of a lease not relied on: the server's and this host's clocks
/// may run at slightly different rates.
fn margin(lease: Duration) -> Duration {
    lease / 5
}

impl Leases {
    fn hold(&self, claim: &Claim, asked: Instant, lease: Duration) {
        lock(&self.held).insert(
            claim.fence.job_id,
            Held {
                fence: claim.fence,
                valid_until: asked + lease - margin(lease),
                cancel_requested: CancelSignal::new(),
            },
        );
    }

    fn drop_job(&self, job_id: Uuid) {
        lock(&self.held).remove(&job_id);
    }

    fn fences(&self) -> Vec<Fence> {
        lock(&self.held).values().map(|h| h.fence).collect()
    }

    fn renewed(&self, asked_for: &[Fence], held: &[Fence], asked: Instant, lease: Duration) {
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

    fn cancel_signal(&self, job_id: Uuid) -> Option<CancelSignal> {
        lock(&self.held)
            .get(&job_id)
            .map(|h| h.cancel_requested.clone())
    }

    fn cancel_requested(&self, job_id: Uuid) {
        if let Some(h) = lock(&self.held).get(&job_id) {
            h.cancel_requested.cancel();
        }
    }

    /// The fence for an append of `job_id`, and whether a step may start.
    fn fence(&self, job_id: Uuid) -> Option<(Fence, bool)> {
        lock(&self.held)
            .get(&job_id)
            .map(|h| (h.fence, Instant::now() < h.valid_until))
    }
}

/// The log as a worker's executor sees it: every append of a claimed job
/// carries the claim's fence, and a step does not start once the claim's
/// lease may have run out.
struct FencedStore {
    inner: Arc<dyn Log>,
    leases: Arc<Leases>,
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
