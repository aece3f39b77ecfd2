//! Timeouts, cancellation, resumption, the `command` handler and storage
//! faults, through the library.

use crate::common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use job_executor::command::{CommandHandler, OUTPUT_BYTES_MAX};
use job_executor::events::FailureKind;
use job_executor::store::{EventStore, SqliteOptions, SqliteStore, StoreError};
use job_executor::verify::verify_job;
use job_executor::{
    CancelRequest, ExecutionContext, ExecutorError, HealthObserver, JobExecutor, JobStatus,
    JobStep, NoOpHandler, Recovery, StepOutput, StepStatus,
};
use serde_json::json;
use uuid::Uuid;

fn step(i: u32, step_type: &str, timeout_seconds: u64) -> JobStep {
    let mut step = JobStep::new(i, step_type, "t");
    step.timeout_seconds = timeout_seconds;
    step
}

fn command(i: u32, argv: &[&str], timeout_seconds: u64) -> JobStep {
    let mut step = step(i, "command", timeout_seconds);
    step.parameters = json!({ "argv": argv });
    step
}

fn kinds(store: &dyn EventStore, job: Uuid) -> Vec<String> {
    store
        .load_job(job)
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect()
}

fn assert_verifies(store: &dyn EventStore, job: Uuid) {
    let report = verify_job(job, &store.load_job(job).unwrap(), &Default::default());
    assert!(report.is_ok(), "{:?}", report.violations);
}

// --- timeouts -------------------------------------------------------------------

#[test]
fn a_handler_that_ignores_its_deadline_cannot_hold_the_job() {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let mut executor = JobExecutor::builder().store(store.clone()).build();
    let finished_late = Arc::new(AtomicUsize::new(0));
    let late = finished_late.clone();
    executor.register_handler("stuck", move |_: &JobStep, _: &ExecutionContext| {
        std::thread::sleep(Duration::from_millis(1500));
        late.fetch_add(1, Ordering::SeqCst);
        StepOutput::succeeded(json!("too late"))
    });
    executor.register_handler("ok", NoOpHandler);
    let job = Uuid::new_v4();
    let start = Instant::now();
    let result = executor
        .execute_job(
            job,
            Uuid::nil(),
            &[step(0, "stuck", 1), step(1, "ok", 5)],
            None,
            "t",
        )
        .unwrap();
    let waited = start.elapsed();
    assert!(
        waited < Duration::from_millis(1400),
        "the executor waited {waited:?}"
    );
    assert_eq!(result.final_status, JobStatus::Failed);
    let failed = &result.step_results[0];
    assert_eq!(failed.failure_kind, Some(FailureKind::Timeout));
    assert_eq!(failed.error.as_deref(), Some("timed out after 1 s"));
    assert_eq!(result.steps_executed, 1);
    assert_eq!(
        kinds(store.as_ref(), job),
        ["JobStarted", "StepStarted", "StepFailed", "JobHalted"]
    );
    // The late result is never recorded.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        finished_late.load(Ordering::SeqCst),
        1,
        "the handler did finish"
    );
    assert_eq!(store.load_job(job).unwrap().len(), 4);
    assert_verifies(store.as_ref(), job);
    // The executor is still usable while the stuck worker was busy.
    let again = executor
        .execute_job(Uuid::new_v4(), Uuid::nil(), &[step(0, "ok", 1)], None, "t")
        .unwrap();
    assert_eq!(again.final_status, JobStatus::Completed);
}

#[test]
fn a_handler_sees_its_deadline_and_cancel_signal() {
    let mut executor = JobExecutor::new();
    let (seen, saw) = mpsc::channel();
    executor.register_handler("polite", move |_: &JobStep, ctx: &ExecutionContext| {
        let deadline = ctx.deadline.expect("a deadline");
        let left = deadline.saturating_duration_since(Instant::now());
        while !ctx.cancel.is_cancelled() {
            std::thread::sleep(Duration::from_millis(10));
        }
        seen.send(left).unwrap();
        StepOutput::failed("stopped on signal")
    });
    let result = executor
        .execute_job(
            Uuid::new_v4(),
            Uuid::nil(),
            &[step(0, "polite", 1)],
            None,
            "t",
        )
        .unwrap();
    assert_eq!(
        result.step_results[0].failure_kind,
        Some(FailureKind::Timeout)
    );
    let left = saw
        .recv_timeout(Duration::from_secs(2))
        .expect("the handler saw the signal");
    assert!(
        left > Duration::from_millis(900) && left <= Duration::from_secs(1),
        "{left:?}"
    );
}

#[test]
fn zero_timeout_is_refused() {
    let executor = JobExecutor::new();
    let err = executor
        .execute_job(Uuid::new_v4(), Uuid::nil(), &[step(0, "x", 0)], None, "t")
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("timeout_seconds must be at least 1"),
        "{err}"
    );
}

// --- the command handler ------------------------------------------------------------

fn command_executor() -> (JobExecutor, Arc<SqliteStore>) {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let mut executor = JobExecutor::builder().store(store.clone()).build();
    executor.register_handler("command", CommandHandler);
    (executor, store)
}

fn run_one(executor: &JobExecutor, step: JobStep) -> job_executor::StepResult {
    let result = executor
        .execute_job(Uuid::new_v4(), Uuid::nil(), &[step], None, "t")
        .unwrap();
    result.step_results[0].clone()
}

#[test]
fn command_records_exit_code_and_output() {
    let (executor, _) = command_executor();
    let ok = run_one(
        &executor,
        command(0, &["sh", "-c", "printf out; printf err >&2"], 10),
    );
    assert_eq!(ok.status, StepStatus::Completed);
    let output = ok.output.unwrap();
    assert_eq!(output["exit_code"], 0);
    assert_eq!(output["stdout"], "out");
    assert_eq!(output["stderr"], "err");
    assert_eq!(output["stdout_truncated"], false);

    let failed = run_one(
        &executor,
        command(0, &["sh", "-c", "echo nope; exit 3"], 10),
    );
    assert_eq!(failed.status, StepStatus::Failed);
    assert_eq!(failed.failure_kind, Some(FailureKind::HandlerFailed));
    assert_eq!(
        failed.error.as_deref(),
        Some("command exited with status 3")
    );
    assert_eq!(failed.output.unwrap()["stdout"], "nope\n");
}

#[test]
fn command_output_is_capped() {
    let (executor, _) = command_executor();
    let big = run_one(
        &executor,
        command(
            0,
            &["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x"],
            10,
        ),
    );
    let output = big.output.unwrap();
    assert_eq!(output["stdout"].as_str().unwrap().len(), OUTPUT_BYTES_MAX);
    assert_eq!(output["stdout_truncated"], true);
    assert_eq!(output["stderr_truncated"], false);
}

#[test]
fn command_takes_cwd_and_env_and_no_shell() {
    let (executor, _) = command_executor();
    let dir = tempfile::tempdir().unwrap();
    let mut step = command(0, &[], 10);
    step.parameters = json!({
        "argv": ["sh", "-c", "pwd; echo \"$GREETING\""],
        "cwd": dir.path(),
        "env": {"GREETING": "hello; rm -rf /"},
    });
    let result = run_one(&executor, step);
    let stdout = result.output.unwrap()["stdout"]
        .as_str()
        .unwrap()
        .to_owned();
    let cwd = dir.path().canonicalize().unwrap();
    assert_eq!(stdout, format!("{}\nhello; rm -rf /\n", cwd.display()));
    // argv is not a shell line: the metacharacters reach the program as is.
    let echo = run_one(&executor, command(0, &["echo", "a;", "$(b)", "|c"], 10));
    assert_eq!(echo.output.unwrap()["stdout"], "a; $(b) |c\n");
}

#[test]
fn malformed_command_parameters_fail_the_step_clearly() {
    let (executor, _) = command_executor();
    for (parameters, want) in [
        (
            json!({}),
            "parameters.argv must be a non-empty array of strings",
        ),
        (
            json!({"argv": []}),
            "parameters.argv must be a non-empty array of strings",
        ),
        (
            json!({"argv": ["ls", 3]}),
            "parameters.argv must be a non-empty array of strings",
        ),
        (
            json!({"argv": "ls -l"}),
            "parameters.argv must be a non-empty array of strings",
        ),
        (
            json!({"argv": ["ls"], "cwd": 5}),
            "parameters.cwd must be a string",
        ),
        (
            json!({"argv": ["ls"], "env": {"A": 1}}),
            "parameters.env must map names to strings",
        ),
        (
            json!({"argv": ["ls"], "shell": true}),
            "unknown parameter \"shell\"",
        ),
        (
            json!({"argv": ["/no/such/program"]}),
            "cannot run \"/no/such/program\"",
        ),
    ] {
        let mut step = step(0, "command", 10);
        step.parameters = parameters;
        let result = run_one(&executor, step);
        assert_eq!(result.status, StepStatus::Failed);
        let error = result.error.unwrap();
        assert!(error.contains(want), "{error:?} lacks {want:?}");
    }
}

#[test]
fn command_past_its_deadline_is_killed_with_its_process_group() {
    let (executor, store) = command_executor();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker");
    let script = format!(
        "(sleep 2; touch {m}.child) & sleep 2; touch {m}",
        m = marker.display()
    );
    let job = Uuid::new_v4();
    let start = Instant::now();
    let result = executor
        .execute_job(
            job,
            Uuid::nil(),
            &[command(0, &["sh", "-c", &script], 1)],
            None,
            "t",
        )
        .unwrap();
    assert!(start.elapsed() < Duration::from_millis(1900));
    let step = &result.step_results[0];
    assert_eq!(step.failure_kind, Some(FailureKind::Timeout));
    assert_eq!(step.error.as_deref(), Some("timed out after 1 s"));
    std::thread::sleep(Duration::from_millis(2500));
    assert!(!marker.exists(), "the program outlived its deadline");
    assert!(
        !marker.with_extension("child").exists(),
        "its child outlived the deadline"
    );
    assert_eq!(store.load_job(job).unwrap().len(), 4);
}

// --- cancellation -------------------------------------------------------------------

#[test]
fn a_cancel_request_stops_the_job_before_its_next_step() {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let mut executor = JobExecutor::builder().store(store.clone()).build();
    let (entered, in_step) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    let released = Mutex::new(released);
    executor.register_handler("wait", move |_: &JobStep, _: &ExecutionContext| {
        entered.send(()).unwrap();
        released.lock().unwrap().recv().unwrap();
        StepOutput::succeeded(json!("finished anyway"))
    });
    let calls = Arc::new(AtomicUsize::new(0));
    let count = calls.clone();
    executor.register_handler("ok", move |_: &JobStep, _: &ExecutionContext| {
        count.fetch_add(1, Ordering::SeqCst);
        StepOutput::succeeded(json!({}))
    });
    let job = Uuid::new_v4();
    let steps = [step(0, "ok", 5), step(1, "wait", 5), step(2, "ok", 5)];
    std::thread::scope(|scope| {
        let running = scope.spawn(|| executor.execute_job(job, Uuid::nil(), &steps, None, "t"));
        in_step.recv().unwrap();
        // Another executor (another process) asks for the job to stop.
        let other = JobExecutor::builder().store(store.clone()).build();
        assert_eq!(
            other
                .request_cancel(job, "maintenance window closed")
                .unwrap(),
            CancelRequest::Recorded { seq: 5 }
        );
        assert_eq!(
            other.request_cancel(job, "again").unwrap(),
            CancelRequest::AlreadyRequested
        );
        release.send(()).unwrap();
        let result = running.join().unwrap().unwrap();
        assert_eq!(result.final_status, JobStatus::Cancelled);
        assert_eq!(
            result.final_reason,
            "Cancelled before step 2: maintenance window closed"
        );
        // The step in flight finished and was recorded; step 2 never started.
        assert_eq!(result.step_results.len(), 2);
        assert_eq!(
            result.step_results[1].output,
            Some(json!("finished anyway"))
        );
    });
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        kinds(store.as_ref(), job),
        [
            "JobStarted",
            "StepStarted",
            "StepSucceeded",
            "StepStarted",
            "JobCancelRequested",
            "StepSucceeded",
            "JobCancelled"
        ]
    );
    assert_verifies(store.as_ref(), job);
    a_cancel_of_an_ended_or_unknown_job_is_refused(&executor, job);
}

/// `job` ended cancelled: a request to cancel it, or a job never seen, is
/// refused.
fn a_cancel_of_an_ended_or_unknown_job_is_refused(executor: &JobExecutor, job: Uuid) {
    let err = executor.request_cancel(job, "late").unwrap_err();
    assert!(
        matches!(
            err,
            ExecutorError::JobEnded {
                status: JobStatus::Cancelled,
                ..
            }
        ),
        "{err}"
    );
    let err = executor.request_cancel(Uuid::new_v4(), "who").unwrap_err();
    assert!(matches!(err, ExecutorError::UnknownJob { .. }), "{err}");
}

// --- resumption and recovery ----------------------------------------------------------

/// A job written straight into a fresh log, stopped between steps.
fn stopped_between_steps() -> (Arc<dyn EventStore>, Uuid, Arc<AtomicUsize>) {
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open_in_memory().unwrap());
    let job = Uuid::new_v4();
    store
        .append(&common::records(
            job,
            &common::stopped_between_steps(3, "ok"),
        ))
        .unwrap();
    (store, job, Arc::new(AtomicUsize::new(0)))
}

fn stopped_after(appends: usize) -> (Arc<dyn EventStore>, Uuid, Arc<AtomicUsize>) {
    let inner: Arc<dyn EventStore> = Arc::new(SqliteStore::open_in_memory().unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let mut executor = JobExecutor::builder()
        .store(Arc::new(common::FaultyStore::new(
            inner.clone(),
            appends + 1,
            common::Fault::BeforeCommit,
        )))
        .build();
    let count = calls.clone();
    executor.register_handler("ok", move |_: &JobStep, _: &ExecutionContext| {
        count.fetch_add(1, Ordering::SeqCst);
        StepOutput::succeeded(json!({}))
    });
    let job = Uuid::new_v4();
    let steps: Vec<JobStep> = (0..3).map(|i| step(i, "ok", 5)).collect();
    let err = executor
        .execute_job(job, Uuid::nil(), &steps, None, "t")
        .unwrap_err();
    assert!(err.store_error().is_some(), "{err}");
    (inner, job, calls)
}

fn survivor(store: Arc<dyn EventStore>, calls: &Arc<AtomicUsize>) -> JobExecutor {
    let mut executor = JobExecutor::builder().store(store).build();
    let count = calls.clone();
    executor.register_handler("ok", move |_: &JobStep, _: &ExecutionContext| {
        count.fetch_add(1, Ordering::SeqCst);
        StepOutput::succeeded(json!({}))
    });
    executor
}

#[test]
fn a_job_stopped_between_steps_resumes_at_its_next_step() {
    // JobStarted, StepStarted 0, StepSucceeded 0: stopped between steps.
    let (store, job, calls) = stopped_between_steps();
    let executor = survivor(store.clone(), &calls);
    assert_eq!(
        executor.recover().unwrap(),
        [Recovery::Resumable {
            job_id: job,
            next_step: 1
        }]
    );
    let result = executor.resume(job, None, "night shift").unwrap();
    assert_eq!(result.final_status, JobStatus::Completed);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "steps 1 and 2 ran, once each"
    );
    assert_eq!(kinds(store.as_ref(), job)[3], "JobResumed");
    assert_verifies(store.as_ref(), job);
    let err = executor.resume(job, None, "again").unwrap_err();
    assert!(matches!(err, ExecutorError::JobEnded { .. }), "{err}");
}

#[test]
fn a_step_in_doubt_is_interrupted_never_rerun() {
    // JobStarted and StepStarted 0 committed, the handler ran, and the
    // commit of its outcome failed.
    let (store, job, calls) = stopped_after(1);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let executor = survivor(store.clone(), &calls);
    let err = executor.resume(job, None, "eager").unwrap_err();
    assert!(
        matches!(err, ExecutorError::StepInDoubt { step_index: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("run `recover` first"), "{err}");
    assert_eq!(
        executor.recover().unwrap(),
        [Recovery::Interrupted {
            job_id: job,
            step_index: 0
        }]
    );
    let result = executor.replay(job).unwrap();
    assert_eq!(result.final_status, JobStatus::Failed);
    assert_eq!(
        result.step_results[0].failure_kind,
        Some(FailureKind::Interrupted)
    );
    assert!(
        result.final_reason.contains("outcome unknown"),
        "{}",
        result.final_reason
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "recovery ran nothing");
    assert!(executor.recover().unwrap().is_empty());
    assert_verifies(store.as_ref(), job);
}

#[test]
fn recovery_honours_a_cancel_request_of_a_stopped_job() {
    let (store, job, calls) = stopped_between_steps();
    let executor = survivor(store.clone(), &calls);
    executor.request_cancel(job, "abandon").unwrap();
    assert_eq!(
        executor.recover().unwrap(),
        [Recovery::Cancelled { job_id: job }]
    );
    assert_eq!(
        executor.replay(job).unwrap().final_status,
        JobStatus::Cancelled
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0, "recovery ran nothing");
}

// --- concurrency ----------------------------------------------------------------------

#[test]
fn racing_executions_of_one_job_id_run_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    SqliteStore::open(&path).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let job = Uuid::new_v4();
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (path, calls, barrier) = (path.clone(), calls.clone(), barrier.clone());
            std::thread::spawn(move || {
                let store = Arc::new(SqliteStore::open(&path).unwrap());
                let executor = survivor(store, &calls);
                barrier.wait();
                executor.execute_job(job, Uuid::nil(), &[step(0, "ok", 5)], None, "t")
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    for result in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(result, ExecutorError::JobAlreadyExists { .. }),
            "{result}"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_verifies(&SqliteStore::open(&path).unwrap(), job);
}

// --- storage faults ---------------------------------------------------------------------

#[test]
fn a_full_database_fails_cleanly_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    SqliteStore::open(&path).unwrap();
    let pages: i64 = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    let capped = SqliteOptions::default().with_max_pages(pages as u64 + 4);
    let store = Arc::new(SqliteStore::open_with(&path, &capped).unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let executor = survivor(store, &calls);
    let mut big = step(0, "ok", 5);
    big.parameters = json!({ "blob": "x".repeat(2000) });
    let steps: Vec<JobStep> = (0..200)
        .map(|i| JobStep {
            step_index: i,
            ..big.clone()
        })
        .collect();
    let job = Uuid::new_v4();
    let err = executor
        .execute_job(job, Uuid::nil(), &steps, None, "t")
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("no space left"), "{message}");
    assert!(
        SqliteStore::open(&path)
            .unwrap()
            .load_job(job)
            .unwrap()
            .is_empty(),
        "a refused JobStarted leaves nothing"
    );
    // A smaller job fits at first, then fills the database mid-way.
    let small: Vec<JobStep> = (0..100).map(|i| step(i, "ok", 5)).collect();
    let job = Uuid::new_v4();
    let err = executor
        .execute_job(job, Uuid::nil(), &small, None, "t")
        .unwrap_err();
    assert!(
        matches!(err.store_error(), Some(StoreError::Full { .. })),
        "{err}"
    );
    drop(executor);
    // No partial event: what is there verifies; recovery closes the rest.
    let reopened: Arc<dyn EventStore> = Arc::new(SqliteStore::open(&path).unwrap());
    let records = reopened.load_job(job).unwrap();
    assert!(!records.is_empty());
    assert!(records.iter().all(|r| r.decode().is_ok()));
    assert_verifies(reopened.as_ref(), job);
    let executor = survivor(reopened.clone(), &calls);
    let recovered = executor.recover().unwrap();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_verifies(reopened.as_ref(), job);
}

#[test]
fn a_database_locked_past_the_busy_timeout_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    let options = SqliteOptions::default().with_busy_timeout(Duration::from_millis(200));
    let store = Arc::new(SqliteStore::open_with(&path, &options).unwrap());
    let calls = Arc::new(AtomicUsize::new(0));
    let executor = survivor(store.clone(), &calls);
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let job = Uuid::new_v4();
    let start = Instant::now();
    let err = executor
        .execute_job(job, Uuid::nil(), &[step(0, "ok", 5)], None, "t")
        .unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(200));
    assert!(
        matches!(
            &err,
            ExecutorError::Store {
                source: StoreError::Busy { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("locked"), "{err}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    holder.execute_batch("ROLLBACK").unwrap();
    assert!(store.load_job(job).unwrap().is_empty(), "no partial event");
    // Once the lock is gone, the same job id runs.
    let result = executor
        .execute_job(job, Uuid::nil(), &[step(0, "ok", 5)], None, "t")
        .unwrap();
    assert_eq!(result.final_status, JobStatus::Completed);
}

#[test]
fn with_many_jobs_each_handler_starts_only_once_its_start_is_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    let store = Arc::new(SqliteStore::open(&path).unwrap());
    // A second connection sees only committed events.
    let reader = common::reader(&path);
    let wrong: Arc<Mutex<Vec<String>>> = Arc::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut executor = JobExecutor::builder().store(store.clone()).build();
    let (report, count) = (wrong.clone(), calls.clone());
    executor.register_handler("check", move |_: &JobStep, ctx: &ExecutionContext| {
        count.fetch_add(1, Ordering::SeqCst);
        // JobStarted is seq 1; step k starts at seq 2 + 2k.
        let start_seq = 2 + 2 * u64::from(ctx.step_index);
        let committed = reader.last_seq(ctx.job_id).unwrap();
        if committed != start_seq {
            report.lock().unwrap().push(format!(
                "job {} step {}: {committed} events committed when its handler ran, want {start_seq}",
                ctx.job_id, ctx.step_index
            ));
        }
        if ctx.deadline.is_none_or(|d| d <= Instant::now()) {
            report
                .lock()
                .unwrap()
                .push(format!("step {}: no deadline ahead", ctx.step_index));
        }
        StepOutput::succeeded(json!({}))
    });
    let executor = Arc::new(executor);
    let plan: Vec<JobStep> = (0..5).map(|i| step(i, "check", 30)).collect();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (executor, plan) = (executor.clone(), plan.clone());
            std::thread::spawn(move || {
                for _ in 0..6 {
                    let result = executor
                        .execute_job(Uuid::new_v4(), Uuid::nil(), &plan, None, "t")
                        .unwrap();
                    assert_eq!(result.final_status, JobStatus::Completed);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 8 * 6 * 5);
    assert_eq!(*wrong.lock().unwrap(), Vec::<String>::new());
}

/// Reads health, except at its `panic_at`-th reading (from 0), where it panics.
struct FlakyObserver {
    reads: AtomicUsize,
    panic_at: usize,
}

impl HealthObserver for FlakyObserver {
    fn observe_health(&self) -> serde_json::Value {
        let n = self.reads.fetch_add(1, Ordering::SeqCst);
        assert!(n != self.panic_at, "health probe exploded");
        json!({ "reading": n })
    }
}

fn flaky(panic_at: usize) -> FlakyObserver {
    FlakyObserver {
        reads: AtomicUsize::new(0),
        panic_at,
    }
}

fn counting_executor() -> (JobExecutor, Arc<SqliteStore>, Arc<AtomicUsize>) {
    let store = Arc::new(SqliteStore::open_in_memory().unwrap());
    let mut executor = JobExecutor::builder().store(store.clone()).build();
    let calls = Arc::new(AtomicUsize::new(0));
    let count = calls.clone();
    executor.register_handler("count", move |_: &JobStep, _: &ExecutionContext| {
        count.fetch_add(1, Ordering::SeqCst);
        StepOutput::succeeded(json!({}))
    });
    (executor, store, calls)
}

#[test]
fn a_panicking_health_observer_loses_no_outcome_and_the_job_resumes() {
    let (executor, store, calls) = counting_executor();
    let job = Uuid::new_v4();
    let plan: Vec<JobStep> = (0..3).map(|i| step(i, "count", 10)).collect();
    // Reading 0 is before the first step, 1 after step 0, 2 after step 1.
    let err = executor
        .execute_job(job, Uuid::nil(), &plan, Some(&flaky(2)), "t")
        .unwrap_err();
    match &err {
        ExecutorError::HealthObserver { job_id, message } => {
            assert_eq!(*job_id, job);
            assert!(message.contains("health probe exploded"), "{message}");
        }
        other => panic!("unexpected error: {other}"),
    }
    // Step 1 ran and its outcome is recorded, without health; nothing more.
    assert_eq!(
        kinds(store.as_ref(), job),
        [
            "JobStarted",
            "StepStarted",
            "StepSucceeded",
            "StepStarted",
            "StepSucceeded"
        ]
    );
    let last = store.load_job(job).unwrap().pop().unwrap();
    let payload: serde_json::Value = serde_json::from_str(&last.payload).unwrap();
    assert_eq!(payload["health_after"], serde_json::Value::Null);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_verifies(store.as_ref(), job);
    // Nothing is in doubt: the job resumes at step 2, and no step runs twice.
    let result = executor.resume(job, Some(&flaky(usize::MAX)), "t").unwrap();
    assert_eq!(result.final_status, JobStatus::Completed);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_verifies(store.as_ref(), job);
}

#[test]
fn a_health_observer_that_panics_before_the_first_step_appends_nothing() {
    let (executor, store, calls) = counting_executor();
    let job = Uuid::new_v4();
    let err = executor
        .execute_job(
            job,
            Uuid::nil(),
            &[step(0, "count", 10)],
            Some(&flaky(0)),
            "t",
        )
        .unwrap_err();
    assert!(matches!(err, ExecutorError::HealthObserver { .. }), "{err}");
    assert_eq!(store.last_seq(job).unwrap(), 0);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// A host driving a job on a thread of its own (`drive`) is answered
/// at a stuck step's deadline, while that thread is still in the handler.
#[test]
fn drive_answers_at_the_deadline_of_a_stuck_handler() {
    let store: Arc<dyn EventStore> = Arc::new(SqliteStore::open_in_memory().unwrap());
    let mut executor = JobExecutor::builder().store(store.clone()).build();
    let (release, released) = mpsc::channel::<()>();
    let released = std::sync::Mutex::new(released);
    executor.register_handler("stuck", move |_: &JobStep, _: &ExecutionContext| {
        let _ = released.lock().unwrap().recv();
        StepOutput::succeeded(json!({}))
    });
    let executor = Arc::new(executor);
    let job = Uuid::new_v4();
    let (answered, answer) = mpsc::channel();
    let start = Instant::now();
    let host = {
        let executor = executor.clone();
        std::thread::spawn(move || {
            let executor = JobExecutor::clone(&executor);
            executor.drive(job, Uuid::nil(), &[step(0, "stuck", 1)], "host", move |r| {
                let _ = answered.send(r);
            });
        })
    };
    let result = answer
        .recv_timeout(Duration::from_secs(5))
        .unwrap()
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(1900),
        "{:?}",
        start.elapsed()
    );
    assert!(
        !host.is_finished(),
        "the host thread is still in the handler"
    );
    assert_eq!(result.final_status, JobStatus::Failed);
    assert_eq!(
        result.step_results[0].failure_kind,
        Some(FailureKind::Timeout)
    );
    // Released, the handler's late result is dropped, and the host thread
    // answers no second time.
    release.send(()).unwrap();
    host.join().unwrap();
    assert!(answer.recv_timeout(Duration::from_millis(200)).is_err());
    assert_eq!(
        kinds(store.as_ref(), job),
        ["JobStarted", "StepStarted", "StepFailed", "JobHalted"]
    );
}
