//! Plans in: messages from a broker become jobs in the store's queue, each
//! at most once, and no message is acknowledged before its job is safe.
//!
//! For each message the [`Intake`] takes from its [`MessageSource`]:
//!
//! 1. [`read_message`] makes a job of it, touching nothing: the body's
//!    size first (a body over `max_plan_bytes` is refused unread), then
//!    its signature (when a [`PlanVerifier`] is given), then the plan
//!    (`PLAN.json`'s format, unknown fields refused, checked by
//!    `validate_plan`), then its job id (the plan's, else
//!    [`job_id_from_message_id`] of the message id, else refused).
//! 2. The [`JobSink`] submits it. Only once the submission is durable — or
//!    the job is found there already with the same plan (a redelivery, a
//!    message sent twice) — is the message acknowledged. A crash before the
//!    acknowledgement brings the message back, and step 2 then finds the
//!    job: no second job, ever.
//! 3. A message that cannot become a job (step 1 refused it, or its job id
//!    holds another plan) goes to the dead letter with the reason in
//!    [`HEADER_REASON`](super::HEADER_REASON), and is acknowledged once the
//!    dead letter holds it; without a dead letter it is rejected without
//!    requeue (AMQP) or terminated (JetStream), and the reason logged. It
//!    never blocks the messages behind it.
//! 4. When the store fails, the message is released (it comes back) and
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
    /// message in hand is acknowledged or released.
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
            let step = match self.source.next(self.options.poll) {
                Ok(Some(message)) => {
                    idle_since = Instant::now();
                    self.handle(message)
                }
                Ok(None) => {
                    if self.options.until_idle && idle_since.elapsed() >= self.options.idle_for {
                        return Ok(());
                    }
                    Ok(())
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

    /// Takes one message from its receipt to its settlement.
    ///
    /// # Errors
    /// As [`run`](Self::run); the message is then released (or, the
    /// connection lost, left for the broker to deliver again).
    pub fn handle(&mut self, message: Inbound) -> Result<(), BusError> {
        let read = read_message(
            message.message_id.as_deref(),
            &message.body,
            &self.options,
            self.verifier.as_deref(),
        );
        let refused = match read {
            Err(refusal) => refusal.to_string(),
            Ok(accepted) => match self.sink.submit(&accepted.job) {
                Ok(Submission::New) => {
                    self.report.submitted += 1;
                    return self.source.ack(&message);
                }
                Ok(Submission::Existing) => {
                    self.report.duplicates += 1;
                    return self.source.ack(&message);
                }
                Ok(Submission::Taken { reason }) => reason,
                Err(e) => {
                    self.give_back(&message);
                    return Err(e.into());
                }
            },
        };
        self.refuse(&message, refused)
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
        if let Err(e) = self.source.release(message) {
            eprintln!(
                "job-executor intake: cannot give a message back ({e}); it comes back anyway"
            );
        }
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
