//! `JobExecutor`: the engine's executor with the original module's methods,
//! and what the original never had (an event log, replay, verify, recovery).
//!
//! Every method converts its arguments, calls the engine with the
//! interpreter released, and converts the answer back.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use job_executor::chain::{Digest, HeadKey};
use job_executor::executor::{ExecutorConfig, LogLocation};
use job_executor::metrics::Metrics;
use job_executor::store::{StoreError, Synchronous};
use job_executor::verify::{VerifyOptions, verify_store};
use job_executor::{
    CancelRequest, EXECUTOR_VERSION, ExecutionResult, ExecutorError, HealthObserver, JobExecutor,
    PoolOptions,
};
use parking_lot::{RwLock, RwLockReadGuard};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList};
use uuid::Uuid;

use crate::convert;
use crate::errors;
use crate::handlers::{self, PyObserver};
use crate::threads::PythonThreads;

/// How often a wait on the main thread looks for a signal (Ctrl-C).
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Executes governance job steps in order and records every fact in an
/// append-only event log.
#[pyclass(module = "job_executor", name = "JobExecutor", frozen)]
pub struct PyJobExecutor {
    // Registering a handler needs the executor to itself; running jobs share
    // it. Both wait for the lock with the interpreter released.
    inner: RwLock<JobExecutor>,
}

impl PyJobExecutor {
    /// The Python object for an engine executor.
    pub fn wrap(executor: JobExecutor) -> Self {
        PyJobExecutor {
            inner: RwLock::new(executor),
        }
    }

    fn read(&self, py: Python<'_>) -> RwLockReadGuard<'_, JobExecutor> {
        // Never wait holding the interpreter: a job holding the lock may
        // need it to call a Python handler.
        py.detach(|| self.inner.read())
    }

    /// Runs `work` (a job) with the interpreter released. On the main
    /// thread the job runs on a thread of its own, so that this one can
    /// notice a signal: on Ctrl-C it asks the engine to cancel the job (the
    /// step in flight finishes and is recorded, no other starts, the job
    /// ends CANCELLED), waits for the engine to record that, and only then
    /// raises the KeyboardInterrupt.
    fn run_job<T: Send>(
        &self,
        py: Python<'_>,
        executor: &JobExecutor,
        job_id: Uuid,
        work: impl FnOnce() -> T + Send,
    ) -> PyResult<T> {
        if !on_main_thread(py)? {
            return Ok(py.detach(work));
        }
        std::thread::scope(|scope| {
            let (done, outcome) = mpsc::channel();
            scope.spawn(move || {
                // The receiver outlives the scope's end only if the wait
                // below failed, and then nobody needs the result.
                let _ = done.send(work());
            });
            let mut outcome = Some(outcome);
            let mut interrupt: Option<PyErr> = None;
            let mut cancel_recorded = false;
            loop {
                let receiver = outcome
                    .take()
                    .ok_or_else(|| PyRuntimeError::new_err("the job's result channel was lost"))?;
                let (received, receiver) =
                    py.detach(move || (receiver.recv_timeout(SIGNAL_POLL), receiver));
                outcome = Some(receiver);
                match received {
                    Ok(result) => {
                        return match interrupt {
                            Some(signal) => Err(signal),
                            None => Ok(result),
                        };
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(PyRuntimeError::new_err(
                            "the job's thread stopped without a result",
                        ));
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                }
                if interrupt.is_none()
                    && let Err(signal) = py.check_signals()
                {
                    interrupt = Some(signal);
                }
                if let Some(signal) = &interrupt
                    && !cancel_recorded
                {
                    let reason = format!(
                        "interrupted by {} in the host program",
                        signal_name(py, signal)
                    );
                    cancel_recorded = match py.detach(|| executor.request_cancel(job_id, &reason)) {
                        // Not started yet: ask again at the next poll.
                        Err(ExecutorError::UnknownJob { .. }) => false,
                        // Recorded, already requested, already ended, or the
                        // log failed (the job's own result will say so).
                        _ => true,
                    };
                }
            }
        })
    }
}

fn signal_name(py: Python<'_>, signal: &PyErr) -> String {
    signal
        .get_type(py)
        .name()
        .map_or_else(|_| "a signal".to_owned(), |n| n.to_string())
}

/// Whether the calling thread is Python's main thread, the only one that
/// runs signal handlers.
fn on_main_thread(py: Python<'_>) -> PyResult<bool> {
    static THREADING: PyOnceLock<(u64, Py<PyAny>)> = PyOnceLock::new();
    let (main, get_ident) = THREADING.get_or_try_init(py, || {
        let threading = py.import("threading")?;
        let main: u64 = threading
            .call_method0("main_thread")?
            .getattr("ident")?
            .extract()?;
        Ok::<_, PyErr>((main, threading.getattr("get_ident")?.unbind()))
    })?;
    Ok(get_ident.bind(py).call0()?.extract::<u64>()? == *main)
}

/// The engine error as a Python exception, with what a Python observer
/// raised as its cause.
fn job_error(py: Python<'_>, error: &ExecutorError, observer: Option<&PyObserver>) -> PyErr {
    let err = errors::executor_error(error);
    if let (ExecutorError::HealthObserver { .. }, Some(observer)) = (error, observer) {
        err.set_cause(py, observer.take_raised());
    }
    err
}

fn result_to_py(
    py: Python<'_>,
    result: Result<ExecutionResult, ExecutorError>,
    observer: Option<&PyObserver>,
) -> PyResult<Py<PyAny>> {
    match result {
        Ok(result) => Ok(convert::execution_result_to_py(py, &result)?.unbind()),
        Err(e) => Err(job_error(py, &e, observer)),
    }
}

fn synchronous(name: &str) -> PyResult<Synchronous> {
    match name {
        "full" | "FULL" => Ok(Synchronous::Full),
        "normal" | "NORMAL" => Ok(Synchronous::Normal),
        other => Err(PyValueError::new_err(format!(
            "synchronous must be \"full\" or \"normal\", not {other:?}"
        ))),
    }
}

#[pymethods]
impl PyJobExecutor {
    #[new]
    #[pyo3(signature = (
        handlers = None,
        executor_version = EXECUTOR_VERSION.to_owned(),
        *,
        db = None,
        deterministic = false,
        key = None,
        synchronous = "full",
        polling = false,
        health_timeout_seconds = None,
    ))]
    // One argument per Python keyword argument: the signature is Python's.
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        handlers: Option<&Bound<'_, PyDict>>,
        executor_version: String,
        db: Option<String>,
        deterministic: bool,
        key: Option<Vec<u8>>,
        synchronous: &str,
        polling: bool,
        health_timeout_seconds: Option<f64>,
    ) -> PyResult<Self> {
        // `db=None` keeps the log in memory; any name is read as the core
        // reads one (`":memory:"`, a file path, a PostgreSQL URL).
        let mut config = ExecutorConfig::new(
            db.as_deref()
                .map_or(LogLocation::Memory, LogLocation::parse),
        )
        .with_synchronous(self::synchronous(synchronous)?)
        .deterministic(deterministic)
        .with_pool(PoolOptions::default().with_polling(polling))
        .with_executor_version(executor_version)
        .with_metrics(Arc::new(Metrics::new()));
        if let Some(seconds) = health_timeout_seconds {
            let timeout = Duration::try_from_secs_f64(seconds).map_err(|_| {
                PyValueError::new_err(format!(
                    "health_timeout_seconds must be a non-negative number of seconds, not {seconds}"
                ))
            })?;
            config = config.with_health_timeout(timeout);
        }
        if let Some(key) = key {
            let key = HeadKey::new(key).map_err(|e| PyValueError::new_err(e.to_string()))?;
            config = config.with_head_key(Some(key));
        }
        let builder = py
            .detach(|| config.builder())
            .map_err(|e| errors::store_error(&e))?;
        let mut executor = builder.drivers(Arc::new(PythonThreads)).build();
        if let Some(handlers) = handlers {
            for (step_type, handler) in handlers.iter() {
                let step_type: String = step_type.extract()?;
                let handler = handlers::to_engine(&step_type, &handler)?;
                executor.register_handler(step_type, handler);
            }
        }
        Ok(PyJobExecutor::wrap(executor))
    }

    /// The executor's metrics (jobs, steps, durations, appends, jobs
    /// running), as the core writes them in the OpenMetrics text format:
    /// what a Prometheus scrape of this process would read.
    fn metrics_text(&self, py: Python<'_>) -> String {
        let executor = self.read(py);
        executor
            .metrics()
            .map(|metrics| metrics.encode_text())
            .unwrap_or_default()
    }

    /// The executor version recorded in every job this executor starts.
    #[getter]
    fn version(&self, py: Python<'_>) -> PyResult<String> {
        Ok(self.read(py).version().to_owned())
    }

    /// Registers `handler` for `step_type`, replacing any earlier one.
    fn register_handler(
        &self,
        py: Python<'_>,
        step_type: String,
        handler: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let handler = handlers::to_engine(&step_type, handler)?;
        let mut executor = py.detach(|| self.inner.write());
        executor.register_handler(step_type, handler);
        Ok(())
    }

    /// Executes `steps` in order as job `job_id`, stopping at the first
    /// failure; returns the `ExecutionResult` folded from the job's events.
    #[pyo3(signature = (job_id, contract_id, steps, health_observer = None, executed_by = "system".to_owned()))]
    fn execute_job(
        &self,
        py: Python<'_>,
        job_id: Uuid,
        contract_id: Uuid,
        steps: &Bound<'_, PyAny>,
        health_observer: Option<&Bound<'_, PyAny>>,
        executed_by: String,
    ) -> PyResult<Py<PyAny>> {
        let plan = convert::plan(steps)?;
        let observer = health_observer.map(PyObserver::new).transpose()?;
        let executor = self.read(py);
        // Without an observer the engine hands the job to a Python handler
        // thread (its drivers), which calls its handlers there.
        let result = self.run_job(py, &executor, job_id, || {
            executor.execute_job(
                job_id,
                contract_id,
                &plan,
                observer.as_ref().map(|o| o as &dyn HealthObserver),
                &executed_by,
            )
        })?;
        result_to_py(py, result, observer.as_ref())
    }

    /// Continues a job stopped between steps at its next step.
    #[pyo3(signature = (job_id, health_observer = None, executed_by = "system".to_owned()))]
    fn resume(
        &self,
        py: Python<'_>,
        job_id: Uuid,
        health_observer: Option<&Bound<'_, PyAny>>,
        executed_by: String,
    ) -> PyResult<Py<PyAny>> {
        let observer = health_observer.map(PyObserver::new).transpose()?;
        let executor = self.read(py);
        let result = self.run_job(py, &executor, job_id, || {
            executor.resume(
                job_id,
                observer.as_ref().map(|o| o as &dyn HealthObserver),
                &executed_by,
            )
        })?;
        result_to_py(py, result, observer.as_ref())
    }

    /// Rebuilds a stored job's `ExecutionResult` from its events.
    fn replay(&self, py: Python<'_>, job_id: Uuid) -> PyResult<Py<PyAny>> {
        let executor = self.read(py);
        let result = py.detach(|| executor.replay(job_id));
        result_to_py(py, result, None)
    }

    /// The job's stored events, in seq order, each as a dict.
    fn events(&self, py: Python<'_>, job_id: Uuid) -> PyResult<Py<PyList>> {
        let executor = self.read(py);
        let lines = py
            .detach(|| {
                let records = executor.store().load_job(job_id)?;
                Ok(records
                    .iter()
                    .map(|record| serde_json::from_str(&record.to_json_line()))
                    .collect::<Vec<_>>())
            })
            .map_err(|e: StoreError| errors::store_error(&e))?;
        if lines.is_empty() {
            return Err(errors::executor_error(&ExecutorError::UnknownJob {
                job_id,
            }));
        }
        let events = PyList::empty(py);
        for line in lines {
            let value = line.map_err(|e| {
                errors::EventLogError::new_err(format!("job {job_id}: unreadable event: {e}"))
            })?;
            events.append(convert::value_to_py(py, &value)?)?;
        }
        Ok(events.unbind())
    }

    /// Checks every stored job's hash chain and EXEC-001..006; `expect`
    /// maps job ids to heads kept earlier (`sha256:<hex>`), which reveals a
    /// cut-off tail.
    #[pyo3(signature = (expect = None))]
    fn verify(&self, py: Python<'_>, expect: Option<HashMap<Uuid, String>>) -> PyResult<Py<PyAny>> {
        let mut options = VerifyOptions::default();
        for (job_id, head) in expect.unwrap_or_default() {
            let digest = Digest::parse(&head).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "expected head {head:?} of job {job_id} is not sha256:<64 lowercase hex>"
                ))
            })?;
            options.expect.insert(job_id, digest);
        }
        let executor = self.read(py);
        // The executor's key checks the MACs of the logs it writes.
        options.key = executor.head_key().cloned();
        let mut violations = Vec::new();
        let summary = py
            .detach(|| {
                verify_store(
                    executor.store(),
                    &options,
                    |report| violations.extend(report.violations),
                    |_| {},
                )
            })
            .map_err(|e| errors::store_error(&e))?;
        let found = PyList::empty(py);
        for violation in &violations {
            found.append(convert::violation_to_py(py, violation)?)?;
        }
        let report = convert::types(py)?.verify_report.bind(py).call1((
            summary.failed_jobs == 0,
            summary.jobs,
            summary.events,
            summary.failed_jobs,
            found,
        ))?;
        Ok(report.unbind())
    }

    /// Closes every job left in doubt by an executor that stopped: a step
    /// whose outcome is unknown is recorded failed (`interrupted`), never
    /// run again. Returns what was done to each unfinished job.
    fn recover(&self, py: Python<'_>) -> PyResult<Py<PyList>> {
        let executor = self.read(py);
        let recovered = py
            .detach(|| executor.recover())
            .map_err(|e| errors::executor_error(&e))?;
        let list = PyList::empty(py);
        for recovery in &recovered {
            list.append(convert::recovery_to_py(py, recovery)?)?;
        }
        Ok(list.unbind())
    }

    /// Asks the executor running `job_id` to stop before its next step.
    /// Returns `True` when the request was recorded, `False` when one was
    /// already.
    #[pyo3(signature = (job_id, reason = "cancelled on request".to_owned()))]
    fn cancel(&self, py: Python<'_>, job_id: Uuid, reason: String) -> PyResult<bool> {
        let executor = self.read(py);
        match py.detach(|| executor.request_cancel(job_id, &reason)) {
            Ok(CancelRequest::Recorded { .. }) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) => Err(errors::executor_error(&e)),
        }
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("{:?}", *self.read(py)))
    }
}
