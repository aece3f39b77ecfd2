//! One job's run: the loop that decides the next events, has the machine
//! judge them, appends them and acts on them. How an append is made (and
//! what can go wrong with one on the way) is `append`'s.

use std::borrow::Cow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;

use super::append::Sealer;
use super::{Engine, ExecutorError};
use crate::events::{
    Event, EventRecord, Failure, JobCancelled, JobClaimed, JobCompleted, JobHalted, JobResumed,
    JobStarted, StepFailed, StepStarted, StepSucceeded,
};
use crate::handler::{HealthObserver, Outcome, StepHandler};
use crate::machine::{self, JobState, NextAction, Phase, next_action};
use crate::metrics::Metrics;
use crate::model::{CancelSignal, ExecutionContext, FailureKind, JobStatus, JobStep, StepStatus};
use crate::projection::{self, Projector};
use crate::result::ExecutionResult;
use crate::runner::{self, Dispatch, Handover};
use crate::store::QueuedJob;
use crate::sync::panic_message;
use crate::watchdog::Action;
use tracing::{Span, field};

/// A step whose start was just recorded, and how its handler runs.
pub(super) struct Started {
    pub(super) step_index: u32,
    pub(super) runs: Runs,
}

pub(super) enum Runs {
    /// Handed to a pool thread: wait for it.
    Dispatched(Dispatch),
    /// To be called on this thread, under the watchdog.
    Here(Arc<dyn StepHandler>, ExecutionContext),
    /// Known already: no handler, or not started.
    Known(Outcome),
}

/// A `StepStarted` about to be appended.
pub(super) struct StepStart {
    pub(super) step_index: u32,
    /// The time it is stamped with.
    pub(super) recorded_at: chrono::DateTime<chrono::Utc>,
    /// The same moment on the monotonic clock: the step's deadline runs
    /// from here.
    pub(super) instant: Instant,
}

/// What became of a health observation.
enum Observed {
    /// The observer answered in time (`None`: there is no observer).
    Health(Option<Value>),
    /// It panicked or answered late; anything that must be recorded without
    /// it is still to be recorded.
    Failed(ExecutorError),
    /// It missed its deadline after a step, and the watchdog recorded the
    /// step's outcome meanwhile: the job stopped, nothing is left to do.
    Recorded(ExecutorError),
}

/// One job's run: the events recorded so far, folded, and what it needs to
/// go on.
pub(super) struct Run<'a> {
    pub(super) engine: &'a Engine,
    pub(super) job_id: Uuid,
    pub(super) projector: Projector,
    plan: Cow<'a, [JobStep]>,
    contract_id: Uuid,
    executed_by: String,
    observer: Option<&'a dyn HealthObserver>,
    pub(super) control: RunControl<'a>,
    /// When the step in flight started here (kept only for metrics).
    step_began: Option<Instant>,
}

/// How a caller steers a run it does not follow step by step: a flag that
/// stops it between steps, and the signal its handlers see raised when a
/// cancel request comes in. A worker gives one to every job it takes up
/// ([`JobExecutor::take_up`](super::JobExecutor::take_up)).
///
/// ```
/// use std::sync::atomic::AtomicBool;
/// use job_executor::{CancelSignal, executor::RunControl};
///
/// let stop = AtomicBool::new(false);
/// let control = RunControl::new().stop_on(&stop).cancel_signal(CancelSignal::new());
/// # let _ = control;
/// ```
#[derive(Clone, Debug, Default)]
pub struct RunControl<'a> {
    /// Set: record the step in flight, then start no other.
    stop: Option<&'a AtomicBool>,
    /// Handed to every step's handler as `ExecutionContext::cancel_requested`.
    cancel_requested: Option<CancelSignal>,
    /// Set: handlers run on this run's own thread, and where the watchdog
    /// answers when it ends the job at a step's deadline.
    answer: Option<Answer>,
    /// A worker's claim, appended with the run's first events.
    claimed: Option<JobClaimed>,
    /// The worker that claimed the job, named on the job's span.
    worker_id: Option<String>,
}

impl<'a> RunControl<'a> {
    /// No stop flag, a fresh cancel signal per step, handlers handed over.
    pub fn new() -> Self {
        RunControl::default()
    }

    /// Once `stop` is raised, the run records the step in flight and starts
    /// no other: the job rests between steps, to be resumed or taken up
    /// again.
    pub fn stop_on(mut self, stop: &'a AtomicBool) -> Self {
        self.stop = Some(stop);
        self
    }

    /// `signal` is every step's `ExecutionContext::cancel_requested`: whoever
    /// sees the job's cancel request raises it, and a long step may poll it
    /// to finish early.
    pub fn cancel_signal(mut self, signal: CancelSignal) -> Self {
        self.cancel_requested = Some(signal);
        self
    }

    /// The run appends `claimed` — who claimed the job, at which epoch —
    /// with its first events (right after `JobStarted` for a job not
    /// started yet, right after the outcome of a step left in doubt, whose
    /// index the run puts in `recorded_outcome`, whatever it was given),
    /// so the log tells which worker appended what follows. A worker gives
    /// every job it takes up its claim.
    pub fn claimed(mut self, claimed: JobClaimed) -> Self {
        self.worker_id = Some(claimed.worker_id.clone());
        self.claimed = Some(claimed);
        self
    }

    /// Handlers are called on the run's own thread; the watchdog answers
    /// `answer` if it ends the job at a step's deadline.
    pub(super) fn answering(mut self, answer: Answer) -> Self {
        self.answer = Some(answer);
        self
    }

    fn stopping(&self) -> bool {
        self.stop.is_some_and(|stop| stop.load(Ordering::SeqCst))
    }

    /// `events` with the claim still to be appended, if any, put in. This
    /// is the one place a claim's order is decided: it goes where the
    /// machine first admits it after `state` — after a `JobStarted` (a
    /// job's first event) and after the outcome of a step in flight
    /// (EXEC-002: nothing but a cancel request comes between a step's start
    /// and its outcome), else first. A takeover of a step in doubt thus
    /// commits the step's outcome, then the claim naming that step in
    /// `recorded_outcome`, then what follows.
    pub(super) fn with_claim<'e>(
        &mut self,
        state: JobState,
        events: &'e [Event],
    ) -> Cow<'e, [Event]> {
        let Some(mut claimed) = self.claimed.take() else {
            return Cow::Borrowed(events);
        };
        // What the claim recorded is the run's to say, from what it appends.
        claimed.recorded_outcome = None;
        let mut state = state;
        let mut at = 0;
        while let (Phase::NotStarted | Phase::StepRunning { .. }, Some(event)) =
            (state.phase, events.get(at))
        {
            let Ok(next) = machine::apply(state, event) else {
                // The machine refuses the batch itself; the judge says why.
                break;
            };
            if let Some(step_index) = step_of(event) {
                claimed.recorded_outcome = Some(step_index);
            }
            (state, at) = (next, at + 1);
        }
        let mut with_claim = Vec::with_capacity(events.len() + 1);
        with_claim.extend_from_slice(&events[..at]);
        with_claim.push(Event::JobClaimed(claimed));
        with_claim.extend_from_slice(&events[at..]);
        Cow::Owned(with_claim)
    }
}

/// Where a driven job's result goes: to whoever waits for it, once — from
/// the thread that drove the job, or from the watchdog if it ended the job
/// at a step's deadline first.
#[derive(Clone)]
pub(crate) struct Answer(Arc<std::sync::Mutex<Option<AnswerFn>>>);

type AnswerFn = Box<dyn FnOnce(Result<ExecutionResult, ExecutorError>) + Send>;

impl Answer {
    pub(crate) fn new(
        answer: impl FnOnce(Result<ExecutionResult, ExecutorError>) + Send + 'static,
    ) -> Self {
        Answer(Arc::new(std::sync::Mutex::new(Some(Box::new(answer)))))
    }

    /// Gives `result` to whoever waits, unless an answer was given already.
    pub(crate) fn give(&self, result: Result<ExecutionResult, ExecutorError>) {
        let answer = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(answer) = answer {
            answer(result);
        }
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Answer")
    }
}

impl<'a> Run<'a> {
    /// A run of a job with no events yet, as it was submitted.
    pub(super) fn fresh(engine: &'a Engine, job: &'a QueuedJob) -> Self {
        Run::new(
            engine,
            job.job_id,
            Projector::new(job.job_id),
            Cow::Borrowed(&job.steps),
            job.contract_id,
            job.executed_by.clone(),
        )
    }

    /// A run of a stored job, folded from its log, with the plan and
    /// contract of its `JobStarted`; `executed_by` defaults to who started it.
    pub(super) fn stored(
        engine: &'a Engine,
        job_id: Uuid,
        executed_by: Option<&str>,
    ) -> Result<Self, ExecutorError> {
        let records = engine
            .store
            .load_job(job_id)
            .map_err(|source| ExecutorError::Store { job_id, source })?;
        let mut projector = Projector::new(job_id);
        for record in &records {
            projector.apply_record(record)?;
        }
        let started = match records.first().map(EventRecord::decode) {
            Some(Ok(recorded)) => match recorded.event {
                Event::JobStarted(started) => started,
                // apply_record has checked that the log begins with JobStarted.
                _ => unreachable!("a replayed log begins with JobStarted"),
            },
            _ => return Err(ExecutorError::UnknownJob { job_id }),
        };
        Ok(Run::new(
            engine,
            job_id,
            projector,
            Cow::Owned(started.plan),
            started.contract_id,
            executed_by.map_or(started.executed_by, str::to_owned),
        ))
    }

    /// The one constructor: a run of `job_id`, whose events `projector`
    /// folds, not observed, under no control.
    fn new(
        engine: &'a Engine,
        job_id: Uuid,
        projector: Projector,
        plan: Cow<'a, [JobStep]>,
        contract_id: Uuid,
        executed_by: String,
    ) -> Self {
        Run {
            engine,
            job_id,
            projector,
            plan,
            contract_id,
            executed_by,
            observer: None,
            control: RunControl::default(),
            step_began: None,
        }
    }

    /// The run with health observed by `observer`.
    pub(super) fn observed_by(mut self, observer: Option<&'a dyn HealthObserver>) -> Self {
        self.observer = observer;
        self
    }

    /// The run under `control`.
    pub(super) fn under(mut self, control: RunControl<'a>) -> Self {
        self.control = control;
        self
    }

    /// The `JobStarted` of this run's job, with `health_before`.
    pub(super) fn job_started(&self, health_before: Option<Value>) -> Event {
        Event::JobStarted(JobStarted {
            contract_id: self.contract_id,
            plan: self.plan.to_vec(),
            executed_by: self.executed_by.clone(),
            executor_version: self.engine.version.clone(),
            health_before,
        })
    }

    /// The `JobResumed` of this run, with `health_before`.
    pub(super) fn job_resumed(&self, health_before: Option<Value>) -> Event {
        Event::JobResumed(JobResumed {
            executed_by: self.executed_by.clone(),
            executor_version: self.engine.version.clone(),
            health_before,
        })
    }

    /// Advances a job with no events yet from `first` (its `JobStarted`, …)
    /// to its end. Another executor that started the same job id first
    /// makes the first append conflict: the job already exists.
    pub(super) fn start(&mut self, first: Vec<Event>) -> Result<ExecutionResult, ExecutorError> {
        match self.advance(first) {
            Err(ExecutorError::Conflict { seq: 1, .. }) => Err(ExecutorError::already_exists(
                self.engine.store.as_ref(),
                self.job_id,
            )),
            other => other,
        }
    }

    /// Observes health before a step (for `JobStarted` or `JobResumed`):
    /// nothing is recorded yet, so an observer that panics or misses its
    /// deadline only stops the run.
    pub(super) fn observe_before(&self) -> Result<Option<Value>, ExecutorError> {
        match self.observe(None) {
            Observed::Health(health) => Ok(health),
            Observed::Failed(e) | Observed::Recorded(e) => Err(e),
        }
    }

    /// Observes health, if there is an observer, against the executor's
    /// health deadline. After a step, `fallback` is the step's outcome
    /// without health: the watchdog records it if the observer has not
    /// answered by the deadline, so a hung observer never holds the job.
    fn observe(&self, fallback: Option<&Event>) -> Observed {
        let Some(observer) = self.observer else {
            return Observed::Health(None);
        };
        let timeout = self.engine.health_timeout;
        let started = Instant::now();
        let alarm = fallback.and_then(|event| {
            let deadline = started.checked_add(timeout)?;
            Some(
                self.engine
                    .watchdog
                    .arm(deadline, self.record_later(event.clone())),
            )
        });
        // The observer only gets `&self`: a panic cannot leave anything of
        // the executor half-changed.
        let answer = catch_unwind(AssertUnwindSafe(|| observer.observe_health()));
        let late = ExecutorError::HealthObserver {
            job_id: self.job_id,
            message: format!("it did not answer within {} s", timeout.as_secs_f64()),
        };
        if let Some(fired) = alarm.and_then(|alarm| alarm.disarm()) {
            return Observed::Recorded(match (fired, fallback) {
                (Ok(()), _) => late,
                (Err(source), Some(event)) => {
                    self.not_recorded(std::slice::from_ref(event), source)
                }
                (Err(source), None) => ExecutorError::Store {
                    job_id: self.job_id,
                    source,
                },
            });
        }
        match answer {
            Err(payload) => Observed::Failed(ExecutorError::HealthObserver {
                job_id: self.job_id,
                message: format!("it panicked: {}", panic_message(payload.as_ref())),
            }),
            Ok(_) if started.elapsed() > timeout => Observed::Failed(late),
            Ok(health) => Observed::Health(Some(health)),
        }
    }

    /// The watchdog's action for a step's outcome: sealed after what this
    /// run has recorded, at the time it fires, and appended.
    fn record_later(&self, event: Event) -> Action {
        let (store, sealer) = (self.engine.store.clone(), self.sealer());
        let counted = self.counted_later(step_of(&event));
        Box::new(move || {
            sealer.append(store.as_ref(), std::slice::from_ref(&event))?;
            counted(std::slice::from_ref(&event));
            Ok(())
        })
    }

    /// What counts events the watchdog records for this run, for step
    /// `step_index` (the step in flight).
    fn counted_later(&self, step_index: Option<u32>) -> impl Fn(&[Event]) + Send + 'static {
        let metrics = self.engine.metrics.clone();
        let step_type = step_index.map_or("", |i| self.step_type(i)).to_owned();
        let began = self.step_began;
        move |events| {
            if let Some(metrics) = &metrics {
                for event in events {
                    count(metrics, event, &step_type, began);
                }
            }
        }
    }

    /// Advances the job until the machine says it is done (or the run is
    /// asked to stop between steps), starting with `first` (events the
    /// caller has decided, such as `JobResumed`).
    ///
    /// Each append carries what the machine decides up to the next point
    /// where something outside must happen: a step's outcome goes in one
    /// commit with the next step's start (or the job's end), and a handler
    /// runs only once its `StepStarted` is committed. So every step costs
    /// one commit, and nothing about at-most-once changes.
    pub(super) fn advance(&mut self, first: Vec<Event>) -> Result<ExecutionResult, ExecutorError> {
        let _running = self.engine.pool.job();
        let _counted = self.engine.metrics.as_deref().map(Metrics::job_running);
        let job = self.job_span();
        let _job = job.enter();
        let mut batch = first;
        // The span of the step in flight: its outcome is recorded with the
        // next step's start.
        let mut step = None;
        loop {
            self.decide_more(&mut batch);
            if batch.is_empty() {
                break;
            }
            let started = self.record_in(&batch, step.take())?;
            batch.clear();
            if let Some(started) = started {
                let span = self.step_span(started.step_index);
                let _step = span.enter();
                let outcome = self.outcome(started);
                step = Some(span.clone());
                let Some(outcome) = outcome else {
                    // The watchdog ended the job at a step's deadline, and
                    // answered for it.
                    return projection::replay(self.engine.store.as_ref(), self.job_id)
                        .map_err(ExecutorError::from);
                };
                match self.observe(Some(&outcome)) {
                    Observed::Health(health) => batch.push(with_health(outcome, health)),
                    Observed::Failed(e) => {
                        // The step's outcome is a fact: record it (without
                        // health), then stop before the next step.
                        self.record_in(std::slice::from_ref(&outcome), step.take())?;
                        return Err(e);
                    }
                    Observed::Recorded(e) => return Err(e),
                }
            }
        }
        let result = self
            .projector
            .result()
            .expect("a job that ran has a JobStarted event");
        if result.final_status == JobStatus::Failed {
            let kind = result
                .step_results
                .iter()
                .rev()
                .find_map(|s| s.failure_kind);
            job.record("otel.status_code", "ERROR");
            job.record("error.type", kind.map_or("_OTHER", FailureKind::as_str));
        }
        tracing::debug!(status = %result.final_status, reason = %result.final_reason, "job ended");
        Ok(result)
    }

    /// Records `events` as [`record`](Self::record) does; the outcome among
    /// them, if any, is logged in `ending`, the span of the step it ends.
    fn record_in(
        &mut self,
        events: &[Event],
        ending: Option<Span>,
    ) -> Result<Option<Started>, ExecutorError> {
        let started = self.record(events)?;
        if let Some(span) = ending {
            for event in events {
                log_outcome(&span, event);
            }
        }
        Ok(started)
    }

    /// The span of the job's run here: `job_id`, and `worker_id` when a
    /// worker claimed it; a failed job's status and `error.type` (the
    /// failed step's failure kind) are recorded when it ends.
    fn job_span(&self) -> Span {
        tracing::info_span!(
            "job",
            job_id = %self.job_id,
            worker_id = self.control.worker_id.as_deref(),
            otel.status_code = field::Empty,
            error.r#type = field::Empty,
        )
    }

    /// The span of step `step_index`, which has just started.
    fn step_span(&self, step_index: u32) -> Span {
        let span = tracing::info_span!(
            "step",
            // Signed: OpenTelemetry's integers are, and an unsigned field
            // would be exported as text.
            step_index = i64::from(step_index),
            step_type = self.step_type(step_index),
            otel.status_code = field::Empty,
            otel.status_description = field::Empty,
            error.r#type = field::Empty,
        );
        span.in_scope(|| tracing::debug!("step started"));
        span
    }

    /// Appends to `batch` what the machine decides after it, up to the next
    /// step's start or the job's end.
    fn decide_more(&self, batch: &mut Vec<Event>) {
        let mut state = self.projector.state();
        for event in batch.iter() {
            match machine::apply(state, event) {
                Ok(next) => state = next,
                // `record` reports the refusal.
                Err(_) => return,
            }
        }
        let next = match next_action(&state) {
            // Asked to stop: the job rests between steps, to be resumed.
            NextAction::StartStep(_) if self.control.stopping() => return,
            NextAction::StartStep(step_index) => Event::StepStarted(StepStarted { step_index }),
            NextAction::Complete => Event::JobCompleted(JobCompleted {}),
            NextAction::Halt(step_index) => Event::JobHalted(JobHalted { step_index }),
            NextAction::Cancel => Event::JobCancelled(JobCancelled {
                reason: self.projector.cancel_request_reason().unwrap_or_default(),
            }),
            _ => return,
        };
        batch.push(next);
    }

    /// Seals this run's next events after what it has recorded.
    pub(super) fn sealer(&self) -> Sealer {
        Sealer::new(
            self.job_id,
            self.projector.events() + 1,
            self.projector.head(),
            self.engine.clock.clone(),
            self.engine.head_key.clone(),
            self.engine.metrics.clone(),
        )
    }

    /// Counts an event this run recorded, when there are metrics: a step's
    /// outcome (how long it took, when it started here), a job's end.
    pub(super) fn tally(&mut self, event: &Event) {
        let Some(metrics) = self.engine.metrics.as_deref() else {
            return;
        };
        if let Event::StepStarted(_) = event {
            self.step_began = Some(Instant::now());
            return;
        }
        let began = self.step_began.take();
        let step_type = step_of(event).map_or("", |i| self.step_type(i));
        count(metrics, event, step_type, began);
    }

    /// The type of step `step_index` of the plan.
    fn step_type(&self, step_index: u32) -> &str {
        self.plan
            .get(step_index as usize)
            .map_or("", |step| step.step_type.as_str())
    }

    /// Prepares the handler of a step about to start (its deadline runs
    /// from its `StepStarted`): the hook that hands it to a worker once its
    /// start is committed, and how its outcome comes — from that worker,
    /// from a call on this thread, or, with no handler registered for its
    /// type, known already (its failure).
    pub(super) fn prepare_step(&self, start: &StepStart) -> (Option<Handover>, Started) {
        let step_index = start.step_index;
        let step = &self.plan[step_index as usize];
        let Some(handler) = self.engine.handler(&step.step_type) else {
            let failed = Outcome::Failed {
                failure: FailureKind::NoHandler,
                error: format!("No handler registered for step type: {}", step.step_type),
                output: None,
            };
            let runs = Runs::Known(failed);
            return (None, Started { step_index, runs });
        };
        let mut context = ExecutionContext::new(
            self.job_id,
            self.contract_id,
            step,
            &self.executed_by,
            start.recorded_at,
        );
        context.deadline = start
            .instant
            .checked_add(Duration::from_secs(step.timeout_seconds));
        if let Some(requested) = &self.control.cancel_requested {
            context.cancel_requested = requested.clone();
        }
        if self.control.answer.is_some() {
            let runs = Runs::Here(handler, context);
            return (None, Started { step_index, runs });
        }
        let (hook, dispatch) = self.engine.pool.prepare(handler, step, context);
        let runs = Runs::Dispatched(dispatch);
        (Some(hook), Started { step_index, runs })
    }

    /// A started step's outcome event, without health: waited for (its
    /// handler runs off-thread against its deadline) or run here. `None`
    /// when the watchdog ended the job at the step's deadline meanwhile.
    fn outcome(&self, started: Started) -> Option<Event> {
        let outcome = match started.runs {
            Runs::Dispatched(dispatch) => self.engine.pool.wait(dispatch),
            Runs::Here(handler, context) => {
                self.run_here(handler.as_ref(), started.step_index, &context)?
            }
            Runs::Known(outcome) => outcome,
        };
        Some(outcome_event(outcome, started.step_index))
    }

    /// Calls a step's handler on this thread. At the step's deadline, if it
    /// has not answered, the watchdog raises its cancel signal, records the
    /// timeout, ends the job and answers the caller: the job is never held,
    /// only this thread. `None` when that happened.
    fn run_here(
        &self,
        handler: &dyn StepHandler,
        step_index: u32,
        context: &ExecutionContext,
    ) -> Option<Outcome> {
        let step = &self.plan[step_index as usize];
        let alarm = context.deadline.map(|deadline| {
            self.engine
                .watchdog
                .arm(deadline, self.time_out_later(step, context))
        });
        let outcome = runner::call_or_start(handler, step, context);
        let late = context.deadline.is_some_and(|d| Instant::now() >= d);
        match alarm.and_then(|alarm| alarm.disarm()) {
            Some(Ok(())) => None,
            // The watchdog could not record the timeout: the executor does.
            Some(Err(_)) => Some(runner::timed_out(step.timeout_seconds, "")),
            // A result past the deadline is as late as none.
            None if late => {
                context.cancel.cancel();
                Some(runner::timed_out(step.timeout_seconds, ""))
            }
            None => Some(outcome),
        }
    }

    /// The watchdog's action at a step's deadline: the step's timeout and
    /// the job's halt, sealed after what this run has recorded, then the
    /// job's result to whoever waits for it.
    fn time_out_later(&self, step: &JobStep, context: &ExecutionContext) -> Action {
        let (step_index, timeout_seconds) = (step.step_index, step.timeout_seconds);
        let (store, sealer) = (self.engine.store.clone(), self.sealer());
        let cancel = context.cancel.clone();
        let answer = self.control.answer.clone();
        let job_id = self.job_id;
        let counted = self.counted_later(Some(step_index));
        // Built only if it fires: arming costs no allocation but the box.
        Box::new(move || {
            cancel.cancel();
            let outcome = outcome_event(runner::timed_out(timeout_seconds, ""), step_index);
            let ending = [outcome, Event::JobHalted(JobHalted { step_index })];
            sealer.append(store.as_ref(), &ending)?;
            counted(&ending);
            if let Some(answer) = answer {
                answer
                    .give(projection::replay(store.as_ref(), job_id).map_err(ExecutorError::from));
            }
            Ok(())
        })
    }
}

/// Logs a step's outcome in its span (marked an error when it failed).
fn log_outcome(span: &Span, event: &Event) {
    let _in = span.enter();
    match event {
        Event::StepSucceeded(_) => tracing::debug!("step succeeded"),
        Event::StepFailed(failed) => {
            let kind = failed.failure.kind.as_str();
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_description", failed.failure.message.as_str());
            span.record("error.type", kind);
            tracing::debug!(failure_kind = kind, error = %failed.failure.message, "step failed");
        }
        _ => {}
    }
}

/// The step an outcome event is about.
fn step_of(event: &Event) -> Option<u32> {
    match event {
        Event::StepSucceeded(s) => Some(s.step_index),
        Event::StepFailed(f) => Some(f.step_index),
        _ => None,
    }
}

/// Counts `event`, recorded here, into `metrics`: a step's outcome (of
/// type `step_type`, started at `began` when it started here), a job's end.
fn count(metrics: &Metrics, event: &Event, step_type: &str, began: Option<Instant>) {
    let took = || began.map(|at| at.elapsed());
    match event {
        Event::StepSucceeded(_) => metrics.step_ended(step_type, StepStatus::Completed, took()),
        Event::StepFailed(_) => metrics.step_ended(step_type, StepStatus::Failed, took()),
        Event::JobCompleted(_) => metrics.job_ended(JobStatus::Completed),
        Event::JobHalted(_) => metrics.job_ended(JobStatus::Failed),
        Event::JobCancelled(_) => metrics.job_ended(JobStatus::Cancelled),
        _ => {}
    }
}

/// A step's outcome event, with no health yet.
fn outcome_event(outcome: Outcome, step_index: u32) -> Event {
    match outcome {
        Outcome::Succeeded(output) => Event::StepSucceeded(StepSucceeded {
            step_index,
            output,
            health_after: None,
        }),
        Outcome::Failed {
            failure,
            error,
            output,
        } => Event::StepFailed(StepFailed {
            step_index,
            failure: Failure {
                kind: failure,
                message: error,
            },
            output,
            health_after: None,
        }),
    }
}

/// A step's outcome event with the health observed after it.
fn with_health(mut event: Event, health: Option<Value>) -> Event {
    match &mut event {
        Event::StepSucceeded(s) => s.health_after = health,
        Event::StepFailed(f) => f.health_after = health,
        _ => {}
    }
    event
}
