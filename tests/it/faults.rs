//! Faults around the engine: a busy database, outcomes that cannot be
//! recorded, unreadable jobs, hung observers, and handlers that keep their
//! threads. Nothing hangs, and no known fact is lost.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common;

use common::{completed_log, records};
use job_executor::events::Event;
use job_executor::projection::replay_all;
use job_executor::store::{EventStore, SqliteOptions, SqliteStore};
use job_executor::{
    ExecutionContext, ExecutionResult, ExecutorError, JobExecutor, JobStatus, JobStep, PoolOptions,
    Recovery, StepOutput,
};
use serde_json::{Value, json};
use uuid::Uuid;

fn step(index: u32, step_type: &str, timeout_seconds: u64) -> JobStep {
    JobStep {
        timeout_seconds,
        ..JobStep::new(index, step_type, "t")
    }
}

/// A store on `path` that gives up on a lock after 100 ms.
fn impatient_store(path: &Path) -> Arc<SqliteStore> {
    let options = SqliteOptions::default().with_busy_timeout(Duration::from_millis(100));
    Arc::new(SqliteStore::open_with(path, &options).unwrap())
}

/// How long a [`locking_handler`] keeps the database locked.
enum Hold {
    For(Duration),
    /// Until a message comes (or the sender is dropped).
    Until(Mutex<Option<mpsc::Receiver<()>>>),
}

/// A handler that, as it returns, leaves the database locked by another
/// connection: the outcome's append finds it busy.
fn locking_handler(
    path: &Path,
    hold: Hold,
    calls: &Arc<AtomicUsize>,
) -> impl Fn(&JobStep, &ExecutionContext) -> StepOutput + Send + Sync + 'static {
    let path = path.to_path_buf();
    let calls = calls.clone();
    move |_: &JobStep, _: &ExecutionContext| {
        calls.fetch_add(1, Ordering::SeqCst);
        let holder = rusqlite::Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let release = match &hold {
            Hold::For(duration) => Err(*duration),
            Hold::Until(release) => Ok(release.lock().unwrap().take()),
        };
        std::thread::spawn(move || {
            match release {
                Err(duration) => std::thread::sleep(duration),
                Ok(release) => {
                    let _ = release.map(|r| r.recv());
                }
            }
            holder.execute_batch("COMMIT").unwrap();
        });
        StepOutput::succeeded(json!({"done": true}))
    }
}

#[test]
fn a_busy_database_is_ridden_out_when_recording_an_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.db");
    let calls = Arc::new(AtomicUsize::new(0));
    let mut executor = JobExecutor::builder().store(impatient_store(&path)).build();
    // Locked for 0.8 s, eight times the busy timeout: the append only
    // succeeds because it is tried again.
    executor.register_handler(
        "lock",
        locking_handler(&path, Hold::For(Duration::from_millis(800)), &calls),
    );
    let job = Uuid::new_v4();
    let result = executor
        .execute_job(job, Uuid::nil(), &[step(0, "lock", 30)], None, "t")
        .unwrap();
    assert_eq!(result.final_status, JobStatus::Completed);
    assert_eq!(result.step_results[0].output, Some(json!({"done": true})));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn an_outcome_that_cannot_be_recorded_comes_back_and_recover_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locked.db");
    let calls = Arc::new(AtomicUsize::new(0));
    let mut executor = JobExecutor::builder().store(impatient_store(&path)).build();
    // Locked until the executor has given up.
    let (unlock, locked) = mpsc::channel();
    let hold = Hold::Until(Mutex::new(Some(locked)));
    executor.register_handler("lock", locking_handler(&path, hold, &calls));
    executor.register_handler("ok", |_: &JobStep, _: &ExecutionContext| {
        StepOutput::succeeded(json!({}))
    });
    let job = Uuid::new_v4();
    let steps = [step(0, "lock", 30), step(1, "ok", 30)];
    let err = executor
        .execute_job(job, Uuid::nil(), &steps, None, "t")
        .unwrap_err();
    let ExecutorError::OutcomeNotRecorded { outcome, source } = &err else {
        panic!("unexpected error: {err}");
    };
    assert!(source.is_transient(), "{source}");
    assert_eq!((outcome.job_id, outcome.step_index), (job, 0));
    assert!(
        matches!(&outcome.event, Event::StepSucceeded(s) if s.output == json!({"done": true})),
        "{outcome:?}"
    );
    // Once the lock is gone, recovery records the outcome the executor
    // kept — not "interrupted" — and the job goes on from there.
    unlock.send(()).unwrap();
    let give_up = Instant::now() + Duration::from_secs(10);
    let recovered = loop {
        // The holder commits on its own thread: until it has, recovery
        // finds the database busy.
        match executor.recover() {
            Err(e)
                if Instant::now() < give_up
                    && e.store_error().is_some_and(|s| s.is_transient()) =>
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            other => break other.unwrap(),
        }
    };
    assert_eq!(
        recovered,
        vec![
            Recovery::OutcomeRecorded {
                job_id: job,
                step_index: 0
            },
            Recovery::Resumable {
                job_id: job,
                next_step: 1
            },
        ]
    );
    let result = executor.resume(job, None, "t").unwrap();
    assert_eq!(result.final_status, JobStatus::Completed);
    assert_eq!(result.step_results[0].output, Some(json!({"done": true})));
    assert_eq!(calls.load(Ordering::SeqCst), 1, "the step never ran again");
    // Recorded once: recovery has nothing left to do.
    assert!(executor.recover().unwrap().is_empty());
}

/// Two jobs with a step in doubt; one of them has a row that no longer
/// decodes. Recovery reports that one and still closes the other.
#[test]
fn recover_goes_on_past_a_job_it_cannot_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.db");
    let (broken, fine) = (Uuid::from_u128(1), Uuid::from_u128(2));
    {
        let store = SqliteStore::open(&path).unwrap();
        for job in [broken, fine] {
            let log = common::stopped_between_steps(2, "noop");
            let mut log = log;
            log.push(common::step_started(1));
            store.append(&records(job, &log)).unwrap();
        }
    }
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch("DROP TRIGGER events_no_update").unwrap();
    raw.execute(
        "UPDATE events SET payload = '{\"unknown_field\":1}' WHERE job_id = ?1 AND seq = 4",
        [broken.to_string()],
    )
    .unwrap();
    drop(raw);
    let executor = JobExecutor::builder()
        .store(Arc::new(SqliteStore::open(&path).unwrap()))
        .build();
    let recovered = executor.recover().unwrap();
    assert_eq!(recovered.len(), 2, "{recovered:?}");
    assert!(
        matches!(&recovered[0], Recovery::Unreadable { job_id, error } if *job_id == broken && error.contains("seq 4")),
        "{recovered:?}"
    );
    assert_eq!(
        recovered[1],
        Recovery::Interrupted {
            job_id: fine,
            step_index: 1
        }
    );
    // The CLI says so, and exits 1.
    let out = common::cli(dir.path(), &["recover", "--db", path.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("{broken}: cannot be read")),
        "{text}"
    );
}

#[test]
fn whole_log_replay_reports_unreadable_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.db");
    let store = SqliteStore::open(&path).unwrap();
    for n in 1..=3 {
        store
            .append(&records(Uuid::from_u128(n), &completed_log(1)))
            .unwrap();
    }
    drop(store);
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch("DROP TRIGGER events_no_update").unwrap();
    // A job id that is no UUID, in the middle of job 2.
    raw.execute(
        "UPDATE events SET job_id = 'not-a-uuid-not-a-uuid-not-a-uuid-xyz' WHERE job_id = ?1 AND seq = 2",
        [Uuid::from_u128(2).to_string()],
    )
    .unwrap();
    drop(raw);
    let mut seen = Vec::new();
    replay_all(&common::reader(&path), |job, result| {
        seen.push((job, result.map(|r| r.final_status)))
    })
    .unwrap();
    let failures: Vec<_> = seen.iter().filter(|(_, r)| r.is_err()).collect();
    // The unreadable row itself, and job 2, whose seq 2 is then missing.
    assert_eq!(failures.len(), 2, "{seen:?}");
    assert!(failures.iter().any(|(_, r)| {
        r.as_ref()
            .unwrap_err()
            .to_string()
            .contains("unreadable row")
    }));
    assert_eq!(seen.iter().filter(|(_, r)| r.is_ok()).count(), 2);
}

/// `jobs` jobs of the one `step`, each executed on a thread of its own, all
/// at once; their results.
fn execute_at_once(executor: &JobExecutor, jobs: usize, step: &JobStep) -> Vec<ExecutionResult> {
    std::thread::scope(|scope| {
        let running: Vec<_> = (0..jobs)
            .map(|_| {
                scope.spawn(|| {
                    executor.execute_job(
                        Uuid::new_v4(),
                        Uuid::nil(),
                        std::slice::from_ref(step),
                        None,
                        "t",
                    )
                })
            })
            .collect();
        running
            .into_iter()
            .map(|r| r.join().unwrap().unwrap())
            .collect()
    })
}

#[test]
fn the_handler_pool_is_capped_and_a_step_waiting_past_its_deadline_never_runs() {
    const CAP: usize = 2;
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let options = PoolOptions::default().with_threads_max(CAP);
    let mut executor = JobExecutor::builder()
        .store(store)
        .handler_pool(options)
        .build();
    // Stuck handlers ignore their cancel signal until released.
    let (release, released) = mpsc::channel::<()>();
    let released = Arc::new(Mutex::new(released));
    let entered = Arc::new(AtomicUsize::new(0));
    {
        let (released, entered) = (released.clone(), entered.clone());
        executor.register_handler("stuck", move |_: &JobStep, _: &ExecutionContext| {
            entered.fetch_add(1, Ordering::SeqCst);
            let _ = released.lock().unwrap().recv();
            StepOutput::succeeded(json!({}))
        });
    }
    let ok_calls = Arc::new(AtomicUsize::new(0));
    {
        let ok_calls = ok_calls.clone();
        executor.register_handler("ok", move |_: &JobStep, _: &ExecutionContext| {
            ok_calls.fetch_add(1, Ordering::SeqCst);
            StepOutput::succeeded(json!({}))
        });
    }
    // Six jobs at once whose handlers never return: CAP of them are driven
    // by threads that call their handlers themselves, CAP more hand their
    // step to the handler pool, and the rest never start; every job still
    // ends, at its deadline.
    let results = execute_at_once(&executor, 6, &step(0, "stuck", 1));
    assert_eq!(entered.load(Ordering::SeqCst), 2 * CAP);
    let errors: Vec<String> = results
        .iter()
        .map(|r| r.step_results[0].error.clone().unwrap_or_default())
        .collect();
    assert!(results.iter().all(|r| r.final_status == JobStatus::Failed));
    let never_started = errors
        .iter()
        .filter(|e| e.contains("the handler never started"))
        .count();
    assert_eq!(never_started, 6 - 2 * CAP, "{errors:?}");
    // With every thread of both pools still held, a quick step times out
    // unstarted too...
    let job = Uuid::new_v4();
    let result = executor
        .execute_job(job, Uuid::nil(), &[step(0, "ok", 1)], None, "t")
        .unwrap();
    assert_eq!(result.final_status, JobStatus::Failed);
    // ...and never runs later, when threads free.
    for _ in 0..2 * CAP {
        release.send(()).unwrap();
    }
    let result = executor
        .execute_job(Uuid::new_v4(), Uuid::nil(), &[step(0, "ok", 5)], None, "t")
        .unwrap();
    assert_eq!(result.final_status, JobStatus::Completed);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        ok_calls.load(Ordering::SeqCst),
        1,
        "the timed-out step ran late"
    );
}

/// An observer that answers at once, except on the call given, where it
/// waits until released.
struct HangingObserver {
    calls: AtomicUsize,
    hang_on_call: usize,
    release: Mutex<mpsc::Receiver<()>>,
}

impl job_executor::HealthObserver for HangingObserver {
    fn observe_health(&self) -> Value {
        let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if call == self.hang_on_call {
            let _ = self.release.lock().unwrap().recv();
        }
        json!({"call": call})
    }
}

#[test]
fn a_hung_health_observer_does_not_hold_the_job() {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let mut executor = JobExecutor::builder()
        .store(store.clone())
        .health_timeout(Duration::from_millis(200))
        .build();
    {
        let calls = calls.clone();
        executor.register_handler("ok", move |_: &JobStep, _: &ExecutionContext| {
            calls.fetch_add(1, Ordering::SeqCst);
            StepOutput::succeeded(json!({"ran": true}))
        });
    }
    let (release, released) = mpsc::channel();
    // Call 1 is before the first step; call 2, after it, hangs.
    let observer = HangingObserver {
        calls: AtomicUsize::new(0),
        hang_on_call: 2,
        release: Mutex::new(released),
    };
    let job = Uuid::new_v4();
    let steps = [step(0, "ok", 5), step(1, "ok", 5)];
    std::thread::scope(|scope| {
        let running =
            scope.spawn(|| executor.execute_job(job, Uuid::nil(), &steps, Some(&observer), "t"));
        // While the observer still hangs, the step's outcome is recorded
        // (without health) at the deadline.
        let give_up = Instant::now() + Duration::from_secs(10);
        while store.last_seq(job).unwrap() < 3 && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = store.load_job(job).unwrap();
        assert_eq!(log.len(), 3, "the outcome was not recorded meanwhile");
        match log[2].decode().unwrap().event {
            Event::StepSucceeded(s) => {
                assert_eq!(s.output, json!({"ran": true}));
                assert_eq!(s.health_after, None);
            }
            other => panic!("unexpected {other:?}"),
        }
        release.send(()).unwrap();
        let err = running.join().unwrap().unwrap_err();
        assert!(
            matches!(&err, ExecutorError::HealthObserver { message, .. } if message.contains("did not answer within 0.2 s")),
            "{err}"
        );
    });
    // Nothing more was appended when the observer came back; the job
    // resumes at its next step.
    assert_eq!(store.last_seq(job).unwrap(), 3);
    let result = executor.resume(job, None, "t").unwrap();
    assert_eq!(result.final_status, JobStatus::Completed);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[test]
fn a_slow_observer_before_the_first_step_starts_nothing() {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let executor = JobExecutor::builder()
        .store(store.clone())
        .health_timeout(Duration::from_millis(50))
        .build();
    struct Slow;
    impl job_executor::HealthObserver for Slow {
        fn observe_health(&self) -> Value {
            std::thread::sleep(Duration::from_millis(200));
            json!({})
        }
    }
    let job = Uuid::new_v4();
    let err = executor
        .execute_job(job, Uuid::nil(), &[step(0, "ok", 5)], Some(&Slow), "t")
        .unwrap_err();
    assert!(matches!(err, ExecutorError::HealthObserver { .. }), "{err}");
    assert_eq!(store.last_seq(job).unwrap(), 0);
}

/// A store whose commit of a `StepStarted` has an unknown outcome (the
/// connection dropped during COMMIT), once: committed or not, as chosen.
struct UnknownCommit {
    inner: Arc<dyn EventStore>,
    committed: bool,
    done: std::sync::atomic::AtomicBool,
}

impl EventStore for UnknownCommit {
    fn append_with(
        &self,
        records: &[job_executor::events::EventRecord],
        options: job_executor::store::AppendOptions,
    ) -> Result<Vec<u64>, job_executor::store::StoreError> {
        let starts = records.last().is_some_and(|r| r.kind == "StepStarted");
        if starts && !self.done.swap(true, Ordering::SeqCst) {
            if self.committed {
                // Committed, but the hook that starts the handler never runs.
                let mut options = options;
                options.committed = None;
                self.inner.append_with(records, options)?;
            }
            return Err(job_executor::store::StoreError::OutcomeUnknown {
                detail: "connection lost during COMMIT".into(),
            });
        }
        self.inner.append_with(records, options)
    }
    fn last_seq(&self, job_id: Uuid) -> Result<u64, job_executor::store::StoreError> {
        self.inner.last_seq(job_id)
    }
    fn visit_job(
        &self,
        job_id: Uuid,
        visit: &mut dyn FnMut(&job_executor::events::EventRecord) -> bool,
    ) -> Result<(), job_executor::store::StoreError> {
        self.inner.visit_job(job_id, visit)
    }
    fn scan(
        &self,
        visit: &mut dyn FnMut(
            u64,
            Result<&job_executor::events::EventRecord, job_executor::store::StoreError>,
        ),
    ) -> Result<(), job_executor::store::StoreError> {
        self.inner.scan(visit)
    }
    fn last_position(&self) -> Result<u64, job_executor::store::StoreError> {
        self.inner.last_position()
    }
    fn job_ids(&self) -> Result<Vec<Uuid>, job_executor::store::StoreError> {
        self.inner.job_ids()
    }
}

/// A handler starts only once its `StepStarted` commit is acknowledged.
/// When the commit's outcome is unknown, the log is read back: a start that
/// was not committed is appended again and runs; one that was committed is
/// recorded failed, not run — its handler never starts.
#[test]
fn a_step_whose_start_has_an_unknown_outcome_never_starts_its_handler() {
    for committed in [false, true] {
        let inner: Arc<dyn EventStore> = Arc::new(SqliteStore::open_in_memory().unwrap());
        let store = Arc::new(UnknownCommit {
            inner: inner.clone(),
            committed,
            done: std::sync::atomic::AtomicBool::new(false),
        });
        let calls = Arc::new(AtomicUsize::new(0));
        let mut executor = JobExecutor::builder().store(store).build();
        let count = calls.clone();
        executor.register_handler("ok", move |_: &JobStep, _: &ExecutionContext| {
            count.fetch_add(1, Ordering::SeqCst);
            StepOutput::succeeded(json!({}))
        });
        let job = Uuid::new_v4();
        let result = executor
            .execute_job(job, Uuid::nil(), &[step(0, "ok", 5)], None, "t")
            .unwrap();
        if committed {
            assert_eq!(calls.load(Ordering::SeqCst), 0, "the handler started");
            assert_eq!(result.final_status, JobStatus::Failed);
            let error = result.step_results[0].error.clone().unwrap();
            assert!(error.contains("its handler was not started"), "{error}");
        } else {
            assert_eq!(calls.load(Ordering::SeqCst), 1);
            assert_eq!(result.final_status, JobStatus::Completed);
        }
        let report = job_executor::verify::verify_job(
            job,
            &inner.load_job(job).unwrap(),
            &Default::default(),
        );
        assert!(report.is_ok(), "{:?}", report.violations);
    }
}
