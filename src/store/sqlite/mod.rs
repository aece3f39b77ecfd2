//! The SQLite event log: the default for files.
//!
//! The schema lives in `schema/*.sql`, applied in order on open and tracked
//! by `PRAGMA user_version`; `PRAGMA application_id` marks the file as ours,
//! so a database of another program is refused before anything is written
//! to it. Append-only, seq contiguity and "closed after the end" are enforced
//! by the schema's triggers, whatever program writes to the file.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};
use uuid::Uuid;

use super::group::{Batched, GroupCommit, Hook};
use super::queue;
use super::{
    AppendOptions, Claim, DatabaseError, EventStore, Fence, JobQueue, QueueEntry, QueueState,
    QueuedJob, StoreError, check_batch,
};
use crate::chain::{self, Digest};
use crate::events::EventRecord;

/// `PRAGMA application_id` of a job-executor database ("JEXE").
pub const APPLICATION_ID: i32 = 0x4A45_5845;

/// One schema step: its SQL, and what must follow it that SQL cannot do.
struct Migration {
    sql: &'static str,
    then: Option<fn(&rusqlite::Transaction<'_>) -> rusqlite::Result<()>>,
}

/// The schema migrations, in order; migration `i` brings the schema to version `i + 1`.
const MIGRATIONS: &[Migration] = &[
    Migration {
        sql: include_str!("../../../schema/0001_events.sql"),
        then: None,
    },
    Migration {
        sql: include_str!("../../../schema/0002_hash_chain.sql"),
        then: Some(seal_unsealed_events),
    },
    Migration {
        sql: include_str!("../../../schema/0003_cancel_and_resume.sql"),
        then: None,
    },
    Migration {
        sql: include_str!("../../../schema/0004_one_lookup_per_append.sql"),
        then: None,
    },
    Migration {
        sql: include_str!("../../../schema/0005_cluster_jobs.sql"),
        then: None,
    },
    Migration {
        sql: include_str!("../../../schema/0006_one_insert_trigger.sql"),
        then: None,
    },
    Migration {
        sql: include_str!("../../../schema/0007_job_queue.sql"),
        then: None,
    },
    Migration {
        sql: include_str!("../../../schema/0008_cheaper_digest_check.sql"),
        then: None,
    },
];

/// Columns of an event row, in the order `read_row_into` expects.
const COLUMNS: &str =
    "position, job_id, seq, kind, schema_version, recorded_at, payload, digest, mac";
/// The same for a version-1 database opened for reading (no chain columns yet).
const COLUMNS_V1: &str =
    "position, job_id, seq, kind, schema_version, recorded_at, payload, NULL, NULL";

/// Where a job's rows are, which depends on the schema version: read-only
/// opens read older databases as they are.
#[derive(Debug)]
struct Layout {
    /// A job's highest seq, 0 for none; `?1` is the job id.
    last_seq: &'static str,
    /// A job's events in seq order; `?1` is the job id.
    job_events: String,
    /// Job ids in start order.
    job_ids: &'static str,
    /// Ids of jobs whose last event does not end them, in start order.
    unfinished: &'static str,
    /// Every event, each job's together, with the job's group number last.
    scan: String,
}

impl Layout {
    /// Schema 5 on: rows keyed by (job_no, seq), jobs found by their first event.
    fn clustered() -> Self {
        const JOB: &str = "(SELECT job_no FROM events WHERE job_id = ?1 AND seq = 1)";
        Layout {
            last_seq: "SELECT coalesce(max(seq), 0) FROM events WHERE job_no = \
                       (SELECT job_no FROM events WHERE job_id = ?1 AND seq = 1)",
            job_events: format!("SELECT {COLUMNS} FROM events WHERE job_no = {JOB} ORDER BY seq"),
            job_ids: "SELECT job_id FROM events WHERE seq = 1 ORDER BY job_no",
            unfinished: "SELECT s.job_id FROM events s
                 JOIN (SELECT job_no, max(seq) AS last FROM events GROUP BY job_no) j
                   ON j.job_no = s.job_no
                 JOIN events e ON e.job_no = j.job_no AND e.seq = j.last
                 WHERE s.seq = 1
                   AND e.kind NOT IN ('JobCompleted', 'JobHalted', 'JobCancelled')
                 ORDER BY s.job_no",
            scan: format!("SELECT {COLUMNS}, job_no FROM events ORDER BY job_no, seq"),
        }
    }

    /// Schemas 1 to 4, read as they are: rows keyed by (job_id, seq).
    fn by_job_id(columns: &str) -> Self {
        Layout {
            last_seq: "SELECT coalesce(max(seq), 0) FROM events WHERE job_id = ?1",
            job_events: format!("SELECT {columns} FROM events WHERE job_id = ?1 ORDER BY seq"),
            job_ids: "SELECT job_id FROM events WHERE seq = 1 ORDER BY position",
            unfinished: "SELECT s.job_id FROM events s
                 JOIN (SELECT job_id, max(seq) AS last FROM events GROUP BY job_id) j
                   ON j.job_id = s.job_id
                 JOIN events e ON e.job_id = j.job_id AND e.seq = j.last
                 WHERE s.seq = 1
                   AND e.kind NOT IN ('JobCompleted', 'JobHalted', 'JobCancelled')
                 ORDER BY s.position",
            scan: format!("SELECT {columns}, NULL FROM events ORDER BY job_id, seq"),
        }
    }

    fn for_version(version: u32) -> Self {
        match version {
            0 | 5.. => Layout::clustered(),
            1 => Layout::by_job_id(COLUMNS_V1),
            _ => Layout::by_job_id(COLUMNS),
        }
    }
}

/// The schema version this build writes.
pub const DB_SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

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
    readers: Option<Mutex<Vec<Connection>>>,
    busy_timeout: Duration,
    layout: Layout,
    group: GroupCommit,
}

/// Reading connections kept open for reuse; more are opened when needed and
/// closed when given back past this.
const IDLE_READERS_MAX: usize = 4;

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
            return Err(StoreError::NotFound { path });
        }
        let conn = open_connection(&path, create, options.read_only, options.busy_timeout)?;
        // A file of another program is refused before anything is written to
        // it (even the journal mode); a peer creating the file reads as empty.
        let version = read_header(&path, &conn)?;
        let layout = if options.read_only {
            if version == 0 {
                // An empty file: there is no log to read yet.
                return Err(StoreError::NotFound { path });
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
            readers: Some(Mutex::new(Vec::new())),
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
                path: self.path.clone(),
                detail: format!("unexpected synchronous level {other}"),
            }),
        }
    }

    /// Writes every append of `batch` in one transaction and returns one
    /// result per append. An append that fails (a conflict) fails alone:
    /// the transaction is rolled back and written again without it, which
    /// keeps the common case — nothing fails — free of per-append savepoints.
    /// A failed commit fails them all.
    fn commit_batch(&self, batch: &[Batched<'_>]) -> Vec<Result<Vec<u64>, StoreError>> {
        let mut conn = self.lock();
        let write = |e| classify(&self.path, "appending events", e);
        let run = |conn: &Connection, sql: &str| {
            conn.prepare_cached(sql)
                .and_then(|mut stmt| stmt.execute([]))
                .map(|_| ())
        };
        let mut results: Vec<Option<Result<Vec<u64>, StoreError>>> =
            batch.iter().map(|_| None).collect();
        // A commit that panicked mid-way left its transaction open (and the
        // lock poisoned): nothing of it was committed, and it must not
        // block every commit after it.
        if !conn.is_autocommit() {
            let _ = run(&conn, "ROLLBACK");
        }
        'attempt: loop {
            // IMMEDIATE takes the write lock up front: no other process can
            // slip an event in between.
            if let Err(e) = run(&conn, "BEGIN IMMEDIATE") {
                let error = write(e);
                return fill(results, &error);
            }
            let mut written = Vec::with_capacity(batch.len());
            for (index, append) in batch.iter().enumerate() {
                if results[index].is_some() {
                    continue;
                }
                match self.write_append(&mut conn, append) {
                    Ok(positions) => written.push((index, positions)),
                    Err(error) => {
                        let _ = run(&conn, "ROLLBACK");
                        results[index] = Some(Err(error));
                        continue 'attempt;
                    }
                }
            }
            if written.is_empty() {
                let _ = run(&conn, "ROLLBACK");
                break;
            }
            if let Err(e) = run(&conn, "COMMIT") {
                let error = write(e);
                let _ = run(&conn, "ROLLBACK");
                return fill(results, &error);
            }
            for (index, positions) in written {
                results[index] = Some(Ok(positions));
            }
            break;
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(StoreError::InvalidAppend("not written".into()))))
            .collect()
    }

    /// Writes one append inside the open transaction: its fence checked
    /// first, then its rows.
    fn write_append(
        &self,
        conn: &mut Connection,
        append: &Batched<'_>,
    ) -> Result<Vec<u64>, StoreError> {
        if let Some(fence) = append.fence {
            let epoch: Option<i64> = conn
                .prepare_cached("SELECT epoch FROM jobs WHERE job_id = ?1")
                .and_then(|mut stmt| {
                    stmt.query_row([fence.job_id.to_string()], |row| row.get(0))
                        .optional()
                })
                .map_err(|e| classify(&self.path, "checking a job's fence", e))?;
            let found = epoch.and_then(|e| u64::try_from(e).ok());
            if found != Some(fence.epoch) {
                return Err(StoreError::Fenced {
                    job_id: fence.job_id,
                    epoch: fence.epoch,
                    found,
                });
            }
        }
        insert_records(conn, append.records).map_err(|e| self.insert_error(conn, append.records, e))
    }

    /// Tells an optimistic-concurrency conflict from any other failed insert.
    fn insert_error(
        &self,
        conn: &Connection,
        records: &[EventRecord],
        error: rusqlite::Error,
    ) -> StoreError {
        let first = &records[0];
        if error.sqlite_error_code() == Some(ErrorCode::ConstraintViolation) {
            let last: rusqlite::Result<i64> = conn
                .prepare_cached(self.layout.last_seq)
                .and_then(|mut stmt| stmt.query_row([first.job_id.to_string()], |row| row.get(0)));
            if let Ok(last) = last {
                let last = last.max(0) as u64;
                if last.checked_add(1) != Some(first.seq) {
                    return StoreError::Conflict {
                        job_id: first.job_id,
                        expected: first.seq,
                        found: last,
                    };
                }
            }
        }
        classify(&self.path, "appending events", error)
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic cannot leave a half-done write: every write runs in a
        // transaction that rolls back when dropped.
        self.conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Brings the schema to [`DB_SCHEMA_VERSION`], one step per
    /// transaction. Each step takes the write lock (`BEGIN IMMEDIATE`) and
    /// only then reads the version and checks the file is ours, so peers
    /// migrating the same file at the same moment never apply a step twice
    /// and never see one half-applied.
    fn migrate(&mut self) -> Result<(), StoreError> {
        let path = self.path.clone();
        let conn = self
            .conn
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        loop {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| classify(&path, "starting a schema migration", e))?;
            let version = check_ours(&path, &tx)?;
            let Some(migration) = MIGRATIONS.get(version as usize) else {
                // Up to date (a peer may have done the work): nothing written.
                return tx
                    .commit()
                    .map_err(|e| classify(&path, "reading the schema version", e));
            };
            tx.execute_batch(migration.sql)
                .map_err(|e| classify(&path, "applying a schema migration", e))?;
            if let Some(then) = migration.then {
                then(&tx).map_err(|e| classify(&path, "completing a schema migration", e))?;
            }
            tx.pragma_update(None, "application_id", APPLICATION_ID)
                .map_err(|e| classify(&path, "recording the application id", e))?;
            tx.pragma_update(None, "user_version", version + 1)
                .map_err(|e| classify(&path, "recording the schema version", e))?;
            tx.commit()
                .map_err(|e| classify(&path, "committing a schema migration", e))?;
        }
    }

    /// Runs `read` on a reading connection of its own — taken from the idle
    /// ones or newly opened, given back after — so that it holds no lock
    /// of the store's while it runs.
    fn with_reader<T>(
        &self,
        context: &'static str,
        read: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Some(readers) = &self.readers else {
            return read(&self.lock());
        };
        let idle = lock_readers(readers).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => open_connection(&self.path, false, true, self.busy_timeout)
                .map_err(|e| reopen_error(e, context))?,
        };
        let result = read(&conn);
        let mut idle = lock_readers(readers);
        if idle.len() < IDLE_READERS_MAX {
            idle.push(conn);
        }
        result
    }
}

fn lock_readers(readers: &Mutex<Vec<Connection>>) -> MutexGuard<'_, Vec<Connection>> {
    // Connections are pushed and popped whole: a poisoned list is consistent.
    readers
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A failure to open a reading connection to a store already open: the
/// file was removed or replaced meanwhile.
fn reopen_error(error: StoreError, context: &'static str) -> StoreError {
    match error {
        StoreError::NotFound { path } => StoreError::Io {
            path,
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
                path: path.to_path_buf(),
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

/// Seals events written before the hash chain existed: computes each job's
/// chain over its stored bytes and records the digests. From then on, any
/// change to those events is detected like a change to any other.
fn seal_unsealed_events(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let mut seals: Vec<(i64, String)> = Vec::new();
    {
        let sql = format!("SELECT {COLUMNS} FROM events ORDER BY job_id, seq");
        let mut stmt = tx.prepare(&sql)?;
        let mut rows = stmt.query([])?;
        let mut current: Option<(Uuid, Digest)> = None;
        let mut record = EventRecord::default();
        while let Some(row) = rows.next()? {
            // A row that cannot be read is left unsealed; `verify` reports it.
            if read_row_into(row, &mut record)?.is_err() {
                continue;
            }
            let previous = match current {
                Some((job, head)) if job == record.job_id => head,
                _ => Digest::GENESIS,
            };
            let digest = chain::chain(&previous, &record);
            if record.digest.is_none() {
                seals.push((record.position as i64, digest.to_hex()));
            }
            current = Some((record.job_id, digest));
        }
    }
    let mut seal = tx.prepare("UPDATE events SET digest = ?2 WHERE position = ?1")?;
    for (position, digest) in seals {
        seal.execute(params![position, digest])?;
    }
    Ok(())
}

/// Whether `path` exists; if it does, that it could be a SQLite database.
/// Reads the header only, so a foreign file is refused before SQLite opens it.
fn check_header(path: &Path) -> Result<bool, StoreError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(StoreError::Io {
                path: path.to_path_buf(),
                source: Arc::new(source),
            });
        }
    };
    let mut header = Vec::with_capacity(SQLITE_HEADER.len());
    (&mut file)
        .take(SQLITE_HEADER.len() as u64)
        .read_to_end(&mut header)
        .map_err(|source| StoreError::Io {
            path: path.to_path_buf(),
            source: Arc::new(source),
        })?;
    // An empty file is an empty database, as SQLite itself treats it; a
    // short prefix of the header is a database a peer is creating now.
    if !SQLITE_HEADER.starts_with(&header) {
        return Err(StoreError::NotOurs {
            path: path.to_path_buf(),
            reason: "not a SQLite database".into(),
        });
    }
    Ok(true)
}

/// Checks, in one read transaction (a consistent snapshot, even while a
/// peer creates or migrates the file), that an opened database is ours (or
/// empty) and returns its schema version.
fn read_header(path: &Path, conn: &Connection) -> Result<u32, StoreError> {
    let read = |e| classify(path, "reading the database header", e);
    conn.execute_batch("BEGIN DEFERRED").map_err(read)?;
    let version = check_ours(path, conn);
    conn.execute_batch("COMMIT").map_err(read)?;
    version
}

/// Checks that an opened database is ours (or empty) and returns its schema
/// version. Callers run it inside a transaction: its reads must see one
/// state of the file.
fn check_ours(path: &Path, conn: &Connection) -> Result<u32, StoreError> {
    let read = |e| classify(path, "reading the database header", e);
    let application_id: i32 = conn
        .pragma_query_value(None, "application_id", |row| row.get(0))
        .map_err(read)?;
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(read)?;
    if application_id != APPLICATION_ID {
        let objects: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
            .map_err(read)?;
        if application_id != 0 || objects != 0 {
            return Err(StoreError::NotOurs {
                path: path.to_path_buf(),
                reason: format!(
                    "application_id is {application_id:#x}, not {APPLICATION_ID:#x}, and it holds {objects} schema objects"
                ),
            });
        }
        return Ok(0);
    }
    let version = u32::try_from(version).map_err(|_| StoreError::Corrupt {
        path: path.to_path_buf(),
        detail: format!("schema version {version} is negative"),
    })?;
    if version > DB_SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.to_path_buf(),
            found: version,
            supported: DB_SCHEMA_VERSION,
        });
    }
    Ok(version)
}

fn configure(
    path: &Path,
    conn: &Connection,
    synchronous: Synchronous,
    busy_timeout: Duration,
) -> Result<(), StoreError> {
    // Switching a new file to WAL takes an exclusive lock, and SQLite
    // reports a peer doing the same as busy without waiting: wait here, up to
    // the busy timeout, as for any other lock.
    let give_up = std::time::Instant::now() + busy_timeout;
    let mode: String = loop {
        match conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)) {
            Err(e)
                if matches!(
                    e.sqlite_error_code(),
                    Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
                ) && std::time::Instant::now() < give_up =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            other => break other.map_err(|e| classify(path, "enabling WAL", e))?,
        }
    };
    // In-memory and some special files cannot use WAL; a file that can must.
    if !mode.eq_ignore_ascii_case("wal") && !mode.eq_ignore_ascii_case("memory") {
        return Err(StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: format!("journal mode stays {mode:?}; WAL is required"),
        });
    }
    let level = match synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", level)
        .map_err(|e| classify(path, "setting synchronous", e))
}

/// Maps a SQLite error to the store error a user can act on.
fn classify(path: &Path, context: &'static str, error: rusqlite::Error) -> StoreError {
    match error.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => StoreError::NotOurs {
            path: path.to_path_buf(),
            reason: "SQLite does not recognise it as a database".into(),
        },
        Some(ErrorCode::DatabaseCorrupt) => StoreError::Corrupt {
            path: path.to_path_buf(),
            detail: error.to_string(),
        },
        Some(ErrorCode::ReadOnly) => StoreError::ReadOnly {
            path: path.to_path_buf(),
            detail: error.to_string(),
        },
        Some(ErrorCode::DiskFull) => StoreError::Full {
            path: path.to_path_buf(),
            detail: error.to_string(),
        },
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => StoreError::Busy {
            path: path.to_path_buf(),
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
    fn refill(buffer: &mut String, text: &str) {
        buffer.clear();
        buffer.push_str(text);
    }
    fn refill_optional(buffer: &mut Option<String>, text: Option<&str>) {
        match (buffer.as_mut(), text) {
            (Some(b), Some(t)) => refill(b, t),
            (_, t) => *buffer = t.map(str::to_owned),
        }
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
    refill(&mut record.kind, text(row, 3)?);
    refill(&mut record.recorded_at, text(row, 5)?);
    refill(&mut record.payload, text(row, 6)?);
    let digest = row.get_ref(7)?.as_str_or_null().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(7, rusqlite::types::Type::Text, Box::new(e))
    })?;
    refill_optional(&mut record.digest, digest);
    let mac = row.get_ref(8)?.as_str_or_null().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(8, rusqlite::types::Type::Text, Box::new(e))
    })?;
    refill_optional(&mut record.mac, mac);
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

    fn load_job(&self, job_id: Uuid) -> Result<Vec<EventRecord>, StoreError> {
        let mut records = Vec::new();
        self.visit_job(job_id, &mut |record| {
            records.push(record.clone());
            true
        })?;
        Ok(records)
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
            let mut stmt = conn.prepare_cached(self.layout.unfinished).map_err(read)?;
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

/// The queue's rows, in the writer's transactions: `BEGIN IMMEDIATE` takes
/// the database's write lock, so two workers never claim one job, and the
/// clock is SQLite's own (`unixepoch('subsec')`), the same for every
/// process on the host.
impl JobQueue for SqliteStore {
    fn submit(&self, job: &QueuedJob) -> Result<(), StoreError> {
        let text =
            serde_json::to_string(job).map_err(|e| StoreError::InvalidAppend(e.to_string()))?;
        let job_id = job.job_id.to_string();
        self.queue_write("submitting a job", |tx| {
            let stored: i64 = tx.query_row(
                "SELECT count(*) FROM events WHERE job_id = ?1 AND seq = 1",
                [&job_id],
                |row| row.get(0),
            )?;
            let queued: i64 = tx.query_row(
                "SELECT count(*) FROM jobs WHERE job_id = ?1",
                [&job_id],
                |row| row.get(0),
            )?;
            if stored + queued > 0 {
                return Ok(Err(StoreError::Conflict {
                    job_id: job.job_id,
                    expected: 0,
                    found: stored.cast_unsigned(),
                }));
            }
            tx.execute(
                "INSERT INTO jobs (job_id, submitted_no, job, state, epoch, submitted_at)
                 VALUES (?1, (SELECT coalesce(max(submitted_no), 0) + 1 FROM jobs), ?2,
                         'submitted', 0, strftime('%Y-%m-%dT%H:%M:%f000Z', 'now'))",
                params![job_id, text],
            )?;
            Ok(Ok(()))
        })?
    }

    fn claim(&self, owner: &str, lease: Duration) -> Result<Option<Claim>, StoreError> {
        let row = self.queue_write("claiming a job", |tx| {
            let pick = |sql: &str| {
                tx.query_row(sql, [], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Option<String>>(2)?,
                        row.get::<_, i64>(3)?,
                    ))
                })
                .optional()
            };
            let picked = match pick(
                "SELECT job_id, job, owner, epoch FROM jobs WHERE state = 'submitted'
                 ORDER BY submitted_no LIMIT 1",
            )? {
                Some(row) => Some(row),
                None => pick(
                    "SELECT job_id, job, owner, epoch FROM jobs
                     WHERE state = 'running' AND lease_until <= unixepoch('subsec')
                     ORDER BY submitted_no LIMIT 1",
                )?,
            };
            if let Some((job_id, _, _, _)) = &picked {
                tx.execute(
                    "UPDATE jobs SET state = 'running', owner = ?2, epoch = epoch + 1,
                         lease_until = unixepoch('subsec') + ?3
                     WHERE job_id = ?1",
                    params![job_id, owner, queue::seconds(lease)],
                )?;
            }
            Ok(picked)
        })?;
        row.map(|(job_id, text, previous_owner, epoch)| {
            queue::claim_from_row(&job_id, &text, previous_owner, epoch)
        })
        .transpose()
    }

    fn renew(
        &self,
        owner: &str,
        fences: &[Fence],
        lease: Duration,
    ) -> Result<Vec<Fence>, StoreError> {
        self.queue_write("renewing leases", |tx| {
            let mut renew = tx.prepare_cached(
                "UPDATE jobs SET lease_until = unixepoch('subsec') + ?4
                 WHERE job_id = ?1 AND epoch = ?2 AND owner = ?3 AND state = 'running'",
            )?;
            let mut held = Vec::new();
            for fence in fences {
                let epoch = i64::try_from(fence.epoch).unwrap_or(i64::MAX);
                let changed = renew.execute(params![
                    fence.job_id.to_string(),
                    epoch,
                    owner,
                    queue::seconds(lease)
                ])?;
                if changed == 1 {
                    held.push(*fence);
                }
            }
            Ok(held)
        })
    }

    fn release(&self, fence: Fence, finished: bool) -> Result<(), StoreError> {
        self.queue_write("releasing a job", |tx| {
            tx.execute(
                "UPDATE jobs SET state = CASE WHEN ?3 THEN 'finished' ELSE 'submitted' END,
                     owner = NULL, lease_until = NULL
                 WHERE job_id = ?1 AND epoch = ?2 AND state = 'running'",
                params![
                    fence.job_id.to_string(),
                    i64::try_from(fence.epoch).unwrap_or(i64::MAX),
                    finished
                ],
            )?;
            Ok(())
        })
    }

    fn queued_job(&self, job_id: Uuid) -> Result<Option<(QueuedJob, QueueState)>, StoreError> {
        let row = self.with_reader("reading the job queue", |conn| {
            let read = |e| classify(&self.path, "reading the job queue", e);
            if !has_queue(conn).map_err(read)? {
                return Ok(None);
            }
            conn.query_row(
                "SELECT job, state FROM jobs WHERE job_id = ?1",
                [job_id.to_string()],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?)),
            )
            .optional()
            .map_err(read)
        })?;
        row.map(|(text, state)| queue::queued_from_row(&job_id.to_string(), &text, &state))
            .transpose()
    }

    fn queued(&self) -> Result<Vec<QueueEntry>, StoreError> {
        self.with_reader("listing the job queue", |conn| {
            let read = |e| classify(&self.path, "listing the job queue", e);
            if !has_queue(conn).map_err(read)? {
                // A log written before the queue existed: nothing is queued.
                return Ok(Vec::new());
            }
            let mut stmt = conn
                .prepare_cached(
                    "SELECT job_id, state, owner, epoch, coalesce(lease_until <= unixepoch('subsec'), 0),
                            submitted_at, coalesce(json_array_length(job, '$.steps'), 0)
                     FROM jobs WHERE state <> 'finished' ORDER BY submitted_no",
                )
                .map_err(read)?;
            let rows = stmt
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, Option<String>>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, bool>(4)?,
                        row.get::<_, String>(5)?,
                        row.get::<_, i64>(6)?,
                    ))
                })
                .map_err(read)?;
            let mut entries = Vec::new();
            for row in rows {
                let (job_id, state, owner, epoch, lease_expired, submitted_at, steps) =
                    row.map_err(read)?;
                let bad = |detail: String| StoreError::BadRow {
                    job_id: job_id.clone(),
                    seq: 0,
                    detail,
                };
                entries.push(QueueEntry {
                    job_id: Uuid::parse_str(&job_id).map_err(|e| bad(format!("job id: {e}")))?,
                    state: QueueState::parse(&state).ok_or_else(|| bad(format!("state {state:?}")))?,
                    owner,
                    epoch: u64::try_from(epoch).map_err(|_| bad(format!("epoch {epoch}")))?,
                    lease_expired,
                    submitted_at,
                    steps: usize::try_from(steps).unwrap_or(0),
                });
            }
            Ok(entries)
        })
    }
}

impl SqliteStore {
    /// Runs `write` in a transaction of the writer's that holds the write
    /// lock from its start.
    fn queue_write<T>(
        &self,
        context: &'static str,
        write: impl FnOnce(&rusqlite::Transaction<'_>) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| classify(&self.path, context, e))?;
        let value = write(&tx).map_err(|e| classify(&self.path, context, e))?;
        tx.commit().map_err(|e| classify(&self.path, context, e))?;
        Ok(value)
    }
}

/// Whether the database has the job queue's table (a log written before the
/// queue existed has none: nothing is queued there).
fn has_queue(conn: &Connection) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_schema WHERE type = 'table' AND name = 'jobs'",
        [],
        |row| row.get(0),
    )
}
