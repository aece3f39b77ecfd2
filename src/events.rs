//! The immutable facts of the log: event kinds, their payloads and the
//! envelope every stored event carries.
//!
//! Payload shapes are part of the stored format. Changing one means a new
//! schema version (see [`SCHEMA_VERSION`]), never an edit in place.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

pub use crate::model::FailureKind;
use crate::model::JobStep;

/// Version of the payload shapes this build writes. Older versions are read
/// through [`crate::upcast`].
pub const SCHEMA_VERSION: u32 = crate::upcast::LATEST_VERSION;

/// What went wrong with a step: the kind of failure and its message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    /// The kind of failure.
    pub kind: FailureKind,
    /// The message, as `StepResult::error` and evidence show it.
    pub message: String,
}

/// Payload of `JobStarted`: everything the job is bound to, frozen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobStarted {
    /// The contract the plan was made under (EXEC-005: never changes).
    pub contract_id: Uuid,
    /// The plan as executed (EXEC-005: never changes).
    pub plan: Vec<JobStep>,
    /// Who started the job.
    pub executed_by: String,
    /// Version of the executor that started the job.
    pub executor_version: String,
    /// Health observed before the first step, when an observer was given.
    pub health_before: Option<Value>,
}

/// Payload of `StepStarted`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepStarted {
    /// The step about to run.
    pub step_index: u32,
}

/// Payload of `StepSucceeded`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSucceeded {
    /// The step that ran.
    pub step_index: u32,
    /// The handler's output.
    pub output: Value,
    /// Health observed right after the step.
    pub health_after: Option<Value>,
}

/// Payload of `StepFailed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepFailed {
    /// The step that failed.
    pub step_index: u32,
    /// Why it failed.
    pub failure: Failure,
    /// The handler's output, when the handler returned one.
    pub output: Option<Value>,
    /// Health observed right after the step.
    pub health_after: Option<Value>,
}

/// Payload of `JobCompleted`: every planned step succeeded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobCompleted {}

/// Payload of `JobHalted`: the job stopped at its first failed step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobHalted {
    /// The step whose failure halted the job.
    pub step_index: u32,
}

/// Payload of `JobCancelRequested`: someone asked for the job to stop. It
/// changes nothing until the executor honours it before the next step.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobCancelRequested {
    /// Why, as given by whoever asked.
    pub reason: String,
}

/// Payload of `JobCancelled`: the executor honoured a cancel request between
/// steps; no step starts after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobCancelled {
    /// The reason of the request that was honoured.
    pub reason: String,
}

/// Payload of `JobResumed`: an executor took up a job that had stopped
/// between steps, to continue it at its next step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobResumed {
    /// Who resumed it.
    pub executed_by: String,
    /// Version of the executor that resumed it.
    pub executor_version: String,
    /// Health observed before the next step, when an observer was given.
    pub health_before: Option<Value>,
}

/// Payload of `JobClaimed`: a worker claimed the job from the queue — or
/// took it over once its last owner's lease ran out — and appends what
/// follows, up to the next claim. A job run without a worker has none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobClaimed {
    /// The worker that claimed it.
    pub worker_id: String,
    /// The host the worker runs on.
    pub host: String,
    /// The claim's epoch (its fence): larger than every earlier claim's.
    pub epoch: u64,
    /// The worker whose lease ran out, when this claim took the job over.
    pub taken_over_from: Option<String>,
    /// The step whose outcome this claim's owner recorded on taking the
    /// job up, in the same commit and just before this claim: a step left
    /// in doubt (recorded `interrupted`, or with the outcome the executor
    /// knew but could not record). Absent otherwise. A claim never comes
    /// between a `StepStarted` and its outcome (EXEC-002), so it is this
    /// field, not the claim's place in the log, that says who recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_outcome: Option<u32>,
}

/// One fact about a job.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The job began, with its frozen plan.
    JobStarted(JobStarted),
    /// A step is about to run; committed before its handler is called.
    StepStarted(StepStarted),
    /// A step succeeded.
    StepSucceeded(StepSucceeded),
    /// A step failed.
    StepFailed(StepFailed),
    /// Every planned step succeeded.
    JobCompleted(JobCompleted),
    /// The job stopped after a failed step.
    JobHalted(JobHalted),
    /// Someone asked for the job to stop.
    JobCancelRequested(JobCancelRequested),
    /// The job stopped between steps, as requested.
    JobCancelled(JobCancelled),
    /// An executor took up a job that had stopped between steps.
    JobResumed(JobResumed),
    /// A worker claimed the job (or took it over).
    JobClaimed(JobClaimed),
}

/// The event kinds this build reads and writes, in their stored spelling.
pub const EVENT_KINDS: [&str; 10] = [
    "JobStarted",
    "StepStarted",
    "StepSucceeded",
    "StepFailed",
    "JobCompleted",
    "JobHalted",
    "JobCancelRequested",
    "JobCancelled",
    "JobResumed",
    "JobClaimed",
];

/// The kinds that end a job, in their stored spelling: nothing may follow
/// one of them in its job's log. The store knows these names (its schema
/// closes a finished job's log, and it lists unfinished jobs) and nothing
/// else of what events mean.
pub const TERMINAL_KINDS: [&str; 3] = ["JobCompleted", "JobHalted", "JobCancelled"];

/// An event that cannot be decoded from its stored parts.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// An upcaster could not bring an old payload to the current shape.
    #[error("{kind}: {source}")]
    Upcast {
        /// The stored kind.
        kind: String,
        /// What the upcaster found.
        #[source]
        source: crate::upcast::UpcastError,
    },
    /// The stored kind is not one this build knows.
    #[error("unknown event kind {0:?}")]
    UnknownKind(String),
    /// The stored schema version is newer than this build.
    #[error(
        "event schema version {found} is not supported (this build reads up to {SCHEMA_VERSION})"
    )]
    UnsupportedSchemaVersion {
        /// The stored version.
        found: u32,
    },
    /// The recorded time is not an RFC 3339 timestamp.
    #[error("recorded_at {0:?} is not an RFC 3339 timestamp")]
    Timestamp(String),
    /// The payload does not have the kind's shape.
    #[error("malformed {kind} payload: {source}")]
    Payload {
        /// The stored kind.
        kind: &'static str,
        /// What serde found wrong.
        #[source]
        source: serde_json::Error,
    },
}

impl Event {
    /// The stored kind name, e.g. `"StepStarted"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::JobStarted(_) => "JobStarted",
            Event::StepStarted(_) => "StepStarted",
            Event::StepSucceeded(_) => "StepSucceeded",
            Event::StepFailed(_) => "StepFailed",
            Event::JobCompleted(_) => "JobCompleted",
            Event::JobHalted(_) => "JobHalted",
            Event::JobCancelRequested(_) => "JobCancelRequested",
            Event::JobCancelled(_) => "JobCancelled",
            Event::JobResumed(_) => "JobResumed",
            Event::JobClaimed(_) => "JobClaimed",
        }
    }

    /// Whether this event ends its job.
    pub fn is_terminal(&self) -> bool {
        TERMINAL_KINDS.contains(&self.kind())
    }

    /// The payload as compact JSON, the stored form.
    pub fn payload_json(&self) -> String {
        let encoded = match self {
            Event::JobStarted(p) => serde_json::to_string(p),
            Event::StepStarted(p) => serde_json::to_string(p),
            Event::StepSucceeded(p) => serde_json::to_string(p),
            Event::StepFailed(p) => serde_json::to_string(p),
            Event::JobCompleted(p) => serde_json::to_string(p),
            Event::JobHalted(p) => serde_json::to_string(p),
            Event::JobCancelRequested(p) => serde_json::to_string(p),
            Event::JobCancelled(p) => serde_json::to_string(p),
            Event::JobResumed(p) => serde_json::to_string(p),
            Event::JobClaimed(p) => serde_json::to_string(p),
        };
        // Payloads are plain structs of strings, numbers and JSON values:
        // serialising them to a String cannot fail.
        encoded.expect("event payloads always serialise")
    }

    /// Decodes an event from its stored kind, schema version and payload.
    ///
    /// # Errors
    /// [`DecodeError`] for an unknown kind, a newer schema version, or a
    /// payload that does not have the kind's shape.
    pub fn decode(kind: &str, schema_version: u32, payload: &str) -> Result<Event, DecodeError> {
        if schema_version == 0 || schema_version > SCHEMA_VERSION {
            return Err(DecodeError::UnsupportedSchemaVersion {
                found: schema_version,
            });
        }
        // The current version decodes straight from the stored text; older
        // ones go through the upcasters first.
        let source = if schema_version == SCHEMA_VERSION {
            Payload::Text(payload)
        } else {
            let value = serde_json::from_str(payload).map_err(|source| DecodeError::Payload {
                kind: "stored",
                source,
            })?;
            let current =
                crate::upcast::to_current(kind, schema_version, value).map_err(|source| {
                    DecodeError::Upcast {
                        kind: kind.to_owned(),
                        source,
                    }
                })?;
            Payload::Value(current)
        };
        Ok(match kind {
            "JobStarted" => Event::JobStarted(source.parse("JobStarted")?),
            "StepStarted" => Event::StepStarted(source.parse("StepStarted")?),
            "StepSucceeded" => Event::StepSucceeded(source.parse("StepSucceeded")?),
            "StepFailed" => Event::StepFailed(source.parse("StepFailed")?),
            "JobCompleted" => Event::JobCompleted(source.parse("JobCompleted")?),
            "JobHalted" => Event::JobHalted(source.parse("JobHalted")?),
            "JobCancelRequested" => Event::JobCancelRequested(source.parse("JobCancelRequested")?),
            "JobCancelled" => Event::JobCancelled(source.parse("JobCancelled")?),
            "JobResumed" => Event::JobResumed(source.parse("JobResumed")?),
            "JobClaimed" => Event::JobClaimed(source.parse("JobClaimed")?),
            other => return Err(DecodeError::UnknownKind(other.to_owned())),
        })
    }
}

/// A payload to decode: the stored text, or a value an upcaster produced.
enum Payload<'a> {
    Text(&'a str),
    Value(Value),
}

impl Payload<'_> {
    fn parse<T: serde::de::DeserializeOwned>(self, kind: &'static str) -> Result<T, DecodeError> {
        match self {
            Payload::Text(text) => serde_json::from_str(text),
            Payload::Value(value) => serde_json::from_value(value),
        }
        .map_err(|source| DecodeError::Payload { kind, source })
    }
}

/// An event in its stored form: the envelope plus the payload as JSON text,
/// exactly as the log holds it. Both stores keep events in this form, so what
/// one store returns the other would too.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventRecord {
    /// Position in the whole log, starting at 1; 0 until the store assigns it.
    pub position: u64,
    /// The job the event belongs to.
    pub job_id: Uuid,
    /// Position in the job's log, starting at 1, without gaps.
    pub seq: u64,
    /// The event kind, e.g. `"StepStarted"`.
    pub kind: String,
    /// Payload schema version.
    pub schema_version: u32,
    /// When the event was recorded, as [`format_timestamp`] writes it.
    pub recorded_at: String,
    /// The payload as compact JSON.
    pub payload: String,
    /// The chain digest stored with the event (64 lowercase hex digits);
    /// `None` for an event written before digests existed, or not yet sealed.
    pub digest: Option<String>,
    /// The HMAC of `digest` (64 lowercase hex digits), when written with a key.
    pub mac: Option<String>,
}

/// A decoded event: the envelope plus the fact.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordedEvent {
    /// Position in the whole log, starting at 1.
    pub position: u64,
    /// The job the event belongs to.
    pub job_id: Uuid,
    /// Position in the job's log, starting at 1, without gaps.
    pub seq: u64,
    /// When the event was recorded, in whole microseconds.
    pub recorded_at: DateTime<Utc>,
    /// Payload schema version it was stored with.
    pub schema_version: u32,
    /// The fact.
    pub event: Event,
}

impl EventRecord {
    /// Encodes `event` as the `seq`-th event of `job_id`, recorded at `recorded_at`
    /// (truncated to the microseconds the log keeps). Position is left 0.
    pub fn encode(job_id: Uuid, seq: u64, recorded_at: DateTime<Utc>, event: &Event) -> Self {
        EventRecord {
            position: 0,
            job_id,
            seq,
            kind: event.kind().to_owned(),
            schema_version: SCHEMA_VERSION,
            recorded_at: format_timestamp(&truncate_to_micros(recorded_at)),
            payload: event.payload_json(),
            digest: None,
            mac: None,
        }
    }

    /// The recorded time, or the Unix epoch when the stored text is not a
    /// timestamp (which `decode` reports).
    pub fn recorded_at_time(&self) -> DateTime<Utc> {
        parse_timestamp(&self.recorded_at).unwrap_or_default()
    }

    /// Decodes the stored form.
    ///
    /// # Errors
    /// [`DecodeError`] when the kind, schema version, timestamp or payload is
    /// not one this build can read.
    pub fn decode(&self) -> Result<RecordedEvent, DecodeError> {
        let recorded_at = parse_timestamp(&self.recorded_at)
            .map_err(|_| DecodeError::Timestamp(self.recorded_at.clone()))?;
        Ok(RecordedEvent {
            position: self.position,
            job_id: self.job_id,
            seq: self.seq,
            recorded_at,
            schema_version: self.schema_version,
            event: Event::decode(&self.kind, self.schema_version, &self.payload)?,
        })
    }

    /// The event as one line of JSON: the envelope fields and the payload
    /// object, as `job-executor events` prints it.
    pub fn to_json_line(&self) -> String {
        // The payload is embedded verbatim: it is the stored JSON text.
        format!(
            "{{\"position\":{},\"job_id\":\"{}\",\"seq\":{},\"kind\":{},\"schema_version\":{},\"recorded_at\":{},\"digest\":{},\"mac\":{},\"payload\":{}}}",
            self.position,
            self.job_id,
            self.seq,
            json_string(&self.kind),
            self.schema_version,
            json_string(&self.recorded_at),
            prefixed(self.digest.as_deref(), "sha256:"),
            prefixed(self.mac.as_deref(), "hmac-sha256:"),
            self.payload,
        )
    }
}

fn prefixed(hex: Option<&str>, prefix: &str) -> String {
    hex.map_or_else(
        || "null".to_owned(),
        |hex| json_string(&format!("{prefix}{hex}")),
    )
}

fn json_string(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

/// Drops sub-microsecond precision, which the stored text cannot carry.
pub fn truncate_to_micros(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(at.timestamp_micros()).unwrap_or(at)
}

/// Formats a timestamp as stored and as shown in evidence: RFC 3339, UTC,
/// microseconds, `Z` suffix (fixed width, so the text sorts as time does).
pub fn format_timestamp(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses a timestamp written by [`format_timestamp`] (any RFC 3339 text is
/// accepted; the stored form takes a fast path).
///
/// # Errors
/// The parse error when `text` is not RFC 3339.
pub fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    if let Some(at) = parse_stored_timestamp(text) {
        return Ok(at);
    }
    DateTime::parse_from_rfc3339(text).map(|at| at.with_timezone(&Utc))
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`, the fixed form the log stores.
fn parse_stored_timestamp(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    if b.len() != 27
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'.'
        || b[26] != b'Z'
    {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<u32> {
        b[range].iter().try_fold(0u32, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
        })
    };
    let date =
        chrono::NaiveDate::from_ymd_opt(number(0..4)? as i32, number(5..7)?, number(8..10)?)?;
    let time = chrono::NaiveTime::from_hms_micro_opt(
        number(11..13)?,
        number(14..16)?,
        number(17..19)?,
        number(20..26)?,
    )?;
    Some(date.and_time(time).and_utc())
}
