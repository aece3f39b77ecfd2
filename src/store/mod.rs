//! The event log: where events are appended and read back.
//!
//! Only this module touches storage. Stores hold events in their encoded form
//! ([`EventRecord`]) and know nothing of what the events mean; the executor
//! decides what may be appended (through the state machine), and the store
//! guarantees that an append is atomic, never overwrites, and never leaves a
//! gap in a job's sequence numbers.

mod copy;
mod group;
mod memory;
mod open;
#[cfg(feature = "postgres")]
mod postgres;
mod queue;
mod sql;
mod sqlite;

use std::path::PathBuf;
use std::sync::Arc;

use uuid::Uuid;

pub use copy::{Copied, CopyError, copy_log};
pub use memory::MemoryStore;
pub use open::{Location, Log, OpenOptions, open};
#[cfg(feature = "postgres")]
pub use postgres::{PG_SCHEMA_VERSION, PgOptions, PgStore};
pub use queue::{Claim, Fence, JobQueue, QueueEntry, QueueState, QueueSummary, QueuedJob};
pub use sqlite::{APPLICATION_ID, DB_SCHEMA_VERSION, SqliteOptions, SqliteStore, Synchronous};

use crate::events::{EventRecord, TERMINAL_KINDS};

/// What comes with an append besides its records.
#[derive(Default)]
pub struct AppendOptions {
    /// The claim the append is made under: it is refused
    /// ([`StoreError::Fenced`]) unless the job's epoch is still the fence's.
    pub fence: Option<Fence>,
    /// Called once the events are committed, before the append returns, on
    /// whichever thread committed them; dropped uncalled when it fails.
    pub committed: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for AppendOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendOptions")
            .field("fence", &self.fence)
            .field("committed", &self.committed.is_some())
            .finish()
    }
}

/// An append-only log of events, shared by every thread of an executor.
pub trait EventStore: Send + Sync {
    /// Appends events of one job atomically: all of them or none; under a
    /// fence, only while the fence holds; then runs the commit hook.
    ///
    /// `records` must all belong to one job and carry consecutive `seq`
    /// numbers, the first one past the job's last stored event. Their
    /// `position` is ignored; the positions assigned are returned in order.
    ///
    /// The executor starts a step's handler with the commit hook: a store
    /// that commits many threads' appends together starts each handler the
    /// moment its `StepStarted` is durable, instead of after the appending
    /// thread has woken up.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] when the job's last stored seq is not the one
    /// `records` follow (another writer got there first);
    /// [`StoreError::Fenced`] when the fence no longer holds; any other
    /// [`StoreError`] when the log cannot be written. Nothing is appended then.
    fn append_with(
        &self,
        records: &[EventRecord],
        options: AppendOptions,
    ) -> Result<Vec<u64>, StoreError>;

    /// Appends events of one job atomically: all of them or none.
    ///
    /// # Errors
    /// As [`append_with`](Self::append_with).
    fn append(&self, records: &[EventRecord]) -> Result<Vec<u64>, StoreError> {
        self.append_with(records, AppendOptions::default())
    }

    /// Appends like [`append`](Self::append) and, once the events are
    /// committed, calls `committed` before returning.
    ///
    /// # Errors
    /// As [`append_with`](Self::append_with).
    fn append_then(
        &self,
        records: &[EventRecord],
        committed: Box<dyn FnOnce() + Send>,
    ) -> Result<Vec<u64>, StoreError> {
        self.append_with(
            records,
            AppendOptions {
                committed: Some(committed),
                ..AppendOptions::default()
            },
        )
    }

    /// Hands the job's events to `visit` one at a time, in seq order,
    /// without collecting them; `visit` returns `false` to stop early.
    /// Costs O(the job's events). `visit` runs under no lock of the
    /// store's: it may call the store.
    ///
    /// # Errors
    /// [`StoreError`] when the log cannot be read.
    fn visit_job(
        &self,
        job_id: Uuid,
        visit: &mut dyn FnMut(&EventRecord) -> bool,
    ) -> Result<(), StoreError>;

    /// The job's last stored seq, 0 when it has no events.
    ///
    /// # Errors
    /// [`StoreError`] when the log cannot be read.
    fn last_seq(&self, job_id: Uuid) -> Result<u64, StoreError>;

    /// Every event of one job, in seq order, collected from
    /// [`visit_job`](Self::visit_job).
    ///
    /// # Errors
    /// [`StoreError`] when the log cannot be read.
    fn load_job(&self, job_id: Uuid) -> Result<Vec<EventRecord>, StoreError> {
        let mut records = Vec::new();
        self.visit_job(job_id, &mut |record| {
            records.push(record.clone());
            true
        })?;
        Ok(records)
    }

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
            let mut ended = None;
            self.visit_job(job_id, &mut |record| {
                ended = Some(TERMINAL_KINDS.contains(&record.kind.as_str()));
                true
            })?;
            if ended == Some(false) {
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

/// The database a store error is about, as users name it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Target {
    /// A SQLite file, by the path it was opened at.
    File(PathBuf),
    /// A database server, as `postgres://user@host:port/db` (never with a
    /// password), or what the store was given when that cannot be told.
    Server(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::File(path) => path.display().fmt(f),
            Target::Server(server) => f.write_str(server),
        }
    }
}

/// A failure of the event log itself.
///
/// Errors are plain data (`Clone`): a group commit hands the same failure to
/// every append it served, and no database driver's type leaks through.
#[derive(Clone, Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// The append was made under a fence that no longer holds: another
    /// worker took the job over. Nothing was appended.
    #[error("job {job_id}: fenced off: this claim (epoch {epoch}) was taken over{}", found.map(|e| format!(" (the job is at epoch {e})")).unwrap_or_default())]
    Fenced {
        /// The job.
        job_id: Uuid,
        /// The epoch the append was made under.
        epoch: u64,
        /// The job's epoch now, if it is in the queue.
        found: Option<u64>,
    },
    /// The database server cannot be reached (or the connection was lost
    /// before anything was committed). Nothing was written; the append may
    /// be tried again.
    #[error("{target}: the database cannot be reached: {detail}")]
    Unavailable {
        /// The server.
        target: Target,
        /// What failed.
        detail: String,
    },
    /// The records passed to `append` are not one job's consecutive events.
    #[error("invalid append: {0}")]
    InvalidAppend(String),
    /// Whether the append was committed cannot be known: the commit was
    /// interrupted (a panic inside it, or the connection was lost during
    /// COMMIT). Read the job's log to learn what it holds; a step whose
    /// `StepStarted` may or may not be stored is never started.
    #[error(
        "outcome unknown: {detail}; read the job's log to learn whether the append was committed"
    )]
    OutcomeUnknown {
        /// What interrupted the commit.
        detail: String,
    },
    /// The append was not committed because the commit was abandoned (a
    /// panic inside it); nothing of it is in the log.
    #[error("not committed: {detail}")]
    NotCommitted {
        /// Why.
        detail: String,
    },
    /// The database (a file, or a server's schema holding a log) does not
    /// exist and the store was asked not to create it.
    #[error("{target}: no such database")]
    NotFound {
        /// The database.
        target: Target,
    },
    /// The database (a file, or a server's schema) exists but is not a
    /// job-executor database; it was not modified.
    #[error("{target}: not a job-executor database ({reason}); the file was left untouched")]
    NotOurs {
        /// The database.
        target: Target,
        /// What gave it away.
        reason: String,
    },
    /// The database was written by a newer build.
    #[error(
        "{target}: schema version {found} is newer than this build supports ({supported}); upgrade job-executor"
    )]
    SchemaTooNew {
        /// The database.
        target: Target,
        /// The version stored.
        found: u32,
        /// The newest version this build knows.
        supported: u32,
    },
    /// The database (or its directory) cannot be written.
    #[error(
        "{target}: the database is read-only (check the permissions of the file and its directory): {detail}"
    )]
    ReadOnly {
        /// The database.
        target: Target,
        /// What the database reported.
        detail: String,
    },
    /// The disk (or the database's page limit) is full.
    #[error("{target}: no space left for the database (disk full or page limit reached): {detail}")]
    Full {
        /// The database.
        target: Target,
        /// What the database reported.
        detail: String,
    },
    /// Another connection held the database lock past the busy timeout.
    /// Nothing was written; the append may be tried again.
    #[error(
        "{target}: the database stayed locked by another process past the busy timeout: {detail}"
    )]
    Busy {
        /// The database.
        target: Target,
        /// What the database reported.
        detail: String,
    },
    /// The database is damaged.
    #[error("{target}: database is corrupt: {detail}")]
    Corrupt {
        /// The database.
        target: Target,
        /// What the database reported.
        detail: String,
    },
    /// A stored row cannot be read as an event record.
    #[error("job {job_id} seq {seq}: unreadable row: {detail}")]
    BadRow {
        /// The job (as stored, which may not be a UUID).
        job_id: String,
        /// The seq (as stored).
        seq: i64,
        /// What is wrong.
        detail: String,
    },
    /// Reading the file failed.
    #[error("{target}: {source}")]
    Io {
        /// The database.
        target: Target,
        /// The I/O error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The database refused or failed an operation.
    #[error("{context}: {source}")]
    Database {
        /// What the store was doing.
        context: &'static str,
        /// The database's error.
        #[source]
        source: DatabaseError,
    },
}

/// An error the database engine reported, as text: the store's errors carry
/// no driver's type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DatabaseError {
    /// The engine's code for it (SQLite's result code name, PostgreSQL's
    /// SQLSTATE), when it gave one.
    pub code: Option<String>,
    /// The engine's message.
    pub message: String,
}

impl StoreError {
    /// Whether this is an optimistic-concurrency conflict.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. })
    }

    /// Whether the failure is passing: nothing was written, and the same
    /// append may succeed if tried again (the database was busy or locked).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Busy { .. } | StoreError::Unavailable { .. }
        )
    }
}

/// The largest seq a store holds: what a signed 64-bit database integer can.
pub const SEQ_MAX: u64 = i64::MAX as u64;

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
    let mut previous = first.seq - 1;
    for record in records {
        if record.job_id != first.job_id {
            return Err(StoreError::InvalidAppend(format!(
                "events of jobs {} and {} in one append",
                first.job_id, record.job_id
            )));
        }
        if record.seq > SEQ_MAX {
            return Err(StoreError::InvalidAppend(format!(
                "job {}: seq {} is beyond the largest a log holds ({SEQ_MAX})",
                first.job_id, record.seq
            )));
        }
        if record.seq != previous + 1 {
            return Err(StoreError::InvalidAppend(format!(
                "job {}: seq {} does not follow seq {previous}",
                first.job_id, record.seq
            )));
        }
        previous = record.seq;
    }
    Ok((first.job_id, first.seq))
}
