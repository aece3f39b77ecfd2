//! An embeddable, deterministic, event-sourced executor of governance jobs.
//!
//! A job is an ordered plan of [`JobStep`]s. The [`JobExecutor`] runs each
//! step through the [`StepHandler`] registered for its type, in declared
//! order; it stops at the first failure, never retries, observes (never
//! modifies) health, and records every fact as an immutable event in an
//! append-only log. Results and audit evidence are projections of that log,
//! so replaying a stored job gives exactly the evidence emitted live.
//!
//! The flow is plan → events ([`events`]) judged by the state machine
//! ([`machine`]) → log ([`store`]) → projections ([`projection`]).
//! [`verify`] checks any stored log against the invariants EXEC-001..006.
//!
//! ```
//! use job_executor::{create_default_executor, execution_result_to_evidence, JobStatus, JobStep};
//! use uuid::Uuid;
//!
//! let executor = create_default_executor();
//! let steps = vec![
//!     JobStep::new(0, "capability_enable", "billing"),
//!     JobStep::new(1, "configuration_change", "billing"),
//! ];
//! let job_id = Uuid::new_v4();
//! let result = executor.execute_job(job_id, Uuid::new_v4(), &steps, None, "ops").unwrap();
//! assert_eq!(result.final_status, JobStatus::Completed);
//!
//! // The log replays to the same evidence.
//! let replayed = executor.replay(job_id).unwrap();
//! assert_eq!(execution_result_to_evidence(&replayed), execution_result_to_evidence(&result));
//! ```

#![warn(missing_docs)]

pub mod bundle;
#[cfg(feature = "bus")]
pub mod bus;
pub mod chain;
pub mod checkpoint;
#[cfg(feature = "cli")]
pub mod cli;
pub mod clock;
#[cfg(unix)]
pub mod command;
pub mod events;
pub mod executor;
pub mod handler;
pub mod jobs;
pub mod machine;
pub mod merkle;
pub mod metrics;
pub mod model;
pub mod note;
#[cfg(feature = "otel")]
pub mod otel;
pub mod projection;
pub mod report;
pub mod result;
mod runner;
pub mod store;
mod sync;
pub mod upcast;
pub mod verify;
mod watchdog;
pub mod worker;

pub use executor::{
    CancelRequest, EXECUTOR_VERSION, ExecutorBuilder, ExecutorConfig, ExecutorError, JobExecutor,
    Recovery, UnrecordedOutcome, create_default_executor,
};
pub use handler::{FailingHandler, HealthObserver, NoOpHandler, StepCall, StepHandler};
pub use model::{CancelSignal, ExecutionContext, JobStatus, JobStep, StepOutput, StepStatus};
pub use projection::{execution_result_to_evidence, replay};
pub use result::{ExecutionResult, StepResult};
pub use runner::PoolOptions;
