//! Runs handlers off the executor's thread, against a deadline.
//!
//! The executor hands each step to a pooled worker thread and waits for the
//! outcome until the step's deadline. Past it, the executor raises the
//! step's [`CancelSignal`](crate::model::CancelSignal) and records a timeout;
//! the worker's late result goes nowhere. A handler that ignores the signal
//! keeps its worker, not the job: the pool starts another worker whenever
//! none is free, so a stuck handler never delays another step.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;

use crate::events::FailureKind;
use crate::handler::StepHandler;
use crate::model::{ExecutionContext, JobStep};

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

struct Task {
    handler: Arc<dyn StepHandler>,
    step: JobStep,
    context: ExecutionContext,
    reply: mpsc::SyncSender<Outcome>,
}

/// A pool of handler threads that grows when every worker is busy.
pub(crate) struct HandlerPool {
    tasks: Mutex<mpsc::Sender<Task>>,
    queue: Arc<Mutex<mpsc::Receiver<Task>>>,
    /// Workers waiting for a task and not yet promised to a submitter.
    idle: Arc<AtomicUsize>,
}

impl HandlerPool {
    pub(crate) fn new() -> Self {
        let (tasks, queue) = mpsc::channel();
        HandlerPool {
            tasks: Mutex::new(tasks),
            queue: Arc::new(Mutex::new(queue)),
            idle: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// Runs `handler` on a worker and waits for its outcome until the
    /// context's deadline; past it, raises the cancel signal and returns a
    /// timeout.
    pub(crate) fn run(
        &self,
        handler: Arc<dyn StepHandler>,
        step: &JobStep,
        context: &ExecutionContext,
    ) -> Outcome {
        let (reply, outcome) = mpsc::sync_channel(1);
        let task = Task {
            handler,
            step: step.clone(),
            context: context.clone(),
            reply,
        };
        self.submit(task);
        let received = match context.deadline {
            Some(deadline) => {
                outcome.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            }
            None => outcome.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let past_deadline = || context.deadline.is_some_and(|d| Instant::now() >= d);
        match received {
            // A result that comes in after the deadline is as late as none.
            Ok(outcome) if !past_deadline() => outcome,
            Ok(_) | Err(RecvTimeoutError::Timeout) => {
                context.cancel.cancel();
                Outcome::Failed {
                    failure: FailureKind::Timeout,
                    error: format!("timed out after {} s", step.timeout_seconds),
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

    fn submit(&self, task: Task) {
        // Promise the task to an idle worker, or start a new one for it, so
        // that no task ever queues behind a busy (or stuck) handler.
        let promised = self
            .idle
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if promised {
            let sent = self
                .tasks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .send(task);
            // The receiver lives as long as the pool: sending cannot fail.
            debug_assert!(sent.is_ok());
            return;
        }
        let (queue, idle) = (self.queue.clone(), self.idle.clone());
        let spawned = std::thread::Builder::new()
            .name("job-executor-handler".into())
            .spawn(move || worker(task, &queue, &idle));
        if let Err(e) = spawned {
            // Without a thread the step cannot run; its reply channel is
            // dropped with the closure and the step fails as disconnected.
            eprintln!("job-executor: cannot start a handler thread: {e}");
        }
    }
}

fn worker(first: Task, queue: &Mutex<mpsc::Receiver<Task>>, idle: &AtomicUsize) {
    run_task(first);
    loop {
        idle.fetch_add(1, Ordering::SeqCst);
        let next = queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .recv();
        match next {
            Ok(task) => run_task(task),
            // The pool is gone.
            Err(_) => return,
        }
    }
}

fn run_task(task: Task) {
    let Task {
        handler,
        step,
        context,
        reply,
    } = task;
    // The handler only gets shared references, so a panic cannot leave
    // anything half-changed: asserting unwind safety is sound.
    let outcome = match catch_unwind(AssertUnwindSafe(|| handler.execute(&step, &context))) {
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
    };
    // After a timeout nobody listens: the late outcome is dropped here.
    let _ = reply.send(outcome);
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
