//! Jobs already in the log (or in its queue): resumed, taken up where a
//! stopped executor left them (by `recover`, and by a worker's claim), and
//! cancelled.

use uuid::Uuid;

use super::run::Run;
use super::{CancelRequest, ExecutorError, JobExecutor, Recovery, RunControl, UnrecordedOutcome};
use crate::events::{Event, Failure, JobCancelRequested, StepFailed};
use crate::handler::HealthObserver;
use crate::machine::{NextAction, Phase, next_action};
use crate::model::{FailureKind, validate_plan};
use crate::result::ExecutionResult;
use crate::store::{JobQueue, QueuedJob};

/// How often a cancel request is tried again when the job moved on meanwhile.
const CANCEL_RETRIES_MAX: usize = 16;

/// What taking up a stored job did to it.
enum TakenUp {
    /// A step in doubt was recorded failed (interrupted), the job halted.
    Interrupted {
        step_index: u32,
        result: ExecutionResult,
    },
    /// A failed step's job was halted.
    Halted {
        step_index: u32,
        result: ExecutionResult,
    },
    /// A cancel request was honoured.
    Cancelled { result: ExecutionResult },
    /// Stopped between steps, nothing to close: left to be resumed.
    BetweenSteps { next_step: u32 },
    /// It had ended.
    Ended,
}

impl JobExecutor {
    /// Continues a job that stopped between steps (no step in doubt) at its
    /// next step, with the plan recorded in its log. Appends `JobResumed`,
    /// observes health before the next step, then runs as `execute_job` does.
    ///
    /// # Errors
    /// [`ExecutorError::UnknownJob`]; [`ExecutorError::JobEnded`] for a
    /// finished job; [`ExecutorError::StepInDoubt`] when a step's outcome is
    /// unknown (run [`JobExecutor::recover`] first) or a failed step awaits
    /// its halt; store failures and conflicts as for `execute_job`.
    pub fn resume(
        &self,
        job_id: Uuid,
        health_observer: Option<&dyn HealthObserver>,
        executed_by: &str,
    ) -> Result<ExecutionResult, ExecutorError> {
        let run = Run::stored(&self.engine, job_id, Some(executed_by))?;
        resume_run(&mut run.observed_by(health_observer))
    }

    /// Takes up `job` from wherever its log says it is — what a worker does
    /// with every job it claims: started afresh when it has no events; a
    /// step in doubt recorded interrupted and the job halted — never run
    /// again (unless this executor knows the step's outcome: that is
    /// recorded instead); a failed step's job halted; a requested
    /// cancellation honoured; otherwise resumed at its next step by
    /// `resumer`. A job that has ended is left as it is.
    ///
    /// # Errors
    /// As [`execute_job`](Self::execute_job) and [`resume`](Self::resume);
    /// under a claim, a store's [`StoreError::Fenced`](crate::store::StoreError::Fenced)
    /// once the claim was taken over.
    pub fn take_up(
        &self,
        job: &QueuedJob,
        resumer: &str,
        control: RunControl<'_>,
    ) -> Result<ExecutionResult, ExecutorError> {
        let job_id = job.job_id;
        let stored = self
            .engine
            .store
            .last_seq(job_id)
            .map_err(|source| ExecutorError::Store { job_id, source })?;
        if stored == 0 {
            match self.engine.start(job, None, control.clone()) {
                // Started elsewhere meanwhile (a cancel of the queued job):
                // take it up from its log.
                Err(ExecutorError::JobAlreadyExists { .. }) => {}
                other => return other,
            }
        }
        let mut run = Run::stored(&self.engine, job_id, Some(resumer))?.under(control);
        let known = self.engine.known_outcomes(job_id);
        match self.close(&mut run, &known)?.1 {
            TakenUp::Interrupted { result, .. }
            | TakenUp::Halted { result, .. }
            | TakenUp::Cancelled { result } => Ok(result),
            TakenUp::BetweenSteps { .. } => resume_run(&mut run),
            TakenUp::Ended => run
                .projector
                .into_result()
                .ok_or(ExecutorError::UnknownJob { job_id }),
        }
    }

    /// Closes every job left in doubt by an executor that stopped (crashed,
    /// was killed, lost its disk): a step whose outcome is unknown is recorded
    /// as failed (kind `interrupted`) and its job halted — it is never run
    /// again; a failed step's job is halted; a job stopped between steps with
    /// a cancel request is cancelled. Jobs stopped between steps otherwise are
    /// left to `resume`. Calls no handler.
    ///
    /// A step whose outcome this executor knows but could not record
    /// ([`ExecutorError::OutcomeNotRecorded`]) gets that outcome instead of
    /// `interrupted`. A job whose log cannot be read or replayed is left
    /// untouched and reported ([`Recovery::Unreadable`]); the others are
    /// still recovered.
    ///
    /// Run it when no executor is running jobs on this log: a step still
    /// running elsewhere would be declared interrupted (that executor then
    /// stops on a conflict instead of recording its outcome).
    ///
    /// # Errors
    /// Store failures listing or appending to the jobs.
    pub fn recover(&self) -> Result<Vec<Recovery>, ExecutorError> {
        let known: Vec<UnrecordedOutcome> = self.engine.unrecorded().values().cloned().collect();
        self.recover_with(&known)
    }

    /// As [`recover`](Self::recover), with outcomes known elsewhere (taken
    /// from [`ExecutorError::OutcomeNotRecorded`] errors of other executors).
    ///
    /// # Errors
    /// As [`recover`](Self::recover).
    pub fn recover_with(
        &self,
        known: &[UnrecordedOutcome],
    ) -> Result<Vec<Recovery>, ExecutorError> {
        let unfinished = self
            .engine
            .store
            .unfinished_jobs()
            .map_err(|source| ExecutorError::Log { source })?;
        let mut recovered = Vec::new();
        for job_id in unfinished {
            let mut run = match Run::stored(&self.engine, job_id, None) {
                Ok(run) => run,
                Err(e) => {
                    let error = e.to_string();
                    recovered.push(Recovery::Unreadable { job_id, error });
                    continue;
                }
            };
            let (recorded, taken_up) = self.close(&mut run, known)?;
            if let Some(step_index) = recorded {
                recovered.push(Recovery::OutcomeRecorded { job_id, step_index });
            }
            recovered.push(match taken_up {
                TakenUp::Interrupted { step_index, .. } => {
                    Recovery::Interrupted { job_id, step_index }
                }
                TakenUp::Halted { step_index, .. } => Recovery::Halted { job_id, step_index },
                TakenUp::Cancelled { .. } => Recovery::Cancelled { job_id },
                TakenUp::BetweenSteps { next_step } => Recovery::Resumable { job_id, next_step },
                TakenUp::Ended => Recovery::Resumable {
                    job_id,
                    next_step: run.projector.state().next_step,
                },
            });
        }
        Ok(recovered)
    }

    /// Closes what a stopped executor left of a stored job: the outcome of
    /// its step in doubt, when `known` has it, is recorded first (and its
    /// step returned); then a step still in doubt is recorded interrupted
    /// and the job halted, a failed step's job halted, a requested cancel
    /// honoured. Says what it did.
    fn close(
        &self,
        run: &mut Run<'_>,
        known: &[UnrecordedOutcome],
    ) -> Result<(Option<u32>, TakenUp), ExecutorError> {
        let job_id = run.job_id;
        let mut recorded = None;
        let mut state = run.projector.state();
        if let Phase::StepRunning { step_index } = state.phase
            && let Some(outcome) = known
                .iter()
                .find(|o| o.job_id == job_id && o.step_index == step_index)
        {
            // An outcome known but not recorded when it came is the truth,
            // not "interrupted".
            run.record(std::slice::from_ref(&outcome.event))?;
            self.engine.unrecorded().remove(&(job_id, step_index));
            recorded = Some(step_index);
            state = run.projector.state();
        }
        let taken_up = match state.phase {
            Phase::StepRunning { step_index } => TakenUp::Interrupted {
                step_index,
                result: run.advance(vec![interrupted(step_index)])?,
            },
            Phase::StepFailed { step_index } => TakenUp::Halted {
                step_index,
                result: run.advance(Vec::new())?,
            },
            Phase::Idle if next_action(&state) == NextAction::Cancel => TakenUp::Cancelled {
                result: run.advance(Vec::new())?,
            },
            Phase::Idle => TakenUp::BetweenSteps {
                next_step: state.next_step,
            },
            _ => TakenUp::Ended,
        };
        Ok((recorded, taken_up))
    }

    /// Cancels `job_id` wherever it is: a job in the log gets a cancel
    /// request ([`request_cancel`](Self::request_cancel)); a job still
    /// waiting in `queue` ends before it starts
    /// ([`cancel_queued`](Self::cancel_queued)) — unless a worker started
    /// it meanwhile, which then gets the request.
    ///
    /// # Errors
    /// [`ExecutorError::UnknownJob`] when the job is neither in the log nor
    /// queued; otherwise as `request_cancel` and `cancel_queued`.
    pub fn cancel(
        &self,
        queue: &dyn JobQueue,
        job_id: Uuid,
        reason: &str,
    ) -> Result<CancelRequest, ExecutorError> {
        match self.request_cancel(job_id, reason) {
            Err(ExecutorError::UnknownJob { .. }) => {}
            other => return other,
        }
        let queued = queue
            .queued_job(job_id)
            .map_err(|source| ExecutorError::Store { job_id, source })?;
        let Some((job, _)) = queued else {
            return Err(ExecutorError::UnknownJob { job_id });
        };
        match self.cancel_queued(&job, reason) {
            Ok(_) => Ok(CancelRequest::CancelledBeforeStart),
            // A worker started it meanwhile: ask it to stop.
            Err(ExecutorError::JobAlreadyExists { .. }) => self.request_cancel(job_id, reason),
            Err(e) => Err(e),
        }
    }

    /// Records a request to cancel `job_id`. An executor running the job
    /// honours it before it would start the next step (the step in flight
    /// finishes and is recorded) and ends the job `JobCancelled`. Safe to
    /// call from any process at any time.
    ///
    /// # Errors
    /// [`ExecutorError::UnknownJob`]; [`ExecutorError::JobEnded`] when the
    /// job has already ended; [`ExecutorError::Contended`] when the job
    /// kept moving on under every try; store failures.
    pub fn request_cancel(
        &self,
        job_id: Uuid,
        reason: &str,
    ) -> Result<CancelRequest, ExecutorError> {
        for _ in 0..CANCEL_RETRIES_MAX {
            let mut run = Run::stored(&self.engine, job_id, None)?;
            let state = run.projector.state();
            if state.is_terminal() {
                return Err(ExecutorError::JobEnded {
                    job_id,
                    status: state.status(),
                });
            }
            if state.cancel_requested {
                return Ok(CancelRequest::AlreadyRequested);
            }
            match run.append(&[cancel_request(reason)]) {
                Ok(_) => {
                    return Ok(CancelRequest::Recorded {
                        seq: run.projector.events(),
                    });
                }
                // The job moved on meanwhile: look again.
                Err(ExecutorError::Store { source, .. }) if source.is_conflict() => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ExecutorError::Contended {
            job_id,
            attempts: CANCEL_RETRIES_MAX,
        })
    }

    /// Cancels a job that was submitted but has not started: its log gets
    /// its `JobStarted`, the request and `JobCancelled` in one commit, so no
    /// worker runs it (one that claims it finds it ended). No handler runs.
    ///
    /// # Errors
    /// [`ExecutorError::JobAlreadyExists`] when the job started meanwhile
    /// (cancel it with [`request_cancel`](Self::request_cancel) then);
    /// store failures.
    pub fn cancel_queued(
        &self,
        job: &QueuedJob,
        reason: &str,
    ) -> Result<ExecutionResult, ExecutorError> {
        let job_id = job.job_id;
        validate_plan(&job.steps)
            .map_err(|source| ExecutorError::InvalidPlan { job_id, source })?;
        let mut run = Run::fresh(&self.engine, job);
        let started = run.job_started(None);
        run.start(vec![started, cancel_request(reason)])
    }
}

/// Resumes a stored run that stopped between steps.
fn resume_run(run: &mut Run<'_>) -> Result<ExecutionResult, ExecutorError> {
    let job_id = run.job_id;
    let state = run.projector.state();
    match state.phase {
        Phase::Idle => {}
        Phase::StepRunning { step_index } | Phase::StepFailed { step_index } => {
            return Err(ExecutorError::StepInDoubt { job_id, step_index });
        }
        _ => {
            return Err(ExecutorError::JobEnded {
                job_id,
                status: state.status(),
            });
        }
    }
    let resumed = run.job_resumed(run.observe_before()?);
    run.advance(vec![resumed])
}

/// A request to cancel, for `reason`.
fn cancel_request(reason: &str) -> Event {
    Event::JobCancelRequested(JobCancelRequested {
        reason: reason.to_owned(),
    })
}

/// The failure recorded for a step in doubt: its outcome is unknown, and it
/// is never run again.
fn interrupted(step_index: u32) -> Event {
    Event::StepFailed(StepFailed {
        step_index,
        failure: Failure {
            kind: FailureKind::Interrupted,
            message: format!(
                "outcome unknown: the executor stopped while step {step_index} ran; it is not run again"
            ),
        },
        output: None,
        health_after: None,
    })
}

impl super::Engine {
    /// The outcomes this executor knows but could not record, of `job_id`'s
    /// steps.
    fn known_outcomes(&self, job_id: Uuid) -> Vec<UnrecordedOutcome> {
        self.unrecorded()
            .values()
            .filter(|outcome| outcome.job_id == job_id)
            .cloned()
            .collect()
    }
}
