//! Python handlers and health observers as the engine's `StepHandler` and
//! `HealthObserver`, and the built-in handlers as Python classes.
//!
//! The engine calls a handler on one of its pooled threads; the wrapper
//! attaches that thread to the interpreter only for the call. A Python
//! exception cannot cross into Rust as an exception, so it is carried out as
//! an unwinding payload with the traceback's last line: the engine catches
//! it exactly as it catches a Rust handler's panic, records the step failed
//! (`Execution error: …`, failure kind `panic`) and stays usable.

use std::sync::{Arc, Mutex, mpsc};

use job_executor::{
    ExecutionContext, FailingHandler as CoreFailing, HealthObserver, JobStep,
    NoOpHandler as CoreNoOp, StepHandler, StepOutput,
};
use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use serde_json::Value;

use crate::convert;
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

/// A handler written in Python: a bound `execute(step, context)` method or
/// any callable taking `(step, context)`.
///
/// The engine runs each step on a pooled thread of its own. The Python code
/// of a handler does not run there but on a Python daemon thread paired
/// with that engine thread (`job_executor._serve`), with no Rust frame
/// beneath it: a handler that never returns is then an ordinary abandoned
/// daemon thread, which the interpreter stops at exit as it stops any other.
/// (On a Rust thread, such a handler would make the interpreter abort at
/// exit, when the thread is made to unwind through Rust frames.)
pub struct PyHandler {
    call: Arc<Py<PyAny>>,
    step_type: String,
}

/// What a handler's Python thread reports back: the output, or the message
/// of what went wrong.
type Reply = Result<StepOutput, String>;

/// A handler call on its way to a Python handler thread.
struct Call {
    handler: Arc<Py<PyAny>>,
    step: JobStep,
    context: ExecutionContext,
    step_type: String,
    reply: mpsc::SyncSender<Reply>,
}

thread_local! {
    /// The Python thread running handlers for this engine thread.
    static PARTNER: std::cell::RefCell<Option<Partner>> = const { std::cell::RefCell::new(None) };
}

/// An engine thread's Python handler thread. Calls go through a channel;
/// a byte on a pipe wakes the thread, which waits in `os.read` — in C,
/// with the interpreter released — so that the engine thread never needs
/// the interpreter to hand a call over, and the Python thread waits in no
/// Rust frame. Dropping the partner closes the pipe, which ends the thread.
struct Partner {
    calls: mpsc::Sender<Call>,
    doorbell: std::io::PipeWriter,
}

impl Partner {
    fn start() -> Result<Partner, String> {
        let (reader, doorbell) =
            std::io::pipe().map_err(|e| format!("cannot create a pipe: {e}"))?;
        let (calls, queued) = mpsc::channel();
        let reader = std::os::fd::OwnedFd::from(reader);
        Python::attach(|py| -> PyResult<()> {
            static SERVE: PyOnceLock<(Py<PyAny>, Py<PyAny>)> = PyOnceLock::new();
            let (thread, serve) = SERVE.get_or_try_init(py, || {
                Ok::<_, PyErr>((
                    py.import("threading")?.getattr("Thread")?.unbind(),
                    py.import("job_executor._serve")?.getattr("serve")?.unbind(),
                ))
            })?;
            let queue = Bound::new(py, CallQueue(Mutex::new(queued)))?;
            let kwargs = pyo3::types::PyDict::new(py);
            kwargs.set_item("target", serve)?;
            // The Python thread owns the read end from here on.
            let fd = std::os::fd::IntoRawFd::into_raw_fd(reader);
            kwargs.set_item("args", (fd, queue))?;
            kwargs.set_item("name", "job-executor-handler")?;
            kwargs.set_item("daemon", true)?;
            thread
                .bind(py)
                .call((), Some(&kwargs))?
                .call_method0("start")?;
            Ok(())
        })
        .map_err(|err| Python::attach(|py| last_traceback_line(py, &err)))?;
        Ok(Partner { calls, doorbell })
    }

    /// Hands `call` over. `Err` when the Python thread is gone.
    fn send(&self, call: Call) -> Result<(), ()> {
        use std::io::Write;
        self.calls.send(call).map_err(|_| ())?;
        (&self.doorbell).write_all(&[1]).map_err(|_| ())
    }
}

/// The calls waiting for one Python handler thread.
#[pyclass(module = "job_executor", frozen)]
pub struct CallQueue(Mutex<mpsc::Receiver<Call>>);

#[pymethods]
impl CallQueue {
    /// The next call, as `(handler, step, context, pending)`; `None` when
    /// there is none (the doorbell rang for a call already taken).
    fn take<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let call = match self.0.lock() {
            Ok(queued) => queued.try_recv().ok(),
            Err(_) => None,
        };
        let Some(call) = call else { return Ok(None) };
        let Call {
            handler,
            step,
            context,
            step_type,
            reply,
        } = call;
        let pending = PendingCall { reply, step_type };
        match (
            convert::job_step_to_py(py, &step),
            convert::context_to_py(py, &context),
        ) {
            (Ok(step), Ok(context)) => Ok(Some(
                (handler.bind(py), step, context, Bound::new(py, pending)?)
                    .into_pyobject(py)?
                    .into_any(),
            )),
            (Err(err), _) | (_, Err(err)) => {
                let _ = pending.reply.send(Err(last_traceback_line(py, &err)));
                Ok(None)
            }
        }
    }
}

/// One handler call taken by a Python handler thread: the way back to the
/// engine thread waiting for its outcome.
#[pyclass(module = "job_executor", frozen)]
pub struct PendingCall {
    reply: mpsc::SyncSender<Reply>,
    step_type: String,
}

#[pymethods]
impl PendingCall {
    /// The handler returned `returned`.
    fn returned(&self, returned: &Bound<'_, PyAny>) {
        let reply = convert::step_output(returned).map_err(|err| {
            format!(
                "{} (the handler for step type {:?} must return a StepOutput holding JSON values)",
                last_traceback_line(returned.py(), &err),
                self.step_type
            )
        });
        // After a timeout nobody waits for the reply any more.
        let _ = self.reply.send(reply);
    }

    /// The handler raised `raised`.
    fn raised(&self, raised: &Bound<'_, PyAny>) {
        let err = PyErr::from_value(raised.clone());
        let _ = self.reply.send(Err(last_traceback_line(raised.py(), &err)));
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

    /// Hands the call to this engine thread's Python handler thread
    /// (started on first use, and again if it has gone) and returns what
    /// to wait on.
    fn hand_over(
        &self,
        step: &JobStep,
        context: &ExecutionContext,
    ) -> Result<mpsc::Receiver<Reply>, String> {
        PARTNER.with(|partner| {
            let mut partner = partner.borrow_mut();
            for _ in 0..2 {
                let (reply, outcome) = mpsc::sync_channel(1);
                let call = Call {
                    handler: self.call.clone(),
                    step: step.clone(),
                    context: context.clone(),
                    step_type: self.step_type.clone(),
                    reply,
                };
                let sent = match partner.as_ref() {
                    Some(started) => started.send(call),
                    None => partner.insert(Partner::start()?).send(call),
                };
                if sent.is_ok() {
                    return Ok(outcome);
                }
                *partner = None;
            }
            Err("cannot hand the call to a Python handler thread".to_owned())
        })
    }
}

impl StepHandler for PyHandler {
    fn execute(&self, step: &JobStep, context: &ExecutionContext) -> StepOutput {
        let reply = self.hand_over(step, context).and_then(|outcome| {
            outcome.recv().unwrap_or_else(|_| {
                Err("the handler's Python thread stopped without an outcome".to_owned())
            })
        });
        match reply {
            Ok(out) => out,
            // Unwinds to the engine's catch around every handler call, with
            // no panic hook run: it is the handler's failure, not ours.
            Err(message) => std::panic::resume_unwind(Box::new(message)),
        }
    }
}

/// A health observer written in Python: any object with `observe_health()`.
pub struct PyObserver {
    observe: Py<PyAny>,
    /// What the observer raised, to be chained to the error the engine returns.
    raised: Mutex<Option<PyErr>>,
}

impl PyObserver {
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
    pub fn new(signal: job_executor::CancelSignal) -> Self {
        CancelSignal(signal)
    }

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
