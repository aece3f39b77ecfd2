//! The probes' answers: live while the process's loops run; ready while the
//! store answered within the last lease period and the process takes work.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a process tells its probes. A worker keeps one up to date
/// ([`Worker::health`](crate::worker::Worker::health)); an embedder's own
/// loop may too.
#[derive(Debug)]
pub struct Health {
    window: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    running: bool,
    taking_work: bool,
    answered: Option<Instant>,
    last_error: Option<String>,
}

impl Health {
    /// Ready only while the store has answered within `window` (a worker's
    /// lease: past it, its claims are no longer trusted).
    pub fn new(window: Duration) -> Self {
        Health {
            window,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // Every update is a single assignment: a poisoned lock is consistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The process's loops run (`true`) or have stopped.
    pub fn set_running(&self, running: bool) {
        self.state().running = running;
    }

    /// The process takes work (`true`), or no more (it is stopping).
    pub fn set_taking_work(&self, taking_work: bool) {
        self.state().taking_work = taking_work;
    }

    /// The store answered just now.
    pub fn store_answered(&self) {
        let mut state = self.state();
        state.answered = Some(Instant::now());
        state.last_error = None;
    }

    /// The store failed to answer, with `error`.
    pub fn store_failed(&self, error: &dyn std::fmt::Display) {
        self.state().last_error = Some(error.to_string());
    }

    /// `Ok` while the loops run; why not otherwise.
    ///
    /// # Errors
    /// The reason the process is not live.
    pub fn live(&self) -> Result<(), String> {
        if self.state().running {
            Ok(())
        } else {
            Err("the worker's loops are not running".to_owned())
        }
    }

    /// `Ok` while the store answered within the window and the process
    /// takes work; why not otherwise.
    ///
    /// # Errors
    /// The reason the process is not ready.
    pub fn ready(&self) -> Result<(), String> {
        let state = self.state();
        if !state.running || !state.taking_work {
            return Err("the worker takes no work (stopping, or not started)".to_owned());
        }
        let failing = state
            .last_error
            .as_deref()
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default();
        match state.answered {
            None => Err(format!("the store has not answered yet{failing}")),
            Some(at) if at.elapsed() > self.window => Err(format!(
                "the store has not answered for {:.1} s, more than a lease ({:.1} s){failing}",
                at.elapsed().as_secs_f64(),
                self.window.as_secs_f64()
            )),
            Some(_) => Ok(()),
        }
    }
}
