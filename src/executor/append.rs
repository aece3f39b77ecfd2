//! How a run's events reach the log: judged by the machine, sealed into the
//! job's chain, appended in one commit and folded — and everything that can
//! go wrong with an append on the way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::run::{Run, Runs, Started, StepStart};
use super::{ExecutorError, UnrecordedOutcome};
use crate::chain::{self, Digest, HeadKey};
use crate::clock::Clock;
use crate::events::{Event, EventRecord, StepFailed, StepSucceeded, truncate_to_micros};
use crate::handler::Outcome;
use crate::machine;
use crate::metrics::Metrics;
use crate::model::FailureKind;
use crate::runner::Handover;
use crate::store::{EventStore, StoreError};

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

/// Turns a job's next events into records: each stamped by the executor's
/// clock, numbered after the job's last recorded event, and sealed into its
/// chain (with a MAC under the key). The one place events become records —
/// for a run's own appends and for what the watchdog appends for it.
#[derive(Clone)]
pub(super) struct Sealer {
    job_id: Uuid,
    first_seq: u64,
    head: Digest,
    clock: Arc<dyn Clock>,
    key: Option<Arc<HeadKey>>,
    metrics: Option<Arc<Metrics>>,
}

impl Sealer {
    /// Seals after the event at `first_seq - 1`, whose digest is `head`.
    pub(super) fn new(
        job_id: Uuid,
        first_seq: u64,
        head: Digest,
        clock: Arc<dyn Clock>,
        key: Option<Arc<HeadKey>>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        Sealer {
            job_id,
            first_seq,
            head,
            clock,
            key,
            metrics,
        }
    }

    /// `events` as records; `stamped` is told the time each is stamped with.
    fn seal(
        &self,
        events: &[Event],
        mut stamped: impl FnMut(&Event, DateTime<Utc>),
    ) -> Vec<EventRecord> {
        let mut records = Vec::with_capacity(events.len());
        for (offset, event) in events.iter().enumerate() {
            let recorded_at = truncate_to_micros(self.clock.now());
            stamped(event, recorded_at);
            let seq = self.first_seq + offset as u64;
            records.push(EventRecord::encode(self.job_id, seq, recorded_at, event));
        }
        chain::seal(self.head, &mut records, self.key.as_deref());
        records
    }

    /// Seals `events` and appends them in one commit.
    ///
    /// # Errors
    /// The store's.
    pub(super) fn append(
        &self,
        store: &dyn EventStore,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let records = self.seal(events, |_, _| {});
        timed(self.metrics.as_deref(), || store.append(&records)).map(|_| ())
    }
}

/// Runs the append `append`, its time counted in `metrics` when given.
pub(super) fn timed<T>(metrics: Option<&Metrics>, append: impl FnOnce() -> T) -> T {
    let Some(metrics) = metrics else {
        return append();
    };
    let began = Instant::now();
    let appended = append();
    metrics.append_took(began.elapsed());
    appended
}

/// Events sealed for an append, with the step they start and the hook that
/// hands its handler over once the start is committed.
struct Prepared {
    records: Vec<EventRecord>,
    hook: Option<Handover>,
    started: Option<Started>,
}

/// What one try of an append came to.
enum Attempt {
    /// Made (and folded); the step it started, if any.
    Appended(Option<Started>),
    /// Not made.
    Failed(StoreError),
}

impl Run<'_> {
    /// Judges, appends (in one commit) and folds `events`. On a conflict,
    /// catches up with what others appended (a cancel request) and tries
    /// again with what the machine still accepts: all of `events`, or the
    /// prefix that a caught-up cancel request left valid. Returns the step
    /// started, when the events recorded end with a `StepStarted`.
    pub(super) fn record(&mut self, events: &[Event]) -> Result<Option<Started>, ExecutorError> {
        let events = &*self.control.with_claim(self.projector.state(), events);
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
        Err(ExecutorError::Contended {
            job_id: self.job_id,
            attempts: CONFLICT_RETRIES_MAX,
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
            let prepared = self.prepare(events);
            match self.attempt(events, prepared)? {
                Attempt::Appended(started) => return Ok(started),
                Attempt::Failed(failure) => self.classify(events, failure, retries)?,
            }
            retries += 1;
            self.engine.clock.sleep(pause);
            pause = (pause * 2).min(APPEND_RETRY_PAUSE_MAX);
        }
    }

    /// `events` sealed as the job's next records; when they end with a
    /// `StepStarted`, its step, prepared to run.
    fn prepare(&self, events: &[Event]) -> Prepared {
        let mut start = None;
        let records = self.sealer().seal(events, |event, recorded_at| {
            if let Event::StepStarted(s) = event {
                start = Some(StepStart {
                    step_index: s.step_index,
                    recorded_at,
                    instant: Instant::now(),
                });
            }
        });
        let (hook, started) = match start.map(|start| self.prepare_step(&start)) {
            Some((hook, started)) => (hook, Some(started)),
            None => (None, None),
        };
        Prepared {
            records,
            hook,
            started,
        }
    }

    /// Tries the append once. A commit whose outcome is unknown is looked
    /// up in the log: made after all, it stands — but its hook did not
    /// run, so a step it started never got to its handler, and never will:
    /// that step's outcome is known, not run.
    fn attempt(&mut self, events: &[Event], prepared: Prepared) -> Result<Attempt, ExecutorError> {
        let Prepared {
            records,
            hook,
            started,
        } = prepared;
        let store = &self.engine.store;
        let appended = timed(self.engine.metrics.as_deref(), || match hook {
            Some(hook) => store.append_then(&records, hook),
            None => store.append(&records),
        });
        let detail = match appended {
            Ok(_) => {
                self.fold(&records, events)?;
                return Ok(Attempt::Appended(started));
            }
            Err(StoreError::OutcomeUnknown { detail }) => detail,
            Err(failure) => return Ok(Attempt::Failed(failure)),
        };
        match self.stored_already(&records) {
            Ok(true) => {
                self.fold(&records, events)?;
                Ok(Attempt::Appended(started.map(|s| Started {
                    step_index: s.step_index,
                    runs: Runs::Known(not_started(&detail)),
                })))
            }
            Ok(false) => Ok(Attempt::Failed(StoreError::OutcomeUnknown { detail })),
            Err(failure) => Ok(Attempt::Failed(failure)),
        }
    }

    /// What a failed append comes to: `Ok` when it passes (a busy database,
    /// a commit not made) and may be tried again; else the error the append
    /// ends with. A lost fence still lets the step's outcome be recorded
    /// alone, if the fence allows: nothing more starts, but it is a fact.
    fn classify(
        &mut self,
        events: &[Event],
        failure: StoreError,
        retries: u32,
    ) -> Result<(), ExecutorError> {
        let job_id = self.job_id;
        if let (StoreError::Fenced { .. }, Some(metrics)) = (&failure, &self.engine.metrics) {
            metrics.append_fenced();
        }
        if let StoreError::Fenced { .. } = failure
            && let Some(through) = outcome_prefix(events)
            && through + 1 < events.len()
        {
            self.append(&events[..=through])?;
            return Err(ExecutorError::Store {
                job_id,
                source: failure,
            });
        }
        if failure.is_conflict() {
            // `record` catches up with what another writer appended.
            return Err(ExecutorError::Store {
                job_id,
                source: failure,
            });
        }
        let passing =
            failure.is_transient() || matches!(failure, StoreError::OutcomeUnknown { .. });
        if !passing || retries >= APPEND_RETRIES_MAX {
            return Err(self.not_recorded(events, failure));
        }
        Ok(())
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
            self.tally(event);
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
    pub(super) fn not_recorded(&self, events: &[Event], source: StoreError) -> ExecutorError {
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

/// The index of the last event of `events`' prefix that records a step's
/// outcome: the outcome itself, or the claim right after it that names it.
fn outcome_prefix(events: &[Event]) -> Option<usize> {
    let outcome = events.iter().position(is_outcome)?;
    match events.get(outcome + 1) {
        Some(Event::JobClaimed(_)) => Some(outcome + 1),
        _ => Some(outcome),
    }
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
