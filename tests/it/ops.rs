//! Running a fleet: who ran each part of a job (claims in the log, the
//! evidence and the report), metrics scraped over HTTP and parsed by the
//! Prometheus project's own parser, probes that follow the store, and the
//! JSON listings checked against the events.
//!
//! The parser is Python's `prometheus_client` (`python3`, or `JE_PYTHON`);
//! without it the scrape tests say `SKIPPED`, and fail when
//! `JE_REQUIRE_INTEROP=1` or `CI` is set.

use crate::common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use job_executor::events::{Event, JobClaimed};
use job_executor::executor::RunControl;
use job_executor::metrics::Metrics;
use job_executor::store::{EventStore, MemoryStore, QueuedJob};
use job_executor::{JobExecutor, JobStep, NoOpHandler, StepOutput};
use serde_json::{Value, json};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_job-executor");

/// A job whose step was left in doubt after a claim: its events, and who
/// its evidence says recorded the step's outcome.
fn take_up_in_doubt(
    take_up: impl FnOnce(&JobExecutor, Uuid) -> job_executor::ExecutionResult,
) -> (Vec<&'static str>, Vec<Event>, Value) {
    let store = Arc::new(MemoryStore::new());
    let job_id = Uuid::new_v4();
    let stopped = [
        common::started_of(2, "ok"),
        common::claimed("a", 1, None),
        common::step_started(0),
    ];
    store.append(&common::records(job_id, &stopped)).unwrap();
    let mut executor = JobExecutor::builder().store(store.clone()).build();
    executor.register_handler("ok", NoOpHandler);
    let result = take_up(&executor, job_id);
    let events: Vec<Event> = store
        .load_job(job_id)
        .unwrap()
        .iter()
        .map(|r| r.decode().unwrap().event)
        .collect();
    let kinds = events.iter().map(Event::kind).collect();
    let evidence = job_executor::execution_result_to_evidence(&result);
    assert_eq!(
        evidence,
        executor
            .replay(job_id)
            .map(|r| job_executor::execution_result_to_evidence(&r))
            .unwrap()
    );
    (kinds, events, evidence)
}

/// A worker's take-up of a step in doubt commits the step's interrupted
/// outcome, then its claim naming that step, then the halt: no claim comes
/// between a step's start and its outcome (EXEC-002), and the evidence says
/// the step was started by the first claim and recorded by the second.
#[test]
fn a_takeover_records_the_step_in_doubt_before_its_claim() {
    let (kinds, events, evidence) = take_up_in_doubt(|executor, job_id| {
        let job = QueuedJob::new(job_id, Uuid::nil(), Vec::new(), "tester");
        let control = RunControl::new().claimed(JobClaimed {
            worker_id: "b".into(),
            host: "h".into(),
            epoch: 2,
            taken_over_from: Some("a".into()),
            recorded_outcome: None,
        });
        executor.take_up(&job, "b", control).unwrap()
    });
    assert_eq!(kinds, common::TAKEN_OVER_KINDS);
    match &events[4] {
        Event::JobClaimed(c) => assert_eq!((c.epoch, c.recorded_outcome), (2, Some(0))),
        other => panic!("{other:?}"),
    }
    let step = &evidence["step_results"][0];
    assert_eq!(step["failure_kind"], "interrupted");
    assert_eq!(step["started_by"], json!({"worker_id": "a", "epoch": 1}));
    assert_eq!(step["recorded_by"], json!({"worker_id": "b", "epoch": 2}));
    assert_eq!(evidence["claims"][1]["recorded_outcome"], 0);
}

/// `recover` claims nothing: the interrupted outcome it records is
/// attributed to no claim, not to the claim the step ran under.
#[test]
fn recover_records_a_step_in_doubt_under_no_claim() {
    let (kinds, _, evidence) = take_up_in_doubt(|executor, job_id| {
        executor.recover().unwrap();
        executor.replay(job_id).unwrap()
    });
    assert_eq!(
        kinds,
        [
            "JobStarted",
            "JobClaimed",
            "StepStarted",
            "StepFailed",
            "JobHalted"
        ]
    );
    let step = &evidence["step_results"][0];
    assert_eq!(step["failure_kind"], "interrupted");
    assert_eq!(step["started_by"], json!({"worker_id": "a", "epoch": 1}));
    assert_eq!(step["recorded_by"], Value::Null);
}

/// An embedded executor counts into the metrics it was given; one given
/// none has none.
#[test]
fn an_embedded_executor_counts_into_its_metrics() {
    let metrics = Arc::new(Metrics::new());
    let mut executor = JobExecutor::builder().metrics(metrics.clone()).build();
    executor.register_handler("ok", NoOpHandler);
    executor.register_handler("bad", |_: &JobStep, _: &job_executor::ExecutionContext| {
        StepOutput::failed("no")
    });
    let plan = |types: &[&str]| -> Vec<JobStep> {
        let steps = types.iter().enumerate();
        steps
            .map(|(i, t)| JobStep::new(i as u32, *t, "x"))
            .collect()
    };
    for types in [&["ok", "ok"][..], &["ok", "bad", "ok"], &["ok"]] {
        let _ = executor
            .execute_job(Uuid::new_v4(), Uuid::nil(), &plan(types), None, "t")
            .unwrap();
    }
    let text = metrics.encode_text();
    for line in [
        r#"job_executor_jobs_total{status="completed"} 2"#,
        r#"job_executor_jobs_total{status="failed"} 1"#,
        r#"job_executor_jobs_total{status="cancelled"} 0"#,
        r#"job_executor_steps_total{step_type="ok",status="completed"} 4"#,
        r#"job_executor_steps_total{step_type="bad",status="failed"} 1"#,
        r#"job_executor_step_duration_seconds_count{step_type="ok"} 4"#,
        // Three appends a two-step job: start, outcome with the next start,
        // outcome with the end; the failed job's third carries its halt.
        "job_executor_append_duration_seconds_count 8",
        "job_executor_jobs_running 0",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    assert!(JobExecutor::new().metrics().is_none());
}

/// A worker counts each lease it renews into its executor's metrics.
#[test]
fn a_worker_counts_the_leases_it_renews() {
    use job_executor::store::{Log, MemoryStore, QueuedJob};
    use job_executor::worker::{Worker, WorkerOptions};
    let log: Arc<dyn Log> = Arc::new(MemoryStore::new());
    let steps = vec![JobStep::new(0, "slow", "x")];
    job_executor::worker::submit(
        &*log,
        &QueuedJob::new(Uuid::new_v4(), Uuid::nil(), steps, "t"),
    )
    .unwrap();
    let metrics = Arc::new(Metrics::new());
    let options = WorkerOptions::default()
        .with_lease(Duration::from_millis(300))
        .until_idle();
    let mut worker = Worker::with(log, options, |b| b.metrics(metrics.clone()));
    worker.register_handler("slow", |_: &JobStep, _: &job_executor::ExecutionContext| {
        std::thread::sleep(Duration::from_millis(700));
        StepOutput::succeeded(json!({}))
    });
    let report = worker.run().unwrap();
    assert_eq!(report.finished, 1);
    // Renewed every 100 ms for 700 ms, give or take the scheduler.
    let renewals = metrics
        .encode_text()
        .lines()
        .find_map(|l| l.strip_prefix("job_executor_lease_renewals_total "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap();
    assert!((3..=8).contains(&renewals), "{renewals} renewals");
}

// ------------------------------------------------------------ helpers

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn cli(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn write_plan(dir: &Path, name: &str, plan: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, plan.to_string()).unwrap();
    path.display().to_string()
}

fn submit(dir: &Path, db: &str, plan: &Value, name: &str) -> Uuid {
    let path = write_plan(dir, name, plan);
    let out = cli(dir, &["submit", &path, "--db", db]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().parse().unwrap()
}

/// A plan of steps of these types.
fn plan_of(types: &[&str]) -> Value {
    let steps: Vec<Value> = types
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"step_index": i, "step_type": t, "target": "x"}))
        .collect();
    json!({"contract_id": Uuid::nil(), "steps": steps})
}

/// A worker process serving its metrics on a port of its own choosing,
/// read from its log; its stderr is kept.
struct Served {
    child: Child,
    addr: String,
    stderr: Arc<Mutex<String>>,
}

impl Served {
    fn start(dir: &Path, db: &str, id: &str, lease: &str, more: &[&str]) -> Served {
        let mut args = vec!["worker", "--db", db, "--worker-id", id];
        args.extend(["--lease-seconds", lease, "--metrics-addr", "127.0.0.1:0"]);
        args.extend(more);
        let mut child = Command::new(BIN)
            .args(&args)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut addr = None;
        for line in lines.by_ref() {
            let line = line.unwrap();
            stderr.lock().unwrap().push_str(&format!("{line}\n"));
            if let Some(at) = line.split("addr=").nth(1) {
                addr = Some(at.trim().to_owned());
                break;
            }
        }
        let kept = stderr.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                kept.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        let addr = addr.unwrap_or_else(|| panic!("no address in {}", stderr.lock().unwrap()));
        Served {
            child,
            addr,
            stderr,
        }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// SIGTERM, then its exit and its stdout.
    fn stop(mut self) -> String {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let status = self.child.wait().unwrap();
        assert!(
            status.success(),
            "{status}: {}",
            self.stderr.lock().unwrap()
        );
        out
    }
}

/// GET `path` of `addr`: the status code and the body.
fn get(addr: &str, path: &str, accept: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

fn interop_required() -> bool {
    std::env::var("JE_REQUIRE_INTEROP").is_ok_and(|v| v == "1")
        || std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// The Python with `prometheus_client`, or `None` (said loudly) when there
/// is none and it is not required.
fn python(test: &str) -> Option<String> {
    let python = std::env::var("JE_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import prometheus_client"])
        .output();
    if probe.as_ref().is_ok_and(|out| out.status.success()) {
        return Some(python);
    }
    assert!(
        !interop_required(),
        "JE_REQUIRE_INTEROP=1 or CI, but {python} cannot import prometheus_client"
    );
    eprintln!(
        "SKIPPED: {test}: {python} cannot import prometheus_client; `pip install prometheus-client` or set JE_PYTHON (JE_REQUIRE_INTEROP=1 makes this a failure)"
    );
    None
}

/// A sample's name and labels, as the parser gave them.
type Samples = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// `exposition` parsed by `prometheus_client`'s parser for `format`
/// (`prometheus` or `openmetrics`).
fn parse(python: &str, format: &str, exposition: &str) -> Samples {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/metrics.py");
    let mut child = Command::new(python)
        .args([script, format])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the {format} parser refused:\n{}\n{exposition}",
        text(&out.stderr)
    );
    let samples: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&out.stdout).unwrap();
    samples
        .into_iter()
        .map(|(name, labels, value)| ((name, labels), value))
        .collect()
}

/// The value of sample `name{labels}`; 0 when absent (a family with no
/// member yet).
fn value(samples: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let labels = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .get(&(name.to_owned(), labels))
        .copied()
        .unwrap_or(0.0)
}

/// Waits until `done` holds, for at most `seconds`.
fn wait_for(seconds: u64, what: &str, mut done: impl FnMut() -> bool) {
    let give_up = Instant::now() + Duration::from_secs(seconds);
    while !done() {
        assert!(Instant::now() < give_up, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The job's events, as `events` prints them.
fn events(dir: &Path, db: &str, job: Uuid) -> Vec<Value> {
    let out = cli(dir, &["events", &job.to_string(), "--db", db]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

// ------------------------------------------- a known run, scraped

/// A sample's name, labels and expected value.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// What the run below does, on the rescuer: 3 jobs complete, 1 fails on a
/// step with no handler, and 1 is taken over from a zombie with its step in
/// doubt (recorded interrupted: it fails too).
fn check_rescuer(samples: &Samples) {
    let expected: [Expected; 17] = [
        ("job_executor_jobs_total", &[("status", "completed")], 3.0),
        ("job_executor_jobs_total", &[("status", "failed")], 2.0),
        ("job_executor_jobs_total", &[("status", "cancelled")], 0.0),
        (
            "job_executor_steps_total",
            &[("step_type", "capability_enable"), ("status", "completed")],
            4.0,
        ),
        (
            "job_executor_steps_total",
            &[
                ("step_type", "configuration_change"),
                ("status", "completed"),
            ],
            3.0,
        ),
        (
            "job_executor_steps_total",
            &[("step_type", "reindex"), ("status", "failed")],
            1.0,
        ),
        (
            "job_executor_steps_total",
            &[("step_type", "command"), ("status", "failed")],
            1.0,
        ),
        (
            "job_executor_steps_total",
            &[("step_type", "capability_enable"), ("status", "failed")],
            0.0,
        ),
        // Steps started here: the interrupted one started elsewhere.
        (
            "job_executor_step_duration_seconds_count",
            &[("step_type", "capability_enable")],
            4.0,
        ),
        (
            "job_executor_step_duration_seconds_count",
            &[("step_type", "command")],
            0.0,
        ),
        // Three appends for each job run here, one for the takeover's
        // claim, interrupted outcome and halt.
        ("job_executor_append_duration_seconds_count", &[], 13.0),
        ("job_executor_jobs_running", &[], 0.0),
        ("job_executor_takeovers_total", &[], 1.0),
        ("job_executor_fenced_appends_total", &[], 0.0),
        // A lease of 60 s is renewed every 20 s: never, in this run.
        ("job_executor_lease_renewals_total", &[], 0.0),
        ("job_executor_queue_jobs", &[("status", "submitted")], 0.0),
        ("job_executor_queue_jobs", &[("status", "running")], 0.0),
    ];
    for (name, labels, want) in expected {
        assert_eq!(value(samples, name, labels), want, "{name}{labels:?}");
    }
    let version = [("version", job_executor::EXECUTOR_VERSION)];
    assert_eq!(value(samples, "job_executor_build_info", &version), 1.0);
    assert_eq!(
        value(
            samples,
            "job_executor_queue_oldest_submitted_age_seconds",
            &[]
        ),
        0.0
    );
}

/// The taken-over job names both workers: in its events, its evidence and
/// its report page.
fn check_attribution(dir: &Path, db: &str, job: Uuid) {
    let events = events(dir, db, job);
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, common::TAKEN_OVER_KINDS);
    // The takeover's commit: the step in doubt recorded interrupted, then
    // the claim that says it recorded it, then the halt.
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    assert_eq!(events[1]["payload"]["worker_id"], "zombie");
    assert_eq!(events[1]["payload"]["taken_over_from"], Value::Null);
    assert!(events[1]["payload"].get("recorded_outcome").is_none());
    assert_eq!(events[3]["payload"]["failure"]["kind"], "interrupted");
    assert_eq!(events[4]["payload"]["worker_id"], "rescuer");
    assert_eq!(events[4]["payload"]["taken_over_from"], "zombie");
    assert_eq!(events[4]["payload"]["recorded_outcome"], 0);
    assert!(events[4]["payload"]["epoch"].as_u64() > events[1]["payload"]["epoch"].as_u64());
    let out = cli(dir, &["replay", &job.to_string(), "--db", db]);
    let evidence: Value = serde_json::from_slice(&out.stdout).unwrap();
    let step = &evidence["step_results"][0];
    assert_eq!(step["started_by"]["worker_id"], "zombie");
    assert_eq!(step["recorded_by"]["worker_id"], "rescuer");
    assert_eq!(step["failure_kind"], "interrupted");
    let claims: Vec<&str> = evidence["claims"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["worker_id"].as_str().unwrap())
        .collect();
    assert_eq!(claims, ["zombie", "rescuer"]);
    assert_eq!(evidence["claims"][0]["recorded_outcome"], Value::Null);
    assert_eq!(evidence["claims"][1]["recorded_outcome"], 0);
    let out = cli(dir, &["report", &job.to_string(), "--db", db]);
    let page = text(&out.stdout);
    assert!(page.contains("Taken over"), "{page}");
    assert!(
        page.contains("started by zombie (epoch 1), outcome recorded by rescuer (epoch 2)"),
        "{page}"
    );
}

#[test]
fn metrics_after_a_known_run_with_a_takeover() {
    let Some(python) = python("metrics_after_a_known_run_with_a_takeover") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("fleet.db").display().to_string();
    let zombie = Served::start(d, &db, "zombie", "1", &["--concurrency", "1"]);
    let slow = json!({"contract_id": Uuid::nil(), "steps": [
        {"step_index": 0, "step_type": "command", "target": "slow",
         "parameters": {"argv": ["sh", "-c", "sleep 2.5"]}, "timeout_seconds": 60},
        {"step_index": 1, "step_type": "capability_enable", "target": "next"}]});
    let victim = submit(d, &db, &slow, "slow.json");
    wait_for(20, "the slow step to start", || {
        let out = cli(d, &["events", &victim.to_string(), "--db", &db]);
        text(&out.stdout).lines().count() >= 3
    });
    zombie.signal(nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1500));
    let ok = plan_of(&["capability_enable", "configuration_change"]);
    for n in 0..3 {
        submit(d, &db, &ok, &format!("ok-{n}.json"));
    }
    submit(
        d,
        &db,
        &plan_of(&["capability_enable", "reindex"]),
        "bad.json",
    );
    let rescuer = Served::start(d, &db, "rescuer", "60", &["--concurrency", "2"]);
    wait_for(30, "every job to end", || {
        let out = cli(d, &["jobs", "--db", &db, "--json"]);
        let ended = text(&out.stdout)
            .lines()
            .filter(|l| l.contains("\"ended_at\":\""))
            .count();
        ended == 5
    });
    zombie.signal(nix::sys::signal::Signal::SIGCONT);
    let accept = "application/openmetrics-text; version=1.0.0";
    wait_for(20, "the zombie's appends to be refused", || {
        let samples = parse(
            &python,
            "openmetrics",
            &get(&zombie.addr, "/metrics", accept).1,
        );
        value(&samples, "job_executor_fenced_appends_total", &[]) > 1.0
    });
    for (format, accept) in [("prometheus", "text/plain"), ("openmetrics", accept)] {
        let (status, body) = get(&rescuer.addr, "/metrics", accept);
        assert_eq!(status, 200);
        check_rescuer(&parse(&python, format, &body));
    }
    // The zombie: its outcome and then the outcome alone, both refused.
    let samples = parse(
        &python,
        "prometheus",
        &get(&zombie.addr, "/metrics", "*/*").1,
    );
    assert_eq!(
        value(&samples, "job_executor_fenced_appends_total", &[]),
        2.0
    );
    assert_eq!(
        value(&samples, "job_executor_jobs_total", &[("status", "failed")]),
        0.0
    );
    // Its one renewal after waking found the lease taken over: none counted.
    assert_eq!(
        value(&samples, "job_executor_lease_renewals_total", &[]),
        0.0
    );
    assert_eq!(
        get(&rescuer.addr, "/readyz", "*/*"),
        (200, "ok\n".to_owned())
    );
    assert_eq!(
        get(&rescuer.addr, "/healthz", "*/*"),
        (200, "ok\n".to_owned())
    );
    check_attribution(d, &db, victim);
    assert!(rescuer.stderr.lock().unwrap().contains("took job"));
    let _ = rescuer.stop();
    assert!(zombie.stop().contains("1 taken over by others"));
}

// ------------------------------------------- listings against events

/// What `jobs --json` must say of a job, computed from its events alone.
fn row_from_events(events: &[Value]) -> Value {
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let count = |kind: &str| kinds.iter().filter(|k| **k == kind).count();
    let last = events.last().unwrap();
    let (status, reason) = match *kinds.last().unwrap() {
        "JobCompleted" => ("COMPLETED", json!("All steps completed successfully")),
        "JobHalted" => {
            let failed = events.iter().find(|e| e["kind"] == "StepFailed").unwrap();
            let message = failed["payload"]["failure"]["message"].as_str().unwrap();
            let step = &last["payload"]["step_index"];
            ("FAILED", json!(format!("Step {step} failed: {message}")))
        }
        other => panic!("unexpected last event {other}"),
    };
    json!({
        "job_id": events[0]["job_id"],
        "status": status,
        "steps_done": count("StepSucceeded") + count("StepFailed"),
        "steps_planned": events[0]["payload"]["plan"].as_array().unwrap().len(),
        "started_at": events[0]["recorded_at"],
        "ended_at": last["recorded_at"],
        "owner": null,
        "final_reason": reason,
    })
}

fn json_lines(out: &std::process::Output) -> Vec<Value> {
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Four jobs run by a worker (one fails), one claimed and not started, one
/// waiting: `jobs --json` and `stats --json` say what the events say.
fn listings_agree_with_events(d: &Path, db: &str) {
    let ok = plan_of(&["capability_enable", "configuration_change"]);
    let mut ran: Vec<Uuid> = (0..3)
        .map(|n| submit(d, db, &ok, &format!("ok-{n}.json")))
        .collect();
    ran.push(submit(
        d,
        db,
        &plan_of(&["capability_enable", "reindex"]),
        "bad.json",
    ));
    // One slot: the jobs start in the order they were submitted, which is
    // the order `jobs` lists them in.
    let args = ["worker", "--db", db, "--until-idle", "--worker-id", "w"];
    let out = cli(d, &[&args[..], &["--concurrency", "1"]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let held = submit(d, db, &ok, "held.json");
    let waiting = submit(d, db, &ok, "waiting.json");
    let log = job_executor::store::open(
        &job_executor::store::Location::parse(db),
        &job_executor::store::OpenOptions::default(),
    )
    .unwrap();
    let claim = log
        .claim("holder", Duration::from_secs(60))
        .unwrap()
        .unwrap();
    assert_eq!(claim.fence.job_id, held);

    let rows = json_lines(&cli(d, &["jobs", "--db", db, "--json"]));
    assert_eq!(rows.len(), 6);
    let mut total_events = 0;
    for (row, job) in rows.iter().zip(&ran) {
        let events = events(d, db, *job);
        total_events += events.len();
        assert_eq!(*row, row_from_events(&events));
    }
    let queued = |job: Uuid, status: &str, owner: Value| {
        json!({"job_id": job.to_string(), "status": status, "steps_done": 0, "steps_planned": 2,
               "started_at": null, "ended_at": null, "owner": owner, "final_reason": null})
    };
    assert_eq!(rows[4], queued(held, "RUNNING", json!("holder")));
    assert_eq!(rows[5], queued(waiting, "SUBMITTED", Value::Null));

    let failed = json_lines(&cli(
        d,
        &["jobs", "--db", db, "--json", "--status", "failed"],
    ));
    assert_eq!(failed, [rows[3].clone()]);
    let first = json_lines(&cli(d, &["jobs", "--db", db, "--json", "--limit", "2"]));
    assert_eq!(first, rows[..2]);
    let since = rows[3]["started_at"].as_str().unwrap();
    let recent = json_lines(&cli(d, &["jobs", "--db", db, "--json", "--since", since]));
    let expected: Vec<&Value> = rows
        .iter()
        .filter(|r| r["started_at"].as_str().is_none_or(|at| at >= since))
        .collect();
    assert_eq!(recent.iter().collect::<Vec<_>>(), expected);

    let stats = &json_lines(&cli(d, &["stats", "--db", db, "--json"]))[0];
    let by_status = json!({"SUBMITTED": 1, "RUNNING": 1, "COMPLETED": 3, "FAILED": 1,
                           "CANCELLED": 0, "INVALID": 0});
    assert_eq!(stats["jobs_by_status"], by_status);
    assert_eq!(stats["running_by_owner"], json!({"holder": 1}));
    assert_eq!(stats["log"], json!({"events": total_events, "jobs": 4}));
    assert!(stats["oldest_submitted_age_seconds"].as_f64().unwrap() >= 0.0);
    let shown = text(&cli(d, &["stats", "--db", db]).stdout);
    assert!(shown.contains("running by owner: holder 1"), "{shown}");
}

#[test]
fn jobs_json_and_stats_agree_with_events_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("list.db").display().to_string();
    listings_agree_with_events(dir.path(), &db);
}

#[test]
fn jobs_json_and_stats_agree_with_events_on_postgres() {
    let Some(schema) = common::pg::schema("listings") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    listings_agree_with_events(dir.path(), &schema.url());
}

/// A run without a worker records no claim: its evidence has none of the
/// keys that name workers.
#[test]
fn a_job_run_without_a_worker_has_no_claim() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plan = write_plan(d, "p.json", &plan_of(&["capability_enable"]));
    let out = cli(d, &["run", &plan, "--db", "r.db", "--deterministic"]);
    let evidence: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(evidence.get("claims").is_none());
    assert!(evidence["step_results"][0].get("started_by").is_none());
    let job: Uuid = evidence["job_id"].as_str().unwrap().parse().unwrap();
    assert!(
        events(d, "r.db", job)
            .iter()
            .all(|e| e["kind"] != "JobClaimed")
    );
}

// ------------------------------------------- readiness through a proxy

/// A TCP proxy the test controls, in front of the test's PostgreSQL
/// server: down, it cuts every connection and refuses new ones.
struct Proxy {
    addr: String,
    up: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let up = Arc::new(AtomicBool::new(true));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (is_up, conns) = (up.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                if !is_up.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let mut kept = conns.lock().unwrap();
                kept.push(client.try_clone().unwrap());
                kept.push(server.try_clone().unwrap());
                pump(client.try_clone().unwrap(), server.try_clone().unwrap());
                pump(server, client);
            }
        });
        Proxy { addr, up, open }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            for stream in self.open.lock().unwrap().drain(..) {
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// Copies `from` to `to` on a thread of its own, until either closes.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

#[test]
fn readyz_turns_503_while_the_store_is_unreachable_and_200_when_back() {
    let Some(schema) = common::pg::schema("readyz") else {
        return;
    };
    let server = common::pg::server_url();
    let host_port = server
        .split('@')
        .nth(1)
        .and_then(|s| s.split('/').next())
        .unwrap();
    let proxy = Proxy::start(host_port.to_owned());
    let db = schema.url().replacen(host_port, &proxy.addr, 1);
    let dir = tempfile::tempdir().unwrap();
    let worker = Served::start(dir.path(), &db, "probed", "1", &[]);
    let ready = || get(&worker.addr, "/readyz", "*/*");
    wait_for(20, "ready", || ready().0 == 200);
    proxy.set_up(false);
    wait_for(20, "not ready", || ready().0 == 503);
    let (_, reason) = ready();
    assert!(reason.contains("the store has not answered"), "{reason}");
    assert_eq!(get(&worker.addr, "/healthz", "*/*").0, 200);
    proxy.set_up(true);
    wait_for(30, "ready again", || ready().0 == 200);
    let _ = worker.stop();
}

/// On SQLite the store stops answering when another process holds the
/// file's write lock past the busy timeout (5 s): every claim waits it out
/// and fails, so readiness turns 503 once a lease (1 s) has passed without
/// an answer, and names the error; the lock let go, it turns 200 again.
#[test]
fn readyz_on_sqlite_turns_503_while_the_write_lock_is_held_and_200_when_free() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ready.db");
    let worker = Served::start(dir.path(), &db.display().to_string(), "probed", "1", &[]);
    let ready = || get(&worker.addr, "/readyz", "*/*");
    wait_for(20, "ready", || ready().0 == 200);
    let holder = rusqlite::Connection::open(&db).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    wait_for(20, "not ready, with the store's error", || {
        let (status, reason) = ready();
        status == 503 && reason.contains("last error")
    });
    let (_, reason) = ready();
    assert!(
        reason.contains("the store has not answered for"),
        "{reason}"
    );
    assert!(
        reason.contains("locked") || reason.contains("busy"),
        "{reason}"
    );
    assert_eq!(get(&worker.addr, "/healthz", "*/*").0, 200);
    holder.execute_batch("COMMIT").unwrap();
    drop(holder);
    wait_for(20, "ready again", || ready().0 == 200);
    let _ = worker.stop();
}
