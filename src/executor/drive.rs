//! Driven jobs: a whole job run on one thread, which calls each step's
//! handler itself — no hand-over per step — while the executor's watchdog
//! keeps every deadline.
//!
//! `execute_job` without a health observer hands the job to the executor's
//! [`Drivers`] (a pool of its own threads unless the builder was given
//! others) and waits for the answer. The thread that takes it calls
//! [`DriveJob::drive`]; at a step's deadline, if its handler has not
//! returned, the watchdog records the timeout, ends the job and answers
//! the caller itself, while that thread stays inside the handler. A job no
//! thread takes is given back, and the caller's thread runs it, handing
//! each step over.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use super::run::Answer;
use super::{Engine, ExecutorError, JobExecutor, RunControl};
use crate::result::ExecutionResult;
use crate::runner::{HandlerPool, PoolOptions};
use crate::store::QueuedJob;

/// The threads an executor drives jobs on.
///
/// A host whose handlers must run on threads it creates (an embedding
/// interpreter's) gives the builder its own
/// ([`ExecutorBuilder::drivers`](super::ExecutorBuilder::drivers)):
///
/// ```
/// use std::sync::Arc;
/// use job_executor::executor::{DriveJob, Drivers};
/// use job_executor::{JobExecutor, JobStatus, JobStep, NoOpHandler};
/// use uuid::Uuid;
///
/// /// A thread of the host's own making for every job.
/// struct HostThreads;
///
/// impl Drivers for HostThreads {
///     fn hand_over(&self, job: DriveJob) {
///         // Were the thread not started, the job would be dropped, and so
///         // given back to the caller, whose thread runs it instead.
///         let _ = std::thread::Builder::new().spawn(move || job.drive());
///     }
/// }
///
/// let mut executor = JobExecutor::builder().drivers(Arc::new(HostThreads)).build();
/// executor.register_handler("capability_enable", NoOpHandler);
/// let steps = [JobStep::new(0, "capability_enable", "billing")];
/// let result = executor.execute_job(Uuid::new_v4(), Uuid::new_v4(), &steps, None, "ops")?;
/// assert_eq!(result.final_status, JobStatus::Completed);
/// # Ok::<(), job_executor::ExecutorError>(())
/// ```
pub trait Drivers: Send + Sync {
    /// Takes `job` to a thread that calls [`DriveJob::drive`], and returns
    /// at once. A job dropped undriven is given back: the caller's thread
    /// runs it then, handing each step over.
    fn hand_over(&self, job: DriveJob);
}

/// A job handed to a driver thread, with the way back to whoever waits for
/// its result.
pub struct DriveJob {
    /// `None` once driven.
    executor: Option<JobExecutor>,
    job: QueuedJob,
    reply: SyncSender<Driven>,
}

/// What a caller waiting for a driven job hears: its result, or `None`
/// when no thread drove it (nothing was recorded).
type Driven = Option<Result<ExecutionResult, ExecutorError>>;

impl std::fmt::Debug for DriveJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DriveJob")
            .field("job_id", &self.job.job_id)
            .finish_non_exhaustive()
    }
}

impl DriveJob {
    fn new(executor: JobExecutor, job: QueuedJob) -> (DriveJob, Receiver<Driven>) {
        let (reply, answer) = sync_channel(1);
        let job = DriveJob {
            executor: Some(executor),
            job,
            reply,
        };
        (job, answer)
    }

    /// The job.
    pub fn job(&self) -> &QueuedJob {
        &self.job
    }

    /// Drives the job on this thread, calling its handlers here, and
    /// answers whoever waits for it (unless the watchdog has, at a step's
    /// deadline).
    pub fn drive(mut self) {
        let Some(executor) = self.executor.take() else {
            return;
        };
        let (job, reply) = (&self.job, self.reply.clone());
        executor.drive(
            job.job_id,
            job.contract_id,
            &job.steps,
            &job.executed_by,
            move |result| {
                let _ = reply.send(Some(result));
            },
        );
    }
}

impl Drop for DriveJob {
    fn drop(&mut self) {
        if self.executor.is_some() {
            let _ = self.reply.send(None);
        }
    }
}

/// The executor's own driver threads: a pool beside the handler pool, so
/// that drivers never take the threads handed-over steps need. At its cap
/// a job is given back.
pub(super) struct PoolDrivers(HandlerPool);

impl PoolDrivers {
    pub(super) fn new(options: PoolOptions) -> Self {
        PoolDrivers(HandlerPool::new(options))
    }
}

impl Drivers for PoolDrivers {
    fn hand_over(&self, job: DriveJob) {
        // At the cap the work comes back, and dropping it gives the job back.
        let _ = self.0.try_run(Box::new(move || job.drive()));
    }
}

impl Engine {
    /// Drives `job` on this thread, calling its handlers here, and returns
    /// the result for `answer` — which the watchdog answers itself if it
    /// ends the job at a step's deadline while this thread is still in the
    /// handler. A panic of the engine's own is returned as
    /// [`ExecutorError::Driver`].
    pub(super) fn drive(
        &self,
        job: &QueuedJob,
        answer: &Answer,
    ) -> Result<ExecutionResult, ExecutorError> {
        let control = RunControl::default().answering(answer.clone());
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.start(job, None, control)
        }))
        .unwrap_or_else(|payload| {
            Err(ExecutorError::Driver {
                job_id: job.job_id,
                message: crate::sync::panic_message(payload.as_ref()),
            })
        })
    }
}

impl JobExecutor {
    /// Runs a job as `execute_job` does, but on the calling thread, calling
    /// each step's handler right here (no hand-over per step), and gives
    /// the result to `answer` — called exactly once. At a step's deadline,
    /// if its handler has not returned, the watchdog records the timeout,
    /// ends the job and calls `answer` itself, so whoever waits is answered
    /// on time while this thread stays inside the handler.
    ///
    /// It consumes this handle (clone one to keep it) and lets go of it
    /// before answering, so that a caller which drops its own executor on
    /// the answer closes the store on its thread (SQLite folds its
    /// write-ahead log into the file then), not whenever this thread ends.
    ///
    /// ```
    /// use std::sync::mpsc;
    /// use job_executor::{create_default_executor, JobStatus, JobStep};
    /// use uuid::Uuid;
    ///
    /// let executor = create_default_executor();
    /// let (tx, rx) = mpsc::channel();
    /// let steps = [JobStep::new(0, "capability_enable", "billing")];
    /// executor.clone().drive(Uuid::new_v4(), Uuid::new_v4(), &steps, "ops", move |result| {
    ///     let _ = tx.send(result);
    /// });
    /// assert_eq!(rx.recv().unwrap().unwrap().final_status, JobStatus::Completed);
    /// ```
    pub fn drive(
        self,
        job_id: uuid::Uuid,
        contract_id: uuid::Uuid,
        steps: &[crate::model::JobStep],
        executed_by: &str,
        answer: impl FnOnce(Result<ExecutionResult, ExecutorError>) + Send + 'static,
    ) {
        let job = QueuedJob::new(job_id, contract_id, steps.to_vec(), executed_by);
        let answer = Answer::new(answer);
        let result = self.engine.drive(&job, &answer);
        drop(self);
        answer.give(result);
    }

    /// Hands `job` to the executor's drivers and waits for its result;
    /// `None` when it was given back (nothing recorded: the caller runs it).
    pub(super) fn drive_elsewhere(
        &self,
        job: &QueuedJob,
    ) -> Option<Result<ExecutionResult, ExecutorError>> {
        let (handed, answer) = DriveJob::new(self.clone(), job.clone());
        self.engine.drivers.hand_over(handed);
        answer
            .recv()
            .unwrap_or(Some(Err(ExecutorError::Unanswered { job_id: job.job_id })))
    }
}
