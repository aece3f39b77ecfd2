//! The event log: where events are appended and read back.
//!
//! Only this module touches storage. Stores hold events in their encoded form
//! ([`EventRecord`]) and know nothing of what the events mean; the executor
//! decides what may be appended (through the state machine), and the store
//! guarantees that an append is atomic, never overwrites, and never leaves a
//! gap in a job's sequence numbers.

mod group;
mod memory;
mod sqlite;

use std::path::PathBuf;

use uuid::Uuid;

pub use memory::MemoryStore;
pub use sqlite::{APPLICATION_ID, DB_SCHEMA_VERSION, SqliteOptions, SqliteStore, Synchronous};

use crate::events::EventRecord;

/// An append-only log of events, shared by every thread of an executor.
pub trait EventStore: Send + Sync {
    /// Appends events of one job atomically: all of them or none.
    ///
    /// `records` must all belong to one job and carry consecutive `seq`
    /// numbers, the first one past the job's last stored event. Their
    /// `position` is ignored; the positions assigned are returned in order.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the job's last stored seq is not the one
    /// `records` follow (another writer got there first); any other
    /// [`StoreError`] when the log cannot be written. Nothing is appended then.
    fn append(&self, records: &[EventRecord]) -> Result<Vec<u64>, StoreError>;

    /// Appends like [`append`](Self::append) and, once the events are
    /// committed, calls `committed` before returning — on whichever thread
    /// committed them. The executor starts a step's handler this way: a
    /// store that commits many threads' appends together starts each
    /// handler the moment its `StepStarted` is durable, instead of after the
    /// appending thread has woken up. `committed` is dropped uncalled when
    /// the append fails.
    ///
    /// # Errors
    /// As [`append`](Self::append).
    fn append_then(
        &self,
        records: &[EventRecord],
        committed: Box<dyn FnOnce() + Send>,
    ) -> Result<Vec<u64>, StoreError> {
        let positions = self.append(records)?;
        committed();
        Ok(positions)
    }

    /// Hands the job's events to `visit` one at a time, in seq order,
    /// without collecting them; `visit` returns `false` to stop early.
    ///
    /// # Errors
    /// [`StoreError`] when the log cannot be read.
    fn visit_job(
        &self,
        job_id: Uuid,
        visit: &mut dyn FnMut(&EventRecord) -> bool,
    ) -> Result<(), StoreError> {
        for record in self.load_job(job_id)? {
            if !visit(&record) {
                break;
            }
        }
        Ok(())
    }

    /// The job's last stored seq, 0 when it has no events.
    ///
    /// # Errors
    /// [`StoreError`] when the log cannot be read.
    fn last_seq(&self, job_id: Uuid) -> Result<u64, StoreError>;

    /// Every event of one job, in seq order. Costs O(the job's events).
    ///
    /// # Errors
    /// [`StoreError`] when the log cannot be read.
    fn load_job(&self, job_id: Uuid) -> Result<Vec<EventRecord>, StoreError>;

    /// Every event of the log, each job's events together in seq order,
    /// handed to `visit` one at a time so that memory does not grow with the
    /// log. With each comes the number of its job's group: the same for all
    /// of a job's rows, even a row whose job id was changed behind the
    /// store's back. A row that cannot be read is handed over as its error.
    ///
    /// # Errors
    /// [`StoreError`] when the log cannot be read at all.
    fn scan(
        &self,
        visit: &mut dyn FnMut(u64, Result<&EventRecord, StoreError>),
    ) -> Result<(), StoreError>;

    /// The position of the last event in the whole log (0 when empty): the
    /// log's length, give or take rows removed behind the store's back.
    ///
    /// # Errors
    /// [`StoreError`] when the log cannot be read.
    fn last_position(&self) -> Result<u64, StoreError>;

    /// The ids of jobs whose last event is not terminal (`JobCompleted`,
    /// `JobHalted`, `JobCancelled`), in the order they started.
    ///
    /// # Errors
    /// [`StoreError`] when the log cannot be read.
    fn unfinished_jobs(&self) -> Result<Vec<Uuid>, StoreError> {
        let mut unfinished = Vec::new();
        for job_id in self.job_ids()? {
            let records = self.load_job(job_id)?;
            if records
                .last()
                .is_some_and(|r| !TERMINAL_KINDS.contains(&r.kind.as_str()))
            {
                unfinished.push(job_id);
            }
        }
        Ok(unfinished)
    }

    /// The ids of every job in the log, in the order the jobs started.
    ///
    /// # Errors
    /// [`StoreError`] when the log cannot be read.
    fn job_ids(&self) -> Result<Vec<Uuid>, StoreError>;
}

/// The kinds that end a job.
pub const TERMINAL_KINDS: [&str; 3] = ["JobCompleted", "JobHalted", "JobCancelled"];

/// A failure of the event log itself.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer appended to the job first (optimistic concurrency).
    #[error(
        "conflict on job {job_id}: expected to append seq {expected}, but the job's last stored seq is {found}"
    )]
    Conflict {
        /// The job.
        job_id: Uuid,
        /// The seq the append carried.
        expected: u64,
        /// The job's last stored seq.
        found: u64,
    },
    /// The records passed to `append` are not one job's consecutive events.
    #[error("invalid append: {0}")]
    InvalidAppend(String),
    /// The database file does not exist and the store was asked not to create it.
    #[error("{}: no such database", path.display())]
    NotFound {
        /// The path given.
        path: PathBuf,
    },
    /// The file exists but is not a job-executor database; it was not modified.
    #[error("{}: not a job-executor database ({reason}); the file was left untouched", path.display())]
    NotOurs {
        /// The path given.
        path: PathBuf,
        /// What gave it away.
        reason: String,
    },
    /// The database was written by a newer build.
    #[error("{}: schema version {found} is newer than this build supports ({supported}); upgrade job-executor", path.display())]
    SchemaTooNew {
        /// The path given.
        path: PathBuf,
        /// The version stored.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
    /// The database (or its directory) cannot be written.
    #[error("{}: the database is read-only (check the permissions of the file and its directory): {detail}", path.display())]
    ReadOnly {
        /// The path given.
        path: PathBuf,
        /// What SQLite reported.
        detail: String,
    },
    /// The disk (or the database's page limit) is full.
    #[error("{}: no space left for the database (disk full or page limit reached): {detail}", path.display())]
    Full {
        /// The path given.
        path: PathBuf,
        /// What SQLite reported.
        detail: String,
    },
    /// Another connection held the database lock past the busy timeout.
    #[error("{}: the database stayed locked by another process past the busy timeout: {detail}", path.display())]
    Busy {
        /// The path given.
        path: PathBuf,
        /// What SQLite reported.
        detail: String,
    },
    /// The database is damaged.
    #[error("{}: database is corrupt: {detail}", path.display())]
    Corrupt {
        /// The path given.
        path: PathBuf,
        /// What SQLite reported.
        detail: String,
    },
    /// A stored row cannot be read as an event record.
    #[error("job {job_id} seq {seq}: unreadable row: {detail}")]
    BadRow {
        /// The job.
        job_id: String,
        /// The seq.
        seq: i64,
        /// What is wrong.
        detail: String,
    },
    /// Reading the file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused or failed an operation.
    #[error("{context}: {source}")]
    Sqlite {
        /// What the store was doing.
        context: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
}

impl StoreError {
    /// An equal error, for each append of a group commit that failed as one.
    pub(crate) fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Sqlite { context, source } => StoreError::Sqlite {
                context,
                source: match source {
                    rusqlite::Error::SqliteFailure(code, message) => {
                        rusqlite::Error::SqliteFailure(*code, message.clone())
                    }
                    other => rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
                        Some(other.to_string()),
                    ),
                },
            },
            StoreError::Io { path, source } => StoreError::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            StoreError::Conflict {
                job_id,
                expected,
                found,
            } => StoreError::Conflict {
                job_id: *job_id,
                expected: *expected,
                found: *found,
            },
            StoreError::InvalidAppend(m) => StoreError::InvalidAppend(m.clone()),
            StoreError::NotFound { path } => StoreError::NotFound { path: path.clone() },
            StoreError::NotOurs { path, reason } => StoreError::NotOurs {
                path: path.clone(),
                reason: reason.clone(),
            },
            StoreError::SchemaTooNew {
                path,
                found,
                supported,
            } => StoreError::SchemaTooNew {
                path: path.clone(),
                found: *found,
                supported: *supported,
            },
            StoreError::ReadOnly { path, detail } => StoreError::ReadOnly {
                path: path.clone(),
                detail: detail.clone(),
            },
            StoreError::Full { path, detail } => StoreError::Full {
                path: path.clone(),
                detail: detail.clone(),
            },
            StoreError::Busy { path, detail } => StoreError::Busy {
                path: path.clone(),
                detail: detail.clone(),
            },
            StoreError::Corrupt { path, detail } => StoreError::Corrupt {
                path: path.clone(),
                detail: detail.clone(),
            },
            StoreError::BadRow {
                job_id,
                seq,
                detail,
            } => StoreError::BadRow {
                job_id: job_id.clone(),
                seq: *seq,
                detail: detail.clone(),
            },
        }
    }

    /// Whether this is an optimistic-concurrency conflict.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }
}

/// Checks the shape `append` requires: one job, consecutive seqs.
fn check_batch(records: &[EventRecord]) -> Result<(Uuid, u64), StoreError> {
    let first = records
        .first()
        .ok_or_else(|| StoreError::InvalidAppend("no events to append".into()))?;
    if first.seq == 0 {
        return Err(StoreError::InvalidAppend(format!(
            "job {}: seq starts at 1",
            first.job_id
        )));
    }
    for (offset, record) in records.iter().enumerate() {
        if record.job_id != first.job_id {
            return Err(StoreError::InvalidAppend(format!(
                "events of jobs {} and {} in one append",
                first.job_id, record.job_id
            )));
        }
        if record.seq != first.seq + offset as u64 {
            return Err(StoreError::InvalidAppend(format!(
                "job {}: seq {} does not follow seq {}",
                first.job_id,
                record.seq,
                first.seq + offset as u64 - 1
            )));
        }
    }
    Ok((first.job_id, first.seq))
}
