//! What the executor calls out to: step handlers and the health observer.
//!
//! Both are reached only through shared references (`&self`, `&JobStep`,
//! `&ExecutionContext`): a handler cannot change the plan or the contract
//! (EXEC-005), and an observer cannot be asked to change health (EXEC-004).

use std::sync::Arc;

use serde_json::Value;

use crate::model::{ExecutionContext, JobStep, StepOutput};
pub use crate::runner::StepCall;

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
