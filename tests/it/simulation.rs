//! The deterministic simulation of the worker fleet (`tests/sim/`), over
//! the seeds CI runs: every seed clean, every kind of fault actually
//! struck, and a seed's run the same twice. Any number of seeds:
//! `cargo run --release --example simulate -- --seeds N [--start S]`.

#[path = "../sim/mod.rs"]
mod sim;

/// Seeds CI runs: a few seconds in a debug build.
const SEEDS: u64 = 500;

/// Every seed keeps every guarantee, and across them every fault the
/// simulation claims to inject came to pass: crashes, takeovers, appends
/// refused by the store's fence, steps recorded interrupted, cancels.
#[test]
fn every_seed_keeps_every_guarantee_under_faults() {
    let totals = sim::run_seeds(0, SEEDS, false, |_| {});
    let failed: Vec<String> = totals
        .failed
        .iter()
        .map(|r| {
            format!(
                "seed {}: {}\n  replay: {}",
                r.seed,
                r.violations.join("\n  - "),
                sim::replay_command(r.seed)
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{}\n{}",
        failed.join("\n"),
        totals.json()
    );
    let c = totals.counters;
    let struck = [
        ("jobs", c.jobs),
        ("steps", c.steps),
        ("crashes", c.crashes),
        ("takeovers", c.takeovers),
        ("fenced_appends", c.fenced_appends),
        ("interrupted", c.interrupted),
        ("cancels", c.cancels),
    ];
    for (what, count) in struck {
        assert!(count > 0, "no {what} in {SEEDS} seeds: {}", totals.json());
    }
}

/// The same seed runs the same: the same decisions, the same log, byte
/// for byte (the trace's hash covers both).
#[test]
fn a_seed_runs_the_same_twice() {
    for seed in 0..40 {
        let first = sim::run_seed(seed, true);
        let second = sim::run_seed(seed, true);
        if first.trace_hash != second.trace_hash {
            let diverged = first
                .trace
                .iter()
                .zip(&second.trace)
                .position(|(a, b)| a != b)
                .unwrap_or(first.trace.len().min(second.trace.len()));
            panic!(
                "seed {seed} ran two ways, from trace line {diverged}:\n{:?}\n{:?}",
                first.trace.get(diverged),
                second.trace.get(diverged)
            );
        }
        assert!(!first.trace.is_empty());
    }
}

/// A clock moved by hand: the database's and the worker's alike.
#[derive(Default)]
struct ManualClock(
    std::sync::Mutex<std::time::Duration>,
    std::sync::OnceLock<std::time::Instant>,
);

impl ManualClock {
    fn advance(&self, by: std::time::Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl job_executor::clock::Clock for ManualClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::UNIX_EPOCH + *self.0.lock().unwrap()
    }

    fn instant(&self) -> std::time::Instant {
        *self.1.get_or_init(std::time::Instant::now) + *self.0.lock().unwrap()
    }
}

/// What the simulation rests on: a worker's leases are timed by the clock
/// it is given, and so is the store's queue. Once the worker's clock says
/// its lease may have run out, no step starts — however little real time
/// passed — and once the database's clock says it has, another worker
/// takes the job over.
#[test]
fn leases_are_timed_by_the_clock_given() {
    use std::sync::Arc;
    use std::time::Duration;

    use job_executor::executor::RunControl;
    use job_executor::store::{Log, MemoryStore, QueuedJob};
    use job_executor::worker::{FencedStore, Leases, submit};
    use job_executor::{ExecutionContext, JobExecutor, JobStep, StepOutput};
    use uuid::Uuid;

    let clock = Arc::new(ManualClock::default());
    let log: Arc<dyn Log> = Arc::new(MemoryStore::with_clock(clock.clone()));
    let leases = Arc::new(Leases::with_clock(clock.clone()));
    let fenced = Arc::new(FencedStore::new(log.clone(), leases.clone()));
    let mut executor = JobExecutor::builder()
        .store(fenced)
        .clock(clock.clone())
        .build();
    let ticking = clock.clone();
    // Each step takes 25 s of the clock, and no real time to speak of.
    executor.register_handler("tick", move |_: &JobStep, _: &ExecutionContext| {
        ticking.advance(Duration::from_secs(25));
        StepOutput::succeeded(serde_json::json!({}))
    });
    let job = Uuid::new_v4();
    let steps = (0..2).map(|i| JobStep::new(i, "tick", "t")).collect();
    submit(&*log, &QueuedJob::new(job, Uuid::nil(), steps, "ops")).unwrap();
    let lease = Duration::from_secs(30);
    let claim = leases.claim(&*log, "w", lease).unwrap().unwrap();
    let taken = executor.take_up(&claim.job, "w", RunControl::new());
    let error = taken.expect_err("step 1 starts past the trusted part of the lease");
    assert!(error.to_string().contains("fenced off"), "{error}");
    // Step 0's outcome is recorded; step 1 never started.
    let result = job_executor::replay(&*log, job).unwrap();
    assert_eq!(result.step_results.len(), 1);
    assert!(result.step_results[0].error.is_none());
    // By the database's clock the lease has 5 s left; then it is over.
    assert!(log.claim("other", lease).unwrap().is_none());
    clock.advance(Duration::from_secs(6));
    let taken_over = log.claim("other", lease).unwrap().unwrap();
    assert_eq!(taken_over.taken_over_from.as_deref(), Some("w"));
}
