//! Property tests of EXEC-001..006 over generated plans, handler outcomes and
//! observers, on every store (memory, SQLite, PostgreSQL), checked on the
//! returned result AND on the stored log; and of the state machine against
//! mutated logs.

use crate::common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};

use common::backend::{self, Backend};
use job_executor::clock::LogicalClock;
use job_executor::events::{Event, EventRecord};
use job_executor::machine::fold;
use job_executor::store::{EventStore, MemoryStore};
use job_executor::verify::verify_job;
use job_executor::{
    ExecutionContext, ExecutionResult, ExecutorError, FailingHandler, HealthObserver, JobExecutor,
    JobStatus, JobStep, StepOutput, StepStatus, execution_result_to_evidence,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use serde_json::{Value, json};
use uuid::Uuid;

const PANIC_MESSAGE: &str = "deliberate handler panic";

/// Silences the panics the "panic" handler raises on purpose; any other
/// panic still reaches the default hook.
fn quiet_deliberate_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let deliberate = info
                .payload()
                .downcast_ref::<&str>()
                .is_some_and(|m| *m == PANIC_MESSAGE);
            if !deliberate {
                default(info);
            }
        }));
    });
}

fn config() -> Config {
    Config {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/properties.txt",
        ))),
        ..Config::default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Succeed,
    Fail,
    Panic,
    Unregistered,
}

impl Kind {
    fn step_type(self) -> &'static str {
        match self {
            Kind::Succeed => "succeed",
            Kind::Fail => "fail",
            Kind::Panic => "panic",
            Kind::Unregistered => "unregistered",
        }
    }
}

fn kind() -> impl Strategy<Value = Kind> {
    // Mostly successes, so that long plans run far before their first failure.
    prop_oneof![
        12 => Just(Kind::Succeed),
        1 => Just(Kind::Fail),
        1 => Just(Kind::Panic),
        1 => Just(Kind::Unregistered),
    ]
}

fn plan_of(kinds: &[Kind]) -> Vec<JobStep> {
    kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let mut step = JobStep::new(i as u32, k.step_type(), format!("target-{i}"));
            step.parameters = json!({ "i": i, "ratio": i as f64 / 7.0 });
            step.timeout_seconds = 10 + i as u64;
            step
        })
        .collect()
}

/// Health that is only ever read: the snapshot it reports never changes,
/// and the reads are counted.
struct Observer {
    snapshot: Value,
    reads: AtomicUsize,
}

impl HealthObserver for Observer {
    fn observe_health(&self) -> Value {
        let n = self.reads.fetch_add(1, Ordering::SeqCst);
        json!({ "snapshot": self.snapshot, "read": n })
    }
}

type Calls = Arc<Mutex<HashMap<u32, usize>>>;

fn executor(store: Arc<dyn EventStore>, calls: &Calls) -> JobExecutor {
    let mut executor = JobExecutor::builder()
        .store(store)
        .clock(Arc::new(LogicalClock::default()))
        .build();
    let count = |calls: &Calls, step: &JobStep| {
        *calls.lock().unwrap().entry(step.step_index).or_default() += 1;
    };
    let seen = calls.clone();
    executor.register_handler("succeed", move |step: &JobStep, _: &ExecutionContext| {
        count(&seen, step);
        StepOutput::succeeded(json!({ "done": step.target, "ratio": step.parameters["ratio"] }))
    });
    let seen = calls.clone();
    let failing = FailingHandler::new("generated failure");
    executor.register_handler("fail", move |step: &JobStep, ctx: &ExecutionContext| {
        count(&seen, step);
        job_executor::StepHandler::execute(&failing, step, ctx)
    });
    let seen = calls.clone();
    executor.register_handler(
        "panic",
        move |step: &JobStep, _: &ExecutionContext| -> StepOutput {
            count(&seen, step);
            std::panic::panic_any(PANIC_MESSAGE)
        },
    );
    executor
}

/// Runs the plan on a store and checks every invariant on the result and
/// the stored log. Returns the stored records.
fn check_run(
    store: Arc<dyn EventStore>,
    job_id: Uuid,
    kinds: &[Kind],
    with_observer: bool,
) -> Result<Vec<EventRecord>, TestCaseError> {
    let calls: Calls = Arc::default();
    let executor = executor(store.clone(), &calls);
    let plan = plan_of(kinds);
    let observer = Observer {
        snapshot: json!({"healthy": true, "nodes": 3}),
        reads: AtomicUsize::new(0),
    };
    let original_snapshot = observer.snapshot.clone();
    let health = with_observer.then_some(&observer as &dyn HealthObserver);
    let contract_id = Uuid::from_u128(9);
    let result = executor
        .execute_job(job_id, contract_id, &plan, health, "prop")
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let expected = Expected::of(kinds);
    check_result(&result, kinds, &expected)?;
    // EXEC-004: read once before and once after each executed step; never changed.
    if with_observer {
        prop_assert_eq!(observer.reads.load(Ordering::SeqCst), 1 + expected.executed);
        prop_assert_eq!(&observer.snapshot, &original_snapshot);
        prop_assert_eq!(&result.health_before.as_ref().unwrap()["read"], &json!(0));
    } else {
        prop_assert!(result.health_before.is_none() && result.health_after.is_none());
    }
    check_calls(&calls, kinds, expected.executed)?;

    // The stored log.
    let records = store
        .load_job(job_id)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let events: Vec<Event> = records.iter().map(|r| r.decode().unwrap().event).collect();
    prop_assert_eq!(records.len() as u64, result.events);
    prop_assert!(verify_job(job_id, &records, &Default::default()).is_ok());
    check_log(&events, &plan, contract_id, &expected)?;

    // Replay of the stored log equals the live result, evidence byte for byte.
    let replayed: ExecutionResult = executor
        .replay(job_id)
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(
        execution_result_to_evidence(&replayed).to_string(),
        execution_result_to_evidence(&result).to_string()
    );
    prop_assert_eq!(&replayed, &result);

    // EXEC-006: a second execution of the job id appends nothing, calls nothing.
    let calls_before = calls.lock().unwrap().clone();
    let again = executor.execute_job(job_id, contract_id, &plan, health, "prop");
    let refused = matches!(again, Err(ExecutorError::JobAlreadyExists { .. }));
    prop_assert!(refused, "a second execution was not refused");
    prop_assert_eq!(store.load_job(job_id).unwrap(), records.clone());
    prop_assert_eq!(&*calls.lock().unwrap(), &calls_before);
    Ok(records)
}

/// What a plan of `kinds` must come to.
struct Expected {
    /// The first step that does not succeed.
    first_failure: Option<usize>,
    /// Steps run: up to and including the first failure.
    executed: usize,
}

impl Expected {
    fn of(kinds: &[Kind]) -> Expected {
        let first_failure = kinds.iter().position(|k| *k != Kind::Succeed);
        Expected {
            first_failure,
            executed: first_failure.map_or(kinds.len(), |f| f + 1),
        }
    }
}

/// EXEC-001..003 on the result returned live.
fn check_result(
    result: &ExecutionResult,
    kinds: &[Kind],
    expected: &Expected,
) -> Result<(), TestCaseError> {
    // EXEC-001: steps ran in declared order, none skipped.
    let indices: Vec<u32> = result.step_results.iter().map(|s| s.step_index).collect();
    prop_assert_eq!(indices, (0..expected.executed as u32).collect::<Vec<_>>());
    // EXEC-002: every executed step has exactly one outcome.
    prop_assert!(
        result
            .step_results
            .iter()
            .all(|s| s.status != StepStatus::Running)
    );
    // EXEC-003: stop at the first failure, with the right terminal status.
    match expected.first_failure {
        Some(f) => {
            prop_assert_eq!(result.final_status, JobStatus::Failed);
            prop_assert_eq!(result.steps_failed, 1);
            prop_assert_eq!(result.steps_succeeded, f);
            let step = &result.step_results[f];
            let error = step.error.clone().unwrap_or_default();
            prop_assert_eq!(&result.final_reason, &format!("Step {f} failed: {error}"));
            match kinds[f] {
                Kind::Fail => prop_assert_eq!(error.as_str(), "generated failure"),
                Kind::Panic => prop_assert!(error.starts_with("Execution error:")),
                Kind::Unregistered => prop_assert!(
                    error.contains("No handler registered for step type: unregistered")
                ),
                Kind::Succeed => unreachable!(),
            }
        }
        None => {
            prop_assert_eq!(result.final_status, JobStatus::Completed);
            prop_assert_eq!(
                result.final_reason.as_str(),
                "All steps completed successfully"
            );
        }
    }
    prop_assert_eq!(result.steps_executed, expected.executed);
    Ok(())
}

/// EXEC-006: each handler called at most once per step, only for executed steps.
fn check_calls(calls: &Calls, kinds: &[Kind], executed: usize) -> Result<(), TestCaseError> {
    let calls = calls.lock().unwrap();
    for (index, count) in calls.iter() {
        prop_assert_eq!(*count, 1, "step {} called {} times", index, count);
        prop_assert!((*index as usize) < executed);
    }
    let registered = kinds[..executed]
        .iter()
        .filter(|k| **k != Kind::Unregistered)
        .count();
    prop_assert_eq!(calls.len(), registered);
    Ok(())
}

/// EXEC-001, 002, 003 and 005 on the stored events.
fn check_log(
    events: &[Event],
    plan: &[JobStep],
    contract_id: Uuid,
    expected: &Expected,
) -> Result<(), TestCaseError> {
    // EXEC-005: the logged plan and contract are the input ones.
    match &events[0] {
        Event::JobStarted(started) => {
            prop_assert_eq!(&started.plan[..], plan);
            prop_assert_eq!(started.contract_id, contract_id);
        }
        other => {
            return Err(TestCaseError::fail(format!(
                "first event is {}",
                other.kind()
            )));
        }
    }
    prop_assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::JobStarted(_)))
            .count(),
        1
    );
    // EXEC-001/002: StepStarted i is immediately followed by its outcome.
    let mut expected_index = 0;
    for pair in events.windows(2) {
        if let Event::StepStarted(s) = &pair[0] {
            prop_assert_eq!(s.step_index, expected_index);
            expected_index += 1;
            let outcome_index = match &pair[1] {
                Event::StepSucceeded(o) => o.step_index,
                Event::StepFailed(o) => o.step_index,
                other => {
                    return Err(TestCaseError::fail(format!(
                        "{} after StepStarted",
                        other.kind()
                    )));
                }
            };
            prop_assert_eq!(outcome_index, s.step_index);
        }
    }
    prop_assert_eq!(expected_index as usize, expected.executed);
    // EXEC-003: the right terminal event, and it is last.
    let last = events.last().unwrap();
    match expected.first_failure {
        Some(f) => {
            let halted_at_f = matches!(last, Event::JobHalted(h) if h.step_index as usize == f);
            prop_assert!(halted_at_f, "last event is {}", last.kind());
        }
        None => prop_assert!(
            matches!(last, Event::JobCompleted(_)),
            "last event is {}",
            last.kind()
        ),
    }
    Ok(())
}

/// `records` as a log of their own would hold them, positions from 1 —
/// after checking that the store gave them consecutive positions.
fn positions_from_one(mut records: Vec<EventRecord>) -> Result<Vec<EventRecord>, TestCaseError> {
    let first = records.first().map_or(1, |r| r.position);
    for (n, record) in (0u64..).zip(records.iter_mut()) {
        prop_assert_eq!(record.position, first + n, "positions are not consecutive");
        record.position = n + 1;
    }
    Ok(records)
}

#[test]
fn invariants_hold_on_every_store() {
    let test = "invariants_hold_on_every_store";
    quiet_deliberate_panics();
    for backend in Backend::all(test) {
        let case = (prop::collection::vec(kind(), 0..=40), any::<bool>());
        backend::check_shared(
            &backend,
            test,
            config(),
            case,
            |(kinds, with_observer), store| {
                // A job id of the case's own: on PostgreSQL the cases share
                // one log.
                let job_id = Uuid::new_v4();
                let memory =
                    check_run(Arc::new(MemoryStore::new()), job_id, &kinds, with_observer)?;
                let stored = check_run(store, job_id, &kinds, with_observer)?;
                // Same inputs, same clock: the stores hold the same log,
                // byte for byte, at the same positions in a log of its own.
                prop_assert_eq!(memory, positions_from_one(stored)?);
                Ok(())
            },
        );
    }
}

/// A valid, finished log: `succeeded` steps succeed, then optionally one fails.
fn valid_log() -> impl Strategy<Value = Vec<Event>> {
    (0u32..=12, 0u32..=12, any::<bool>()).prop_map(|(steps, succeeded, fails)| {
        let succeeded = succeeded.min(steps);
        let fails = fails && succeeded < steps;
        let mut events = vec![common::started(steps)];
        for i in 0..succeeded {
            events.push(common::step_started(i));
            events.push(common::succeeded(i));
        }
        if fails {
            events.push(common::step_started(succeeded));
            events.push(common::failed(succeeded));
            events.push(common::halted(succeeded));
        } else {
            // A job that did not fail ran every step.
            for i in succeeded..steps {
                events.push(common::step_started(i));
                events.push(common::succeeded(i));
            }
            events.push(common::completed());
        }
        events
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    Drop(usize),
    Duplicate(usize),
    Swap(usize, usize),
    AppendAfterEnd(u8),
    ChangeIndex(usize, u32),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<prop::sample::Index>().prop_map(|i| Mutation::Drop(i.index(usize::MAX))),
        any::<prop::sample::Index>().prop_map(|i| Mutation::Duplicate(i.index(usize::MAX))),
        (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        (0u8..6).prop_map(Mutation::AppendAfterEnd),
        (any::<usize>(), 1u32..20).prop_map(|(i, d)| Mutation::ChangeIndex(i, d)),
    ]
}

fn step_index_mut(event: &mut Event) -> Option<&mut u32> {
    match event {
        Event::StepStarted(e) => Some(&mut e.step_index),
        Event::StepSucceeded(e) => Some(&mut e.step_index),
        Event::StepFailed(e) => Some(&mut e.step_index),
        Event::JobHalted(e) => Some(&mut e.step_index),
        Event::JobStarted(e) => e.plan.first_mut().map(|s| &mut s.step_index),
        _ => None,
    }
}

/// Applies the mutation; `None` when it would not change the log.
fn mutate(mut log: Vec<Event>, mutation: &Mutation) -> Option<Vec<Event>> {
    let n = log.len();
    match *mutation {
        Mutation::Drop(i) => {
            log.remove(i % n);
        }
        Mutation::Duplicate(i) => {
            let event = log[i % n].clone();
            log.insert(i % n + 1, event);
        }
        Mutation::Swap(a, b) => {
            let (a, b) = (a % n, b % n);
            if log[a] == log[b] {
                return None;
            }
            log.swap(a, b);
        }
        Mutation::AppendAfterEnd(k) => log.push(match k {
            0 => common::started(1),
            1 => common::step_started(0),
            2 => common::succeeded(0),
            3 => common::failed(0),
            4 => common::completed(),
            _ => common::halted(0),
        }),
        Mutation::ChangeIndex(i, delta) => {
            let index = step_index_mut(&mut log[i % n])?;
            *index = index.wrapping_add(delta);
        }
    }
    Some(log)
}

/// A log the machine accepts as a whole, finished job.
fn accepted_as_finished(log: &[Event]) -> bool {
    fold(log).is_ok_and(|state| state.is_terminal())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn machine_rejects_every_mutated_log(log in valid_log(), mutation in mutation()) {
        prop_assert!(accepted_as_finished(&log));
        if let Some(mutated) = mutate(log.clone(), &mutation) {
            prop_assert!(
                !accepted_as_finished(&mutated),
                "{:?} of {:?} was accepted", mutation, log.iter().map(Event::kind).collect::<Vec<_>>()
            );
        }
    }
}

/// EXEC-002 as SPEC.md words it, over one job's events: every `StepStarted`
/// is followed by exactly one outcome for its index before anything else
/// happens to the job (a cancel request, an outside wish, aside).
fn exec_002_holds(log: &[Event]) -> bool {
    let mut in_flight = None;
    for event in log {
        let outcome = match event {
            Event::StepSucceeded(s) => Some(s.step_index),
            Event::StepFailed(f) => Some(f.step_index),
            _ => None,
        };
        match (in_flight, event) {
            (None, Event::StepStarted(s)) => in_flight = Some(s.step_index),
            (Some(_), Event::JobCancelRequested(_)) => {}
            (Some(running), _) if outcome == Some(running) => in_flight = None,
            (Some(_), _) => return false,
            (None, _) if outcome.is_some() => return false,
            (None, _) => {}
        }
    }
    true
}

/// The step of the last outcome among `events`.
fn last_outcome(events: &[Event]) -> Option<u32> {
    events.iter().rev().find_map(|e| match e {
        Event::StepSucceeded(s) => Some(s.step_index),
        Event::StepFailed(f) => Some(f.step_index),
        _ => None,
    })
}

proptest! {
    #![proptest_config(config())]

    /// A claim inserted anywhere in a finished job's log is accepted
    /// exactly where EXEC-002, read literally, still holds (and the job
    /// has started and not ended): never between a step's start and its
    /// outcome.
    #[test]
    fn a_claim_is_admitted_exactly_where_exec_002_allows(
        log in valid_log(),
        at in any::<prop::sample::Index>(),
        names_outcome in any::<bool>(),
    ) {
        let at = at.index(log.len() + 1);
        let recorded = if names_outcome { last_outcome(&log[..at]) } else { None };
        let mut claimed = log.clone();
        claimed.insert(at, common::claimed("w", 1, recorded));
        let inside = at >= 1 && at < log.len();
        prop_assert_eq!(
            accepted_as_finished(&claimed),
            inside && exec_002_holds(&claimed),
            "a claim at {} of {:?}", at, log.iter().map(Event::kind).collect::<Vec<_>>()
        );
    }
}
