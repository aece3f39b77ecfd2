//! The SQLite log's schema: the migrations, the checks that a file is
//! ours before anything is written to it, and where a job's rows are in
//! each schema version (readers read older files as they are).

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, TransactionBehavior, params};
use uuid::Uuid;

use super::super::sql::{EVENT_COLUMNS, not_terminal};
use super::super::{StoreError, Target};
use super::{Synchronous, classify, read_row_into};
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
    Migration {
        sql: include_str!("../../../schema/0011_job_claimed.sql"),
        then: None,
    },
];

/// The event columns of a version-1 database opened for reading (no chain
/// columns yet), as [`EVENT_COLUMNS`] has them.
const COLUMNS_V1: &str =
    "position, job_id, seq, kind, schema_version, recorded_at, payload, NULL, NULL";

/// Where a job's rows are, which depends on the schema version: read-only
/// opens read older databases as they are.
#[derive(Debug)]
pub(super) struct Layout {
    /// A job's highest seq, 0 for none; `?1` is the job id.
    pub(super) last_seq: &'static str,
    /// A job's events in seq order; `?1` is the job id.
    pub(super) job_events: String,
    /// Job ids in start order.
    pub(super) job_ids: &'static str,
    /// Ids of jobs whose last event does not end them, in start order.
    pub(super) unfinished: String,
    /// Every event, each job's together, with the job's group number last.
    pub(super) scan: String,
}

impl Layout {
    /// Schema 5 on: rows keyed by (job_no, seq), jobs found by their first event.
    pub(super) fn clustered() -> Self {
        const JOB: &str = "(SELECT job_no FROM events WHERE job_id = ?1 AND seq = 1)";
        Layout {
            last_seq: "SELECT coalesce(max(seq), 0) FROM events WHERE job_no = \
                       (SELECT job_no FROM events WHERE job_id = ?1 AND seq = 1)",
            job_events: format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE job_no = {JOB} ORDER BY seq"
            ),
            job_ids: "SELECT job_id FROM events WHERE seq = 1 ORDER BY job_no",
            unfinished: Layout::unfinished("job_no", "job_no"),
            scan: format!("SELECT {EVENT_COLUMNS}, job_no FROM events ORDER BY job_no, seq"),
        }
    }

    /// Schemas 1 to 4, read as they are: rows keyed by (job_id, seq).
    fn by_job_id(columns: &str) -> Self {
        Layout {
            last_seq: "SELECT coalesce(max(seq), 0) FROM events WHERE job_id = ?1",
            job_events: format!("SELECT {columns} FROM events WHERE job_id = ?1 ORDER BY seq"),
            job_ids: "SELECT job_id FROM events WHERE seq = 1 ORDER BY position",
            unfinished: Layout::unfinished("job_id", "position"),
            scan: format!("SELECT {columns}, NULL FROM events ORDER BY job_id, seq"),
        }
    }

    /// Ids of jobs whose last event is not terminal, with rows keyed by
    /// (`job`, seq), in `start` order.
    fn unfinished(job: &str, start: &str) -> String {
        format!(
            "SELECT s.job_id FROM events s
             JOIN (SELECT {job}, max(seq) AS last FROM events GROUP BY {job}) j
               ON j.{job} = s.{job}
             JOIN events e ON e.{job} = j.{job} AND e.seq = j.last
             WHERE s.seq = 1 AND {}
             ORDER BY s.{start}",
            not_terminal("e.kind")
        )
    }

    pub(super) fn for_version(version: u32) -> Self {
        match version {
            0 | 5.. => Layout::clustered(),
            1 => Layout::by_job_id(COLUMNS_V1),
            _ => Layout::by_job_id(EVENT_COLUMNS),
        }
    }
}

/// The schema version this build writes.
pub const DB_SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

const SQLITE_HEADER: &[u8; 16] = b"SQLite format 3\0";

/// Brings the schema to [`DB_SCHEMA_VERSION`], one step per
/// transaction. Each step takes the write lock (`BEGIN IMMEDIATE`) and
/// only then reads the version and checks the file is ours, so peers
/// migrating the same file at the same moment never apply a step twice
/// and never see one half-applied.
pub(super) fn migrate(path: &Path, conn: &mut Connection) -> Result<(), StoreError> {
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| classify(path, "starting a schema migration", e))?;
        let version = check_ours(path, &tx)?;
        let Some(migration) = MIGRATIONS.get(version as usize) else {
            // Up to date (a peer may have done the work): nothing written.
            return tx
                .commit()
                .map_err(|e| classify(path, "reading the schema version", e));
        };
        tx.execute_batch(migration.sql)
            .map_err(|e| classify(path, "applying a schema migration", e))?;
        if let Some(then) = migration.then {
            then(&tx).map_err(|e| classify(path, "completing a schema migration", e))?;
        }
        tx.pragma_update(None, "application_id", APPLICATION_ID)
            .map_err(|e| classify(path, "recording the application id", e))?;
        tx.pragma_update(None, "user_version", version + 1)
            .map_err(|e| classify(path, "recording the schema version", e))?;
        tx.commit()
            .map_err(|e| classify(path, "committing a schema migration", e))?;
    }
}

/// Seals events written before the hash chain existed: computes each job's
/// chain over its stored bytes and records the digests. From then on, any
/// change to those events is detected like a change to any other.
fn seal_unsealed_events(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    let mut seals: Vec<(i64, String)> = Vec::new();
    {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events ORDER BY job_id, seq");
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
pub(super) fn check_header(path: &Path) -> Result<bool, StoreError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(StoreError::Io {
                target: Target::File(path.to_path_buf()),
                source: Arc::new(source),
            });
        }
    };
    let mut header = Vec::with_capacity(SQLITE_HEADER.len());
    (&mut file)
        .take(SQLITE_HEADER.len() as u64)
        .read_to_end(&mut header)
        .map_err(|source| StoreError::Io {
            target: Target::File(path.to_path_buf()),
            source: Arc::new(source),
        })?;
    // An empty file is an empty database, as SQLite itself treats it; a
    // short prefix of the header is a database a peer is creating now.
    if !SQLITE_HEADER.starts_with(&header) {
        return Err(StoreError::NotOurs {
            target: Target::File(path.to_path_buf()),
            reason: "not a SQLite database".into(),
        });
    }
    Ok(true)
}

/// Checks, in one read transaction (a consistent snapshot, even while a
/// peer creates or migrates the file), that an opened database is ours (or
/// empty) and returns its schema version.
pub(super) fn read_header(path: &Path, conn: &Connection) -> Result<u32, StoreError> {
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
                target: Target::File(path.to_path_buf()),
                reason: format!(
                    "application_id is {application_id:#x}, not {APPLICATION_ID:#x}, and it holds {objects} schema objects"
                ),
            });
        }
        return Ok(0);
    }
    let version = u32::try_from(version).map_err(|_| StoreError::Corrupt {
        target: Target::File(path.to_path_buf()),
        detail: format!("schema version {version} is negative"),
    })?;
    if version > DB_SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            target: Target::File(path.to_path_buf()),
            found: version,
            supported: DB_SCHEMA_VERSION,
        });
    }
    Ok(version)
}

pub(super) fn configure(
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
            target: Target::File(path.to_path_buf()),
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
