//! Runs handlers off the executor's thread, against a deadline.
//!
//! A step's deadline is `timeout_seconds` after its `StepStarted` was
//! recorded. The executor hands each step to a pooled worker thread by a
//! hook the store runs the moment the `StepStarted` is committed
//! ([`EventStore::append_then`](crate::store::EventStore::append_then)) —
//! with group commit, the committing thread starts every handler of its
//! batch before it wakes their executors — and waits for the outcome until
//! the deadline. Past it, the executor raises the step's
//! [`CancelSignal`](crate::model::CancelSignal) and records a timeout; the
//! worker's late result goes nowhere.
//!
//! The pool is bounded ([`PoolOptions`]): it starts a worker whenever none
//! is free, up to `threads_max`; at the cap, a step waits for a free worker.
//! A handler that ignores its deadline therefore holds a worker, never its
//! job: a step still waiting for a worker at its deadline times out without
//! its handler ever starting (and it never starts later), and a step whose
//! handler overruns times out as any other. Workers idle for
//! `idle_keep_alive` exit.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::handler::{Outcome, Reply, StepCall, StepHandler};
use crate::model::{CancelSignal, ExecutionContext, FailureKind, JobStep};
use crate::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use crate::sync::{Condvar, Mutex, lock, mpsc, panic_message, recv_timeout, thread, wait_timeout};

/// How the handler pool is sized and whether its threads poll.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolOptions {
    /// The most handler threads at once (default 64), in each of the
    /// executor's two pools: the one steps are handed to, and the one whose
    /// threads drive whole jobs, calling their handlers themselves. At the
    /// cap a handed-over step waits for a free worker, against its own
    /// deadline; a job finding no free driver is driven by its caller's
    /// thread.
    pub threads_max: usize,
    /// How long an idle worker waits for more work before it exits
    /// (default 60 s).
    pub idle_keep_alive: Duration,
    /// Whether idle workers and waiting executors poll briefly before they
    /// sleep (default off). It saves a thread wake-up per step, which pays
    /// while there are no more jobs than cores, at the price of CPU time.
    pub polling: bool,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            threads_max: 64,
            idle_keep_alive: Duration::from_secs(60),
            polling: false,
        }
    }
}

/// Hands a prepared step to a worker; the store calls it once the step's
/// `StepStarted` is committed.
pub(crate) type Handover = Box<dyn FnOnce() + Send>;

impl PoolOptions {
    /// With at most `threads` handler threads (at least 1).
    pub fn with_threads_max(mut self, threads: usize) -> Self {
        self.threads_max = threads;
        self
    }

    /// With idle workers exiting after `keep_alive`.
    pub fn with_idle_keep_alive(mut self, keep_alive: Duration) -> Self {
        self.idle_keep_alive = keep_alive;
        self
    }

    /// With polling on or off.
    pub fn with_polling(mut self, polling: bool) -> Self {
        self.polling = polling;
        self
    }
}

/// Who got to a queued task first: a worker starting it, or its executor
/// giving up on it at the deadline.
const WAITING: u8 = 0;
const STARTED: u8 = 1;
const ABANDONED: u8 = 2;

struct Task {
    handler: Arc<dyn StepHandler>,
    call: StepCall,
    claim: Arc<AtomicU8>,
}

/// A step handed (or about to be handed) to a worker: what its executor
/// waits on.
pub(crate) struct Dispatch {
    outcome: mpsc::Receiver<Reply>,
    claim: Arc<AtomicU8>,
    cancel: CancelSignal,
    deadline: Option<Instant>,
    timeout_seconds: u64,
}

/// How long an idle worker polls for its next task before it sleeps: the
/// executor usually hands over the next step within two commits, and a
/// polling worker saves a thread wake-up on each step.
const WORKER_SPIN: Duration = Duration::from_micros(250);
/// How long the executor polls for a quick handler's outcome before it sleeps.
const RESULT_SPIN: Duration = Duration::from_micros(50);

/// What a pool thread runs: a step's handler, or a whole job's run.
pub(crate) type Work = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct PoolState {
    queue: VecDeque<Work>,
    /// Workers alive.
    threads: usize,
    /// Workers asleep, waiting for a task.
    idle: usize,
    /// Wake-ups sent to idle workers and not yet taken: an idle worker is
    /// only counted free while it has not been called on.
    wakeups: usize,
    closed: bool,
}

struct Shared {
    options: PoolOptions,
    state: Mutex<PoolState>,
    ready: Condvar,
    /// Tasks queued, readable without the lock (for polling workers).
    queued: AtomicUsize,
    /// Workers polling for a task right now; at most `spinners_max`.
    spinning: AtomicUsize,
    /// Executor threads polling for an outcome right now; at most `spinners_max`.
    waiting: AtomicUsize,
    /// Jobs running right now. Polling only pays while every job can have
    /// a core: with more, a poller takes a core from the work it waits for.
    jobs: AtomicUsize,
    /// The most jobs at which threads poll: the number of cores.
    polling_jobs_max: usize,
    spinners_max: usize,
}

/// A job being driven, counted while it lives.
pub(crate) struct JobGuard<'a>(&'a Shared);

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        self.0.jobs.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A bounded pool of handler threads.
pub(crate) struct HandlerPool {
    shared: Arc<Shared>,
}

impl Drop for HandlerPool {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.ready.notify_all();
    }
}

impl HandlerPool {
    pub(crate) fn new(options: PoolOptions) -> Self {
        // Leave a core to the executor threads: pollers beyond that only
        // steal time from the work they wait for.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        HandlerPool {
            shared: Arc::new(Shared {
                options: PoolOptions {
                    threads_max: options.threads_max.max(1),
                    ..options
                },
                state: Mutex::new(PoolState::default()),
                ready: Condvar::new(),
                queued: AtomicUsize::new(0),
                spinning: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                jobs: AtomicUsize::new(0),
                polling_jobs_max: cores,
                spinners_max: cores.saturating_sub(1).max(1),
            }),
        }
    }

    /// Counts a job as running until the guard is dropped.
    pub(crate) fn job(&self) -> JobGuard<'_> {
        self.shared.jobs.fetch_add(1, Ordering::SeqCst);
        JobGuard(&self.shared)
    }

    /// Prepares `step` for `handler`, to run against `context.deadline`:
    /// returns the hook that hands it to a worker (or to the handler's own
    /// thread, when its [`StepHandler::start`] takes it) — to be called
    /// once the step's start is committed — and what to wait on for its
    /// outcome.
    pub(crate) fn prepare(
        &self,
        handler: Arc<dyn StepHandler>,
        step: &JobStep,
        context: ExecutionContext,
    ) -> (Handover, Dispatch) {
        let (call, outcome) = StepCall::new(step.clone(), context);
        let claim = Arc::new(AtomicU8::new(WAITING));
        let dispatch = Dispatch {
            outcome,
            claim: claim.clone(),
            cancel: call.context().cancel.clone(),
            deadline: call.context().deadline,
            timeout_seconds: step.timeout_seconds,
        };
        let shared = self.shared.clone();
        let hand_over = move || match handler.start(call) {
            Some(call) => {
                let task = Task {
                    handler,
                    call,
                    claim,
                };
                submit(&shared, Box::new(move || run_task(task)));
            }
            // The handler runs it on a thread of its own: it has started,
            // whatever the pool's workers are doing.
            None => {
                let _ =
                    claim.compare_exchange(WAITING, STARTED, Ordering::SeqCst, Ordering::SeqCst);
            }
        };
        (Box::new(hand_over), dispatch)
    }

    /// Runs `work` on a pool thread if one is idle or may be started;
    /// gives it back at the cap, where it would have to wait.
    pub(crate) fn try_run(&self, work: Work) -> Result<(), Work> {
        let shared = &self.shared;
        let mut state = lock(&shared.state);
        if state.idle > state.wakeups {
            state.wakeups += 1;
            state.queue.push_back(work);
            shared.queued.fetch_add(1, Ordering::SeqCst);
            drop(state);
            shared.ready.notify_one();
            return Ok(());
        }
        if state.threads >= shared.options.threads_max {
            return Err(work);
        }
        state.threads += 1;
        state.queue.push_back(work);
        shared.queued.fetch_add(1, Ordering::SeqCst);
        drop(state);
        spawn_worker(shared);
        Ok(())
    }

    /// Waits for the outcome of a step handed to a worker, until its
    /// deadline; past it, raises the step's cancel signal and returns a
    /// timeout.
    pub(crate) fn wait(&self, dispatch: Dispatch) -> Outcome {
        let timed_out = |detail: &str| timed_out(dispatch.timeout_seconds, detail);
        match receive(&self.shared, &dispatch.outcome, dispatch.deadline) {
            Ok((outcome, false)) => outcome,
            // A result that comes in after the deadline is as late as none.
            Ok((_, true)) | Err(mpsc::RecvTimeoutError::Timeout) => {
                dispatch.cancel.cancel();
                let never_started = dispatch
                    .claim
                    .compare_exchange(WAITING, ABANDONED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok();
                if never_started {
                    timed_out(&format!(
                        " (the handler never started: all {} handler threads were busy)",
                        self.shared.options.threads_max
                    ))
                } else {
                    timed_out("")
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Outcome::abandoned(),
        }
    }
}

/// Queues `work` and makes sure a worker will take it: an idle one is woken,
/// or, while under the cap, a new one is started. At the cap it waits for
/// the first worker to finish.
fn submit(shared: &Arc<Shared>, work: Work) {
    let mut state = lock(&shared.state);
    state.queue.push_back(work);
    shared.queued.fetch_add(1, Ordering::SeqCst);
    if state.idle > state.wakeups {
        state.wakeups += 1;
        drop(state);
        shared.ready.notify_one();
        return;
    }
    if state.threads >= shared.options.threads_max {
        return;
    }
    state.threads += 1;
    drop(state);
    spawn_worker(shared);
}

/// Starts a worker, already counted in `threads`.
fn spawn_worker(shared: &Arc<Shared>) {
    let worker_shared = shared.clone();
    let spawned = thread::Builder::new()
        .name("job-executor-handler".into())
        .spawn(move || worker(&worker_shared));
    if let Err(e) = spawned {
        // Without a thread the work stays queued for the next free worker;
        // if there is none, a step's executor times out at the deadline.
        lock(&shared.state).threads -= 1;
        eprintln!("job-executor: cannot start a handler thread: {e}");
    }
}

/// Waits for a handler's outcome: with polling, briefly polls first (most
/// handlers are quick), then sleeps until the outcome or the deadline.
fn receive<T>(
    shared: &Shared,
    outcome: &mpsc::Receiver<T>,
    deadline: Option<Instant>,
) -> Result<T, mpsc::RecvTimeoutError> {
    // Executors poll under a cap of their own: with many jobs on few cores,
    // pollers would only take the cores the handlers need.
    if polling_pays(shared) && claim_place(&shared.waiting, shared.spinners_max) {
        let polling_until = Instant::now() + RESULT_SPIN;
        while Instant::now() < polling_until {
            match outcome.try_recv() {
                Ok(outcome) => {
                    shared.waiting.fetch_sub(1, Ordering::SeqCst);
                    return Ok(outcome);
                }
                Err(mpsc::TryRecvError::Disconnected) => break,
                Err(mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
            }
        }
        shared.waiting.fetch_sub(1, Ordering::SeqCst);
    }
    match deadline {
        Some(deadline) => recv_timeout(outcome, deadline.saturating_duration_since(Instant::now())),
        None => outcome
            .recv()
            .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
    }
}

fn polling_pays(shared: &Shared) -> bool {
    shared.options.polling && shared.jobs.load(Ordering::SeqCst) <= shared.polling_jobs_max
}

/// Takes one of `max` polling places, if one is free.
fn claim_place(pollers: &AtomicUsize, max: usize) -> bool {
    pollers
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

fn worker(shared: &Shared) {
    while let Some(work) = next_task(shared) {
        work();
    }
}

/// The next task for a worker, or `None` when it should exit: the pool is
/// gone, or it stayed idle for the keep-alive.
fn next_task(shared: &Shared) -> Option<Work> {
    if polling_pays(shared) && claim_place(&shared.spinning, shared.spinners_max) {
        let polling_until = Instant::now() + WORKER_SPIN;
        while Instant::now() < polling_until && shared.queued.load(Ordering::SeqCst) == 0 {
            std::hint::spin_loop();
        }
        shared.spinning.fetch_sub(1, Ordering::SeqCst);
    }
    let keep_alive = shared.options.idle_keep_alive;
    let mut state = lock(&shared.state);
    loop {
        if let Some(task) = state.queue.pop_front() {
            shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Some(task);
        }
        if state.closed {
            state.threads -= 1;
            return None;
        }
        state.idle += 1;
        let slept = Instant::now();
        state = wait_timeout(&shared.state, &shared.ready, state, keep_alive);
        state.idle -= 1;
        if state.wakeups > 0 {
            // Called on (if not this worker, another one that also woke):
            // look at the queue again.
            state.wakeups -= 1;
        } else if slept.elapsed() >= keep_alive && state.queue.is_empty() && !state.closed {
            state.threads -= 1;
            return None;
        }
    }
}

/// Calls `handler` for `step`, catching a panic as the step's failure.
pub(crate) fn call(
    handler: &dyn StepHandler,
    step: &JobStep,
    context: &ExecutionContext,
) -> Outcome {
    // The handler only gets shared references, so a panic cannot leave
    // anything half-changed: asserting unwind safety is sound.
    match catch_unwind(AssertUnwindSafe(|| handler.execute(step, context))) {
        Ok(out) => Outcome::of(out),
        Err(payload) => Outcome::Failed {
            failure: FailureKind::Panic,
            error: format!("Execution error: {}", panic_message(payload.as_ref())),
            output: None,
        },
    }
}

/// Runs `step` on this thread as [`call`] does — unless its handler takes
/// the step to a thread of its own ([`StepHandler::start`]): then waits for
/// its outcome until the step's deadline (past it, the outcome is a
/// timeout, as late as none).
pub(crate) fn call_or_start(
    handler: &dyn StepHandler,
    step: &JobStep,
    context: &ExecutionContext,
) -> Outcome {
    let (started, outcome) = StepCall::new(step.clone(), context.clone());
    let Some(started) = handler.start(started) else {
        let answered = match context.deadline {
            Some(deadline) => {
                recv_timeout(&outcome, deadline.saturating_duration_since(Instant::now()))
            }
            None => outcome
                .recv()
                .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        };
        return match answered {
            Ok((outcome, false)) => outcome,
            Ok((_, true)) | Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out(step.timeout_seconds, "")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Outcome::abandoned(),
        };
    };
    call(handler, started.step(), started.context())
}

/// The outcome of a step whose deadline passed before its handler answered.
pub(crate) fn timed_out(timeout_seconds: u64, detail: &str) -> Outcome {
    Outcome::Failed {
        failure: FailureKind::Timeout,
        error: format!("timed out after {timeout_seconds} s{detail}"),
        output: None,
    }
}

fn run_task(task: Task) {
    let Task {
        handler,
        call: started,
        claim,
    } = task;
    if claim
        .compare_exchange(WAITING, STARTED, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        // Its executor gave up at the deadline before a worker was free:
        // the step is recorded timed out, and its handler never runs.
        return;
    }
    let outcome = call(handler.as_ref(), started.step(), started.context());
    started.send(outcome);
}

#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use super::*;

    #[test]
    fn a_refused_polling_place_is_not_counted() {
        let pollers = AtomicUsize::new(0);
        assert!(claim_place(&pollers, 1));
        // Refused while taken, without raising the count: a leak here
        // would stop every later poller for good.
        assert!(!claim_place(&pollers, 1));
        assert!(!claim_place(&pollers, 1));
        assert_eq!(pollers.load(Ordering::SeqCst), 1);
        pollers.fetch_sub(1, Ordering::SeqCst);
        assert!(claim_place(&pollers, 1));
    }
}

#[cfg(all(test, feature = "shuttle"))]
mod model_check {
    //! The hand-off of steps to the pool under the model checker: three
    //! executors hand a step each to a pool capped at two threads whose idle
    //! workers exit at once, and wait — the scheduler decides when a wait
    //! times out. In every interleaving each handler runs at most once, a
    //! step reported never started is never started later, a success is
    //! reported only for a handler that ran, and nothing deadlocks.

    use shuttle::sync::atomic::AtomicUsize;

    use super::*;
    use serde_json::Value;

    use crate::model::StepOutput;

    const EXECUTORS: usize = 3;

    fn scenario() {
        let options = PoolOptions::default()
            .with_threads_max(2)
            .with_idle_keep_alive(Duration::ZERO);
        let pool = Arc::new(HandlerPool::new(options));
        let calls: Arc<Vec<AtomicUsize>> =
            Arc::new((0..EXECUTORS).map(|_| AtomicUsize::new(0)).collect());
        let executors: Vec<_> = (0..EXECUTORS)
            .map(|n| {
                let (pool, calls) = (pool.clone(), calls.clone());
                thread::spawn(move || {
                    let handler_calls = calls.clone();
                    let handler: Arc<dyn StepHandler> =
                        Arc::new(move |_: &JobStep, _: &ExecutionContext| {
                            handler_calls[n].fetch_add(1, Ordering::SeqCst);
                            StepOutput::succeeded(Value::Null)
                        });
                    let step = JobStep::new(0, "model", "t");
                    let mut context = ExecutionContext::new(
                        uuid::Uuid::nil(),
                        uuid::Uuid::nil(),
                        &step,
                        "model",
                        chrono::DateTime::default(),
                    );
                    context.deadline = Instant::now().checked_add(Duration::from_secs(300));
                    let (hand_over, dispatch) = pool.prepare(handler, &step, context);
                    hand_over();
                    let outcome = pool.wait(dispatch);
                    let ran = calls[n].load(Ordering::SeqCst);
                    match &outcome {
                        Outcome::Succeeded(_) => assert_eq!(ran, 1),
                        Outcome::Failed { error, .. } if error.contains("never started") => {
                            assert_eq!(ran, 0)
                        }
                        Outcome::Failed { failure, .. } => {
                            assert_eq!(*failure, FailureKind::Timeout);
                            assert!(ran <= 1);
                        }
                    }
                    outcome
                })
            })
            .collect();
        let outcomes: Vec<Outcome> = executors.into_iter().map(|e| e.join().unwrap()).collect();
        drop(pool);
        for (n, outcome) in outcomes.iter().enumerate() {
            let ran = calls[n].load(Ordering::SeqCst);
            assert!(ran <= 1, "handler {n} ran {ran} times");
            if let Outcome::Failed { error, .. } = outcome
                && error.contains("never started")
            {
                assert_eq!(ran, 0, "handler {n} started after it was given up");
            }
        }
    }

    #[test]
    fn handler_hand_off_model_check() {
        shuttle::check_pct(scenario, 3_000, 3);
    }
}
