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
//! This module holds PostgreSQL's dialect, its connections and the mapping
//! of its errors; batching, the reader pool and conflict classification
//! are the shared `sql` core's (`write` writes a batch in one statement
//! first).
//!
//! Connections: `postgres://…`, `postgresql://…` or libpq `key=value`
//! strings; choose the schema with `options=-csearch_path=NAME`. The client
//! is synchronous (the engine owns its threads); an async embedder calls it
//! from `spawn_blocking`.

mod queue;
mod write;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Row, Statement};
use uuid::Uuid;

use super::group::{GroupCommit, Hook};
use super::sql::{self, EVENT_COLUMNS, Pooled, Readers, not_terminal};
use super::{AppendOptions, DatabaseError, EventStore, StoreError, Target, check_batch};
use crate::events::EventRecord;

/// The schema migrations, in order; migration `i` brings the schema to
/// version `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("../../../schema/postgres/0001_events.sql"),
    include_str!("../../../schema/postgres/0002_job_queue.sql"),
    include_str!("../../../schema/postgres/0003_job_starts.sql"),
    include_str!("../../../schema/postgres/0004_statement_checks.sql"),
    include_str!("../../../schema/postgres/0007_job_claimed.sql"),
];

/// The schema version this build writes.
pub const PG_SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// A job's number, by its first event.
const JOB_NO: &str = "(SELECT job_no FROM events WHERE job_id = $1 AND seq = 1)";

/// A job's last stored seq, 0 for none.
static LAST_SEQ: LazyLock<String> =
    LazyLock::new(|| format!("SELECT coalesce(max(seq), 0) FROM events WHERE job_no = {JOB_NO}"));

/// A job's events in seq order.
static JOB_EVENTS: LazyLock<String> = LazyLock::new(|| {
    format!("SELECT {EVENT_COLUMNS} FROM events WHERE job_no = {JOB_NO} ORDER BY seq")
});

/// Ids of jobs whose last event does not end them, in start order.
static UNFINISHED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT s.job_id FROM events s
         CROSS JOIN LATERAL (SELECT e.kind FROM events e WHERE e.job_no = s.job_no
                             ORDER BY e.seq DESC LIMIT 1) last
         WHERE s.seq = 1 AND {}
         ORDER BY s.job_no",
        not_terminal("last.kind")
    )
});

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
    readers: Readers<Conn>,
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
            target: Target::Server("postgres".into()),
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
            readers: Readers::new(),
            group: GroupCommit::default(),
        };
        let mut conn = store.connect()?;
        store.prepare_schema(&mut conn, options)?;
        *sql::lock(&store.writer) = Some(conn);
        Ok(store)
    }

    /// The database as given, without its password.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The server, as errors name it.
    fn server(&self) -> Target {
        Target::Server(self.target.clone())
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
            // writer's statements are short and always the same: a plan
            // made anew for each one's parameters would cost more than
            // running it, and JIT would compile the batch statement (its
            // estimates are large: `log_head` is never analysed) at every
            // execution.
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
            target: self.server(),
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
        if !ours && has_events {
            return Err(StoreError::NotOurs {
                target: self.server(),
                reason: format!(
                    "schema {schema:?} has an events table, but no job_executor_schema"
                ),
            });
        }
        if !ours && (options.read_only || !options.create) {
            return Err(StoreError::NotFound {
                target: self.server(),
            });
        }
        let version: i32 = if ours {
            tx.query_one("SELECT version FROM job_executor_schema", &[])
                .map_err(write)?
                .get(0)
        } else {
            0
        };
        let version = u32::try_from(version).map_err(|_| StoreError::Corrupt {
            target: self.server(),
            detail: format!("schema version {version}"),
        })?;
        if version > PG_SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                target: self.server(),
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
        let mut writer = sql::lock(&self.writer);
        if writer.as_ref().is_none_or(|conn| conn.client.is_closed()) {
            *writer = Some(self.connect()?);
        }
        Ok(writer)
    }

    /// Runs `read` on a reading connection of its own: no lock of the
    /// store's is held while it runs.
    fn with_reader<T>(
        &self,
        read: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.readers.with(|| self.connect(), read)
    }

    fn lost(&self, detail: &str) -> StoreError {
        StoreError::Unavailable {
            target: self.server(),
            detail: detail.to_owned(),
        }
    }

    /// Maps a server error to the store error a user can act on.
    fn classify(&self, context: &'static str, error: postgres::Error) -> StoreError {
        let (target, detail) = (self.server(), error_text(&error));
        let Some(code) = error.code() else {
            // No answer from the server: the connection failed.
            return StoreError::Unavailable { target, detail };
        };
        match code.code() {
            "25006" | "42501" => StoreError::ReadOnly { target, detail },
            "53100" => StoreError::Full { target, detail },
            "40001" | "40P01" | "55P03" | "57014" => StoreError::Busy { target, detail },
            "57P01" | "57P02" | "57P03" | "53300" => StoreError::Unavailable { target, detail },
            "XX001" | "XX002" => StoreError::Corrupt { target, detail },
            other => StoreError::Database {
                context,
                source: DatabaseError {
                    code: Some(other.to_owned()),
                    message: detail,
                },
            },
        }
    }

    /// One job's rows, in seq order, to `visit`.
    fn read_job(
        &self,
        conn: &mut Conn,
        job_id: Uuid,
        visit: &mut dyn FnMut(&EventRecord) -> bool,
    ) -> Result<(), StoreError> {
        let read = |e| self.classify("reading a job's events", e);
        let statement = conn.prepared(&JOB_EVENTS).map_err(read)?;
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

impl Pooled for Conn {
    fn usable(&self) -> bool {
        !self.client.is_closed()
    }
}

/// Refills `record` from a row of [`EVENT_COLUMNS`], checking every number.
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
    sql::refill(&mut record.kind, text(3)?);
    sql::refill(&mut record.recorded_at, text(5)?);
    sql::refill(&mut record.payload, text(6)?);
    let optional = |i: usize| {
        row.try_get::<_, Option<&str>>(i)
            .map_err(|e| bad(e.to_string()))
    };
    sql::refill_optional(&mut record.digest, optional(7)?);
    sql::refill_optional(&mut record.mac, optional(8)?);
    Ok(())
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

impl EventStore for PgStore {
    fn append_with(
        &self,
        records: &[EventRecord],
        options: AppendOptions,
    ) -> Result<Vec<u64>, StoreError> {
        check_batch(records)?;
        if self.read_only {
            return Err(StoreError::ReadOnly {
                target: self.server(),
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
            let statement = conn.prepared(&LAST_SEQ).map_err(read)?;
            let last: i64 = conn
                .client
                .query_one(&statement, &[&job_id])
                .map_err(read)?
                .get(0);
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
                    &format!("SELECT {EVENT_COLUMNS}, job_no FROM events ORDER BY job_no, seq"),
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
                .query(UNFINISHED.as_str(), &[])
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
