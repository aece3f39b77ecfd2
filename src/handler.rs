//! What the executor calls out to: step handlers and the health observer.
//!
//! Both are reached only through shared references (`&self`, `&JobStep`,
//! `&ExecutionContext`): a handler cannot change the plan or the contract
//! (EXEC-005), and an observer cannot be asked to change health (EXEC-004).

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::model::{ExecutionContext, FailureKind, JobStep, StepOutput};
use crate::sync::mpsc;

/// Performs one type of step.
///
/// Any `Fn(&JobStep, &ExecutionContext) -> StepOutput + Send + Sync` closure
/// is a handler, and so is an `Arc` of a handler.
///
/// ```
/// use job_executor::{JobExecutor, JobStep, StepOutput};
///
/// let mut executor = JobExecutor::new();
/// executor.register_handler("echo", |step: &JobStep, _: &_| {
///     StepOutput::succeeded(serde_json::json!({ "target": step.target }))
/// });
/// ```
pub trait StepHandler: Send + Sync {
    /// Runs `step`. A panic is caught and recorded as the step's failure.
    fn execute(&self, step: &JobStep, context: &ExecutionContext) -> StepOutput;

    /// Starts a step on a thread of the handler's own instead of the
    /// executor's pool, which then never calls [`execute`](Self::execute)
    /// for it: for handlers whose code must run on threads their host
    /// creates (an embedding interpreter's). Returning the call hands it
    /// to the pool, which is what the default does.
    ///
    /// It runs on the thread that committed the step's `StepStarted`, so it
    /// must hand the call over and return at once. The step's deadline
    /// holds as for any handler: past it the executor records a timeout,
    /// and settling the call later records nothing.
    fn start(&self, call: StepCall) -> Option<StepCall> {
        Some(call)
    }
}

impl<F> StepHandler for F
where
    F: Fn(&JobStep, &ExecutionContext) -> StepOutput + Send + Sync,
{
    fn execute(&self, step: &JobStep, context: &ExecutionContext) -> StepOutput {
        self(step, context)
    }
}

impl<H: StepHandler + ?Sized> StepHandler for Arc<H> {
    fn execute(&self, step: &JobStep, context: &ExecutionContext) -> StepOutput {
        (**self).execute(step, context)
    }

    fn start(&self, call: StepCall) -> Option<StepCall> {
        (**self).start(call)
    }
}

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

impl Outcome {
    /// The outcome a handler's output stands for.
    pub(crate) fn of(out: StepOutput) -> Outcome {
        if out.success {
            Outcome::Succeeded(out.output)
        } else {
            Outcome::Failed {
                failure: FailureKind::HandlerFailed,
                error: out.error.unwrap_or_else(|| "Step failed".to_owned()),
                output: Some(out.output),
            }
        }
    }

    /// The outcome of a step whose call was dropped unsettled.
    pub(crate) fn abandoned() -> Outcome {
        Outcome::Failed {
            failure: FailureKind::Panic,
            error: "Execution error: the handler's thread stopped without an outcome".into(),
            output: None,
        }
    }
}

/// An outcome, and whether it came past the step's deadline.
pub(crate) type Reply = (Outcome, bool);

/// A step handed to its handler: the step, its context, and where its
/// outcome goes. The executor makes one for every step it runs; a handler
/// whose [`StepHandler::start`] takes it runs the step on a thread of its
/// own and settles it with [`complete`](Self::complete) or
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
    /// A call of `step`, and where its outcome will come in.
    pub(crate) fn new(
        step: JobStep,
        context: ExecutionContext,
    ) -> (StepCall, mpsc::Receiver<Reply>) {
        let (reply, outcome) = mpsc::sync_channel(1);
        (
            StepCall {
                step,
                context,
                reply,
            },
            outcome,
        )
    }

    /// The step to run.
    pub fn step(&self) -> &JobStep {
        &self.step
    }

    /// What the handler may know about it, its deadline included.
    pub fn context(&self) -> &ExecutionContext {
        &self.context
    }

    /// Settles the step with what the handler returned, as if
    /// [`StepHandler::execute`] had returned it.
    pub fn complete(self, output: StepOutput) {
        self.send(Outcome::of(output));
    }

    /// Settles the step as failed the way a handler that panics fails it:
    /// `Execution error: <message>`, failure kind `panic`.
    pub fn fail(self, message: impl Into<String>) {
        self.send(Outcome::Failed {
            failure: FailureKind::Panic,
            error: format!("Execution error: {}", message.into()),
            output: None,
        });
    }

    /// Settles the step with `outcome`, noting whether it came late.
    pub(crate) fn send(self, outcome: Outcome) {
        let late = self.context.deadline.is_some_and(|d| Instant::now() >= d);
        // After a timeout nobody listens: the late outcome is dropped here.
        let _ = self.reply.send((outcome, late));
    }
}

/// Reads the current health of the platform. Read-only by contract: the
/// executor records what it returns and never asks for anything else.
pub trait HealthObserver: Send + Sync {
    /// A snapshot of current health.
    fn observe_health(&self) -> Value;
}

/// A handler that always succeeds with an empty output object.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoOpHandler;

impl StepHandler for NoOpHandler {
    fn execute(&self, _step: &JobStep, _context: &ExecutionContext) -> StepOutput {
        StepOutput::succeeded(Value::Object(serde_json::Map::new()))
    }
}

/// A handler that always fails with a fixed message.
#[derive(Clone, Debug)]
pub struct FailingHandler {
    error_message: String,
}

impl FailingHandler {
    /// A handler failing with `error_message`.
    pub fn new(error_message: impl Into<String>) -> Self {
        FailingHandler {
            error_message: error_message.into(),
        }
    }
}

impl Default for FailingHandler {
    /// Fails with `Intentional failure`.
    fn default() -> Self {
        FailingHandler::new("Intentional failure")
    }
}

impl StepHandler for FailingHandler {
    fn execute(&self, _step: &JobStep, _context: &ExecutionContext) -> StepOutput {
        StepOutput::failed(self.error_message.clone())
    }
}

/// The step types `create_default_executor` registers as no-ops.
pub const DEFAULT_STEP_TYPES: [&str; 6] = [
    "capability_enable",
    "capability_disable",
    "capability_add",
    "capability_remove",
    "configuration_change",
    "unknown",
];
