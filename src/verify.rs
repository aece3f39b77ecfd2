//! The invariant checker for stored logs.
//!
//! It reads a job's stored events as they are, decodes each one, checks the
//! seq numbers, and folds them through the same state machine the executor
//! uses. Unlike replay it does not stop at the first problem: it reports every
//! violation with the job id and seq number, skipping each refused event so
//! the rest of the log is still judged.

use uuid::Uuid;

use crate::events::EventRecord;
use crate::machine::{self, JobState};
use crate::model::JobStatus;
use crate::store::{EventStore, StoreError};

/// One broken rule in a stored log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The job.
    pub job_id: Uuid,
    /// The seq of the offending event.
    pub seq: u64,
    /// `"EXEC-001"` … `"EXEC-006"`, or `"LOG"` for the log's own structure
    /// (seq numbers, decodable events, a log that begins with `JobStarted`).
    pub invariant: &'static str,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "job {} seq {}: {}: {}",
            self.job_id, self.seq, self.invariant, self.message
        )
    }
}

/// The verdict on one job's log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobReport {
    /// The job.
    pub job_id: Uuid,
    /// Events stored for it.
    pub events: u64,
    /// Its status as the accepted events describe it.
    pub status: JobStatus,
    /// Every violation found, in seq order; empty for a sound log.
    pub violations: Vec<Violation>,
}

impl JobReport {
    /// Whether the log satisfies every invariant.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Checks one job's stored events (as `load_job` returns them).
pub fn verify_job(job_id: Uuid, records: &[EventRecord]) -> JobReport {
    let mut violations = Vec::new();
    let mut state = JobState::new();
    let mut expected_seq = 1;
    for record in records {
        let mut flag = |invariant, message| {
            violations.push(Violation {
                job_id,
                seq: record.seq,
                invariant,
                message,
            });
        };
        if record.job_id != job_id {
            flag("LOG", format!("event belongs to job {}", record.job_id));
            continue;
        }
        if record.seq != expected_seq {
            flag(
                "LOG",
                format!("expected seq {expected_seq}, found seq {}", record.seq),
            );
        }
        expected_seq = record.seq + 1;
        let recorded = match record.decode() {
            Ok(recorded) => recorded,
            Err(e) => {
                flag("LOG", format!("malformed {} event: {e}", record.kind));
                continue;
            }
        };
        match machine::apply(state, &recorded.event) {
            Ok(next) => state = next,
            Err(refusal) => flag(refusal.invariant(), refusal.to_string()),
        }
    }
    JobReport {
        job_id,
        events: records.len() as u64,
        status: state.status(),
        violations,
    }
}

/// Checks every job in `store`, one job in memory at a time, handing each
/// report to `on_report` in the order the jobs started.
///
/// # Errors
/// [`StoreError`] when the log cannot be read.
pub fn verify_store(
    store: &dyn EventStore,
    mut on_report: impl FnMut(JobReport),
) -> Result<(), StoreError> {
    for job_id in store.job_ids()? {
        let records = store.load_job(job_id)?;
        on_report(verify_job(job_id, &records));
    }
    Ok(())
}
