//! Many processes and threads on one log at once: creating, migrating,
//! appending and reading it together, nothing fails and nothing is lost.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use crate::common;

use common::{cli, completed_log, reader, records};
use job_executor::chain::{Digest, chain};
use job_executor::events::EventRecord;
use job_executor::store::{EventStore, SqliteStore};
use job_executor::verify::{VerifyOptions, verify_store};
use uuid::Uuid;

/// Processes started together in each round.
const PROCESSES: usize = 8;

const PLAN: &str = r#"{
  "contract_id": "6f1c2a6e-8a49-4d1a-9d55-0e3a1f5b7c11",
  "steps": [
    {"step_index": 0, "step_type": "capability_enable", "target": "billing"},
    {"step_index": 1, "step_type": "configuration_change", "target": "billing"}
  ]
}"#;

fn spawn_run(dir: &Path, db: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_job-executor"))
        .args(["run", "plan.json", "--db"])
        .arg(db)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts")
}

/// Starts `PROCESSES` runs of the plan on `db` at once and asserts that
/// every one completed its job.
fn run_together(dir: &Path, db: &Path) {
    let children: Vec<Child> = (0..PROCESSES).map(|_| spawn_run(dir, db)).collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "a run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn assert_verifies(dir: &Path, db: &Path, jobs: usize) {
    let out = cli(dir, &["verify", "--db", db.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains(&format!("ok: {jobs} jobs")), "{text}");
}

#[test]
fn many_processes_create_one_database_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plan.json"), PLAN).unwrap();
    // The race this guards against (two processes creating the schema)
    // showed up in most rounds; twelve rounds make a miss unlikely.
    for round in 0..12 {
        let db = dir.path().join(format!("new-{round}.db"));
        run_together(dir.path(), &db);
        assert_verifies(dir.path(), &db, PROCESSES);
    }
}

#[test]
fn many_processes_migrate_an_old_schema_log_at_once() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema-v1");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("plan.json"), PLAN).unwrap();
    for round in 0..6 {
        let db = dir.path().join(format!("old-{round}.db"));
        std::fs::copy(fixture.join("log.db"), &db).unwrap();
        run_together(dir.path(), &db);
        // The five jobs of the fixture, sealed once, and one per process.
        assert_verifies(dir.path(), &db, 5 + PROCESSES);
        // The old jobs still replay to the evidence they printed then.
        for n in 1..=5 {
            let job = format!("00000000-0000-0000-0000-00000000100{n}");
            let out = cli(dir.path(), &["replay", &job, "--db", db.to_str().unwrap()]);
            assert_eq!(out.status.code(), Some(0));
            let replayed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let then: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(fixture.join(format!("evidence-{n}.json"))).unwrap(),
            )
            .unwrap();
            for (key, value) in then.as_object().unwrap() {
                assert_eq!(&replayed[key], value, "job {n}, key {key}");
            }
        }
    }
}

#[test]
fn many_threads_open_one_new_database_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..10 {
        let path = dir.path().join(format!("threads-{round}.db"));
        let barrier = Arc::new(Barrier::new(PROCESSES));
        let threads: Vec<_> = (0..PROCESSES)
            .map(|_| {
                let (path, barrier) = (path.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let store = SqliteStore::open(&path).unwrap();
                    let job = Uuid::new_v4();
                    store.append(&records(job, &completed_log(1))).unwrap();
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(reader(&path).job_ids().unwrap().len(), PROCESSES);
    }
}

#[test]
fn a_command_that_must_not_create_a_database_never_does() {
    let dir = tempfile::tempdir().unwrap();
    for command in [&["recover"][..], &["resume", &Uuid::nil().to_string()]] {
        let mut args = command.to_vec();
        args.extend(["--db", "absent.db"]);
        let out = cli(dir.path(), &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no such database"),
            "{args:?}"
        );
        assert!(
            !dir.path().join("absent.db").exists(),
            "{args:?} created it"
        );
    }
}

/// A whole-log verify of a million events takes a second or more; appends
/// from another thread go on meanwhile, because reads have connections of
/// their own.
#[test]
fn appends_continue_while_a_whole_log_verify_runs() {
    const JOBS: u64 = 1_000;
    const EVENTS_PER_JOB: u64 = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.db");
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    // A job of 499 steps that all succeed: 1 + 2 × 499 + 1 = 1,000 events.
    let log = completed_log((EVENTS_PER_JOB as u32 - 2) / 2);
    assert_eq!(log.len() as u64, EVENTS_PER_JOB);
    // Encoded once; each job only re-chains it under its own id.
    let template = records(Uuid::nil(), &log);
    for _ in 0..JOBS {
        store.append(&rechained(&template, Uuid::new_v4())).unwrap();
    }
    let verifying = Arc::new(AtomicBool::new(true));
    let appended_during = Arc::new(AtomicU64::new(0));
    let appender = {
        let (store, verifying, appended) =
            (store.clone(), verifying.clone(), appended_during.clone());
        std::thread::spawn(move || {
            let small = completed_log(1);
            while verifying.load(Ordering::SeqCst) {
                store.append(&records(Uuid::new_v4(), &small)).unwrap();
                if verifying.load(Ordering::SeqCst) {
                    appended.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let summary = verify_store(
        store.as_ref(),
        &VerifyOptions::default(),
        |report| assert!(report.is_ok(), "{:?}", report.violations),
        |_| {},
    )
    .unwrap();
    verifying.store(false, Ordering::SeqCst);
    appender.join().unwrap();
    assert!(summary.events >= JOBS * EVENTS_PER_JOB, "{summary:?}");
    let appended = appended_during.load(Ordering::SeqCst);
    // Appends stalled behind the scan would all wait for its end: none
    // would be counted while it ran.
    assert!(
        appended >= 10,
        "only {appended} appends completed while verify read {} events",
        summary.events
    );
}

/// `template`'s records as job `job_id`'s, with the digests that gives.
fn rechained(template: &[EventRecord], job_id: Uuid) -> Vec<EventRecord> {
    let mut head = Digest::GENESIS;
    template
        .iter()
        .map(|record| {
            let mut record = EventRecord {
                job_id,
                ..record.clone()
            };
            head = chain(&head, &record);
            record.digest = Some(head.to_hex());
            record
        })
        .collect()
}

/// A callback handed rows by a scan may call back into the store: it holds
/// no lock of the store's.
#[test]
fn a_scan_callback_may_call_the_store() {
    let dir = tempfile::tempdir().unwrap();
    for store in [
        SqliteStore::open_in_memory().unwrap(),
        SqliteStore::open(dir.path().join("callback.db")).unwrap(),
    ] {
        let job = Uuid::new_v4();
        store.append(&records(job, &completed_log(2))).unwrap();
        let mut seen = 0;
        store
            .scan(&mut |_, row| {
                let record = row.unwrap();
                // A read and an append from inside the callback.
                assert!(store.last_seq(record.job_id).unwrap() >= 1);
                if seen == 0 {
                    store
                        .append(&records(Uuid::new_v4(), &completed_log(0)))
                        .unwrap();
                }
                seen += 1;
            })
            .unwrap();
        assert!(seen >= 6, "{seen}");
        let mut visited = 0;
        store
            .visit_job(job, &mut |_| {
                visited += 1;
                store.load_job(job).unwrap().len() == 6
            })
            .unwrap();
        assert_eq!(visited, 6);
    }
}

/// A commit hook that panics does not wedge group commit: its own append is
/// committed and its panic reaches its own caller; every other thread's
/// appends, during and after, complete.
#[test]
fn a_panicking_commit_hook_wedges_nothing() {
    const THREADS: usize = 8;
    const APPENDS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path().join("hooks.db")).unwrap());
    let hooks_run = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(THREADS));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (store, hooks_run, barrier) = (store.clone(), hooks_run.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut panicked = None;
                for a in 0..APPENDS {
                    let job = Uuid::new_v4();
                    let hooks_run = hooks_run.clone();
                    let hook: Box<dyn FnOnce() + Send> = if (t, a) == (3, 5) {
                        Box::new(|| panic!("hook failure"))
                    } else {
                        Box::new(move || {
                            hooks_run.fetch_add(1, Ordering::SeqCst);
                        })
                    };
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        store.append_then(&records(job, &completed_log(1)), hook)
                    }));
                    match outcome {
                        Ok(result) => {
                            result.unwrap();
                        }
                        Err(payload) => panicked = Some((job, payload)),
                    }
                }
                panicked
            })
        })
        .collect();
    let panicked: Vec<_> = threads
        .into_iter()
        .filter_map(|t| t.join().unwrap())
        .collect();
    assert_eq!(panicked.len(), 1);
    let (job, payload) = &panicked[0];
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"hook failure"));
    // Committed before its hook ran.
    assert_eq!(store.last_seq(*job).unwrap(), 4);
    assert_eq!(
        hooks_run.load(Ordering::SeqCst),
        (THREADS * APPENDS - 1) as u64
    );
    // Later appends, from other threads, still complete.
    let later: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            std::thread::spawn(move || store.append(&records(Uuid::new_v4(), &completed_log(1))))
        })
        .collect();
    for thread in later {
        thread.join().unwrap().unwrap();
    }
    assert_eq!(store.job_ids().unwrap().len(), THREADS * APPENDS + 4);
}
