//! What the two SQL stores share, written once: the batch driver that
//! writes a group commit's appends (each failing alone), the pool of
//! reading connections, telling a conflict from another failed insert,
//! the SQL of the terminal kinds, and the mapping of queue rows.
//!
//! Each backend (`sqlite`, `postgres`) keeps only its dialect, its
//! connections and the mapping of its engine's errors: it implements
//! [`BatchWriter`] for its writing connection and [`Pooled`] for its
//! reading ones.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use uuid::Uuid;

use super::group::{AppendResult, Batched};
use super::{Claim, Fence, QueueEntry, QueueState, QueuedJob, StoreError};
use crate::events::{EventRecord, TERMINAL_KINDS};

/// The columns of an event row, in the order the backends read them.
pub(super) const EVENT_COLUMNS: &str =
    "position, job_id, seq, kind, schema_version, recorded_at, payload, digest, mac";

/// `column NOT IN ('JobCompleted', …)`: the SQL that tells a job's last
/// event does not end it, written from [`TERMINAL_KINDS`].
pub(super) fn not_terminal(column: &str) -> String {
    let kinds: Vec<String> = TERMINAL_KINDS
        .iter()
        .map(|kind| format!("'{}'", kind.replace('\'', "''")))
        .collect();
    format!("{column} NOT IN ({})", kinds.join(", "))
}

/// Locks a store's mutex. Connections are taken and put back whole, and a
/// write that a panic interrupts is rolled back, so a lock poisoned by a
/// panicking holder still guards consistent data.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reading connections kept open for reuse; more are opened when needed and
/// closed when given back past this.
const IDLE_READERS_MAX: usize = 4;

/// A connection a [`Readers`] pool can keep.
pub(super) trait Pooled {
    /// Whether the connection can serve another read (a server's may have
    /// been closed).
    fn usable(&self) -> bool {
        true
    }
}

/// Idle reading connections. A read takes one of its own, so a long scan
/// never holds up an append, and the code a read hands rows to runs under
/// no lock of the store's (it may call the store).
#[derive(Debug)]
pub(super) struct Readers<C> {
    idle: Mutex<Vec<C>>,
}

impl<C: Pooled> Readers<C> {
    /// No idle connection yet.
    pub(super) fn new() -> Self {
        Readers {
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `read` on a connection taken from the idle ones (when usable)
    /// or made by `open`, and keeps it for the next read after.
    pub(super) fn with<T>(
        &self,
        open: impl FnOnce() -> Result<C, StoreError>,
        read: impl FnOnce(&mut C) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let idle = lock(&self.idle).pop();
        let mut conn = match idle {
            Some(conn) if conn.usable() => conn,
            _ => open()?,
        };
        let result = read(&mut conn);
        let mut idle = lock(&self.idle);
        if idle.len() < IDLE_READERS_MAX && conn.usable() {
            idle.push(conn);
        }
        result
    }
}

/// A backend's writing connection, as the batch driver ([`commit_batch`])
/// uses it: one transaction at a time, opened and ended on the driver's
/// word.
pub(super) trait BatchWriter {
    /// The engine's error for a failed insert.
    type Error;

    /// Opens a transaction that holds the log's write lock, or takes it at
    /// [`reserve`](Self::reserve).
    fn begin(&mut self) -> Result<(), StoreError>;

    /// The job's epoch as its queue row holds it, the row locked against a
    /// takeover until the transaction ends; `None` when the job is not
    /// queued.
    fn epoch(&mut self, job_id: Uuid) -> Result<Option<i64>, StoreError>;

    /// Before the first write of an attempt: takes what writing all of
    /// `appends` needs (positions, job numbers).
    fn reserve(&mut self, appends: &[&[EventRecord]]) -> Result<(), StoreError> {
        let _ = appends;
        Ok(())
    }

    /// Writes one append's records; returns their positions.
    fn write(&mut self, records: &[EventRecord]) -> Result<Vec<u64>, Self::Error>;

    /// Says why writing `records` failed, with [`insert_error`]; `ahead` is
    /// the job's last seq among the appends of this attempt written before
    /// it. May end the transaction (an engine that aborts it at the first
    /// error must, to read anything).
    fn refuse(
        &mut self,
        records: &[EventRecord],
        ahead: Option<u64>,
        error: Self::Error,
    ) -> StoreError;

    /// Commits the transaction; on failure it is ended anyway.
    fn commit(&mut self) -> Result<(), StoreError>;

    /// Ends the open transaction, if any, writing nothing.
    fn rollback(&mut self);
}

/// Ends the writer's transaction however the driver's turn ends, a panic
/// included: no transaction is ever left open on the writing connection.
struct Ended<'w, W: BatchWriter>(&'w mut W);

impl<W: BatchWriter> Drop for Ended<'_, W> {
    fn drop(&mut self) {
        self.0.rollback();
    }
}

/// What one attempt at a batch came to.
enum Attempt {
    /// Every append is decided.
    Done,
    /// An append failed alone: try again without it.
    Again,
    /// The transaction failed as a whole.
    Failed(StoreError),
}

/// Writes every append of `batch` in one transaction and returns one
/// result per append. An append that fails (a lost fence, a conflict)
/// fails alone: its fence is checked before anything is written; a failed
/// insert rolls the transaction back, and the rest are written again
/// without it, which keeps the common case — nothing fails — free of
/// per-append savepoints. A failed transaction or commit fails them all.
pub(super) fn commit_batch(
    writer: &mut impl BatchWriter,
    batch: &[Batched<'_>],
) -> Vec<AppendResult> {
    let writer = Ended(writer);
    let mut results: Vec<Option<AppendResult>> = vec![None; batch.len()];
    loop {
        match attempt(&mut *writer.0, batch, &mut results) {
            Attempt::Done => break,
            Attempt::Again => {}
            Attempt::Failed(error) => return fill(results, &error),
        }
    }
    fill(results, &StoreError::InvalidAppend("not written".into()))
}

/// One transaction of the appends still undecided.
fn attempt<W: BatchWriter>(
    writer: &mut W,
    batch: &[Batched<'_>],
    results: &mut [Option<AppendResult>],
) -> Attempt {
    if let Err(error) = writer.begin() {
        return Attempt::Failed(error);
    }
    // Fences first: a takeover cannot commit before this transaction.
    for (append, result) in batch.iter().zip(results.iter_mut()) {
        let Some(fence) = append.fence.filter(|_| result.is_none()) else {
            continue;
        };
        let found = match writer.epoch(fence.job_id) {
            Ok(epoch) => epoch.and_then(|e| u64::try_from(e).ok()),
            Err(error) => return Attempt::Failed(error),
        };
        if found != Some(fence.epoch) {
            *result = Some(Err(fenced(fence, found)));
        }
    }
    let pending: Vec<usize> = (0..batch.len()).filter(|&i| results[i].is_none()).collect();
    if pending.is_empty() {
        writer.rollback();
        return Attempt::Done;
    }
    let appends: Vec<&[EventRecord]> = pending.iter().map(|&i| batch[i].records).collect();
    if let Err(error) = writer.reserve(&appends) {
        return Attempt::Failed(error);
    }
    let mut written: Vec<(usize, Vec<u64>)> = Vec::with_capacity(pending.len());
    for (&index, records) in pending.iter().zip(appends) {
        match writer.write(records) {
            Ok(positions) => written.push((index, positions)),
            Err(error) => {
                let ahead = last_written(batch, &written, records);
                results[index] = Some(Err(writer.refuse(records, ahead, error)));
                writer.rollback();
                return Attempt::Again;
            }
        }
    }
    if let Err(error) = writer.commit() {
        return Attempt::Failed(error);
    }
    for (index, positions) in written {
        results[index] = Some(Ok(positions));
    }
    Attempt::Done
}

fn fenced(fence: Fence, found: Option<u64>) -> StoreError {
    StoreError::Fenced {
        job_id: fence.job_id,
        epoch: fence.epoch,
        found,
    }
}

/// The last seq of `records`' job among the appends written before it in
/// this attempt: the rollback took them with it, but they are written
/// again without `records`, so the job's last seq may be one of theirs.
fn last_written(
    batch: &[Batched<'_>],
    written: &[(usize, Vec<u64>)],
    records: &[EventRecord],
) -> Option<u64> {
    let job_id = records.first()?.job_id;
    written
        .iter()
        .map(|&(index, _)| batch[index].records)
        .filter(|earlier| earlier.first().is_some_and(|r| r.job_id == job_id))
        .filter_map(|earlier| earlier.last().map(|r| r.seq))
        .max()
}

/// Every append not yet decided fails with `error`.
fn fill(results: Vec<Option<AppendResult>>, error: &StoreError) -> Vec<AppendResult> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(error.clone())))
        .collect()
}

/// Tells an optimistic-concurrency conflict from any other failed insert
/// of `records`. After a broken constraint (`violation`), the append
/// conflicts when its job's last seq — as `stored` reads it, or `ahead`
/// (see [`BatchWriter::refuse`]) — is not the one it follows; anything else
/// is `otherwise`'s error.
pub(super) fn insert_error(
    records: &[EventRecord],
    violation: bool,
    stored: impl FnOnce(Uuid) -> Option<u64>,
    ahead: Option<u64>,
    otherwise: impl FnOnce() -> StoreError,
) -> StoreError {
    let Some(first) = records.first() else {
        return otherwise();
    };
    if violation && let Some(stored) = stored(first.job_id) {
        let last = stored.max(ahead.unwrap_or(0));
        if last.checked_add(1) != Some(first.seq) {
            return StoreError::Conflict {
                job_id: first.job_id,
                expected: first.seq,
                found: last,
            };
        }
    }
    otherwise()
}

/// Refills `buffer` with `text`, reusing its allocation.
pub(super) fn refill(buffer: &mut String, text: &str) {
    buffer.clear();
    buffer.push_str(text);
}

/// [`refill`] for a column that may be NULL.
pub(super) fn refill_optional(buffer: &mut Option<String>, text: Option<&str>) {
    match (buffer.as_mut(), text) {
        (Some(b), Some(t)) => refill(b, t),
        (_, t) => *buffer = t.map(str::to_owned),
    }
}

/// Records `job` as submitted: `insert` writes its JSON and returns `None`,
/// or `Some(n)` — `n` events stored for the job — when the job id is
/// already in the log or the queue, which is then a conflict.
pub(super) fn submit(
    job: &QueuedJob,
    insert: impl FnOnce(&str) -> Result<Option<i64>, StoreError>,
) -> Result<(), StoreError> {
    let text = serde_json::to_string(job).map_err(|e| StoreError::InvalidAppend(e.to_string()))?;
    match insert(&text)? {
        None => Ok(()),
        Some(found) => Err(StoreError::Conflict {
            job_id: job.job_id,
            expected: 0,
            found: found.max(0).cast_unsigned(),
        }),
    }
}

/// Lease lengths as the databases store them: seconds, with a fraction.
pub(super) fn seconds(lease: Duration) -> f64 {
    lease.as_secs_f64()
}

/// A claim as a database row gave it: the job's stored id, its JSON, the
/// owner before the claim and the epoch before the claim moved it on.
///
/// # Errors
/// [`StoreError::BadRow`] for JSON that is not a queued job or an epoch
/// that cannot move on.
pub(super) fn claim_from_row(
    job_id: &str,
    job: &str,
    previous_owner: Option<String>,
    epoch_before: i64,
) -> Result<Claim, StoreError> {
    let job = job_from_row(job_id, job)?;
    let epoch = epoch_before
        .checked_add(1)
        .and_then(|e| u64::try_from(e).ok())
        .ok_or_else(|| bad_row(job_id, format!("epoch {epoch_before}")))?;
    Ok(Claim {
        fence: Fence {
            job_id: job.job_id,
            epoch,
        },
        job,
        taken_over_from: previous_owner,
    })
}

/// A queued job and its state as a database row gave them.
///
/// # Errors
/// [`StoreError::BadRow`] for JSON that is not a queued job or an unknown
/// state.
pub(super) fn queued_from_row(
    job_id: &str,
    job: &str,
    state: &str,
) -> Result<(QueuedJob, QueueState), StoreError> {
    let job = job_from_row(job_id, job)?;
    Ok((job, state_from_row(job_id, state)?))
}

/// A row of the queue as `queued` lists it, as the database gave it.
pub(super) struct EntryRow {
    pub(super) job_id: String,
    pub(super) state: String,
    pub(super) owner: Option<String>,
    pub(super) epoch: i64,
    pub(super) lease_expired: bool,
    pub(super) submitted_at: String,
    pub(super) steps: i64,
}

impl EntryRow {
    /// The entry, every value checked.
    ///
    /// # Errors
    /// [`StoreError::BadRow`] for a job id, state or epoch out of range.
    pub(super) fn entry(self) -> Result<QueueEntry, StoreError> {
        let job_id = Uuid::parse_str(&self.job_id)
            .map_err(|e| bad_row(&self.job_id, format!("job id: {e}")))?;
        let epoch = self.epoch;
        Ok(QueueEntry {
            job_id,
            state: state_from_row(&self.job_id, &self.state)?,
            owner: self.owner,
            epoch: u64::try_from(epoch)
                .map_err(|_| bad_row(&self.job_id, format!("epoch {epoch}")))?,
            lease_expired: self.lease_expired,
            submitted_at: self.submitted_at,
            steps: usize::try_from(self.steps).unwrap_or(0),
        })
    }
}

fn state_from_row(job_id: &str, state: &str) -> Result<QueueState, StoreError> {
    QueueState::parse(state).ok_or_else(|| bad_row(job_id, format!("state {state:?}")))
}

fn job_from_row(job_id: &str, job: &str) -> Result<QueuedJob, StoreError> {
    serde_json::from_str(job).map_err(|e| bad_row(job_id, format!("queued job: {e}")))
}

fn bad_row(job_id: &str, detail: String) -> StoreError {
    StoreError::BadRow {
        job_id: job_id.to_owned(),
        seq: 0,
        detail,
    }
}
