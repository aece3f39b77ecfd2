//! One job's run: the loop that decides the next events, has the machine
//! judge them, appends them and acts on them — and everything that can go
//! wrong with an append on the way.

use std::borrow::Cow;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use uuid::Uuid;

use super::{Engine, ExecutorError, UnrecordedOutcome};
use crate::chain;
use crate::events::{
    Event, EventRecord, Failure, JobCancelled, JobCompleted, JobHalted, StepFailed, StepStarted,
    StepSucceeded, truncate_to_micros,
};
use crate::handler::{HealthObserver, StepHandler};
use crate::machine::{self, NextAction, next_action};
use crate::model::{ExecutionContext, FailureKind, JobStep};
use crate::projection;
use crate::projection::Projector;
use crate::result::ExecutionResult;
use crate::runner::{self, Dispatch, Handover, Outcome};
use crate::store::StoreError;
use crate::sync::panic_message;
use crate::watchdog::Action;

/// How often a conflicting append is retried after catching up with the log.
const CONFLICT_RETRIES_MAX: usize = 16;

/// How often an append that failed in passing (a busy database, or a commit
/// whose outcome the log shows was not made) is tried again before the
/// executor gives up on it. With the backoff below and SQLite's own busy
/// timeout (5 s by default) per try, an append rides out a lock held for
/// about 45 s.
pub const APPEND_RETRIES_MAX: u32 = 8;

/// The pause before the first retry; it doubles at each one, up to
/// [`APPEND_RETRY_PAUSE_MAX`].
const APPEND_RETRY_PAUSE: Duration = Duration::from_millis(10);
const APPEND_RETRY_PAUSE_MAX: Duration = Duration::from_secs(1);

/// A step whose start was just recorded, and how its handler runs.
pub(super) struct Started {
    step_index: u32,
    runs: Runs,
}

enum Runs {
    /// Handed to a pool thread: wait for it.
    Dispatched(Dispatch),
    /// To be called on this thread, under the watchdog.
    Here(Arc<dyn StepHandler>, ExecutionContext),
    /// Known already: no handler, or not started.
    Known(Outcome),
}

/// How a step about to start will run.
enum Prepared {
    /// Handed to a pool thread once its start is committed.
    Handover(Handover, Dispatch),
    /// On this run's own thread.
    Here(Arc<dyn StepHandler>, ExecutionContext),
}

/// A `StepStarted` about to be appended.
struct StepStart {
    step_index: u32,
    /// The time it is stamped with.
    recorded_at: chrono::DateTime<chrono::Utc>,
    /// The same moment on the monotonic clock: the step's deadline runs
    /// from here.
    instant: Instant,
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
    pub(super) plan: Cow<'a, [JobStep]>,
    pub(super) contract_id: Uuid,
    pub(super) executed_by: String,
    pub(super) observer: Option<&'a dyn HealthObserver>,
    pub(super) control: RunControl<'a>,
}

/// What a worker adds to a run: a way to stop it between steps, and the
/// signal it raises when it sees a cancel request.
#[derive(Clone, Debug, Default)]
pub(crate) struct RunControl<'a> {
    /// Set: record the step in flight, then start no other.
    pub(crate) stop: Option<&'a std::sync::atomic::AtomicBool>,
    /// Handed to every step's handler as `ExecutionContext::cancel_requested`.
    pub(crate) cancel_requested: Option<crate::model::CancelSignal>,
    /// Set: handlers run on this run's own thread, and where the watchdog
    /// answers when it ends the job at a step's deadline.
    pub(crate) answer: Option<Answer>,
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

impl RunControl<'_> {
    fn stopping(&self) -> bool {
        self.stop
            .is_some_and(|stop| stop.load(std::sync::atomic::Ordering::SeqCst))
    }
}

impl Run<'_> {
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

    /// The watchdog's action for a step's outcome: seal it after what this
    /// run has recorded, at the time it fires, and append it.
    fn record_later(&self, event: Event) -> Action {
        let store = self.engine.store.clone();
        let clock = self.engine.clock.clone();
        let key = self.engine.head_key.clone();
        let (job_id, seq, head) = (
            self.job_id,
            self.projector.events() + 1,
            self.projector.head(),
        );
        Box::new(move || {
            let at = truncate_to_micros(clock.now());
            let mut records = [EventRecord::encode(job_id, seq, at, &event)];
            chain::seal(head, &mut records, key.as_ref());
            store.append(&records).map(|_| ())
        })
    }

    /// Drives the job until the machine says it is done, starting with
    /// `first` (events the caller has decided, such as `JobStarted`).
    ///
    /// Each append carries what the machine decides up to the next point
    /// where something outside must happen: a step's outcome goes in one
    /// commit with the next step's start (or the job's end), and a handler
    /// runs only once its `StepStarted` is committed. So every step costs
    /// one commit, and nothing about at-most-once changes.
    pub(super) fn drive(&mut self, first: Vec<Event>) -> Result<ExecutionResult, ExecutorError> {
        let _running = self.engine.pool.job();
        let mut batch = first;
        loop {
            self.decide_more(&mut batch);
            if batch.is_empty() {
                break;
            }
            let started = self.record(&batch)?;
            batch.clear();
            if let Some(started) = started {
                let Some(outcome) = self.outcome(started) else {
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
                        self.record(std::slice::from_ref(&outcome))?;
                        return Err(e);
                    }
                    Observed::Recorded(e) => return Err(e),
                }
            }
        }
        Ok(self
            .projector
            .result()
            .expect("a job that ran has a JobStarted event"))
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

    /// Prepares the handler of a step about to start (its deadline runs
    /// from its `StepStarted`): the hook that hands it to a worker once its
    /// start is committed, and what to wait on; or, with no handler
    /// registered for its type, its failure.
    fn prepare_step(&self, start: &StepStart) -> Result<Prepared, Outcome> {
        let step = &self.plan[start.step_index as usize];
        let Some(handler) = self.engine.handler(&step.step_type) else {
            return Err(Outcome::Failed {
                failure: FailureKind::NoHandler,
                error: format!("No handler registered for step type: {}", step.step_type),
                output: None,
            });
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
            return Ok(Prepared::Here(handler, context));
        }
        let (hook, dispatch) = self.engine.pool.prepare(handler, step, context);
        Ok(Prepared::Handover(hook, dispatch))
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
        let store = self.engine.store.clone();
        let clock = self.engine.clock.clone();
        let key = self.engine.head_key.clone();
        let cancel = context.cancel.clone();
        let answer = self.control.answer.clone();
        let (job_id, seq, head) = (
            self.job_id,
            self.projector.events() + 1,
            self.projector.head(),
        );
        // Built only if it fires: arming costs no allocation but the box.
        Box::new(move || {
            cancel.cancel();
            let outcome = outcome_event(runner::timed_out(timeout_seconds, ""), step_index);
            let events = [outcome, Event::JobHalted(JobHalted { step_index })];
            let mut records: Vec<EventRecord> = events
                .iter()
                .enumerate()
                .map(|(offset, event)| {
                    let at = truncate_to_micros(clock.now());
                    EventRecord::encode(job_id, seq + offset as u64, at, event)
                })
                .collect();
            chain::seal(head, &mut records, key.as_ref());
            store.append(&records)?;
            if let Some(answer) = answer {
                answer
                    .give(projection::replay(store.as_ref(), job_id).map_err(ExecutorError::from));
            }
            Ok(())
        })
    }

    /// Judges, appends (in one commit) and folds `events`. On a conflict,
    /// catches up with what others appended (a cancel request) and tries
    /// again with what the machine still accepts: all of `events`, or the
    /// prefix that a caught-up cancel request left valid. Returns the step
    /// started, when the events recorded end with a `StepStarted`.
    pub(super) fn record(&mut self, events: &[Event]) -> Result<Option<Started>, ExecutorError> {
        let mut caught_up = false;
        for _ in 0..CONFLICT_RETRIES_MAX {
            let accepted = self.accepted(events, caught_up)?;
            match self.append(&events[..accepted]) {
                Err(ExecutorError::Store { source, .. }) if source.is_conflict() => {
                    self.catch_up()?;
                    caught_up = true;
                }
                other => return other,
            }
        }
        Err(ExecutorError::Conflict {
            job_id: self.job_id,
            seq: self.projector.events() + 1,
            kind: "events, faster than this executor could append".into(),
        })
    }

    /// How many of `events` the machine accepts after what is folded: all
    /// of them, or — once a cancel request was caught up with — the prefix
    /// it leaves valid. Any other refusal is a bug of the executor's.
    fn accepted(&self, events: &[Event], caught_up: bool) -> Result<usize, ExecutorError> {
        let mut state = self.projector.state();
        for (accepted, event) in events.iter().enumerate() {
            match machine::apply(state, event) {
                Ok(next) => state = next,
                Err(_) if caught_up => return Ok(accepted),
                Err(source) => {
                    return Err(ExecutorError::Transition {
                        job_id: self.job_id,
                        kind: event.kind(),
                        source,
                    });
                }
            }
        }
        Ok(events.len())
    }

    /// Appends `events` (which the machine has accepted) in one commit and
    /// folds them, riding out what passes: a busy database is tried again,
    /// and a commit whose outcome is unknown is looked up in the log — made,
    /// it stands; not made, it is tried again. A failure that stays is
    /// returned carrying the step outcome it could not record, if any.
    pub(super) fn append(&mut self, events: &[Event]) -> Result<Option<Started>, ExecutorError> {
        if events.is_empty() {
            return Ok(None);
        }
        let mut pause = APPEND_RETRY_PAUSE;
        let mut retries = 0;
        loop {
            let (records, start) = self.encode(events);
            let (hook, runs) =
                match start.map(|start| (start.step_index, self.prepare_step(&start))) {
                    Some((step_index, Ok(Prepared::Handover(hook, dispatch)))) => {
                        (Some(hook), Some((step_index, Runs::Dispatched(dispatch))))
                    }
                    Some((step_index, Ok(Prepared::Here(handler, context)))) => {
                        (None, Some((step_index, Runs::Here(handler, context))))
                    }
                    Some((step_index, Err(outcome))) => {
                        (None, Some((step_index, Runs::Known(outcome))))
                    }
                    None => (None, None),
                };
            let store = &self.engine.store;
            let appended = match hook {
                Some(hook) => store.append_then(&records, hook),
                None => store.append(&records),
            };
            let failure = match appended {
                Ok(_) => {
                    self.fold(&records, events)?;
                    return Ok(runs.map(|(step_index, runs)| Started { step_index, runs }));
                }
                Err(StoreError::OutcomeUnknown { detail }) => {
                    match self.stored_already(&records) {
                        // Committed after all. The hook did not run, so a
                        // step started here never got to its handler, and
                        // never will: its outcome is known — not run.
                        Ok(true) => {
                            self.fold(&records, events)?;
                            return Ok(runs.map(|(step_index, _)| Started {
                                step_index,
                                runs: Runs::Known(not_started(&detail)),
                            }));
                        }
                        Ok(false) => StoreError::OutcomeUnknown { detail },
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            if let StoreError::Fenced { .. } = failure
                && let Some(outcome) = events.iter().position(is_outcome)
                && outcome + 1 < events.len()
            {
                // The claim may have lapsed: nothing more starts, but the
                // step's outcome is a fact — record it alone if the fence
                // still allows, then stop between steps.
                self.append(&events[..=outcome])?;
                return Err(ExecutorError::Store {
                    job_id: self.job_id,
                    source: failure,
                });
            }
            if failure.is_conflict() {
                // `record` catches up with what another writer appended.
                return Err(ExecutorError::Store {
                    job_id: self.job_id,
                    source: failure,
                });
            }
            let passing =
                failure.is_transient() || matches!(failure, StoreError::OutcomeUnknown { .. });
            if !passing || retries >= APPEND_RETRIES_MAX {
                return Err(self.not_recorded(events, failure));
            }
            retries += 1;
            std::thread::sleep(pause);
            pause = (pause * 2).min(APPEND_RETRY_PAUSE_MAX);
        }
    }

    /// `events` as the job's next records, stamped and sealed; with the
    /// step they start, if they end with a `StepStarted`.
    fn encode(&self, events: &[Event]) -> (Vec<EventRecord>, Option<StepStart>) {
        let first_seq = self.projector.events() + 1;
        let mut records = Vec::with_capacity(events.len());
        let mut started = None;
        for (offset, event) in events.iter().enumerate() {
            let recorded_at = truncate_to_micros(self.engine.clock.now());
            if let Event::StepStarted(s) = event {
                started = Some(StepStart {
                    step_index: s.step_index,
                    recorded_at,
                    instant: Instant::now(),
                });
            }
            records.push(EventRecord::encode(
                self.job_id,
                first_seq + offset as u64,
                recorded_at,
                event,
            ));
        }
        chain::seal(
            self.projector.head(),
            &mut records,
            self.engine.head_key.as_ref(),
        );
        (records, started)
    }

    /// Folds records this run appended.
    fn fold(&mut self, records: &[EventRecord], events: &[Event]) -> Result<(), ExecutorError> {
        for (record, event) in records.iter().zip(events) {
            self.projector
                .apply_sealed(record, event)
                .map_err(|source| ExecutorError::Transition {
                    job_id: self.job_id,
                    kind: event.kind(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Whether the log already holds `records` (after an append whose
    /// outcome was unknown): their seqs with their very digests.
    fn stored_already(&self, records: &[EventRecord]) -> Result<bool, StoreError> {
        let first_seq = self.projector.events() + 1;
        let mut matching = 0;
        self.engine.store.visit_job(self.job_id, &mut |stored| {
            if stored.seq >= first_seq {
                let index = (stored.seq - first_seq) as usize;
                if records
                    .get(index)
                    .is_some_and(|r| r.digest == stored.digest)
                {
                    matching += 1;
                }
            }
            true
        })?;
        Ok(matching == records.len())
    }

    /// The error for `events` that could not be appended: when they hold a
    /// step's outcome, the error carries it (and the executor remembers it
    /// for `recover`), so a known outcome is never lost.
    fn not_recorded(&self, events: &[Event], source: StoreError) -> ExecutorError {
        let outcome = events.iter().find_map(|event| match event {
            Event::StepSucceeded(StepSucceeded { step_index, .. })
            | Event::StepFailed(StepFailed { step_index, .. }) => Some((*step_index, event)),
            _ => None,
        });
        match outcome {
            Some((step_index, event)) => {
                let outcome = UnrecordedOutcome {
                    job_id: self.job_id,
                    step_index,
                    event: event.clone(),
                };
                self.engine.remember(outcome.clone());
                ExecutorError::OutcomeNotRecorded {
                    outcome: Box::new(outcome),
                    source,
                }
            }
            None => ExecutorError::Store {
                job_id: self.job_id,
                source,
            },
        }
    }

    /// Folds in what others appended to the job since this run last looked.
    /// Only a cancel request may come from elsewhere.
    fn catch_up(&mut self) -> Result<(), ExecutorError> {
        let job_id = self.job_id;
        let records = self
            .engine
            .store
            .load_job(job_id)
            .map_err(|source| ExecutorError::Store { job_id, source })?;
        for record in records.iter().skip(self.projector.events() as usize) {
            if record.kind != "JobCancelRequested" {
                return Err(ExecutorError::Conflict {
                    job_id,
                    seq: record.seq,
                    kind: record.kind.clone(),
                });
            }
            self.projector.apply_record(record)?;
        }
        Ok(())
    }
}

fn is_outcome(event: &Event) -> bool {
    matches!(event, Event::StepSucceeded(_) | Event::StepFailed(_))
}

/// The outcome of a step whose start was committed with an unknown outcome:
/// its handler was not started, and is never started later.
fn not_started(detail: &str) -> Outcome {
    Outcome::Failed {
        failure: FailureKind::Interrupted,
        error: format!(
            "not run: the commit of its StepStarted had an unknown outcome ({detail}), so its handler was not started"
        ),
        output: None,
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
