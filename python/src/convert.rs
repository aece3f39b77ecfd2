//! The engine's types ↔ the package's Python dataclasses.
//!
//! The dataclasses are declared in `job_executor/_types.py` (plain data, no
//! behaviour); this module is the one place that builds them from the
//! engine's values and reads the engine's values back from them.

use job_executor::verify::Violation;
use job_executor::{ExecutionContext, ExecutionResult, JobStep, Recovery, StepOutput, StepResult};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList, PyType};
use serde::Serialize;
use serde_json::Value;

use crate::json;
use crate::signal::CancelSignal;

/// The dataclasses and enums of `job_executor._types`, looked up once; each
/// field is the class of the same name.
pub struct Types {
    pub job_step: Py<PyType>,
    pub step_output: Py<PyType>,
    pub execution_context: Py<PyType>,
    pub step_result: Py<PyType>,
    pub execution_result: Py<PyType>,
    pub job_status: Py<PyType>,
    pub step_status: Py<PyType>,
    pub violation: Py<PyType>,
    pub verify_report: Py<PyType>,
    pub recovery: Py<PyType>,
}

static TYPES: PyOnceLock<Types> = PyOnceLock::new();

/// The Python types; `job_executor._types` is imported on first use, which
/// is after the package itself has finished importing.
pub fn types(py: Python<'_>) -> PyResult<&'static Types> {
    TYPES.get_or_try_init(py, || {
        let module = py.import("job_executor._types")?;
        let get = |name: &str| -> PyResult<Py<PyType>> {
            Ok(module.getattr(name)?.cast_into::<PyType>()?.unbind())
        };
        Ok(Types {
            job_step: get("JobStep")?,
            step_output: get("StepOutput")?,
            execution_context: get("ExecutionContext")?,
            step_result: get("StepResult")?,
            execution_result: get("ExecutionResult")?,
            job_status: get("JobStatus")?,
            step_status: get("StepStatus")?,
            violation: get("Violation")?,
            verify_report: get("VerifyReport")?,
            recovery: get("Recovery")?,
        })
    })
}

/// The wire name of a serde enum (`"COMPLETED"`, `"panic"`, …).
fn wire_name(value: impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(name)) => name,
        // Every enum converted here serialises as a plain string.
        other => format!("{other:?}"),
    }
}

/// A plan step, copied from any object with the attributes of `JobStep`.
///
/// # Errors
/// `AttributeError`/`TypeError` for a missing or mistyped attribute,
/// `OverflowError` for a negative index or timeout, and the JSON errors of
/// the parameters.
pub fn job_step(obj: &Bound<'_, PyAny>) -> PyResult<JobStep> {
    let py = obj.py();
    let mut step = JobStep::new(
        obj.getattr(intern!(py, "step_index"))?.extract()?,
        obj.getattr(intern!(py, "step_type"))?.extract::<String>()?,
        obj.getattr(intern!(py, "target"))?.extract::<String>()?,
    );
    step.parameters = json::to_value(&obj.getattr(intern!(py, "parameters"))?)?;
    step.timeout_seconds = obj.getattr(intern!(py, "timeout_seconds"))?.extract()?;
    Ok(step)
}

/// A plan: a copy of every step of an iterable of steps.
///
/// # Errors
/// `TypeError` when `steps` is not iterable; the errors of [`job_step`],
/// naming the step's position.
pub fn plan(steps: &Bound<'_, PyAny>) -> PyResult<Vec<JobStep>> {
    let mut plan = Vec::new();
    for (position, step) in steps.try_iter()?.enumerate() {
        let step = step?;
        plan.push(job_step(&step).map_err(|e| {
            let err =
                PyTypeError::new_err(format!("steps[{position}] is not a valid JobStep: {e}"));
            err.set_cause(step.py(), Some(e));
            err
        })?);
    }
    Ok(plan)
}

/// A fresh `JobStep` for a handler: its own copy, so that nothing it
/// changes reaches the plan.
pub fn job_step_to_py<'py>(py: Python<'py>, step: &JobStep) -> PyResult<Bound<'py, PyAny>> {
    types(py)?.job_step.bind(py).call1((
        step.step_index,
        &step.step_type,
        &step.target,
        json::to_python(py, &step.parameters)?,
        step.timeout_seconds,
    ))
}

/// The `ExecutionContext` a Python handler receives.
pub fn context_to_py<'py>(
    py: Python<'py>,
    context: &ExecutionContext,
) -> PyResult<Bound<'py, PyAny>> {
    let ids = (
        context.job_id.into_pyobject(py)?.into_any(),
        context.contract_id.into_pyobject(py)?.into_any(),
    );
    context_with_ids(py, context, ids)
}

/// As [`context_to_py`], with the job's and contract's ids given as Python
/// values (a driven job converts them once, not at every step).
pub fn context_with_ids<'py>(
    py: Python<'py>,
    context: &ExecutionContext,
    (job_id, contract_id): (Bound<'py, PyAny>, Bound<'py, PyAny>),
) -> PyResult<Bound<'py, PyAny>> {
    types(py)?.execution_context.bind(py).call1((
        job_id,
        contract_id,
        context.step_index,
        &context.step_type,
        &context.target,
        &context.executed_by,
        context.started_at,
        CancelSignal::new(context.cancel.clone()),
    ))
}

/// An engine context from a Python `ExecutionContext`, for calling a
/// built-in handler directly from Python.
///
/// # Errors
/// `AttributeError`/`TypeError` for a missing or mistyped attribute.
pub fn context(obj: &Bound<'_, PyAny>) -> PyResult<ExecutionContext> {
    let py = obj.py();
    let cancel = match obj.getattr(intern!(py, "cancel")) {
        Ok(signal) if !signal.is_none() => signal.extract::<PyRef<'_, CancelSignal>>()?.signal(),
        _ => job_executor::CancelSignal::new(),
    };
    let step = JobStep::new(
        obj.getattr(intern!(py, "step_index"))?.extract()?,
        obj.getattr(intern!(py, "step_type"))?.extract::<String>()?,
        obj.getattr(intern!(py, "target"))?.extract::<String>()?,
    );
    let mut context = ExecutionContext::new(
        obj.getattr(intern!(py, "job_id"))?.extract()?,
        obj.getattr(intern!(py, "contract_id"))?.extract()?,
        &step,
        obj.getattr(intern!(py, "executed_by"))?
            .extract::<String>()?,
        obj.getattr(intern!(py, "started_at"))?.extract()?,
    );
    context.cancel = cancel;
    Ok(context)
}

/// An engine step output from what a Python handler returned.
///
/// # Errors
/// `TypeError` when `obj` is not a `StepOutput`; the JSON errors of its
/// output.
pub fn step_output(obj: &Bound<'_, PyAny>) -> PyResult<StepOutput> {
    let py = obj.py();
    if !obj.is_instance(types(py)?.step_output.bind(py))? {
        return Err(PyTypeError::new_err(format!(
            "returned {} instead of a StepOutput",
            obj.get_type().name()?
        )));
    }
    let output = obj.getattr(intern!(py, "output"))?;
    let mut out = StepOutput::succeeded(json::to_value(&output)?);
    out.success = obj.getattr(intern!(py, "success"))?.is_truthy()?;
    out.error = obj.getattr(intern!(py, "error"))?.extract()?;
    Ok(out)
}

/// A Python `StepOutput` equal to `out`.
pub fn step_output_to_py<'py>(py: Python<'py>, out: &StepOutput) -> PyResult<Bound<'py, PyAny>> {
    types(py)?.step_output.bind(py).call1((
        out.success,
        json::to_python(py, &out.output)?,
        out.error.as_deref(),
    ))
}

fn step_result_to_py<'py>(py: Python<'py>, step: &StepResult) -> PyResult<Bound<'py, PyAny>> {
    let t = types(py)?;
    let kwargs = PyDict::new(py);
    kwargs.set_item(intern!(py, "step_index"), step.step_index)?;
    kwargs.set_item(
        intern!(py, "status"),
        t.step_status.bind(py).call1((wire_name(step.status),))?,
    )?;
    kwargs.set_item(intern!(py, "started_at"), step.started_at)?;
    kwargs.set_item(intern!(py, "completed_at"), step.completed_at)?;
    kwargs.set_item(
        intern!(py, "output"),
        json::to_python_opt(py, step.output.as_ref())?,
    )?;
    kwargs.set_item(intern!(py, "error"), step.error.as_deref())?;
    kwargs.set_item(
        intern!(py, "health_after"),
        json::to_python_opt(py, step.health_after.as_ref())?,
    )?;
    kwargs.set_item(
        intern!(py, "failure_kind"),
        step.failure_kind.map(wire_name),
    )?;
    t.step_result.bind(py).call((), Some(&kwargs))
}

/// A Python `ExecutionResult` (frozen dataclass) equal to `result`.
pub fn execution_result_to_py<'py>(
    py: Python<'py>,
    result: &ExecutionResult,
) -> PyResult<Bound<'py, PyAny>> {
    let t = types(py)?;
    let steps = PyList::empty(py);
    for step in &result.step_results {
        steps.append(step_result_to_py(py, step)?)?;
    }
    let kwargs = PyDict::new(py);
    kwargs.set_item(intern!(py, "job_id"), result.job_id)?;
    kwargs.set_item(
        intern!(py, "final_status"),
        t.job_status
            .bind(py)
            .call1((result.final_status.as_str(),))?,
    )?;
    kwargs.set_item(intern!(py, "step_results"), steps)?;
    kwargs.set_item(intern!(py, "steps_executed"), result.steps_executed)?;
    kwargs.set_item(intern!(py, "steps_succeeded"), result.steps_succeeded)?;
    kwargs.set_item(intern!(py, "steps_failed"), result.steps_failed)?;
    kwargs.set_item(intern!(py, "final_reason"), &result.final_reason)?;
    kwargs.set_item(
        intern!(py, "health_before"),
        json::to_python_opt(py, result.health_before.as_ref())?,
    )?;
    kwargs.set_item(
        intern!(py, "health_after"),
        json::to_python_opt(py, result.health_after.as_ref())?,
    )?;
    kwargs.set_item(intern!(py, "started_at"), result.started_at)?;
    kwargs.set_item(intern!(py, "completed_at"), result.completed_at)?;
    kwargs.set_item(intern!(py, "contract_id"), result.contract_id)?;
    kwargs.set_item(intern!(py, "executed_by"), &result.executed_by)?;
    kwargs.set_item(intern!(py, "executor_version"), &result.executor_version)?;
    kwargs.set_item(intern!(py, "steps_planned"), result.steps_planned)?;
    kwargs.set_item(intern!(py, "events"), result.events)?;
    kwargs.set_item(intern!(py, "head"), result.head.to_string())?;
    kwargs.set_item(
        intern!(py, "head_mac"),
        result.head_mac.map(|mac| mac.to_string()),
    )?;
    let converted = t.execution_result.bind(py).call((), Some(&kwargs))?;
    // The dataclass is frozen: set its hidden field as dataclasses do.
    py.get_type::<pyo3::types::PyAny>().call_method1(
        intern!(py, "__setattr__"),
        (
            &converted,
            intern!(py, "_native"),
            NativeResult(result.clone()),
        ),
    )?;
    Ok(converted)
}

/// The engine's own result, kept inside the Python `ExecutionResult` it was
/// converted to: a result is a projection of its event log, never made by
/// hand, so its evidence is built from the engine's value, not read back
/// from Python fields.
#[pyclass(module = "job_executor", frozen)]
pub struct NativeResult(ExecutionResult);

/// The engine result inside a Python `ExecutionResult`.
///
/// # Errors
/// `TypeError` for a result the executor did not return (made by hand, or
/// by `dataclasses.replace`).
pub fn execution_result<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, NativeResult>> {
    let native = obj.getattr(intern!(obj.py(), "_native")).ok();
    match native.as_ref().map(|n| n.cast::<NativeResult>()) {
        Some(Ok(native)) => Ok(native.clone()),
        _ => Err(PyTypeError::new_err(
            "evidence is built from an ExecutionResult the executor returned (execute_job, resume, replay): a result is a projection of its event log, and this one was made by hand",
        )),
    }
}

impl NativeResult {
    /// The engine's result.
    pub fn result(&self) -> &ExecutionResult {
        &self.0
    }
}

/// A Python `Violation`.
pub fn violation_to_py<'py>(py: Python<'py>, v: &Violation) -> PyResult<Bound<'py, PyAny>> {
    types(py)?
        .violation
        .bind(py)
        .call1((v.job_id, v.seq, v.check, &v.message))
}

/// A Python `Recovery`: what `recover` did to one job.
pub fn recovery_to_py<'py>(py: Python<'py>, recovery: &Recovery) -> PyResult<Bound<'py, PyAny>> {
    let (job_id, action, step_index) = match recovery {
        Recovery::Interrupted { job_id, step_index } => (job_id, "interrupted", Some(*step_index)),
        Recovery::Halted { job_id, step_index } => (job_id, "halted", Some(*step_index)),
        Recovery::Cancelled { job_id } => (job_id, "cancelled", None),
        Recovery::Resumable { job_id, next_step } => (job_id, "resumable", Some(*next_step)),
        other => {
            return Err(PyValueError::new_err(format!(
                "a recovery this build of the package cannot convert: {other:?}"
            )));
        }
    };
    types(py)?
        .recovery
        .bind(py)
        .call1((*job_id, action, step_index))
}

/// A JSON value as a fresh Python object, for `events()`.
pub fn value_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    json::to_python(py, value)
}
