//! The `job-executor` command line: parses arguments, calls the library,
//! prints. Every JSON it prints is built by the library.
//!
//! Exit codes: 0 success (for `run`, the job COMPLETED); 1 the job FAILED, or
//! `verify` found a violation; 2 bad input or a failure of the log, with one
//! line on stderr and nothing written.

use std::collections::HashMap;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tracing_subscriber::Layer;
use uuid::Uuid;

use crate::bundle::{BundleError, export, verify_bundle};
use crate::chain::{Digest, HeadKey, KeyError};
#[cfg(unix)]
use crate::command::CommandHandler;
use crate::events::parse_timestamp;
use crate::executor::{
    ExecutorConfig, ExecutorError, JobExecutor, LogLocation, Recovery, register_defaults,
};
use crate::jobs::{JobFilter, job_rows};
use crate::metrics::{Metrics, MetricsServer, QueueGauges};
use crate::model::{JobStatus, PlanError, PlanFile, validate_plan};
use crate::projection::{ReplayError, execution_result_to_evidence, replay};
use crate::report::{JobPage, ReportError, ReportOptions, write_site};
use crate::result::ExecutionResult;
use crate::store::{
    self, EventStore, Location, Log, OpenOptions, QueueState, QueuedJob, StoreError, Synchronous,
};
use crate::verify::{Summary, VerifyOptions, verify_store};
use crate::worker::{Worker, WorkerOptions};

/// The database file used when `--db` is not given.
pub const DEFAULT_DB: &str = "job-executor.db";

/// Logs longer than this show progress while verified (on a terminal).
const PROGRESS_EVENTS_MIN: u64 = 100_000;

/// Executes governance job plans as an event-sourced, replayable log.
#[derive(Debug, Parser)]
#[command(name = "job-executor", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// How diagnostics are written to stderr: text lines or JSON objects
    /// (one a line). Which are written is set by JE_LOG, an EnvFilter
    /// (default `info`; e.g. `JE_LOG=job_executor=debug`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Export a span per job and per step over OTLP/HTTP (protobuf) to the
    /// collector at this http:// URL (its base, e.g.
    /// http://127.0.0.1:4318: traces go to URL/v1/traces).
    #[cfg(feature = "otel")]
    #[arg(long, global = true, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// `--log-format` values.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line of text per event, with its spans' fields.
    Text,
    /// One JSON object per event, with its spans' fields.
    Json,
}

/// `--db`, shared by every command that reads or writes the log.
#[derive(Debug, Args)]
pub struct DbArg {
    /// The event log: a SQLite file, or a PostgreSQL database as a
    /// postgres:// or postgresql:// URL (or a libpq key=value string).
    #[arg(long, default_value = DEFAULT_DB)]
    pub db: String,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Execute a plan; print its evidence. Exit 0 if COMPLETED, 1 if FAILED.
    Run(RunArgs),
    /// Print a stored job's evidence, rebuilt from its events (or from a bundle).
    Replay(ReplayArgs),
    /// Print a stored job's events as JSON Lines, in seq order.
    Events {
        /// The job id.
        job_id: String,
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
    },
    /// List stored jobs: id, status, steps succeeded/planned, start and end times.
    Jobs(JobsArgs),
    /// Jobs by status, the oldest submitted job's age, running jobs by
    /// owner, and the events and jobs in the log.
    Stats {
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every stored job's hash chain and EXEC-001..006 (or one bundle).
    /// Exit 1 on any violation.
    Verify(VerifyArgs),
    /// Close every step left in doubt by a stopped executor: record it failed
    /// (interrupted) and halt its job. Jobs stopped between steps are listed
    /// for `resume`. Run it when no executor is running on the database.
    Recover {
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
        /// Authenticate the events it records with the key in this file.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Continue a job stopped between steps at its next step; print its evidence.
    Resume(ResumeArgs),
    /// Ask a job to stop: its executor finishes the step in flight and starts no other.
    Cancel(CancelArgs),
    /// Write a self-contained HTML audit report: of one job, of an audit
    /// bundle, or of every job (an index and a page per job).
    Report(ReportArgs),
    /// Copy a whole log to another store (SQLite file or PostgreSQL), job by
    /// job, checking every job's chain as it goes; every digest is kept, so
    /// every head stays the same.
    Copy {
        /// The log to copy from.
        #[arg(long)]
        from: String,
        /// The log to copy to (created when absent; it must not hold any of
        /// the jobs).
        #[arg(long)]
        to: String,
    },
    /// Queue a plan for a worker to run; print its job id.
    Submit(SubmitArgs),
    /// Claim submitted jobs and run them (with the CLI's handlers), taking
    /// over jobs whose worker's lease ran out. SIGTERM/SIGINT: finish the
    /// steps in flight, give the jobs back, exit 0.
    Worker(WorkerArgs),
    /// Write a job's self-contained audit bundle (JSON).
    Export(ExportArgs),
}

/// `jobs`' arguments.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// The event log database.
    #[command(flatten)]
    pub db: DbArg,
    /// One JSON object a line: job_id, status, steps_done, steps_planned,
    /// started_at, ended_at, owner, final_reason.
    #[arg(long)]
    pub json: bool,
    /// Only jobs of this status (SUBMITTED, RUNNING, COMPLETED, FAILED,
    /// CANCELLED, INVALID; any case).
    #[arg(long)]
    pub status: Option<String>,
    /// At most this many jobs, the first listed.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Only jobs started (queued ones: submitted) at or after this RFC 3339 time.
    #[arg(long)]
    pub since: Option<String>,
}

/// `run`'s arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The plan: {"job_id"?: uuid, "contract_id": uuid, "steps": [...]}.
    pub plan: PathBuf,
    /// The event log database.
    #[command(flatten)]
    pub db: DbArg,
    /// Who runs the job, recorded in JobStarted.
    #[arg(long, default_value = "job-executor")]
    pub executed_by: String,
    /// Logical clock, and a job id derived from the plan when it has none:
    /// the same plan gives byte-identical output and events.
    #[arg(long)]
    pub deterministic: bool,
    /// Durability of each commit: full (fsync per event) or normal (WAL, faster).
    #[arg(long, value_enum, default_value_t = SyncMode::Full)]
    pub synchronous: SyncMode,
    /// Authenticate every head with HMAC-SHA256 under the key in this file.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

/// `replay`'s arguments.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The job id.
    #[arg(required_unless_present = "bundle", conflicts_with = "bundle")]
    pub job_id: Option<String>,
    /// The event log database.
    #[command(flatten)]
    pub db: DbArg,
    /// Replay an audit bundle instead of the database (after verifying it).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
}

/// `verify`'s arguments.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The event log database.
    #[command(flatten)]
    pub db: DbArg,
    /// A head kept earlier, JOB_ID=sha256:HEX: the job's log must still
    /// contain it (detects a cut-off tail). Repeatable.
    #[arg(long, value_name = "JOB_ID=sha256:HEX")]
    pub expect: Vec<String>,
    /// Also check every head's HMAC under the key in this file.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Verify an audit bundle offline instead of the database.
    #[arg(long, conflicts_with = "expect")]
    pub bundle: Option<PathBuf>,
}

/// `resume`'s arguments.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The job id.
    pub job_id: String,
    /// The event log database.
    #[command(flatten)]
    pub db: DbArg,
    /// Who resumes the job, recorded in JobResumed.
    #[arg(long, default_value = "job-executor")]
    pub executed_by: String,
    /// Authenticate the events it records with the key in this file.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

/// `cancel`'s arguments.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// The job id.
    pub job_id: String,
    /// The event log database.
    #[command(flatten)]
    pub db: DbArg,
    /// Why, recorded with the request.
    #[arg(long, default_value = "cancelled on request")]
    pub reason: String,
    /// Authenticate the event it records with the key in this file.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

/// `report`'s arguments.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The job id.
    #[arg(required_unless_present_any = ["bundle", "all"], conflicts_with_all = ["bundle", "all"])]
    pub job_id: Option<String>,
    /// The event log database.
    #[command(flatten)]
    pub db: DbArg,
    /// Report on an audit bundle instead of the database.
    #[arg(long, conflicts_with = "all")]
    pub bundle: Option<PathBuf>,
    /// Every job: index.html and one page per job, into the --out directory.
    #[arg(long, requires = "out")]
    pub all: bool,
    /// Write the page here (with --all, the directory) instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also check every event's MAC under the key in this file.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

/// `submit`'s arguments.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// The plan: {"job_id"?: uuid, "contract_id": uuid, "steps": [...]}.
    pub plan: PathBuf,
    /// The event log database.
    #[command(flatten)]
    pub db: DbArg,
    /// Who submits the job, recorded in its JobStarted.
    #[arg(long, default_value = "job-executor")]
    pub executed_by: String,
}

/// `worker`'s arguments.
#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The event log database.
    #[command(flatten)]
    pub db: DbArg,
    /// Jobs run at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// How long a claim lasts unless renewed (renewed every third).
    #[arg(long, default_value_t = 30.0)]
    pub lease_seconds: f64,
    /// This worker's name in leases and in `jobs` (default: host:pid).
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Exit once nothing is submitted or running.
    #[arg(long)]
    pub until_idle: bool,
    /// Authenticate the events it records with the key in this file.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Serve /metrics (Prometheus), /healthz and /readyz here, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<String>,
}

/// `export`'s arguments.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The job id.
    pub job_id: String,
    /// The event log database.
    #[command(flatten)]
    pub db: DbArg,
    /// Write the bundle here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Check the log's MACs under the key in this file before exporting.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
}

/// `--synchronous` values.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum SyncMode {
    /// fsync on every commit.
    Full,
    /// WAL without fsync per commit.
    Normal,
}

/// A failure the CLI reports with exit code 2.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The plan file cannot be read.
    #[error("{}: cannot read plan: {source}", path.display())]
    ReadPlan {
        /// The plan path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The plan file is not a valid plan document.
    #[error("{}: malformed plan: {source}", path.display())]
    ParsePlan {
        /// The plan path.
        path: PathBuf,
        /// What serde found.
        source: serde_json::Error,
    },
    /// The plan's steps are not executable.
    #[error("{}: invalid plan: {source}", path.display())]
    InvalidPlan {
        /// The plan path.
        path: PathBuf,
        /// What is wrong.
        source: PlanError,
    },
    /// A job id argument is not a UUID.
    #[error("invalid job id {text:?}: {source}")]
    JobId {
        /// The argument.
        text: String,
        /// The parse error.
        source: uuid::Error,
    },
    /// An `--expect` argument is not `JOB_ID=sha256:HEX`.
    #[error("invalid --expect {0:?}: expected JOB_ID=sha256:<64 lowercase hex digits>")]
    Expect(String),
    /// A file cannot be read or written.
    #[error("{}: {source}", path.display())]
    File {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The key cannot be used.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The log failed or is not ours.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The executor refused or failed.
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    /// A stored job cannot be replayed.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// A bundle cannot be made or read.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A report cannot be made or written.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// A copy stopped.
    #[error(transparent)]
    Copy(#[from] crate::store::CopyError),
    /// `--since` is not an RFC 3339 time.
    #[error("invalid --since {0:?}: expected an RFC 3339 time, such as 2026-01-31T12:00:00Z")]
    Since(String),
    /// The metrics server cannot listen where asked.
    #[error("--metrics-addr {addr}: cannot listen there: {source}")]
    MetricsAddr {
        /// The address.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// `--lease-seconds` is not a positive number of seconds.
    #[error("invalid --lease-seconds {0}: expected a positive number of seconds")]
    Lease(f64),
    /// Traces cannot be exported where `--otlp-endpoint` says.
    #[cfg(feature = "otel")]
    #[error("--otlp-endpoint: {0}")]
    Otel(#[from] crate::otel::OtelError),
    /// Writing to stdout failed.
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
}

/// Runs the parsed command line and returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    // Held until the command is done: dropped, it sends the last spans.
    let traces = init_logging(&cli);
    match traces.and_then(|_traces| dispatch(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(CliError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("job-executor: {e}");
            ExitCode::from(2)
        }
    }
}

fn dispatch(command: Command) -> Result<u8, CliError> {
    match command {
        Command::Run(args) => run(&args),
        Command::Replay(args) => replay_command(&args),
        Command::Events { job_id, db } => events(&job_id, &db.db),
        Command::Jobs(args) => jobs(&args),
        Command::Stats { db, json } => stats(&*open_existing(&db.db)?, json),
        Command::Verify(args) => verify_command(&args),
        Command::Recover { db, key_file } => recover(&db.db, key_file.as_deref()),
        Command::Resume(args) => resume(&args),
        Command::Cancel(args) => cancel(&args),
        Command::Report(args) => report(&args),
        Command::Export(args) => export_command(&args),
        Command::Copy { from, to } => copy(&from, &to),
        Command::Submit(args) => submit(&args),
        Command::Worker(args) => worker(&args),
    }
}

/// Reads and checks a plan file before anything else is touched.
fn read_plan(plan_path: &Path) -> Result<PlanFile, CliError> {
    let text = std::fs::read_to_string(plan_path).map_err(|source| CliError::ReadPlan {
        path: plan_path.to_path_buf(),
        source,
    })?;
    let plan: PlanFile = serde_json::from_str(&text).map_err(|source| CliError::ParsePlan {
        path: plan_path.to_path_buf(),
        source,
    })?;
    validate_plan(&plan.steps).map_err(|source| CliError::InvalidPlan {
        path: plan_path.to_path_buf(),
        source,
    })?;
    Ok(plan)
}

/// The executor configuration of a command: the log at `db`, opened with
/// `open`, and the key in `key_file`.
fn config(
    db: &str,
    open: OpenOptions,
    key_file: Option<&Path>,
) -> Result<ExecutorConfig, CliError> {
    Ok(ExecutorConfig::new(LogLocation::At(Location::parse(db)))
        .with_open(open)
        .with_head_key(read_key(key_file)?))
}

/// An executor on `log`, as `config` says, with the CLI's handlers: the
/// seed's no-op step types, and `command`.
fn executor_on(config: &ExecutorConfig, log: Arc<dyn Log>) -> JobExecutor {
    let mut executor = config.configure(JobExecutor::builder().store(log)).build();
    register_cli_handlers(&mut executor);
    executor
}

/// The CLI's handlers: the seed's no-op step types, and `command`.
fn register_cli_handlers(executor: &mut JobExecutor) {
    register_defaults(executor);
    #[cfg(unix)]
    executor.register_handler("command", CommandHandler);
}

fn run(args: &RunArgs) -> Result<u8, CliError> {
    // Everything about the input is checked before the database is touched.
    let plan = read_plan(&args.plan)?;
    let synchronous = match args.synchronous {
        SyncMode::Full => Synchronous::Full,
        SyncMode::Normal => Synchronous::Normal,
    };
    let config = config(
        &args.db.db,
        OpenOptions::default(),
        args.key_file.as_deref(),
    )?
    .with_synchronous(synchronous)
    .deterministic(args.deterministic);
    let job_id = config.job_id(&plan);
    let executor = executor_on(&config, config.open_log()?);
    let result = executor.execute_job(
        job_id,
        plan.contract_id,
        &plan.steps,
        None,
        &args.executed_by,
    )?;
    print_evidence(&result)?;
    Ok(exit_code(&result))
}

/// 0 for a job that completed, 1 for one that failed or was cancelled.
fn exit_code(result: &ExecutionResult) -> u8 {
    match result.final_status {
        JobStatus::Completed => 0,
        _ => 1,
    }
}

fn submit(args: &SubmitArgs) -> Result<u8, CliError> {
    let plan = read_plan(&args.plan)?;
    let job_id = plan.job_id.unwrap_or_else(Uuid::new_v4);
    let log = store::open(&Location::parse(&args.db.db), &OpenOptions::default())?;
    let job = QueuedJob::new(job_id, plan.contract_id, plan.steps, &args.executed_by);
    crate::worker::submit(&*log, &job).map_err(|e| match e {
        ExecutorError::Store { source, .. } => CliError::Store(source),
        e => CliError::Executor(e),
    })?;
    let mut out = io::stdout().lock();
    writeln!(out, "{job_id}")?;
    out.flush()?;
    Ok(0)
}

fn worker(args: &WorkerArgs) -> Result<u8, CliError> {
    let mut config = config(
        &args.db.db,
        OpenOptions::default(),
        args.key_file.as_deref(),
    )?;
    let options = worker_options(args)?;
    let metrics = args.metrics_addr.as_ref().map(|_| Arc::new(Metrics::new()));
    if let Some(metrics) = &metrics {
        config = config.with_metrics(metrics.clone());
    }
    let log = config.open_log()?;
    let worker_id = options.worker_id.clone();
    let mut worker = Worker::with(log.clone(), options, |builder| config.configure(builder));
    register_cli_handlers(worker.executor_mut());
    let _server = match (&args.metrics_addr, &metrics) {
        (Some(addr), Some(metrics)) => Some(serve_metrics(addr, metrics, log, &worker)?),
        _ => None,
    };
    let stop = worker.stop_flag();
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).map_err(CliError::Output)?;
    }
    let report = worker.run()?;
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "worker {worker_id}: {} jobs claimed, {} finished, {} given back, {} taken over by others, {} failed",
        report.claimed,
        report.finished,
        report.released,
        report.lost,
        report.failed.len()
    )?;
    out.flush()?;
    Ok(if report.failed.is_empty() { 0 } else { 1 })
}

/// The worker's options, as `worker`'s arguments say.
fn worker_options(args: &WorkerArgs) -> Result<WorkerOptions, CliError> {
    let lease = std::time::Duration::try_from_secs_f64(args.lease_seconds)
        .ok()
        .filter(|lease| !lease.is_zero())
        .ok_or(CliError::Lease(args.lease_seconds))?;
    let mut options = WorkerOptions::default()
        .with_concurrency(args.concurrency)
        .with_lease(lease);
    if let Some(id) = &args.worker_id {
        options = options.with_worker_id(id);
    }
    if args.until_idle {
        options = options.until_idle();
    }
    Ok(options)
}

/// Serves `metrics` and the queue's gauges of `log` at `addr`, with the
/// worker's probes, until dropped.
fn serve_metrics(
    addr: &str,
    metrics: &Metrics,
    log: Arc<dyn Log>,
    worker: &Worker,
) -> Result<MetricsServer, CliError> {
    let mut registry = metrics.registry();
    QueueGauges::new(log, Some(worker.health())).register(&mut registry);
    let server =
        crate::metrics::serve(addr, Arc::new(registry), worker.health()).map_err(|source| {
            CliError::MetricsAddr {
                addr: addr.to_owned(),
                source,
            }
        })?;
    tracing::info!(addr = %server.addr(), "serving /metrics, /healthz and /readyz");
    Ok(server)
}

/// `copy`: the whole source is verified first (so nothing is written from a
/// log that does not verify), then copied job by job, each job's chain
/// checked again as it is read, and its head compared once written.
fn copy(from: &str, to: &str) -> Result<u8, CliError> {
    let source = open_existing(from)?;
    let mut problems = Vec::new();
    let summary = verify_store(
        &*source,
        &VerifyOptions::default(),
        |report| problems.extend(report.violations.iter().map(ToString::to_string)),
        |_| {},
    )?;
    if summary.failed_jobs > 0 {
        let mut out = io::stdout().lock();
        for problem in &problems {
            writeln!(out, "{problem}")?;
        }
        writeln!(
            out,
            "FAILED: {} of {} jobs do not verify; nothing copied",
            summary.failed_jobs, summary.jobs
        )?;
        return Ok(1);
    }
    let destination = store::open(&Location::parse(to), &OpenOptions::default())?;
    let copied = crate::store::copy_log(&*source, &*destination)?;
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "copied {} jobs, {} events from {from} to {to}: every job's head is the same",
        copied.jobs, copied.events
    )?;
    Ok(0)
}

fn replay_command(args: &ReplayArgs) -> Result<u8, CliError> {
    let result = match (&args.bundle, &args.job_id) {
        (Some(bundle), _) => verify_bundle(&read_file(bundle)?, None)?,
        (None, Some(job_id)) => {
            // The argument is checked before the database is touched.
            let job_id = parse_job_id(job_id)?;
            replay(&*open_existing(&args.db.db)?, job_id)?
        }
        // clap requires one of the two.
        (None, None) => unreachable!("clap requires JOB_ID or --bundle"),
    };
    print_evidence(&result)?;
    Ok(0)
}

fn events(job_id: &str, db: &str) -> Result<u8, CliError> {
    let job_id = parse_job_id(job_id)?;
    let store = open_existing(db)?;
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut events = 0;
    let mut write_error = None;
    store.visit_job(job_id, &mut |record| {
        events += 1;
        if let Err(e) = writeln!(out, "{}", record.to_json_line()) {
            write_error = Some(e);
        }
        write_error.is_none()
    })?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    if events == 0 {
        return Err(ReplayError::UnknownJob { job_id }.into());
    }
    out.flush()?;
    Ok(0)
}

fn resume(args: &ResumeArgs) -> Result<u8, CliError> {
    let job_id = parse_job_id(&args.job_id)?;
    let config = config(
        &args.db.db,
        OpenOptions::existing(),
        args.key_file.as_deref(),
    )?;
    let executor = executor_on(&config, config.open_log()?);
    let result = executor.resume(job_id, None, &args.executed_by)?;
    print_evidence(&result)?;
    Ok(exit_code(&result))
}

fn cancel(args: &CancelArgs) -> Result<u8, CliError> {
    let job_id = parse_job_id(&args.job_id)?;
    let config = config(
        &args.db.db,
        OpenOptions::existing(),
        args.key_file.as_deref(),
    )?;
    let log = config.open_log()?;
    let executor = executor_on(&config, log.clone());
    let done = executor
        .cancel(&*log, job_id, &args.reason)
        .map_err(|e| match e {
            // The queue could not be read.
            ExecutorError::Log { source } => CliError::Store(source),
            e => CliError::Executor(e),
        })?;
    let mut out = io::stdout().lock();
    writeln!(out, "{}", done.line(job_id))?;
    Ok(0)
}

fn export_command(args: &ExportArgs) -> Result<u8, CliError> {
    let job_id = parse_job_id(&args.job_id)?;
    let key = read_key(args.key_file.as_deref())?;
    let bytes = export(&*open_existing(&args.db.db)?, job_id, key.as_ref())?.to_bytes();
    write_out(args.out.as_deref(), &bytes)
}

/// `bytes` to the file `out`, or to stdout.
fn write_out(out: Option<&Path>, bytes: &[u8]) -> Result<u8, CliError> {
    match out {
        Some(path) => std::fs::write(path, bytes).map_err(|source| CliError::File {
            path: path.to_path_buf(),
            source,
        })?,
        None => {
            let mut stdout = io::stdout().lock();
            stdout.write_all(bytes)?;
            stdout.flush()?;
        }
    }
    Ok(0)
}

/// `report`: every input is read and checked before anything is written.
fn report(args: &ReportArgs) -> Result<u8, CliError> {
    let options = ReportOptions::default().with_key(read_key(args.key_file.as_deref())?);
    if args.all {
        let Some(dir) = &args.out else {
            unreachable!("clap requires --out with --all")
        };
        let log = open_existing(&args.db.db)?;
        let owners = log
            .queued()?
            .into_iter()
            .filter(|e| e.state == QueueState::Running)
            .filter_map(|e| Some((e.job_id, e.owner?)))
            .collect();
        write_site(&*log, dir, &options.with_owners(owners))?;
        return Ok(0);
    }
    let page = match (&args.bundle, &args.job_id) {
        (Some(bundle), _) => JobPage::from_bundle(&read_file(bundle)?, &options)?,
        (None, Some(job_id)) => {
            let job_id = parse_job_id(job_id)?;
            let records = open_existing(&args.db.db)?.load_job(job_id)?;
            JobPage::from_log(job_id, &records, &options)?
        }
        (None, None) => unreachable!("clap requires JOB_ID, --bundle or --all"),
    };
    write_out(args.out.as_deref(), page.render()?.as_bytes())
}

fn recover(db: &str, key_file: Option<&Path>) -> Result<u8, CliError> {
    let config = config(db, OpenOptions::existing(), key_file)?;
    let executor = executor_on(&config, config.open_log()?);
    let actions = executor.recover()?;
    let mut out = io::stdout().lock();
    for action in &actions {
        writeln!(out, "{action}")?;
    }
    let mut examined: Vec<Uuid> = actions.iter().map(Recovery::job_id).collect();
    examined.dedup();
    let unreadable = actions
        .iter()
        .filter(|a| matches!(a, Recovery::Unreadable { .. }))
        .count();
    writeln!(out, "recover: {} unfinished jobs examined", examined.len())?;
    if unreadable > 0 {
        writeln!(
            out,
            "recover: {unreadable} jobs could not be read and were left as they are; `job-executor verify` tells what is wrong with them"
        )?;
        return Ok(1);
    }
    Ok(0)
}

fn parse_job_id(text: &str) -> Result<Uuid, CliError> {
    Uuid::parse_str(text).map_err(|source| CliError::JobId {
        text: text.to_owned(),
        source,
    })
}

fn parse_expectations(args: &[String]) -> Result<HashMap<Uuid, Digest>, CliError> {
    args.iter()
        .map(|arg| {
            let (job, head) = arg
                .split_once('=')
                .ok_or_else(|| CliError::Expect(arg.clone()))?;
            let job = parse_job_id(job)?;
            let head = Digest::parse(head).ok_or_else(|| CliError::Expect(arg.clone()))?;
            Ok((job, head))
        })
        .collect()
}

fn read_key(path: Option<&Path>) -> Result<Option<HeadKey>, CliError> {
    Ok(path.map(HeadKey::from_file).transpose()?)
}

fn read_file(path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|source| CliError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// Opens an existing log for reading; never creates or migrates one.
fn open_existing(db: &str) -> Result<Arc<dyn Log>, StoreError> {
    store::open(&Location::parse(db), &OpenOptions::reader())
}

fn print_evidence(result: &ExecutionResult) -> Result<(), CliError> {
    let evidence = execution_result_to_evidence(result);
    let text = serde_json::to_string_pretty(&evidence).map_err(io::Error::from)?;
    let mut out = io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

/// Diagnostics to stderr, as `--log-format` says, filtered by `JE_LOG`
/// (default `info`: a worker's claims, takeovers, fences, give-backs and
/// job ends; warnings and errors); with `--otlp-endpoint`, spans exported
/// over OTLP too, whatever `JE_LOG` says (what it returns then must be
/// kept until the command is done).
fn init_logging(cli: &Cli) -> Result<Option<Traces>, CliError> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_env("JE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal());
    let lines = match cli.log_format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .flatten_event(true)
            .boxed(),
    };
    let mut layers = vec![lines.with_filter(filter).boxed()];
    let exporting = match otlp_layer(cli)? {
        Some((traces, exporting)) => {
            layers.push(traces);
            Some(exporting)
        }
        None => None,
    };
    // A subscriber set already (by an embedder calling `main`) is kept.
    let _ = tracing_subscriber::registry().with(layers).try_init();
    Ok(exporting)
}

/// A layer of the CLI's subscriber.
type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

/// What keeps spans exported: dropped, it sends the last of them.
#[cfg(feature = "otel")]
type Traces = crate::otel::Exporting;
/// Without the `otel` feature nothing is exported.
#[cfg(not(feature = "otel"))]
type Traces = std::convert::Infallible;

/// The layer exporting spans over OTLP, and its guard, when asked for.
#[cfg(feature = "otel")]
fn otlp_layer(cli: &Cli) -> Result<Option<(BoxedLayer, Traces)>, CliError> {
    let Some(endpoint) = &cli.otlp_endpoint else {
        return Ok(None);
    };
    let (layer, exporting) = crate::otel::layer(endpoint)?;
    Ok(Some((layer.boxed(), exporting)))
}

/// Without the `otel` feature there is no OTLP layer.
#[cfg(not(feature = "otel"))]
fn otlp_layer(_: &Cli) -> Result<Option<(BoxedLayer, Traces)>, CliError> {
    Ok(None)
}

/// `jobs`: one line per job ([`job_rows`]), as text or JSON, filtered.
fn jobs(args: &JobsArgs) -> Result<u8, CliError> {
    let since = args
        .since
        .as_deref()
        .map(|text| parse_timestamp(text).map_err(|_| CliError::Since(text.to_owned())))
        .transpose()?;
    let filter = JobFilter {
        status: args.status.clone(),
        since,
        limit: args.limit,
    };
    let log = open_existing(&args.db.db)?;
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut shown = 0;
    for row in job_rows(&*log)? {
        if filter.limit.is_some_and(|limit| shown >= limit) {
            break;
        }
        let row = row?;
        if !filter.keeps(&row) {
            continue;
        }
        shown += 1;
        if args.json {
            writeln!(out, "{}", row.to_json())?;
        } else {
            writeln!(out, "{row}")?;
        }
    }
    out.flush()?;
    Ok(0)
}

/// `stats`: the log's and the queue's figures ([`crate::jobs::stats`]).
fn stats(log: &dyn Log, json: bool) -> Result<u8, CliError> {
    let stats = crate::jobs::stats(log)?;
    let mut out = io::stdout().lock();
    if json {
        writeln!(out, "{}", stats.to_json())?;
    } else {
        writeln!(out, "{stats}")?;
    }
    out.flush()?;
    Ok(0)
}

fn verify_command(args: &VerifyArgs) -> Result<u8, CliError> {
    let key = read_key(args.key_file.as_deref())?;
    match &args.bundle {
        Some(bundle) => verify_one_bundle(bundle, key.as_ref()),
        None => {
            let options = VerifyOptions::default()
                .with_key(key)
                .with_expected_heads(parse_expectations(&args.expect)?);
            verify(&*open_existing(&args.db.db)?, &options)
        }
    }
}

/// A progress bar for a log of `total` events, when it is long and stderr
/// is a terminal.
fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    (io::stderr().is_terminal() && total >= PROGRESS_EVENTS_MIN).then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "verifying {bar:40} {human_pos}/{human_len} events ({per_sec}, {eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    })
}

fn verify(store: &dyn EventStore, options: &VerifyOptions) -> Result<u8, CliError> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    let progress = progress_bar(store.last_position()?);
    let mut write_error = None;
    let summary = verify_store(
        store,
        options,
        |report| {
            let lines = report.violations.iter().map(ToString::to_string).chain(
                (report.more_violations > 0).then(|| {
                    format!(
                        "job {}: … and {} more violations",
                        report.job_id, report.more_violations
                    )
                }),
            );
            for line in lines {
                if let Err(e) = writeln!(out, "{line}") {
                    write_error.get_or_insert(e);
                }
            }
        },
        |events| {
            if let Some(bar) = &progress {
                bar.set_position(events);
            }
        },
    )?;
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    if let Some(e) = write_error {
        return Err(e.into());
    }
    print_summary(&mut out, &summary, options.key.is_some())?;
    out.flush()?;
    Ok(if summary.failed_jobs == 0 { 0 } else { 1 })
}

/// `verify`'s last lines: the verdict, and a note on unsealed events.
fn print_summary(out: &mut impl Write, summary: &Summary, keyed: bool) -> io::Result<()> {
    let authenticated = if keyed { ", heads authenticated" } else { "" };
    if summary.failed_jobs == 0 {
        writeln!(
            out,
            "ok: {} jobs, {} events: hash chains intact{authenticated}, every log satisfies EXEC-001..006",
            summary.jobs, summary.events
        )?;
    } else {
        writeln!(
            out,
            "FAILED: {} of {} jobs do not verify ({} events checked)",
            summary.failed_jobs, summary.jobs, summary.events
        )?;
    }
    if summary.unsealed > 0 {
        writeln!(
            out,
            "note: {} events were written before digests existed; their chain was computed, not compared (opening the database for writing seals them)",
            summary.unsealed
        )?;
    }
    Ok(())
}

fn verify_one_bundle(path: &Path, key: Option<&HeadKey>) -> Result<u8, CliError> {
    let bytes = read_file(path)?;
    let mut out = io::stdout().lock();
    match verify_bundle(&bytes, key) {
        Ok(result) => {
            let authenticated = if key.is_some() {
                ", head authenticated"
            } else {
                ""
            };
            writeln!(
                out,
                "ok: bundle of job {}: {} events, head {}{authenticated}, evidence matches",
                result.job_id, result.events, result.head
            )?;
            Ok(0)
        }
        Err(BundleError::Broken { problems }) => {
            for problem in &problems {
                writeln!(out, "{}: {problem}", path.display())?;
            }
            writeln!(out, "FAILED: the bundle does not verify")?;
            Ok(1)
        }
        Err(e) => Err(e.into()),
    }
}
