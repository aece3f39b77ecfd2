//! The synchronisation the concurrent parts (group commit, the handler pool)
//! are built from: the standard library's, or, with the `shuttle` feature,
//! the model checker's, whose scheduler explores how threads interleave.
//!
//! The model checker has no clock: a timed wait is modelled as a point where
//! any other thread may run, after which the time may have passed — every
//! outcome a real timeout can have, and none it cannot.

#[cfg(not(feature = "shuttle"))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard, atomic, mpsc};
#[cfg(not(feature = "shuttle"))]
pub(crate) use std::thread;

#[cfg(feature = "shuttle")]
pub(crate) use shuttle::sync::{Condvar, Mutex, MutexGuard, atomic, mpsc};
#[cfg(feature = "shuttle")]
pub(crate) use shuttle::thread;

use std::time::Duration;

/// Locks `mutex`. Every structure guarded here is changed in single steps,
/// so a lock poisoned by a panicking holder still guards consistent data.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits on `condvar` for at most `timeout`, giving back the guard.
#[cfg(not(feature = "shuttle"))]
pub(crate) fn wait_timeout<'a, T>(
    _mutex: &'a Mutex<T>,
    condvar: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    condvar
        .wait_timeout(guard, timeout)
        .map_or_else(|poisoned| poisoned.into_inner().0, |(guard, _)| guard)
}

/// Waits on `condvar` for at most `timeout`: under the model checker, lets
/// any other thread run, then returns as if the time were up.
#[cfg(feature = "shuttle")]
pub(crate) fn wait_timeout<'a, T>(
    mutex: &'a Mutex<T>,
    _condvar: &Condvar,
    guard: MutexGuard<'a, T>,
    _timeout: Duration,
) -> MutexGuard<'a, T> {
    drop(guard);
    thread::yield_now();
    lock(mutex)
}

/// Waits for a message for at most `timeout`.
#[cfg(not(feature = "shuttle"))]
pub(crate) fn recv_timeout<T>(
    receiver: &mpsc::Receiver<T>,
    timeout: Duration,
) -> Result<T, mpsc::RecvTimeoutError> {
    receiver.recv_timeout(timeout)
}

/// Waits for a message for at most `timeout`: under the model checker,
/// either until it comes or, chosen by the scheduler, until "later", after
/// letting any other thread run.
#[cfg(feature = "shuttle")]
pub(crate) fn recv_timeout<T>(
    receiver: &mpsc::Receiver<T>,
    _timeout: Duration,
) -> Result<T, mpsc::RecvTimeoutError> {
    use shuttle::rand::Rng;
    if shuttle::rand::thread_rng().gen_bool(0.5) {
        return receiver
            .recv()
            .map_err(|_| mpsc::RecvTimeoutError::Disconnected);
    }
    thread::yield_now();
    receiver.try_recv().map_err(|e| match e {
        mpsc::TryRecvError::Empty => mpsc::RecvTimeoutError::Timeout,
        mpsc::TryRecvError::Disconnected => mpsc::RecvTimeoutError::Disconnected,
    })
}

/// The message a panic was raised with.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "handler panicked".to_owned()
    }
}
