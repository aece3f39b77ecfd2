//! The reference workload on PostgreSQL: J jobs × S no-op steps through the
//! real `JobExecutor` on a `PgStore`, and in the same run raw inserts of the
//! same rows with no engine. Prints one JSON line per thread count: medians
//! of `--runs` runs, each ratio the median of the ratios taken within a run.
//!
//! ```text
//! cargo run --release --example workload_pg -- [--url URL] [--jobs 200]
//!     [--steps 20] [--threads 1,8] [--runs 7]
//! ```
//!
//! The server comes from `--url`, else `JE_PG_URL`, else
//! `postgres://postgres@127.0.0.1:5432/test`. Every measurement writes into
//! a schema of its own, dropped afterwards. Without a server it says so and
//! exits 3.
//!
//! What runs, in an order rotated from run to run:
//!
//! * **engine** — `JobExecutor` on `PgStore` (group commit, the log's
//!   triggers and CHECKs, dense positions under the head row's lock,
//!   `synchronous_commit = on`), T threads each running jobs.
//! * **raw, same commits** — T connections, each committing a job's rows
//!   exactly as the engine groups them (the start with the first step's
//!   start, then each outcome with the next start), into a table of the
//!   log's shape (same columns, unique indexes) without its rules.
//! * **raw, one statement** — the same commits, each one autocommitted
//!   multi-row `INSERT … SELECT FROM unnest(…)` into the plain table: one
//!   round trip per commit, as the engine's unfenced appends make. Against
//!   it the engine's ratio is the cost of its rules alone; against the
//!   transaction of single-row inserts it also counts the round trips
//!   saved (on a machine where a round trip is dear, that wins).
//! * **raw, log's tables** — the same commits into the store's own tables
//!   (made by its migrations), each taking the head row's lock for its
//!   positions as the store does: the engine's statements with no engine.
//! * **single stream** — one connection, one commit per event, into the
//!   plain table: the physical per-event commit rate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use job_executor::store::PgStore;
use job_executor::{JobExecutor, NoOpHandler};
use postgres::{Client, NoTls};
use uuid::Uuid;

mod common;
use common::{events_per_job, median, plan, raw_row};

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

struct Options {
    url: String,
    jobs: usize,
    steps: usize,
    threads: Vec<usize>,
    runs: usize,
}

fn parse_args() -> Result<Options, String> {
    let mut options = Options {
        url: std::env::var("JE_PG_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned()),
        jobs: 200,
        steps: 20,
        threads: vec![1, 8],
        runs: 7,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--url" => options.url = value()?,
            "--jobs" => options.jobs = value()?.parse().map_err(|e| format!("--jobs: {e}"))?,
            "--steps" => options.steps = value()?.parse().map_err(|e| format!("--steps: {e}"))?,
            "--runs" => options.runs = value()?.parse().map_err(|e| format!("--runs: {e}"))?,
            "--threads" => {
                options.threads = value()?
                    .split(',')
                    .map(|t| t.parse().map_err(|e| format!("--threads: {e}")))
                    .collect::<Result<_, _>>()?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if options.runs == 0 || options.jobs == 0 || options.threads.contains(&0) {
        return Err("--runs, --jobs and --threads must be positive".into());
    }
    Ok(options)
}

/// A schema of its own on the server, dropped on drop.
struct Schema {
    server: String,
    name: String,
}

impl Schema {
    fn new(server: &str) -> Result<Schema, postgres::Error> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "je_workload_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        Client::connect(server, NoTls)?.batch_execute(&format!("CREATE SCHEMA {name}"))?;
        Ok(Schema {
            server: server.to_owned(),
            name,
        })
    }

    /// The server's connection string with this schema as search path.
    fn url(&self) -> String {
        let separator = if self.server.contains('?') { '&' } else { '?' };
        format!(
            "{}{separator}options=-csearch_path%3D{}",
            self.server, self.name
        )
    }

    fn client(&self) -> Client {
        let mut client = Client::connect(&self.url(), NoTls).expect("connect to the schema");
        client
            .batch_execute("SET synchronous_commit = on")
            .expect("synchronous_commit");
        client
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if let Ok(mut client) = Client::connect(&self.server, NoTls) {
            let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
        }
    }
}

/// Runs `work(t)` on `threads` threads; returns events/s for `jobs` jobs.
fn timed(threads: usize, jobs: usize, steps: usize, work: impl Fn(usize) + Sync) -> f64 {
    let start = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            let work = &work;
            scope.spawn(move || work(t));
        }
    });
    (jobs as u64 * events_per_job(steps)) as f64 / start.elapsed().as_secs_f64()
}

/// The engine on a `PgStore`; returns events/s.
fn engine(schema: &Schema, jobs: usize, steps: usize, threads: usize) -> f64 {
    let store = Arc::new(PgStore::open(&schema.url()).expect("open the log"));
    let mut executor = JobExecutor::builder().store(store).build();
    executor.register_handler("noop", NoOpHandler);
    let plan = plan(steps);
    timed(threads, jobs, steps, |t| {
        for _ in (t..jobs).step_by(threads) {
            executor
                .execute_job(Uuid::new_v4(), Uuid::nil(), &plan, None, "bench")
                .expect("a job runs");
        }
    })
}

/// Where and how the raw baseline writes.
#[derive(Clone, Copy)]
enum Raw {
    /// The log's shape without its rules, the engine's commits.
    SameCommits,
    /// The same, one commit per event.
    PerEvent,
    /// The log's shape without its rules, the engine's commits, each one
    /// statement in autocommit.
    OneStatement,
    /// The store's own tables and rules, its head-row lock, the engine's commits.
    LogTables,
}

impl Raw {
    /// The baseline's tables in `schema`: the plain table, or the store's.
    fn create_tables(self, schema: &Schema) {
        match self {
            Raw::SameCommits | Raw::PerEvent | Raw::OneStatement => schema
                .client()
                .batch_execute(PLAIN_TABLE)
                .expect("create the plain table"),
            // The store's migrations make its tables.
            Raw::LogTables => drop(PgStore::open(&schema.url()).expect("create the log's tables")),
        }
    }

    /// Rows a commit (or a statement) writes: one event, or a step's two.
    fn rows_per_commit(self) -> i64 {
        match self {
            Raw::PerEvent => 1,
            Raw::SameCommits | Raw::LogTables | Raw::OneStatement => 2,
        }
    }
}

/// The log's columns and unique indexes, without CHECKs or triggers;
/// positions from an identity column, so writers never wait on one another.
const PLAIN_TABLE: &str = "CREATE TABLE events (
        position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id uuid NOT NULL, job_no bigint NOT NULL, seq bigint NOT NULL,
        kind text NOT NULL, schema_version integer NOT NULL, recorded_at text NOT NULL,
        payload text NOT NULL, digest text NOT NULL, mac text,
        UNIQUE (job_no, seq));
    CREATE UNIQUE INDEX events_job ON events (job_id) WHERE seq = 1;";

/// All of a commit's rows in one statement, as the engine writes them.
const PLAIN_UNNEST: &str = "INSERT INTO events
        (job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest)
    SELECT $1, $2, t.seq, t.kind, 2, '2000-01-01T00:00:00.000000Z', t.payload, $3
    FROM unnest($4::bigint[], $5::text[], $6::text[]) AS t(seq, kind, payload)";

const PLAIN_INSERT: &str = "INSERT INTO events
        (job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest)
    VALUES ($1, $2, $3, $4, 2, '2000-01-01T00:00:00.000000Z', $5, $6)";

/// The store's way: positions (and a new job's number) from the head row,
/// whose lock is held to the commit.
const HEAD: &str = "UPDATE log_head SET position = position + $1, job_no = job_no + $2
    RETURNING position - $1, job_no - $2";

const LOG_INSERT: &str = "INSERT INTO events
        (position, job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest)
    VALUES ($1, $2, $3, $4, $5, 2, '2000-01-01T00:00:00.000000Z', $6, $7)";

/// Raw inserts of the engine's rows; returns events/s.
fn raw(schema: &Schema, raw: Raw, jobs: usize, steps: usize, threads: usize) -> f64 {
    raw.create_tables(schema);
    let plan_payload = serde_json::to_string(&plan(steps)).expect("plan serialises");
    let digest = "0".repeat(64);
    let job_numbers = AtomicU64::new(0);
    let rows_per_commit = raw.rows_per_commit();
    timed(threads, jobs, steps, |t| {
        let mut client = schema.client();
        let (plain, head, log, unnest) = (
            client.prepare(PLAIN_INSERT),
            client.prepare(HEAD),
            client.prepare(LOG_INSERT),
            client.prepare(PLAIN_UNNEST),
        );
        let events = events_per_job(steps) as i64;
        for _ in (t..jobs).step_by(threads) {
            let job = Uuid::new_v4();
            let mut job_no = (job_numbers.fetch_add(1, Ordering::Relaxed) + 1) as i64;
            let mut seq = 1;
            while seq <= events {
                let rows = rows_per_commit.min(events - seq + 1);
                if let Raw::OneStatement = raw {
                    let seqs: Vec<i64> = (seq..seq + rows).collect();
                    let (kinds, payloads): (Vec<&str>, Vec<&str>) = seqs
                        .iter()
                        .map(|&s| raw_row(s as u64, events as u64, &plan_payload))
                        .unzip();
                    client
                        .execute(
                            unnest.as_ref().expect("prepare"),
                            &[&job, &job_no, &digest, &seqs, &kinds, &payloads],
                        )
                        .expect("insert");
                    seq += rows;
                    continue;
                }
                let mut tx = client.transaction().expect("begin");
                let mut position = 0;
                if let Raw::LogTables = raw {
                    let new_jobs = i64::from(seq == 1);
                    let row = tx
                        .query_one(head.as_ref().expect("prepare"), &[&rows, &new_jobs])
                        .expect("head");
                    position = row.get::<_, i64>(0);
                    if seq == 1 {
                        job_no = row.get::<_, i64>(1) + 1;
                    }
                }
                for _ in 0..rows {
                    let (kind, payload) = raw_row(seq as u64, events as u64, &plan_payload);
                    if let Raw::LogTables = raw {
                        position += 1;
                        tx.execute(
                            log.as_ref().expect("prepare"),
                            &[&position, &job, &job_no, &seq, &kind, &payload, &digest],
                        )
                    } else {
                        tx.execute(
                            plain.as_ref().expect("prepare"),
                            &[&job, &job_no, &seq, &kind, &payload, &digest],
                        )
                    }
                    .expect("insert");
                    seq += 1;
                }
                tx.commit().expect("commit");
            }
        }
    })
}

fn main() {
    let options = match parse_args() {
        Ok(options) => options,
        Err(e) => {
            eprintln!("workload_pg: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = Client::connect(&options.url, NoTls) {
        eprintln!(
            "workload_pg: SKIPPED — no PostgreSQL server at {}: {e}",
            options.url
        );
        std::process::exit(3);
    }
    let (jobs, steps) = (options.jobs, options.steps);
    for &threads in &options.threads {
        // engine, same commits, one statement, log's tables, single stream
        let mut rates: [Vec<f64>; 5] = Default::default();
        let mut ratios: [Vec<f64>; 4] = Default::default();
        for run in 0..options.runs {
            let mut rate = [0.0; 5];
            for which in (0..5).cycle().skip(run % 5).take(5) {
                let schema = Schema::new(&options.url).expect("create a schema");
                rate[which] = match which {
                    0 => engine(&schema, jobs, steps, threads),
                    1 => raw(&schema, Raw::SameCommits, jobs, steps, threads),
                    2 => raw(&schema, Raw::OneStatement, jobs, steps, threads),
                    3 => raw(&schema, Raw::LogTables, jobs, steps, threads),
                    _ => raw(&schema, Raw::PerEvent, jobs, steps, 1),
                };
            }
            for (rates, rate) in rates.iter_mut().zip(rate) {
                rates.push(rate);
            }
            for (ratios, base) in ratios.iter_mut().zip(&rate[1..]) {
                ratios.push(rate[0] / base);
            }
        }
        let [engine, same, one, log, single] = rates.map(median);
        let [ratio_same, ratio_one, ratio_log, ratio_single] = ratios.map(median);
        println!(
            "{{\"store\":\"postgres\",\"threads\":{threads},\"jobs\":{jobs},\"steps\":{steps},\"runs\":{},\
             \"engine_events_per_s\":{engine:.0},\
             \"raw_same_commits_events_per_s\":{same:.0},\"ratio_same_commits\":{ratio_same:.3},\
             \"raw_one_statement_events_per_s\":{one:.0},\"ratio_one_statement\":{ratio_one:.3},\
             \"raw_log_tables_events_per_s\":{log:.0},\"ratio_log_tables\":{ratio_log:.3},\
             \"single_stream_events_per_s\":{single:.0},\"ratio_to_single_stream\":{ratio_single:.3}}}",
            options.runs
        );
    }
}
