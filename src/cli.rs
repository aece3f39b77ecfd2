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
use uuid::Uuid;

use crate::bundle::{BundleError, export, verify_bundle};
use crate::chain::{Digest, HeadKey, KeyError};
use crate::clock::{LogicalClock, derived_job_id};
#[cfg(unix)]
use crate::command::CommandHandler;
use crate::executor::{CancelRequest, ExecutorError, JobExecutor, Recovery, register_defaults};
use crate::model::{JobStatus, PlanError, PlanFile, validate_plan};
use crate::projection::{Projector, ReplayError, execution_result_to_evidence, replay};
use crate::report::{JobPage, ReportError, ReportOptions, write_site};
use crate::result::ExecutionResult;
use crate::store::{
    self, EventStore, Location, Log, OpenOptions, QueueState, QueuedJob, StoreError, Synchronous,
};
use crate::verify::{VerifyOptions, verify_store};
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
    Run {
        /// The plan: {"job_id"?: uuid, "contract_id": uuid, "steps": [...]}.
        plan: PathBuf,
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
        /// Who runs the job, recorded in JobStarted.
        #[arg(long, default_value = "job-executor")]
        executed_by: String,
        /// Logical clock, and a job id derived from the plan when it has none:
        /// the same plan gives byte-identical output and events.
        #[arg(long)]
        deterministic: bool,
        /// Durability of each commit: full (fsync per event) or normal (WAL, faster).
        #[arg(long, value_enum, default_value_t = SyncMode::Full)]
        synchronous: SyncMode,
        /// Authenticate every head with HMAC-SHA256 under the key in this file.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Print a stored job's evidence, rebuilt from its events (or from a bundle).
    Replay {
        /// The job id.
        #[arg(required_unless_present = "bundle", conflicts_with = "bundle")]
        job_id: Option<String>,
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
        /// Replay an audit bundle instead of the database (after verifying it).
        #[arg(long)]
        bundle: Option<PathBuf>,
    },
    /// Print a stored job's events as JSON Lines, in seq order.
    Events {
        /// The job id.
        job_id: String,
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
    },
    /// List stored jobs: id, status, steps succeeded/planned, start and end times.
    Jobs {
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
    },
    /// Check every stored job's hash chain and EXEC-001..006 (or one bundle).
    /// Exit 1 on any violation.
    Verify {
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
        /// A head kept earlier, JOB_ID=sha256:HEX: the job's log must still
        /// contain it (detects a cut-off tail). Repeatable.
        #[arg(long, value_name = "JOB_ID=sha256:HEX")]
        expect: Vec<String>,
        /// Also check every head's HMAC under the key in this file.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// Verify an audit bundle offline instead of the database.
        #[arg(long, conflicts_with = "expect")]
        bundle: Option<PathBuf>,
    },
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
    Resume {
        /// The job id.
        job_id: String,
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
        /// Who resumes the job, recorded in JobResumed.
        #[arg(long, default_value = "job-executor")]
        executed_by: String,
        /// Authenticate the events it records with the key in this file.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Ask a job to stop: its executor finishes the step in flight and starts no other.
    Cancel {
        /// The job id.
        job_id: String,
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
        /// Why, recorded with the request.
        #[arg(long, default_value = "cancelled on request")]
        reason: String,
        /// Authenticate the event it records with the key in this file.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Write a self-contained HTML audit report: of one job, of an audit
    /// bundle, or of every job (an index and a page per job).
    Report {
        /// The job id.
        #[arg(required_unless_present_any = ["bundle", "all"], conflicts_with_all = ["bundle", "all"])]
        job_id: Option<String>,
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
        /// Report on an audit bundle instead of the database.
        #[arg(long, conflicts_with = "all")]
        bundle: Option<PathBuf>,
        /// Every job: index.html and one page per job, into the --out directory.
        #[arg(long, requires = "out")]
        all: bool,
        /// Write the page here (with --all, the directory) instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also check every event's MAC under the key in this file.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
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
    Submit {
        /// The plan: {"job_id"?: uuid, "contract_id": uuid, "steps": [...]}.
        plan: PathBuf,
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
        /// Who submits the job, recorded in its JobStarted.
        #[arg(long, default_value = "job-executor")]
        executed_by: String,
    },
    /// Claim submitted jobs and run them (with the CLI's handlers), taking
    /// over jobs whose worker's lease ran out. SIGTERM/SIGINT: finish the
    /// steps in flight, give the jobs back, exit 0.
    Worker {
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
        /// Jobs run at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// How long a claim lasts unless renewed (renewed every third).
        #[arg(long, default_value_t = 30.0)]
        lease_seconds: f64,
        /// This worker's name in leases and in `jobs` (default: host:pid).
        #[arg(long)]
        worker_id: Option<String>,
        /// Exit once nothing is submitted or running.
        #[arg(long)]
        until_idle: bool,
        /// Authenticate the events it records with the key in this file.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
    /// Write a job's self-contained audit bundle (JSON).
    Export {
        /// The job id.
        job_id: String,
        /// The event log database.
        #[command(flatten)]
        db: DbArg,
        /// Write the bundle here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Check the log's MACs under the key in this file before exporting.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
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
    /// `--lease-seconds` is not a positive number of seconds.
    #[error("invalid --lease-seconds {0}: expected a positive number of seconds")]
    Lease(f64),
    /// Writing to stdout failed.
    #[error("cannot write output: {0}")]
    Output(#[from] io::Error),
}

/// Runs the parsed command line and returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    match dispatch(cli.command) {
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
        Command::Run {
            plan,
            db,
            executed_by,
            deterministic,
            synchronous,
            key_file,
        } => run(&RunArgs {
            plan_path: &plan,
            db: &db.db,
            executed_by: &executed_by,
            deterministic,
            synchronous,
            key_file: key_file.as_deref(),
        }),
        Command::Replay { job_id, db, bundle } => {
            replay_command(job_id.as_deref(), &db.db, bundle.as_deref())
        }
        Command::Events { job_id, db } => events(&job_id, &db.db),
        Command::Jobs { db } => jobs(&*open_existing(&db.db)?),
        Command::Verify {
            db,
            expect,
            key_file,
            bundle,
        } => {
            let key = read_key(key_file.as_deref())?;
            match bundle {
                Some(bundle) => verify_one_bundle(&bundle, key.as_ref()),
                None => {
                    let options = VerifyOptions::default()
                        .with_key(key)
                        .with_expected_heads(parse_expectations(&expect)?);
                    verify(&*open_existing(&db.db)?, &options)
                }
            }
        }
        Command::Recover { db, key_file } => recover(&db.db, key_file.as_deref()),
        Command::Resume {
            job_id,
            db,
            executed_by,
            key_file,
        } => resume(&job_id, &db.db, &executed_by, key_file.as_deref()),
        Command::Cancel {
            job_id,
            db,
            reason,
            key_file,
        } => cancel(&job_id, &db.db, &reason, key_file.as_deref()),
        Command::Report {
            job_id,
            db,
            bundle,
            all,
            out,
            key_file,
        } => report(&ReportArgs {
            job_id: job_id.as_deref(),
            db: &db.db,
            bundle: bundle.as_deref(),
            all,
            out: out.as_deref(),
            key_file: key_file.as_deref(),
        }),
        Command::Export {
            job_id,
            db,
            out,
            key_file,
        } => export_command(&job_id, &db.db, out.as_deref(), key_file.as_deref()),
        Command::Copy { from, to } => copy(&from, &to),
        Command::Submit {
            plan,
            db,
            executed_by,
        } => submit(&plan, &db.db, &executed_by),
        Command::Worker {
            db,
            concurrency,
            lease_seconds,
            worker_id,
            until_idle,
            key_file,
        } => worker(&WorkerArgs {
            db: &db.db,
            concurrency,
            lease_seconds,
            worker_id: worker_id.as_deref(),
            until_idle,
            key_file: key_file.as_deref(),
        }),
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

fn submit(plan_path: &Path, db: &str, executed_by: &str) -> Result<u8, CliError> {
    let plan = read_plan(plan_path)?;
    let job_id = plan.job_id.unwrap_or_else(Uuid::new_v4);
    let log = store::open(&Location::parse(db), &OpenOptions::default())?;
    let job = QueuedJob::new(job_id, plan.contract_id, plan.steps, executed_by);
    match crate::worker::submit(&*log, &job) {
        Err(StoreError::Conflict { .. }) => Err(ExecutorError::JobAlreadyExists {
            job_id,
            events: log.last_seq(job_id)?,
        }
        .into()),
        other => other.map_err(CliError::from),
    }?;
    let mut out = io::stdout().lock();
    writeln!(out, "{job_id}")?;
    out.flush()?;
    Ok(0)
}

struct WorkerArgs<'a> {
    db: &'a str,
    concurrency: usize,
    lease_seconds: f64,
    worker_id: Option<&'a str>,
    until_idle: bool,
    key_file: Option<&'a Path>,
}

fn worker(args: &WorkerArgs<'_>) -> Result<u8, CliError> {
    let key = read_key(args.key_file)?;
    let lease = std::time::Duration::try_from_secs_f64(args.lease_seconds)
        .ok()
        .filter(|lease| !lease.is_zero())
        .ok_or(CliError::Lease(args.lease_seconds))?;
    let log = store::open(&Location::parse(args.db), &OpenOptions::default())?;
    let mut options = WorkerOptions::default()
        .with_concurrency(args.concurrency)
        .with_lease(lease);
    if let Some(id) = args.worker_id {
        options = options.with_worker_id(id);
    }
    if args.until_idle {
        options = options.until_idle();
    }
    let worker_id = options.worker_id.clone();
    let mut worker = Worker::with_key_and_clock(log, options, key, None);
    register_cli_handlers(worker.executor_mut());
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

fn replay_command(job_id: Option<&str>, db: &str, bundle: Option<&Path>) -> Result<u8, CliError> {
    let result = match (bundle, job_id) {
        (Some(bundle), _) => verify_bundle(&read_file(bundle)?, None)?,
        (None, Some(job_id)) => {
            // The argument is checked before the database is touched.
            let job_id = parse_job_id(job_id)?;
            replay(&*open_existing(db)?, job_id)?
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

fn resume(
    job_id: &str,
    db: &str,
    executed_by: &str,
    key_file: Option<&Path>,
) -> Result<u8, CliError> {
    let job_id = parse_job_id(job_id)?;
    let executor = existing_executor(db, key_file)?;
    let result = executor.resume(job_id, None, executed_by)?;
    print_evidence(&result)?;
    Ok(exit_code(&result))
}

fn cancel(job_id: &str, db: &str, reason: &str, key_file: Option<&Path>) -> Result<u8, CliError> {
    let job_id = parse_job_id(job_id)?;
    let log = store::open(&Location::parse(db), &OpenOptions::existing())?;
    let executor = cli_executor(log.clone(), key_file)?;
    let mut out = io::stdout().lock();
    let requested = match executor.request_cancel(job_id, reason) {
        // Submitted, not started: it ends before it starts.
        Err(ExecutorError::UnknownJob { .. }) => match log.queued_job(job_id)? {
            Some((job, _)) => match executor.cancel_queued(&job, reason) {
                Ok(_) => {
                    writeln!(out, "job {job_id} cancelled before it started")?;
                    return Ok(0);
                }
                // A worker started it meanwhile: ask it to stop.
                Err(ExecutorError::JobAlreadyExists { .. }) => {
                    executor.request_cancel(job_id, reason)?
                }
                Err(e) => return Err(e.into()),
            },
            None => return Err(ExecutorError::UnknownJob { job_id }.into()),
        },
        other => other?,
    };
    match requested {
        CancelRequest::Recorded { seq } => {
            writeln!(out, "cancel requested for job {job_id} (seq {seq})")?
        }
        CancelRequest::AlreadyRequested => {
            writeln!(out, "cancel already requested for job {job_id}")?
        }
    }
    Ok(0)
}

fn export_command(
    job_id: &str,
    db: &str,
    out: Option<&Path>,
    key_file: Option<&Path>,
) -> Result<u8, CliError> {
    let job_id = parse_job_id(job_id)?;
    let key = read_key(key_file)?;
    let bytes = export(&*open_existing(db)?, job_id, key.as_ref())?.to_bytes();
    match out {
        Some(path) => std::fs::write(path, &bytes).map_err(|source| CliError::File {
            path: path.to_path_buf(),
            source,
        })?,
        None => {
            let mut stdout = io::stdout().lock();
            stdout.write_all(&bytes)?;
            stdout.flush()?;
        }
    }
    Ok(0)
}

struct ReportArgs<'a> {
    job_id: Option<&'a str>,
    db: &'a str,
    bundle: Option<&'a Path>,
    all: bool,
    out: Option<&'a Path>,
    key_file: Option<&'a Path>,
}

/// `report`: every input is read and checked before anything is written.
fn report(args: &ReportArgs<'_>) -> Result<u8, CliError> {
    let options = ReportOptions::default().with_key(read_key(args.key_file)?);
    if args.all {
        let Some(dir) = args.out else {
            unreachable!("clap requires --out with --all")
        };
        let log = open_existing(args.db)?;
        let owners = log
            .queued()?
            .into_iter()
            .filter(|e| e.state == QueueState::Running)
            .filter_map(|e| Some((e.job_id, e.owner?)))
            .collect();
        write_site(&*log, dir, &options.with_owners(owners))?;
        return Ok(0);
    }
    let page = match (args.bundle, args.job_id) {
        (Some(bundle), _) => JobPage::from_bundle(&read_file(bundle)?, &options)?,
        (None, Some(job_id)) => {
            let job_id = parse_job_id(job_id)?;
            let records = open_existing(args.db)?.load_job(job_id)?;
            JobPage::from_log(job_id, &records, &options)?
        }
        (None, None) => unreachable!("clap requires JOB_ID, --bundle or --all"),
    };
    let html = page.render()?;
    match args.out {
        Some(path) => std::fs::write(path, html).map_err(|source| CliError::File {
            path: path.to_path_buf(),
            source,
        })?,
        None => {
            let mut stdout = io::stdout().lock();
            stdout.write_all(html.as_bytes())?;
            stdout.flush()?;
        }
    }
    Ok(0)
}

struct RunArgs<'a> {
    plan_path: &'a Path,
    db: &'a str,
    executed_by: &'a str,
    deterministic: bool,
    synchronous: SyncMode,
    key_file: Option<&'a Path>,
}

fn run(args: &RunArgs<'_>) -> Result<u8, CliError> {
    // Everything about the input is checked before the database is touched.
    let plan = read_plan(args.plan_path)?;
    let key = read_key(args.key_file)?;
    let job_id = match plan.job_id {
        Some(id) => id,
        None if args.deterministic => derived_job_id(plan.contract_id, &plan.steps),
        None => Uuid::new_v4(),
    };
    let options = OpenOptions::default().with_synchronous(match args.synchronous {
        SyncMode::Full => Synchronous::Full,
        SyncMode::Normal => Synchronous::Normal,
    });
    let store = store::open(&Location::parse(args.db), &options)?;
    let mut builder = JobExecutor::builder().store(store);
    if args.deterministic {
        builder = builder.clock(Arc::new(LogicalClock::default()));
    }
    if let Some(key) = key {
        builder = builder.head_key(key);
    }
    let mut executor = builder.build();
    register_cli_handlers(&mut executor);
    let result = executor.execute_job(
        job_id,
        plan.contract_id,
        &plan.steps,
        None,
        args.executed_by,
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

/// The CLI's handlers: the seed's no-op step types, and `command`.
fn register_cli_handlers(executor: &mut JobExecutor) {
    register_defaults(executor);
    #[cfg(unix)]
    executor.register_handler("command", CommandHandler);
}

/// An executor over an existing database (never created here), for the
/// commands that append to jobs already in it.
fn existing_executor(db: &str, key_file: Option<&Path>) -> Result<JobExecutor, CliError> {
    cli_executor(
        store::open(&Location::parse(db), &OpenOptions::existing())?,
        key_file,
    )
}

/// An executor on `log` with the CLI's handlers and the key in `key_file`.
fn cli_executor(log: Arc<dyn Log>, key_file: Option<&Path>) -> Result<JobExecutor, CliError> {
    let key = read_key(key_file)?;
    let mut builder = JobExecutor::builder().store(log);
    if let Some(key) = key {
        builder = builder.head_key(key);
    }
    let mut executor = builder.build();
    register_cli_handlers(&mut executor);
    Ok(executor)
}

fn recover(db: &str, key_file: Option<&Path>) -> Result<u8, CliError> {
    let executor = existing_executor(db, key_file)?;
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

/// `jobs`: every job of the log in start order, then the jobs submitted
/// and not started yet; a running job's worker in a last column.
fn jobs(log: &dyn Log) -> Result<u8, CliError> {
    let queued = log.queued()?;
    let owner_of = |job_id: Uuid| {
        queued
            .iter()
            .find(|e| e.job_id == job_id && e.state == QueueState::Running)
            .and_then(|e| e.owner.as_deref())
            .map(|owner| format!("\towner={owner}"))
            .unwrap_or_default()
    };
    let mut out = io::BufWriter::new(io::stdout().lock());
    let logged = log.job_ids()?;
    for &job_id in &logged {
        let mut projector = Projector::new(job_id);
        let mut broken = None;
        for record in log.load_job(job_id)? {
            if let Err(e) = projector.apply_record(&record) {
                broken = Some(e);
                break;
            }
        }
        match (projector.result(), broken) {
            (Some(result), None) => writeln!(
                out,
                "{}\t{}\t{}/{} steps\t{}\t{}{}",
                job_id,
                result.final_status,
                result.steps_succeeded,
                result.steps_planned,
                crate::events::format_timestamp(&result.started_at),
                crate::events::format_timestamp(&result.completed_at),
                owner_of(job_id),
            )?,
            (_, Some(e)) => writeln!(out, "{job_id}\tINVALID\t{e}")?,
            (None, None) => writeln!(out, "{job_id}\tINVALID\tno events")?,
        }
    }
    for entry in queued.iter().filter(|e| !logged.contains(&e.job_id)) {
        let status = match entry.state {
            QueueState::Running => "RUNNING",
            _ => "SUBMITTED",
        };
        writeln!(
            out,
            "{}\t{status}\t0/{} steps\t{}\t-{}",
            entry.job_id,
            entry.steps,
            entry.submitted_at,
            owner_of(entry.job_id),
        )?;
    }
    out.flush()?;
    Ok(0)
}

fn verify(store: &dyn EventStore, options: &VerifyOptions) -> Result<u8, CliError> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    let total = store.last_position()?;
    let progress = (io::stderr().is_terminal() && total >= PROGRESS_EVENTS_MIN).then(|| {
        let bar = indicatif::ProgressBar::new(total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "verifying {bar:40} {human_pos}/{human_len} events ({per_sec}, {eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
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
    let authenticated = if options.key.is_some() {
        ", heads authenticated"
    } else {
        ""
    };
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
    out.flush()?;
    Ok(if summary.failed_jobs == 0 { 0 } else { 1 })
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
