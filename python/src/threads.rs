//! Python handler threads: daemon threads of the interpreter's, each
//! running `job_executor._serve.serve`, that take one task at a time — a
//! call of a Python handler, or a whole job to drive — so that a handler's
//! code never runs on a Rust thread.
//!
//! A handler the engine gave up on (past its deadline) leaves an ordinary
//! abandoned daemon thread, which the interpreter stops at exit as it stops
//! any other. (On a Rust thread, such a handler would make the interpreter
//! abort at exit, when the thread is made to unwind through Rust frames.)

use std::sync::{Arc, Mutex};

use job_executor::StepCall;
use job_executor::executor::{DriveJob, Drivers};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::convert;
use crate::drive;
use crate::errors::{last_traceback_line, not_a_step_output};

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
    Drive(DriveJob),
}

impl Task {
    /// No thread could take it: the call fails its step saying why; a job
    /// is given back to its caller (dropped undriven), which runs it
    /// another way.
    fn refuse(self, message: String) {
        match self {
            Task::Call(handed) => handed.call.fail(message),
            Task::Drive(job) => drop(job),
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

/// The package's drivers: every job the engine drives goes to a Python
/// handler thread, which makes its handlers' calls in Python.
pub struct PythonThreads;

impl Drivers for PythonThreads {
    fn hand_over(&self, job: DriveJob) {
        hand_over(Task::Drive(job));
    }
}

/// Hands one call of a Python handler to a Python handler thread; when no
/// thread can take it, its step fails saying why.
pub fn hand_over_call(handler: Arc<Py<PyAny>>, step_type: String, call: StepCall) {
    hand_over(Task::Call(Handed {
        handler,
        step_type,
        call,
    }));
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
            Some(Task::Drive(job)) => {
                return Ok(drive::Driven::new(job)
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
