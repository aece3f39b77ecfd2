//! Evidence out: every ended job's evidence, once, in the order the jobs
//! ended, with nothing written twice to publish it.
//!
//! The log is the outbox. A job has ended when its terminal event
//! (`JobCompleted`, `JobHalted`, `JobCancelled`) is in the log; the order
//! of ending is the global position of that event. The [`Publisher`] keeps
//! one number per publisher name, its cursor: every job that ended at or
//! before it has been published and confirmed. Each round it reads the
//! jobs that ended after the cursor ([`EvidenceOutbox::ended_after`]),
//! rebuilds each one's evidence from its events (`replay`, byte for byte
//! what `job-executor replay` prints), publishes them and waits for the
//! broker's confirms ([`EvidenceSink::publish`]), and only then advances
//! the cursor to the last confirmed job. A crash between the confirm and
//! the cursor sends that tail again, with the same message ids
//! (`<job_id>:<head>`), which a JetStream stream's duplicate window drops
//! and an AMQP consumer dedupes: none lost, none with another id.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::backoff::{Backoff, sleep_unless_stopped, wait_out};
use super::{BusError, HEADER_FINAL_STATUS, HEADER_HEAD, HEADER_JOB_ID};
use crate::events::TERMINAL_KINDS;
use crate::projection::{execution_result_to_evidence, replay};
use crate::result::ExecutionResult;
use crate::store::{EventStore, Log, StoreError};

/// A job that ended, and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndedJob {
    /// The global position of its terminal event.
    pub position: u64,
    /// The job.
    pub job_id: Uuid,
}

/// What the publisher needs of a store: the ended jobs in the order they
/// ended, and named cursors.
///
/// A SQL store provides it beside the log:
/// - `ended_after`: the terminal events (`TERMINAL_KINDS`) past a
///   position, in position order, from an index of them (a partial index
///   on position, or a table filled in the append's own transaction) —
///   never a scan of the log. Positions must be given in commit order
///   (PostgreSQL's store already does), or a job committed late with a
///   lower position would fall behind a cursor that had passed it.
/// - `cursor` / `advance`: a table `(name PRIMARY KEY, position)` in the
///   same database; `advance` never moves a cursor back (the larger of the
///   two positions is kept), so a slow publisher restarted beside a fast
///   one cannot undo its progress. A name never advanced reads 0.
pub trait EvidenceOutbox: Send + Sync {
    /// Up to `limit` jobs whose terminal event is past `position`, in the
    /// order of those events.
    ///
    /// # Errors
    /// Store failures.
    fn ended_after(&self, position: u64, limit: usize) -> Result<Vec<EndedJob>, StoreError>;

    /// The cursor `name`: 0 until first advanced.
    ///
    /// # Errors
    /// Store failures.
    fn cursor(&self, name: &str) -> Result<u64, StoreError>;

    /// Moves the cursor `name` on to `position` (never back), durably.
    ///
    /// # Errors
    /// Store failures.
    fn advance(&self, name: &str, position: u64) -> Result<(), StoreError>;
}

/// An [`EvidenceOutbox`] over any store: ended jobs found by scanning the
/// whole log, cursors kept in memory (so they last as long as this value,
/// not across processes). For tests and small logs.
pub struct ScanOutbox {
    log: Arc<dyn EventStore>,
    cursors: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for ScanOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScanOutbox").finish_non_exhaustive()
    }
}

impl ScanOutbox {
    /// An outbox over `log`, every cursor at 0.
    pub fn new(log: Arc<dyn EventStore>) -> Self {
        ScanOutbox {
            log,
            cursors: Mutex::new(HashMap::new()),
        }
    }

    fn cursors(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        // A panic elsewhere while holding the map leaves it whole.
        self.cursors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl EvidenceOutbox for ScanOutbox {
    fn ended_after(&self, position: u64, limit: usize) -> Result<Vec<EndedJob>, StoreError> {
        let mut ended = Vec::new();
        let mut failure = None;
        self.log.scan(&mut |_, row| match row {
            Ok(record)
                if record.position > position && TERMINAL_KINDS.contains(&record.kind.as_str()) =>
            {
                ended.push(EndedJob {
                    position: record.position,
                    job_id: record.job_id,
                });
            }
            Ok(_) => {}
            Err(e) => {
                failure.get_or_insert(e);
            }
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        ended.sort_unstable_by_key(|job| job.position);
        ended.truncate(limit);
        Ok(ended)
    }

    fn cursor(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self.cursors().get(name).copied().unwrap_or(0))
    }

    fn advance(&self, name: &str, position: u64) -> Result<(), StoreError> {
        let mut cursors = self.cursors();
        let cursor = cursors.entry(name.to_owned()).or_insert(0);
        *cursor = (*cursor).max(position);
        Ok(())
    }
}

/// The evidence JSON exactly as `job-executor replay` prints it:
/// pretty-printed, with a final newline.
pub fn evidence_text(result: &ExecutionResult) -> String {
    let evidence = execution_result_to_evidence(result);
    let mut text = serde_json::to_string_pretty(&evidence)
        .unwrap_or_else(|e| unreachable!("a JSON value always serialises: {e}"));
    text.push('\n');
    text
}

/// One job's evidence, ready to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EvidenceMessage {
    /// Where the job ended: the cursor moves here once it is confirmed.
    pub position: u64,
    /// The job ([`HEADER_JOB_ID`]).
    pub job_id: Uuid,
    /// Its final status, `COMPLETED`, … ([`HEADER_FINAL_STATUS`]).
    pub final_status: String,
    /// Its head, `sha256:<hex>` ([`HEADER_HEAD`]).
    pub head: String,
    /// `<job_id>:<head>`: AMQP `message_id`, NATS `Nats-Msg-Id`.
    pub message_id: String,
    /// The evidence, as [`evidence_text`].
    pub body: Vec<u8>,
}

impl EvidenceMessage {
    /// The message of `ended`, its evidence rebuilt from `log`.
    ///
    /// # Errors
    /// [`BusError::Replay`] when the job's log does not replay.
    pub fn build(log: &dyn EventStore, ended: EndedJob) -> Result<Self, BusError> {
        let result = replay(log, ended.job_id).map_err(|source| BusError::Replay {
            job_id: ended.job_id,
            source,
        })?;
        let head = result.head.to_string();
        Ok(EvidenceMessage {
            position: ended.position,
            job_id: ended.job_id,
            final_status: result.final_status.as_str().to_owned(),
            message_id: format!("{}:{head}", ended.job_id),
            body: evidence_text(&result).into_bytes(),
            head,
        })
    }

    /// Its headers: [`HEADER_JOB_ID`], [`HEADER_FINAL_STATUS`],
    /// [`HEADER_HEAD`].
    pub fn headers(&self) -> [(&'static str, String); 3] {
        [
            (HEADER_JOB_ID, self.job_id.to_string()),
            (HEADER_FINAL_STATUS, self.final_status.clone()),
            (HEADER_HEAD, self.head.clone()),
        ]
    }
}

/// A publish that stopped short: the first `confirmed` messages of the
/// batch were confirmed, the rest not (or not known to be).
#[derive(Debug)]
pub struct Unconfirmed {
    /// How many messages, from the first, the broker confirmed.
    pub confirmed: usize,
    /// Why the next one was not.
    pub error: BusError,
}

/// Sends every message of `batch` with `send` (stopping at the first that
/// cannot be sent), then waits for each one's confirmation in order with
/// `confirm`: the messages confirmed are counted from the first, up to the
/// first that is not. Sending them all before waiting takes one round trip
/// for the batch, not one a message.
///
/// # Errors
/// [`Unconfirmed`]: the prefix confirmed and why the next was not.
pub(crate) async fn send_then_confirm<P>(
    batch: &[EvidenceMessage],
    mut send: impl AsyncFnMut(&EvidenceMessage) -> Result<P, BusError>,
    confirm: impl AsyncFn(P) -> Result<(), BusError>,
) -> Result<(), Unconfirmed> {
    let mut sent = Vec::with_capacity(batch.len());
    let mut failure = None;
    for message in batch {
        match send(message).await {
            Ok(pending) => sent.push(pending),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let mut confirmed = 0;
    for pending in sent {
        if let Err(error) = confirm(pending).await {
            return Err(Unconfirmed { confirmed, error });
        }
        confirmed += 1;
    }
    failure.map_or(Ok(()), |error| Err(Unconfirmed { confirmed, error }))
}

/// Where evidence goes: a broker that confirms what it holds.
pub trait EvidenceSink: Send {
    /// Publishes `batch` in order and waits until the broker has confirmed
    /// each message (AMQP publisher confirms, JetStream publish acks).
    ///
    /// # Errors
    /// [`Unconfirmed`]: how many messages from the first were confirmed,
    /// and why the next was not.
    fn publish(&mut self, batch: &[EvidenceMessage]) -> Result<(), Unconfirmed>;

    /// Connects again after the connection was lost.
    ///
    /// # Errors
    /// A [`BusError`] when the broker cannot be reached yet.
    fn reconnect(&mut self) -> Result<(), BusError>;

    /// Disconnects.
    fn close(&mut self);
}

/// How a publisher runs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PublisherOptions {
    /// The cursor's name (default `evidence`): publishers of one log to
    /// different places keep different cursors.
    pub cursor: String,
    /// Jobs published per round (default 256).
    pub batch: usize,
    /// Exit once every ended job is published and nothing is submitted or
    /// running, and that has lasted `idle_for`.
    pub until_idle: bool,
    /// How long idleness must last for `until_idle` (default 500 ms).
    pub idle_for: Duration,
    /// How long to wait before looking again when nothing ended (default
    /// 100 ms).
    pub poll: Duration,
    /// Waits between tries after a failure.
    pub backoff: Backoff,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            cursor: "evidence".to_owned(),
            batch: 256,
            until_idle: false,
            idle_for: Duration::from_millis(500),
            poll: Duration::from_millis(100),
            backoff: Backoff::default(),
        }
    }
}

impl PublisherOptions {
    /// With the cursor `name`.
    pub fn with_cursor(mut self, name: impl Into<String>) -> Self {
        self.cursor = name.into();
        self
    }

    /// With up to `batch` jobs a round (at least one).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Exiting once idle for `idle_for`.
    pub fn until_idle(mut self, idle_for: Duration) -> Self {
        self.until_idle = true;
        self.idle_for = idle_for;
        self
    }

    /// With these waits between tries after a failure.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }
}

/// What a publisher did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublisherReport {
    /// Evidence messages confirmed.
    pub published: usize,
    /// The cursor when it stopped.
    pub cursor: u64,
    /// Connections made again after one was lost.
    pub reconnects: usize,
}

/// Publishes the evidence of every ended job of a log, once, in the order
/// the jobs ended.
pub struct Publisher {
    log: Arc<dyn Log>,
    outbox: Arc<dyn EvidenceOutbox>,
    sink: Box<dyn EvidenceSink>,
    options: PublisherOptions,
    stop: Arc<AtomicBool>,
    report: PublisherReport,
    failures: u32,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("options", &self.options)
            .field("report", &self.report)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher of `log`'s evidence to `sink`, its cursor in `outbox`.
    pub fn new(
        log: Arc<dyn Log>,
        outbox: Arc<dyn EvidenceOutbox>,
        sink: Box<dyn EvidenceSink>,
        options: PublisherOptions,
    ) -> Self {
        Publisher {
            log,
            outbox,
            sink,
            options,
            stop: Arc::new(AtomicBool::new(false)),
            report: PublisherReport::default(),
            failures: 0,
        }
    }

    /// Raise it to stop once the batch in hand is confirmed (or not) and
    /// the cursor moved past what was.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Runs until stopped (or, with `until_idle`, idle), then disconnects.
    ///
    /// # Errors
    /// A job whose evidence cannot be built ([`BusError::Replay`]), a store
    /// or broker failure that waiting cannot cure.
    pub fn run(&mut self) -> Result<PublisherReport, BusError> {
        let result = self.run_until_done();
        self.sink.close();
        result.map(|()| std::mem::take(&mut self.report))
    }

    fn run_until_done(&mut self) -> Result<(), BusError> {
        let mut cursor = self.outbox.cursor(&self.options.cursor)?;
        self.report.cursor = cursor;
        let mut idle_since = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            match self.round(&mut cursor) {
                Ok(0) => {
                    if self.options.until_idle
                        && idle_since.elapsed() >= self.options.idle_for
                        && self.nothing_queued()?
                    {
                        return Ok(());
                    }
                    sleep_unless_stopped(self.options.poll, &self.stop);
                }
                Ok(_) => idle_since = Instant::now(),
                Err(e) => {
                    self.wait_out(e)?;
                    idle_since = Instant::now();
                }
            }
        }
        Ok(())
    }

    /// Publishes the next batch past `cursor` and moves it on; returns how
    /// many messages were confirmed.
    fn round(&mut self, cursor: &mut u64) -> Result<usize, BusError> {
        let ended = self.outbox.ended_after(*cursor, self.options.batch)?;
        let batch = ended
            .into_iter()
            .map(|job| EvidenceMessage::build(&*self.log, job))
            .collect::<Result<Vec<_>, _>>()?;
        let (confirmed, error) = match self.sink.publish(&batch) {
            Ok(()) => (batch.len(), None),
            Err(Unconfirmed { confirmed, error }) => (confirmed.min(batch.len()), Some(error)),
        };
        if let Some(last) = confirmed.checked_sub(1).map(|i| &batch[i]) {
            self.outbox.advance(&self.options.cursor, last.position)?;
            *cursor = last.position;
            self.report.cursor = last.position;
            self.report.published += confirmed;
            self.failures = 0;
        }
        match error {
            Some(error) => Err(error),
            None => Ok(confirmed),
        }
    }

    fn nothing_queued(&self) -> Result<bool, BusError> {
        Ok(self.log.queued()?.is_empty())
    }

    fn wait_out(&mut self, error: BusError) -> Result<(), BusError> {
        let sink = &mut self.sink;
        if wait_out(
            "publish",
            error,
            &self.options.backoff,
            &mut self.failures,
            &self.stop,
            &mut || sink.reconnect(),
        )? {
            self.report.reconnects += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::model::{ExecutionContext, JobStep, StepOutput};
    use crate::store::MemoryStore;
    use crate::{JobExecutor, NoOpHandler};

    /// Records what it was given; fails as scripted.
    #[derive(Clone, Default)]
    struct Recorder {
        published: Arc<Mutex<Vec<EvidenceMessage>>>,
        /// Before each publish, how many to confirm (the rest fail), if any.
        script: Arc<Mutex<Vec<usize>>>,
        reconnects: Arc<Mutex<usize>>,
    }

    impl EvidenceSink for Recorder {
        fn publish(&mut self, batch: &[EvidenceMessage]) -> Result<(), Unconfirmed> {
            let mut script = self.script.lock().unwrap();
            let confirm = if script.is_empty() {
                batch.len()
            } else {
                script.remove(0).min(batch.len())
            };
            let mut published = self.published.lock().unwrap();
            published.extend(batch[..confirm].iter().cloned());
            if confirm == batch.len() {
                return Ok(());
            }
            Err(Unconfirmed {
                confirmed: confirm,
                error: BusError::Disconnected {
                    broker: "recorder".into(),
                    detail: "dropped".into(),
                },
            })
        }
        fn reconnect(&mut self) -> Result<(), BusError> {
            *self.reconnects.lock().unwrap() += 1;
            Ok(())
        }
        fn close(&mut self) {}
    }

    fn quick() -> PublisherOptions {
        PublisherOptions::default()
            .until_idle(Duration::ZERO)
            .with_backoff(Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(2),
            })
    }

    /// Runs a publisher to idle; returns its report and the jobs it sent.
    fn publish(
        store: &Arc<MemoryStore>,
        outbox: &Arc<ScanOutbox>,
        sink: &Recorder,
        options: PublisherOptions,
    ) -> (PublisherReport, Vec<Uuid>) {
        let before = sink.published.lock().unwrap().len();
        let mut publisher = Publisher::new(
            store.clone(),
            outbox.clone(),
            Box::new(sink.clone()),
            options,
        );
        let report = publisher.run().unwrap();
        let published = sink.published.lock().unwrap();
        (
            report,
            published[before..].iter().map(|m| m.job_id).collect(),
        )
    }

    fn executor(store: &Arc<MemoryStore>) -> JobExecutor {
        let mut executor = JobExecutor::builder().store(store.clone()).build();
        executor.register_handler("noop", NoOpHandler);
        executor
    }

    fn run_job(executor: &JobExecutor, steps: usize) -> Uuid {
        let job_id = Uuid::new_v4();
        let steps: Vec<JobStep> = (0..steps)
            .map(|i| JobStep::new(i as u32, "noop", "t"))
            .collect();
        executor
            .execute_job(job_id, Uuid::new_v4(), &steps, None, "ops")
            .unwrap();
        job_id
    }

    #[test]
    fn jobs_are_published_in_the_order_they_ended_with_replays_evidence() {
        let store = Arc::new(MemoryStore::new());
        let mut executor = executor(&store);
        let (release, wait) = mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        executor.register_handler("wait", move |_: &JobStep, _: &ExecutionContext| {
            wait.lock().unwrap().recv().unwrap();
            StepOutput::succeeded(serde_json::json!({}))
        });
        let executor = Arc::new(executor);
        let slow = Uuid::new_v4();
        let running = std::thread::spawn({
            let executor = executor.clone();
            move || {
                let steps = [JobStep::new(0, "wait", "t")];
                executor.execute_job(slow, Uuid::new_v4(), &steps, None, "ops")
            }
        });
        while store.last_seq(slow).unwrap() < 2 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let fast = run_job(&executor, 2);
        release.send(()).unwrap();
        running.join().unwrap().unwrap();

        let sink = Recorder::default();
        let outbox = Arc::new(ScanOutbox::new(store.clone()));
        let mut publisher = Publisher::new(store.clone(), outbox, Box::new(sink.clone()), quick());
        let report = publisher.run().unwrap();
        assert_eq!(report.published, 2);
        let published = sink.published.lock().unwrap();
        let order: Vec<Uuid> = published.iter().map(|m| m.job_id).collect();
        assert_eq!(order, [fast, slow], "the order the jobs ended, not started");
        for message in published.iter() {
            let result = replay(&*store, message.job_id).unwrap();
            assert_eq!(message.body, evidence_text(&result).into_bytes());
            assert_eq!(message.final_status, "COMPLETED");
            assert_eq!(message.head, result.head.to_string());
            assert_eq!(
                message.message_id,
                format!("{}:{}", message.job_id, message.head)
            );
        }
        assert_eq!(report.cursor, published[1].position);
    }

    #[test]
    fn the_cursor_moves_only_past_what_was_confirmed_and_a_restart_resumes_there() {
        let store = Arc::new(MemoryStore::new());
        let executor = executor(&store);
        let jobs: Vec<Uuid> = (0..5).map(|_| run_job(&executor, 1)).collect();
        let outbox = Arc::new(ScanOutbox::new(store.clone()));
        let sink = Recorder::default();
        // The first round confirms two of five, the second none; the
        // publisher reconnects and sends the rest.
        sink.script.lock().unwrap().extend([2, 0]);
        let (report, ids) = publish(&store, &outbox, &sink, quick());
        assert_eq!((report.published, report.reconnects), (5, 2));
        assert_eq!(ids, jobs, "each once, in order");

        // Two more jobs end; a new publisher on the same cursor sends only those.
        let later: Vec<Uuid> = (0..2).map(|_| run_job(&executor, 1)).collect();
        let (report, ids) = publish(&store, &outbox, &Recorder::default(), quick());
        assert_eq!((report.published, ids), (2, later));
        let end = store.last_position().unwrap();
        assert_eq!(outbox.cursor("evidence").unwrap(), end);
        // Another name starts from the beginning; a cursor never moves back.
        assert_eq!(outbox.cursor("audit").unwrap(), 0);
        outbox.advance("evidence", 1).unwrap();
        assert_eq!(outbox.cursor("evidence").unwrap(), end);
    }

    #[test]
    fn small_batches_keep_the_order() {
        let store = Arc::new(MemoryStore::new());
        let executor = executor(&store);
        let jobs: Vec<Uuid> = (0..7).map(|_| run_job(&executor, 0)).collect();
        let outbox = Arc::new(ScanOutbox::new(store.clone()));
        let options = quick().with_batch(3);
        let (report, ids) = publish(&store, &outbox, &Recorder::default(), options);
        assert_eq!((report.published, ids), (7, jobs));
    }
}
