//! The simulated fleet: workers made of the engine's public parts — the
//! very composition of `Worker::run` (`Leases`, `FencedStore`,
//! `JobExecutor::take_up` under a `RunControl`, `Ended`, `release`), each
//! slot and the lease renewer an actor of its own — and the canceller, an
//! executor elsewhere that asks jobs to cancel. Handlers count their calls
//! and take the time the world gives them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use job_executor::clock::Clock;
use job_executor::events::JobClaimed;
use job_executor::executor::{CancelRequest, RunControl};
use job_executor::store::Log;
use job_executor::worker::{Ended, FencedStore, Leases};
use job_executor::{ExecutionContext, JobExecutor, JobStep, StepCall, StepHandler, StepOutput};
use uuid::Uuid;

use super::baton;
use super::log::SimLog;
use super::time::SimClock;
use super::world::{LEASE_MICROS, World};

/// The step type the fleet's handler is registered for.
pub const STEP_TYPE: &str = "sim";

/// A step handler of the simulation: it takes every step to the world,
/// which counts the call and settles it when the scheduler says.
struct SimHandler(Arc<World>);

impl StepHandler for SimHandler {
    fn execute(&self, step: &JobStep, context: &ExecutionContext) -> StepOutput {
        let mut world = self.0.lock();
        let job = world.job(context.job_id);
        world.violation(format!(
            "{job}: step {} was called on a pool thread instead of being started",
            step.step_index
        ));
        StepOutput::failed("not simulated")
    }

    fn start(&self, call: StepCall) -> Option<StepCall> {
        self.0.lock().handler_started(baton::current(), call);
        None
    }
}

/// A lease's length.
pub fn lease() -> Duration {
    Duration::from_micros(LEASE_MICROS)
}

/// How often an idle slot looks for work.
const IDLE_POLL: Duration = Duration::from_millis(400);

/// One incarnation of a worker: what its actors share.
pub struct WorkerParts {
    pub name: String,
    pub log: Arc<SimLog>,
    pub clock: Arc<SimClock>,
    pub leases: Arc<Leases>,
    pub executor: JobExecutor,
    /// Raised: stop as on SIGTERM.
    pub stop: Arc<AtomicBool>,
    /// Slots still running (the renewer renews until none is).
    pub slots: Arc<AtomicUsize>,
}

impl WorkerParts {
    /// A worker named `name` on `log`, timed by `clock`, with `slots`
    /// slots.
    pub fn new(name: String, log: Arc<SimLog>, clock: Arc<SimClock>, slots: usize) -> Self {
        let leases = Arc::new(Leases::with_clock(clock.clone()));
        let fenced = Arc::new(FencedStore::new(log.clone(), leases.clone()));
        let mut executor = JobExecutor::builder()
            .store(fenced)
            .clock(clock.clone())
            .build();
        executor.register_handler(STEP_TYPE, SimHandler(log.world.clone()));
        WorkerParts {
            name,
            log,
            clock,
            leases,
            executor,
            stop: Arc::default(),
            slots: Arc::new(AtomicUsize::new(slots)),
        }
    }

    /// A slot: claims and runs jobs one after the other until asked to
    /// stop, as `Worker::run`'s slots do.
    pub fn slot(self: Arc<Self>) {
        let log: &dyn Log = &*self.log;
        while !self.stop.load(Ordering::SeqCst) {
            let claim = match self.leases.claim(log, &self.name, lease()) {
                Ok(Some(claim)) => claim,
                Ok(None) | Err(_) => {
                    self.clock.sleep(IDLE_POLL);
                    continue;
                }
            };
            let job_id = claim.fence.job_id;
            // The run records the claim, as a worker's does: first, or
            // after the outcome of a step it finds in doubt.
            let mut control = RunControl::new().stop_on(&self.stop).claimed(JobClaimed {
                worker_id: self.name.clone(),
                host: "sim".into(),
                epoch: claim.fence.epoch,
                taken_over_from: claim.taken_over_from.clone(),
                recorded_outcome: None,
            });
            if let Some(signal) = self.leases.cancel_signal(job_id) {
                control = control.cancel_signal(signal);
            }
            let ended = Ended::of(&self.executor.take_up(&claim.job, &self.name, control));
            self.leases.let_go(job_id);
            if let Some(finished) = ended.releases() {
                let _ = log.release(claim.fence, finished);
            }
            let mut world = self.log.world.lock();
            let job = world.job(job_id);
            world.trace(format!("{} ends its run of {job}: {ended:?}", self.name));
        }
        self.slots.fetch_sub(1, Ordering::SeqCst);
    }

    /// The renewer: renews the leases held every third of a lease while
    /// a slot runs, as `Worker::run`'s renewal thread does.
    pub fn renewer(self: Arc<Self>) {
        while self.slots.load(Ordering::SeqCst) > 0 {
            self.clock.sleep(lease() / 3);
            let _ = self.leases.renew(&*self.log, &self.name, lease());
        }
    }
}

/// The canceller: an executor elsewhere, unfenced, that now and then
/// cancels a job — queued, running or ended.
pub fn canceller(log: Arc<SimLog>, clock: Arc<SimClock>, jobs: Vec<Uuid>) {
    let executor = JobExecutor::builder()
        .store(log.clone())
        .clock(clock.clone())
        .build();
    loop {
        let (pause, job) = {
            let mut world = log.world.lock();
            let pause = world.rng.between(LEASE_MICROS / 4, 4 * LEASE_MICROS);
            let job = jobs[world.rng.below(jobs.len() as u64) as usize];
            (Duration::from_micros(pause), job)
        };
        clock.sleep(pause);
        if log.world.lock().draining {
            continue;
        }
        let asked = executor.cancel(&*log, job, "simulated cancel");
        let mut world = log.world.lock();
        if let Ok(CancelRequest::Recorded { .. } | CancelRequest::CancelledBeforeStart) = asked {
            world.counters.cancels += 1;
        }
        let job = world.job(job);
        world.trace(format!("cancel {job}: {asked:?}"));
    }
}
