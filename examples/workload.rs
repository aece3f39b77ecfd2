//! The reference workload: J jobs × S no-op steps through the real
//! `JobExecutor` on a SQLite file, and in the same run a raw rusqlite
//! baseline doing the same commits with no engine. Prints one JSON line per
//! configuration: medians of `--runs` runs, each ratio the median of the
//! ratios measured within each run.
//!
//! ```text
//! cargo run --release --example workload -- [--jobs 200] [--steps 20]
//!     [--threads 1,8] [--sync full,normal] [--runs 3] [--dir DIR] [--keep]
//! cargo run --release --example workload -- --replay-only FILE   # replay a whole log, streaming
//! cargo run --release --example workload -- --scale FILE         # one job's replay as the log grows
//! cargo run --release --example workload -- --generate FILE [--sync S] # write a log (NORMAL) and keep it
//! cargo run --release --example workload -- --metrics-overhead [--threads 1,8] [--sync S] [--runs N]
//!     # the engine with metrics off and on, alternating in one run
//! cargo run --release --example workload -- --baseline-only FILE [--sync S] [--same-table]
//!     # only the same-commit baseline (into the log's own table with --same-table)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use job_executor::metrics::Metrics;
use job_executor::projection::replay_all;
use job_executor::store::{EventStore, SqliteOptions, SqliteStore, Synchronous};
use job_executor::verify::{VerifyOptions, verify_store};
use job_executor::{JobExecutor, NoOpHandler, replay};
use rusqlite::{Connection, TransactionBehavior, params};
use uuid::Uuid;

mod common;
use common::{events_per_job, median, plan, raw_row};

struct Options {
    jobs: usize,
    steps: usize,
    threads: Vec<usize>,
    syncs: Vec<Synchronous>,
    runs: usize,
    dir: Option<PathBuf>,
    keep: bool,
    replay_only: Option<PathBuf>,
    generate: Option<PathBuf>,
    scale: Option<PathBuf>,
    /// Only the same-commit baseline, into this file (to count its
    /// instructions apart from the engine's).
    baseline_only: Option<PathBuf>,
    /// `--baseline-only` writes into the log's own table.
    same_table: bool,
    /// `--sync` as given: `--generate` writes at NORMAL unless told.
    sync_given: bool,
    /// Only the engine, with metrics off and on.
    metrics_overhead: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        jobs: 200,
        steps: 20,
        threads: vec![1],
        syncs: vec![Synchronous::Full, Synchronous::Normal],
        runs: 3,
        dir: None,
        keep: false,
        replay_only: None,
        generate: None,
        scale: None,
        baseline_only: None,
        same_table: false,
        sync_given: false,
        metrics_overhead: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--jobs" => options.jobs = value()?.parse().map_err(|e| format!("--jobs: {e}"))?,
            "--steps" => options.steps = value()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--runs" => options.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--threads" => {
                options.threads = value()?
                    .split(',')
                    .map(|t| t.parse().map_err(|e| format!("--threads: {e}")))
                    .collect::<Result<_, _>>()?;
            }
            "--sync" => {
                options.syncs = value()?
                    .split(',')
                    .map(|s| match s {
                        "full" => Ok(Synchronous::Full),
                        "normal" => Ok(Synchronous::Normal),
                        other => Err(format!("--sync: unknown mode {other:?}")),
                    })
                    .collect::<Result<_, _>>()?;
                options.sync_given = true;
            }
            "--dir" => options.dir = Some(PathBuf::from(value()?)),
            "--keep" => options.keep = true,
            "--replay-only" => options.replay_only = Some(PathBuf::from(value()?)),
            "--generate" => options.generate = Some(PathBuf::from(value()?)),
            "--scale" => options.scale = Some(PathBuf::from(value()?)),
            "--baseline-only" => options.baseline_only = Some(PathBuf::from(value()?)),
            "--same-table" => options.same_table = true,
            "--metrics-overhead" => options.metrics_overhead = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if options.runs == 0 || options.jobs == 0 || options.threads.contains(&0) {
        return Err("--runs, --jobs and --threads must be positive".into());
    }
    Ok(options)
}

/// How often each reader reads each engine log.
const READ_PASSES: usize = 3;

fn sync_name(sync: Synchronous) -> &'static str {
    match sync {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    }
}

/// Runs the engine; returns events/s.
fn engine(path: &Path, sync: Synchronous, jobs: usize, steps: usize, threads: usize) -> f64 {
    engine_with(path, sync, (jobs, steps, threads), None)
}

/// Runs the engine, counting into `metrics` when given; returns events/s.
fn engine_with(
    path: &Path,
    sync: Synchronous,
    (jobs, steps, threads): (usize, usize, usize),
    metrics: Option<Arc<Metrics>>,
) -> f64 {
    let options = SqliteOptions::default().with_synchronous(sync);
    let store = Arc::new(SqliteStore::open_with(path, &options).expect("open the log"));
    let mut builder = JobExecutor::builder().store(store);
    if let Some(metrics) = metrics {
        builder = builder.metrics(metrics);
    }
    let mut executor = builder.build();
    executor.register_handler("noop", NoOpHandler);
    let executor = Arc::new(executor);
    let plan = Arc::new(plan(steps));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (executor, plan) = (executor.clone(), plan.clone());
            std::thread::spawn(move || {
                for _ in (t..jobs).step_by(threads) {
                    executor
                        .execute_job(Uuid::new_v4(), Uuid::nil(), &plan, None, "bench")
                        .expect("a job runs");
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("a worker thread finishes");
    }
    (jobs as u64 * events_per_job(steps)) as f64 / start.elapsed().as_secs_f64()
}

/// How the baseline groups a job's events into commits.
#[derive(Clone, Copy)]
enum Commits {
    /// One commit per event: the physical limit for that durability.
    PerEvent,
    /// The engine's commits: the job's start with its first step's start,
    /// then each step's outcome with the next step's start (or the end).
    PerStep,
}

/// Which table the baseline writes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Table {
    /// The events table's shape (columns, unique indexes) without its
    /// rules: no CHECK constraints, no triggers.
    Plain,
    /// The log's own table, rules and all (made by the store's migrations),
    /// written with the store's own INSERT: exactly the engine's commits and
    /// statements, with no engine.
    Store,
}

/// The physical limit: the same rows (same pragmas, rows of similar size,
/// same unique index) committed as `commits` says, with no engine. Returns
/// events/s.
fn baseline(
    path: &Path,
    sync: Synchronous,
    jobs: usize,
    steps: usize,
    threads: usize,
    commits: Commits,
) -> f64 {
    baseline_on(path, sync, jobs, steps, threads, commits, Table::Plain)
}

/// The baseline's table at `path`: a plain one, or the log's own.
fn create_table(path: &Path, sync: Synchronous, table: Table) {
    match table {
        Table::Plain => Connection::open(path)
            .expect("open the baseline")
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE events (position INTEGER PRIMARY KEY, job_id TEXT NOT NULL,
                     job_no INTEGER NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,
                     schema_version INTEGER NOT NULL, recorded_at TEXT NOT NULL,
                     payload TEXT NOT NULL, digest TEXT, mac TEXT,
                     UNIQUE (job_no, seq)) STRICT;
                 CREATE UNIQUE INDEX events_job ON events (job_id) WHERE seq = 1;",
            )
            .expect("create the baseline table"),
        Table::Store => drop(
            SqliteStore::open_with(path, &SqliteOptions::default().with_synchronous(sync))
                .expect("create the log's table"),
        ),
    }
}

/// The baseline's insert of one row: `?1` job id, `?2` job number, `?3`
/// seq, `?4` payload, `?5` digest, `?6` kind.
fn insert_statement(table: Table) -> &'static str {
    // The store's own statement: a new job's number after every job's, a
    // later event's the number its start got.
    match table {
        Table::Plain => {
            "INSERT INTO events (job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest)
             VALUES (?1, ?2, ?3, ?6, 2, '2000-01-01T00:00:00.000000Z', ?4, ?5)"
        }
        Table::Store => {
            "INSERT INTO events (job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest, mac)
             VALUES (?1,
                     -- (?2, the baseline's own job number, goes unused: the
                     -- table numbers jobs itself, as for the engine.)
                     CASE WHEN ?3 = 1 AND ?2 > 0 THEN (SELECT coalesce(max(job_no), 0) + 1 FROM events)
                          ELSE (SELECT job_no FROM events WHERE job_id = ?1 AND seq = 1) END,
                     ?3, ?6, 2, '2000-01-01T00:00:00.000000Z', ?4, ?5, NULL)"
        }
    }
}

fn baseline_on(
    path: &Path,
    sync: Synchronous,
    jobs: usize,
    steps: usize,
    threads: usize,
    commits: Commits,
    table: Table,
) -> f64 {
    create_table(path, sync, table);
    // Payloads shaped like the engine's: the plan once, then small step events.
    let plan_payload = serde_json::to_string(&plan(steps)).expect("plan serialises");
    let digest = "0".repeat(64);
    let insert = insert_statement(table);
    let job_numbers = Arc::new(std::sync::atomic::AtomicI64::new(0));
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (path, plan_payload, digest) =
                (path.to_path_buf(), plan_payload.clone(), digest.clone());
            let job_numbers = job_numbers.clone();
            std::thread::spawn(move || {
                let mut conn = Connection::open(&path).expect("open the baseline");
                conn.busy_timeout(std::time::Duration::from_secs(30))
                    .expect("busy timeout");
                conn.pragma_update(None, "synchronous", sync_name(sync))
                    .expect("synchronous");
                let rows_per_commit = match commits {
                    Commits::PerEvent => 1,
                    Commits::PerStep => 2,
                };
                for _ in (t..jobs).step_by(threads) {
                    let job = Uuid::new_v4().to_string();
                    let job_no = job_numbers.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    let events = events_per_job(steps);
                    let mut seq = 1;
                    while seq <= events {
                        let tx = conn
                            .transaction_with_behavior(TransactionBehavior::Immediate)
                            .expect("begin");
                        for _ in 0..rows_per_commit {
                            let (kind, payload) = raw_row(seq, events, &plan_payload);
                            tx.prepare_cached(insert)
                                .and_then(|mut s| {
                                    s.execute(params![
                                        job, job_no, seq as i64, payload, digest, kind
                                    ])
                                })
                                .expect("insert");
                            seq += 1;
                        }
                        tx.commit().expect("commit");
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().expect("a worker thread finishes");
    }
    (jobs as u64 * events_per_job(steps)) as f64 / start.elapsed().as_secs_f64()
}

/// Replays every job of an engine log through the projection, one job at a
/// time as `replay` does; events/s.
fn engine_replay(path: &Path) -> (f64, u64) {
    let store = open_read(path);
    let start = Instant::now();
    let mut events = 0;
    for job in store.job_ids().expect("list jobs") {
        events += replay(&store, job).expect("replay").events;
    }
    (events as f64 / start.elapsed().as_secs_f64(), events)
}

/// Replays the whole log in one streaming pass; events/s.
fn whole_log_replay(path: &Path) -> (f64, u64) {
    let store = open_read(path);
    let start = Instant::now();
    let mut events = 0;
    replay_all(&store, |_, result| events += result.expect("replay").events).expect("scan");
    (events as f64 / start.elapsed().as_secs_f64(), events)
}

/// Reads every job's rows with the same query and decodes each payload into
/// a JSON value, with no engine: the least any replay must do. Events/s.
fn raw_replay(path: &Path) -> f64 {
    let conn = Connection::open(path).expect("open");
    let start = Instant::now();
    let jobs: Vec<String> = conn
        .prepare("SELECT job_id FROM events WHERE seq = 1 ORDER BY job_no")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .expect("list jobs");
    let mut events = 0u64;
    let mut bytes = 0usize;
    let mut stmt = conn
        .prepare(
            "SELECT position, job_id, seq, kind, schema_version, recorded_at, payload, digest, mac
             FROM events WHERE job_no = (SELECT job_no FROM events WHERE job_id = ?1 AND seq = 1)
             ORDER BY seq",
        )
        .expect("prepare");
    for job in &jobs {
        let mut rows = stmt.query([job]).expect("query");
        while let Some(row) = rows.next().expect("row") {
            let payload: String = row.get(6).expect("payload");
            let value: serde_json::Value = serde_json::from_str(&payload).expect("JSON payload");
            bytes += payload.len() + usize::from(value.is_object());
            events += 1;
        }
    }
    std::hint::black_box(bytes);
    events as f64 / start.elapsed().as_secs_f64()
}

fn verify_rate(path: &Path) -> f64 {
    let store = open_read(path);
    let start = Instant::now();
    let summary = verify_store(&store, &VerifyOptions::default(), |_| {}, |_| {}).expect("verify");
    assert_eq!(summary.failed_jobs, 0, "the log verifies");
    summary.events as f64 / start.elapsed().as_secs_f64()
}

fn open_read(path: &Path) -> SqliteStore {
    let options = SqliteOptions::reader();
    SqliteStore::open_with(path, &options).expect("open the log")
}

/// Runs the one thing `--replay-only`, `--scale`, `--baseline-only` or
/// `--generate` asks for; whether one of them was given.
fn run_single_mode(options: &Options) -> bool {
    if let Some(path) = &options.replay_only {
        let (rate, events) = whole_log_replay(path);
        println!("{{\"replay_events\":{events},\"replay_events_per_s\":{rate:.0}}}");
        return true;
    }
    if let Some(path) = &options.scale {
        scale(path, options.steps, options.threads[0]);
        return true;
    }
    if let Some(path) = &options.baseline_only {
        let sync = options.syncs[0];
        let table = if options.same_table {
            Table::Store
        } else {
            Table::Plain
        };
        let rate = baseline_on(
            path,
            sync,
            options.jobs,
            options.steps,
            options.threads[0],
            Commits::PerStep,
            table,
        );
        println!("{{\"baseline_events_per_s\":{rate:.0}}}");
        return true;
    }
    if let Some(path) = &options.generate {
        let sync = if options.sync_given {
            options.syncs[0]
        } else {
            Synchronous::Normal
        };
        let rate = engine(path, sync, options.jobs, options.steps, options.threads[0]);
        let events = options.jobs as u64 * events_per_job(options.steps);
        println!("{{\"generated_events\":{events},\"engine_events_per_s\":{rate:.0}}}");
        return true;
    }
    false
}

/// `--metrics-overhead`: for each configuration, the engine with metrics
/// off and on into fresh files, in alternating order run after run; one
/// JSON line each with the medians and the median of the runs' ratios.
fn metrics_overhead(options: &Options, scratch: &Path) {
    let shape = (options.jobs, options.steps);
    for &sync in &options.syncs {
        for &threads in &options.threads {
            let (mut off, mut on, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for run in 0..options.runs {
                let rate = |metrics: bool| {
                    let path = scratch.join(format!("metrics-{metrics}-{run}.db"));
                    let counted = metrics.then(|| Arc::new(Metrics::new()));
                    let rate = engine_with(&path, sync, (shape.0, shape.1, threads), counted);
                    remove_db(&path);
                    rate
                };
                let (a, b) = if run % 2 == 0 {
                    let a = rate(false);
                    (a, rate(true))
                } else {
                    let b = rate(true);
                    (rate(false), b)
                };
                off.push(a);
                on.push(b);
                ratios.push(b / a);
            }
            println!(
                "{{\"mode\":\"metrics_overhead\",\"sync\":\"{}\",\"threads\":{threads},\"jobs\":{},\"steps\":{},\"runs\":{},\
                 \"metrics_off_events_per_s\":{:.0},\"metrics_on_events_per_s\":{:.0},\"on_over_off\":{:.3}}}",
                sync_name(sync),
                shape.0,
                shape.1,
                options.runs,
                median(off),
                median(on),
                median(ratios),
            );
        }
    }
}

/// One configuration's JSON line.
fn print_row(options: &Options, sync: Synchronous, threads: usize, row: &Row) {
    let (jobs, steps) = (options.jobs, options.steps);
    let events = jobs as u64 * events_per_job(steps);
    println!(
        "{{\"sync\":\"{}\",\"threads\":{threads},\"jobs\":{jobs},\"steps\":{steps},\"events\":{events},\"runs\":{},\
         \"engine_events_per_s\":{:.0},\"baseline_events_per_s\":{:.0},\"ratio\":{:.3},\
         \"baseline_per_step_events_per_s\":{:.0},\"ratio_per_step\":{:.3},\
         \"same_table_per_step_events_per_s\":{:.0},\"ratio_same_table\":{:.3},\
         \"single_stream_baseline_events_per_s\":{:.0},\"ratio_to_single_stream\":{:.3},\
         \"replay_events_per_s\":{:.0},\"raw_replay_events_per_s\":{:.0},\"replay_ratio\":{:.3},\
         \"verify_events_per_s\":{:.0},\"verify_ratio\":{:.3}}}",
        sync_name(sync),
        options.runs,
        row.engine,
        row.per_event,
        row.ratio,
        row.per_step,
        row.ratio_per_step,
        row.same_table,
        row.ratio_same_table,
        row.single,
        row.ratio_to_single,
        row.replay,
        row.raw_replay,
        row.replay_ratio,
        row.verify,
        row.verify_ratio,
    );
}

fn main() {
    let options = match parse_args() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("workload: {e}");
            std::process::exit(2);
        }
    };
    if run_single_mode(&options) {
        return;
    }
    let scratch = tempfile_dir(options.dir.as_deref());
    if options.metrics_overhead {
        metrics_overhead(&options, &scratch);
        let _ = std::fs::remove_dir_all(&scratch);
        return;
    }
    for &sync in &options.syncs {
        for &threads in &options.threads {
            let row = measure(&options, &scratch, sync, threads);
            print_row(&options, sync, threads, &row);
        }
    }
    if !options.keep && options.dir.is_none() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
}

/// One configuration's figures: medians of rates, and medians of ratios
/// each taken within one run (or one read pass), so that a slow spell of
/// the disk moves a ratio's numerator and denominator together.
struct Row {
    engine: f64,
    per_event: f64,
    ratio: f64,
    per_step: f64,
    ratio_per_step: f64,
    /// The same commits into the log's own table (its CHECKs and triggers).
    same_table: f64,
    ratio_same_table: f64,
    single: f64,
    ratio_to_single: f64,
    replay: f64,
    raw_replay: f64,
    replay_ratio: f64,
    verify: f64,
    verify_ratio: f64,
}

/// One run's write rates, events/s, into `dbs`: the engine, then the
/// per-event, per-step, single-stream and same-table baselines.
fn write_rates(
    dbs: &[PathBuf; 5],
    sync: Synchronous,
    jobs: usize,
    steps: usize,
    threads: usize,
    run: usize,
) -> [f64; 5] {
    // The single-stream, one-commit-per-event baseline runs in every run
    // (at T=1 it is the per-event baseline itself).
    let order: Vec<usize> = if threads == 1 {
        vec![0, 1, 2, 4]
    } else {
        vec![0, 1, 2, 3, 4]
    };
    let mut rates = [0.0; 5];
    // Rotate which goes first so that none always gets a warm disk.
    for &which in order
        .iter()
        .cycle()
        .skip(run % order.len())
        .take(order.len())
    {
        // Start from a quiet disk: no writeback left from the last run.
        flush_disk();
        rates[which] = match which {
            0 => engine(&dbs[0], sync, jobs, steps, threads),
            1 => baseline(&dbs[1], sync, jobs, steps, threads, Commits::PerEvent),
            2 => baseline(&dbs[2], sync, jobs, steps, threads, Commits::PerStep),
            3 => baseline(&dbs[3], sync, jobs, steps, 1, Commits::PerEvent),
            _ => baseline_on(
                &dbs[4],
                sync,
                jobs,
                steps,
                threads,
                Commits::PerStep,
                Table::Store,
            ),
        };
    }
    if threads == 1 {
        rates[3] = rates[1];
    }
    rates
}

/// One read pass over the engine's log at `db`, events/s: replay, the raw
/// read, verify — in an order that turns with `pass`.
fn read_rates(db: &Path, pass: usize) -> [f64; 3] {
    let mut pass_rates = [0.0; 3];
    for which in (0..3).cycle().skip(pass % 3).take(3) {
        pass_rates[which] = match which {
            0 => engine_replay(db).0,
            1 => raw_replay(db),
            _ => verify_rate(db),
        };
    }
    pass_rates
}

fn measure(options: &Options, scratch: &Path, sync: Synchronous, threads: usize) -> Row {
    let (jobs, steps) = (options.jobs, options.steps);
    let (mut engine_rates, mut per_event, mut per_step, mut single) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ratio, mut ratio_per_step, mut ratio_to_single) = (Vec::new(), Vec::new(), Vec::new());
    let (mut replay, mut raw, mut verify) = (Vec::new(), Vec::new(), Vec::new());
    let (mut replay_ratio, mut verify_ratio) = (Vec::new(), Vec::new());
    let (mut same_table, mut ratio_same_table) = (Vec::new(), Vec::new());
    for run in 0..options.runs {
        let name =
            |what: &str| scratch.join(format!("{what}-{}-{threads}-{run}.db", sync_name(sync)));
        let dbs = [
            name("engine"),
            name("per-event"),
            name("per-step"),
            name("single"),
            name("per-step-same-table"),
        ];
        let rates = write_rates(&dbs, sync, jobs, steps, threads, run);
        engine_rates.push(rates[0]);
        per_event.push(rates[1]);
        per_step.push(rates[2]);
        single.push(rates[3]);
        ratio.push(rates[0] / rates[1]);
        ratio_per_step.push(rates[0] / rates[2]);
        same_table.push(rates[4]);
        ratio_same_table.push(rates[0] / rates[4]);
        ratio_to_single.push(rates[0] / rates[3]);
        // A replay of this log takes milliseconds: every reader runs
        // several times, in turns, so that none always reads first.
        for pass in 0..READ_PASSES {
            let pass_rates = read_rates(&dbs[0], pass);
            replay.push(pass_rates[0]);
            raw.push(pass_rates[1]);
            verify.push(pass_rates[2]);
            replay_ratio.push(pass_rates[0] / pass_rates[1]);
            verify_ratio.push(pass_rates[2] / pass_rates[1]);
        }
        if !options.keep {
            for db in &dbs {
                remove_db(db);
            }
        }
    }
    Row {
        engine: median(engine_rates),
        per_event: median(per_event),
        ratio: median(ratio),
        per_step: median(per_step),
        ratio_per_step: median(ratio_per_step),
        same_table: median(same_table),
        ratio_same_table: median(ratio_same_table),
        single: median(single),
        ratio_to_single: median(ratio_to_single),
        replay: median(replay),
        raw_replay: median(raw),
        replay_ratio: median(replay_ratio),
        verify: median(verify),
        verify_ratio: median(verify_ratio),
    }
}

/// Writes back every dirty page of the machine, so that the next timed run
/// does not pay for the last one's.
fn flush_disk() {
    // Best effort: without `sync` the figures are only noisier.
    let _ = std::process::Command::new("sync").status();
}

/// Grows one log from 10k to 1M events and times the replay of one job at
/// each size: replay reads a job through its index, so the time stays flat.
fn scale(path: &Path, steps: usize, threads: usize) {
    remove_db(path);
    let per_job = events_per_job(steps);
    let mut written = 0u64;
    let mut first_job = None;
    for target in [10_000u64, 100_000, 1_000_000] {
        let jobs = ((target - written) / per_job) as usize;
        engine(path, Synchronous::Normal, jobs, steps, threads);
        written += jobs as u64 * per_job;
        let store = open_read(path);
        let ids = store.job_ids().expect("list jobs");
        let first = *first_job.get_or_insert(ids[0]);
        let last = ids[ids.len() - 1];
        for (which, job) in [("first", first), ("last", last)] {
            let mut times: Vec<f64> = (0..200)
                .map(|_| {
                    let start = Instant::now();
                    replay(&store, job).expect("replay");
                    start.elapsed().as_secs_f64() * 1e6
                })
                .collect();
            times.sort_by(f64::total_cmp);
            println!(
                "{{\"log_events\":{written},\"job\":\"{which}\",\"job_events\":{per_job},\"replay_us_median\":{:.1}}}",
                times[times.len() / 2]
            );
        }
    }
}

fn remove_db(db: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
}

fn tempfile_dir(dir: Option<&Path>) -> PathBuf {
    let dir = dir.map_or_else(
        || std::env::temp_dir().join(format!("job-executor-workload-{}", std::process::id())),
        Path::to_path_buf,
    );
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}
