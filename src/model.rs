//! The plan and result types that users build and read.
//!
//! These are plain data: nothing here runs a step or touches the log.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Default deadline of a step whose JSON omits `timeout_seconds`.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 300;

/// Largest plan the executor accepts; input controls plan size, so it has a limit.
pub const PLAN_STEPS_MAX: usize = 100_000;

fn default_timeout_seconds() -> u64 {
    DEFAULT_TIMEOUT_SECONDS
}

fn empty_object() -> Value {
    Value::Object(serde_json::Map::new())
}

/// One declared step of a job plan.
///
/// `step_index` must equal the step's position in the plan (0, 1, 2, …): the
/// index *is* the declared order (EXEC-001), so a plan cannot be ambiguous.
///
/// ```
/// let step: job_executor::JobStep = serde_json::from_str(
///     r#"{"step_index": 0, "step_type": "capability_enable", "target": "billing",
///         "parameters": {"flag": true}}"#,
/// ).unwrap();
/// assert_eq!(step.timeout_seconds, 300);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobStep {
    /// Position of the step in the plan, starting at 0.
    pub step_index: u32,
    /// Selects the registered handler that runs the step.
    pub step_type: String,
    /// What the step acts on; opaque to the executor.
    pub target: String,
    /// Handler parameters; must be a JSON object (`{}` when absent).
    #[serde(default = "empty_object")]
    pub parameters: Value,
    /// Deadline for the step in seconds (300 when absent).
    #[serde(default = "default_timeout_seconds")]
    pub timeout_seconds: u64,
}

impl JobStep {
    /// A step with empty parameters and the default timeout.
    pub fn new(step_index: u32, step_type: impl Into<String>, target: impl Into<String>) -> Self {
        JobStep {
            step_index,
            step_type: step_type.into(),
            target: target.into(),
            parameters: empty_object(),
            timeout_seconds: DEFAULT_TIMEOUT_SECONDS,
        }
    }
}

/// A plan file, as `job-executor run` reads it. Unknown fields are refused.
///
/// ```
/// let plan: job_executor::model::PlanFile = serde_json::from_str(r#"{
///     "contract_id": "6f1c2a6e-8a49-4d1a-9d55-0e3a1f5b7c11",
///     "steps": [{"step_index": 0, "step_type": "capability_enable", "target": "billing"}]
/// }"#).unwrap();
/// assert!(plan.job_id.is_none());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanFile {
    /// The job id; generated when absent.
    #[serde(default)]
    pub job_id: Option<Uuid>,
    /// The contract the plan was made under.
    pub contract_id: Uuid,
    /// The steps, in order.
    pub steps: Vec<JobStep>,
}

/// Why a plan is not executable. Checked before anything is appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A step's `step_index` is not its position in the plan.
    #[error(
        "step at position {position} has step_index {step_index}; step_index must equal the step's position (0, 1, 2, …)"
    )]
    IndexOutOfOrder {
        /// Position of the step in the plan.
        position: usize,
        /// The index the step declared.
        step_index: u32,
    },
    /// A step's `timeout_seconds` is zero.
    #[error("step {step_index}: timeout_seconds must be at least 1")]
    ZeroTimeout {
        /// The offending step.
        step_index: u32,
    },
    /// A step's `parameters` is not a JSON object.
    #[error("step {step_index}: parameters must be a JSON object")]
    ParametersNotObject {
        /// The offending step.
        step_index: u32,
    },
    /// The plan has more steps than [`PLAN_STEPS_MAX`].
    #[error("plan has {steps} steps; at most {max} are allowed", max = PLAN_STEPS_MAX)]
    TooManySteps {
        /// Number of steps in the plan.
        steps: usize,
    },
}

/// Checks that a plan is executable: indices 0..n in order, object parameters,
/// bounded size.
///
/// # Errors
/// The first [`PlanError`] found, in plan order.
pub fn validate_plan(steps: &[JobStep]) -> Result<(), PlanError> {
    if steps.len() > PLAN_STEPS_MAX {
        return Err(PlanError::TooManySteps { steps: steps.len() });
    }
    for (position, step) in steps.iter().enumerate() {
        if step.step_index as usize != position {
            return Err(PlanError::IndexOutOfOrder {
                position,
                step_index: step.step_index,
            });
        }
        if !step.parameters.is_object() {
            return Err(PlanError::ParametersNotObject {
                step_index: step.step_index,
            });
        }
        if step.timeout_seconds == 0 {
            return Err(PlanError::ZeroTimeout {
                step_index: step.step_index,
            });
        }
    }
    Ok(())
}

/// Status of a whole job.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum JobStatus {
    /// Not started.
    Pending,
    /// Started and not yet terminal (or stopped mid-way).
    Running,
    /// Every planned step succeeded.
    Completed,
    /// A step failed and the job halted.
    Failed,
    /// The job was cancelled before it finished.
    Cancelled,
}

impl JobStatus {
    /// The wire name, as in evidence: `"COMPLETED"`, `"FAILED"`, ….
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "PENDING",
            JobStatus::Running => "RUNNING",
            JobStatus::Completed => "COMPLETED",
            JobStatus::Failed => "FAILED",
            JobStatus::Cancelled => "CANCELLED",
        }
    }

    /// Whether a job with this status has ended: nothing more happens to it.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Status of one step.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[non_exhaustive]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// Started; no outcome recorded yet.
    Running,
    /// The handler reported success.
    Completed,
    /// The step failed (handler failure, no handler, panic, timeout, interruption).
    Failed,
    /// Never started because an earlier step failed.
    Skipped,
}

/// What a handler returns for one step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// Whether the step succeeded.
    pub success: bool,
    /// Handler output, recorded in the log; a JSON value, `{}` when there is none.
    pub output: Value,
    /// Why the step failed, when it did.
    pub error: Option<String>,
}

impl StepOutput {
    /// A successful outcome carrying `output`.
    pub fn succeeded(output: Value) -> Self {
        StepOutput {
            success: true,
            output,
            error: None,
        }
    }

    /// A failed outcome with `error` and an empty output object.
    pub fn failed(error: impl Into<String>) -> Self {
        StepOutput {
            success: false,
            output: empty_object(),
            error: Some(error.into()),
        }
    }
}

/// What a handler may know about the step it runs. Handlers only ever get a
/// shared reference to it: it grants no authority over governance state.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ExecutionContext {
    /// The job being executed.
    pub job_id: Uuid,
    /// The contract the job was planned under.
    pub contract_id: Uuid,
    /// Index of the step being run.
    pub step_index: u32,
    /// Type of the step being run.
    pub step_type: String,
    /// Target of the step being run.
    pub target: String,
    /// Who started the job.
    pub executed_by: String,
    /// When the step's `StepStarted` was recorded.
    pub started_at: DateTime<Utc>,
    /// When the step's time is up (`timeout_seconds` after it started); `None`
    /// when that lies beyond what the clock can represent. The executor
    /// records a timeout then, whether or not the handler has returned.
    pub deadline: Option<std::time::Instant>,
    /// Raised when the step's deadline passes: a handler doing long work
    /// should poll it and stop. Its result after that is never recorded.
    pub cancel: CancelSignal,
    /// Raised when someone asks for the job to be cancelled while this step
    /// runs (a worker notices within one lease renewal). The step's outcome
    /// is still recorded, then the job ends CANCELLED (unless the step
    /// failed); a long step may poll it to finish early.
    pub cancel_requested: CancelSignal,
}

impl ExecutionContext {
    /// The context of `step` of job `job_id`, started at `started_at`, with
    /// no deadline and a fresh cancel signal: what a handler's own tests
    /// need to call it as the executor would.
    pub fn new(
        job_id: Uuid,
        contract_id: Uuid,
        step: &JobStep,
        executed_by: impl Into<String>,
        started_at: DateTime<Utc>,
    ) -> Self {
        ExecutionContext {
            job_id,
            contract_id,
            step_index: step.step_index,
            step_type: step.step_type.clone(),
            target: step.target.clone(),
            executed_by: executed_by.into(),
            started_at,
            deadline: None,
            cancel: CancelSignal::new(),
            cancel_requested: CancelSignal::new(),
        }
    }
}

/// A flag a handler can poll to learn that its step was given up on.
#[derive(Clone, Debug, Default)]
pub struct CancelSignal(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl CancelSignal {
    /// A signal not yet raised.
    pub fn new() -> Self {
        CancelSignal::default()
    }

    /// Raises the signal, for every clone of it.
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the signal was raised.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Why a step failed.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureKind {
    /// The handler returned `success: false`.
    HandlerFailed,
    /// No handler is registered for the step's type.
    NoHandler,
    /// The handler panicked.
    Panic,
    /// The step ran past its deadline.
    Timeout,
    /// The executor stopped while the step ran; its outcome is unknown.
    Interrupted,
}

impl FailureKind {
    /// The stored spelling: `handler_failed`, `no_handler`, `panic`,
    /// `timeout`, `interrupted`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::HandlerFailed => "handler_failed",
            FailureKind::NoHandler => "no_handler",
            FailureKind::Panic => "panic",
            FailureKind::Timeout => "timeout",
            FailureKind::Interrupted => "interrupted",
        }
    }
}
