//! The event stores: append-only in the database itself, optimistic
//! concurrency, refusal of foreign files, schema tracking.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{completed, completed_log, records, started, step_started, succeeded};
use job_executor::store::{
    APPLICATION_ID, DB_SCHEMA_VERSION, EventStore, MemoryStore, SqliteOptions, SqliteStore,
    StoreError, Synchronous,
};
use job_executor::{JobExecutor, JobStep, NoOpHandler};
use rusqlite::Connection;
use uuid::Uuid;

fn fresh() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    (dir, path)
}

fn with_job(path: &Path) -> Uuid {
    let store = SqliteStore::open(path).unwrap();
    let job_id = Uuid::new_v4();
    store.append(&records(job_id, &completed_log(2))).unwrap();
    job_id
}

fn stores() -> Vec<(&'static str, Box<dyn EventStore>)> {
    vec![
        ("memory", Box::new(MemoryStore::new())),
        ("sqlite", Box::new(SqliteStore::open_in_memory().unwrap())),
    ]
}

#[test]
fn database_refuses_update_and_delete_of_events() {
    let (_dir, path) = fresh();
    with_job(&path);
    let raw = Connection::open(&path).unwrap();
    let update = raw.execute("UPDATE events SET payload = '{}' WHERE seq = 2", []);
    let err = update.unwrap_err().to_string();
    assert!(err.contains("append-only: UPDATE"), "{err}");
    let delete = raw.execute("DELETE FROM events WHERE seq = 5", []);
    let err = delete.unwrap_err().to_string();
    assert!(err.contains("append-only: DELETE"), "{err}");
    let count: i64 = raw
        .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 6);
}

#[test]
fn database_refuses_gaps_foreign_kinds_and_appends_after_the_end() {
    let (_dir, path) = fresh();
    let job_id = with_job(&path);
    let open_job = Uuid::new_v4();
    SqliteStore::open(&path)
        .unwrap()
        .append(&records(open_job, &[started(1)]))
        .unwrap();
    let raw = Connection::open(&path).unwrap();
    let insert_for = |job_id: Uuid, seq: i64, kind: &str| {
        raw.execute(
            "INSERT INTO events (job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest)
             VALUES (?1, (SELECT job_no FROM events WHERE job_id = ?1 AND seq = 1), ?2, ?3, 1,
                     '2000-01-01T00:00:00.000000Z', '{}', printf('%064d', 0))",
            rusqlite::params![job_id.to_string(), seq, kind],
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    let insert = |seq, kind| insert_for(job_id, seq, kind);
    assert!(
        insert(9, "StepStarted")
            .unwrap_err()
            .contains("seq must directly follow")
    );
    assert!(
        insert(7, "StepStarted")
            .unwrap_err()
            .contains("nothing follows the end of a job")
    );
    // Neither a stranger, nor a list of known kinds, nor a part of one.
    for kind in ["Whatever", "StepStarted,StepSucceeded", "Step", ""] {
        let err = insert_for(open_job, 2, kind).unwrap_err();
        assert!(err.contains("unknown event kind"), "{kind:?}: {err}");
    }
    insert_for(open_job, 2, "StepStarted").expect("a well-formed append is accepted");
    let other = Uuid::new_v4().to_string();
    let first_not_started = raw.execute(
        "INSERT INTO events (job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest)
         VALUES (?1, 99, 1, 'StepStarted', 1, '2000-01-01T00:00:00.000000Z', '{}', printf('%064d', 0))",
        [&other],
    );
    assert!(
        first_not_started
            .unwrap_err()
            .to_string()
            .contains("CHECK constraint failed")
    );
}

#[test]
fn conflicting_appends_are_refused_as_conflicts() {
    for (name, store) in stores() {
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
    for (name, store) in stores() {
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
    }
}

#[test]
fn both_stores_hold_the_same_records() {
    let (memory, sqlite) = (MemoryStore::new(), SqliteStore::open_in_memory().unwrap());
    let jobs: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    // Interleave two jobs' appends so positions and per-job order differ.
    for store in [&memory as &dyn EventStore, &sqlite] {
        let logs: Vec<_> = jobs
            .iter()
            .map(|&j| records(j, &completed_log(2)))
            .collect();
        for i in 0..6 {
            for log in &logs {
                store.append(&log[i..=i]).unwrap();
            }
        }
    }
    assert_eq!(memory.job_ids().unwrap(), jobs);
    assert_eq!(sqlite.job_ids().unwrap(), jobs);
    for &job in &jobs {
        let (m, s) = (memory.load_job(job).unwrap(), sqlite.load_job(job).unwrap());
        assert_eq!(m, s);
        let seqs: Vec<u64> = s.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
        assert!(s.windows(2).all(|w| w[0].position < w[1].position));
    }
    assert!(memory.load_job(Uuid::new_v4()).unwrap().is_empty());
    assert!(sqlite.load_job(Uuid::new_v4()).unwrap().is_empty());
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
    let (_dir, path) = fresh();
    let job_id = with_job(&path);
    let before = SqliteStore::open(&path).unwrap().load_job(job_id).unwrap();
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.load_job(job_id).unwrap(), before);
    assert_eq!(store.job_ids().unwrap(), vec![job_id]);
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
    let (_dir, path) = fresh();
    with_job(&path);
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", DB_SCHEMA_VERSION + 1)
        .unwrap();
    let err = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(err, StoreError::SchemaTooNew { .. }), "{err}");
    assert!(err.to_string().contains("upgrade job-executor"), "{err}");
}

#[test]
fn read_only_open_never_creates() {
    let (_dir, path) = fresh();
    let options = SqliteOptions::reader();
    let err = SqliteStore::open_with(&path, &options).unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert!(!path.exists());
    let job_id = with_job(&path);
    let store = SqliteStore::open_with(&path, &options).unwrap();
    assert_eq!(store.load_job(job_id).unwrap().len(), 6);
    let err = store
        .append(&records(Uuid::new_v4(), &[started(0)]))
        .unwrap_err();
    assert!(matches!(err, StoreError::ReadOnly { .. }), "{err}");
}

#[test]
fn two_connections_racing_on_one_job_exactly_one_wins() {
    let (_dir, path) = fresh();
    SqliteStore::open(&path).unwrap();
    let job_id = Uuid::new_v4();
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (path, barrier) = (path.clone(), barrier.clone());
            std::thread::spawn(move || {
                let store = SqliteStore::open(&path).unwrap();
                barrier.wait();
                store.append(&records(job_id, &[started(0)]))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(e) if e.is_conflict()))
    );
    assert_eq!(
        SqliteStore::open(&path)
            .unwrap()
            .load_job(job_id)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn threads_running_jobs_on_one_sqlite_file_lose_nothing() {
    let (_dir, path) = fresh();
    let store = Arc::new(
        SqliteStore::open_with(
            &path,
            &SqliteOptions::default().with_synchronous(Synchronous::Normal),
        )
        .unwrap(),
    );
    let mut executor = JobExecutor::builder().store(store.clone()).build();
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
    let reopened = SqliteStore::open(&path).unwrap();
    let jobs = reopened.job_ids().unwrap();
    assert_eq!(jobs.len(), 40);
    let mut reports = Vec::new();
    job_executor::verify::verify_store(&reopened, &Default::default(), |r| reports.push(r), |_| {})
        .unwrap();
    assert!(reports.iter().all(|r| r.is_ok() && r.events == 12));
}

#[test]
fn a_conflict_in_a_group_commit_fails_that_append_alone() {
    let (_dir, path) = fresh();
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let contested = Uuid::new_v4();
    let barrier = Arc::new(std::sync::Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|n| {
            let (store, barrier) = (store.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                // Half the threads race for one job; the others each write
                // a job of their own, in the same commits.
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
                Err(e) => assert!(job == contested && e.is_conflict(), "{e}"),
            }
        }
        if job != contested {
            own_jobs.push(job);
        }
    }
    // Every event of the contested job was written exactly once.
    assert_eq!(contested_ok, 8);
    assert_eq!(store.load_job(contested).unwrap().len(), 8);
    for job in own_jobs {
        assert_eq!(
            store.load_job(job).unwrap().len(),
            8,
            "an uncontested job lost events"
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
    assert!(reports.iter().all(|r| r.is_ok()), "{reports:?}");
}

#[test]
fn a_commit_hook_runs_once_its_events_are_visible_and_never_for_a_failed_append() {
    let (_dir, path) = fresh();
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    let contested = Uuid::new_v4();
    let seen: Arc<std::sync::Mutex<Vec<(Uuid, u64, u64)>>> = Arc::default();
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let handles: Vec<_> = (0..8)
        .map(|n| {
            let (store, seen, barrier, path) =
                (store.clone(), seen.clone(), barrier.clone(), path.clone());
            std::thread::spawn(move || {
                // Another connection: it sees only what is committed.
                let reader = Arc::new(common::reader(&path));
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
        "{seen:?}"
    );
    assert!(
        succeeded.iter().any(|(_, ok)| !ok),
        "the race produced no conflict"
    );
    for (job, seq, visible) in seen.iter() {
        assert!(
            visible >= seq,
            "job {job}: hook for seq {seq} ran when {visible} was committed"
        );
    }
}

#[test]
fn a_commit_hook_runs_after_the_append_on_every_store() {
    for (name, store) in stores() {
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
