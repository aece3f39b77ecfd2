//! Every transition of the state machine and every refusal, as
//! given events / when event / then state or error.

use crate::common;

use common::{claimed, completed, failed, halted, started, step_started, succeeded};
use job_executor::JobStep;
use job_executor::events::{Event, JobStarted};
use job_executor::machine::{
    JobState, NextAction, Phase, Scenario, TransitionError, apply, fold, next_action,
};
use uuid::Uuid;

// --- accepted transitions -------------------------------------------------

#[test]
fn job_started_moves_to_idle_with_plan_size() {
    let state = Scenario::given([]).when(started(3)).then_phase(Phase::Idle);
    assert_eq!((state.steps, state.next_step), (3, 0));
}

#[test]
fn first_step_may_start() {
    Scenario::given([started(2)])
        .when(step_started(0))
        .then_phase(Phase::StepRunning { step_index: 0 });
}

#[test]
fn success_returns_to_idle_and_advances() {
    let state = Scenario::given([started(2), step_started(0)])
        .when(succeeded(0))
        .then_phase(Phase::Idle);
    assert_eq!(state.next_step, 1);
}

#[test]
fn next_step_starts_after_success() {
    Scenario::given([started(2), step_started(0), succeeded(0)])
        .when(step_started(1))
        .then_phase(Phase::StepRunning { step_index: 1 });
}

#[test]
fn failure_waits_for_halt() {
    Scenario::given([started(2), step_started(0)])
        .when(failed(0))
        .then_phase(Phase::StepFailed { step_index: 0 });
}

#[test]
fn halt_after_failure_ends_the_job() {
    let state = Scenario::given([started(2), step_started(0), failed(0)])
        .when(halted(0))
        .then_phase(Phase::Halted { step_index: 0 });
    assert!(state.is_terminal());
    assert_eq!(state.status(), job_executor::JobStatus::Failed);
}

#[test]
fn completion_after_every_step_succeeded() {
    let state = Scenario::given([started(1), step_started(0), succeeded(0)])
        .when(completed())
        .then_phase(Phase::Completed);
    assert_eq!(state.status(), job_executor::JobStatus::Completed);
}

#[test]
fn empty_plan_completes_at_once() {
    Scenario::given([started(0)])
        .when(completed())
        .then_phase(Phase::Completed);
}

// --- refusals --------------------------------------------------------------

#[test]
fn nothing_before_job_started() {
    for (event, kind) in [
        (step_started(0), "StepStarted"),
        (succeeded(0), "StepSucceeded"),
        (failed(0), "StepFailed"),
        (completed(), "JobCompleted"),
        (halted(0), "JobHalted"),
    ] {
        Scenario::given([])
            .when(event)
            .then_error(TransitionError::NotStarted { kind });
    }
}

#[test]
fn job_started_twice_is_refused() {
    Scenario::given([started(1)])
        .when(started(1))
        .then_error(TransitionError::AlreadyStarted);
    Scenario::given([started(1), step_started(0)])
        .when(started(1))
        .then_error(TransitionError::AlreadyStarted);
    Scenario::given([started(1), step_started(0), succeeded(0), completed()])
        .when(started(1))
        .then_error(TransitionError::AfterEnd { kind: "JobStarted" });
}

#[test]
fn invalid_plan_is_refused() {
    let event = Event::JobStarted(JobStarted {
        contract_id: Uuid::nil(),
        plan: vec![JobStep::new(1, "noop", "t")],
        executed_by: "tester".into(),
        executor_version: "0.0.0".into(),
        health_before: None,
    });
    let err = apply(JobState::new(), &event).unwrap_err();
    assert!(matches!(err, TransitionError::InvalidPlan(_)));
    assert_eq!(err.invariant(), "EXEC-001");
}

#[test]
fn skipping_a_step_is_refused() {
    Scenario::given([started(3)])
        .when(step_started(1))
        .then_error(TransitionError::OutOfOrder {
            step_index: 1,
            expected: 0,
        });
}

#[test]
fn restarting_a_step_is_refused() {
    let err = TransitionError::Restarted { step_index: 0 };
    assert_eq!(err.invariant(), "EXEC-006");
    Scenario::given([started(2), step_started(0), succeeded(0)])
        .when(step_started(0))
        .then_error(err);
}

#[test]
fn starting_a_step_beyond_the_plan_is_refused() {
    Scenario::given([started(1), step_started(0), succeeded(0)])
        .when(step_started(1))
        .then_error(TransitionError::NoSuchStep {
            step_index: 1,
            steps: 1,
        });
}

#[test]
fn a_second_start_while_running_is_refused() {
    Scenario::given([started(2), step_started(0)])
        .when(step_started(1))
        .then_error(TransitionError::OutcomeMissing {
            kind: "StepStarted",
            running: 0,
        });
}

#[test]
fn ending_the_job_while_a_step_runs_is_refused() {
    for (event, kind) in [(completed(), "JobCompleted"), (halted(0), "JobHalted")] {
        Scenario::given([started(1), step_started(0)])
            .when(event)
            .then_error(TransitionError::OutcomeMissing { kind, running: 0 });
    }
}

#[test]
fn outcome_for_another_step_is_refused() {
    Scenario::given([started(2), step_started(0)])
        .when(succeeded(1))
        .then_error(TransitionError::OutcomeWithoutStart {
            kind: "StepSucceeded",
            step_index: 1,
        });
    Scenario::given([started(2), step_started(0)])
        .when(failed(1))
        .then_error(TransitionError::OutcomeWithoutStart {
            kind: "StepFailed",
            step_index: 1,
        });
}

#[test]
fn outcome_without_start_is_refused() {
    let err = TransitionError::OutcomeWithoutStart {
        kind: "StepSucceeded",
        step_index: 0,
    };
    assert_eq!(err.invariant(), "EXEC-002");
    Scenario::given([started(1)])
        .when(succeeded(0))
        .then_error(err);
    Scenario::given([started(1)]).when(failed(0)).then_error(
        TransitionError::OutcomeWithoutStart {
            kind: "StepFailed",
            step_index: 0,
        },
    );
}

#[test]
fn a_second_outcome_is_refused() {
    Scenario::given([started(2), step_started(0), succeeded(0)])
        .when(succeeded(0))
        .then_error(TransitionError::OutcomeWithoutStart {
            kind: "StepSucceeded",
            step_index: 0,
        });
    Scenario::given([started(2), step_started(0), failed(0)])
        .when(failed(0))
        .then_error(TransitionError::AfterFailure {
            kind: "StepFailed",
            failed: 0,
        });
}

#[test]
fn nothing_but_halt_after_a_failure() {
    let err = TransitionError::AfterFailure {
        kind: "StepStarted",
        failed: 0,
    };
    assert_eq!(err.invariant(), "EXEC-003");
    Scenario::given([started(2), step_started(0), failed(0)])
        .when(step_started(1))
        .then_error(err);
    Scenario::given([started(2), step_started(0), failed(0)])
        .when(completed())
        .then_error(TransitionError::AfterFailure {
            kind: "JobCompleted",
            failed: 0,
        });
}

#[test]
fn halt_must_name_the_failed_step() {
    Scenario::given([started(2), step_started(0), failed(0)])
        .when(halted(1))
        .then_error(TransitionError::HaltMismatch {
            step_index: 1,
            failed: 0,
        });
}

#[test]
fn halt_without_failure_is_refused() {
    Scenario::given([started(2), step_started(0), succeeded(0)])
        .when(halted(0))
        .then_error(TransitionError::HaltWithoutFailure { step_index: 0 });
}

#[test]
fn completion_before_every_step_ran_is_refused() {
    Scenario::given([started(2), step_started(0), succeeded(0)])
        .when(completed())
        .then_error(TransitionError::Incomplete {
            succeeded: 1,
            steps: 2,
        });
}

#[test]
fn nothing_after_the_end() {
    let completed_log = [started(1), step_started(0), succeeded(0), completed()];
    let halted_log = [started(1), step_started(0), failed(0), halted(0)];
    for log in [&completed_log, &halted_log] {
        for event in [
            started(1),
            step_started(0),
            succeeded(0),
            failed(0),
            completed(),
            halted(0),
        ] {
            let kind = event.kind();
            Scenario::given(log.to_vec())
                .when(event)
                .then_error(TransitionError::AfterEnd { kind });
        }
    }
}

// --- next_action and fold ---------------------------------------------------

#[test]
fn next_action_follows_the_plan() {
    let log = [
        started(2),
        step_started(0),
        succeeded(0),
        step_started(1),
        failed(1),
        halted(1),
    ];
    let expected = [
        NextAction::StartStep(0),
        NextAction::RecordOutcome(0),
        NextAction::StartStep(1),
        NextAction::RecordOutcome(1),
        NextAction::Halt(1),
        NextAction::Done,
    ];
    let mut state = JobState::new();
    assert_eq!(next_action(&state), NextAction::StartJob);
    for (event, want) in log.iter().zip(expected) {
        state = apply(state, event).unwrap();
        assert_eq!(next_action(&state), want, "after {}", event.kind());
    }
    let done = fold(&[started(0)]).unwrap();
    assert_eq!(next_action(&done), NextAction::Complete);
}

#[test]
fn fold_reports_the_position_of_the_first_refusal() {
    let log = [started(1), succeeded(0), step_started(0)];
    let (position, err) = fold(&log).unwrap_err();
    assert_eq!(position, 1);
    assert_eq!(
        err,
        TransitionError::OutcomeWithoutStart {
            kind: "StepSucceeded",
            step_index: 0
        }
    );
}

// --- cancellation and resumption ---------------------------------------------

fn cancel_requested() -> Event {
    Event::JobCancelRequested(job_executor::events::JobCancelRequested {
        reason: "stop".into(),
    })
}

fn cancelled() -> Event {
    Event::JobCancelled(job_executor::events::JobCancelled {
        reason: "stop".into(),
    })
}

fn resumed() -> Event {
    Event::JobResumed(job_executor::events::JobResumed {
        executed_by: "night shift".into(),
        executor_version: "0.0.0".into(),
        health_before: None,
    })
}

#[test]
fn a_cancel_request_is_recorded_between_steps_and_while_a_step_runs() {
    let state = Scenario::given([started(2)])
        .when(cancel_requested())
        .then_phase(Phase::Idle);
    assert!(state.cancel_requested);
    let state = Scenario::given([started(2), step_started(0)])
        .when(cancel_requested())
        .then_phase(Phase::StepRunning { step_index: 0 });
    assert!(state.cancel_requested);
    Scenario::given([started(2), step_started(0), failed(0)])
        .when(cancel_requested())
        .then_phase(Phase::StepFailed { step_index: 0 });
}

#[test]
fn the_step_in_flight_finishes_then_the_job_is_cancelled() {
    let log = [started(2), step_started(0), cancel_requested()];
    Scenario::given(log.clone())
        .when(succeeded(0))
        .then_phase(Phase::Idle);
    let mut after = log.to_vec();
    after.push(succeeded(0));
    assert_eq!(next_action(&fold(&after).unwrap()), NextAction::Cancel);
    let state = Scenario::given(after)
        .when(cancelled())
        .then_phase(Phase::Cancelled);
    assert!(state.is_terminal());
    assert_eq!(state.status(), job_executor::JobStatus::Cancelled);
}

#[test]
fn no_step_starts_after_a_cancel_request() {
    let err = TransitionError::StartAfterCancel { step_index: 1 };
    assert_eq!(err.invariant(), "CANCEL");
    Scenario::given([
        started(2),
        step_started(0),
        succeeded(0),
        cancel_requested(),
    ])
    .when(step_started(1))
    .then_error(err);
}

#[test]
fn cancellation_needs_one_request() {
    Scenario::given([started(2)])
        .when(cancelled())
        .then_error(TransitionError::CancelWithoutRequest);
    Scenario::given([started(2), cancel_requested()])
        .when(cancel_requested())
        .then_error(TransitionError::CancelAlreadyRequested);
    Scenario::given([started(1), step_started(0), cancel_requested()])
        .when(cancelled())
        .then_error(TransitionError::OutcomeMissing {
            kind: "JobCancelled",
            running: 0,
        });
}

#[test]
fn a_failure_or_a_finished_plan_wins_over_a_pending_request() {
    let failed_log = [started(2), step_started(0), cancel_requested(), failed(0)];
    assert_eq!(
        next_action(&fold(&failed_log).unwrap()),
        NextAction::Halt(0)
    );
    let done = [
        started(1),
        step_started(0),
        cancel_requested(),
        succeeded(0),
    ];
    assert_eq!(next_action(&fold(&done).unwrap()), NextAction::Complete);
}

#[test]
fn a_job_resumes_only_between_steps() {
    Scenario::given([started(2), step_started(0), succeeded(0)])
        .when(resumed())
        .then_phase(Phase::Idle);
    Scenario::given([started(2), step_started(0)])
        .when(resumed())
        .then_error(TransitionError::OutcomeMissing {
            kind: "JobResumed",
            running: 0,
        });
    Scenario::given([started(2), step_started(0), failed(0)])
        .when(resumed())
        .then_error(TransitionError::AfterFailure {
            kind: "JobResumed",
            failed: 0,
        });
    Scenario::given([started(0), completed()])
        .when(resumed())
        .then_error(TransitionError::AfterEnd { kind: "JobResumed" });
}

// --- claims -----------------------------------------------------------------

#[test]
fn a_claim_between_a_step_start_and_its_outcome_is_refused() {
    let refusal = TransitionError::ClaimDuringStep { running: 0 };
    assert_eq!(refusal.invariant(), "EXEC-002");
    Scenario::given([started(2), claimed("a", 1, None), step_started(0)])
        .when(claimed("b", 2, None))
        .then_error(refusal);
    // Even one that says it recorded the step: the outcome comes first.
    Scenario::given([started(2), step_started(0)])
        .when(claimed("b", 2, Some(0)))
        .then_error(TransitionError::ClaimDuringStep { running: 0 });
    // A cancel request is the one event that may arrive meanwhile.
    Scenario::given([started(2), claimed("a", 1, None), step_started(0)])
        .when(cancel_requested())
        .then_phase(Phase::StepRunning { step_index: 0 });
}

#[test]
fn a_takeover_records_the_step_in_doubt_then_its_claim() {
    let taken_over = [
        started(2),
        claimed("a", 1, None),
        step_started(0),
        failed(0),
    ];
    let state = Scenario::given(taken_over.clone())
        .when(claimed("b", 2, Some(0)))
        .then_phase(Phase::StepFailed { step_index: 0 });
    assert_eq!(state.claim_epoch, 2);
    let mut log = taken_over.to_vec();
    log.extend([claimed("b", 2, Some(0)), halted(0)]);
    assert_eq!(fold(&log).unwrap().phase, Phase::Halted { step_index: 0 });
    // A success known to the new owner is recorded the same way.
    Scenario::given([started(2), step_started(0), succeeded(0)])
        .when(claimed("b", 2, Some(0)))
        .then_phase(Phase::Idle);
}

#[test]
fn a_claim_names_only_the_outcome_just_recorded() {
    Scenario::given([started(2)])
        .when(claimed("b", 2, Some(0)))
        .then_error(TransitionError::ClaimedOutcomeMissing { step_index: 0 });
    Scenario::given([started(3), step_started(0), succeeded(0)])
        .when(claimed("b", 2, Some(1)))
        .then_error(TransitionError::ClaimedOutcomeMissing { step_index: 1 });
}

#[test]
fn a_claim_is_admitted_between_steps_of_a_started_job_and_only_forward() {
    Scenario::given([started(2)])
        .when(claimed("a", 1, None))
        .then_phase(Phase::Idle);
    Scenario::given([started(2), step_started(0), succeeded(0)])
        .when(claimed("a", 1, None))
        .then_phase(Phase::Idle);
    Scenario::given([started(2), step_started(0), failed(0)])
        .when(claimed("b", 2, None))
        .then_phase(Phase::StepFailed { step_index: 0 });
    Scenario::given([started(2), claimed("a", 2, None)])
        .when(claimed("b", 2, None))
        .then_error(TransitionError::StaleClaim {
            epoch: 2,
            previous: 2,
        });
    Scenario::given([])
        .when(claimed("a", 1, None))
        .then_error(TransitionError::NotStarted { kind: "JobClaimed" });
    let mut ended = common::completed_log(2);
    ended.insert(1, claimed("a", 1, None));
    Scenario::given(ended)
        .when(claimed("b", 2, None))
        .then_error(TransitionError::AfterEnd { kind: "JobClaimed" });
}
