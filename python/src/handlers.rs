//! Python handlers and health observers as the engine's `StepHandler` and
//! `HealthObserver`, and the built-in handlers as Python classes.
//!
//! The engine calls a handler on one of its pooled threads; the wrapper
//! attaches that thread to the interpreter only for the call. A Python
//! exception cannot cross into Rust as an exception, so it is carried out as
//! an unwinding payload with the traceback's last line: the engine catches
//! it exactly as it catches a Rust handler's panic, records the step failed
//! (`Execution error: …`, failure kind `panic`) and stays usable.

use std::sync::{Arc, Mutex};

use job_executor::{
    ExecutionContext, FailingHandler as CoreFailing, HealthObserver, JobStep,
    NoOpHandler as CoreNoOp, StepCall, StepHandler, StepOutput,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use serde_json::Value;

use crate::convert;
use crate::drive;
use crate::json;

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
pub(crate) fn not_a_step_output(py: Python<'_>, err: &PyErr, step_type: &str) -> String {
    format!(
        "{} (the handler for step type {step_type:?} must return a StepOutput holding JSON values)",
        last_traceback_line(py, err)
    )
}

/// A handler written in Python: a bound `execute(step, context)` method or
/// any callable taking `(step, context)`.
///
/// The engine hands each step to the handler's `start`, which gives it to a
/// Python handler thread (`job_executor._serve`): the handler's Python code
/// runs on a thread Python created, with no Rust frame beneath it, so that
/// a handler which never returns is an ordinary abandoned daemon thread,
/// which the interpreter stops at exit as it stops any other. (On a Rust
/// thread, such a handler would make the interpreter abort at exit, when
/// the thread is made to unwind through Rust frames.)
pub struct PyHandler {
    call: Arc<Py<PyAny>>,
    step_type: String,
}

/// A Python handler thread waiting for a call: it sleeps in `os.read` on a
/// pipe — in C, with the interpreter released — and the byte written to
/// `doorbell` wakes it to take the call left in `slot`. The engine never
/// needs the interpreter to hand a call over.
struct Idle {
    doorbell: std::io::PipeWriter,
    slot: Arc<Mutex<Option<Task>>>,
}

/// A call handed to a Python handler thread.
struct Handed {
    handler: Arc<Py<PyAny>>,
    step_type: String,
    call: StepCall,
}

/// What a Python handler thread is handed: one handler call, or a whole job
/// to drive, calling its handlers itself ([`crate::drive`]).
enum Task {
    Call(Handed),
    Drive(drive::Request),
}

impl Task {
    /// No thread could take it: the call fails its step saying why; a job
    /// is given back to its caller, which runs it another way.
    fn refuse(self, message: String) {
        match self {
            Task::Call(handed) => handed.call.fail(message),
            Task::Drive(request) => request.refuse(message),
        }
    }
}

/// Python handler threads waiting for a call, shared by every executor. A
/// thread busy with a handler (or stuck in one) is not here: a call that
/// finds none waiting starts a new thread, so no step ever waits behind
/// another.
static IDLE: Mutex<Vec<Idle>> = Mutex::new(Vec::new());

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Values are put and taken whole: a poisoned lock still holds a
    // consistent one.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Hands a whole job to a Python handler thread to drive; when no thread
/// can take it, gives it back through its reply.
pub(crate) fn hand_over_job(request: drive::Request) {
    hand_over(Task::Drive(request));
}

/// Hands `task` to a waiting Python handler thread, or to a new one;
/// when no thread can take it, refuses it saying why.
fn hand_over(mut handed: Task) {
    use std::io::Write;
    loop {
        let Some(idle) = lock(&IDLE).pop() else { break };
        *lock(&idle.slot) = Some(handed);
        if (&idle.doorbell).write_all(&[1]).is_ok() {
            return;
        }
        // That thread is gone (its end of the pipe closed): take the call
        // back and try the next.
        match lock(&idle.slot).take() {
            Some(back) => handed = back,
            None => return,
        }
    }
    start_thread(handed);
}

/// Starts a Python handler thread with `handed` as its first task;
/// refuses it when it cannot.
fn start_thread(handed: Task) {
    use std::io::Write;
    let (reader, doorbell) = match std::io::pipe() {
        Ok(pipe) => pipe,
        Err(e) => {
            handed.refuse(format!("cannot create a pipe for a handler thread: {e}"));
            return;
        }
    };
    let slot = Arc::new(Mutex::new(Some(handed)));
    let started = Python::attach(|py| -> PyResult<()> {
        static SERVE: PyOnceLock<(Py<PyAny>, Py<PyAny>)> = PyOnceLock::new();
        let (thread, serve) = SERVE.get_or_try_init(py, || {
            Ok::<_, PyErr>((
                py.import("threading")?.getattr("Thread")?.unbind(),
                py.import("job_executor._serve")?.getattr("serve")?.unbind(),
            ))
        })?;
        let doorbell = doorbell
            .try_clone()
            .map_err(|e| pyo3::exceptions::PyOSError::new_err(e.to_string()))?;
        let slot = Bound::new(
            py,
            Slot {
                slot: slot.clone(),
                doorbell,
            },
        )?;
        // The Python thread owns the read end from here on.
        let fd = std::os::fd::IntoRawFd::into_raw_fd(std::os::fd::OwnedFd::from(reader));
        let kwargs = pyo3::types::PyDict::new(py);
        kwargs.set_item("target", serve)?;
        kwargs.set_item("args", (fd, slot))?;
        kwargs.set_item("name", "job-executor-handler")?;
        kwargs.set_item("daemon", true)?;
        thread
            .bind(py)
            .call((), Some(&kwargs))?
            .call_method0("start")?;
        Ok(())
    });
    let failure = match started {
        Ok(()) => match (&doorbell).write_all(&[1]) {
            Ok(()) => return,
            Err(e) => format!("cannot wake a handler thread: {e}"),
        },
        Err(err) => Python::attach(|py| last_traceback_line(py, &err)),
    };
    // Unless the thread took the call after all.
    if let Some(handed) = lock(&slot).take() {
        handed.refuse(failure);
    }
}

/// A Python handler thread's end of its slot.
#[pyclass(module = "job_executor", frozen)]
pub struct Slot {
    slot: Arc<Mutex<Option<Task>>>,
    doorbell: std::io::PipeWriter,
}

#[pymethods]
impl Slot {
    /// The task left for this thread: a call as `(handler, step, context,
    /// pending)`, or a job to drive (a `Driven`); `None` when there is none.
    fn take<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let task = lock(&self.slot).take();
        let (handler, step_type, call) = match task {
            None => return Ok(None),
            Some(Task::Drive(request)) => {
                return Ok(drive::Driven::new(request)
                    .map(|driven| Bound::new(py, driven))
                    .transpose()?
                    .map(Bound::into_any));
            }
            Some(Task::Call(Handed {
                handler,
                step_type,
                call,
            })) => (handler, step_type, call),
        };
        let converted = convert::job_step_to_py(py, call.step())
            .and_then(|step| Ok((step, convert::context_to_py(py, call.context())?)));
        match converted {
            Ok((step, context)) => {
                let pending = Bound::new(
                    py,
                    PendingCall {
                        call: Mutex::new(Some(call)),
                        step_type,
                    },
                )?;
                Ok(Some(
                    (handler.bind(py), step, context, pending)
                        .into_pyobject(py)?
                        .into_any(),
                ))
            }
            Err(err) => {
                call.fail(last_traceback_line(py, &err));
                Ok(None)
            }
        }
    }

    /// This thread is done with its call and waits for the next.
    fn idle(&self) -> PyResult<()> {
        let doorbell = self
            .doorbell
            .try_clone()
            .map_err(|e| pyo3::exceptions::PyOSError::new_err(e.to_string()))?;
        lock(&IDLE).push(Idle {
            doorbell,
            slot: self.slot.clone(),
        });
        Ok(())
    }
}

/// One handler call taken by a Python handler thread: the way back to the
/// engine, settled once.
#[pyclass(module = "job_executor", frozen)]
pub struct PendingCall {
    call: Mutex<Option<StepCall>>,
    step_type: String,
}

#[pymethods]
impl PendingCall {
    /// The handler returned `returned`.
    fn returned(&self, returned: &Bound<'_, PyAny>) {
        let Some(call) = lock(&self.call).take() else {
            return;
        };
        match convert::step_output(returned) {
            Ok(output) => call.complete(output),
            Err(err) => call.fail(not_a_step_output(returned.py(), &err, &self.step_type)),
        }
    }

    /// The handler raised `raised`.
    fn raised(&self, raised: &Bound<'_, PyAny>) {
        let Some(call) = lock(&self.call).take() else {
            return;
        };
        let err = PyErr::from_value(raised.clone());
        call.fail(last_traceback_line(raised.py(), &err));
    }
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
        hand_over(Task::Call(Handed {
            handler: self.call.clone(),
            step_type: self.step_type.clone(),
            call,
        }));
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

/// Raised when a step's deadline passes: a handler doing long work polls it
/// and stops, since its result would no longer be recorded.
#[pyclass(module = "job_executor", frozen)]
pub struct CancelSignal(job_executor::CancelSignal);

impl CancelSignal {
    /// The Python face of a step's signal (a clone: raising one raises both).
    pub fn new(signal: job_executor::CancelSignal) -> Self {
        CancelSignal(signal)
    }

    /// The engine's signal.
    pub fn signal(&self) -> job_executor::CancelSignal {
        self.0.clone()
    }
}

#[pymethods]
impl CancelSignal {
    /// Whether the step was given up on (its deadline passed).
    fn is_cancelled(&self) -> bool {
        self.0.is_cancelled()
    }

    fn __repr__(&self) -> String {
        format!("CancelSignal(cancelled={})", self.0.is_cancelled())
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
