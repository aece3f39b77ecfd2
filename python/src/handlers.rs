//! Python handlers and health observers as the engine's `StepHandler` and
//! `HealthObserver`, and the built-in handlers as Python classes.
//!
//! A Python handler's code runs on a Python handler thread
//! ([`crate::threads`]): each step handed to it goes there, and a driven
//! job's steps are called there already ([`crate::drive`]). A Python
//! exception cannot cross into Rust as an exception, so it is carried out
//! as the traceback's last line: the engine records the step failed as it
//! records a Rust handler's panic (`Execution error: …`, failure kind
//! `panic`) and stays usable.

use std::sync::{Arc, Mutex};

use job_executor::{
    ExecutionContext, FailingHandler as CoreFailing, HealthObserver, JobStep,
    NoOpHandler as CoreNoOp, StepCall, StepHandler, StepOutput,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use serde_json::Value;

use crate::convert;
use crate::drive;
use crate::errors::{last_traceback_line, not_a_step_output};
use crate::json;
use crate::threads;

/// A handler written in Python: a bound `execute(step, context)` method or
/// any callable taking `(step, context)`.
///
/// The engine hands each step to the handler's `start`, which gives it to a
/// Python handler thread ([`crate::threads`]); in a job driven on such a
/// thread, `execute` makes the call there.
pub struct PyHandler {
    call: Arc<Py<PyAny>>,
    step_type: String,
}

impl PyHandler {
    /// Resolves `handler` the way the original module called it: its
    /// `execute` method when it has one, else the object itself when it is
    /// callable.
    ///
    /// # Errors
    /// `TypeError` when it is neither.
    pub fn new(step_type: &str, handler: &Bound<'_, PyAny>) -> PyResult<Self> {
        let py = handler.py();
        let call = match handler.getattr(pyo3::intern!(py, "execute")) {
            Ok(execute) if execute.is_callable() => execute,
            _ if handler.is_callable() => handler.clone(),
            _ => {
                return Err(PyTypeError::new_err(format!(
                    "the handler for step type {step_type:?} must have an execute(step, context) method or be callable; got {}",
                    handler.get_type().name()?
                )));
            }
        };
        Ok(PyHandler {
            call: Arc::new(call.unbind()),
            step_type: step_type.to_owned(),
        })
    }

    /// Calls the handler on this thread.
    fn call_here(
        &self,
        py: Python<'_>,
        step: &JobStep,
        context: &ExecutionContext,
    ) -> Result<StepOutput, String> {
        let returned = convert::job_step_to_py(py, step)
            .and_then(|step| Ok((step, convert::context_to_py(py, context)?)))
            .and_then(|(step, context)| self.call.bind(py).call1((step, context)))
            .map_err(|err| last_traceback_line(py, &err))?;
        convert::step_output(&returned).map_err(|err| not_a_step_output(py, &err, &self.step_type))
    }
}

impl StepHandler for PyHandler {
    /// In a job driven on a Python handler thread, the call goes out to
    /// that thread's Python loop; otherwise (a caller that runs the handler
    /// directly) it is made right here.
    fn execute(&self, step: &JobStep, context: &ExecutionContext) -> StepOutput {
        let called = drive::suspend(&self.call, &self.step_type, step, context)
            .unwrap_or_else(|| Python::attach(|py| self.call_here(py, step, context)));
        match called {
            Ok(out) => out,
            // Unwinds to the engine's catch around every handler call, with
            // no panic hook run: it is the handler's failure, not ours.
            Err(message) => std::panic::resume_unwind(Box::new(message)),
        }
    }

    fn start(&self, call: StepCall) -> Option<StepCall> {
        if drive::inside() {
            // A job driven on a Python handler thread calls its handlers
            // there (`execute`), with no hand-over.
            return Some(call);
        }
        threads::hand_over_call(self.call.clone(), self.step_type.clone(), call);
        None
    }
}

/// A health observer written in Python: any object with `observe_health()`.
pub struct PyObserver {
    observe: Py<PyAny>,
    /// What the observer raised, to be chained to the error the engine returns.
    raised: Mutex<Option<PyErr>>,
}

impl PyObserver {
    /// Wraps `observer`'s bound `observe_health` method.
    ///
    /// # Errors
    /// `TypeError` when `observer` has no callable `observe_health`.
    pub fn new(observer: &Bound<'_, PyAny>) -> PyResult<Self> {
        let py = observer.py();
        match observer.getattr(pyo3::intern!(py, "observe_health")) {
            Ok(observe) if observe.is_callable() => Ok(PyObserver {
                observe: observe.unbind(),
                raised: Mutex::new(None),
            }),
            _ => Err(PyTypeError::new_err(format!(
                "a health observer must have an observe_health() method; got {}",
                observer.get_type().name()?
            ))),
        }
    }

    /// The exception the observer raised, if it did.
    pub fn take_raised(&self) -> Option<PyErr> {
        self.raised.lock().ok().and_then(|mut raised| raised.take())
    }
}

impl HealthObserver for PyObserver {
    fn observe_health(&self) -> Value {
        let observed = Python::attach(|py| {
            self.observe
                .bind(py)
                .call0()
                .and_then(|health| json::to_value(&health))
                .map_err(|err| (last_traceback_line(py, &err), err))
        });
        match observed {
            Ok(health) => health,
            Err((message, err)) => {
                if let Ok(mut raised) = self.raised.lock() {
                    *raised = Some(err);
                }
                // The engine reports an observer that unwinds as
                // `ExecutorError::HealthObserver`, having recorded what it must.
                std::panic::resume_unwind(Box::new(message))
            }
        }
    }
}

/// A handler that always succeeds with an empty output. Registered as is,
/// it runs inside the engine without touching the interpreter.
#[pyclass(module = "job_executor", name = "NoOpHandler", frozen, subclass)]
#[derive(Default)]
pub struct NoOpHandler;

#[pymethods]
impl NoOpHandler {
    #[new]
    fn new() -> Self {
        NoOpHandler
    }

    /// Runs the step: succeeds with `{}`.
    fn execute<'py>(
        &self,
        step: &Bound<'py, PyAny>,
        context: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let out = CoreNoOp.execute(&convert::job_step(step)?, &convert::context(context)?);
        convert::step_output_to_py(step.py(), &out)
    }

    fn __repr__(&self) -> &'static str {
        "NoOpHandler()"
    }
}

/// A handler that always fails with `error_message`.
#[pyclass(module = "job_executor", name = "FailingHandler", frozen, subclass)]
pub struct FailingHandler(CoreFailing);

#[pymethods]
impl FailingHandler {
    #[new]
    #[pyo3(signature = (error_message = None))]
    fn new(error_message: Option<String>) -> Self {
        FailingHandler(error_message.map_or_else(CoreFailing::default, CoreFailing::new))
    }

    /// Runs the step: fails with the handler's message.
    fn execute<'py>(
        &self,
        step: &Bound<'py, PyAny>,
        context: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let out = self
            .0
            .execute(&convert::job_step(step)?, &convert::context(context)?);
        convert::step_output_to_py(step.py(), &out)
    }
}

/// The engine handler for a Python handler object: the built-in handlers
/// run natively (unless subclassed, when the subclass's own `execute` is
/// called), anything else through the interpreter.
///
/// # Errors
/// As [`PyHandler::new`].
pub fn to_engine(step_type: &str, handler: &Bound<'_, PyAny>) -> PyResult<Arc<dyn StepHandler>> {
    if handler.is_exact_instance_of::<NoOpHandler>() {
        return Ok(Arc::new(CoreNoOp));
    }
    if handler.is_exact_instance_of::<FailingHandler>() {
        let failing = handler.cast::<FailingHandler>()?.get().0.clone();
        return Ok(Arc::new(failing));
    }
    Ok(Arc::new(PyHandler::new(step_type, handler)?))
}
