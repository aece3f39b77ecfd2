//! Plans in: messages from a broker become jobs in the store's queue, each
//! at most once, and no message is acknowledged before its job is safe.
//!
//! The [`Intake`] takes messages from its [`MessageSource`] a batch at a
//! time (what is there already, up to `batch`), and for each:
//!
//! 1. [`read_message`] makes a job of it, touching nothing: the body's
//!    size first (a body over `max_plan_bytes` is refused unread), then
//!    its signature (when a [`PlanVerifier`] is given), then the plan
//!    (`PLAN.json`'s format, unknown fields refused, checked by
//!    `validate_plan`), then its job id (the plan's, else
//!    [`job_id_from_message_id`] of the message id, else refused).
//! 2. The [`JobSink`] submits the batch's jobs (together, where the store
//!    can). Only once a job's submission is durable — or the job is found
//!    there already with the same plan (a redelivery, a message sent
//!    twice) — is its message acknowledged. A crash before the
//!    acknowledgement brings the message back, and step 2 then finds the
//!    job: no second job, ever.
//! 3. A message that cannot become a job (step 1 refused it, or its job id
//!    holds another plan) goes to the dead letter with the reason in
//!    [`HEADER_REASON`](super::HEADER_REASON), and is acknowledged once the
//!    dead letter holds it; without a dead letter it is rejected without
//!    requeue (AMQP) or terminated (JetStream), and the reason logged. It
//!    never blocks the messages behind it.
//! 4. When the store fails, the messages are released (they come back) and
//!    the intake waits, backing off; when the broker drops the connection,
//!    it reconnects, backing off. What was not acknowledged is redelivered.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::backoff::{Backoff, wait_out};
use super::{BusError, job_id_from_message_id};
use crate::events::Event;
use crate::model::{JobStep, PlanError, PlanFile, validate_plan};
use crate::store::{Log, QueuedJob, StoreError};

/// The default limit on a message's body: 1 MiB.
pub const MAX_PLAN_BYTES_DEFAULT: usize = 1 << 20;

/// Refusals an [`IntakeReport`] keeps (the count goes on past it).
pub const REFUSALS_KEPT_MAX: usize = 1000;

/// A message taken from a source, not yet settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inbound {
    /// The message id (AMQP `message_id`, NATS `Nats-Msg-Id`), if any.
    pub message_id: Option<String>,
    /// The body as received.
    pub body: Vec<u8>,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// The source's handle for settling it.
    pub token: u64,
}

/// A source of messages that are settled one by one: acknowledged,
/// released, rejected or dead-lettered. Broker adapters implement it; so
/// can a test.
pub trait MessageSource: Send {
    /// The next message, waiting at most `wait`; `None` when none came.
    ///
    /// # Errors
    /// [`BusError::Disconnected`] when the connection is lost.
    fn next(&mut self, wait: Duration) -> Result<Option<Inbound>, BusError>;

    /// Acknowledges `message`: the broker forgets it.
    ///
    /// # Errors
    /// [`BusError::Disconnected`] when the acknowledgement could not be
    /// sent (the broker will deliver the message again).
    fn ack(&mut self, message: &Inbound) -> Result<(), BusError>;

    /// Gives `message` back, to be delivered again.
    ///
    /// # Errors
    /// [`BusError::Disconnected`] (the broker gives it back anyway).
    fn release(&mut self, message: &Inbound) -> Result<(), BusError>;

    /// Refuses `message` for good, without a dead letter: AMQP's reject
    /// without requeue, JetStream's `term`.
    ///
    /// # Errors
    /// [`BusError::Disconnected`] (the broker will deliver it again).
    fn reject(&mut self, message: &Inbound) -> Result<(), BusError>;

    /// Copies `message` to the dead letter with `reason` in its
    /// [`HEADER_REASON`](super::HEADER_REASON) header, and returns once the
    /// broker has confirmed it holds the copy; `false` (nothing done) when
    /// the source has no dead letter. The message itself is not settled.
    ///
    /// # Errors
    /// A [`BusError`] when the copy is not confirmed.
    fn dead_letter(&mut self, message: &Inbound, reason: &str) -> Result<bool, BusError>;

    /// Connects again after the connection was lost. Messages taken but not
    /// settled before are forgotten: the broker delivers them again.
    ///
    /// # Errors
    /// A [`BusError`] when the broker cannot be reached yet.
    fn reconnect(&mut self) -> Result<(), BusError>;

    /// Gives back what was fetched and not handed out, sends what is
    /// buffered, and disconnects.
    fn close(&mut self);
}

/// A signed plan, opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedPlan {
    /// The plan's JSON text, as signed.
    pub text: Vec<u8>,
    /// The name of the key that signed it.
    pub signer: String,
}

/// Checks that a body is a signed note of a plan, by an allowed key (the
/// C2SP signed-note format; the implementation lives with the notes).
pub trait PlanVerifier: Send + Sync {
    /// The plan inside `note` and who signed it.
    ///
    /// # Errors
    /// Why the note is refused (not a signed note, no signature by an
    /// allowed key, a signature that does not verify), as one line.
    fn verify(&self, note: &[u8]) -> Result<SignedPlan, String>;
}

/// What submitting a job came to.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Submission {
    /// Submitted now, durably.
    New,
    /// The job was there already, with the same plan: nothing recorded.
    Existing,
    /// The job id is taken by something else; the reason says what.
    Taken {
        /// Why, for the dead letter.
        reason: String,
    },
}

/// Where the intake submits jobs.
pub trait JobSink: Send + Sync {
    /// Submits `job`, unless its id is taken.
    ///
    /// # Errors
    /// Store failures; nothing is submitted then.
    fn submit(&self, job: &QueuedJob) -> Result<Submission, StoreError>;

    /// Submits `jobs`, answering each in order, as [`submit`](Self::submit)
    /// would one after the other (a job twice in `jobs` is `Existing` the
    /// second time). A store that can commits them in one transaction; this
    /// default submits them one by one.
    fn submit_all(&self, jobs: &[QueuedJob]) -> Vec<Result<Submission, StoreError>> {
        jobs.iter().map(|job| self.submit(job)).collect()
    }
}

/// The store's job queue as a [`JobSink`]: `submit`, and on a conflict, the
/// plan already under that id — queued, or in the log's `JobStarted` —
/// compared with the one submitted (contract and steps).
pub struct QueueSink {
    log: Arc<dyn Log>,
}

impl std::fmt::Debug for QueueSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSink").finish_non_exhaustive()
    }
}

impl QueueSink {
    /// Submits to `log`'s queue.
    pub fn new(log: Arc<dyn Log>) -> Self {
        QueueSink { log }
    }

    fn held_plan(&self, job_id: Uuid) -> Result<Option<(Uuid, Vec<JobStep>)>, StoreError> {
        if let Some((queued, _)) = self.log.queued_job(job_id)? {
            return Ok(Some((queued.contract_id, queued.steps)));
        }
        let mut first = None;
        self.log.visit_job(job_id, &mut |record| {
            first = Some(record.clone());
            false
        })?;
        Ok(first.and_then(|record| match record.decode().ok()?.event {
            Event::JobStarted(started) => Some((started.contract_id, started.plan)),
            _ => None,
        }))
    }
}

impl JobSink for QueueSink {
    fn submit(&self, job: &QueuedJob) -> Result<Submission, StoreError> {
        match self.log.submit(job) {
            Ok(()) => Ok(Submission::New),
            Err(e) if e.is_conflict() => Ok(match self.held_plan(job.job_id)? {
                Some((contract_id, steps))
                    if contract_id == job.contract_id && steps == job.steps =>
                {
                    Submission::Existing
                }
                Some(_) => Submission::Taken {
                    reason: format!("job {} already exists with a different plan", job.job_id),
                },
                None => Submission::Taken {
                    reason: format!(
                        "job {} already exists and its plan cannot be read back",
                        job.job_id
                    ),
                },
            }),
            Err(e) => Err(e),
        }
    }
}

/// Why a message cannot become a job. Its text is the dead letter's
/// [`HEADER_REASON`](super::HEADER_REASON).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The body is over the limit; it was not read.
    #[error("body of {bytes} bytes is over the limit of {limit} bytes; refused unread")]
    TooLarge {
        /// The body's size.
        bytes: usize,
        /// `max_plan_bytes`.
        limit: usize,
    },
    /// The signature check refused it.
    #[error("signature: {0}")]
    Signature(String),
    /// The body is not a plan in `PLAN.json`'s format.
    #[error("not a plan: {0}")]
    NotAPlan(String),
    /// The plan is not executable.
    #[error("invalid plan: {0}")]
    InvalidPlan(PlanError),
    /// Neither the plan nor the message names the job.
    #[error("no job id: the plan has no job_id and the message no message id")]
    NoJobId,
}

/// A message made into a job.
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted {
    /// The job to submit.
    pub job: QueuedJob,
    /// Who signed the plan, when signatures are checked.
    pub signer: Option<String>,
}

/// Parses a plan exactly as `PLAN.json` is read: JSON, unknown fields
/// refused, then checked by `validate_plan`.
///
/// # Errors
/// [`Refusal::NotAPlan`], [`Refusal::InvalidPlan`].
pub fn parse_plan(text: &[u8]) -> Result<PlanFile, Refusal> {
    let plan: PlanFile =
        serde_json::from_slice(text).map_err(|e| Refusal::NotAPlan(e.to_string()))?;
    validate_plan(&plan.steps).map_err(Refusal::InvalidPlan)?;
    Ok(plan)
}

/// Makes a job of a message, touching nothing: size, signature (with a
/// `verifier`), plan, job id — in that order.
///
/// # Errors
/// The [`Refusal`] that stopped it.
pub fn read_message(
    message_id: Option<&str>,
    body: &[u8],
    options: &IntakeOptions,
    verifier: Option<&dyn PlanVerifier>,
) -> Result<Accepted, Refusal> {
    if body.len() > options.max_plan_bytes {
        return Err(Refusal::TooLarge {
            bytes: body.len(),
            limit: options.max_plan_bytes,
        });
    }
    let (plan, signer) = match verifier {
        Some(verifier) => {
            let signed = verifier.verify(body).map_err(Refusal::Signature)?;
            (parse_plan(&signed.text)?, Some(signed.signer))
        }
        None => (parse_plan(body)?, None),
    };
    let job_id = match (plan.job_id, message_id.filter(|id| !id.is_empty())) {
        (Some(job_id), _) => job_id,
        (None, Some(message_id)) => job_id_from_message_id(message_id),
        (None, None) => return Err(Refusal::NoJobId),
    };
    let job = QueuedJob::new(
        job_id,
        plan.contract_id,
        plan.steps,
        options.executed_by.clone(),
    );
    Ok(Accepted { job, signer })
}

/// How an intake runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct IntakeOptions {
    /// The largest body read (default [`MAX_PLAN_BYTES_DEFAULT`]).
    pub max_plan_bytes: usize,
    /// Recorded as the submitted jobs' `executed_by` (default `intake`).
    pub executed_by: String,
    /// Exit once the source has been empty for `idle_for`.
    pub until_idle: bool,
    /// How long the source must stay empty for `until_idle` (default 500 ms).
    pub idle_for: Duration,
    /// How long one wait for a message lasts, and so how soon a raised
    /// stop flag is seen (default 200 ms).
    pub poll: Duration,
    /// Messages taken at a time, their jobs submitted together (default
    /// 32; keep a source's prefetch at least as large).
    pub batch: usize,
    /// Waits between tries after a failure (reconnecting, a store away).
    pub backoff: Backoff,
}

impl Default for IntakeOptions {
    fn default() -> Self {
        IntakeOptions {
            max_plan_bytes: MAX_PLAN_BYTES_DEFAULT,
            executed_by: "intake".to_owned(),
            until_idle: false,
            idle_for: Duration::from_millis(500),
            poll: Duration::from_millis(200),
            batch: 32,
            backoff: Backoff::default(),
        }
    }
}

impl IntakeOptions {
    /// With bodies up to `bytes`.
    pub fn with_max_plan_bytes(mut self, bytes: usize) -> Self {
        self.max_plan_bytes = bytes;
        self
    }

    /// With jobs submitted as `executed_by`.
    pub fn with_executed_by(mut self, executed_by: impl Into<String>) -> Self {
        self.executed_by = executed_by.into();
        self
    }

    /// Exiting once the source has been empty for `idle_for`.
    pub fn until_idle(mut self, idle_for: Duration) -> Self {
        self.until_idle = true;
        self.idle_for = idle_for;
        self
    }

    /// Taking up to `batch` messages at a time (at least one).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// With these waits between tries after a failure.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }
}

/// A refused message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// Its message id, if it had one.
    pub message_id: Option<String>,
    /// Why.
    pub reason: String,
    /// Whether it went to the dead letter (else it was rejected).
    pub dead_lettered: bool,
}

/// What an intake did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IntakeReport {
    /// Jobs submitted.
    pub submitted: usize,
    /// Messages whose job was there already with the same plan.
    pub duplicates: usize,
    /// Messages refused.
    pub refused: usize,
    /// The first [`REFUSALS_KEPT_MAX`] refusals.
    pub refusals: Vec<Refused>,
    /// Messages given back because the store failed.
    pub released: usize,
    /// Connections made again after one was lost.
    pub reconnects: usize,
}

/// Takes plans from a [`MessageSource`] and submits them to a
/// [`JobSink`], acknowledging each message only once its job is safe.
pub struct Intake {
    source: Box<dyn MessageSource>,
    sink: Arc<dyn JobSink>,
    verifier: Option<Arc<dyn PlanVerifier>>,
    options: IntakeOptions,
    stop: Arc<AtomicBool>,
    report: IntakeReport,
    failures: u32,
}

impl std::fmt::Debug for Intake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Intake")
            .field("options", &self.options)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl Intake {
    /// An intake from `source` into `sink`.
    pub fn new(
        source: Box<dyn MessageSource>,
        sink: Arc<dyn JobSink>,
        options: IntakeOptions,
    ) -> Self {
        Intake {
            source,
            sink,
            verifier: None,
            options,
            stop: Arc::new(AtomicBool::new(false)),
            report: IntakeReport::default(),
            failures: 0,
        }
    }

    /// Accepting only plans that `verifier` opens (signed notes).
    pub fn with_verifier(mut self, verifier: Arc<dyn PlanVerifier>) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Raise it (from a signal handler, another thread) to stop once the
    /// messages in hand are acknowledged or released.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Runs until stopped (or, with `until_idle`, until the source has been
    /// empty for a moment), then closes the source.
    ///
    /// # Errors
    /// A failure that waiting cannot cure: a store that refuses writes, a
    /// broker that refuses the queue or stream. Passing failures (a lost
    /// connection, a busy store) are waited out.
    pub fn run(&mut self) -> Result<IntakeReport, BusError> {
        let result = self.run_until_done();
        self.source.close();
        result.map(|()| std::mem::take(&mut self.report))
    }

    fn run_until_done(&mut self) -> Result<(), BusError> {
        let mut idle_since = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            let step = match self.take_batch() {
                Ok(batch) if batch.is_empty() => {
                    if self.options.until_idle && idle_since.elapsed() >= self.options.idle_for {
                        return Ok(());
                    }
                    Ok(())
                }
                Ok(batch) => {
                    idle_since = Instant::now();
                    self.handle(batch)
                }
                Err(e) => Err(e),
            };
            match step {
                Ok(()) => self.failures = 0,
                Err(e) => {
                    self.wait_out(e)?;
                    idle_since = Instant::now();
                }
            }
        }
        Ok(())
    }

    /// Waits up to `poll` for a message, then takes what else is there
    /// already, up to `batch` messages.
    fn take_batch(&mut self) -> Result<Vec<Inbound>, BusError> {
        let Some(first) = self.source.next(self.options.poll)? else {
            return Ok(Vec::new());
        };
        let mut batch = vec![first];
        while batch.len() < self.options.batch {
            match self.source.next(Duration::ZERO) {
                Ok(Some(message)) => batch.push(message),
                // A failure shows again at the next wait; the batch first.
                Ok(None) | Err(_) => break,
            }
        }
        Ok(batch)
    }

    /// Takes messages from their receipt to their settlement: each one
    /// read, their jobs submitted together, then each message settled in
    /// order. After a failure the messages not yet settled are released.
    ///
    /// # Errors
    /// As [`run`](Self::run): the first failure.
    pub fn handle(&mut self, messages: Vec<Inbound>) -> Result<(), BusError> {
        let reads: Vec<Result<Accepted, Refusal>> = messages
            .iter()
            .map(|message| {
                read_message(
                    message.message_id.as_deref(),
                    &message.body,
                    &self.options,
                    self.verifier.as_deref(),
                )
            })
            .collect();
        let jobs: Vec<QueuedJob> = reads
            .iter()
            .filter_map(|read| read.as_ref().ok().map(|accepted| accepted.job.clone()))
            .collect();
        let mut submissions = self.sink.submit_all(&jobs).into_iter();
        let mut failure = None;
        for (message, read) in messages.iter().zip(reads) {
            let submission = match read {
                Err(refusal) => Ok(Submission::Taken {
                    reason: refusal.to_string(),
                }),
                Ok(_) => submissions.next().unwrap_or_else(|| {
                    Err(StoreError::InvalidAppend(
                        "the job sink answered fewer jobs than it was given".to_owned(),
                    ))
                }),
            };
            // Counted as known, settled or not: a job submitted here whose
            // message is given back will be found when it comes back.
            match submission {
                Ok(Submission::New) => self.report.submitted += 1,
                Ok(Submission::Existing) => self.report.duplicates += 1,
                _ => {}
            }
            if failure.is_some() {
                self.give_back(message);
                continue;
            }
            if let Err(e) = self.settle(message, submission) {
                failure = Some(e);
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Acknowledges a message whose job is safe, refuses one that cannot
    /// become a job, releases one whose submission failed.
    fn settle(
        &mut self,
        message: &Inbound,
        submission: Result<Submission, StoreError>,
    ) -> Result<(), BusError> {
        match submission {
            Ok(Submission::New | Submission::Existing) => self.source.ack(message),
            Ok(Submission::Taken { reason }) => self.refuse(message, reason),
            Err(e) => {
                self.give_back(message);
                Err(e.into())
            }
        }
    }

    fn refuse(&mut self, message: &Inbound, reason: String) -> Result<(), BusError> {
        let dead_lettered = match self.source.dead_letter(message, &reason) {
            Ok(done) => done,
            Err(e) => {
                self.give_back(message);
                return Err(e);
            }
        };
        if dead_lettered {
            self.source.ack(message)?;
        } else {
            self.source.reject(message)?;
        }
        eprintln!(
            "job-executor intake: refused message {}: {reason} ({})",
            message.message_id.as_deref().unwrap_or("without an id"),
            if dead_lettered {
                "sent to the dead letter"
            } else {
                "rejected"
            }
        );
        self.report.refused += 1;
        if self.report.refusals.len() < REFUSALS_KEPT_MAX {
            self.report.refusals.push(Refused {
                message_id: message.message_id.clone(),
                reason,
                dead_lettered,
            });
        }
        Ok(())
    }

    fn give_back(&mut self, message: &Inbound) {
        self.report.released += 1;
        // A release that fails finds the connection lost: the broker gives
        // the message back anyway.
        let _ = self.source.release(message);
    }

    /// Waits out a passing failure, backing off, and reconnects when the
    /// connection was lost; returns at once when stopped.
    fn wait_out(&mut self, error: BusError) -> Result<(), BusError> {
        let source = &mut self.source;
        if wait_out(
            "intake",
            error,
            &self.options.backoff,
            &mut self.failures,
            &self.stop,
            &mut || source.reconnect(),
        )? {
            self.report.reconnects += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;
    use crate::store::{EventStore, JobQueue, MemoryStore};

    const CONTRACT: &str = "6f1c2a6e-8a49-4d1a-9d55-0e3a1f5b7c11";

    fn plan(job_id: Option<&str>, target: &str) -> Vec<u8> {
        let id = job_id.map_or(String::new(), |id| format!("\"job_id\":\"{id}\","));
        format!(
            r#"{{{id}"contract_id":"{CONTRACT}","steps":[{{"step_index":0,"step_type":"capability_enable","target":"{target}"}}]}}"#
        )
        .into_bytes()
    }

    /// A source that hands out scripted messages and records what was done
    /// with each; a released message comes back at the end of the queue.
    #[derive(Default)]
    struct Script {
        queue: VecDeque<Inbound>,
        done: Vec<String>,
        dead_letter: bool,
        disconnect_next: usize,
        reconnects: usize,
    }

    #[derive(Clone, Default)]
    struct Scripted(Arc<Mutex<Script>>);

    impl Scripted {
        fn with(messages: Vec<(Option<&str>, Vec<u8>)>, dead_letter: bool) -> Self {
            let queue = messages
                .into_iter()
                .enumerate()
                .map(|(token, (id, body))| Inbound {
                    message_id: id.map(str::to_owned),
                    body,
                    redelivered: false,
                    token: token as u64,
                })
                .collect();
            Scripted(Arc::new(Mutex::new(Script {
                queue,
                dead_letter,
                ..Script::default()
            })))
        }

        fn done(&self) -> Vec<String> {
            self.0.lock().unwrap().done.clone()
        }

        fn record(&self, what: String) {
            self.0.lock().unwrap().done.push(what);
        }
    }

    impl MessageSource for Scripted {
        fn next(&mut self, _: Duration) -> Result<Option<Inbound>, BusError> {
            let mut script = self.0.lock().unwrap();
            if script.disconnect_next > 0 {
                script.disconnect_next -= 1;
                return Err(BusError::Disconnected {
                    broker: "script".into(),
                    detail: "dropped".into(),
                });
            }
            Ok(script.queue.pop_front())
        }
        fn ack(&mut self, m: &Inbound) -> Result<(), BusError> {
            self.record(format!("ack {}", m.token));
            Ok(())
        }
        fn release(&mut self, m: &Inbound) -> Result<(), BusError> {
            self.record(format!("release {}", m.token));
            let mut again = m.clone();
            again.redelivered = true;
            self.0.lock().unwrap().queue.push_back(again);
            Ok(())
        }
        fn reject(&mut self, m: &Inbound) -> Result<(), BusError> {
            self.record(format!("reject {}", m.token));
            Ok(())
        }
        fn dead_letter(&mut self, m: &Inbound, reason: &str) -> Result<bool, BusError> {
            if !self.0.lock().unwrap().dead_letter {
                return Ok(false);
            }
            self.record(format!("dead-letter {}: {reason}", m.token));
            Ok(true)
        }
        fn reconnect(&mut self) -> Result<(), BusError> {
            self.0.lock().unwrap().reconnects += 1;
            Ok(())
        }
        fn close(&mut self) {
            self.record("close".into());
        }
    }

    fn quick() -> IntakeOptions {
        IntakeOptions::default()
            .until_idle(Duration::ZERO)
            .with_backoff(Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(2),
            })
    }

    fn run(source: &Scripted, sink: Arc<dyn JobSink>, options: IntakeOptions) -> IntakeReport {
        Intake::new(Box::new(source.clone()), sink, options)
            .run()
            .unwrap()
    }

    #[test]
    fn a_job_is_submitted_once_and_every_copy_acked() {
        let store = Arc::new(MemoryStore::new());
        let id = "0b0e5d0c-1b8e-4b63-9a52-7f7a3a8e9d01";
        let source = Scripted::with(
            vec![
                (Some("m-1"), plan(Some(id), "billing")),
                (Some("m-2"), plan(Some(id), "billing")),
                (Some("m-3"), plan(None, "search")),
                (Some("m-3"), plan(None, "search")),
            ],
            true,
        );
        let report = run(&source, Arc::new(QueueSink::new(store.clone())), quick());
        assert_eq!(
            (report.submitted, report.duplicates, report.refused),
            (2, 2, 0)
        );
        assert_eq!(source.done(), ["ack 0", "ack 1", "ack 2", "ack 3", "close"]);
        let queued = store.queued().unwrap();
        assert_eq!(queued.len(), 2);
        assert_eq!(queued[0].job_id.to_string(), id);
        assert_eq!(queued[1].job_id, job_id_from_message_id("m-3"));
        let (job, _) = store.queued_job(queued[1].job_id).unwrap().unwrap();
        assert_eq!(job.executed_by, "intake");
        assert_eq!(job.steps[0].target, "search");
    }

    #[test]
    fn poison_goes_to_the_dead_letter_before_its_ack_and_the_flow_goes_on() {
        let store = Arc::new(MemoryStore::new());
        let id = "0b0e5d0c-1b8e-4b63-9a52-7f7a3a8e9d02";
        let bad_index = String::from_utf8(plan(Some(id), "x"))
            .unwrap()
            .replace("\"step_index\":0", "\"step_index\":1");
        let source = Scripted::with(
            vec![
                (Some("a"), b"not json".to_vec()),
                (
                    Some("b"),
                    format!(r#"{{"contract_id":"{CONTRACT}","steps":[],"extra":1}}"#).into_bytes(),
                ),
                (Some("c"), bad_index.into_bytes()),
                (None, plan(None, "x")),
                (Some("e"), vec![b' '; 2048]),
                (Some("f"), plan(Some(id), "billing")),
                (Some("g"), plan(Some(id), "other")),
                (Some("h"), plan(None, "after")),
            ],
            true,
        );
        let options = quick().with_max_plan_bytes(1024);
        let report = run(&source, Arc::new(QueueSink::new(store.clone())), options);
        assert_eq!((report.submitted, report.refused), (2, 6));
        let done = source.done();
        let expect = [
            ("dead-letter 0: not a plan: expected ident", "ack 0"),
            ("dead-letter 1: not a plan: unknown field `extra`", "ack 1"),
            (
                "dead-letter 2: invalid plan: step at position 0 has step_index 1",
                "ack 2",
            ),
            ("dead-letter 3: no job id", "ack 3"),
            (
                "dead-letter 4: body of 2048 bytes is over the limit of 1024 bytes",
                "ack 4",
            ),
            (
                "dead-letter 6: job 0b0e5d0c-1b8e-4b63-9a52-7f7a3a8e9d02 already exists with a different plan",
                "ack 6",
            ),
        ];
        let mut rest = done.iter();
        for (dead_letter, ack) in expect {
            let next = rest.find(|d| d.starts_with("dead-letter")).unwrap();
            assert!(next.starts_with(dead_letter), "{next} is not {dead_letter}");
            let position = done.iter().position(|d| d == next).unwrap();
            assert_eq!(done[position + 1], ack, "{done:?}");
        }
        assert!(done.contains(&"ack 5".to_owned()) && done.contains(&"ack 7".to_owned()));
        assert_eq!(store.queued().unwrap().len(), 2);
        assert!(report.refusals.iter().all(|r| r.dead_lettered));
    }

    #[test]
    fn without_a_dead_letter_a_refused_message_is_rejected() {
        let store = Arc::new(MemoryStore::new());
        let source = Scripted::with(vec![(Some("a"), b"42".to_vec())], false);
        let report = run(&source, Arc::new(QueueSink::new(store)), quick());
        assert_eq!(source.done(), ["reject 0", "close"]);
        assert_eq!(report.refusals.len(), 1);
        assert!(!report.refusals[0].dead_lettered);
        assert!(
            report.refusals[0]
                .reason
                .starts_with("not a plan: invalid type")
        );
    }

    /// Fails its first `failures` submissions as a busy store would.
    struct Flaky {
        inner: QueueSink,
        failures: Mutex<usize>,
    }

    impl JobSink for Flaky {
        fn submit(&self, job: &QueuedJob) -> Result<Submission, StoreError> {
            let mut failures = self.failures.lock().unwrap();
            if *failures > 0 {
                *failures -= 1;
                return Err(StoreError::Busy {
                    target: crate::store::Target::File("flaky".into()),
                    detail: "locked".into(),
                });
            }
            self.inner.submit(job)
        }
    }

    #[test]
    fn a_store_failure_releases_the_message_and_it_is_taken_again() {
        let store = Arc::new(MemoryStore::new());
        let source = Scripted::with(vec![(Some("a"), plan(None, "x"))], true);
        let sink = Arc::new(Flaky {
            inner: QueueSink::new(store.clone()),
            failures: Mutex::new(2),
        });
        let report = run(&source, sink, quick());
        assert_eq!(source.done(), ["release 0", "release 0", "ack 0", "close"]);
        assert_eq!((report.released, report.submitted), (2, 1));
        assert_eq!(store.queued().unwrap().len(), 1);
    }

    #[test]
    fn a_store_that_refuses_writes_stops_the_intake_with_its_batch_released() {
        struct Broken;
        impl JobSink for Broken {
            fn submit(&self, _: &QueuedJob) -> Result<Submission, StoreError> {
                Err(StoreError::InvalidAppend("read-only".into()))
            }
        }
        let source = Scripted::with(
            vec![(Some("a"), plan(None, "x")), (Some("b"), b"{".to_vec())],
            true,
        );
        let error = Intake::new(Box::new(source.clone()), Arc::new(Broken), quick())
            .run()
            .unwrap_err();
        assert!(matches!(error, BusError::Store(_)), "{error}");
        // The rest of the batch, poison included, is given back untouched.
        assert_eq!(source.done(), ["release 0", "release 1", "close"]);
    }

    #[test]
    fn a_lost_connection_is_made_again() {
        let store = Arc::new(MemoryStore::new());
        let source = Scripted::with(vec![(Some("a"), plan(None, "x"))], true);
        source.0.lock().unwrap().disconnect_next = 3;
        let report = run(&source, Arc::new(QueueSink::new(store)), quick());
        assert_eq!(report.reconnects, 3);
        assert_eq!(source.0.lock().unwrap().reconnects, 3);
        assert_eq!(source.done(), ["ack 0", "close"]);
    }

    #[test]
    fn a_stop_finishes_the_message_in_hand_and_takes_no_other() {
        /// Raises the stop flag while a submission is in hand.
        struct Stopping {
            inner: QueueSink,
            stop: Mutex<Option<Arc<AtomicBool>>>,
        }
        impl JobSink for Stopping {
            fn submit(&self, job: &QueuedJob) -> Result<Submission, StoreError> {
                if let Some(stop) = self.stop.lock().unwrap().as_ref() {
                    stop.store(true, Ordering::Relaxed);
                }
                self.inner.submit(job)
            }
        }
        let store = Arc::new(MemoryStore::new());
        let source = Scripted::with(
            vec![(Some("a"), plan(None, "x")), (Some("b"), plan(None, "y"))],
            true,
        );
        let sink = Arc::new(Stopping {
            inner: QueueSink::new(store.clone()),
            stop: Mutex::new(None),
        });
        let options = IntakeOptions::default().with_batch(1);
        let mut intake = Intake::new(Box::new(source.clone()), sink.clone(), options);
        *sink.stop.lock().unwrap() = Some(intake.stop_flag());
        let report = intake.run().unwrap();
        assert_eq!(report.submitted, 1);
        assert_eq!(source.done(), ["ack 0", "close"]);
        assert_eq!(source.0.lock().unwrap().queue.len(), 1);
    }

    /// Opens "signed" bodies of the form `SIGNED BY <name>\n<plan>`.
    struct Prefix;

    impl PlanVerifier for Prefix {
        fn verify(&self, note: &[u8]) -> Result<SignedPlan, String> {
            let text = std::str::from_utf8(note).map_err(|_| "not text".to_owned())?;
            let (first, plan) = text.split_once('\n').ok_or("no signature")?;
            let signer = first.strip_prefix("SIGNED BY ").ok_or("no signature")?;
            Ok(SignedPlan {
                text: plan.as_bytes().to_vec(),
                signer: signer.to_owned(),
            })
        }
    }

    #[test]
    fn with_a_verifier_only_opened_notes_are_plans() {
        let options = IntakeOptions::default();
        let signed = [b"SIGNED BY ops\n".as_slice(), &plan(None, "x")].concat();
        let accepted = read_message(Some("m"), &signed, &options, Some(&Prefix)).unwrap();
        assert_eq!(accepted.signer.as_deref(), Some("ops"));
        assert_eq!(accepted.job.steps[0].target, "x");
        let refused = read_message(Some("m"), &plan(None, "x"), &options, Some(&Prefix));
        assert_eq!(refused.unwrap_err().to_string(), "signature: no signature");
        // The size is checked before the signature.
        let small = options.with_max_plan_bytes(4);
        let refused = read_message(Some("m"), &signed, &small, Some(&Prefix)).unwrap_err();
        assert!(matches!(refused, Refusal::TooLarge { limit: 4, .. }));
    }

    #[test]
    fn a_job_already_in_the_log_is_compared_with_its_started_plan() {
        let store = Arc::new(MemoryStore::new());
        let executor = crate::JobExecutor::builder().store(store.clone()).build();
        let job_id = Uuid::new_v4();
        let contract_id = Uuid::parse_str(CONTRACT).unwrap();
        let steps = vec![JobStep::new(0, "capability_enable", "billing")];
        executor
            .execute_job(job_id, contract_id, &steps, None, "ops")
            .unwrap();
        assert!(store.last_seq(job_id).unwrap() > 0);
        let sink = QueueSink::new(store.clone());
        let same = QueuedJob::new(job_id, contract_id, steps.clone(), "intake");
        assert_eq!(sink.submit(&same).unwrap(), Submission::Existing);
        let other = QueuedJob::new(job_id, Uuid::new_v4(), steps, "intake");
        assert!(matches!(
            sink.submit(&other).unwrap(),
            Submission::Taken { .. }
        ));
        assert!(store.queued().unwrap().is_empty());
    }

    #[test]
    fn what_is_there_is_taken_as_one_batch_and_settled_in_order() {
        /// Records the size of each batch it is given.
        struct Batches {
            inner: QueueSink,
            sizes: Mutex<Vec<usize>>,
        }
        impl JobSink for Batches {
            fn submit(&self, job: &QueuedJob) -> Result<Submission, StoreError> {
                self.inner.submit(job)
            }
            fn submit_all(&self, jobs: &[QueuedJob]) -> Vec<Result<Submission, StoreError>> {
                self.sizes.lock().unwrap().push(jobs.len());
                jobs.iter().map(|job| self.submit(job)).collect()
            }
        }
        let store = Arc::new(MemoryStore::new());
        let messages = (0..7)
            .map(|i| match i {
                3 => (Some("bad"), b"{".to_vec()),
                _ => (Some("m"), plan(None, &format!("t{i}"))),
            })
            .collect();
        let source = Scripted::with(messages, true);
        let sink = Arc::new(Batches {
            inner: QueueSink::new(store.clone()),
            sizes: Mutex::new(Vec::new()),
        });
        let report = run(&source, sink.clone(), quick().with_batch(4));
        // Seven messages, batches of four: the poison takes no place in
        // its batch's submission; the same message id with other plans is
        // refused after the first.
        assert_eq!(*sink.sizes.lock().unwrap(), [3, 3]);
        assert_eq!((report.submitted, report.refused), (1, 6));
        let done = source.done();
        let settled: Vec<&str> = done
            .iter()
            .filter(|d| d.starts_with("ack"))
            .map(String::as_str)
            .collect();
        assert_eq!(
            settled,
            [
                "ack 0", "ack 1", "ack 2", "ack 3", "ack 4", "ack 5", "ack 6"
            ]
        );
    }
}
