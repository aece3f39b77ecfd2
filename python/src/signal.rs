//! A step's cancel signal, as a Python handler sees it.

use pyo3::prelude::*;

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
