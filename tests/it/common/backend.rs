//! The stores a test runs against: SQLite always, PostgreSQL when the test
//! server answers (see [`pg`](super::pg): without one the PostgreSQL half
//! says `SKIPPED`, and fails under `JE_REQUIRE_PG=1`).
//!
//! A test about the store contract loops over [`Backend::all`]; a property
//! runs once per backend through [`check_shared`] or [`check_fresh`], with
//! fewer cases on PostgreSQL, whose every commit is a round trip and an
//! fsync.

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;

use job_executor::store::{
    EventStore, PgOptions, PgStore, SqliteOptions, SqliteStore, StoreError, Synchronous,
};
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestCaseResult, TestRunner};

use super::pg::{self, PgSchema};

/// Where a test's log lives: a database of its own on one kind of store.
pub enum Backend {
    /// A SQLite file in a directory of its own, removed on drop.
    Sqlite {
        _dir: tempfile::TempDir,
        path: PathBuf,
    },
    /// A schema of its own on the PostgreSQL test server, dropped on drop.
    Postgres(PgSchema),
}

impl Backend {
    /// A fresh log on every store: SQLite, then PostgreSQL when the server
    /// answers.
    pub fn all(test: &str) -> Vec<Backend> {
        let mut all = vec![Backend::sqlite()];
        all.extend(Backend::postgres(test));
        all
    }

    /// A fresh SQLite file.
    pub fn sqlite() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        Backend::Sqlite { _dir: dir, path }
    }

    /// A fresh PostgreSQL schema, or `None` (said on stderr) without a server.
    pub fn postgres(test: &str) -> Option<Backend> {
        pg::schema(test).map(Backend::Postgres)
    }

    /// A fresh, empty log on the same kind of store.
    pub fn fresh(&self, test: &str) -> Backend {
        match self {
            Backend::Sqlite { .. } => Backend::sqlite(),
            Backend::Postgres(_) => Backend::postgres(test)
                .unwrap_or_else(|| panic!("{test}: the PostgreSQL server went away")),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::Sqlite { .. } => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, Backend::Postgres(_))
    }

    /// The SQLite file; panics on PostgreSQL.
    pub fn path(&self) -> &std::path::Path {
        match self {
            Backend::Sqlite { path, .. } => path,
            Backend::Postgres(_) => panic!("a PostgreSQL log has no file"),
        }
    }

    /// The PostgreSQL schema; panics on SQLite.
    pub fn schema(&self) -> &PgSchema {
        match self {
            Backend::Postgres(schema) => schema,
            Backend::Sqlite { .. } => panic!("a SQLite log has no schema"),
        }
    }

    /// Opens the log for writing, creating it when absent, as the CLI does.
    pub fn try_open(&self) -> Result<Arc<dyn EventStore>, StoreError> {
        Ok(match self {
            Backend::Sqlite { path, .. } => Arc::new(SqliteStore::open(path)?),
            Backend::Postgres(schema) => Arc::new(PgStore::open(&schema.url())?),
        })
    }

    /// [`try_open`](Self::try_open), which must succeed.
    pub fn open(&self) -> Arc<dyn EventStore> {
        self.try_open()
            .unwrap_or_else(|e| panic!("{}: {e}", self.name()))
    }

    /// Opens the log for writing, trading durability against a power loss
    /// for speed where the store offers the choice (SQLite's
    /// `synchronous=NORMAL`); PostgreSQL always commits synchronously.
    pub fn open_for_speed(&self) -> Arc<dyn EventStore> {
        match self {
            Backend::Sqlite { path, .. } => {
                let options = SqliteOptions::default().with_synchronous(Synchronous::Normal);
                Arc::new(SqliteStore::open_with(path, &options).unwrap())
            }
            Backend::Postgres(_) => self.open(),
        }
    }

    /// Opens the log for reading only, never creating it, as the read
    /// commands do.
    pub fn try_reader(&self) -> Result<Arc<dyn EventStore>, StoreError> {
        Ok(match self {
            Backend::Sqlite { path, .. } => {
                Arc::new(SqliteStore::open_with(path, &SqliteOptions::reader())?)
            }
            Backend::Postgres(schema) => {
                Arc::new(PgStore::open_with(&schema.url(), &PgOptions::reader())?)
            }
        })
    }

    /// [`try_reader`](Self::try_reader), which must succeed.
    pub fn reader(&self) -> Arc<dyn EventStore> {
        self.try_reader()
            .unwrap_or_else(|e| panic!("{}: {e}", self.name()))
    }

    /// A plain connection to the log's database, for raw SQL.
    pub fn raw(&self) -> Raw {
        match self {
            Backend::Sqlite { path, .. } => Raw::Sqlite(rusqlite::Connection::open(path).unwrap()),
            Backend::Postgres(schema) => Raw::Postgres(Box::new(schema.client())),
        }
    }

    /// How many cases a property runs here, given how many it runs on
    /// SQLite: an eighth (at least 8) on PostgreSQL.
    pub fn cases(&self, on_sqlite: u32) -> u32 {
        match self {
            Backend::Sqlite { .. } => on_sqlite,
            Backend::Postgres(_) => (on_sqlite / 8).max(8),
        }
    }
}

/// A plain connection to a log's database, as another program (or an
/// attacker) would use it: no store in between.
pub enum Raw {
    Sqlite(rusqlite::Connection),
    Postgres(Box<postgres::Client>),
}

impl Raw {
    /// Runs one statement without parameters; a refusal comes back as the
    /// database's message.
    pub fn execute(&mut self, sql: &str) -> Result<u64, String> {
        match self {
            Raw::Sqlite(conn) => conn
                .execute(sql, [])
                .map(|n| n as u64)
                .map_err(|e| e.to_string()),
            Raw::Postgres(client) => client.execute(sql, &[]).map_err(|e| pg_message(&e)),
        }
    }

    /// The one integer a query answers.
    pub fn count(&mut self, sql: &str) -> i64 {
        match self {
            Raw::Sqlite(conn) => conn.query_row(sql, [], |r| r.get(0)).unwrap(),
            Raw::Postgres(client) => client.query_one(sql, &[]).unwrap().get(0),
        }
    }
}

/// A PostgreSQL error as the server worded it.
pub fn pg_message(error: &postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => db.message().to_owned(),
        None => error.to_string(),
    }
}

/// The runner's verdict, as `proptest!` reports it: a failure panics with
/// the minimal case and the seed that reproduces it.
fn run<S: Strategy>(
    backend: &Backend,
    config: Config,
    strategy: &S,
    property: impl Fn(S::Value) -> TestCaseResult,
) {
    let config = Config {
        cases: backend.cases(config.cases),
        ..config
    };
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(strategy, property) {
        panic!("on {}: {e}\n{runner}", backend.name());
    }
}

/// Runs a property on `backend` with a store per case. On SQLite each case
/// gets a fresh in-memory database. On PostgreSQL the cases share the
/// backend's schema (a schema costs a round of DDL), so a case must write
/// job ids of its own and judge only them; after a case fails, the next one
/// gets a fresh schema, so that shrinking never meets a failed case's
/// leftovers.
pub fn check_shared<S: Strategy>(
    backend: &Backend,
    test: &str,
    config: Config,
    strategy: S,
    property: impl Fn(S::Value, Arc<dyn EventStore>) -> TestCaseResult,
) {
    // The store the next case writes to, with the replacement schema it
    // lives in once a case has failed.
    struct Shared {
        store: Arc<dyn EventStore>,
        _fresh: Option<Backend>,
    }
    let shared: RefCell<Option<Shared>> = RefCell::new(None);
    let store_for_case = || -> Arc<dyn EventStore> {
        match backend {
            Backend::Sqlite { .. } => Arc::new(SqliteStore::open_in_memory().unwrap()),
            Backend::Postgres(_) => {
                let mut shared = shared.borrow_mut();
                let shared = shared.get_or_insert_with(|| Shared {
                    store: backend.open(),
                    _fresh: None,
                });
                shared.store.clone()
            }
        }
    };
    run(backend, config, &strategy, |value| {
        let store = store_for_case();
        let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            property(value, store.clone())
        }));
        let failed = !matches!(verdict, Ok(Ok(()) | Err(TestCaseError::Reject(_))));
        if failed && backend.is_postgres() {
            // Whatever the failed case left behind goes with its schema.
            let fresh = backend.fresh(test);
            *shared.borrow_mut() = Some(Shared {
                store: fresh.open(),
                _fresh: Some(fresh),
            });
        }
        verdict.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
}

/// Runs a property on `backend`, each case on a fresh, empty log of its
/// kind (a SQLite file, a PostgreSQL schema): for cases that damage the
/// database itself.
pub fn check_fresh<S: Strategy>(
    backend: &Backend,
    test: &str,
    config: Config,
    strategy: S,
    property: impl Fn(S::Value, &Backend) -> TestCaseResult,
) {
    run(backend, config, &strategy, |value| {
        property(value, &backend.fresh(test))
    });
}
