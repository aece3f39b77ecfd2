//! Crash safety by deterministic simulation: a store that "crashes" at the
//! k-th append, for every k of generated plans; then recovery and resumption,
//! and the promise that no step ever runs twice — on the memory store,
//! SQLite and PostgreSQL.

use crate::common;

use std::collections::HashMap;

use common::backend::{self, Backend};
use common::{Fault, FaultyStore, SIMULATED_FAULT};
use std::sync::{Arc, Mutex, Once};

use job_executor::clock::LogicalClock;
use job_executor::events::{Event, EventRecord};
use job_executor::store::{EventStore, MemoryStore};
use job_executor::verify::verify_job;
use job_executor::{
    ExecutionContext, ExecutorError, JobExecutor, JobStatus, JobStep, Recovery, StepOutput,
    UnrecordedOutcome,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Succeed,
    Fail,
    Panic,
}

const PANIC_MESSAGE: &str = "deliberate crash-test panic";

fn quiet_deliberate_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let deliberate = info.payload().downcast_ref::<&str>() == Some(&PANIC_MESSAGE);
            if !deliberate {
                default(info);
            }
        }));
    });
}

/// Handler calls per (job, step), shared by every executor of a case.
type Calls = Arc<Mutex<HashMap<(Uuid, u32), usize>>>;

fn executor(store: Arc<dyn EventStore>, calls: &Calls) -> JobExecutor {
    let mut executor = JobExecutor::builder()
        .store(store)
        .clock(Arc::new(LogicalClock::default()))
        .build();
    for (name, kind) in [
        ("succeed", Kind::Succeed),
        ("fail", Kind::Fail),
        ("panic", Kind::Panic),
    ] {
        let calls = calls.clone();
        executor.register_handler(name, move |step: &JobStep, ctx: &ExecutionContext| {
            *calls
                .lock()
                .unwrap()
                .entry((ctx.job_id, step.step_index))
                .or_default() += 1;
            match kind {
                Kind::Succeed => StepOutput::succeeded(serde_json::json!({"ok": step.step_index})),
                Kind::Fail => StepOutput::failed("generated failure"),
                Kind::Panic => std::panic::panic_any(PANIC_MESSAGE),
            }
        });
    }
    executor
}

fn plan(kinds: &[Kind]) -> Vec<JobStep> {
    kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let step_type = match k {
                Kind::Succeed => "succeed",
                Kind::Fail => "fail",
                Kind::Panic => "panic",
            };
            JobStep::new(i as u32, step_type, "t")
        })
        .collect()
}

fn kinds() -> impl Strategy<Value = Vec<Kind>> {
    prop::collection::vec(
        prop_oneof![8 => Just(Kind::Succeed), 1 => Just(Kind::Fail), 1 => Just(Kind::Panic)],
        0..=10,
    )
}

fn events(store: &dyn EventStore, job: Uuid) -> Vec<Event> {
    store
        .load_job(job)
        .unwrap()
        .iter()
        .map(|r| r.decode().unwrap().event)
        .collect()
}

/// The doomed process: runs the jobs until its store dies. Returns the
/// step outcomes that came back unrecorded, for recovery to record.
fn run_until_the_store_dies(
    doomed: &JobExecutor,
    ids: &[Uuid],
    jobs: &[Vec<Kind>],
) -> Result<Vec<UnrecordedOutcome>, TestCaseError> {
    let mut known = Vec::new();
    for (job, kinds) in ids.iter().zip(jobs) {
        if let Err(e) = doomed.execute_job(*job, Uuid::nil(), &plan(kinds), None, "prop") {
            let simulated = match &e {
                ExecutorError::Store { source, .. } => source.to_string().contains(SIMULATED_FAULT),
                // A step's outcome that could not be appended comes back
                // with the error, to be recorded by recovery.
                ExecutorError::OutcomeNotRecorded { outcome, source } => {
                    known.push((**outcome).clone());
                    source.to_string().contains(SIMULATED_FAULT)
                }
                _ => false,
            };
            prop_assert!(simulated, "unexpected error: {}", e);
            break;
        }
    }
    Ok(known)
}

/// A known outcome of a step left in doubt is recorded, never replaced by
/// `interrupted`.
fn check_known_outcomes_kept(
    store: &dyn EventStore,
    recovered: &[Recovery],
    known: &[UnrecordedOutcome],
) -> Result<(), TestCaseError> {
    for outcome in known {
        let in_doubt = recovered.iter().any(|a| {
            matches!(a, Recovery::OutcomeRecorded { job_id, step_index }
                if *job_id == outcome.job_id && *step_index == outcome.step_index)
        });
        let interrupted = recovered.iter().any(|a| {
            matches!(a, Recovery::Interrupted { job_id, step_index }
                if *job_id == outcome.job_id && *step_index == outcome.step_index)
        });
        prop_assert!(
            !interrupted,
            "{:?} declared interrupted though known",
            outcome
        );
        let stored = events(store, outcome.job_id);
        prop_assert!(
            in_doubt || stored.contains(&outcome.event),
            "{:?} lost",
            outcome
        );
    }
    Ok(())
}

/// The log and the executor of the process that recovered.
struct Survivor<'a> {
    store: &'a dyn EventStore,
    executor: &'a JobExecutor,
    calls: &'a Calls,
}

/// The log tells the truth about `job` after recovery: every event
/// `committed` before the crash is still there, unchanged; no step started
/// twice; no handler called twice; a started job ended; its log verifies.
fn check_job_after_recovery(
    after: &Survivor<'_>,
    job: Uuid,
    kinds: &[Kind],
    committed: &[EventRecord],
) -> Result<(), TestCaseError> {
    let records = after.store.load_job(job).unwrap();
    prop_assert_eq!(&records[..committed.len()], committed);
    let log = events(after.store, job);
    let mut started = std::collections::HashSet::new();
    for event in &log {
        if let Event::StepStarted(s) = event {
            prop_assert!(
                started.insert(s.step_index),
                "step {} started twice",
                s.step_index
            );
        }
    }
    for i in 0..kinds.len() as u32 {
        let n = after
            .calls
            .lock()
            .unwrap()
            .get(&(job, i))
            .copied()
            .unwrap_or(0);
        prop_assert!(n <= 1, "handler of step {} called {} times", i, n);
        prop_assert!(
            n == 0 || started.contains(&i),
            "step {} ran without StepStarted",
            i
        );
    }
    // A job that never started stays unknown; every other job ended.
    if !log.is_empty() {
        let status = after.executor.replay(job).unwrap().final_status;
        prop_assert!(
            matches!(status, JobStatus::Completed | JobStatus::Failed),
            "job ended {:?}",
            status
        );
        let report = verify_job(job, &records, &Default::default());
        prop_assert!(report.is_ok(), "{:?}", report.violations);
    }
    Ok(())
}

/// Two jobs run one after the other, the store dies at the k-th append; a
/// new executor recovers, resumes what is resumable, and the log tells the
/// truth: nothing committed is lost, no step started twice, no handler
/// called twice, every job ends, every log verifies.
#[test]
fn crash_at_every_append_then_recover() {
    let test = "crash_at_every_append_then_recover";
    quiet_deliberate_panics();
    let config = Config {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/crash.txt",
        ))),
        ..Config::default()
    };
    for backend in Backend::all(test) {
        // On the SQLite run, the memory store stands in for half the cases.
        let case = (
            prop::collection::vec(kinds(), 1..=2),
            1usize..=50,
            any::<bool>(),
            any::<bool>(),
        );
        backend::check_shared(
            &backend,
            test,
            config.clone(),
            case,
            |(jobs, crash_at, after_commit, on_memory), store| {
                let inner: Arc<dyn EventStore> = if on_memory && !backend.is_postgres() {
                    Arc::new(MemoryStore::new())
                } else {
                    store
                };
                let fault = if after_commit {
                    Fault::AfterCommit
                } else {
                    Fault::BeforeCommit
                };
                let crashing = Arc::new(FaultyStore::new(inner.clone(), crash_at, fault));
                let calls: Calls = Arc::default();
                // Job ids of the case's own: on PostgreSQL the cases share one log.
                let ids: Vec<Uuid> = (0..jobs.len()).map(|_| Uuid::new_v4()).collect();
                let doomed = executor(crashing.clone(), &calls);
                let known = run_until_the_store_dies(&doomed, &ids, &jobs)?;
                let committed: HashMap<Uuid, Vec<EventRecord>> = ids
                    .iter()
                    .map(|&j| (j, inner.load_job(j).unwrap()))
                    .collect();

                // A new process on the same log recovers, then resumes.
                let survivor = executor(inner.clone(), &calls);
                let recovered = survivor.recover_with(&known).unwrap();
                check_known_outcomes_kept(inner.as_ref(), &recovered, &known)?;
                for action in &recovered {
                    if let Recovery::Resumable { job_id, .. } = action {
                        survivor.resume(*job_id, None, "prop").unwrap();
                    }
                }
                let after = Survivor {
                    store: inner.as_ref(),
                    executor: &survivor,
                    calls: &calls,
                };
                for (job, kinds) in ids.iter().zip(&jobs) {
                    check_job_after_recovery(&after, *job, kinds, &committed[job])?;
                }
                // Nothing is left to recover.
                let again = survivor.recover().unwrap();
                prop_assert!(again.is_empty(), "{:?}", again);
                Ok(())
            },
        );
    }
}
