//! The message bus against the real brokers: RabbitMQ at `JE_AMQP_URL`
//! (default `amqp://guest:guest@127.0.0.1:5672/%2f`) and NATS JetStream at
//! `JE_NATS_URL` (default `nats://127.0.0.1:4222`). Each test uses queues,
//! exchanges and streams of its own (random names) and deletes them. A
//! broker that does not answer makes its tests say `SKIPPED:` — or fail,
//! under `JE_REQUIRE_BROKERS=1`. Tests that must restart a server, or need
//! bodies over the shared server's `max_payload`, start a `nats-server` of
//! their own.
#![cfg(feature = "bus")]

mod brokers;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use job_executor::bus::amqp::{AmqpSink, AmqpSource, AmqpSourceOptions};
use job_executor::bus::intake::{
    Inbound, Intake, IntakeOptions, IntakeReport, JobSink, MessageSource, QueueSink,
};
use job_executor::bus::nats::{JetStreamSink, JetStreamSource, JetStreamSourceOptions};
use job_executor::bus::publish::{
    EndedJob, EvidenceOutbox, EvidenceSink, Publisher, PublisherOptions, PublisherReport,
    ScanOutbox, evidence_text,
};
use job_executor::bus::{
    Backoff, BusError, HEADER_FINAL_STATUS, HEADER_HEAD, HEADER_JOB_ID, HEADER_MESSAGE_ID,
    HEADER_REASON, job_id_from_message_id,
};
use job_executor::store::{EventStore, Log, MemoryStore, SqliteStore, StoreError};
use job_executor::{FailingHandler, JobExecutor, JobStep, NoOpHandler, replay};
use uuid::Uuid;

use brokers::{Got, Nats, PrivateNats, Rabbit, unique};

const CONTRACT: &str = "6f1c2a6e-8a49-4d1a-9d55-0e3a1f5b7c11";

fn plan(job_id: Option<Uuid>, target: &str) -> Vec<u8> {
    let id = job_id.map_or(String::new(), |id| format!("\"job_id\":\"{id}\","));
    format!(
        r#"{{{id}"contract_id":"{CONTRACT}","steps":[{{"step_index":0,"step_type":"capability_enable","target":"{target}"}}]}}"#
    )
    .into_bytes()
}

fn quick_backoff() -> Backoff {
    Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(500),
    }
}

fn intake_options(idle: Duration) -> IntakeOptions {
    IntakeOptions::default()
        .until_idle(idle)
        .with_backoff(quick_backoff())
}

fn run_intake(source: Box<dyn MessageSource>, log: Arc<dyn Log>, idle: Duration) -> IntakeReport {
    let sink: Arc<dyn JobSink> = Arc::new(QueueSink::new(log));
    Intake::new(source, sink, intake_options(idle))
        .run()
        .expect("the intake runs to idle")
}

fn queued_ids(log: &dyn Log) -> HashSet<Uuid> {
    log.queued().unwrap().iter().map(|e| e.job_id).collect()
}

/// Drops the connection instead of acknowledging the first `drops`
/// messages, as a crash between the submission and the ack would; counts
/// the redelivered messages it sees.
struct CrashBeforeAck {
    inner: Box<dyn MessageSource>,
    drops: usize,
    redelivered: Arc<AtomicUsize>,
}

impl MessageSource for CrashBeforeAck {
    fn next(&mut self, wait: Duration) -> Result<Option<Inbound>, BusError> {
        let message = self.inner.next(wait)?;
        if message.as_ref().is_some_and(|m| m.redelivered) {
            self.redelivered.fetch_add(1, Ordering::Relaxed);
        }
        Ok(message)
    }
    fn ack(&mut self, message: &Inbound) -> Result<(), BusError> {
        if self.drops == 0 {
            return self.inner.ack(message);
        }
        self.drops -= 1;
        self.inner.close();
        Err(BusError::Disconnected {
            broker: "test".into(),
            detail: "crashed before the ack".into(),
        })
    }
    fn release(&mut self, message: &Inbound) -> Result<(), BusError> {
        self.inner.release(message)
    }
    fn reject(&mut self, message: &Inbound) -> Result<(), BusError> {
        self.inner.reject(message)
    }
    fn dead_letter(&mut self, message: &Inbound, reason: &str) -> Result<bool, BusError> {
        self.inner.dead_letter(message, reason)
    }
    fn reconnect(&mut self) -> Result<(), BusError> {
        self.inner.reconnect()
    }
    fn close(&mut self) {
        self.inner.close();
    }
}

/// Runs an intake from `source` that loses its first three acks to a
/// crash; checks that each crash was a reconnection and a redelivery, and
/// that no job was submitted twice.
fn run_crashing_thrice(
    source: Box<dyn MessageSource>,
    log: &Arc<dyn Log>,
    idle: Duration,
) -> IntakeReport {
    let redelivered = Arc::new(AtomicUsize::new(0));
    let crashing = CrashBeforeAck {
        inner: source,
        drops: 3,
        redelivered: redelivered.clone(),
    };
    let report = run_intake(Box::new(crashing), log.clone(), idle);
    assert_eq!(report.reconnects, 3, "{report:?}");
    assert!(redelivered.load(Ordering::Relaxed) >= 3, "{report:?}");
    assert_eq!(report.submitted, log.queued().unwrap().len(), "{report:?}");
    report
}

/// Eight plans: four with a job id and four without (their message ids
/// name them), each sent twice.
/// A message to send: its id, if any, and its body.
type Sent = (Option<String>, Vec<u8>);

/// A poison message: its id, its body, the start of its refusal's reason
/// (empty for a good plan).
type Poison = (String, Vec<u8>, &'static str);

fn duplicated_plans() -> (Vec<Sent>, HashSet<Uuid>) {
    let mut messages = Vec::new();
    let mut expected = HashSet::new();
    for i in 0..4 {
        let job_id = Uuid::new_v4();
        expected.insert(job_id);
        let body = plan(Some(job_id), &format!("with-id-{i}"));
        messages.push((Some(format!("a-{i}")), body.clone()));
        messages.push((Some(format!("b-{i}")), body));
        let message_id = format!("m-{}", Uuid::new_v4());
        expected.insert(job_id_from_message_id(&message_id));
        let body = plan(None, &format!("by-message-id-{i}"));
        messages.push((Some(message_id.clone()), body.clone()));
        messages.push((Some(message_id), body));
    }
    (messages, expected)
}

#[test]
fn amqp_plans_become_jobs_once_despite_redelivery_and_duplicates() {
    let Some(mut rabbit) = Rabbit::connect("amqp_plans_become_jobs_once") else {
        return;
    };
    let queue = rabbit.queue("plans");
    let dead = rabbit.queue("dead");
    let (messages, expected) = duplicated_plans();
    for (id, body) in &messages {
        rabbit.publish(&queue, body, id.as_deref());
    }
    let log: Arc<dyn Log> = Arc::new(MemoryStore::new());
    let options = AmqpSourceOptions::default()
        .with_prefetch(4)
        .with_dead_letter(&dead);
    let source = AmqpSource::connect(&rabbit.url, &queue, options).unwrap();
    let report = run_crashing_thrice(Box::new(source), &log, Duration::from_millis(700));
    assert_eq!(queued_ids(&*log), expected, "every plan, once");
    // The copies, the three messages whose ack was lost, and the rest of
    // their batches (released unacknowledged, their jobs already in).
    assert!(
        report.duplicates >= messages.len() - expected.len() + 3,
        "{report:?}"
    );
    assert_eq!(rabbit.count(&queue), 0, "every message acked");
    assert_eq!(rabbit.count(&dead), 0);
}

#[test]
fn nats_plans_become_jobs_once_despite_redelivery_and_duplicates() {
    let Some(mut nats) = Nats::connect("nats_plans_become_jobs_once") else {
        return;
    };
    let stream = nats.adopt_stream("PLANS");
    let subject = unique("plans");
    let (messages, expected) = duplicated_plans();
    let log: Arc<dyn Log> = Arc::new(MemoryStore::new());
    let options = JetStreamSourceOptions::default()
        .with_batch(4)
        .with_ack_wait(Duration::from_secs(2));
    // The intake creates the stream; the plans are published after.
    let source = JetStreamSource::connect(&nats.url, &stream, &subject, options).unwrap();
    for (id, body) in &messages {
        nats.publish(&subject, body, id.as_deref());
    }
    let report = run_crashing_thrice(Box::new(source), &log, Duration::from_secs(3));
    assert_eq!(queued_ids(&*log), expected, "every plan, once");
    // The copies the stream kept, and the three messages whose ack was lost.
    assert!(report.duplicates >= 4 + 3, "{report:?}");
    // Both copies of a plan with a message id reach the stream only once:
    // JetStream's duplicate window drops the second.
    assert_eq!(nats.count(&stream), 12);
    assert_eq!(
        nats.pending(&stream, "job-executor-intake"),
        0,
        "every message acked"
    );
}

/// The poison, each with the start of the reason it must be refused for,
/// then a good plan; and the ids of the good plans.
fn poison() -> (Vec<Poison>, HashSet<Uuid>) {
    let taken = Uuid::new_v4();
    let good: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let bad_index = String::from_utf8(plan(None, "x"))
        .unwrap()
        .replace("\"step_index\":0", "\"step_index\":3");
    let unknown = format!(r#"{{"contract_id":"{CONTRACT}","steps":[],"priority":9}}"#);
    let messages = vec![
        (
            "p-json".into(),
            b"{not json".to_vec(),
            "not a plan: key must be a string",
        ),
        ("p-good-0".into(), plan(Some(good[0]), "a"), ""),
        (
            "p-index".into(),
            bad_index.into_bytes(),
            "invalid plan: step at position 0 has step_index 3",
        ),
        (
            "p-unknown".into(),
            unknown.into_bytes(),
            "not a plan: unknown field `priority`",
        ),
        (
            "p-huge".into(),
            vec![b'x'; 10 << 20],
            "body of 10485760 bytes is over the limit of 1048576 bytes",
        ),
        ("p-taken-1".into(), plan(Some(taken), "first"), ""),
        ("p-taken-2".into(), plan(Some(taken), "second"), "job "),
        ("p-good-1".into(), plan(Some(good[1]), "b"), ""),
        ("p-good-2".into(), plan(Some(good[2]), "c"), ""),
    ];
    let mut expected: HashSet<Uuid> = good.into_iter().collect();
    expected.insert(taken);
    (messages, expected)
}

fn check_dead_letters(dead: &[Got], messages: &[Poison], id_header: Option<&str>) {
    let refused: Vec<_> = messages.iter().filter(|(_, _, r)| !r.is_empty()).collect();
    assert_eq!(dead.len(), refused.len(), "{dead:?}");
    for (got, (id, body, reason)) in dead.iter().zip(refused) {
        let got_id = match id_header {
            Some(header) => got.headers.get(header).cloned(),
            None => got.message_id.clone(),
        };
        assert_eq!(got_id.as_deref(), Some(id.as_str()));
        let got_reason = got.headers.get(HEADER_REASON).cloned().unwrap_or_default();
        assert!(got_reason.starts_with(reason), "{id}: {got_reason:?}");
        assert_eq!(
            &got.body, body,
            "{id}: the dead letter holds the body as sent"
        );
    }
    let taken = dead
        .last()
        .and_then(|g| g.headers.get(HEADER_REASON))
        .unwrap();
    assert!(
        taken.ends_with("already exists with a different plan"),
        "{taken}"
    );
}

#[test]
fn amqp_poison_reaches_the_dead_letter_with_its_reason_and_the_flow_goes_on() {
    let Some(mut rabbit) = Rabbit::connect("amqp_poison_reaches_the_dead_letter") else {
        return;
    };
    let queue = rabbit.queue("plans");
    let dead = rabbit.queue("dead");
    let (messages, expected) = poison();
    for (id, body, _) in &messages {
        rabbit.publish(&queue, body, Some(id));
    }
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = Arc::new(SqliteStore::open(dir.path().join("log.db")).unwrap());
    let options = AmqpSourceOptions::default().with_dead_letter(&dead);
    let source = AmqpSource::connect(&rabbit.url, &queue, options).unwrap();
    let report = run_intake(Box::new(source), log.clone(), Duration::from_millis(700));
    assert_eq!(queued_ids(&*log), expected);
    assert_eq!(report.refused, 5, "{report:?}");
    check_dead_letters(&rabbit.drain(&dead), &messages, None);
    assert_eq!(rabbit.count(&queue), 0);
}

#[test]
fn nats_poison_reaches_the_dead_letter_with_its_reason_and_the_flow_goes_on() {
    // Bodies of 10 MiB need a server whose max_payload allows them.
    let Some(server) = PrivateNats::start("nats_poison_reaches_the_dead_letter") else {
        return;
    };
    let mut nats = Nats::connect_to(&server.url);
    let stream = nats.adopt_stream("PLANS");
    let subject = unique("plans");
    let dead = format!("{subject}-dead");
    let (messages, expected) = poison();
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = Arc::new(SqliteStore::open(dir.path().join("log.db")).unwrap());
    let options = JetStreamSourceOptions::default().with_dead_letter(&dead);
    let source = JetStreamSource::connect(&nats.url, &stream, &subject, options).unwrap();
    for (id, body, _) in &messages {
        nats.publish(&subject, body, Some(id));
    }
    let report = run_intake(Box::new(source), log.clone(), Duration::from_millis(700));
    assert_eq!(queued_ids(&*log), expected);
    assert_eq!(report.refused, 5, "{report:?}");
    check_dead_letters(
        &nats.read(&stream, &dead),
        &messages,
        Some(HEADER_MESSAGE_ID),
    );
    assert_eq!(nats.pending(&stream, "job-executor-intake"), 0);
}

#[test]
fn without_a_dead_letter_refused_messages_are_rejected_or_terminated() {
    let body = b"[1, 2".to_vec();
    if let Some(mut rabbit) = Rabbit::connect("amqp_without_a_dead_letter") {
        let queue = rabbit.queue("plans");
        rabbit.publish(&queue, &body, Some("bad"));
        rabbit.publish(&queue, &plan(None, "x"), Some("good"));
        let log: Arc<dyn Log> = Arc::new(MemoryStore::new());
        let source =
            AmqpSource::connect(&rabbit.url, &queue, AmqpSourceOptions::default()).unwrap();
        let report = run_intake(Box::new(source), log.clone(), Duration::from_millis(500));
        assert_eq!((report.submitted, report.refused), (1, 1));
        assert!(!report.refusals[0].dead_lettered);
        assert_eq!(rabbit.count(&queue), 0, "rejected without requeue");
    }
    if let Some(mut nats) = Nats::connect("nats_without_a_dead_letter") {
        let stream = nats.adopt_stream("PLANS");
        let subject = unique("plans");
        let log: Arc<dyn Log> = Arc::new(MemoryStore::new());
        let options = JetStreamSourceOptions::default().with_ack_wait(Duration::from_secs(1));
        let source = JetStreamSource::connect(&nats.url, &stream, &subject, options).unwrap();
        nats.publish(&subject, &body, Some("bad"));
        nats.publish(&subject, &plan(None, "x"), Some("good"));
        // Idle past the ack wait: a message not terminated would come back.
        let report = run_intake(Box::new(source), log.clone(), Duration::from_secs(2));
        assert_eq!((report.submitted, report.refused), (1, 1), "{report:?}");
        assert_eq!(
            nats.pending(&stream, "job-executor-intake"),
            0,
            "terminated"
        );
    }
}

/// Four ended jobs in a SQLite log: three completed, one failed.
fn ended_jobs(log: &Arc<SqliteStore>) -> Vec<Uuid> {
    let mut executor = JobExecutor::builder().store(log.clone()).build();
    executor.register_handler("noop", NoOpHandler);
    executor.register_handler("fail", FailingHandler::new("refused by the target"));
    (0..4)
        .map(|i| {
            let job_id = Uuid::new_v4();
            let kind = if i == 2 { "fail" } else { "noop" };
            let steps = [JobStep::new(0, "noop", "a"), JobStep::new(1, kind, "b")];
            executor
                .execute_job(job_id, Uuid::new_v4(), &steps, None, "ops")
                .unwrap();
            job_id
        })
        .collect()
}

/// What `job-executor replay` prints for the job, or — built without the
/// binary — what the library says it prints.
fn replay_output(db: &std::path::Path, log: &dyn EventStore, job_id: Uuid) -> Vec<u8> {
    let text = evidence_text(&replay(log, job_id).unwrap()).into_bytes();
    #[cfg(feature = "cli")]
    {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_job-executor"))
            .args(["replay", &job_id.to_string(), "--db"])
            .arg(db)
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout, text, "the library's text is the CLI's");
    }
    let _ = db;
    text
}

fn check_evidence(got: &[Got], jobs: &[Uuid], db: &std::path::Path, log: &dyn EventStore) {
    let ids: Vec<String> = got
        .iter()
        .map(|g| g.headers[HEADER_JOB_ID].clone())
        .collect();
    let expected: Vec<String> = jobs.iter().map(Uuid::to_string).collect();
    assert_eq!(ids, expected, "each job once, in the order they ended");
    for (message, job_id) in got.iter().zip(jobs) {
        let result = replay(log, *job_id).unwrap();
        let head = result.head.to_string();
        assert_eq!(message.headers[HEADER_HEAD], head);
        assert_eq!(
            message.headers[HEADER_FINAL_STATUS],
            result.final_status.as_str()
        );
        assert_eq!(
            message.message_id.as_deref(),
            Some(format!("{job_id}:{head}").as_str())
        );
        assert_eq!(message.body, replay_output(db, log, *job_id));
    }
    assert_eq!(got[2].headers[HEADER_FINAL_STATUS], "FAILED");
}

/// An outbox whose first `advance` fails, as a crash between the broker's
/// confirm and the cursor would.
struct CrashBeforeCursor {
    inner: Arc<ScanOutbox>,
    crashed: AtomicBool,
}

impl EvidenceOutbox for CrashBeforeCursor {
    fn ended_after(&self, position: u64, limit: usize) -> Result<Vec<EndedJob>, StoreError> {
        self.inner.ended_after(position, limit)
    }
    fn cursor(&self, name: &str) -> Result<u64, StoreError> {
        self.inner.cursor(name)
    }
    fn advance(&self, name: &str, position: u64) -> Result<(), StoreError> {
        if !self.crashed.swap(true, Ordering::Relaxed) {
            return Err(StoreError::InvalidAppend(
                "crashed before the cursor".into(),
            ));
        }
        self.inner.advance(name, position)
    }
}

fn publish_all(
    log: &Arc<SqliteStore>,
    outbox: Arc<dyn EvidenceOutbox>,
    sink: Box<dyn EvidenceSink>,
) -> Result<PublisherReport, BusError> {
    let options = PublisherOptions::default()
        .until_idle(Duration::from_millis(200))
        .with_backoff(quick_backoff());
    Publisher::new(log.clone(), outbox, sink, options).run()
}

/// Publishes four jobs, then two more through a publisher that crashes
/// before its cursor moves, then restarts: returns the jobs and the
/// second publisher's report.
fn publish_crash_and_restart(
    log: &Arc<SqliteStore>,
    sink: &mut dyn FnMut() -> Box<dyn EvidenceSink>,
) -> (Vec<Uuid>, Vec<Uuid>, PublisherReport) {
    let first = ended_jobs(log);
    let outbox = Arc::new(ScanOutbox::new(log.clone()));
    let report = publish_all(log, outbox.clone(), sink()).unwrap();
    assert_eq!(report.published, 4);
    let later = ended_jobs(log);
    let crashing = Arc::new(CrashBeforeCursor {
        inner: outbox.clone(),
        crashed: AtomicBool::new(false),
    });
    let error = publish_all(log, crashing, sink()).unwrap_err();
    assert!(
        error.to_string().contains("crashed before the cursor"),
        "{error}"
    );
    let restarted = publish_all(log, outbox.clone(), sink()).unwrap();
    assert_eq!(
        outbox.cursor("evidence").unwrap(),
        log.last_position().unwrap()
    );
    (first, later, restarted)
}

#[test]
fn amqp_evidence_goes_out_once_in_order_and_a_restart_resumes_from_the_cursor() {
    let Some(mut rabbit) = Rabbit::connect("amqp_evidence_goes_out") else {
        return;
    };
    let queue = rabbit.queue("evidence");
    let exchange = rabbit.exchange_to(&queue, "audit");
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("log.db");
    let log = Arc::new(SqliteStore::open(&db).unwrap());
    let url = rabbit.url.clone();
    let mut sink = || -> Box<dyn EvidenceSink> {
        Box::new(AmqpSink::connect(&url, &exchange, "audit").unwrap())
    };
    let (first, later, restarted) = publish_crash_and_restart(&log, &mut sink);
    assert_eq!(restarted.published, 4, "the unconfirmed tail, again");
    let got = rabbit.drain(&queue);
    check_evidence(&got[..4], &first, &db, &*log);
    // The tail went out twice, with the same ids: a consumer dedupes on them.
    assert_eq!(got.len(), 12);
    check_evidence(&got[4..8], &later, &db, &*log);
    check_evidence(&got[8..], &later, &db, &*log);
}

#[test]
fn nats_evidence_goes_out_once_in_order_and_a_restart_resumes_from_the_cursor() {
    let Some(mut nats) = Nats::connect("nats_evidence_goes_out") else {
        return;
    };
    let subject = unique("evidence");
    let stream = nats.create_stream("EVIDENCE", &subject);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("log.db");
    let log = Arc::new(SqliteStore::open(&db).unwrap());
    let url = nats.url.clone();
    let mut sink =
        || -> Box<dyn EvidenceSink> { Box::new(JetStreamSink::connect(&url, &subject).unwrap()) };
    let (first, later, restarted) = publish_crash_and_restart(&log, &mut sink);
    assert_eq!(restarted.published, 4, "confirmed again, as duplicates");
    let got = nats.read(&stream, &subject);
    // The stream's duplicate window dropped the republished tail.
    assert_eq!(got.len(), 8);
    check_evidence(&got[..4], &first, &db, &*log);
    check_evidence(&got[4..], &later, &db, &*log);
}

#[test]
fn an_unreachable_broker_is_reported_at_once() {
    let started = Instant::now();
    let amqp = AmqpSource::connect(
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "q",
        Default::default(),
    );
    assert!(
        matches!(amqp, Err(BusError::Disconnected { .. })),
        "{amqp:?}"
    );
    let nats = JetStreamSink::connect("nats://127.0.0.1:1", "s");
    assert!(
        matches!(nats, Err(BusError::Disconnected { .. })),
        "{nats:?}"
    );
    let message = nats.unwrap_err().to_string();
    assert!(
        message.starts_with("nats://127.0.0.1:1: disconnected"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn amqp_intake_reconnects_when_its_consumer_is_cancelled() {
    let Some(mut rabbit) = Rabbit::connect("amqp_intake_reconnects") else {
        return;
    };
    let queue = rabbit.queue("plans");
    let log: Arc<dyn Log> = Arc::new(MemoryStore::new());
    let source = AmqpSource::connect(&rabbit.url, &queue, Default::default()).unwrap();
    let sink: Arc<dyn JobSink> = Arc::new(QueueSink::new(log.clone()));
    let options = IntakeOptions::default().with_backoff(quick_backoff());
    let mut intake = Intake::new(Box::new(source), sink, options);
    let stop = intake.stop_flag();
    let running = std::thread::spawn(move || intake.run());
    let publish_and_wait = |rabbit: &Rabbit, n: usize| {
        for _ in 0..3 {
            rabbit.publish(&queue, &plan(Some(Uuid::new_v4()), "x"), None);
        }
        wait_for(|| log.queued().unwrap().len() == n);
    };
    publish_and_wait(&rabbit, 3);
    // Deleting the queue cancels the consumer; the intake declares it
    // again when it reconnects.
    rabbit.delete_queue(&queue);
    wait_for(|| rabbit.exists(&queue));
    publish_and_wait(&rabbit, 6);
    stop.store(true, Ordering::Relaxed);
    let report = running.join().unwrap().unwrap();
    assert_eq!(report.submitted, 6);
    assert!(report.reconnects >= 1, "{report:?}");
}

#[test]
fn nats_intake_rides_out_a_server_restart() {
    let Some(mut server) = PrivateNats::start("nats_ride_out_a_server_restart") else {
        return;
    };
    let mut nats = Nats::connect_to(&server.url);
    let stream = nats.adopt_stream("PLANS");
    let subject = unique("plans");
    let log: Arc<dyn Log> = Arc::new(MemoryStore::new());
    let source =
        JetStreamSource::connect(&server.url, &stream, &subject, Default::default()).unwrap();
    let sink: Arc<dyn JobSink> = Arc::new(QueueSink::new(log.clone()));
    let options = IntakeOptions::default().with_backoff(quick_backoff());
    let mut intake = Intake::new(Box::new(source), sink, options);
    let stop = intake.stop_flag();
    let running = std::thread::spawn(move || intake.run());
    let ids: Vec<Uuid> = (0..6).map(|_| Uuid::new_v4()).collect();
    for id in &ids[..3] {
        nats.publish(&subject, &plan(Some(*id), "x"), Some(&id.to_string()));
    }
    wait_for(|| log.queued().unwrap().len() == 3);
    server.restart();
    let nats = Nats::connect_to(&server.url);
    for id in &ids[3..] {
        nats.publish(&subject, &plan(Some(*id), "x"), Some(&id.to_string()));
    }
    wait_for(|| log.queued().unwrap().len() == 6);
    stop.store(true, Ordering::Relaxed);
    let report = running.join().unwrap().unwrap();
    assert_eq!(report.submitted, 6, "{report:?}");
    assert_eq!(queued_ids(&*log), ids.into_iter().collect());
}

/// Waits up to 30 s for `done`.
fn wait_for(done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
