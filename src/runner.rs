//! Runs handlers off the executor's thread, against a deadline.
//!
//! The executor hands each step to a pooled worker thread and waits for the
//! outcome until the step's deadline. The hand-over is a hook the store runs
//! the moment the step's `StepStarted` is committed
//! ([`EventStore::append_then`](crate::store::EventStore::append_then)): with
//! group commit, the committing thread starts every handler of its batch
//! before it wakes their executors, and the deadline runs from there.
//!
//! Past the deadline, the executor raises the step's
//! [`CancelSignal`](crate::model::CancelSignal) and records a timeout; the
//! worker's late result goes nowhere. A handler that ignores the signal keeps
//! its worker, not the job: the pool starts another worker whenever none is
//! free, so a stuck handler never delays another step.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::handler::StepHandler;
use crate::model::FailureKind;
use crate::model::{ExecutionContext, JobStep, StepOutput};

/// What running a step's handler came to.
#[derive(Debug)]
pub(crate) enum Outcome {
    Succeeded(Value),
    Failed {
        failure: FailureKind,
        error: String,
        output: Option<Value>,
    },
}

/// An outcome, and whether it came past the step's deadline.
type Reply = (Outcome, bool);

struct Task {
    handler: Arc<dyn StepHandler>,
    call: StepCall,
}

/// A step handed to its handler: the step, its context, and where its
/// outcome goes. The executor's pool makes one for every step it runs; a
/// handler whose [`StepHandler::start`] takes it runs the step on a thread
/// of its own and settles it with [`complete`](Self::complete) or
/// [`fail`](Self::fail).
///
/// Dropping a call unsettled fails its step (`Execution error: the
/// handler's thread stopped without an outcome`). Settling it after the
/// step's deadline records nothing: the executor has recorded the timeout.
#[derive(Debug)]
pub struct StepCall {
    step: JobStep,
    context: ExecutionContext,
    reply: mpsc::SyncSender<Reply>,
}

impl StepCall {
    /// The step to run.
    pub fn step(&self) -> &JobStep {
        &self.step
    }

    /// What the handler may know about it; its deadline is already set.
    pub fn context(&self) -> &ExecutionContext {
        &self.context
    }

    /// Settles the step with what the handler returned, as if
    /// [`StepHandler::execute`] had returned it.
    pub fn complete(self, output: StepOutput) {
        let (reply, to) = self.settle(Ok(output));
        // After a timeout nobody listens: the late outcome is dropped here.
        let _ = to.send(reply);
    }

    /// Settles the step as failed the way a handler that panics fails it:
    /// `Execution error: <message>`, failure kind `panic`.
    pub fn fail(self, message: impl Into<String>) {
        let (reply, to) = self.settle(Err(message.into()));
        let _ = to.send(reply);
    }

    fn settle(self, result: Result<StepOutput, String>) -> (Reply, mpsc::SyncSender<Reply>) {
        let outcome = match result {
            Ok(out) if out.success => Outcome::Succeeded(out.output),
            Ok(out) => Outcome::Failed {
                failure: FailureKind::HandlerFailed,
                error: out.error.unwrap_or_else(|| "Step failed".to_owned()),
                output: Some(out.output),
            },
            Err(message) => Outcome::Failed {
                failure: FailureKind::Panic,
                error: format!("Execution error: {message}"),
                output: None,
            },
        };
        let late = self.context.deadline.is_some_and(|d| Instant::now() >= d);
        ((outcome, late), self.reply)
    }
}

/// A step handed (or about to be handed) to a worker: what its executor
/// waits on.
pub(crate) struct Dispatch {
    outcome: mpsc::Receiver<Reply>,
    cancel: crate::model::CancelSignal,
    timeout: Duration,
}

/// How long an idle worker polls for its next task before it sleeps: the
/// executor usually hands over the next step within two commits, and a
/// polling worker saves the wake-up (tens of microseconds) on each step.
const WORKER_SPIN: Duration = Duration::from_micros(250);
/// How long the executor polls for a quick handler's outcome before it sleeps.
const RESULT_SPIN: Duration = Duration::from_micros(50);

struct Shared {
    queue: Mutex<VecDeque<Task>>,
    ready: Condvar,
    queued: AtomicUsize,
    /// Workers available for a task and not yet promised to a submitter.
    idle: AtomicUsize,
    /// Workers polling for a task right now; at most `spinners_max`.
    spinning: AtomicUsize,
    /// Executor threads polling for an outcome right now; at most `spinners_max`.
    waiting: AtomicUsize,
    /// Jobs being driven right now. Polling only pays while every job can
    /// have a core: with more, the cores are better left to the work itself
    /// (measured: +26 % at two jobs on two cores, -10 to -30 % at four).
    jobs: AtomicUsize,
    /// The most jobs at which threads poll: the number of cores.
    polling_jobs_max: usize,
    spinners_max: usize,
    closed: AtomicBool,
}

/// A job being driven, counted while it lives.
pub(crate) struct JobGuard<'a>(&'a Shared);

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        self.0.jobs.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A pool of handler threads that grows when every worker is busy.
pub(crate) struct HandlerPool {
    shared: Arc<Shared>,
}

impl Drop for HandlerPool {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.ready.notify_all();
    }
}

impl HandlerPool {
    pub(crate) fn new() -> Self {
        // Leave a core to the executor threads: pollers beyond that only
        // steal time from the work they wait for.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        HandlerPool {
            shared: Arc::new(Shared {
                queue: Mutex::new(VecDeque::new()),
                ready: Condvar::new(),
                queued: AtomicUsize::new(0),
                idle: AtomicUsize::new(0),
                spinning: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                jobs: AtomicUsize::new(0),
                polling_jobs_max: cores,
                spinners_max: cores.saturating_sub(1).max(1),
                closed: AtomicBool::new(false),
            }),
        }
    }

    /// Counts a job as running until the guard is dropped.
    pub(crate) fn job(&self) -> JobGuard<'_> {
        self.shared.jobs.fetch_add(1, Ordering::SeqCst);
        JobGuard(&self.shared)
    }

    /// Prepares `step` for `handler`: returns the hook that hands it to a
    /// worker (or to the handler's own thread, when its
    /// [`StepHandler::start`] takes it) — to be called once the step's
    /// start is committed; its deadline runs from then — and what to wait
    /// on for its outcome.
    pub(crate) fn prepare(
        &self,
        handler: Arc<dyn StepHandler>,
        step: &JobStep,
        mut context: ExecutionContext,
    ) -> (Box<dyn FnOnce() + Send>, Dispatch) {
        let (reply, outcome) = mpsc::sync_channel(1);
        let timeout = Duration::from_secs(step.timeout_seconds);
        let dispatch = Dispatch {
            outcome,
            cancel: context.cancel.clone(),
            timeout,
        };
        let step = step.clone();
        let shared = self.shared.clone();
        let hook = Box::new(move || {
            context.deadline = Instant::now().checked_add(timeout);
            let call = StepCall {
                step,
                context,
                reply,
            };
            if let Some(call) = handler.start(call) {
                submit(&shared, Task { handler, call });
            }
        });
        (hook, dispatch)
    }

    /// Waits for the outcome of a step handed to a worker, until its
    /// deadline (counted from when this wait starts, which is after the
    /// hand-over, so never before the handler's own); past it, raises the
    /// step's cancel signal and returns a timeout.
    pub(crate) fn wait(&self, dispatch: Dispatch) -> Outcome {
        let deadline = Instant::now().checked_add(dispatch.timeout);
        match receive(&self.shared, &dispatch.outcome, deadline) {
            Ok((outcome, false)) => outcome,
            // A result that comes in after the deadline is as late as none.
            Ok((_, true)) | Err(RecvTimeoutError::Timeout) => {
                dispatch.cancel.cancel();
                Outcome::Failed {
                    failure: FailureKind::Timeout,
                    error: format!("timed out after {} s", dispatch.timeout.as_secs()),
                    output: None,
                }
            }
            Err(RecvTimeoutError::Disconnected) => Outcome::Failed {
                failure: FailureKind::Panic,
                error: "Execution error: the handler's thread stopped without an outcome".into(),
                output: None,
            },
        }
    }
}

/// Hands `task` to an idle worker, or starts a new one for it, so that no
/// task ever queues behind a busy (or stuck) handler.
fn submit(shared: &Arc<Shared>, task: Task) {
    let promised = shared
        .idle
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if promised {
        lock(&shared.queue).push_back(task);
        shared.queued.fetch_add(1, Ordering::SeqCst);
        shared.ready.notify_one();
        return;
    }
    let shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("job-executor-handler".into())
        .spawn(move || worker(task, &shared));
    if let Err(e) = spawned {
        // Without a thread the step cannot run; its reply channel is
        // dropped with the closure and the step fails as disconnected.
        eprintln!("job-executor: cannot start a handler thread: {e}");
    }
}
/// Waits for a handler's outcome: polls briefly (most handlers are quick),
/// then sleeps until the outcome or the deadline.
fn receive<T>(
    shared: &Shared,
    outcome: &mpsc::Receiver<T>,
    deadline: Option<Instant>,
) -> Result<T, RecvTimeoutError> {
    // Executors poll under a cap of their own: with many jobs on few cores,
    // pollers would only take the cores the handlers need.
    if polling_pays(shared) && claim(&shared.waiting, shared.spinners_max) {
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
        Some(deadline) => outcome.recv_timeout(deadline.saturating_duration_since(Instant::now())),
        None => outcome.recv().map_err(|_| RecvTimeoutError::Disconnected),
    }
}

fn polling_pays(shared: &Shared) -> bool {
    shared.jobs.load(Ordering::SeqCst) <= shared.polling_jobs_max
}

/// Takes one of `max` polling places, if one is free.
fn claim(pollers: &AtomicUsize, max: usize) -> bool {
    pollers
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Tasks are pushed and popped whole: a poisoned queue is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn worker(first: Task, shared: &Shared) {
    let mut task = first;
    loop {
        let (outcome, reply) = run_task(task);
        // Idle before replying: the executor hands its next step over the
        // moment it has this outcome, and must find this worker free rather
        // than start another one.
        shared.idle.fetch_add(1, Ordering::SeqCst);
        // After a timeout nobody listens: the late outcome is dropped here.
        let _ = reply.send(outcome);
        match next_task(shared) {
            Some(next) => task = next,
            // The pool is gone.
            None => return,
        }
    }
}

fn try_pop(shared: &Shared) -> Option<Task> {
    if shared.queued.load(Ordering::SeqCst) == 0 {
        return None;
    }
    let task = lock(&shared.queue).pop_front();
    if task.is_some() {
        shared.queued.fetch_sub(1, Ordering::SeqCst);
    }
    task
}

fn next_task(shared: &Shared) -> Option<Task> {
    if polling_pays(shared) && claim(&shared.spinning, shared.spinners_max) {
        let polling_until = Instant::now() + WORKER_SPIN;
        while Instant::now() < polling_until && !shared.closed.load(Ordering::SeqCst) {
            if let Some(task) = try_pop(shared) {
                shared.spinning.fetch_sub(1, Ordering::SeqCst);
                return Some(task);
            }
            std::hint::spin_loop();
        }
        shared.spinning.fetch_sub(1, Ordering::SeqCst);
    }
    let mut queue = lock(&shared.queue);
    loop {
        if let Some(task) = queue.pop_front() {
            shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Some(task);
        }
        if shared.closed.load(Ordering::SeqCst) {
            return None;
        }
        queue = shared
            .ready
            .wait(queue)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
}

fn run_task(task: Task) -> (Reply, mpsc::SyncSender<Reply>) {
    let Task { handler, call } = task;
    // The handler only gets shared references, so a panic cannot leave
    // anything half-changed: asserting unwind safety is sound.
    let result = catch_unwind(AssertUnwindSafe(|| {
        handler.execute(&call.step, &call.context)
    }))
    .map_err(|payload| panic_message(payload.as_ref()));
    call.settle(result)
}

/// The message a panic was raised with.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "handler panicked".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_polling_place_is_not_counted() {
        let pollers = AtomicUsize::new(0);
        assert!(claim(&pollers, 1));
        // Refused while taken, without raising the count: a leak here
        // would stop every later poller for good.
        assert!(!claim(&pollers, 1));
        assert!(!claim(&pollers, 1));
        assert_eq!(pollers.load(Ordering::SeqCst), 1);
        pollers.fetch_sub(1, Ordering::SeqCst);
        assert!(claim(&pollers, 1));
    }
}
