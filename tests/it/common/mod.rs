//! Builders shared by the integration tests.

pub mod backend;
pub mod pg;

use chrono::{DateTime, TimeDelta, Utc};
use job_executor::JobStep;
use job_executor::chain::{Digest, chain};
use job_executor::events::{
    Event, EventRecord, Failure, FailureKind, JobClaimed, JobCompleted, JobHalted, JobStarted,
    StepFailed, StepStarted, StepSucceeded,
};
use serde_json::json;
use uuid::Uuid;

pub fn started(steps: u32) -> Event {
    started_of(steps, "noop")
}

/// `JobStarted` of a plan of `steps` steps of type `step_type`.
pub fn started_of(steps: u32, step_type: &str) -> Event {
    Event::JobStarted(JobStarted {
        contract_id: Uuid::nil(),
        plan: (0..steps)
            .map(|i| JobStep::new(i, step_type, "t"))
            .collect(),
        executed_by: "tester".into(),
        executor_version: "0.0.0".into(),
        health_before: None,
    })
}

/// A job of `steps` steps of `step_type` whose first step succeeded and
/// whose executor then stopped, between steps (as a log written by an
/// executor that committed each event on its own can end).
pub fn stopped_between_steps(steps: u32, step_type: &str) -> Vec<Event> {
    vec![started_of(steps, step_type), step_started(0), succeeded(0)]
}

pub fn step_started(step_index: u32) -> Event {
    Event::StepStarted(StepStarted { step_index })
}

pub fn succeeded(step_index: u32) -> Event {
    Event::StepSucceeded(StepSucceeded {
        step_index,
        output: json!({}),
        health_after: None,
    })
}

pub fn failed(step_index: u32) -> Event {
    Event::StepFailed(StepFailed {
        step_index,
        failure: Failure {
            kind: FailureKind::HandlerFailed,
            message: "boom".into(),
        },
        output: None,
        health_after: None,
    })
}

/// The events of a job taken over with its first step in doubt, as the
/// new owner leaves them: the first claim's start, then the step recorded
/// interrupted, the new claim naming it, and the halt (one commit).
pub const TAKEN_OVER_KINDS: [&str; 6] = [
    "JobStarted",
    "JobClaimed",
    "StepStarted",
    "StepFailed",
    "JobClaimed",
    "JobHalted",
];

/// A worker's claim at `epoch`, saying it recorded the outcome of step
/// `recorded_outcome` on taking the job up, if given.
pub fn claimed(worker: &str, epoch: u64, recorded_outcome: Option<u32>) -> Event {
    Event::JobClaimed(JobClaimed {
        worker_id: worker.into(),
        host: "h".into(),
        epoch,
        taken_over_from: None,
        recorded_outcome,
    })
}

pub fn completed() -> Event {
    Event::JobCompleted(JobCompleted {})
}

pub fn halted(step_index: u32) -> Event {
    Event::JobHalted(JobHalted { step_index })
}

/// A fixed instant plus `n` milliseconds.
pub fn at(n: u64) -> DateTime<Utc> {
    DateTime::from_timestamp(946_684_800, 0).unwrap() + TimeDelta::milliseconds(n as i64)
}

/// `events` encoded and chained as job `job_id`'s records, seq 1, 2, ….
pub fn records(job_id: Uuid, events: &[Event]) -> Vec<EventRecord> {
    records_from(job_id, events, at(0))
}

/// [`records`], recorded one millisecond apart from `start`.
pub fn records_from(job_id: Uuid, events: &[Event], start: DateTime<Utc>) -> Vec<EventRecord> {
    let mut head = Digest::GENESIS;
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let recorded_at = start + TimeDelta::milliseconds(i as i64);
            let mut record = EventRecord::encode(job_id, i as u64 + 1, recorded_at, e);
            head = chain(&head, &record);
            record.digest = Some(head.to_hex());
            record
        })
        .collect()
}

/// The log of a job of `steps` steps that all succeed.
pub fn completed_log(steps: u32) -> Vec<Event> {
    let mut events = vec![started(steps)];
    for i in 0..steps {
        events.push(step_started(i));
        events.push(succeeded(i));
    }
    events.push(completed());
    events
}

/// How a [`FaultyStore`] fails at its chosen append.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// The process dies (or the disk goes away) before the commit: the
    /// append is not in the log.
    BeforeCommit,
    /// The process dies right after the commit, before it can act on it.
    AfterCommit,
}

/// Wraps a store; from the `fail_at`-th append on (counting from 1), every
/// append fails, as if the process or its disk were gone.
pub struct FaultyStore {
    pub inner: std::sync::Arc<dyn job_executor::store::EventStore>,
    fail_at: usize,
    fault: Fault,
    appends: std::sync::atomic::AtomicUsize,
}

impl FaultyStore {
    pub fn new(
        inner: std::sync::Arc<dyn job_executor::store::EventStore>,
        fail_at: usize,
        fault: Fault,
    ) -> Self {
        FaultyStore {
            inner,
            fail_at,
            fault,
            appends: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

/// The message of every append a [`FaultyStore`] fails.
pub const SIMULATED_FAULT: &str = "simulated fault";

impl job_executor::store::EventStore for FaultyStore {
    fn append_with(
        &self,
        records: &[EventRecord],
        options: job_executor::store::AppendOptions,
    ) -> Result<Vec<u64>, job_executor::store::StoreError> {
        let n = self
            .appends
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        if n < self.fail_at {
            return self.inner.append_with(records, options);
        }
        if n == self.fail_at && matches!(self.fault, Fault::AfterCommit) {
            // Committed, but the process is gone before it can act on it:
            // its commit hook never runs.
            let options = job_executor::store::AppendOptions {
                committed: None,
                ..options
            };
            self.inner.append_with(records, options)?;
        }
        Err(job_executor::store::StoreError::InvalidAppend(
            SIMULATED_FAULT.into(),
        ))
    }
    fn last_seq(&self, job_id: Uuid) -> Result<u64, job_executor::store::StoreError> {
        self.inner.last_seq(job_id)
    }
    fn visit_job(
        &self,
        job_id: Uuid,
        visit: &mut dyn FnMut(&EventRecord) -> bool,
    ) -> Result<(), job_executor::store::StoreError> {
        self.inner.visit_job(job_id, visit)
    }
    fn scan(
        &self,
        visit: &mut dyn FnMut(u64, Result<&EventRecord, job_executor::store::StoreError>),
    ) -> Result<(), job_executor::store::StoreError> {
        self.inner.scan(visit)
    }
    fn last_position(&self) -> Result<u64, job_executor::store::StoreError> {
        self.inner.last_position()
    }
    fn job_ids(&self) -> Result<Vec<Uuid>, job_executor::store::StoreError> {
        self.inner.job_ids()
    }
}

/// The copy of the job's event at `seq` an attacker inserts before it
/// (recorded at another time), and the digest it carries: with
/// `forge_digest` the one a forger would compute, without, a wrong one.
fn forged_copy(records: &[EventRecord], seq: u64, forge_digest: bool) -> (EventRecord, String) {
    let mut forged = records[seq as usize - 1].clone();
    forged.recorded_at = "2000-01-01T00:00:09.999999Z".into();
    forged.seq = seq;
    let previous = match seq {
        1 => Digest::GENESIS,
        _ => Digest::from_hex(records[seq as usize - 2].digest.as_deref().unwrap()).unwrap(),
    };
    let digest = if forge_digest {
        chain(&previous, &forged).to_hex()
    } else {
        format!("{:064}", 5)
    };
    (forged, digest)
}

/// An attacker's edit: a copy of the job's event at `seq` (recorded at
/// another time) is inserted before it and the later events renumbered. With
/// `forge_digest` the copy carries the digest a forger would compute; without,
/// a wrong one.
pub fn insert_renumbered(
    raw: &rusqlite::Connection,
    records: &[EventRecord],
    seq: u64,
    forge_digest: bool,
) {
    let (forged, digest) = forged_copy(records, seq, forge_digest);
    let job = forged.job_id.to_string();
    raw.execute(
        "UPDATE events SET seq = -seq - 1 WHERE job_id = ?1 AND seq >= ?2",
        rusqlite::params![job, seq as i64],
    )
    .unwrap();
    raw.execute(
        "UPDATE events SET seq = -seq WHERE job_id = ?1 AND seq < 0",
        [&job],
    )
    .unwrap();
    raw.execute(
        "INSERT INTO events (job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest)
         VALUES (?1, (SELECT job_no FROM events WHERE job_id = ?1 LIMIT 1), ?2, ?3, ?4, ?5, ?6, ?7)",
        rusqlite::params![
            job,
            seq as i64,
            forged.kind,
            forged.schema_version,
            forged.recorded_at,
            forged.payload,
            digest
        ],
    )
    .unwrap();
}

/// [`insert_renumbered`] in a PostgreSQL log whose guards (triggers, CHECK
/// constraints) the attacker has dropped. The copy takes the next free
/// position, as a SQLite row id would.
pub fn insert_renumbered_pg(
    raw: &mut postgres::Client,
    records: &[EventRecord],
    seq: u64,
    forge_digest: bool,
) {
    let (forged, digest) = forged_copy(records, seq, forge_digest);
    let (job, seq) = (forged.job_id, seq as i64);
    // Through negative numbers: UNIQUE (job_no, seq) is checked row by row.
    raw.execute(
        "UPDATE events SET seq = -seq - 1 WHERE job_id = $1 AND seq >= $2",
        &[&job, &seq],
    )
    .unwrap();
    raw.execute(
        "UPDATE events SET seq = -seq WHERE job_id = $1 AND seq < 0",
        &[&job],
    )
    .unwrap();
    let schema_version = forged.schema_version as i32;
    raw.execute(
        "INSERT INTO events
             (position, job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest)
         VALUES ((SELECT max(position) + 1 FROM events), $1,
                 (SELECT job_no FROM events WHERE job_id = $1 LIMIT 1), $2, $3, $4, $5, $6, $7)",
        &[
            &job,
            &seq,
            &forged.kind,
            &schema_version,
            &forged.recorded_at,
            &forged.payload,
            &digest,
        ],
    )
    .unwrap();
}

/// Runs the `job-executor` binary in `dir`.
pub fn cli(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_job-executor"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the binary runs")
}

/// The log at `path`, opened for reading only, as the read commands open it.
pub fn reader(path: &std::path::Path) -> job_executor::store::SqliteStore {
    job_executor::store::SqliteStore::open_with(path, &job_executor::store::SqliteOptions::reader())
        .unwrap()
}

/// The seed of a randomised kill test: `KILL_SEED` when set, else the
/// clock's; printed (under `what`) so that a failing run can be replayed.
pub fn kill_seed(what: &str) -> u64 {
    let seed = std::env::var("KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_nanos() as u64)
        });
    eprintln!("{what} seed: {seed} (rerun with KILL_SEED={seed})");
    seed
}
