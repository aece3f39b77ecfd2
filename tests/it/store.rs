//! The event stores: append-only in the database itself, optimistic
//! concurrency, refusal of foreign files and schemas, schema tracking. What
//! the contract says of every store runs on SQLite and PostgreSQL alike
//! (`common::backend`); what is about a SQLite file or a PostgreSQL schema
//! runs on that store alone.

use crate::common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::backend::{Backend, Raw};
use common::{completed, completed_log, records, started, step_started, succeeded};
use job_executor::store::{
    APPLICATION_ID, DB_SCHEMA_VERSION, EventStore, MemoryStore, PG_SCHEMA_VERSION, PgOptions,
    PgStore, SqliteOptions, SqliteStore, StoreError, Synchronous,
};
use job_executor::{JobExecutor, JobStep, NoOpHandler};
use rusqlite::Connection;
use uuid::Uuid;

fn fresh() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    (dir, path)
}

fn with_job_in(store: &dyn EventStore) -> Uuid {
    let job_id = Uuid::new_v4();
    store.append(&records(job_id, &completed_log(2))).unwrap();
    job_id
}

fn with_job(path: &Path) -> Uuid {
    with_job_in(&SqliteStore::open(path).unwrap())
}

/// The memory store and a store on every backend, each with the log that
/// must outlive it.
fn stores(test: &str) -> Vec<(&'static str, Arc<dyn EventStore>, Option<Backend>)> {
    let mut stores: Vec<(&'static str, Arc<dyn EventStore>, Option<Backend>)> =
        vec![("memory", Arc::new(MemoryStore::new()), None)];
    for backend in Backend::all(test) {
        stores.push((backend.name(), backend.open(), Some(backend)));
    }
    stores
}

/// The schema version the database records.
fn schema_version(backend: &Backend) -> i64 {
    let sql = match backend {
        Backend::Sqlite { .. } => "PRAGMA user_version",
        Backend::Postgres(_) => "SELECT version::bigint FROM job_executor_schema",
    };
    backend.raw().count(sql)
}

/// A raw insert of an event of `job_id`, every column well-formed, as a
/// program that bypasses the store would write it; the same SQL on both
/// stores.
fn raw_insert(
    raw: &mut Raw,
    job_id: &str,
    job_no: &str,
    seq: i64,
    kind: &str,
) -> Result<(), String> {
    raw.execute(&format!(
        "INSERT INTO events
             (position, job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest)
         VALUES ((SELECT coalesce(max(position), 0) + 1 FROM events), '{job_id}', {job_no}, {seq},
                 '{kind}', 1, '2000-01-01T00:00:00.000000Z', '{{}}', '{zeros}')",
        zeros = "0".repeat(64),
    ))
    .map(|_| ())
}

#[test]
fn database_refuses_update_and_delete_of_events() {
    for backend in Backend::all("database_refuses_update_and_delete_of_events") {
        let name = backend.name();
        with_job_in(backend.open().as_ref());
        let mut raw = backend.raw();
        let err = raw
            .execute("UPDATE events SET payload = '{}' WHERE seq = 2")
            .unwrap_err();
        assert!(err.contains("append-only: UPDATE"), "{name}: {err}");
        let err = raw.execute("DELETE FROM events WHERE seq = 5").unwrap_err();
        assert!(err.contains("append-only: DELETE"), "{name}: {err}");
        assert_eq!(raw.count("SELECT count(*) FROM events"), 6, "{name}");
    }
}

#[test]
fn database_refuses_gaps_foreign_kinds_and_appends_after_the_end() {
    for backend in Backend::all("database_refuses_gaps_foreign_kinds_and_appends_after_the_end") {
        let name = backend.name();
        let store = backend.open();
        let job_id = with_job_in(store.as_ref());
        let open_job = Uuid::new_v4();
        store.append(&records(open_job, &[started(1)])).unwrap();
        let mut raw = backend.raw();
        let mut insert_for = |job_id: Uuid, seq: i64, kind: &str| {
            let job_no =
                format!("(SELECT job_no FROM events WHERE job_id = '{job_id}' AND seq = 1)");
            raw_insert(&mut raw, &job_id.to_string(), &job_no, seq, kind)
        };
        let err = insert_for(job_id, 9, "StepStarted").unwrap_err();
        assert!(err.contains("seq must directly follow"), "{name}: {err}");
        let err = insert_for(job_id, 7, "StepStarted").unwrap_err();
        assert!(
            err.contains("nothing follows the end of a job"),
            "{name}: {err}"
        );
        // Neither a stranger, nor a list of known kinds, nor a part of one.
        for kind in ["Whatever", "StepStarted,StepSucceeded", "Step", ""] {
            let err = insert_for(open_job, 2, kind).unwrap_err();
            assert!(
                err.contains("unknown event kind"),
                "{name}: {kind:?}: {err}"
            );
        }
        insert_for(open_job, 2, "StepStarted").expect("a well-formed append is accepted");
        let other = Uuid::new_v4().to_string();
        let err = raw_insert(&mut backend.raw(), &other, "99", 1, "StepStarted").unwrap_err();
        assert!(
            err.to_lowercase().contains("check constraint"),
            "{name}: {err}"
        );
        assert_eq!(store.last_seq(open_job).unwrap(), 2, "{name}");
        assert_eq!(store.load_job(job_id).unwrap().len(), 6, "{name}");
    }
}

#[test]
fn conflicting_appends_are_refused_as_conflicts() {
    for (name, store, _log) in stores("conflicting_appends_are_refused_as_conflicts") {
        let job_id = Uuid::new_v4();
        let log = records(job_id, &[started(1), step_started(0), succeeded(0)]);
        store.append(&log[..2]).unwrap();
        // A second writer that also believes seq 2 is next.
        let err = store.append(&log[1..2]).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::Conflict {
                    expected: 2,
                    found: 2,
                    ..
                }
            ),
            "{name}: {err}"
        );
        assert!(err.is_conflict());
        // A batch that skips ahead is a conflict too, and appends nothing.
        let late = records(
            job_id,
            &[started(1), step_started(0), succeeded(0), completed()],
        );
        assert!(
            store.append(&late[3..]).unwrap_err().is_conflict(),
            "{name}"
        );
        assert_eq!(store.last_seq(job_id).unwrap(), 2, "{name}");
        store.append(&log[2..]).unwrap();
        assert_eq!(store.last_seq(job_id).unwrap(), 3, "{name}");
    }
}

#[test]
fn malformed_batches_are_refused() {
    for (name, store, _log) in stores("malformed_batches_are_refused") {
        assert!(
            matches!(store.append(&[]), Err(StoreError::InvalidAppend(_))),
            "{name}"
        );
        let a = records(Uuid::new_v4(), &[started(0)]);
        let b = records(Uuid::new_v4(), &[started(0)]);
        let mixed = [a[0].clone(), b[0].clone()];
        assert!(
            matches!(store.append(&mixed), Err(StoreError::InvalidAppend(_))),
            "{name}"
        );
        let mut gap = records(Uuid::new_v4(), &[started(1), step_started(0), succeeded(0)]);
        gap.remove(1);
        assert!(
            matches!(store.append(&gap), Err(StoreError::InvalidAppend(_))),
            "{name}"
        );
        assert!(store.job_ids().unwrap().is_empty(), "{name}");
        assert_eq!(store.last_position().unwrap(), 0, "{name}");
    }
}

#[test]
fn every_store_holds_the_same_records() {
    let jobs: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let logs: Vec<_> = jobs
        .iter()
        .map(|&j| records(j, &completed_log(2)))
        .collect();
    // Interleave the jobs' appends so positions and per-job order differ.
    let write = |store: &dyn EventStore| {
        for i in 0..6 {
            for log in &logs {
                store.append(&log[i..=i]).unwrap();
            }
        }
    };
    let scanned = |store: &dyn EventStore| {
        let mut all = Vec::new();
        store
            .scan(&mut |_, record| all.push(record.unwrap().clone()))
            .unwrap();
        all
    };
    let memory = MemoryStore::new();
    write(&memory);
    assert_eq!(memory.job_ids().unwrap(), jobs);
    for backend in Backend::all("every_store_holds_the_same_records") {
        let name = backend.name();
        let store = backend.open();
        write(store.as_ref());
        assert_eq!(store.job_ids().unwrap(), jobs, "{name}");
        for &job in &jobs {
            let (m, s) = (memory.load_job(job).unwrap(), store.load_job(job).unwrap());
            assert_eq!(m, s, "{name}");
            let seqs: Vec<u64> = s.iter().map(|r| r.seq).collect();
            assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6], "{name}");
            assert!(
                s.windows(2).all(|w| w[0].position < w[1].position),
                "{name}"
            );
        }
        assert_eq!(scanned(&memory), scanned(store.as_ref()), "{name}");
        assert_eq!(store.last_position().unwrap(), 18, "{name}");
        assert!(store.load_job(Uuid::new_v4()).unwrap().is_empty(), "{name}");
        assert_eq!(store.last_seq(Uuid::new_v4()).unwrap(), 0, "{name}");
        // Read back through a reader of its own, the same.
        assert_eq!(
            scanned(backend.reader().as_ref()),
            scanned(&memory),
            "{name}"
        );
    }
    assert!(memory.load_job(Uuid::new_v4()).unwrap().is_empty());
}

#[test]
fn schema_version_and_identity_are_recorded() {
    let (_dir, path) = fresh();
    with_job(&path);
    let raw = Connection::open(&path).unwrap();
    let version: u32 = raw
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    let app: i32 = raw
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .unwrap();
    let mode: String = raw
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    let strict: i64 = raw
        .query_row(
            "SELECT strict FROM pragma_table_list WHERE name = 'events'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(version, DB_SCHEMA_VERSION);
    assert_eq!(app, APPLICATION_ID);
    assert_eq!(mode, "wal");
    assert_eq!(strict, 1);
}

#[test]
fn reopening_keeps_the_log_and_applies_nothing_twice() {
    for backend in Backend::all("reopening_keeps_the_log_and_applies_nothing_twice") {
        let name = backend.name();
        let job_id = with_job_in(backend.open().as_ref());
        let before = backend.open().load_job(job_id).unwrap();
        let store = backend.open();
        assert_eq!(store.load_job(job_id).unwrap(), before, "{name}");
        assert_eq!(store.job_ids().unwrap(), vec![job_id], "{name}");
        let version = match backend {
            Backend::Sqlite { .. } => i64::from(DB_SCHEMA_VERSION),
            Backend::Postgres(_) => i64::from(PG_SCHEMA_VERSION),
        };
        assert_eq!(schema_version(&backend), version, "{name}");
        // The log goes on where it stopped: no position given twice.
        let next = store
            .append(&records(Uuid::new_v4(), &[started(0)]))
            .unwrap();
        assert_eq!(next, vec![7], "{name}");
    }
}

#[test]
fn synchronous_is_full_by_default_and_normal_on_request() {
    let (_dir, path) = fresh();
    assert_eq!(
        SqliteStore::open(&path).unwrap().synchronous().unwrap(),
        Synchronous::Full
    );
    let options = SqliteOptions::default().with_synchronous(Synchronous::Normal);
    let store = SqliteStore::open_with(&path, &options).unwrap();
    assert_eq!(store.synchronous().unwrap(), Synchronous::Normal);
}

#[test]
fn reading_one_job_uses_the_indexes() {
    let (_dir, path) = fresh();
    with_job(&path);
    let raw = Connection::open(&path).unwrap();
    let plan = |sql: &str| -> Vec<String> {
        raw.prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap()
            .query_map(["x"], |r| r.get(3))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    // A job's events: its number by the index of first events, then its
    // rows by the (job_no, seq) key. No step of either scans the table.
    let job = plan(
        "SELECT position, job_id, seq, kind, schema_version, recorded_at, payload, digest, mac
         FROM events WHERE job_no = (SELECT job_no FROM events WHERE job_id = ?1 AND seq = 1)
         ORDER BY seq",
    );
    assert!(
        job.iter().any(|step| step.contains("events_job ")),
        "{job:?}"
    );
    assert!(
        job.iter().all(|step| !step.starts_with("SCAN events")),
        "{job:?}"
    );
    let jobs = plan("SELECT job_id FROM events WHERE seq = 1 AND ?1 = ?1 ORDER BY job_no");
    assert!(
        jobs.iter().any(|step| step.contains("events_job_starts")),
        "{jobs:?}"
    );
}

fn assert_refused_untouched(path: &Path, bytes: &[u8], want: &str) {
    let err = SqliteStore::open(path).unwrap_err();
    assert!(err.to_string().contains(want), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    assert_eq!(std::fs::read(path).unwrap(), bytes, "the file was modified");
    let wal = path.with_extension("db-wal");
    assert!(
        !wal.exists(),
        "a WAL file was created beside a foreign file"
    );
}

#[test]
fn a_file_that_is_not_sqlite_is_refused_untouched() {
    let (_dir, path) = fresh();
    let bytes = b"name,amount\nalice,3\n".to_vec();
    std::fs::write(&path, &bytes).unwrap();
    assert_refused_untouched(&path, &bytes, "not a SQLite database");
}

#[test]
fn another_programs_database_is_refused_untouched() {
    let (_dir, path) = fresh();
    {
        let raw = Connection::open(&path).unwrap();
        raw.execute_batch("CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT); INSERT INTO accounts VALUES (1, 'a');")
            .unwrap();
    }
    let bytes = std::fs::read(&path).unwrap();
    assert_refused_untouched(&path, &bytes, "not a job-executor database");
}

#[test]
fn a_corrupt_database_is_refused_untouched() {
    let (_dir, path) = fresh();
    with_job(&path);
    // Keep the header, wreck everything after it.
    let mut bytes = std::fs::read(&path).unwrap();
    for b in bytes.iter_mut().skip(100) {
        *b = 0xA5;
    }
    std::fs::write(&path, &bytes).unwrap();
    let _ = std::fs::remove_file(path.with_extension("db-wal"));
    let _ = std::fs::remove_file(path.with_extension("db-shm"));
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(
        matches!(err, StoreError::Corrupt { .. } | StoreError::NotOurs { .. }),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn a_newer_schema_is_refused() {
    for backend in Backend::all("a_newer_schema_is_refused") {
        let name = backend.name();
        with_job_in(backend.open().as_ref());
        let newer = match backend {
            Backend::Sqlite { .. } => format!("PRAGMA user_version = {}", DB_SCHEMA_VERSION + 1),
            Backend::Postgres(_) => format!(
                "UPDATE job_executor_schema SET version = {}",
                PG_SCHEMA_VERSION + 1
            ),
        };
        backend.raw().execute(&newer).unwrap();
        for err in [
            backend.try_open().err().expect("a writer is refused"),
            backend.try_reader().err().expect("a reader is refused"),
        ] {
            assert!(
                matches!(err, StoreError::SchemaTooNew { .. }),
                "{name}: {err}"
            );
            assert!(
                err.to_string().contains("upgrade job-executor"),
                "{name}: {err}"
            );
        }
    }
}

/// Whether the log's database holds nothing at all: no SQLite file, or
/// nothing in the PostgreSQL schema (tables, sequences, functions).
fn nothing_created(backend: &Backend) -> bool {
    match backend {
        Backend::Sqlite { path, .. } => !path.exists(),
        Backend::Postgres(_) => {
            backend.raw().count(
                "SELECT (SELECT count(*) FROM pg_class WHERE relnamespace = current_schema()::regnamespace)
                      + (SELECT count(*) FROM pg_proc WHERE pronamespace = current_schema()::regnamespace)",
            ) == 0
        }
    }
}

#[test]
fn read_only_open_never_creates() {
    for backend in Backend::all("read_only_open_never_creates") {
        let name = backend.name();
        let err = backend.try_reader().err().expect("nothing to read");
        assert!(matches!(err, StoreError::NotFound { .. }), "{name}: {err}");
        let existing = match &backend {
            Backend::Sqlite { path, .. } => {
                SqliteStore::open_with(path, &SqliteOptions::existing()).err()
            }
            Backend::Postgres(schema) => {
                PgStore::open_with(&schema.url(), &PgOptions::existing()).err()
            }
        };
        let err = existing.expect("an existing log is asked for, and there is none");
        assert!(matches!(err, StoreError::NotFound { .. }), "{name}: {err}");
        assert!(nothing_created(&backend), "{name}: the log was created");
        let job_id = with_job_in(backend.open().as_ref());
        let store = backend.reader();
        assert_eq!(store.load_job(job_id).unwrap().len(), 6, "{name}");
        let err = store
            .append(&records(Uuid::new_v4(), &[started(0)]))
            .unwrap_err();
        assert!(matches!(err, StoreError::ReadOnly { .. }), "{name}: {err}");
        assert_eq!(backend.open().job_ids().unwrap(), vec![job_id], "{name}");
    }
}

#[test]
fn two_connections_racing_on_one_job_exactly_one_wins() {
    for backend in Backend::all("two_connections_racing_on_one_job_exactly_one_wins") {
        let name = backend.name();
        backend.open();
        let job_id = Uuid::new_v4();
        let barrier = std::sync::Barrier::new(2);
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| {
                        let store = backend.open();
                        barrier.wait();
                        store.append(&records(job_id, &[started(0)]))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{name}: {results:?}"
        );
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(e) if e.is_conflict())),
            "{name}: {results:?}"
        );
        assert_eq!(backend.open().load_job(job_id).unwrap().len(), 1, "{name}");
    }
}

#[test]
fn threads_running_jobs_on_one_log_lose_nothing() {
    for backend in Backend::all("threads_running_jobs_on_one_log_lose_nothing") {
        let name = backend.name();
        let mut executor = JobExecutor::builder()
            .store(backend.open_for_speed())
            .build();
        executor.register_handler("ok", NoOpHandler);
        let executor = Arc::new(executor);
        let steps: Vec<JobStep> = (0..5).map(|i| JobStep::new(i, "ok", "t")).collect();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (executor, steps) = (executor.clone(), steps.clone());
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        executor
                            .execute_job(Uuid::new_v4(), Uuid::new_v4(), &steps, None, "ops")
                            .unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        drop(executor);
        let reopened = backend.reader();
        let jobs = reopened.job_ids().unwrap();
        assert_eq!(jobs.len(), 40, "{name}");
        let mut reports = Vec::new();
        job_executor::verify::verify_store(
            reopened.as_ref(),
            &Default::default(),
            |r| reports.push(r),
            |_| {},
        )
        .unwrap();
        assert_eq!(reports.len(), 40, "{name}");
        assert!(
            reports.iter().all(|r| r.is_ok() && r.events == 12),
            "{name}: {reports:?}"
        );
        assert_eq!(reopened.last_position().unwrap(), 480, "{name}");
    }
}

#[test]
fn a_conflict_in_a_group_commit_fails_that_append_alone() {
    for backend in Backend::all("a_conflict_in_a_group_commit_fails_that_append_alone") {
        let name = backend.name();
        let store = backend.open();
        let contested = Uuid::new_v4();
        let barrier = Arc::new(std::sync::Barrier::new(16));
        let handles: Vec<_> = (0..16)
            .map(|n| {
                let (store, barrier) = (store.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    // Half the threads race for one job; the others each
                    // write a job of their own, in the same commits.
                    let job = if n % 2 == 0 {
                        contested
                    } else {
                        Uuid::new_v4()
                    };
                    let mut outcomes = Vec::new();
                    for round in 0..20 {
                        let log = records(job, &completed_log(3));
                        let seq = store.last_seq(job).unwrap();
                        if seq as usize >= log.len() {
                            break;
                        }
                        outcomes.push((round, store.append(&log[seq as usize..=seq as usize])));
                    }
                    (job, outcomes)
                })
            })
            .collect();
        let mut own_jobs = Vec::new();
        let mut contested_ok = 0;
        for handle in handles {
            let (job, outcomes) = handle.join().unwrap();
            for (_, outcome) in &outcomes {
                match outcome {
                    Ok(_) if job == contested => contested_ok += 1,
                    Ok(_) => {}
                    Err(e) => assert!(job == contested && e.is_conflict(), "{name}: {e}"),
                }
            }
            if job != contested {
                own_jobs.push(job);
            }
        }
        // Every event of the contested job was written exactly once.
        assert_eq!(contested_ok, 8, "{name}");
        assert_eq!(store.load_job(contested).unwrap().len(), 8, "{name}");
        for job in own_jobs {
            assert_eq!(
                store.load_job(job).unwrap().len(),
                8,
                "{name}: an uncontested job lost events"
            );
        }
        let mut reports = Vec::new();
        job_executor::verify::verify_store(
            store.as_ref(),
            &Default::default(),
            |r| reports.push(r),
            |_| {},
        )
        .unwrap();
        assert!(reports.iter().all(|r| r.is_ok()), "{name}: {reports:?}");
    }
}

/// A first append whose hook holds the lead of group commit, then appends
/// of `jobs` queued behind it; once they are queued, the lead is released.
/// What each of those appends returned.
fn appends_queued_behind_a_held_leader(
    store: &Arc<dyn EventStore>,
    jobs: [Uuid; 3],
) -> Vec<(Uuid, Result<Vec<u64>, StoreError>)> {
    std::thread::scope(|scope| {
        // Made in here, so that a panic of this thread drops `release`
        // and frees the leader rather than leaving the scope waiting.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (queued_tx, queued) = std::sync::mpsc::channel::<()>();
        // The first append leads, and its hook holds the lead while the
        // others queue behind it.
        let leader = scope.spawn(|| {
            let hook = Box::new(move || held.recv().unwrap());
            store.append_then(&records(Uuid::new_v4(), &[started(0)]), hook)
        });
        // Wait until the leader is inside its hook.
        while store.job_ids().unwrap().is_empty() {
            std::thread::yield_now();
        }
        let followers: Vec<_> = jobs
            .into_iter()
            .map(|job| {
                let (store, queued_tx) = (&store, queued_tx.clone());
                scope.spawn(move || {
                    queued_tx.send(()).unwrap();
                    (job, store.append(&records(job, &[started(0)])))
                })
            })
            .collect();
        for _ in 0..jobs.len() {
            queued.recv().unwrap();
        }
        // The followers are at most a few instructions from the queue;
        // when one is late it commits on its own, which is a conflict
        // too, so the assertions hold either way.
        std::thread::sleep(std::time::Duration::from_millis(50));
        release.send(()).unwrap();
        leader.join().unwrap().unwrap();
        followers.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Two appends of the same seq of one job, queued behind a commit that is
/// still running its hook, go into the next group commit together: the
/// second must fail as a conflict, like any other writer that came second,
/// and the uncontested append beside them must be written.
#[test]
fn a_conflict_inside_one_group_commit_is_a_conflict() {
    for backend in Backend::all("a_conflict_inside_one_group_commit_is_a_conflict") {
        let name = backend.name();
        let store = backend.open();
        let (contested, bystander) = (Uuid::new_v4(), Uuid::new_v4());
        let results =
            appends_queued_behind_a_held_leader(&store, [contested, contested, bystander]);
        let contested_results: Vec<_> = results
            .iter()
            .filter(|(job, _)| *job == contested)
            .map(|(_, r)| r)
            .collect();
        assert_eq!(
            contested_results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{name}: {results:?}"
        );
        for result in &contested_results {
            if let Err(e) = result {
                assert!(
                    matches!(
                        e,
                        StoreError::Conflict {
                            expected: 1,
                            found: 1,
                            ..
                        }
                    ),
                    "{name}: {e}"
                );
            }
        }
        assert!(
            results
                .iter()
                .any(|(job, r)| *job == bystander && r.is_ok()),
            "{name}: {results:?}"
        );
        assert_eq!(store.load_job(contested).unwrap().len(), 1, "{name}");
        assert_eq!(store.last_position().unwrap(), 3, "{name}");
    }
}

#[test]
fn a_commit_hook_runs_once_its_events_are_visible_and_never_for_a_failed_append() {
    let test = "a_commit_hook_runs_once_its_events_are_visible_and_never_for_a_failed_append";
    for backend in Backend::all(test) {
        let name = backend.name();
        let store = backend.open();
        let contested = Uuid::new_v4();
        let seen: Arc<std::sync::Mutex<Vec<(Uuid, u64, u64)>>> = Arc::default();
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|n| {
                // Another connection: it sees only what is committed.
                let reader = backend.reader();
                let (store, seen, barrier) = (store.clone(), seen.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let job = if n % 2 == 0 {
                        contested
                    } else {
                        Uuid::new_v4()
                    };
                    barrier.wait();
                    let log = records(job, &completed_log(4));
                    let mut results = Vec::new();
                    for record in &log {
                        let (seen, seq, reader) = (seen.clone(), record.seq, reader.clone());
                        let hook = Box::new(move || {
                            let visible = reader.last_seq(job).unwrap();
                            seen.lock().unwrap().push((job, seq, visible));
                        });
                        let result = store.append_then(std::slice::from_ref(record), hook);
                        results.push((seq, result.is_ok()));
                    }
                    results
                })
            })
            .collect();
        let mut succeeded = Vec::new();
        for handle in handles {
            succeeded.extend(handle.join().unwrap());
        }
        let seen = seen.lock().unwrap();
        // One hook per successful append, none for a refused one.
        assert_eq!(
            seen.len(),
            succeeded.iter().filter(|(_, ok)| *ok).count(),
            "{name}: {seen:?}"
        );
        assert!(
            succeeded.iter().any(|(_, ok)| !ok),
            "{name}: the race produced no conflict"
        );
        for (job, seq, visible) in seen.iter() {
            assert!(
                visible >= seq,
                "{name}: job {job}: hook for seq {seq} ran when {visible} was committed"
            );
        }
    }
}

#[test]
fn a_commit_hook_runs_after_the_append_on_every_store() {
    for (name, store, _log) in stores("a_commit_hook_runs_after_the_append_on_every_store") {
        let job = Uuid::new_v4();
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        store
            .append_then(
                &records(job, &[started(1)]),
                Box::new(move || flag.store(true, std::sync::atomic::Ordering::SeqCst)),
            )
            .unwrap();
        assert!(ran.load(std::sync::atomic::Ordering::SeqCst), "{name}");
        // A refused append drops its hook uncalled.
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let refused = store.append_then(
            &records(job, &[started(1)]),
            Box::new(move || flag.store(true, std::sync::atomic::Ordering::SeqCst)),
        );
        assert!(refused.unwrap_err().is_conflict(), "{name}");
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst), "{name}");
    }
}

// PostgreSQL: what a schema on a shared server adds to the contract.

/// Every relation and function in the log's schema, with the rows of its
/// `events` table when it has one: what a refused open must leave as it was.
fn pg_snapshot(client: &mut postgres::Client) -> (Vec<String>, Vec<String>) {
    let objects = client
        .query(
            "SELECT relname::text FROM pg_class WHERE relnamespace = current_schema()::regnamespace
             UNION ALL
             SELECT proname::text FROM pg_proc WHERE pronamespace = current_schema()::regnamespace
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let rows = client
        .query("SELECT e::text FROM events e ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    (objects, rows)
}

#[test]
fn postgres_schema_of_another_program_is_refused_untouched() {
    let Some(backend) =
        Backend::postgres("postgres_schema_of_another_program_is_refused_untouched")
    else {
        return;
    };
    let mut client = backend.schema().client();
    client
        .batch_execute(
            "CREATE TABLE events (id serial PRIMARY KEY, what text NOT NULL);
             INSERT INTO events (what) VALUES ('theirs'), ('also theirs');",
        )
        .unwrap();
    let before = pg_snapshot(&mut client);
    for err in [
        backend.try_open().err().expect("a writer is refused"),
        backend.try_reader().err().expect("a reader is refused"),
    ] {
        assert!(matches!(err, StoreError::NotOurs { .. }), "{err}");
        assert!(
            err.to_string().contains("not a job-executor database"),
            "{err}"
        );
        assert!(err.to_string().contains("left untouched"), "{err}");
    }
    assert_eq!(pg_snapshot(&mut client), before, "the schema was modified");
}

#[test]
fn postgres_refuses_truncate_of_events() {
    let Some(backend) = Backend::postgres("postgres_refuses_truncate_of_events") else {
        return;
    };
    let store = backend.open();
    let job_id = with_job_in(store.as_ref());
    let mut raw = backend.raw();
    let err = raw.execute("TRUNCATE events").unwrap_err();
    assert!(err.contains("append-only: TRUNCATE"), "{err}");
    let err = raw.execute("TRUNCATE events CASCADE").unwrap_err();
    assert!(err.contains("append-only: TRUNCATE"), "{err}");
    assert_eq!(raw.count("SELECT count(*) FROM events"), 6);
    assert_eq!(store.load_job(job_id).unwrap().len(), 6);
}

/// Processes opening one fresh schema at the same moment: every open
/// succeeds, and the migrations ran once (one version row, one log head,
/// positions given once each).
#[test]
fn postgres_openers_of_a_fresh_schema_all_succeed_and_migrate_once() {
    const OPENERS: usize = 8;
    for _round in 0..3 {
        let Some(backend) =
            Backend::postgres("postgres_openers_of_a_fresh_schema_all_succeed_and_migrate_once")
        else {
            return;
        };
        let barrier = std::sync::Barrier::new(OPENERS);
        let stores: Vec<Arc<dyn EventStore>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..OPENERS)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        backend.try_open()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().expect("every opener succeeds"))
                .collect()
        });
        let mut raw = backend.raw();
        assert_eq!(raw.count("SELECT count(*) FROM job_executor_schema"), 1);
        assert_eq!(schema_version(&backend), i64::from(PG_SCHEMA_VERSION));
        assert_eq!(raw.count("SELECT count(*) FROM log_head"), 1);
        let mut positions: Vec<u64> = stores
            .iter()
            .flat_map(|store| {
                store
                    .append(&records(Uuid::new_v4(), &[started(0)]))
                    .unwrap()
            })
            .collect();
        positions.sort_unstable();
        assert_eq!(positions, (1..=OPENERS as u64).collect::<Vec<_>>());
    }
}

/// Reads the log's positions as they commit, while `writing`, asserting
/// that none appears before an earlier one; all it saw, in order.
fn follow_positions(backend: &Backend, writing: &AtomicBool) -> Vec<i64> {
    let mut client = backend.schema().client();
    let mut seen: Vec<i64> = Vec::new();
    loop {
        let done = !writing.load(Ordering::SeqCst);
        let after = seen.last().copied().unwrap_or(0);
        let batch: Vec<i64> = client
            .query(
                "SELECT position FROM events WHERE position > $1 ORDER BY position",
                &[&after],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        // A later position visible before an earlier one would be
        // skipped for good by a reader that moved past it.
        let expected: Vec<i64> = (after + 1..=after + batch.len() as i64).collect();
        assert_eq!(batch, expected, "a reader at {after} would skip an event");
        seen.extend(batch);
        if done {
            return seen;
        }
    }
}

/// Writes `jobs` completed jobs, one event per append: (job, seq,
/// position, `clock` when the append began, `clock` when it returned) each.
fn append_one_event_at_a_time(
    store: &dyn EventStore,
    clock: &AtomicU64,
    jobs: usize,
) -> Vec<(Uuid, u64, u64, u64, u64)> {
    let mut appends = Vec::new();
    for _ in 0..jobs {
        let job = Uuid::new_v4();
        for record in records(job, &completed_log(3)) {
            let began = clock.fetch_add(1, Ordering::SeqCst);
            let positions = store.append(std::slice::from_ref(&record)).unwrap();
            let returned = clock.fetch_add(1, Ordering::SeqCst);
            appends.push((job, record.seq, positions[0], began, returned));
        }
    }
    appends
}

/// Many writers (several stores, several threads each) appending at once:
/// positions are 1..=N without a gap, each job's events are in seq order by
/// position, an append that returned before another began has the smaller
/// positions, and a reader that follows positions while the writers run
/// sees every event, in order, never one before an earlier one.
#[test]
fn postgres_positions_are_dense_and_in_commit_order() {
    const STORES: usize = 4;
    const THREADS_PER_STORE: usize = 2;
    const JOBS_PER_THREAD: usize = 3;
    let Some(backend) = Backend::postgres("postgres_positions_are_dense_and_in_commit_order")
    else {
        return;
    };
    let stores: Vec<Arc<dyn EventStore>> = (0..STORES).map(|_| backend.open()).collect();
    let events_per_job = completed_log(3).len();
    let total = STORES * THREADS_PER_STORE * JOBS_PER_THREAD * events_per_job;
    // A logical clock: an append's (started, returned) ticks order it
    // against every other append without reading any time.
    let clock = AtomicU64::new(0);
    let writing = AtomicBool::new(true);
    let (appends, followed) = std::thread::scope(|scope| {
        let follower = scope.spawn(|| follow_positions(&backend, &writing));
        let writers: Vec<_> = (0..STORES * THREADS_PER_STORE)
            .map(|n| {
                let (store, clock) = (stores[n % STORES].as_ref(), &clock);
                scope.spawn(move || append_one_event_at_a_time(store, clock, JOBS_PER_THREAD))
            })
            .collect();
        let joined: Vec<_> = writers.into_iter().map(|h| h.join()).collect();
        // Before anything can panic here: the follower stops only then.
        writing.store(false, Ordering::SeqCst);
        let appends: Vec<_> = joined.into_iter().flat_map(Result::unwrap).collect();
        (appends, follower.join().unwrap())
    });
    assert_eq!(followed, (1..=total as i64).collect::<Vec<_>>());
    let mut stored: Vec<(i64, Uuid, i64)> = backend
        .schema()
        .client()
        .query(
            "SELECT position, job_id, seq FROM events ORDER BY position",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let positions: Vec<i64> = stored.iter().map(|r| r.0).collect();
    assert_eq!(positions, (1..=total as i64).collect::<Vec<_>>());
    stored.sort_by_key(|&(position, job, _)| (job, position));
    for job in stored.chunk_by(|a, b| a.1 == b.1) {
        let seqs: Vec<i64> = job.iter().map(|r| r.2).collect();
        assert_eq!(
            seqs,
            (1..=events_per_job as i64).collect::<Vec<_>>(),
            "{job:?}"
        );
    }
    for &(job, seq, position, _, _) in &appends {
        let row = stored
            .iter()
            .find(|r| r.1 == job && r.2 == seq as i64)
            .unwrap();
        assert_eq!(
            row.0 as u64, position,
            "the position returned is the one stored"
        );
    }
    assert_returned_before_began_is_positioned_before(&appends);
}

/// An append that returned before another began has the smaller position.
fn assert_returned_before_began_is_positioned_before(appends: &[(Uuid, u64, u64, u64, u64)]) {
    for a in appends {
        for b in appends.iter().filter(|b| a.4 < b.3) {
            assert!(
                a.2 < b.2,
                "an append that returned at position {} before another began got {}",
                a.2,
                b.2
            );
        }
    }
}

/// The store's writing sessions commit synchronously even where the
/// server's (here: the connection's) default says otherwise: a trigger
/// records the setting each insert of the store's ran under.
#[test]
fn postgres_writer_sessions_commit_synchronously() {
    let Some(backend) = Backend::postgres("postgres_writer_sessions_commit_synchronously") else {
        return;
    };
    let url = format!("{}%20-csynchronous_commit%3Doff", backend.schema().url());
    let mut raw = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let default: String = raw
        .query_one("SHOW synchronous_commit", &[])
        .unwrap()
        .get(0);
    assert_eq!(default, "off", "the connection's default did not take");
    let store = PgStore::open(&url).unwrap();
    raw.batch_execute(
        "CREATE TABLE commit_settings (setting text NOT NULL);
         CREATE FUNCTION record_commit_setting() RETURNS trigger LANGUAGE plpgsql
         SET search_path FROM CURRENT AS $$
         BEGIN
             INSERT INTO commit_settings VALUES (current_setting('synchronous_commit'));
             RETURN NULL;
         END $$;
         CREATE TRIGGER record_commit_setting AFTER INSERT ON events
             FOR EACH ROW EXECUTE FUNCTION record_commit_setting();",
    )
    .unwrap();
    with_job_in(&store);
    let settings: Vec<String> = raw
        .query("SELECT setting FROM commit_settings", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(settings, vec!["on"; 6]);
}

/// A job's events are found through the index of first events and the
/// (job_no, seq) key: with sequential scans priced out, the plan of the
/// store's query still uses neither a scan of the table.
#[test]
fn postgres_reads_one_job_through_the_indexes() {
    let Some(backend) = Backend::postgres("postgres_reads_one_job_through_the_indexes") else {
        return;
    };
    let job_id = with_job_in(backend.open().as_ref());
    let mut client = backend.schema().client();
    client.batch_execute("SET enable_seqscan = off").unwrap();
    let plan: Vec<String> = client
        .query(
            &format!(
                "EXPLAIN SELECT position, job_id, seq, kind, schema_version, recorded_at, payload,
                        digest, mac
                 FROM events
                 WHERE job_no = (SELECT job_no FROM events WHERE job_id = '{job_id}' AND seq = 1)
                 ORDER BY seq"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("events_job "), "{plan}");
    assert!(plan.contains("events_job_no_seq_key"), "{plan}");
    assert!(!plan.contains("Seq Scan"), "{plan}");
}
