//! The PostgreSQL event log, and the job queue beside it: for a fleet of
//! executors on many hosts sharing one log.
//!
//! The schema lives in `schema/postgres/*.sql`, applied in order on open
//! under a transaction-scoped advisory lock (so processes opening the same
//! database at once apply each step once), and tracked in the table
//! `job_executor_schema`, whose presence marks the schema as ours. The rules
//! are the SQLite log's, enforced by the server whatever program writes:
//! no UPDATE, DELETE or TRUNCATE of events; a job's events contiguous and
//! closed after its end; a job id started once.
//!
//! Positions are dense and given in commit order: an append takes the lock
//! of the log's head row (`log_head`) for the rest of its transaction, so a
//! reader that follows positions never skips an event committed out of
//! order. The price is that appends to one log commit one transaction at a
//! time — which group commit, many jobs' appends in one transaction, is for.
//! `synchronous_commit` is set `on` for every writing session.
//!
//! Connections: `postgres://…`, `postgresql://…` or libpq `key=value`
//! strings; choose the schema with `options=-csearch_path=NAME`. The client
//! is synchronous (the engine owns its threads); an async embedder calls it
//! from `spawn_blocking`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use postgres::error::SqlState;
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Row, Statement};
use uuid::Uuid;

use super::group::{Batched, GroupCommit, Hook};
use super::queue;
use super::{
    AppendOptions, Claim, DatabaseError, EventStore, Fence, JobQueue, QueueEntry, QueueState,
    QueuedJob, StoreError, check_batch,
};
use crate::events::EventRecord;

/// The schema migrations, in order; migration `i` brings the schema to
/// version `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("../../../schema/postgres/0001_events.sql"),
    include_str!("../../../schema/postgres/0002_job_queue.sql"),
    include_str!("../../../schema/postgres/0003_job_starts.sql"),
    include_str!("../../../schema/postgres/0004_statement_checks.sql"),
];

/// The schema version this build writes.
pub const PG_SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// Reading connections kept open for reuse.
const IDLE_READERS_MAX: usize = 4;

/// Columns of an event row, in the order `record_from` expects.
const COLUMNS: &str =
    "position, job_id, seq, kind, schema_version, recorded_at, payload, digest, mac";

/// A job's number, by its first event.
const JOB_NO: &str = "(SELECT job_no FROM events WHERE job_id = $1 AND seq = 1)";

/// How to open a PostgreSQL event log.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PgOptions {
    /// Create the schema's tables when they do not exist.
    pub create: bool,
    /// Open for reading only: nothing is ever written, not even the schema.
    pub read_only: bool,
    /// How long to wait for a connection.
    pub connect_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            create: true,
            read_only: false,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl PgOptions {
    /// Options for reading an existing log: nothing is ever written.
    pub fn reader() -> Self {
        PgOptions {
            create: false,
            read_only: true,
            ..PgOptions::default()
        }
    }

    /// Options for appending to an existing log, never creating one.
    pub fn existing() -> Self {
        PgOptions {
            create: false,
            ..PgOptions::default()
        }
    }
}

/// A connection and the statements prepared on it.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    fn prepared(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.statements.insert(sql, statement.clone());
        Ok(statement)
    }
}

/// An event log (and job queue) in a PostgreSQL database.
pub struct PgStore {
    /// The database as given, without its password: how errors name it.
    target: String,
    config: Config,
    read_only: bool,
    /// The one connection that writes; reconnected when lost.
    writer: Mutex<Option<Conn>>,
    readers: Mutex<Vec<Conn>>,
    group: GroupCommit,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Opens (creating the schema's tables when absent) the log at
    /// `connection`: a `postgres://` or `postgresql://` URL, or a libpq
    /// `key=value` string.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the server cannot be reached;
    /// [`StoreError::NotOurs`] for a schema that holds an `events` table of
    /// another program; [`StoreError::SchemaTooNew`]; other server failures.
    pub fn open(connection: &str) -> Result<Self, StoreError> {
        PgStore::open_with(connection, &PgOptions::default())
    }

    /// Opens the log at `connection` with `options`.
    ///
    /// # Errors
    /// As [`PgStore::open`], plus [`StoreError::NotFound`] when the schema has
    /// no log and `options.create` is false or `options.read_only` true.
    pub fn open_with(connection: &str, options: &PgOptions) -> Result<Self, StoreError> {
        let mut config = Config::from_str(connection).map_err(|e| StoreError::Unavailable {
            target: "postgres".into(),
            detail: format!("not a connection string: {e}"),
        })?;
        config.connect_timeout(options.connect_timeout);
        config.application_name("job-executor");
        let target = describe(&config);
        let store = PgStore {
            target,
            config,
            read_only: options.read_only,
            writer: Mutex::new(None),
            readers: Mutex::new(Vec::new()),
            group: GroupCommit::default(),
        };
        let mut conn = store.connect()?;
        store.prepare_schema(&mut conn, options)?;
        *lock(&store.writer) = Some(conn);
        Ok(store)
    }

    /// The database as given, without its password.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn connect(&self) -> Result<Conn, StoreError> {
        let mut client = self
            .config
            .connect(NoTls)
            .map_err(|e| self.unavailable(&e))?;
        let setup = if self.read_only {
            "SET default_transaction_read_only = on"
        } else {
            // Every commit is durable before it is acknowledged. The
            // writer's statements are short and always the same: planning
            // one anew for its parameters costs more than running it
            // (~140 µs of a ~170 µs batch), and JIT would compile the
            // batch statement (its estimates are large: `log_head` is never
            // analysed) at every execution, for milliseconds.
            "SET synchronous_commit = on; SET plan_cache_mode = force_generic_plan; SET jit = off"
        };
        client
            .batch_execute(setup)
            .map_err(|e| self.classify("configuring the session", e))?;
        Ok(Conn {
            client,
            statements: HashMap::new(),
        })
    }

    fn unavailable(&self, error: &postgres::Error) -> StoreError {
        StoreError::Unavailable {
            target: self.target.clone(),
            detail: error_text(error),
        }
    }

    /// Checks the schema is ours and brings it to [`PG_SCHEMA_VERSION`],
    /// under an advisory lock: processes opening one database at once apply
    /// each step once, and never see one half-applied.
    fn prepare_schema(&self, conn: &mut Conn, options: &PgOptions) -> Result<(), StoreError> {
        let write = |e| self.classify("applying the schema", e);
        let mut tx = conn.client.transaction().map_err(write)?;
        if !options.read_only {
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('job-executor:' || coalesce(current_schema(), '')))",
                &[],
            )
            .map_err(write)?;
        }
        let row = tx
            .query_one(
                "SELECT to_regclass('job_executor_schema') IS NOT NULL,
                        to_regclass('events') IS NOT NULL,
                        coalesce(current_schema(), '')",
                &[],
            )
            .map_err(write)?;
        let (ours, has_events, schema): (bool, bool, String) = (row.get(0), row.get(1), row.get(2));
        let path = PathBuf::from(&self.target);
        if !ours && has_events {
            return Err(StoreError::NotOurs {
                path,
                reason: format!(
                    "schema {schema:?} has an events table, but no job_executor_schema"
                ),
            });
        }
        if !ours && (options.read_only || !options.create) {
            return Err(StoreError::NotFound { path });
        }
        let version: i32 = if ours {
            tx.query_one("SELECT version FROM job_executor_schema", &[])
                .map_err(write)?
                .get(0)
        } else {
            0
        };
        let version = u32::try_from(version).map_err(|_| StoreError::Corrupt {
            path: path.clone(),
            detail: format!("schema version {version}"),
        })?;
        if version > PG_SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                path,
                found: version,
                supported: PG_SCHEMA_VERSION,
            });
        }
        if options.read_only {
            return tx.commit().map_err(write);
        }
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(sql).map_err(write)?;
            let next = i32::try_from(index + 1).unwrap_or(i32::MAX);
            tx.execute("UPDATE job_executor_schema SET version = $1", &[&next])
                .map_err(write)?;
        }
        tx.commit().map_err(write)
    }

    /// The writer, connected (again, if the last connection was lost).
    fn writer(&self) -> Result<MutexGuard<'_, Option<Conn>>, StoreError> {
        let mut writer = lock(&self.writer);
        if writer.as_ref().is_none_or(|conn| conn.client.is_closed()) {
            *writer = Some(self.connect()?);
        }
        Ok(writer)
    }

    /// Runs `read` on a reading connection of its own, taken from the idle
    /// ones or newly opened, given back after: no lock of the store's is
    /// held while it runs.
    fn with_reader<T>(
        &self,
        read: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let idle = lock(&self.readers).pop();
        let mut conn = match idle {
            Some(conn) if !conn.client.is_closed() => conn,
            _ => self.connect()?,
        };
        let result = read(&mut conn);
        let mut idle = lock(&self.readers);
        if idle.len() < IDLE_READERS_MAX && !conn.client.is_closed() {
            idle.push(conn);
        }
        result
    }

    /// Writes every append of `batch` in one transaction and returns one
    /// result per append, as the SQLite store does: an append that fails
    /// (a conflict, a lost fence) fails alone, the rest are written again
    /// without it. A commit whose outcome cannot be known (the connection
    /// dropped during COMMIT) leaves every append of it unknown.
    fn commit_batch(&self, batch: &[Batched<'_>]) -> Vec<Result<Vec<u64>, StoreError>> {
        let mut results: Vec<Option<Result<Vec<u64>, StoreError>>> =
            batch.iter().map(|_| None).collect();
        let mut writer = match self.writer() {
            Ok(writer) => writer,
            Err(e) => return fill(results, &e),
        };
        let Some(conn) = writer.as_mut() else {
            return fill(results, &self.lost("the writer is gone"));
        };
        match self.attempt_whole(conn, batch) {
            Whole::Done(positions) => return positions.into_iter().map(Ok).collect(),
            Whole::Failed(error) => return fill(results, &error),
            // Nothing was written: decide each append on its own.
            Whole::Refused => {}
        }
        loop {
            match self.attempt(conn, batch, &mut results) {
                Attempt::Done => break,
                Attempt::Again => continue,
                Attempt::Failed(error) => return fill(results, &error),
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::InvalidAppend("not written".into()))))
            .collect()
    }

    /// The common case in one statement: every append of the batch written
    /// by one INSERT that also takes the head row's positions, in a
    /// transaction of its own (one round trip) when no append is fenced.
    /// Anything refused — a lost fence, a conflict, a broken rule — leaves
    /// nothing written, and [`PgStore::attempt`] then decides each append
    /// alone.
    fn attempt_whole(&self, conn: &mut Conn, batch: &[Batched<'_>]) -> Whole {
        let write = |e| self.classify("appending events", e);
        let (whole, fence_check) = match (conn.prepared(WHOLE), conn.prepared(FENCES)) {
            (Ok(w), Ok(f)) => (w, f),
            (Err(e), _) | (_, Err(e)) => return Whole::Failed(write(e)),
        };
        let rows = WholeRows::new(batch);
        let fences: Vec<Fence> = batch.iter().filter_map(|append| append.fence).collect();
        let params = rows.params();
        let outcome = if fences.is_empty() {
            // Autocommit: the statement is its own transaction.
            conn.client.query_one(&whole, &params)
        } else {
            let mut tx = match conn.client.transaction() {
                Ok(tx) => tx,
                Err(e) => return Whole::Failed(write(e)),
            };
            let ids: Vec<Uuid> = fences.iter().map(|f| f.job_id).collect();
            let held = match tx.query(&fence_check, &[&ids]) {
                Ok(rows) => rows,
                Err(e) if e.as_db_error().is_some() => return Whole::Refused,
                Err(e) => return Whole::Failed(write(e)),
            };
            let epoch = |job: Uuid| {
                held.iter()
                    .find(|row| row.get::<_, Uuid>(0) == job)
                    .and_then(|row| u64::try_from(row.get::<_, i64>(1)).ok())
            };
            if fences.iter().any(|f| epoch(f.job_id) != Some(f.epoch)) {
                return Whole::Refused;
            }
            match tx.query_one(&whole, &params) {
                Ok(row) => tx.commit().map(|()| row),
                Err(e) if e.as_db_error().is_some() => return Whole::Refused,
                Err(e) => return Whole::Failed(write(e)),
            }
        };
        let row = match outcome {
            Ok(row) => row,
            // The server refused it: nothing was committed.
            Err(e) if e.as_db_error().is_some() && !e.is_closed() => return Whole::Refused,
            Err(e) => {
                return Whole::Failed(StoreError::OutcomeUnknown {
                    detail: format!(
                        "{}: the connection failed during a commit: {}",
                        self.target,
                        error_text(&e)
                    ),
                });
            }
        };
        let first: i64 = row.get(0);
        let mut next = first;
        Whole::Done(
            batch
                .iter()
                .map(|append| {
                    (0..append.records.len())
                        .map(|_| {
                            next += 1;
                            next.cast_unsigned()
                        })
                        .collect()
                })
                .collect(),
        )
    }

    /// One transaction of a batch's appends still undecided.
    fn attempt(
        &self,
        conn: &mut Conn,
        batch: &[Batched<'_>],
        results: &mut [Option<Result<Vec<u64>, StoreError>>],
    ) -> Attempt {
        let write = |e| self.classify("appending events", e);
        let statements = (
            conn.prepared(FENCE),
            conn.prepared(HEAD),
            conn.prepared(INSERT),
        );
        let (fence_check, head, insert) = match statements {
            (Ok(f), Ok(h), Ok(i)) => (f, h, i),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Attempt::Failed(write(e)),
        };
        let mut tx = match conn.client.transaction() {
            Ok(tx) => tx,
            Err(e) => return Attempt::Failed(write(e)),
        };
        // Fences first, under a share lock of each job's row: a takeover
        // (which updates the row) cannot commit before this transaction.
        for (index, append) in batch.iter().enumerate() {
            let Some(fence) = append.fence.filter(|_| results[index].is_none()) else {
                continue;
            };
            let found = match tx.query_opt(&fence_check, &[&fence.job_id]) {
                Ok(row) => row.and_then(|row| u64::try_from(row.get::<_, i64>(0)).ok()),
                Err(e) => return Attempt::Failed(write(e)),
            };
            if found != Some(fence.epoch) {
                results[index] = Some(Err(StoreError::Fenced {
                    job_id: fence.job_id,
                    epoch: fence.epoch,
                    found,
                }));
            }
        }
        let pending: Vec<usize> = (0..batch.len()).filter(|&i| results[i].is_none()).collect();
        if pending.is_empty() {
            return Attempt::Done;
        }
        let total: i64 = pending.iter().map(|&i| batch[i].records.len() as i64).sum();
        let new_jobs: i64 = pending
            .iter()
            .filter(|&&i| batch[i].records.first().is_some_and(|r| r.seq == 1))
            .count() as i64;
        let (mut position, mut job_no): (i64, i64) = match tx.query_one(&head, &[&total, &new_jobs])
        {
            Ok(row) => (row.get(0), row.get(1)),
            Err(e) => return Attempt::Failed(write(e)),
        };
        let mut written: Vec<(usize, Vec<i64>)> = Vec::with_capacity(pending.len());
        for &index in &pending {
            let records = batch[index].records;
            let positions: Vec<i64> = (1..=records.len() as i64).map(|n| position + n).collect();
            let starts = records.first().is_some_and(|r| r.seq == 1);
            let number = starts.then(|| job_no + 1);
            let inserted = insert_rows(&mut tx, &insert, records, &positions, number);
            if let Err(e) = inserted {
                drop(tx);
                // The rollback took this batch's earlier appends with it, but
                // they are written again without this one: the job's last
                // seq may be one of theirs.
                let ahead = written
                    .iter()
                    .map(|&(i, _)| batch[i].records)
                    .filter(|earlier| earlier[0].job_id == records[0].job_id)
                    .filter_map(|earlier| earlier.last().map(|r| r.seq))
                    .max();
                results[index] = Some(Err(self.insert_error(conn, records, ahead, e)));
                return Attempt::Again;
            }
            position += records.len() as i64;
            if starts {
                job_no += 1;
            }
            written.push((index, positions));
        }
        if let Err(e) = tx.commit() {
            return Attempt::Failed(if e.is_closed() || e.as_db_error().is_none() {
                StoreError::OutcomeUnknown {
                    detail: format!(
                        "{}: the connection failed during COMMIT: {}",
                        self.target,
                        error_text(&e)
                    ),
                }
            } else {
                write(e)
            });
        }
        for (index, positions) in written {
            results[index] = Some(Ok(positions
                .into_iter()
                .map(|p| p.cast_unsigned())
                .collect()));
        }
        Attempt::Done
    }

    /// Tells an optimistic-concurrency conflict from any other failed
    /// insert, once the transaction is rolled back; `ahead` is the job's
    /// last seq among the batch's appends written before this one.
    fn insert_error(
        &self,
        conn: &mut Conn,
        records: &[EventRecord],
        ahead: Option<u64>,
        error: postgres::Error,
    ) -> StoreError {
        let first = &records[0];
        let conflict_like = matches!(
            error.code(),
            Some(c) if *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::NOT_NULL_VIOLATION
                || c.code() == "JE003"
        );
        if conflict_like
            && let Ok(row) = conn.client.query_one(
                &format!("SELECT coalesce(max(seq), 0) FROM events WHERE job_no = {JOB_NO}"),
                &[&first.job_id],
            )
        {
            let stored = row.get::<_, i64>(0).max(0).cast_unsigned();
            let last = stored.max(ahead.unwrap_or(0));
            if last.checked_add(1) != Some(first.seq) {
                return StoreError::Conflict {
                    job_id: first.job_id,
                    expected: first.seq,
                    found: last,
                };
            }
        }
        self.classify("appending events", error)
    }

    fn lost(&self, detail: &str) -> StoreError {
        StoreError::Unavailable {
            target: self.target.clone(),
            detail: detail.to_owned(),
        }
    }

    /// Maps a server error to the store error a user can act on.
    fn classify(&self, context: &'static str, error: postgres::Error) -> StoreError {
        let path = || PathBuf::from(&self.target);
        let detail = error_text(&error);
        let Some(code) = error.code() else {
            // No answer from the server: the connection failed.
            return StoreError::Unavailable {
                target: self.target.clone(),
                detail,
            };
        };
        match code.code() {
            "25006" | "42501" => StoreError::ReadOnly {
                path: path(),
                detail,
            },
            "53100" => StoreError::Full {
                path: path(),
                detail,
            },
            "40001" | "40P01" | "55P03" | "57014" => StoreError::Busy {
                path: path(),
                detail,
            },
            "57P01" | "57P02" | "57P03" | "53300" => StoreError::Unavailable {
                target: self.target.clone(),
                detail,
            },
            "XX001" | "XX002" => StoreError::Corrupt {
                path: path(),
                detail,
            },
            other => StoreError::Database {
                context,
                source: DatabaseError {
                    code: Some(other.to_owned()),
                    message: detail,
                },
            },
        }
    }

    /// Runs `write` in a transaction of the writer's.
    fn queue_write<T>(
        &self,
        context: &'static str,
        write: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let mut writer = self.writer()?;
        let conn = writer
            .as_mut()
            .ok_or_else(|| self.lost("the writer is gone"))?;
        let mut tx = conn
            .client
            .transaction()
            .map_err(|e| self.classify(context, e))?;
        let value = write(&mut tx).map_err(|e| self.classify(context, e))?;
        tx.commit().map_err(|e| self.classify(context, e))?;
        Ok(value)
    }

    /// One job's rows, in seq order, to `visit`.
    fn read_job(
        &self,
        conn: &mut Conn,
        job_id: Uuid,
        visit: &mut dyn FnMut(&EventRecord) -> bool,
    ) -> Result<(), StoreError> {
        let read = |e| self.classify("reading a job's events", e);
        let statement = conn.prepared(JOB_EVENTS).map_err(read)?;
        let params: [&(dyn ToSql + Sync); 1] = [&job_id];
        let mut rows = conn.client.query_raw(&statement, params).map_err(read)?;
        let mut record = EventRecord::default();
        while let Some(row) = rows.next().map_err(read)? {
            record_from(&row, &mut record)?;
            if !visit(&record) {
                break;
            }
        }
        Ok(())
    }
}

/// What writing a whole batch in one statement came to.
enum Whole {
    /// Written and committed: each append's positions.
    Done(Vec<Vec<u64>>),
    /// Refused by the server (or a lost fence): nothing written.
    Refused,
    /// The connection failed: the outcome is the error's.
    Failed(StoreError),
}

/// A batch's rows as the columns [`WHOLE`] unnests.
struct WholeRows<'a> {
    total: i64,
    new_jobs: i64,
    job_ids: Vec<Uuid>,
    /// A starting job's rank among the batch's new jobs (1, 2, …); 0 for a
    /// job that started before.
    new_job: Vec<i64>,
    seqs: Vec<i64>,
    kinds: Vec<&'a str>,
    versions: Vec<i32>,
    times: Vec<&'a str>,
    payloads: Vec<&'a str>,
    digests: Vec<Option<&'a str>>,
    macs: Vec<Option<&'a str>>,
}

impl<'a> WholeRows<'a> {
    fn new(batch: &[Batched<'a>]) -> Self {
        let total: usize = batch.iter().map(|append| append.records.len()).sum();
        let mut rows = WholeRows {
            total: total as i64,
            new_jobs: 0,
            job_ids: Vec::with_capacity(total),
            new_job: Vec::with_capacity(total),
            seqs: Vec::with_capacity(total),
            kinds: Vec::with_capacity(total),
            versions: Vec::with_capacity(total),
            times: Vec::with_capacity(total),
            payloads: Vec::with_capacity(total),
            digests: Vec::with_capacity(total),
            macs: Vec::with_capacity(total),
        };
        for append in batch {
            let starts = append.records.first().is_some_and(|r| r.seq == 1);
            if starts {
                rows.new_jobs += 1;
            }
            let rank = if starts { rows.new_jobs } else { 0 };
            for record in append.records {
                rows.job_ids.push(record.job_id);
                rows.new_job.push(rank);
                // check_batch has bounded every seq by SEQ_MAX, which fits an i64.
                rows.seqs.push(record.seq as i64);
                rows.kinds.push(&record.kind);
                rows.versions
                    .push(i32::try_from(record.schema_version).unwrap_or(i32::MAX));
                rows.times.push(&record.recorded_at);
                rows.payloads.push(&record.payload);
                rows.digests.push(record.digest.as_deref());
                rows.macs.push(record.mac.as_deref());
            }
        }
        rows
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 11] {
        [
            &self.total,
            &self.new_jobs,
            &self.job_ids,
            &self.new_job,
            &self.seqs,
            &self.kinds,
            &self.versions,
            &self.times,
            &self.payloads,
            &self.digests,
            &self.macs,
        ]
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

const FENCE: &str = "SELECT epoch FROM jobs WHERE job_id = $1 FOR SHARE";
const HEAD: &str = "UPDATE log_head SET position = position + $1, job_no = job_no + $2
                    RETURNING position - $1, job_no - $2";
const INSERT: &str = "INSERT INTO events
        (position, job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest, mac)
    SELECT t.position, $1,
           coalesce($2, (SELECT e.job_no FROM events e WHERE e.job_id = $1 AND e.seq = 1)),
           t.seq, t.kind, t.schema_version, t.recorded_at, t.payload, t.digest, t.mac
    FROM unnest($3::bigint[], $4::bigint[], $5::text[], $6::integer[], $7::text[], $8::text[],
                $9::text[], $10::text[])
         WITH ORDINALITY AS t(position, seq, kind, schema_version, recorded_at, payload, digest, mac, n)
    ORDER BY t.n";
/// Every fenced job's epoch, under a share lock of its row.
const FENCES: &str = "SELECT job_id, epoch FROM jobs WHERE job_id = ANY($1) FOR SHARE";
/// A whole batch: positions (and new jobs' numbers) from the head row, whose
/// lock is held to the commit, then every row, numbered in the batch's
/// order (the rules are checked once the statement's rows are all in, so
/// the order rows go in does not matter). Returns the position before the
/// first row; the insert runs to completion though nothing reads it.
const WHOLE: &str = "WITH head AS (
        UPDATE log_head SET position = position + $1, job_no = job_no + $2
        RETURNING position - $1 AS first, job_no - $2 AS last_job),
    inserted AS (
        INSERT INTO events
            (position, job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest, mac)
        SELECT head.first + t.n, t.job_id,
               CASE WHEN t.new_job > 0 THEN head.last_job + t.new_job
                    ELSE (SELECT e.job_no FROM events e WHERE e.job_id = t.job_id AND e.seq = 1) END,
               t.seq, t.kind, t.schema_version, t.recorded_at, t.payload, t.digest, t.mac
        FROM head, unnest($3::uuid[], $4::bigint[], $5::bigint[], $6::text[], $7::integer[],
                          $8::text[], $9::text[], $10::text[], $11::text[])
             WITH ORDINALITY AS t(job_id, new_job, seq, kind, schema_version, recorded_at,
                                  payload, digest, mac, n))
    SELECT head.first FROM head";
const JOB_EVENTS: &str =
    "SELECT position, job_id, seq, kind, schema_version, recorded_at, payload, digest, mac
    FROM events WHERE job_no = (SELECT job_no FROM events WHERE job_id = $1 AND seq = 1)
    ORDER BY seq";

/// Inserts one job's consecutive records at `positions`, as job number
/// `job_no` when they start the job (else the number its start got).
fn insert_rows(
    tx: &mut postgres::Transaction<'_>,
    insert: &Statement,
    records: &[EventRecord],
    positions: &[i64],
    job_no: Option<i64>,
) -> Result<u64, postgres::Error> {
    let job_id = records[0].job_id;
    // check_batch has bounded every seq by SEQ_MAX, which fits an i64.
    let seqs: Vec<i64> = records.iter().map(|r| r.seq as i64).collect();
    let kinds: Vec<&str> = records.iter().map(|r| r.kind.as_str()).collect();
    let versions: Vec<i32> = records
        .iter()
        .map(|r| i32::try_from(r.schema_version).unwrap_or(i32::MAX))
        .collect();
    let times: Vec<&str> = records.iter().map(|r| r.recorded_at.as_str()).collect();
    let payloads: Vec<&str> = records.iter().map(|r| r.payload.as_str()).collect();
    let digests: Vec<Option<&str>> = records.iter().map(|r| r.digest.as_deref()).collect();
    let macs: Vec<Option<&str>> = records.iter().map(|r| r.mac.as_deref()).collect();
    tx.execute(
        insert,
        &[
            &job_id, &job_no, &positions, &seqs, &kinds, &versions, &times, &payloads, &digests,
            &macs,
        ],
    )
}

/// Refills `record` from a row of [`COLUMNS`], checking every number.
fn record_from(row: &Row, record: &mut EventRecord) -> Result<(), StoreError> {
    let job_id: Uuid = row
        .try_get(1)
        .map_err(|e| bad_row("?".into(), -1, e.to_string()))?;
    let seq: i64 = row
        .try_get(2)
        .map_err(|e| bad_row(job_id.to_string(), -1, e.to_string()))?;
    let bad = |detail: String| bad_row(job_id.to_string(), seq, detail);
    let position: i64 = row.try_get(0).map_err(|e| bad(e.to_string()))?;
    let schema_version: i32 = row.try_get(4).map_err(|e| bad(e.to_string()))?;
    record.position = u64::try_from(position).map_err(|_| bad(format!("position {position}")))?;
    record.job_id = job_id;
    record.seq = u64::try_from(seq).map_err(|_| bad(format!("seq {seq}")))?;
    record.schema_version = u32::try_from(schema_version)
        .map_err(|_| bad(format!("schema_version {schema_version}")))?;
    let text = |i: usize| row.try_get::<_, &str>(i).map_err(|e| bad(e.to_string()));
    refill(&mut record.kind, text(3)?);
    refill(&mut record.recorded_at, text(5)?);
    refill(&mut record.payload, text(6)?);
    let optional = |i: usize| {
        row.try_get::<_, Option<&str>>(i)
            .map_err(|e| bad(e.to_string()))
    };
    record.digest = optional(7)?.map(str::to_owned);
    record.mac = optional(8)?.map(str::to_owned);
    Ok(())
}

fn refill(buffer: &mut String, text: &str) {
    buffer.clear();
    buffer.push_str(text);
}

fn bad_row(job_id: String, seq: i64, detail: String) -> StoreError {
    StoreError::BadRow {
        job_id,
        seq,
        detail,
    }
}

/// The connection as `postgres://user@host:port/db`, never its password.
fn describe(config: &Config) -> String {
    let user = config.get_user().unwrap_or("");
    let host = config
        .get_hosts()
        .first()
        .map(|host| match host {
            postgres::config::Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_default();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or(user);
    format!("postgres://{user}@{host}:{port}/{db}")
}

/// A server error's message with its detail, on one line.
fn error_text(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_owned(),
        },
        None => {
            let source = std::error::Error::source(error).map(ToString::to_string);
            match source {
                Some(source) => format!("{error}: {source}"),
                None => error.to_string(),
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Connections are taken and put back whole: a poisoned lock is consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every append not yet decided fails with `error`.
fn fill(
    results: Vec<Option<Result<Vec<u64>, StoreError>>>,
    error: &StoreError,
) -> Vec<Result<Vec<u64>, StoreError>> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(error.clone())))
        .collect()
}

impl EventStore for PgStore {
    fn append_with(
        &self,
        records: &[EventRecord],
        options: AppendOptions,
    ) -> Result<Vec<u64>, StoreError> {
        check_batch(records)?;
        if self.read_only {
            return Err(StoreError::ReadOnly {
                path: PathBuf::from(&self.target),
                detail: "opened for reading".into(),
            });
        }
        self.group.append(
            records,
            options.fence,
            options.committed.map(Hook),
            |batch| self.commit_batch(batch),
        )
    }

    fn last_seq(&self, job_id: Uuid) -> Result<u64, StoreError> {
        self.with_reader(|conn| {
            let read = |e| self.classify("reading a job's last seq", e);
            let statement = conn
                .prepared("SELECT coalesce(max(seq), 0) FROM events WHERE job_no = (SELECT job_no FROM events WHERE job_id = $1 AND seq = 1)")
                .map_err(read)?;
            let last: i64 = conn.client.query_one(&statement, &[&job_id]).map_err(read)?.get(0);
            Ok(last.max(0).cast_unsigned())
        })
    }

    fn visit_job(
        &self,
        job_id: Uuid,
        visit: &mut dyn FnMut(&EventRecord) -> bool,
    ) -> Result<(), StoreError> {
        self.with_reader(|conn| self.read_job(conn, job_id, visit))
    }

    fn load_job(&self, job_id: Uuid) -> Result<Vec<EventRecord>, StoreError> {
        let mut records = Vec::new();
        self.visit_job(job_id, &mut |record| {
            records.push(record.clone());
            true
        })?;
        Ok(records)
    }

    fn scan(
        &self,
        visit: &mut dyn FnMut(u64, Result<&EventRecord, StoreError>),
    ) -> Result<(), StoreError> {
        self.with_reader(|conn| {
            let read = |e| self.classify("scanning the log", e);
            let params: [&(dyn ToSql + Sync); 0] = [];
            let mut rows = conn
                .client
                .query_raw(
                    &format!("SELECT {COLUMNS}, job_no FROM events ORDER BY job_no, seq"),
                    params,
                )
                .map_err(read)?;
            let mut record = EventRecord::default();
            while let Some(row) = rows.next().map_err(read)? {
                let group = row
                    .try_get::<_, i64>(9)
                    .map_or(u64::MAX, i64::cast_unsigned);
                match record_from(&row, &mut record) {
                    Ok(()) => visit(group, Ok(&record)),
                    Err(e) => visit(group, Err(e)),
                }
            }
            Ok(())
        })
    }

    fn last_position(&self) -> Result<u64, StoreError> {
        self.with_reader(|conn| {
            let read = |e| self.classify("reading the log's length", e);
            let last: i64 = conn
                .client
                .query_one("SELECT coalesce(max(position), 0) FROM events", &[])
                .map_err(read)?
                .get(0);
            Ok(last.max(0).cast_unsigned())
        })
    }

    fn unfinished_jobs(&self) -> Result<Vec<Uuid>, StoreError> {
        self.with_reader(|conn| {
            let rows = conn
                .client
                .query(
                    "SELECT s.job_id FROM events s
                     CROSS JOIN LATERAL (SELECT e.kind FROM events e WHERE e.job_no = s.job_no
                                         ORDER BY e.seq DESC LIMIT 1) last
                     WHERE s.seq = 1
                       AND last.kind NOT IN ('JobCompleted', 'JobHalted', 'JobCancelled')
                     ORDER BY s.job_no",
                    &[],
                )
                .map_err(|e| self.classify("listing unfinished jobs", e))?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
    }

    fn job_ids(&self) -> Result<Vec<Uuid>, StoreError> {
        self.with_reader(|conn| {
            let rows = conn
                .client
                .query(
                    "SELECT job_id FROM events WHERE seq = 1 ORDER BY job_no",
                    &[],
                )
                .map_err(|e| self.classify("listing jobs", e))?;
            Ok(rows.iter().map(|row| row.get(0)).collect())
        })
    }
}

/// The queue's rows, in the writer's transactions: a claim locks the row
/// it takes and skips the ones other workers hold (`FOR UPDATE SKIP
/// LOCKED`), and lease times are the server's clock.
impl JobQueue for PgStore {
    fn submit(&self, job: &QueuedJob) -> Result<(), StoreError> {
        let text =
            serde_json::to_string(job).map_err(|e| StoreError::InvalidAppend(e.to_string()))?;
        let stored = self.queue_write("submitting a job", |tx| {
            let stored: i64 = tx
                .query_one(
                    "SELECT count(*) FROM events WHERE job_id = $1 AND seq = 1",
                    &[&job.job_id],
                )?
                .get(0);
            if stored > 0 {
                return Ok(Some(stored));
            }
            let inserted = tx.execute(
                "INSERT INTO jobs (job_id, job, state) VALUES ($1, $2, 'submitted')
                 ON CONFLICT (job_id) DO NOTHING",
                &[&job.job_id, &text],
            )?;
            Ok((inserted == 0).then_some(0))
        })?;
        match stored {
            None => Ok(()),
            Some(found) => Err(StoreError::Conflict {
                job_id: job.job_id,
                expected: 0,
                found: found.cast_unsigned(),
            }),
        }
    }

    fn claim(&self, owner: &str, lease: Duration) -> Result<Option<Claim>, StoreError> {
        let seconds = queue::seconds(lease);
        let row = self.queue_write("claiming a job", |tx| {
            let picked = tx.query_opt(
                "SELECT job_id, job, owner, epoch FROM jobs
                 WHERE state = 'submitted'
                    OR (state = 'running' AND lease_until <= clock_timestamp())
                 ORDER BY state = 'running', submitted_no
                 LIMIT 1 FOR UPDATE SKIP LOCKED",
                &[],
            )?;
            if let Some(row) = &picked {
                let job_id: Uuid = row.get(0);
                tx.execute(
                    "UPDATE jobs SET state = 'running', owner = $2, epoch = epoch + 1,
                         lease_until = clock_timestamp() + make_interval(secs => $3)
                     WHERE job_id = $1",
                    &[&job_id, &owner, &seconds],
                )?;
            }
            Ok(picked)
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (job_id, text, previous_owner, epoch): (Uuid, String, Option<String>, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        queue::claim_from_row(&job_id.to_string(), &text, previous_owner, epoch).map(Some)
    }

    fn renew(
        &self,
        owner: &str,
        fences: &[Fence],
        lease: Duration,
    ) -> Result<Vec<Fence>, StoreError> {
        if fences.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = fences.iter().map(|f| f.job_id).collect();
        let epochs: Vec<i64> = fences
            .iter()
            .map(|f| i64::try_from(f.epoch).unwrap_or(i64::MAX))
            .collect();
        let seconds = queue::seconds(lease);
        let rows = self.queue_write("renewing leases", |tx| {
            tx.query(
                "UPDATE jobs SET lease_until = clock_timestamp() + make_interval(secs => $4)
                 FROM unnest($1::uuid[], $2::bigint[]) AS f(job_id, epoch)
                 WHERE jobs.job_id = f.job_id AND jobs.epoch = f.epoch
                   AND jobs.owner = $3 AND jobs.state = 'running'
                 RETURNING jobs.job_id, jobs.epoch",
                &[&ids, &epochs, &owner, &seconds],
            )
        })?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let epoch = u64::try_from(row.get::<_, i64>(1)).ok()?;
                Some(Fence {
                    job_id: row.get(0),
                    epoch,
                })
            })
            .collect())
    }

    fn release(&self, fence: Fence, finished: bool) -> Result<(), StoreError> {
        let epoch = i64::try_from(fence.epoch).unwrap_or(i64::MAX);
        self.queue_write("releasing a job", |tx| {
            tx.execute(
                "UPDATE jobs SET state = CASE WHEN $3 THEN 'finished' ELSE 'submitted' END,
                     owner = NULL, lease_until = NULL
                 WHERE job_id = $1 AND epoch = $2 AND state = 'running'",
                &[&fence.job_id, &epoch, &finished],
            )
        })?;
        Ok(())
    }

    fn queued_job(&self, job_id: Uuid) -> Result<Option<(QueuedJob, QueueState)>, StoreError> {
        let row = self.with_reader(|conn| {
            conn.client
                .query_opt("SELECT job, state FROM jobs WHERE job_id = $1", &[&job_id])
                .map_err(|e| self.classify("reading the job queue", e))
        })?;
        let Some(row) = row else {
            return Ok(None);
        };
        let (text, state): (String, String) = (row.get(0), row.get(1));
        queue::queued_from_row(&job_id.to_string(), &text, &state).map(Some)
    }

    fn queued(&self) -> Result<Vec<QueueEntry>, StoreError> {
        self.with_reader(|conn| {
            let rows = conn
                .client
                .query(
                    "SELECT job_id, state, owner, epoch,
                            coalesce(lease_until <= clock_timestamp(), false),
                            to_char(submitted_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                            coalesce(json_array_length(job::json -> 'steps'), 0)
                     FROM jobs WHERE state <> 'finished' ORDER BY submitted_no",
                    &[],
                )
                .map_err(|e| self.classify("listing the job queue", e))?;
            rows.iter()
                .map(|row| {
                    let job_id: Uuid = row.get(0);
                    let state: String = row.get(1);
                    let epoch: i64 = row.get(3);
                    let bad = |detail: String| bad_row(job_id.to_string(), 0, detail);
                    Ok(QueueEntry {
                        job_id,
                        state: QueueState::parse(&state).ok_or_else(|| bad(format!("state {state:?}")))?,
                        owner: row.get(2),
                        epoch: u64::try_from(epoch).map_err(|_| bad(format!("epoch {epoch}")))?,
                        lease_expired: row.get(4),
                        submitted_at: row.get(5),
                        steps: usize::try_from(row.get::<_, i32>(6)).unwrap_or(0),
                    })
                })
                .collect()
        })
    }
}
