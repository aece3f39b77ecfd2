//! Errors across the boundary: the engine's as Python exceptions (one
//! class per kind of `ExecutorError`, all under `job_executor.ExecutorError`,
//! each carrying the engine's own message), and a Python exception as the
//! one line the engine records.

use job_executor::ExecutorError as Error;
use job_executor::projection::ReplayError as Replay;
use job_executor::store::StoreError;
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

create_exception!(
    job_executor,
    ExecutorError,
    PyException,
    "The executor did not do what it was asked; the message says why."
);
create_exception!(
    job_executor,
    JobAlreadyExistsError,
    ExecutorError,
    "The job id already has events: a job is executed at most once. Nothing was appended."
);
create_exception!(
    job_executor,
    InvalidPlanError,
    ExecutorError,
    "The plan is not executable (step indices, parameters, timeouts). Nothing was appended."
);
create_exception!(
    job_executor,
    UnknownJobError,
    ExecutorError,
    "The log has no events for the job."
);
create_exception!(
    job_executor,
    JobEndedError,
    ExecutorError,
    "The job has ended; nothing more can happen to it."
);
create_exception!(
    job_executor,
    StepInDoubtError,
    ExecutorError,
    "A step's outcome is unknown (its executor stopped while it ran): run recover() first."
);
create_exception!(
    job_executor,
    ConflictError,
    ExecutorError,
    "Another executor appended to the job: it runs elsewhere, and this one stopped."
);
create_exception!(
    job_executor,
    EventLogError,
    ExecutorError,
    "The event log itself failed (I/O, a database that is not ours, locked, full, corrupt)."
);
create_exception!(
    job_executor,
    ReplayError,
    ExecutorError,
    "A stored job cannot be replayed: its log is unreadable or breaks an invariant."
);
create_exception!(
    job_executor,
    HealthObserverError,
    ExecutorError,
    "The health observer raised; any step outcome is recorded and the job stopped before its next step."
);

/// The Python exception for an engine error.
pub fn executor_error(error: &Error) -> PyErr {
    let message = error.to_string();
    match error {
        Error::JobAlreadyExists { .. } => JobAlreadyExistsError::new_err(message),
        Error::InvalidPlan { .. } => InvalidPlanError::new_err(message),
        Error::UnknownJob { .. } | Error::Replay(Replay::UnknownJob { .. }) => {
            UnknownJobError::new_err(message)
        }
        Error::JobEnded { .. } => JobEndedError::new_err(message),
        Error::StepInDoubt { .. } => StepInDoubtError::new_err(message),
        Error::Conflict { .. } | Error::Contended { .. } => ConflictError::new_err(message),
        Error::Store { .. }
        | Error::Log { .. }
        | Error::OutcomeNotRecorded { .. }
        | Error::Replay(Replay::Store(_)) => EventLogError::new_err(message),
        Error::Replay(_) => ReplayError::new_err(message),
        Error::HealthObserver { .. } => HealthObserverError::new_err(message),
        _ => ExecutorError::new_err(message),
    }
}

/// The Python exception for a failure of the event log.
pub fn store_error(error: &StoreError) -> PyErr {
    EventLogError::new_err(error.to_string())
}

/// Adds the exception classes to the module.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ExecutorError", py.get_type::<ExecutorError>())?;
    m.add(
        "JobAlreadyExistsError",
        py.get_type::<JobAlreadyExistsError>(),
    )?;
    m.add("InvalidPlanError", py.get_type::<InvalidPlanError>())?;
    m.add("UnknownJobError", py.get_type::<UnknownJobError>())?;
    m.add("JobEndedError", py.get_type::<JobEndedError>())?;
    m.add("StepInDoubtError", py.get_type::<StepInDoubtError>())?;
    m.add("ConflictError", py.get_type::<ConflictError>())?;
    m.add("EventLogError", py.get_type::<EventLogError>())?;
    m.add("ReplayError", py.get_type::<ReplayError>())?;
    m.add("HealthObserverError", py.get_type::<HealthObserverError>())?;
    Ok(())
}

/// The last line of an exception's traceback: `ValueError: bad target`.
pub fn last_traceback_line(py: Python<'_>, err: &PyErr) -> String {
    static FORMAT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let formatted = FORMAT
        .get_or_try_init(py, || {
            Ok::<_, PyErr>(
                py.import("traceback")?
                    .getattr("format_exception_only")?
                    .unbind(),
            )
        })
        .and_then(|format| {
            let lines = format.bind(py).call1((err.get_type(py), err.value(py)))?;
            let last = lines.get_item(-1)?;
            Ok(last.extract::<String>()?.trim_end().to_owned())
        });
    // Formatting an exception can itself fail (a __str__ that raises):
    // the type's name is still worth recording.
    formatted.unwrap_or_else(|_| {
        err.get_type(py)
            .name()
            .map_or_else(|_| "exception".to_owned(), |n| n.to_string())
    })
}

/// Why what a handler returned cannot be recorded.
pub fn not_a_step_output(py: Python<'_>, err: &PyErr, step_type: &str) -> String {
    format!(
        "{} (the handler for step type {step_type:?} must return a StepOutput holding JSON values)",
        last_traceback_line(py, err)
    )
}
