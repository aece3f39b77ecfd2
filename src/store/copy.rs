//! Moving a whole log from one store to another, digests kept.

use uuid::Uuid;

use super::{EventStore, StoreError};
use crate::chain::{self, Digest};
use crate::events::EventRecord;

/// Events appended per transaction of the destination: a long job is copied
/// in parts, never as one huge transaction.
const COPY_BATCH_EVENTS_MAX: usize = 1_000;

/// What a copy moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Copied {
    /// Jobs copied.
    pub jobs: u64,
    /// Events copied.
    pub events: u64,
}

/// Why a copy stopped. What was copied before stays (the destination is
/// append-only); the job named was not copied past the event named.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CopyError {
    /// A store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A job of the source does not verify as it is read.
    #[error("job {job_id} seq {seq}: {detail}; the job was not copied from there on")]
    Broken {
        /// The job.
        job_id: Uuid,
        /// The first event that does not hold.
        seq: u64,
        /// What is wrong.
        detail: String,
    },
    /// The destination already holds the job.
    #[error("job {job_id} is already in the destination; a job is copied at most once")]
    AlreadyThere {
        /// The job.
        job_id: Uuid,
    },
}

/// Copies every job of `source` to `destination`, in the order the jobs
/// started, each job's events in order. Each event keeps its bytes and its
/// digest (an event written before digests existed gets the one computed
/// for it, as `export` does), so every job's head stays the same; each
/// job's chain is checked as it is read, and its head once written.
///
/// # Errors
/// [`CopyError`]; the jobs copied before it stay copied.
pub fn copy_log(
    source: &dyn EventStore,
    destination: &dyn EventStore,
) -> Result<Copied, CopyError> {
    let mut copied = Copied::default();
    for job_id in source.job_ids()? {
        let mut records = source.load_job(job_id)?;
        let head = seal_checked(job_id, &mut records)?;
        for part in records.chunks(COPY_BATCH_EVENTS_MAX) {
            destination.append(part).map_err(|e| match e {
                StoreError::Conflict { .. } => CopyError::AlreadyThere { job_id },
                other => CopyError::Store(other),
            })?;
        }
        let mut written = Digest::GENESIS;
        let mut count = 0u64;
        destination.visit_job(job_id, &mut |record| {
            written = record
                .digest
                .as_deref()
                .and_then(Digest::from_hex)
                .unwrap_or(Digest::GENESIS);
            count += 1;
            true
        })?;
        if written != head || count != records.len() as u64 {
            return Err(CopyError::Broken {
                job_id,
                seq: count,
                detail: format!("the copy's head {written} is not the source's {head}"),
            });
        }
        copied.jobs += 1;
        copied.events += count;
    }
    Ok(copied)
}

/// Checks a job's chain and fills in the digests of events written before
/// digests existed; returns the job's head.
fn seal_checked(job_id: Uuid, records: &mut [EventRecord]) -> Result<Digest, CopyError> {
    let mut head = Digest::GENESIS;
    for (index, record) in records.iter_mut().enumerate() {
        let expected = index as u64 + 1;
        if record.seq != expected || record.job_id != job_id {
            return Err(CopyError::Broken {
                job_id,
                seq: expected,
                detail: format!("seq {} where seq {expected} belongs", record.seq),
            });
        }
        head = chain::chain(&head, record);
        match &record.digest {
            Some(stored) if !head.matches_hex(stored) => {
                return Err(CopyError::Broken {
                    job_id,
                    seq: record.seq,
                    detail: "the stored digest does not match the event".into(),
                });
            }
            Some(_) => {}
            None => record.digest = Some(head.to_hex()),
        }
    }
    Ok(head)
}
