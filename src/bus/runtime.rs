//! The small tokio runtime a broker adapter owns, behind blocking calls.

use std::future::Future;
use std::time::Duration;

use super::BusError;

/// How long closing a connection waits for a broker to take what is still
/// buffered: a broker that is gone gets a moment, not more.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// One worker thread runs the client's connection (heartbeats, incoming
/// frames) between calls; each blocking call runs its future to the end
/// on the caller's thread.
#[derive(Debug)]
pub(crate) struct Runtime {
    inner: tokio::runtime::Runtime,
}

impl Runtime {
    /// A runtime of one worker thread, named for `what`.
    pub(crate) fn new(what: &str) -> Result<Self, BusError> {
        let inner = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("job-executor-{what}"))
            .enable_all()
            .build()
            .map_err(BusError::Runtime)?;
        Ok(Runtime { inner })
    }

    /// Runs `future` to the end on this thread.
    pub(crate) fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.inner.block_on(future)
    }

    /// Runs `future` on this thread for at most `wait`; `None` past it.
    pub(crate) fn block_on_for<F: Future>(&self, wait: Duration, future: F) -> Option<F::Output> {
        self.inner
            .block_on(async { tokio::time::timeout(wait, future).await.ok() })
    }
}
