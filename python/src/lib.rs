//! The job executor as a Python package: the original `job_executor`
//! module's API over the Rust engine.
//!
//! This crate is a boundary and nothing else: it converts Python values to
//! the engine's types and back, releases the interpreter while the engine
//! works, and maps the engine's errors to exceptions. Every decision (what
//! runs, what is recorded, what a failure is) is the core crate's.

mod convert;
mod drive;
mod errors;
mod executor;
mod handlers;
mod json;
mod signal;
mod threads;

use pyo3::prelude::*;

use crate::executor::PyJobExecutor;

/// An executor with the no-op handler registered for the original module's
/// default step types, and an in-memory event log.
#[pyfunction]
fn create_default_executor() -> PyJobExecutor {
    let metrics = std::sync::Arc::new(job_executor::metrics::Metrics::new());
    let mut executor = job_executor::JobExecutor::builder()
        .metrics(metrics)
        .build();
    job_executor::executor::register_defaults(&mut executor);
    PyJobExecutor::wrap(executor)
}

/// The audit evidence of an `ExecutionResult`, as a dict.
#[pyfunction]
fn execution_result_to_evidence<'py>(result: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let native = convert::execution_result(result)?;
    json::to_python(
        result.py(),
        &job_executor::execution_result_to_evidence(native.get().result()),
    )
}

/// The job id a deterministic run gives a plan: derived from the contract
/// and the steps, so that the same plan always names the same job.
#[pyfunction]
fn derived_job_id(
    py: Python<'_>,
    contract_id: uuid::Uuid,
    steps: &Bound<'_, PyAny>,
) -> PyResult<uuid::Uuid> {
    let plan = convert::plan(steps)?;
    Ok(py.detach(|| job_executor::clock::derived_job_id(contract_id, &plan)))
}

#[pymodule]
#[pyo3(name = "_native")]
fn native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("EXECUTOR_VERSION", job_executor::EXECUTOR_VERSION)?;
    m.add_class::<PyJobExecutor>()?;
    m.add_class::<handlers::NoOpHandler>()?;
    m.add_class::<handlers::FailingHandler>()?;
    m.add_class::<signal::CancelSignal>()?;
    m.add_class::<convert::NativeResult>()?;
    m.add_function(wrap_pyfunction!(create_default_executor, m)?)?;
    m.add_function(wrap_pyfunction!(execution_result_to_evidence, m)?)?;
    m.add_function(wrap_pyfunction!(derived_job_id, m)?)?;
    errors::register(m)?;
    Ok(())
}
