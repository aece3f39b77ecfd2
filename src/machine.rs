//! The job state machine: the one place where the invariants of a job's log
//! are decided.
//!
//! [`apply`] is a pure transition function: given the state folded so far and
//! the next event, it returns the new state or says which invariant the event
//! would break. [`next_action`] says what the executor must do next. Neither
//! takes a clock, does I/O or allocates. The executor, the projections and
//! `verify` all fold through [`apply`], so a sequence one of them accepts is
//! accepted by all.

use crate::events::{Event, JobClaimed};
use crate::model::{JobStatus, JobStep, PlanError, validate_plan};

/// Where a job is in its life.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// No event yet.
    NotStarted,
    /// Between steps: `next_step` is the next to start (or `steps` when all ran).
    Idle,
    /// Step `step_index` has started and has no outcome yet.
    StepRunning {
        /// The step in flight.
        step_index: u32,
    },
    /// Step `step_index` failed; only `JobHalted` may follow.
    StepFailed {
        /// The failed step.
        step_index: u32,
    },
    /// Terminal: every step succeeded.
    Completed,
    /// Terminal: halted after `step_index` failed.
    Halted {
        /// The failed step.
        step_index: u32,
    },
    /// Terminal: stopped between steps, as requested.
    Cancelled,
}

/// The state folded from a job's events: small, `Copy`, and all the machine
/// needs to judge the next event.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct JobState {
    /// Where the job is.
    pub phase: Phase,
    /// Number of steps in the frozen plan.
    pub steps: u32,
    /// The next step that may start.
    pub next_step: u32,
    /// Whether a cancel request has been recorded.
    pub cancel_requested: bool,
    /// The epoch of the last `JobClaimed` (0 before any).
    pub claim_epoch: u64,
}

impl Default for JobState {
    fn default() -> Self {
        JobState::new()
    }
}

impl JobState {
    /// The state of a job with no events.
    pub const fn new() -> Self {
        JobState {
            phase: Phase::NotStarted,
            steps: 0,
            next_step: 0,
            cancel_requested: false,
            claim_epoch: 0,
        }
    }

    /// Whether the job has ended (`JobCompleted`, `JobHalted` or `JobCancelled`).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.phase,
            Phase::Completed | Phase::Halted { .. } | Phase::Cancelled
        )
    }

    /// The job's status as this state sees it.
    pub fn status(&self) -> JobStatus {
        match self.phase {
            Phase::NotStarted => JobStatus::Pending,
            Phase::Idle | Phase::StepRunning { .. } | Phase::StepFailed { .. } => {
                JobStatus::Running
            }
            Phase::Completed => JobStatus::Completed,
            Phase::Halted { .. } => JobStatus::Failed,
            Phase::Cancelled => JobStatus::Cancelled,
        }
    }
}

/// What the executor must do next for a job in a given state.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NextAction {
    /// Append `JobStarted`.
    StartJob,
    /// Append `StepStarted` for this step, then run its handler.
    StartStep(u32),
    /// The step's handler has been called; append its outcome.
    RecordOutcome(u32),
    /// Append `JobCompleted`.
    Complete,
    /// Append `JobHalted` for this failed step.
    Halt(u32),
    /// Append `JobCancelled`: a cancel request is honoured before the next step.
    Cancel,
    /// The job is terminal; nothing may be appended.
    Done,
}

/// What the executor must do next. Pure.
pub fn next_action(state: &JobState) -> NextAction {
    match state.phase {
        Phase::NotStarted => NextAction::StartJob,
        Phase::Idle if state.next_step == state.steps => NextAction::Complete,
        Phase::Idle if state.cancel_requested => NextAction::Cancel,
        Phase::Idle => NextAction::StartStep(state.next_step),
        Phase::StepRunning { step_index } => NextAction::RecordOutcome(step_index),
        Phase::StepFailed { step_index } => NextAction::Halt(step_index),
        Phase::Completed | Phase::Halted { .. } | Phase::Cancelled => NextAction::Done,
    }
}

/// An event the machine refuses, and why. Each names the invariant it guards.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    /// The first event of a job must be `JobStarted`.
    #[error("{kind} before JobStarted: a job's log must begin with JobStarted")]
    NotStarted {
        /// The refused kind.
        kind: &'static str,
    },
    /// A job is started at most once.
    #[error("JobStarted again: a job id is executed at most once")]
    AlreadyStarted,
    /// The plan in `JobStarted` is not executable.
    #[error("JobStarted carries an invalid plan: {0}")]
    InvalidPlan(PlanError),
    /// A step was started that is not the next one in the plan.
    #[error("StepStarted for step {step_index}, but the next step in plan order is {expected}")]
    OutOfOrder {
        /// The refused step.
        step_index: u32,
        /// The step that may start next.
        expected: u32,
    },
    /// A step was started a second time.
    #[error("StepStarted for step {step_index}, which already started: steps are never retried")]
    Restarted {
        /// The refused step.
        step_index: u32,
    },
    /// A step was started that the plan does not have.
    #[error("StepStarted for step {step_index}, but the plan has {steps} steps")]
    NoSuchStep {
        /// The refused step.
        step_index: u32,
        /// Steps in the plan.
        steps: u32,
    },
    /// Something other than the step's outcome followed a `StepStarted`.
    #[error(
        "{kind} while step {running} has no outcome: each started step gets exactly one outcome first"
    )]
    OutcomeMissing {
        /// The refused kind.
        kind: &'static str,
        /// The step in flight.
        running: u32,
    },
    /// An outcome for a step that is not in flight.
    #[error("{kind} for step {step_index}, which is not running")]
    OutcomeWithoutStart {
        /// The refused kind.
        kind: &'static str,
        /// The step the outcome names.
        step_index: u32,
    },
    /// Something other than `JobHalted` followed a failed step.
    #[error("{kind} after step {failed} failed: a failed job halts and runs nothing more")]
    AfterFailure {
        /// The refused kind.
        kind: &'static str,
        /// The failed step.
        failed: u32,
    },
    /// `JobHalted` names a step other than the one that failed.
    #[error("JobHalted names step {step_index}, but step {failed} failed")]
    HaltMismatch {
        /// The step named.
        step_index: u32,
        /// The failed step.
        failed: u32,
    },
    /// `JobHalted` without a failed step.
    #[error("JobHalted for step {step_index}, but no step has failed")]
    HaltWithoutFailure {
        /// The step named.
        step_index: u32,
    },
    /// `JobCompleted` before every planned step succeeded.
    #[error(
        "JobCompleted after {succeeded} of {steps} steps: a job completes only when every step succeeded"
    )]
    Incomplete {
        /// Steps that succeeded.
        succeeded: u32,
        /// Steps in the plan.
        steps: u32,
    },
    /// A step started after a cancel request was recorded.
    #[error(
        "StepStarted for step {step_index} after a cancel request: no step starts once cancellation is requested"
    )]
    StartAfterCancel {
        /// The refused step.
        step_index: u32,
    },
    /// A second cancel request.
    #[error("JobCancelRequested again: cancellation is already requested")]
    CancelAlreadyRequested,
    /// `JobCancelled` with no request to honour.
    #[error("JobCancelled without a JobCancelRequested before it")]
    CancelWithoutRequest,
    /// A claim whose epoch does not move past the last claim's: claims
    /// fence each other off only by moving the epoch on.
    #[error("JobClaimed at epoch {epoch}, but the job was already claimed at epoch {previous}")]
    StaleClaim {
        /// The refused claim's epoch.
        epoch: u64,
        /// The last claim's epoch.
        previous: u64,
    },
    /// A claim while a step is in flight: nothing comes between a step's
    /// start and its outcome but a cancel request. A takeover of a step in
    /// doubt records the step's outcome first, then its claim.
    #[error(
        "JobClaimed while step {running} has no outcome: a claim comes after the outcome of the step in flight"
    )]
    ClaimDuringStep {
        /// The step in flight.
        running: u32,
    },
    /// A claim that says it recorded the outcome of a step that is not the
    /// last one to have ended.
    #[error(
        "JobClaimed says it recorded the outcome of step {step_index}, which is not the last step to have ended"
    )]
    ClaimedOutcomeMissing {
        /// The step the claim names.
        step_index: u32,
    },
    /// Anything after the terminal event.
    #[error("{kind} after the job ended: the log of a finished job is closed")]
    AfterEnd {
        /// The refused kind.
        kind: &'static str,
    },
}

impl TransitionError {
    /// The invariant this refusal protects (`"EXEC-001"` … `"EXEC-006"`), or
    /// `"CANCEL"` for the cancellation rules, `"LOG"` for the structure every
    /// log shares.
    pub fn invariant(&self) -> &'static str {
        match self {
            TransitionError::NotStarted { .. }
            | TransitionError::StaleClaim { .. }
            | TransitionError::ClaimedOutcomeMissing { .. } => "LOG",
            TransitionError::AlreadyStarted | TransitionError::Restarted { .. } => "EXEC-006",
            TransitionError::InvalidPlan(_)
            | TransitionError::OutOfOrder { .. }
            | TransitionError::NoSuchStep { .. } => "EXEC-001",
            TransitionError::OutcomeMissing { .. }
            | TransitionError::OutcomeWithoutStart { .. }
            | TransitionError::ClaimDuringStep { .. } => "EXEC-002",
            TransitionError::AfterFailure { .. }
            | TransitionError::HaltMismatch { .. }
            | TransitionError::HaltWithoutFailure { .. }
            | TransitionError::Incomplete { .. }
            | TransitionError::AfterEnd { .. } => "EXEC-003",
            TransitionError::StartAfterCancel { .. }
            | TransitionError::CancelAlreadyRequested
            | TransitionError::CancelWithoutRequest => "CANCEL",
        }
    }
}

/// Folds one event into the state, or refuses it. Pure.
///
/// # Errors
/// A [`TransitionError`] naming the invariant the event would break; the
/// caller's state is untouched (it is `Copy`).
///
/// ```
/// use job_executor::events::{Event, StepStarted};
/// use job_executor::machine::{apply, JobState, TransitionError};
///
/// let err = apply(JobState::new(), &Event::StepStarted(StepStarted { step_index: 0 }));
/// assert_eq!(err, Err(TransitionError::NotStarted { kind: "StepStarted" }));
/// ```
pub fn apply(state: JobState, event: &Event) -> Result<JobState, TransitionError> {
    let kind = event.kind();
    match (state.phase, event) {
        (Phase::Completed | Phase::Halted { .. } | Phase::Cancelled, _) => {
            Err(TransitionError::AfterEnd { kind })
        }

        (Phase::NotStarted, Event::JobStarted(started)) => start_job(state, &started.plan),
        (Phase::NotStarted, _) => Err(TransitionError::NotStarted { kind }),
        (_, Event::JobStarted(_)) => Err(TransitionError::AlreadyStarted),

        // A request records an outside wish and changes nothing else, so it
        // may arrive at any time, even while a step runs; it is honoured
        // before the next step would start. It is the only event that may
        // come between a step's start and its outcome.
        (_, Event::JobCancelRequested(_)) => request_cancel(state),
        // A claim records who appends from here on, and nothing else. It
        // waits for the step in flight's outcome: a takeover of a step in
        // doubt records the step interrupted first, then its claim.
        (Phase::StepRunning { step_index }, Event::JobClaimed(_)) => {
            Err(TransitionError::ClaimDuringStep {
                running: step_index,
            })
        }
        (_, Event::JobClaimed(claimed)) => claim(state, claimed),

        (Phase::Idle, Event::StepStarted(s)) => start_step(state, s.step_index),
        (Phase::Idle, Event::StepSucceeded(s)) => Err(TransitionError::OutcomeWithoutStart {
            kind,
            step_index: s.step_index,
        }),
        (Phase::Idle, Event::StepFailed(s)) => Err(TransitionError::OutcomeWithoutStart {
            kind,
            step_index: s.step_index,
        }),
        (Phase::Idle, Event::JobCompleted(_)) => complete(state),
        (Phase::Idle, Event::JobHalted(h)) => Err(TransitionError::HaltWithoutFailure {
            step_index: h.step_index,
        }),
        (Phase::Idle, Event::JobCancelled(_)) => cancel(state),
        (Phase::Idle, Event::JobResumed(_)) => Ok(state),

        (Phase::StepRunning { step_index }, Event::StepSucceeded(s)) => {
            end_step(state, kind, step_index, s.step_index, Phase::Idle)
        }
        (Phase::StepRunning { step_index }, Event::StepFailed(f)) => {
            let failed = Phase::StepFailed { step_index };
            end_step(state, kind, step_index, f.step_index, failed)
        }
        (Phase::StepRunning { step_index }, _) => Err(TransitionError::OutcomeMissing {
            kind,
            running: step_index,
        }),

        (Phase::StepFailed { step_index }, Event::JobHalted(h)) => {
            halt(state, step_index, h.step_index)
        }
        (Phase::StepFailed { step_index }, _) => Err(TransitionError::AfterFailure {
            kind,
            failed: step_index,
        }),
    }
}

/// `JobStarted`: a valid plan, and the job is idle before its first step.
fn start_job(state: JobState, plan: &[JobStep]) -> Result<JobState, TransitionError> {
    validate_plan(plan).map_err(TransitionError::InvalidPlan)?;
    Ok(JobState {
        phase: Phase::Idle,
        // validate_plan bounds the plan far below u32::MAX.
        steps: plan.len() as u32,
        next_step: 0,
        ..state
    })
}

/// `JobCancelRequested`: once per job.
fn request_cancel(state: JobState) -> Result<JobState, TransitionError> {
    if state.cancel_requested {
        Err(TransitionError::CancelAlreadyRequested)
    } else {
        Ok(JobState {
            cancel_requested: true,
            ..state
        })
    }
}

/// `JobClaimed` between steps, or after a failed step: at an epoch past
/// the last claim's; a step whose outcome it says it recorded is the last
/// step to have ended (the one before the next).
fn claim(state: JobState, claimed: &JobClaimed) -> Result<JobState, TransitionError> {
    let epoch = claimed.epoch;
    if epoch <= state.claim_epoch {
        return Err(TransitionError::StaleClaim {
            epoch,
            previous: state.claim_epoch,
        });
    }
    if let Some(step_index) = claimed.recorded_outcome
        && state.next_step.checked_sub(1) != Some(step_index)
    {
        return Err(TransitionError::ClaimedOutcomeMissing { step_index });
    }
    Ok(JobState {
        claim_epoch: epoch,
        ..state
    })
}

/// `StepStarted` between steps: the next step of the plan, and no cancel
/// request pending.
fn start_step(state: JobState, step_index: u32) -> Result<JobState, TransitionError> {
    if state.cancel_requested {
        Err(TransitionError::StartAfterCancel { step_index })
    } else if step_index < state.next_step {
        Err(TransitionError::Restarted { step_index })
    } else if step_index >= state.steps {
        Err(TransitionError::NoSuchStep {
            step_index,
            steps: state.steps,
        })
    } else if step_index > state.next_step {
        Err(TransitionError::OutOfOrder {
            step_index,
            expected: state.next_step,
        })
    } else {
        Ok(JobState {
            phase: Phase::StepRunning { step_index },
            ..state
        })
    }
}

/// A step's outcome (`kind`) for step `reported` while step `running` runs:
/// the same step, which then moves the job to `phase`.
fn end_step(
    state: JobState,
    kind: &'static str,
    running: u32,
    reported: u32,
    phase: Phase,
) -> Result<JobState, TransitionError> {
    if reported == running {
        Ok(JobState {
            phase,
            next_step: running + 1,
            ..state
        })
    } else {
        Err(TransitionError::OutcomeWithoutStart {
            kind,
            step_index: reported,
        })
    }
}

/// `JobCompleted`: every step succeeded.
fn complete(state: JobState) -> Result<JobState, TransitionError> {
    if state.next_step == state.steps {
        Ok(JobState {
            phase: Phase::Completed,
            ..state
        })
    } else {
        Err(TransitionError::Incomplete {
            succeeded: state.next_step,
            steps: state.steps,
        })
    }
}

/// `JobCancelled` between steps: only as requested.
fn cancel(state: JobState) -> Result<JobState, TransitionError> {
    if state.cancel_requested {
        Ok(JobState {
            phase: Phase::Cancelled,
            ..state
        })
    } else {
        Err(TransitionError::CancelWithoutRequest)
    }
}

/// `JobHalted` after step `failed` failed: naming that step.
fn halt(state: JobState, failed: u32, halted: u32) -> Result<JobState, TransitionError> {
    if halted == failed {
        Ok(JobState {
            phase: Phase::Halted { step_index: failed },
            ..state
        })
    } else {
        Err(TransitionError::HaltMismatch {
            step_index: halted,
            failed,
        })
    }
}

/// Folds a whole sequence of events from the empty state.
///
/// # Errors
/// The position (0-based) of the first refused event and why.
pub fn fold<'a>(
    events: impl IntoIterator<Item = &'a Event>,
) -> Result<JobState, (usize, TransitionError)> {
    events
        .into_iter()
        .enumerate()
        .try_fold(JobState::new(), |state, (i, event)| {
            apply(state, event).map_err(|e| (i, e))
        })
}

/// Given / when / then for the state machine: given past events, when one
/// more event arrives, then this state or this refusal. It serves the
/// crate's own tests and lets users check their expectations the same way.
///
/// ```
/// use job_executor::events::{Event, JobStarted, StepStarted};
/// use job_executor::machine::{Phase, Scenario, TransitionError};
/// use job_executor::JobStep;
///
/// let started = Event::JobStarted(JobStarted {
///     contract_id: uuid::Uuid::nil(),
///     plan: vec![JobStep::new(0, "noop", "t"), JobStep::new(1, "noop", "t")],
///     executed_by: "ops".into(),
///     executor_version: "1.0.0".into(),
///     health_before: None,
/// });
/// Scenario::given([started.clone()])
///     .when(Event::StepStarted(StepStarted { step_index: 0 }))
///     .then_phase(Phase::StepRunning { step_index: 0 });
/// Scenario::given([started])
///     .when(Event::StepStarted(StepStarted { step_index: 1 }))
///     .then_error(TransitionError::OutOfOrder { step_index: 1, expected: 0 });
/// ```
#[derive(Debug)]
pub struct Scenario {
    state: JobState,
}

/// A [`Scenario`] with its event: ready for `then`.
#[derive(Debug)]
pub struct ScenarioOutcome {
    result: Result<JobState, TransitionError>,
}

impl Scenario {
    /// Folds `events` from the empty state.
    ///
    /// # Panics
    /// When the machine refuses one of the given events: a scenario's past
    /// must be a valid log.
    pub fn given(events: impl IntoIterator<Item = Event>) -> Self {
        let events: Vec<Event> = events.into_iter().collect();
        match fold(&events) {
            Ok(state) => Scenario { state },
            Err((i, e)) => panic!("given event {i} ({}) is refused: {e}", events[i].kind()),
        }
    }

    /// Applies `event` to the given state.
    pub fn when(self, event: Event) -> ScenarioOutcome {
        ScenarioOutcome {
            result: apply(self.state, &event),
        }
    }
}

impl ScenarioOutcome {
    /// The resulting state.
    ///
    /// # Panics
    /// When the event was refused.
    pub fn then_state(self) -> JobState {
        match self.result {
            Ok(state) => state,
            Err(e) => panic!("expected the event to be accepted, but it was refused: {e}"),
        }
    }

    /// Asserts that the event was accepted and led to `phase`.
    ///
    /// # Panics
    /// When the event was refused or led elsewhere.
    pub fn then_phase(self, phase: Phase) -> JobState {
        let state = self.then_state();
        assert_eq!(state.phase, phase, "unexpected phase after the event");
        state
    }

    /// Asserts that the event was refused with `expected`.
    ///
    /// # Panics
    /// When the event was accepted or refused otherwise.
    pub fn then_error(self, expected: TransitionError) {
        match self.result {
            Ok(state) => panic!("expected refusal {expected:?}, but the event led to {state:?}"),
            Err(e) => assert_eq!(e, expected, "refused for another reason"),
        }
    }
}
