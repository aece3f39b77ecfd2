//! Jobs driven on Python handler threads: one hand-over per job instead of
//! two thread switches per step.
//!
//! The engine's `execute_job` (without a health observer) hands the whole
//! job to its drivers — here, a Python handler thread
//! (`job_executor._serve`, [`crate::threads`]), which drives it with the
//! engine's [`DriveJob::drive`]. The engine runs on a stack of its own
//! (a coroutine): at each call of a Python handler it suspends, and the
//! thread's Python loop calls the handler and resumes it with what the
//! handler returned or raised. So the handler's code runs on a thread
//! Python created with no Rust frame beneath it — a handler that never
//! returns is an abandoned daemon thread like any other, which the
//! interpreter stops at exit without unwinding through Rust — while the
//! engine waits for nothing between steps. At a stuck step's deadline the
//! engine's watchdog records the timeout, ends the job and answers the
//! caller; the suspended engine is left with its thread.

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use corosensei::stack::DefaultStack;
use corosensei::{Coroutine, CoroutineResult, Yielder};
use job_executor::executor::DriveJob;
use job_executor::{ExecutionContext, JobStep, StepOutput};
use pyo3::prelude::*;

use crate::convert;
use crate::errors::{last_traceback_line, not_a_step_output};

/// The engine's stack while it drives a job: its deepest path (SQLite, a
/// nested JSON payload) stays far below this; pages are only touched as used.
const STACK_SIZE: usize = 8 << 20;

/// A handler call the suspended engine waits on.
struct Call {
    handler: Arc<Py<PyAny>>,
    step_type: String,
    step: JobStep,
    context: ExecutionContext,
}

/// What the handler came to: its output, or why it has none (the
/// traceback's last line).
type Called = Result<StepOutput, String>;

type Engine = Coroutine<Called, Call, (), DefaultStack>;

thread_local! {
    /// The stack of the last engine that finished on this thread, for its
    /// next job: unmapping a stack makes every core flush its TLB, so a
    /// thread keeps one rather than mapping one per job.
    static SPARE: RefCell<Option<DefaultStack>> = const { RefCell::new(None) };
    /// The yielder of the engine running on this thread, while it runs (not
    /// while it is suspended).
    static CURRENT: Cell<*const Yielder<Called, Call>> = const { Cell::new(std::ptr::null()) };
}

/// Whether this thread is running a driven job's engine.
pub fn inside() -> bool {
    CURRENT.with(|current| !current.get().is_null())
}

/// Inside a driven job's engine: suspends it with this call for the
/// thread's Python loop to make, and returns what it came to. `None`
/// elsewhere.
pub fn suspend(
    handler: &Arc<Py<PyAny>>,
    step_type: &str,
    step: &JobStep,
    context: &ExecutionContext,
) -> Option<Called> {
    let yielder = CURRENT.with(|current| current.replace(std::ptr::null()));
    if yielder.is_null() {
        return None;
    }
    let call = Call {
        handler: handler.clone(),
        step_type: step_type.to_owned(),
        step: step.clone(),
        context: context.clone(),
    };
    // SAFETY: CURRENT is set only by the body of the engine running on this
    // thread (`Running`), to that engine's yielder, for as long as the body
    // runs; we are inside it, so the yielder is alive.
    let called = unsafe { &*yielder }.suspend(call);
    CURRENT.with(|current| current.set(yielder));
    Some(called)
}

/// Marks this thread as running an engine for the guard's life, however
/// the body ends (an unwinding engine must not leave a dangling yielder).
struct Running;

impl Running {
    fn enter(yielder: &Yielder<Called, Call>) -> Running {
        CURRENT.with(|current| current.set(yielder));
        Running
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        CURRENT.with(|current| current.set(std::ptr::null()));
    }
}

/// A value that stays on its thread, carried through `Python::detach`
/// (whose closure runs on the calling thread, with the interpreter
/// released).
struct SameThread<T>(T);

// SAFETY: only used to pass the engine into and out of `Python::detach`,
// which runs its closure on the calling thread: the value never leaves it.
unsafe impl<T> Send for SameThread<T> {}

impl<T> SameThread<T> {
    // A method, so that a closure captures the whole wrapper, not its field.
    fn into_inner(self) -> T {
        self.0
    }
}

/// A job being driven on this Python handler thread; the thread's loop
/// (`job_executor._serve.drive`) calls `start`, then `returned` or `raised`
/// for each handler call it is given, until it is given `None`.
#[pyclass(module = "job_executor", unsendable)]
pub struct Driven {
    engine: Option<Engine>,
    /// The job's and contract's ids as Python values, once converted.
    ids: Option<(Py<PyAny>, Py<PyAny>)>,
    /// The step type of the call being made, for the error when a handler
    /// returns something that is not a `StepOutput`.
    step_type: String,
}

impl Driven {
    /// The engine for `job`, not yet started; `None` (the job given back
    /// to its caller, which runs it another way) when no stack can be had.
    pub fn new(job: DriveJob) -> Option<Driven> {
        let spare = SPARE
            .try_with(|spare| spare.borrow_mut().take())
            .ok()
            .flatten();
        // Without a stack the job is dropped here, which gives it back.
        let stack = spare
            .map_or_else(|| DefaultStack::new(STACK_SIZE), Ok)
            .ok()?;
        let engine = Coroutine::with_stack(stack, move |yielder, _: Called| {
            let _running = Running::enter(yielder);
            job.drive();
        });
        Some(Driven {
            engine: Some(engine),
            ids: None,
            step_type: String::new(),
        })
    }

    /// Resumes the engine with `called` until it needs a handler call made
    /// by Python (returned as `(handler, step, context)`) or ends (`None`).
    fn run_until_call(
        &mut self,
        py: Python<'_>,
        mut called: Called,
    ) -> PyResult<Option<Py<PyAny>>> {
        loop {
            let Some(engine) = self.engine.as_mut() else {
                return Ok(None);
            };
            let engine = SameThread(engine);
            let resumed = py.detach(move || SameThread(engine.into_inner().resume(called)));
            let call = match resumed.into_inner() {
                CoroutineResult::Yield(call) => call,
                CoroutineResult::Return(()) => {
                    if let Some(engine) = self.engine.take() {
                        keep_stack(engine);
                    }
                    return Ok(None);
                }
            };
            let converted = self
                .ids(py, &call.context)
                .and_then(|ids| convert::context_with_ids(py, &call.context, ids))
                .and_then(|context| {
                    let step = convert::job_step_to_py(py, &call.step)?;
                    (call.handler.bind(py), step, context).into_pyobject(py)
                });
            match converted {
                Ok(python_call) => {
                    self.step_type = call.step_type;
                    return Ok(Some(python_call.into_any().unbind()));
                }
                // The call cannot be made in Python: the step fails, and the
                // engine goes on (never left waiting for its deadline).
                Err(err) => called = Err(last_traceback_line(py, &err)),
            }
        }
    }
}

impl Driven {
    fn ids<'py>(
        &mut self,
        py: Python<'py>,
        context: &ExecutionContext,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let (job_id, contract_id) = match &self.ids {
            Some(ids) => ids,
            None => self.ids.insert((
                context.job_id.into_pyobject(py)?.into_any().unbind(),
                context.contract_id.into_pyobject(py)?.into_any().unbind(),
            )),
        };
        Ok((job_id.bind(py).clone(), contract_id.bind(py).clone()))
    }
}

#[pymethods]
impl Driven {
    /// Starts the engine: the first handler call to make, or `None`.
    fn start(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        // The body ignores the first value.
        self.run_until_call(py, Err(String::new()))
    }

    /// The handler returned `returned`: the next call, or `None`.
    fn returned(
        &mut self,
        py: Python<'_>,
        returned: &Bound<'_, PyAny>,
    ) -> PyResult<Option<Py<PyAny>>> {
        let called = convert::step_output(returned)
            .map_err(|err| not_a_step_output(py, &err, &self.step_type));
        self.run_until_call(py, called)
    }

    /// The handler raised `raised`: the next call, or `None`.
    fn raised(&mut self, py: Python<'_>, raised: &Bound<'_, PyAny>) -> PyResult<Option<Py<PyAny>>> {
        let err = PyErr::from_value(raised.clone());
        self.run_until_call(py, Err(last_traceback_line(py, &err)))
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        // An engine suspended mid-job is left as it is: dropping it would
        // unwind its stack through the engine's own catch of handler
        // panics. (Its job was answered by the watchdog or is not ours to
        // end; the memory goes with the process.) A finished one (even by a
        // panic) leaves its stack to the thread's next job; one not started
        // is dropped with its stack.
        match self.engine.take() {
            Some(engine) if engine.done() => keep_stack(engine),
            Some(engine) if engine.started() => std::mem::forget(engine),
            _ => {}
        }
    }
}

/// Keeps a finished engine's stack for this thread's next job.
fn keep_stack(engine: Engine) {
    let stack = engine.into_stack();
    // (While the thread's locals are being torn down, the stack is freed.)
    let _ = SPARE.try_with(|spare| *spare.borrow_mut() = Some(stack));
}
