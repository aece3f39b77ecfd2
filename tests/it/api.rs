//! The public API as SPEC pins it, and the seed's behaviours.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use job_executor::store::{EventStore, MemoryStore};
use job_executor::{
    EXECUTOR_VERSION, ExecutionContext, ExecutionResult, ExecutorError, FailingHandler,
    HealthObserver, JobExecutor, JobStatus, JobStep, NoOpHandler, StepHandler, StepOutput,
    StepStatus, create_default_executor, execution_result_to_evidence,
};
use serde_json::{Value, json};
use uuid::Uuid;

struct CountingObserver {
    reads: AtomicUsize,
}

impl HealthObserver for CountingObserver {
    fn observe_health(&self) -> Value {
        let n = self.reads.fetch_add(1, Ordering::SeqCst);
        json!({ "reading": n })
    }
}

fn observer() -> CountingObserver {
    CountingObserver {
        reads: AtomicUsize::new(0),
    }
}

fn plan(types: &[&str]) -> Vec<JobStep> {
    types
        .iter()
        .enumerate()
        .map(|(i, t)| JobStep::new(i as u32, *t, format!("target-{i}")))
        .collect()
}

/// Runs a fresh job of the given step types and unwraps the result.
fn run(
    executor: &JobExecutor,
    types: &[&str],
    health: Option<&dyn HealthObserver>,
) -> ExecutionResult {
    executor
        .execute_job(Uuid::new_v4(), Uuid::new_v4(), &plan(types), health, "ops")
        .unwrap()
}

fn executor_with_store() -> (JobExecutor, Arc<MemoryStore>) {
    let store = Arc::new(MemoryStore::new());
    let mut executor = JobExecutor::builder().store(store.clone()).build();
    executor.register_handler("ok", NoOpHandler);
    executor.register_handler("fail", FailingHandler::default());
    executor.register_handler("panic", |_: &JobStep, _: &ExecutionContext| -> StepOutput {
        panic!("handler exploded")
    });
    (executor, store)
}

#[test]
fn version_is_semantic() {
    let executor = JobExecutor::new();
    assert_eq!(executor.version(), EXECUTOR_VERSION);
    let parts: Vec<&str> = EXECUTOR_VERSION.split('.').collect();
    assert_eq!(parts.len(), 3);
    assert!(parts.iter().all(|p| p.parse::<u64>().is_ok()));
}

#[test]
fn a_chosen_executor_version_is_the_one_recorded() {
    let store = Arc::new(MemoryStore::new());
    let mut executor = JobExecutor::builder()
        .store(store.clone())
        .executor_version("7.1.0")
        .build();
    executor.register_handler("ok", NoOpHandler);
    assert_eq!(executor.version(), "7.1.0");
    let job_id = Uuid::new_v4();
    let result = executor
        .execute_job(job_id, Uuid::new_v4(), &plan(&["ok"]), None, "ops")
        .unwrap();
    assert_eq!(result.executor_version, "7.1.0");
    let started = store.load_job(job_id).unwrap()[0].decode().unwrap();
    match started.event {
        job_executor::events::Event::JobStarted(s) => assert_eq!(s.executor_version, "7.1.0"),
        other => panic!("first event is {}", other.kind()),
    }
    assert_eq!(executor.replay(job_id).unwrap().executor_version, "7.1.0");
}

#[test]
fn an_executor_tells_whether_it_authenticates_heads() {
    assert!(JobExecutor::new().head_key().is_none());
    let key = job_executor::chain::HeadKey::new(vec![7u8; 32]).unwrap();
    let executor = JobExecutor::builder().head_key(key).build();
    let head = job_executor::chain::Digest::GENESIS;
    let mac = executor.head_key().expect("a key was given").mac(&head);
    assert!(
        job_executor::chain::HeadKey::new(vec![7u8; 32])
            .unwrap()
            .verify(&head, &mac)
    );
}

#[test]
fn executor_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<JobExecutor>();
}

#[test]
fn all_steps_succeed() {
    let (executor, _) = executor_with_store();
    let result = run(&executor, &["ok", "ok"], None);
    assert_eq!(result.final_status, JobStatus::Completed);
    assert_eq!(result.final_reason, "All steps completed successfully");
    assert_eq!(
        (
            result.steps_executed,
            result.steps_succeeded,
            result.steps_failed
        ),
        (2, 2, 0)
    );
    let indices: Vec<u32> = result.step_results.iter().map(|s| s.step_index).collect();
    assert_eq!(indices, vec![0, 1]);
    assert!(
        result
            .step_results
            .iter()
            .all(|s| s.status == StepStatus::Completed)
    );
    assert!(result.started_at <= result.completed_at);
}

#[test]
fn stops_at_first_failure() {
    let (executor, _) = executor_with_store();
    let result = run(&executor, &["ok", "fail", "ok"], None);
    assert_eq!(result.final_status, JobStatus::Failed);
    assert_eq!(result.final_reason, "Step 1 failed: Intentional failure");
    assert_eq!(
        (
            result.steps_executed,
            result.steps_succeeded,
            result.steps_failed
        ),
        (2, 1, 1)
    );
    assert_eq!(result.step_results[1].status, StepStatus::Failed);
    assert_eq!(
        result.step_results[1].error.as_deref(),
        Some("Intentional failure")
    );
}

#[test]
fn missing_handler_fails_the_step() {
    let (executor, _) = executor_with_store();
    let result = run(&executor, &["ok", "nope", "ok"], None);
    assert_eq!(result.final_status, JobStatus::Failed);
    let error = result.step_results[1].error.clone().unwrap();
    assert!(
        error.contains("No handler registered for step type: nope"),
        "{error}"
    );
    assert_eq!(result.steps_executed, 2);
}

#[test]
fn panicking_handler_fails_its_step_and_executor_stays_usable() {
    let (executor, _) = executor_with_store();
    let result = run(&executor, &["panic", "ok"], None);
    assert_eq!(result.final_status, JobStatus::Failed);
    let error = result.step_results[0].error.clone().unwrap();
    assert!(error.starts_with("Execution error:"), "{error}");
    assert!(error.contains("handler exploded"), "{error}");
    assert_eq!(result.final_reason, format!("Step 0 failed: {error}"));

    let again = run(&executor, &["ok"], None);
    assert_eq!(again.final_status, JobStatus::Completed);
}

#[test]
fn health_is_observed_before_and_after_each_executed_step() {
    let (executor, _) = executor_with_store();
    let health = observer();
    let result = run(&executor, &["ok", "ok", "fail", "ok"], Some(&health));
    assert_eq!(health.reads.load(Ordering::SeqCst), 1 + 3);
    assert_eq!(result.health_before, Some(json!({"reading": 0})));
    // The last observation after a successful step, not after the failure.
    assert_eq!(result.health_after, Some(json!({"reading": 2})));
    assert_eq!(
        result.step_results[2].health_after,
        Some(json!({"reading": 3}))
    );
}

#[test]
fn without_observer_health_is_absent() {
    let (executor, _) = executor_with_store();
    let result = run(&executor, &["ok"], None);
    assert_eq!(result.health_before, None);
    assert_eq!(result.health_after, None);
}

#[test]
fn empty_plan_completes_with_zero_steps() {
    let (executor, store) = executor_with_store();
    let health = observer();
    let job_id = Uuid::new_v4();
    let result = executor
        .execute_job(job_id, Uuid::new_v4(), &[], Some(&health), "ops")
        .unwrap();
    assert_eq!(result.final_status, JobStatus::Completed);
    assert_eq!(result.final_reason, "All steps completed successfully");
    assert_eq!(result.steps_executed, 0);
    assert!(result.step_results.is_empty());
    assert_eq!(health.reads.load(Ordering::SeqCst), 1);
    let kinds: Vec<String> = store
        .load_job(job_id)
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(kinds, ["JobStarted", "JobCompleted"]);
}

#[test]
fn a_job_id_runs_at_most_once() {
    let (executor, store) = executor_with_store();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut counting = JobExecutor::builder().store(store.clone()).build();
    let seen = calls.clone();
    counting.register_handler("ok", move |_: &JobStep, _: &ExecutionContext| {
        seen.fetch_add(1, Ordering::SeqCst);
        StepOutput::succeeded(json!({}))
    });
    let job_id = Uuid::new_v4();
    counting
        .execute_job(job_id, Uuid::new_v4(), &plan(&["ok"]), None, "ops")
        .unwrap();
    let before = store.all_events();
    for runner in [&counting, &executor] {
        let err = runner
            .execute_job(job_id, Uuid::new_v4(), &plan(&["ok"]), None, "ops")
            .unwrap_err();
        assert!(
            matches!(err, ExecutorError::JobAlreadyExists { job_id: id, events: 4 } if id == job_id),
            "{err}"
        );
    }
    assert_eq!(
        store.all_events(),
        before,
        "a refused re-run appends nothing"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "no handler runs on a refused re-run"
    );
}

#[test]
fn a_refused_re_run_with_an_observer_observes_nothing() {
    let (executor, store) = executor_with_store();
    let job_id = Uuid::new_v4();
    let health = observer();
    executor
        .execute_job(job_id, Uuid::new_v4(), &plan(&["ok"]), Some(&health), "ops")
        .unwrap();
    let (reads, before) = (health.reads.load(Ordering::SeqCst), store.all_events());
    let err = executor
        .execute_job(job_id, Uuid::new_v4(), &plan(&["ok"]), Some(&health), "ops")
        .unwrap_err();
    assert!(
        matches!(err, ExecutorError::JobAlreadyExists { job_id: id, events: 4 } if id == job_id),
        "{err}"
    );
    assert_eq!(health.reads.load(Ordering::SeqCst), reads, "no health read");
    assert_eq!(store.all_events(), before, "nothing appended");
}

#[test]
fn invalid_plan_is_refused_before_anything_is_appended() {
    let (executor, store) = executor_with_store();
    let mut steps = plan(&["ok", "ok"]);
    steps[1].step_index = 5;
    let err = executor
        .execute_job(Uuid::new_v4(), Uuid::new_v4(), &steps, None, "ops")
        .unwrap_err();
    assert!(err.to_string().contains("step_index must equal"), "{err}");
    let mut bad_params = plan(&["ok"]);
    bad_params[0].parameters = json!([1, 2]);
    let err = executor
        .execute_job(Uuid::new_v4(), Uuid::new_v4(), &bad_params, None, "ops")
        .unwrap_err();
    assert!(
        err.to_string().contains("parameters must be a JSON object"),
        "{err}"
    );
    assert!(store.all_events().is_empty());
}

#[test]
fn handlers_see_the_step_and_context() {
    let store = Arc::new(MemoryStore::new());
    let mut executor = JobExecutor::builder().store(store).build();
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    executor.register_handler("record", move |step: &JobStep, ctx: &ExecutionContext| {
        log.lock().unwrap().push((
            ctx.job_id,
            ctx.contract_id,
            ctx.step_index,
            ctx.step_type.clone(),
            ctx.target.clone(),
            ctx.executed_by.clone(),
            step.parameters.clone(),
            ctx.started_at,
        ));
        StepOutput::succeeded(json!({ "echo": step.target }))
    });
    let (job_id, contract_id) = (Uuid::new_v4(), Uuid::new_v4());
    let mut steps = plan(&["record", "record"]);
    steps[1].parameters = json!({"k": 1});
    let result = executor
        .execute_job(job_id, contract_id, &steps, None, "alice")
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1],
        (
            job_id,
            contract_id,
            1,
            "record".to_owned(),
            "target-1".to_owned(),
            "alice".to_owned(),
            json!({"k": 1}),
            result.step_results[1].started_at,
        )
    );
    assert_eq!(
        result.step_results[1].output,
        Some(json!({"echo": "target-1"}))
    );
}

#[test]
fn arc_handlers_and_trait_objects_are_handlers() {
    struct Upper;
    impl StepHandler for Upper {
        fn execute(&self, step: &JobStep, _: &ExecutionContext) -> StepOutput {
            StepOutput::succeeded(json!(step.target.to_uppercase()))
        }
    }
    let shared: Arc<dyn StepHandler> = Arc::new(Upper);
    let mut executor = JobExecutor::new();
    executor.register_handler("a", shared.clone());
    executor.register_handler("b", Arc::new(Upper));
    let result = run(&executor, &["a", "b"], None);
    assert_eq!(result.step_results[0].output, Some(json!("TARGET-0")));
    assert_eq!(result.step_results[1].output, Some(json!("TARGET-1")));
}

#[test]
fn step_output_constructors() {
    let ok = StepOutput::succeeded(json!({"a": 1}));
    assert!(ok.success && ok.error.is_none());
    let failed = StepOutput::failed("nope");
    assert!(!failed.success);
    assert_eq!(failed.output, json!({}));
    assert_eq!(failed.error.as_deref(), Some("nope"));
    let step = JobStep::new(0, "x", "t");
    let ctx = ExecutionContext::new(Uuid::nil(), Uuid::nil(), &step, "me", chrono::Utc::now());
    assert_eq!(
        (ctx.step_index, ctx.step_type.as_str(), ctx.target.as_str()),
        (0, "x", "t")
    );
    assert!(ctx.deadline.is_none() && !ctx.cancel.is_cancelled());
    assert_eq!(
        FailingHandler::new("custom")
            .execute(&step, &ctx)
            .error
            .as_deref(),
        Some("custom")
    );
    assert!(NoOpHandler.execute(&step, &ctx).success);
}

#[test]
fn default_executor_runs_the_seed_step_types() {
    let executor = create_default_executor();
    let types = [
        "capability_enable",
        "capability_disable",
        "capability_add",
        "capability_remove",
        "configuration_change",
        "unknown",
    ];
    let result = run(&executor, &types, None);
    assert_eq!(result.final_status, JobStatus::Completed);
    assert_eq!(result.steps_succeeded, 6);
}

#[test]
fn job_step_json_defaults_and_unknown_fields() {
    let step: JobStep =
        serde_json::from_str(r#"{"step_index":0,"step_type":"a","target":"b","parameters":{}}"#)
            .unwrap();
    assert_eq!(step.timeout_seconds, 300);
    let err = serde_json::from_str::<JobStep>(
        r#"{"step_index":0,"step_type":"a","target":"b","parameters":{},"retries":3}"#,
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown field `retries`"), "{err}");
}

#[test]
fn statuses_serialise_in_capitals() {
    assert_eq!(
        serde_json::to_value(JobStatus::Completed).unwrap(),
        json!("COMPLETED")
    );
    assert_eq!(
        serde_json::to_value(JobStatus::Cancelled).unwrap(),
        json!("CANCELLED")
    );
    assert_eq!(
        serde_json::to_value(StepStatus::Skipped).unwrap(),
        json!("SKIPPED")
    );
    let back: StepStatus = serde_json::from_value(json!("FAILED")).unwrap();
    assert_eq!(back, StepStatus::Failed);
}

#[test]
fn evidence_has_the_pinned_shape() {
    let (executor, _) = executor_with_store();
    let health = observer();
    let result = run(&executor, &["ok", "fail"], Some(&health));
    let evidence = execution_result_to_evidence(&result);
    assert_eq!(evidence["job_id"], json!(result.job_id.to_string()));
    assert_eq!(evidence["final_status"], "FAILED");
    assert_eq!(
        evidence["final_reason"],
        "Step 1 failed: Intentional failure"
    );
    assert_eq!(
        evidence["execution_summary"],
        json!({"steps_planned": 2, "steps_executed": 2, "steps_succeeded": 1, "steps_failed": 1})
    );
    let steps = evidence["step_results"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    for key in [
        "step_index",
        "status",
        "started_at",
        "completed_at",
        "output",
        "error",
    ] {
        assert!(steps[0].get(key).is_some(), "step_results lacks {key}");
    }
    assert_eq!(steps[1]["status"], "FAILED");
    assert_eq!(steps[1]["error"], "Intentional failure");
    assert_eq!(
        evidence["health_observations"]["before"],
        json!({"reading": 0})
    );
    assert_eq!(
        evidence["health_observations"]["after"],
        json!({"reading": 1})
    );
    let timing = &evidence["timing"];
    for key in ["started_at", "completed_at"] {
        let text = timing[key].as_str().unwrap();
        let parsed = chrono::DateTime::parse_from_rfc3339(text).unwrap();
        assert_eq!(parsed.offset().local_minus_utc(), 0);
        assert!(text.ends_with('Z'));
    }
    assert!(timing["duration_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(evidence["executor_version"], EXECUTOR_VERSION);
}

#[test]
fn replay_equals_the_live_result() {
    let (executor, _) = executor_with_store();
    let health = observer();
    let job_id = Uuid::new_v4();
    let live = executor
        .execute_job(
            job_id,
            Uuid::new_v4(),
            &plan(&["ok", "ok", "fail"]),
            Some(&health),
            "ops",
        )
        .unwrap();
    let replayed = executor.replay(job_id).unwrap();
    assert_eq!(replayed, live);
    assert_eq!(
        execution_result_to_evidence(&replayed).to_string(),
        execution_result_to_evidence(&live).to_string()
    );
    assert!(matches!(
        executor.replay(Uuid::new_v4()),
        Err(ExecutorError::Replay(
            job_executor::projection::ReplayError::UnknownJob { .. }
        ))
    ));
}

#[test]
fn threads_share_one_executor() {
    let (executor, store) = executor_with_store();
    let executor = Arc::new(executor);
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let executor = executor.clone();
            std::thread::spawn(move || {
                (0..10)
                    .map(|_| {
                        let types = if t % 2 == 0 {
                            ["ok", "ok"]
                        } else {
                            ["ok", "fail"]
                        };
                        run(&executor, &types, None).job_id
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let ids: Vec<Uuid> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert_eq!(ids.len(), 80);
    assert_eq!(store.job_ids().unwrap().len(), 80);
    for id in ids {
        let report =
            job_executor::verify::verify_job(id, &store.load_job(id).unwrap(), &Default::default());
        assert!(report.is_ok(), "{:?}", report.violations);
    }
}

/// A handler that runs every step on a thread of its own, as an embedding
/// does whose handler code must run on its host's threads.
struct OwnThread {
    settle: fn(job_executor::StepCall),
}

impl StepHandler for OwnThread {
    fn execute(&self, _: &JobStep, _: &ExecutionContext) -> StepOutput {
        panic!("the pool must not call a handler that started the step itself")
    }

    fn start(&self, call: job_executor::StepCall) -> Option<job_executor::StepCall> {
        let settle = self.settle;
        std::thread::spawn(move || settle(call));
        None
    }
}

#[test]
fn a_handler_can_run_its_steps_on_its_own_threads() {
    let mut executor = JobExecutor::new();
    executor.register_handler(
        "done",
        Arc::new(OwnThread {
            settle: |call| {
                let output =
                    json!({ "target": call.step().target, "index": call.context().step_index });
                call.complete(StepOutput::succeeded(output));
            },
        }),
    );
    executor.register_handler(
        "refused",
        OwnThread {
            settle: |call| call.complete(StepOutput::failed("refused")),
        },
    );
    executor.register_handler(
        "raised",
        OwnThread {
            settle: |call| call.fail("ValueError: bad target"),
        },
    );
    executor.register_handler("dropped", OwnThread { settle: drop });
    let done = run(&executor, &["done", "done"], None);
    assert_eq!(done.final_status, JobStatus::Completed);
    // With an observer the caller's thread drives the job and hands each
    // step over; without one a pool thread drives it: both honour `start`.
    let health = observer();
    let observed = run(&executor, &["done", "refused"], Some(&health));
    assert_eq!(observed.step_results[0].status, StepStatus::Completed);
    assert_eq!(observed.step_results[1].error.as_deref(), Some("refused"));
    assert_eq!(
        done.step_results[1].output,
        Some(json!({ "target": "target-1", "index": 1 }))
    );
    let failures = [
        ("refused", "refused", "handler_failed"),
        ("raised", "Execution error: ValueError: bad target", "panic"),
        (
            "dropped",
            "Execution error: the handler's thread stopped without an outcome",
            "panic",
        ),
    ];
    for (step_type, error, kind) in failures {
        let result = run(&executor, &[step_type, "done"], None);
        assert_eq!(result.final_status, JobStatus::Failed, "{step_type}");
        assert_eq!(result.steps_executed, 1);
        let step = &result.step_results[0];
        assert_eq!(step.error.as_deref(), Some(error));
        assert_eq!(
            serde_json::to_value(step.failure_kind).unwrap(),
            json!(kind),
            "{step_type}"
        );
    }
}

#[test]
fn a_step_settled_on_its_own_thread_past_its_deadline_is_a_timeout() {
    let mut executor = JobExecutor::new();
    executor.register_handler(
        "late",
        OwnThread {
            settle: |call| {
                std::thread::sleep(std::time::Duration::from_millis(1500));
                call.complete(StepOutput::succeeded(json!({ "late": true })));
            },
        },
    );
    let mut steps = plan(&["late"]);
    steps[0].timeout_seconds = 1;
    let started = std::time::Instant::now();
    let result = executor
        .execute_job(Uuid::new_v4(), Uuid::new_v4(), &steps, None, "ops")
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_millis(1400));
    assert_eq!(
        result.step_results[0].error.as_deref(),
        Some("timed out after 1 s")
    );
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(executor.replay(result.job_id).unwrap(), result);
}
