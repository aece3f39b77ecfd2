//! The `job-executor` command line: parses arguments, calls the library,
//! prints. Every JSON it prints is built by the library.
//!
//! Exit codes: 0 success (for `run`, the job COMPLETED); 1 the job FAILED, or
//! `verify` found violations; 2 bad input or a failure of the log, with one
//! line on stderr and nothing written.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use uuid::Uuid;

use crate::clock::{LogicalClock, derived_job_id};
use crate::executor::{ExecutorError, JobExecutor, register_defaults};
use crate::model::{JobStatus, PlanError, PlanFile, validate_plan};
use crate::projection::{Projector, ReplayError, execution_result_to_evidence, replay};
use crate::store::{EventStore, SqliteOptions, SqliteStore, StoreError, Synchronous};
use crate::verify::verify_store;

/// The database file used when `--db` is not given.
pub const DEFAULT_DB: &str = "job-executor.db";

/// Executes governance job plans as an event-sourced, replayable log.
#[derive(Debug, Parser)]
#[command(name = "job-executor", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Execute a plan; print its evidence. Exit 0 if COMPLETED, 1 if FAILED.
    Run {
        /// The plan: {"job_id"?: uuid, "contract_id": uuid, "steps": [...]}.
        plan: PathBuf,
        /// The event log database.
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
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
    },
    /// Print a stored job's evidence, rebuilt from its events.
    Replay {
        /// The job id.
        job_id: String,
        /// The event log database.
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
    },
    /// Print a stored job's events as JSON Lines, in seq order.
    Events {
        /// The job id.
        job_id: String,
        /// The event log database.
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
    },
    /// List stored jobs: id, status, steps succeeded/planned, start and end times.
    Jobs {
        /// The event log database.
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
    },
    /// Check every stored job's log against EXEC-001..006. Exit 1 on any violation.
    Verify {
        /// The event log database.
        #[arg(long, default_value = DEFAULT_DB)]
        db: PathBuf,
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
    /// The log failed or is not ours.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The executor refused or failed.
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    /// A stored job cannot be replayed.
    #[error(transparent)]
    Replay(#[from] ReplayError),
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
        } => run(&plan, &db, &executed_by, deterministic, synchronous),
        Command::Replay { job_id, db } => {
            let job_id = parse_job_id(&job_id)?;
            let store = open_existing(&db)?;
            let result = replay(&store, job_id)?;
            print_evidence(&result)?;
            Ok(0)
        }
        Command::Events { job_id, db } => {
            let job_id = parse_job_id(&job_id)?;
            let store = open_existing(&db)?;
            let records = store.load_job(job_id)?;
            if records.is_empty() {
                return Err(ReplayError::UnknownJob { job_id }.into());
            }
            let mut out = io::BufWriter::new(io::stdout().lock());
            for record in &records {
                writeln!(out, "{}", record.to_json_line())?;
            }
            out.flush()?;
            Ok(0)
        }
        Command::Jobs { db } => jobs(&open_existing(&db)?),
        Command::Verify { db } => verify(&open_existing(&db)?),
    }
}

fn run(
    plan_path: &Path,
    db: &Path,
    executed_by: &str,
    deterministic: bool,
    synchronous: SyncMode,
) -> Result<u8, CliError> {
    // Everything about the input is checked before the database is touched.
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
    let job_id = match plan.job_id {
        Some(id) => id,
        None if deterministic => derived_job_id(plan.contract_id, &plan.steps),
        None => Uuid::new_v4(),
    };
    let options = SqliteOptions {
        synchronous: match synchronous {
            SyncMode::Full => Synchronous::Full,
            SyncMode::Normal => Synchronous::Normal,
        },
        ..SqliteOptions::default()
    };
    let store = Arc::new(SqliteStore::open_with(db, &options)?);
    let mut builder = JobExecutor::builder().store(store);
    if deterministic {
        builder = builder.clock(Arc::new(LogicalClock::default()));
    }
    let mut executor = builder.build();
    register_defaults(&mut executor);
    let result = executor.execute_job(job_id, plan.contract_id, &plan.steps, None, executed_by)?;
    print_evidence(&result)?;
    Ok(match result.final_status {
        JobStatus::Completed => 0,
        _ => 1,
    })
}

fn parse_job_id(text: &str) -> Result<Uuid, CliError> {
    Uuid::parse_str(text).map_err(|source| CliError::JobId {
        text: text.to_owned(),
        source,
    })
}

/// Opens an existing database for reading; never creates or migrates one.
fn open_existing(db: &Path) -> Result<SqliteStore, StoreError> {
    SqliteStore::open_with(
        db,
        &SqliteOptions {
            read_only: true,
            create: false,
            ..SqliteOptions::default()
        },
    )
}

fn print_evidence(result: &crate::model::ExecutionResult) -> Result<(), CliError> {
    let evidence = execution_result_to_evidence(result);
    let text = serde_json::to_string_pretty(&evidence).map_err(io::Error::from)?;
    let mut out = io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()?;
    Ok(())
}

fn jobs(store: &dyn EventStore) -> Result<u8, CliError> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    for job_id in store.job_ids()? {
        let mut projector = Projector::new(job_id);
        let mut broken = None;
        for record in store.load_job(job_id)? {
            if let Err(e) = projector.apply_record(&record) {
                broken = Some(e);
                break;
            }
        }
        match (projector.result(), broken) {
            (Some(result), None) => writeln!(
                out,
                "{}\t{}\t{}/{} steps\t{}\t{}",
                job_id,
                result.final_status,
                result.steps_succeeded,
                result.steps_planned,
                crate::events::format_timestamp(&result.started_at),
                crate::events::format_timestamp(&result.completed_at),
            )?,
            (_, Some(e)) => writeln!(out, "{job_id}\tINVALID\t{e}")?,
            (None, None) => writeln!(out, "{job_id}\tINVALID\tno events")?,
        }
    }
    out.flush()?;
    Ok(0)
}

fn verify(store: &dyn EventStore) -> Result<u8, CliError> {
    let mut out = io::BufWriter::new(io::stdout().lock());
    let (mut jobs, mut events, mut bad_jobs) = (0u64, 0u64, 0u64);
    let mut write_error = None;
    verify_store(store, |report| {
        jobs += 1;
        events += report.events;
        if !report.is_ok() {
            bad_jobs += 1;
        }
        for violation in &report.violations {
            if let Err(e) = writeln!(out, "{violation}") {
                write_error.get_or_insert(e);
            }
        }
    })?;
    if let Some(e) = write_error {
        return Err(e.into());
    }
    if bad_jobs == 0 {
        writeln!(
            out,
            "ok: {jobs} jobs, {events} events: every log satisfies EXEC-001..006"
        )?;
    } else {
        writeln!(
            out,
            "FAILED: {bad_jobs} of {jobs} jobs violate invariants ({events} events checked)"
        )?;
    }
    out.flush()?;
    Ok(if bad_jobs == 0 { 0 } else { 1 })
}
