//! The SQLite event log: the default for files.
//!
//! The schema lives in `schema/*.sql`, applied in order on open and tracked
//! by `PRAGMA user_version`; `PRAGMA application_id` marks the file as ours,
//! so a database of another program is refused before anything is written
//! to it (`schema`). Append-only, seq contiguity and "closed after the end"
//! are enforced by the schema's triggers, whatever program writes to the
//! file. This module holds SQLite's dialect, its connections and the
//! mapping of its errors; batching, the reader pool and conflict
//! classification are the shared `sql` core's.

mod queue;
mod schema;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, params};
use uuid::Uuid;

pub use self::schema::{APPLICATION_ID, DB_SCHEMA_VERSION};
use self::schema::{Layout, check_header, configure, read_header};
use super::group::{AppendResult, Batched, GroupCommit, Hook};
use super::sql::{self, BatchWriter, Pooled, Readers};
use super::{AppendOptions, DatabaseError, EventStore, StoreError, Target, check_batch};
use crate::events::EventRecord;

/// How hard each commit waits for the disk (`PRAGMA synchronous`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Synchronous {
    /// Every commit is durable when `append` returns (fsync per commit). Default.
    #[default]
    Full,
    /// In WAL mode, a commit survives a crash of the process but the last
    /// commits may be lost on power failure; much faster.
    Normal,
}

/// How to open a SQLite event log.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SqliteOptions {
    /// Durability of each commit.
    pub synchronous: Synchronous,
    /// How long a write waits for another writer's lock before failing.
    pub busy_timeout: Duration,
    /// Create the file when it does not exist.
    pub create: bool,
    /// Open for reading only: nothing is ever written, not even the schema,
    /// and a missing file is not created.
    pub read_only: bool,
    /// Caps the database at this many pages (`PRAGMA max_page_count`);
    /// appends past it fail with [`StoreError::Full`]. `None`: SQLite's limit.
    pub max_pages: Option<u64>,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            create: true,
            read_only: false,
            max_pages: None,
        }
    }
}

impl SqliteOptions {
    /// Options for reading an existing log: nothing is ever written, and a
    /// missing file is [`StoreError::NotFound`].
    pub fn reader() -> Self {
        SqliteOptions {
            create: false,
            read_only: true,
            ..SqliteOptions::default()
        }
    }

    /// Options for appending to an existing log, never creating one.
    pub fn existing() -> Self {
        SqliteOptions {
            create: false,
            ..SqliteOptions::default()
        }
    }

    /// With this durability.
    pub fn with_synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// With this busy timeout.
    pub fn with_busy_timeout(mut self, busy_timeout: Duration) -> Self {
        self.busy_timeout = busy_timeout;
        self
    }

    /// With the database capped at `pages` pages.
    pub fn with_max_pages(mut self, pages: u64) -> Self {
        self.max_pages = Some(pages);
        self
    }
}

/// An event log in a SQLite database.
///
/// Appends go through one writing connection (many threads' appends share
/// its commits); reads use connections of their own, so a long scan in one
/// thread never holds up appends in another, and code handed rows by a scan
/// or a visit runs under no lock of the store's (it may call the store).
///
/// Any number of processes and threads may open, create and migrate the
/// same file at once: each schema step is applied inside a `BEGIN IMMEDIATE`
/// transaction that first re-reads the schema version, so a step a peer
/// already applied is skipped.
///
/// ```
/// use job_executor::store::{SqliteStore, EventStore};
/// let dir = tempfile::tempdir().unwrap();
/// let store = SqliteStore::open(dir.path().join("log.db")).unwrap();
/// assert!(store.job_ids().unwrap().is_empty());
/// ```
#[derive(Debug)]
pub struct SqliteStore {
    path: PathBuf,
    conn: Mutex<Connection>,
    /// Idle reading connections, reused; `None` for an in-memory database,
    /// which only its own connection can see.
    readers: Option<Readers<Connection>>,
    busy_timeout: Duration,
    layout: Layout,
    group: GroupCommit,
}

impl SqliteStore {
    /// Opens (creating when absent) the log at `path` with default options:
    /// WAL, `synchronous=FULL`, 5 s busy timeout.
    ///
    /// # Errors
    /// [`StoreError::NotOurs`] for a file that is not a job-executor database
    /// (left byte-for-byte untouched), [`StoreError::SchemaTooNew`],
    /// [`StoreError::Corrupt`], or the I/O or SQLite failure.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        SqliteStore::open_with(path, &SqliteOptions::default())
    }

    /// Opens the log at `path` with `options`.
    ///
    /// # Errors
    /// As [`SqliteStore::open`], plus [`StoreError::NotFound`] when the file is
    /// absent (or removed while being opened) and `options.create` is false
    /// or `options.read_only` is true.
    pub fn open_with(path: impl AsRef<Path>, options: &SqliteOptions) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let create = options.create && !options.read_only;
        if !check_header(&path)? && !create {
            return Err(StoreError::NotFound {
                target: Target::File(path),
            });
        }
        let conn = open_connection(&path, create, options.read_only, options.busy_timeout)?;
        // A file of another program is refused before anything is written to
        // it (even the journal mode); a peer creating the file reads as empty.
        let version = read_header(&path, &conn)?;
        let layout = if options.read_only {
            if version == 0 {
                // An empty file: there is no log to read yet.
                return Err(StoreError::NotFound {
                    target: Target::File(path),
                });
            }
            // Readers read what is there, whatever its schema.
            Layout::for_version(version)
        } else {
            configure(&path, &conn, options.synchronous, options.busy_timeout)?;
            Layout::clustered()
        };
        if let Some(pages) = options.max_pages {
            conn.pragma_update(None, "max_page_count", pages.min(i64::MAX as u64) as i64)
                .map_err(|e| classify(&path, "setting the page limit", e))?;
        }
        let mut store = SqliteStore {
            path,
            conn: Mutex::new(conn),
            readers: Some(Readers::new()),
            busy_timeout: options.busy_timeout,
            layout,
            group: GroupCommit::default(),
        };
        if !options.read_only {
            store.migrate()?;
        }
        Ok(store)
    }

    /// A log in a private in-memory SQLite database, with the full schema.
    /// For tests and short-lived embeddings. Its reads share the one
    /// connection an in-memory database has (a scan reads its rows before it
    /// hands them over, so that no lock is held meanwhile).
    ///
    /// # Errors
    /// The SQLite failure, if the schema cannot be applied.
    pub fn open_in_memory() -> Result<Self, StoreError> {
        let path = PathBuf::from(":memory:");
        let conn = Connection::open_in_memory()
            .map_err(|e| classify(&path, "opening an in-memory database", e))?;
        let mut store = SqliteStore {
            path,
            conn: Mutex::new(conn),
            readers: None,
            busy_timeout: SqliteOptions::default().busy_timeout,
            layout: Layout::clustered(),
            group: GroupCommit::default(),
        };
        store.migrate()?;
        Ok(store)
    }

    /// The path the store was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The durability this connection commits with, as SQLite reports it.
    ///
    /// # Errors
    /// The SQLite failure, or [`StoreError::Corrupt`] for a level this build
    /// never sets.
    pub fn synchronous(&self) -> Result<Synchronous, StoreError> {
        let level: i64 = self
            .lock()
            .pragma_query_value(None, "synchronous", |row| row.get(0))
            .map_err(|e| classify(&self.path, "reading synchronous", e))?;
        match level {
            2 => Ok(Synchronous::Full),
            1 => Ok(Synchronous::Normal),
            other => Err(StoreError::Corrupt {
                target: Target::File(self.path.clone()),
                detail: format!("unexpected synchronous level {other}"),
            }),
        }
    }

    /// Brings the schema to [`DB_SCHEMA_VERSION`] (see `schema::migrate`).
    fn migrate(&mut self) -> Result<(), StoreError> {
        let conn = self
            .conn
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        schema::migrate(&self.path, conn)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic cannot leave a half-done write: every write runs in a
        // transaction that is rolled back when the panic unwinds.
        sql::lock(&self.conn)
    }

    /// Runs `read` on a reading connection of its own, so that it holds no
    /// lock of the store's while it runs; in memory, on the writer's.
    fn with_reader<T>(
        &self,
        context: &'static str,
        read: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Some(readers) = &self.readers else {
            return read(&self.lock());
        };
        readers.with(
            || {
                open_connection(&self.path, false, true, self.busy_timeout)
                    .map_err(|e| reopen_error(e, context))
            },
            |conn| read(conn),
        )
    }

    /// Writes a batch of appends through the shared batch driver.
    fn commit_batch(&self, batch: &[Batched<'_>]) -> Vec<AppendResult> {
        let mut conn = self.lock();
        sql::commit_batch(
            &mut Writer {
                store: self,
                conn: &mut conn,
            },
            batch,
        )
    }
}

impl Pooled for Connection {}

/// The writing connection, as the batch driver uses it.
struct Writer<'a> {
    store: &'a SqliteStore,
    conn: &'a mut Connection,
}

impl Writer<'_> {
    fn run(&self, statement: &str) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(statement)
            .and_then(|mut stmt| stmt.execute([]))
            .map(|_| ())
    }

    fn failed(&self, context: &'static str, error: rusqlite::Error) -> StoreError {
        classify(&self.store.path, context, error)
    }
}

impl BatchWriter for Writer<'_> {
    type Error = rusqlite::Error;

    fn begin(&mut self) -> Result<(), StoreError> {
        // A transaction a panicked commit left open committed nothing, and
        // must not block every commit after it.
        self.rollback();
        // IMMEDIATE takes the write lock up front: no other process can
        // slip an event in between.
        self.run("BEGIN IMMEDIATE")
            .map_err(|e| self.failed("appending events", e))
    }

    fn epoch(&mut self, job_id: Uuid) -> Result<Option<i64>, StoreError> {
        self.conn
            .prepare_cached("SELECT epoch FROM jobs WHERE job_id = ?1")
            .and_then(|mut stmt| {
                stmt.query_row([job_id.to_string()], |row| row.get(0))
                    .optional()
            })
            .map_err(|e| self.failed("checking a job's fence", e))
    }

    fn write(&mut self, records: &[EventRecord]) -> rusqlite::Result<Vec<u64>> {
        insert_records(self.conn, records)
    }

    fn refuse(
        &mut self,
        records: &[EventRecord],
        ahead: Option<u64>,
        error: rusqlite::Error,
    ) -> StoreError {
        // Still in the transaction: the job's last seq read here includes
        // the batch's appends written before this one.
        let violation = error.sqlite_error_code() == Some(ErrorCode::ConstraintViolation);
        let stored = |job_id: Uuid| {
            self.conn
                .prepare_cached(self.store.layout.last_seq)
                .and_then(|mut stmt| stmt.query_row([job_id.to_string()], |row| row.get(0)))
                .ok()
                .map(|last: i64| last.max(0).cast_unsigned())
        };
        sql::insert_error(records, violation, stored, ahead, || {
            self.failed("appending events", error)
        })
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        self.run("COMMIT")
            .map_err(|e| self.failed("appending events", e))
    }

    fn rollback(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.run("ROLLBACK");
        }
    }
}

/// A failure to open a reading connection to a store already open: the
/// file was removed or replaced meanwhile.
fn reopen_error(error: StoreError, context: &'static str) -> StoreError {
    match error {
        StoreError::NotFound { target } => StoreError::Io {
            target,
            source: Arc::new(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("the database file was removed while {context}"),
            )),
        },
        other => other,
    }
}

/// Opens one connection. Without `create`, a missing file is
/// [`StoreError::NotFound`], even one removed since it was looked at: it is
/// never silently created again. Readers open read-write too (SQLite falls
/// back to read-only for a write-protected file) but with `query_only`: a
/// read-only connection to a WAL database would leave its -wal and -shm
/// files behind.
fn open_connection(
    path: &Path,
    create: bool,
    query_only: bool,
    busy_timeout: Duration,
) -> Result<Connection, StoreError> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags).map_err(|e| {
        if !create && e.sqlite_error_code() == Some(ErrorCode::CannotOpen) && !path.exists() {
            StoreError::NotFound {
                target: Target::File(path.to_path_buf()),
            }
        } else {
            classify(path, "opening the database", e)
        }
    })?;
    if query_only {
        conn.pragma_update(None, "query_only", true)
            .map_err(|e| classify(path, "opening the database for reading", e))?;
    }
    conn.busy_timeout(busy_timeout)
        .map_err(|e| classify(path, "setting the busy timeout", e))?;
    Ok(conn)
}

/// Maps a SQLite error to the store error a user can act on.
fn classify(path: &Path, context: &'static str, error: rusqlite::Error) -> StoreError {
    match error.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::NotOurs {
            target: Target::File(path.to_path_buf()),
            reason: "SQLite does not recognise it as a database".into(),
        },
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            target: Target::File(path.to_path_buf()),
            detail: error.to_string(),
        },
        Some(ErrorCode::ReadOnly) => StoreError::ReadOnly {
            target: Target::File(path.to_path_buf()),
            detail: error.to_string(),
        },
        Some(ErrorCode::DiskFull) => StoreError::Full {
            target: Target::File(path.to_path_buf()),
            detail: error.to_string(),
        },
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy {
            target: Target::File(path.to_path_buf()),
            detail: error.to_string(),
        },
        _ => StoreError::Database {
            context,
            source: DatabaseError {
                code: error.sqlite_error_code().map(|code| format!("{code:?}")),
                message: error.to_string(),
            },
        },
    }
}

/// The job ids a statement selects in its first column.
fn job_id_column(
    stmt: &mut rusqlite::CachedStatement<'_>,
    read: impl Fn(rusqlite::Error) -> StoreError,
) -> Result<Vec<Uuid>, StoreError> {
    let rows = stmt
        .query_map([], |row| row.get::<_, String>(0))
        .map_err(&read)?;
    let mut ids = Vec::new();
    for row in rows {
        let text = row.map_err(&read)?;
        ids.push(Uuid::parse_str(&text).map_err(|e| StoreError::BadRow {
            job_id: text.clone(),
            seq: 1,
            detail: format!("job id: {e}"),
        })?);
    }
    Ok(ids)
}

/// Inserts one job's consecutive records; the schema's triggers refuse a
/// seq that does not follow the job's last event.
fn insert_records(conn: &mut Connection, records: &[EventRecord]) -> rusqlite::Result<Vec<u64>> {
    let job_text = records[0].job_id.to_string();
    // A new job is numbered after every job before it; its later events
    // carry the number its JobStarted got.
    let mut insert = conn.prepare_cached(
        "INSERT INTO events (job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest, mac)
         VALUES (?1,
                 CASE WHEN ?2 = 1 THEN (SELECT coalesce(max(job_no), 0) + 1 FROM events)
                      ELSE (SELECT job_no FROM events WHERE job_id = ?1 AND seq = 1) END,
                 ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let mut positions = Vec::with_capacity(records.len());
    for record in records {
        insert.execute(params![
            job_text,
            record.seq as i64,
            record.kind,
            record.schema_version,
            record.recorded_at,
            record.payload,
            record.digest,
            record.mac,
        ])?;
        positions.push(conn.last_insert_rowid() as u64);
    }
    Ok(positions)
}

/// Refills `record` from a row, reusing its buffers.
fn read_row_into(
    row: &rusqlite::Row<'_>,
    record: &mut EventRecord,
) -> rusqlite::Result<Result<(), StoreError>> {
    fn text<'a>(row: &'a rusqlite::Row<'_>, i: usize) -> rusqlite::Result<&'a str> {
        row.get_ref(i)?.as_str().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
        })
    }
    let position: i64 = row.get(0)?;
    let job_id = text(row, 1)?;
    let seq: i64 = row.get(2)?;
    let schema_version: i64 = row.get(4)?;
    let bad = |detail: String| StoreError::BadRow {
        job_id: job_id.to_owned(),
        seq,
        detail,
    };
    let parsed = (|| {
        Ok((
            u64::try_from(position).map_err(|_| bad(format!("position {position}")))?,
            Uuid::parse_str(job_id).map_err(|e| bad(format!("job id: {e}")))?,
            u64::try_from(seq).map_err(|_| bad(format!("seq {seq}")))?,
            u32::try_from(schema_version)
                .map_err(|_| bad(format!("schema_version {schema_version}")))?,
        ))
    })();
    let (position, job_id, seq, schema_version) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => return Ok(Err(e)),
    };
    record.position = position;
    record.job_id = job_id;
    record.seq = seq;
    record.schema_version = schema_version;
    sql::refill(&mut record.kind, text(row, 3)?);
    sql::refill(&mut record.recorded_at, text(row, 5)?);
    sql::refill(&mut record.payload, text(row, 6)?);
    let digest = row.get_ref(7)?.as_str_or_null().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(7, rusqlite::types::Type::Text, Box::new(e))
    })?;
    sql::refill_optional(&mut record.digest, digest);
    let mac = row.get_ref(8)?.as_str_or_null().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(8, rusqlite::types::Type::Text, Box::new(e))
    })?;
    sql::refill_optional(&mut record.mac, mac);
    Ok(Ok(()))
}

impl EventStore for SqliteStore {
    fn append_with(
        &self,
        records: &[EventRecord],
        options: AppendOptions,
    ) -> Result<Vec<u64>, StoreError> {
        check_batch(records)?;
        self.group.append(
            records,
            options.fence,
            options.committed.map(Hook),
            |batch| self.commit_batch(batch),
        )
    }

    fn last_seq(&self, job_id: Uuid) -> Result<u64, StoreError> {
        self.with_reader("reading a job's last seq", |conn| {
            let last: i64 = conn
                .prepare_cached(self.layout.last_seq)
                .and_then(|mut stmt| stmt.query_row([job_id.to_string()], |row| row.get(0)))
                .map_err(|e| classify(&self.path, "reading a job's last seq", e))?;
            Ok(last.max(0) as u64)
        })
    }

    fn visit_job(
        &self,
        job_id: Uuid,
        visit: &mut dyn FnMut(&EventRecord) -> bool,
    ) -> Result<(), StoreError> {
        const CONTEXT: &str = "reading a job's events";
        if self.readers.is_some() {
            return self.with_reader(CONTEXT, |conn| self.read_job(conn, job_id, visit));
        }
        // In memory, the only connection is the writer's: read first, then
        // hand the rows over with its lock released.
        let mut held = Vec::new();
        self.read_job(&self.lock(), job_id, &mut |record| {
            held.push(record.clone());
            true
        })?;
        for record in &held {
            if !visit(record) {
                break;
            }
        }
        Ok(())
    }

    fn job_ids(&self) -> Result<Vec<Uuid>, StoreError> {
        self.with_reader("listing jobs", |conn| {
            let read = |e| classify(&self.path, "listing jobs", e);
            let mut stmt = conn.prepare_cached(self.layout.job_ids).map_err(read)?;
            job_id_column(&mut stmt, read)
        })
    }

    fn scan(
        &self,
        visit: &mut dyn FnMut(u64, Result<&EventRecord, StoreError>),
    ) -> Result<(), StoreError> {
        if self.readers.is_some() {
            return self.with_reader("scanning the log", |conn| self.read_all(conn, visit));
        }
        // In memory: as in `visit_job`, no lock is held while `visit` runs.
        let mut held: Vec<(u64, Result<EventRecord, StoreError>)> = Vec::new();
        self.read_all(&self.lock(), &mut |group, row| {
            held.push((group, row.cloned()));
        })?;
        for (group, row) in &held {
            visit(*group, row.as_ref().map_err(Clone::clone));
        }
        Ok(())
    }

    fn unfinished_jobs(&self) -> Result<Vec<Uuid>, StoreError> {
        self.with_reader("listing unfinished jobs", |conn| {
            let read = |e| classify(&self.path, "listing unfinished jobs", e);
            let mut stmt = conn.prepare_cached(&self.layout.unfinished).map_err(read)?;
            job_id_column(&mut stmt, read)
        })
    }

    fn last_position(&self) -> Result<u64, StoreError> {
        self.with_reader("reading the log's length", |conn| {
            let last: i64 = conn
                .query_row("SELECT coalesce(max(position), 0) FROM events", [], |row| {
                    row.get(0)
                })
                .map_err(|e| classify(&self.path, "reading the log's length", e))?;
            Ok(last.max(0) as u64)
        })
    }
}

impl SqliteStore {
    /// Hands one job's rows, read on `conn`, to `visit` in seq order.
    fn read_job(
        &self,
        conn: &Connection,
        job_id: Uuid,
        visit: &mut dyn FnMut(&EventRecord) -> bool,
    ) -> Result<(), StoreError> {
        let read = |e| classify(&self.path, "reading a job's events", e);
        let mut stmt = conn.prepare_cached(&self.layout.job_events).map_err(read)?;
        let mut rows = stmt.query([job_id.to_string()]).map_err(read)?;
        // One record, refilled row after row: no allocation per event.
        let mut record = EventRecord::default();
        while let Some(row) = rows.next().map_err(read)? {
            read_row_into(row, &mut record).map_err(read)??;
            if !visit(&record) {
                break;
            }
        }
        Ok(())
    }

    /// Hands every row, read on `conn`, to `visit` with its job's group.
    fn read_all(
        &self,
        conn: &Connection,
        visit: &mut dyn FnMut(u64, Result<&EventRecord, StoreError>),
    ) -> Result<(), StoreError> {
        let read = |e| classify(&self.path, "scanning the log", e);
        let mut stmt = conn.prepare_cached(&self.layout.scan).map_err(read)?;
        let mut rows = stmt.query([]).map_err(read)?;
        // One record, refilled row after row: memory stays flat.
        let mut record = EventRecord::default();
        // Without job numbers (older schemas), a job is a run of one job id.
        let (mut group, mut last_job) = (0u64, None::<Uuid>);
        while let Some(row) = rows.next().map_err(read)? {
            let job_no: Option<i64> = row.get(9).map_err(read)?;
            match read_row_into(row, &mut record).map_err(read)? {
                Ok(()) => {
                    group = match job_no {
                        Some(job_no) => job_no.cast_unsigned(),
                        None if last_job == Some(record.job_id) => group,
                        None => group.saturating_add(1),
                    };
                    last_job = Some(record.job_id);
                    visit(group, Ok(&record));
                }
                Err(e) => visit(job_no.map_or(u64::MAX, i64::cast_unsigned), Err(e)),
            }
        }
        Ok(())
    }
}
