//! One name for every log: a file path (SQLite) or a PostgreSQL connection
//! string, opened as the same kind of thing.

use std::path::PathBuf;
use std::sync::Arc;

use super::{EventStore, JobQueue, SqliteOptions, SqliteStore, StoreError, Synchronous};

/// A store with both sides: the event log and the job queue beside it.
pub trait Log: EventStore + JobQueue {}

impl<T: EventStore + JobQueue> Log for T {}

/// Where a log lives.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Location {
    /// A SQLite file.
    File(PathBuf),
    /// A PostgreSQL database: a `postgres://` or `postgresql://` URL, or a
    /// libpq `key=value` string.
    Postgres(String),
}

impl Location {
    /// Reads a `--db` argument: a PostgreSQL URL or `key=value` string, or
    /// else a file path.
    ///
    /// ```
    /// use job_executor::store::Location;
    /// assert!(matches!(Location::parse("postgres://ops@db:5432/jobs"), Location::Postgres(_)));
    /// assert!(matches!(Location::parse("host=db dbname=jobs"), Location::Postgres(_)));
    /// assert!(matches!(Location::parse("job-executor.db"), Location::File(_)));
    /// ```
    pub fn parse(text: &str) -> Location {
        const KEYS: [&str; 6] = ["host", "hostaddr", "port", "dbname", "user", "options"];
        let url = text.starts_with("postgres://") || text.starts_with("postgresql://");
        let key_values = text.contains('=')
            && text.split_whitespace().all(|pair| {
                pair.split_once('=')
                    .is_some_and(|(key, _)| !key.is_empty() && !key.contains('/'))
            })
            && text
                .split_whitespace()
                .any(|pair| KEYS.iter().any(|k| pair.starts_with(&format!("{k}="))));
        if url || key_values {
            Location::Postgres(text.to_owned())
        } else {
            Location::File(PathBuf::from(text))
        }
    }
}

/// How to open a log, whatever its kind.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct OpenOptions {
    /// Create the log when there is none.
    pub create: bool,
    /// Open for reading only: nothing is ever written.
    pub read_only: bool,
    /// SQLite's durability of each commit (PostgreSQL always commits with
    /// `synchronous_commit = on`).
    pub synchronous: Synchronous,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            create: true,
            read_only: false,
            synchronous: Synchronous::Full,
        }
    }
}

impl OpenOptions {
    /// For reading an existing log: nothing is ever written.
    pub fn reader() -> Self {
        OpenOptions {
            create: false,
            read_only: true,
            ..OpenOptions::default()
        }
    }

    /// For appending to an existing log, never creating one.
    pub fn existing() -> Self {
        OpenOptions {
            create: false,
            ..OpenOptions::default()
        }
    }

    /// With this SQLite durability.
    pub fn with_synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }
}

/// Opens the log at `location`.
///
/// # Errors
/// As [`SqliteStore::open_with`] or `PgStore::open_with`; a PostgreSQL
/// location in a build without the `postgres` feature is
/// [`StoreError::Unavailable`].
pub fn open(location: &Location, options: &OpenOptions) -> Result<Arc<dyn Log>, StoreError> {
    match location {
        Location::File(path) => {
            let mut sqlite = SqliteOptions::default().with_synchronous(options.synchronous);
            sqlite.create = options.create;
            sqlite.read_only = options.read_only;
            Ok(Arc::new(SqliteStore::open_with(path, &sqlite)?))
        }
        #[cfg(feature = "postgres")]
        Location::Postgres(connection) => {
            let pg = super::PgOptions {
                create: options.create,
                read_only: options.read_only,
                ..super::PgOptions::default()
            };
            Ok(Arc::new(super::PgStore::open_with(connection, &pg)?))
        }
        #[cfg(not(feature = "postgres"))]
        Location::Postgres(_) => Err(StoreError::Unavailable {
            target: super::Target::Server("postgres".into()),
            detail: "this build has no PostgreSQL support (the `postgres` feature)".into(),
        }),
    }
}
