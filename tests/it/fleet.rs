//! The engine as a fleet: every command on both stores, logs copied between
//! them, and workers that are killed, paused and restarted — with every
//! step still run at most once.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg::{self, PgSchema};
use job_executor::events::Event;
use job_executor::store::{Location, Log, OpenOptions, QueuedJob, open};
use job_executor::worker::{Worker, WorkerOptions, submit};
use job_executor::{ExecutionContext, JobExecutor, JobStatus, JobStep, StepOutput};
use serde_json::{Value, json};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_job-executor");

/// Where a test's log lives: a SQLite file, or a schema on the test server.
enum Db {
    File(PathBuf),
    Pg(PgSchema),
}

impl Db {
    fn arg(&self) -> String {
        match self {
            Db::File(path) => path.display().to_string(),
            Db::Pg(schema) => schema.url(),
        }
    }

    fn open(&self) -> Arc<dyn Log> {
        open(&Location::parse(&self.arg()), &OpenOptions::default()).unwrap()
    }

    fn name(&self) -> &'static str {
        match self {
            Db::File(_) => "sqlite",
            Db::Pg(_) => "postgres",
        }
    }
}

/// A SQLite file in `dir`, and a PostgreSQL schema when there is a server.
fn both(dir: &Path, test: &str) -> Vec<Db> {
    let mut dbs = vec![Db::File(dir.join(format!("{test}.db")))];
    dbs.extend(pg::schema(test).map(Db::Pg));
    dbs
}

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write(dir: &Path, name: &str, value: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
    path.display().to_string()
}

/// A command, as shown, and what it answered: exit code, stdout, stderr.
type Said = (Vec<String>, Option<i32>, String, String);

/// The files of the session below, in `d`: two plans (job a completes, job
/// b fails) and a key file.
fn session_files(d: &Path) -> (String, String, String) {
    let plans = [
        json!({"job_id": "00000000-0000-0000-0000-00000000000a", "contract_id": Uuid::nil(),
               "steps": [{"step_index": 0, "step_type": "capability_enable", "target": "billing"},
                         {"step_index": 1, "step_type": "configuration_change", "target": "billing"}]}),
        json!({"job_id": "00000000-0000-0000-0000-00000000000b", "contract_id": Uuid::nil(),
               "steps": [{"step_index": 0, "step_type": "capability_enable", "target": "a"},
                         {"step_index": 1, "step_type": "reindex", "target": "b"}]}),
    ];
    let plan_a = write(d, "a.json", &plans[0]);
    let plan_b = write(d, "b.json", &plans[1]);
    let key = d.join("key");
    std::fs::write(&key, "a key of more than sixteen bytes\n").unwrap();
    (plan_a, plan_b, key.display().to_string())
}

/// Runs each command of `session` in `d`; what each answered, with the
/// database `url` and the `bundle` path written as DB and BUNDLE.
fn transcript(d: &Path, session: &[Vec<&str>], url: &str, bundle: &str) -> Vec<Said> {
    session
        .iter()
        .map(|args| {
            let out = run(d, args);
            let shown: Vec<String> = args
                .iter()
                .map(|a| a.replace(url, "DB").replace(bundle, "BUNDLE"))
                .collect();
            (
                shown,
                out.status.code(),
                text(&out.stdout).replace(url, "DB"),
                text(&out.stderr).replace(url, "DB"),
            )
        })
        .collect()
}

/// The same session of commands on each store: every output and exit code
/// must be byte for byte the same on both.
#[test]
fn every_command_behaves_the_same_on_both_stores() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dbs = both(d, "same");
    let (plan_a, plan_b, key) = session_files(d);
    let a = "00000000-0000-0000-0000-00000000000a";
    let b = "00000000-0000-0000-0000-00000000000b";
    let mut transcripts: Vec<Vec<Said>> = Vec::new();
    for db in &dbs {
        let url = db.arg();
        let bundle = d.join(format!("bundle-{}.json", db.name()));
        let bundle = bundle.display().to_string();
        let session: Vec<Vec<&str>> = vec![
            vec![
                "run",
                &plan_a,
                "--db",
                &url,
                "--deterministic",
                "--key-file",
                &key,
            ],
            vec!["run", &plan_a, "--db", &url, "--deterministic"],
            vec!["run", &plan_b, "--db", &url, "--deterministic"],
            vec!["replay", a, "--db", &url],
            vec!["events", b, "--db", &url],
            vec!["jobs", "--db", &url],
            vec!["verify", "--db", &url],
            vec!["verify", "--db", &url, "--key-file", &key],
            vec!["export", a, "--db", &url, "--out", &bundle],
            vec!["verify", "--bundle", &bundle],
            vec!["recover", "--db", &url],
            vec!["cancel", a, "--db", &url],
            vec!["resume", b, "--db", &url],
            vec![
                "replay",
                "00000000-0000-0000-0000-0000000000ff",
                "--db",
                &url,
            ],
            vec!["report", b, "--db", &url],
        ];
        transcripts.push(transcript(d, &session, &url, &bundle));
    }
    let Some((first, rest)) = transcripts.split_first() else {
        return;
    };
    // On SQLite the session goes as it always has.
    let codes: Vec<Option<i32>> = first.iter().map(|(_, code, _, _)| *code).collect();
    assert_eq!(
        codes,
        [0, 2, 1, 0, 0, 0, 0, 1, 0, 0, 0, 2, 2, 2, 0]
            .map(Some)
            .to_vec(),
        "{first:#?}"
    );
    for other in rest {
        for (mine, theirs) in first.iter().zip(other) {
            assert_eq!(mine, theirs, "the stores differ on {:?}", mine.0);
        }
    }
}

/// A log copied from SQLite to PostgreSQL and back keeps every digest: the
/// same heads, the same evidence, and a bundle exported from PostgreSQL
/// verifies offline like any other.
#[test]
fn copy_keeps_every_head_between_the_stores() {
    let Some(schema) = pg::schema("copy") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema-v1/log.db");
    let source = d.join("source.db");
    std::fs::copy(fixture, &source).unwrap();
    let plan = write(
        d,
        "plan.json",
        &json!({"contract_id": Uuid::nil(), "steps": [
            {"step_index": 0, "step_type": "capability_enable", "target": "x"}]}),
    );
    assert!(
        run(d, &["run", &plan, "--db", source.to_str().unwrap()])
            .status
            .success()
    );
    let url = schema.url();
    let back = d.join("back.db");
    for (from, to) in [
        (source.display().to_string(), url.clone()),
        (url.clone(), back.display().to_string()),
    ] {
        let out = run(d, &["copy", "--from", &from, "--to", &to]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("copied 6 jobs"),
            "{}",
            text(&out.stdout)
        );
    }
    // Copying again is refused: a job is copied at most once.
    let again = run(d, &["copy", "--from", &url, "--to", back.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(2));
    let reader = |db: &str| open(&Location::parse(db), &OpenOptions::reader()).unwrap();
    let stores = [
        reader(source.to_str().unwrap()),
        reader(&url),
        reader(back.to_str().unwrap()),
    ];
    for job in stores[0].job_ids().unwrap() {
        let evidence: Vec<Value> = stores
            .iter()
            .map(|s| {
                job_executor::execution_result_to_evidence(
                    &job_executor::replay(&**s, job).unwrap(),
                )
            })
            .collect();
        assert_eq!(evidence[0], evidence[1], "job {job}");
        assert_eq!(evidence[1], evidence[2], "job {job}");
        export_then_verify_offline(d, &url, job);
    }
}

/// Exports `job`'s bundle from the log at `url` into `d`, and verifies it.
fn export_then_verify_offline(d: &Path, url: &str, job: Uuid) {
    let bundle = d.join(format!("{job}.json"));
    let out = run(
        d,
        &[
            "export",
            &job.to_string(),
            "--db",
            url,
            "--out",
            bundle.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(d, &["verify", "--bundle", bundle.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stdout));
}

struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn spawn_worker(dir: &Path, db: &str, id: &str, lease: &str, until_idle: bool) -> Child {
    let mut args = vec![
        "worker",
        "--db",
        db,
        "--worker-id",
        id,
        "--lease-seconds",
        lease,
        "--concurrency",
        "2",
    ];
    if until_idle {
        args.push("--until-idle");
    }
    Command::new(BIN)
        .args(&args)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A plan whose every step records that it ran (one line per run) and then
/// creates its marker exclusively: a step run twice would show both ways.
fn marker_plan(dir: &Path, job: usize, steps: usize) -> Value {
    let steps: Vec<Value> = (0..steps)
        .map(|i| {
            let name = format!("{job}-{i}");
            let script = format!(
                "echo ran >> runs/{name}; sleep 0.0$((RANDOM % 9 + 1)); set -C; : > markers/{name}"
            );
            json!({"step_index": i, "step_type": "command", "target": name,
                   "parameters": {"argv": ["bash", "-c", script], "cwd": dir.display().to_string()},
                   "timeout_seconds": 30})
        })
        .collect();
    json!({"contract_id": Uuid::nil(), "steps": steps})
}

/// Submits the marker plan of `job` (see [`marker_plan`]) to the log at
/// `url`; its job id.
fn submit_marker_plan(dir: &Path, url: &str, job: usize, steps: usize) -> String {
    let plan = write(
        dir,
        &format!("plan-{job}.json"),
        &marker_plan(dir, job, steps),
    );
    let out = run(dir, &["submit", &plan, "--db", url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

/// SIGTERM: the worker finishes its steps in flight and exits 0.
fn stop_politely(mut worker: Child, seed: u64) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = worker.wait().unwrap();
    assert!(
        status.success(),
        "seed {seed}: a worker did not stop cleanly: {status}"
    );
}

/// Every job of `ids` ended, completed or failed; how many steps were
/// recorded interrupted.
fn every_job_ended(log: &dyn Log, ids: &[String], seed: u64) -> usize {
    let mut interrupted = 0;
    for id in ids {
        let job: Uuid = id.parse().unwrap();
        let result = job_executor::replay(log, job).unwrap();
        assert!(
            matches!(
                result.final_status,
                JobStatus::Completed | JobStatus::Failed
            ),
            "seed {seed}: job {job} ended {:?}",
            result.final_status
        );
        interrupted += result
            .step_results
            .iter()
            .filter(|s| s.failure_kind == Some(job_executor::events::FailureKind::Interrupted))
            .count();
    }
    interrupted
}

/// Each step of the marker plans wrote one line: none ran twice.
fn each_step_ran_once(dir: &Path, seed: u64) {
    for entry in std::fs::read_dir(dir.join("runs")).unwrap() {
        let entry = entry.unwrap();
        let runs = std::fs::read_to_string(entry.path()).unwrap();
        assert_eq!(
            runs.lines().count(),
            1,
            "seed {seed}: step {:?} ran more than once",
            entry.file_name()
        );
    }
}

/// Three workers share one log; at random moments (seeded) one is killed
/// with SIGKILL and started again. In the end every job has ended, no step
/// ran twice, the log verifies, and its positions, read in order, skip
/// nothing.
fn failover(db: &Db, dir: &Path) {
    const JOBS: usize = 60;
    const STEPS: usize = 3;
    let seed = common::kill_seed("failover");
    let mut rng = Lcg(seed);
    std::fs::create_dir_all(dir.join("runs")).unwrap();
    std::fs::create_dir_all(dir.join("markers")).unwrap();
    let url = db.arg();
    let ids: Vec<String> = (0..JOBS)
        .map(|job| submit_marker_plan(dir, &url, job, STEPS))
        .collect();
    let lease = "1.5";
    let mut workers: Vec<Child> = (0..3)
        .map(|w| spawn_worker(dir, &url, &format!("w{w}"), lease, false))
        .collect();
    let mut kills = 0;
    let started = Instant::now();
    while kills < 12 && started.elapsed() < Duration::from_secs(40) {
        std::thread::sleep(Duration::from_millis(150 + rng.next() % 600));
        let victim = (rng.next() % 3) as usize;
        workers[victim].kill().unwrap();
        workers[victim].wait().unwrap();
        kills += 1;
        std::thread::sleep(Duration::from_millis(rng.next() % 300));
        workers[victim] = spawn_worker(dir, &url, &format!("w{victim}-{kills}"), lease, false);
    }
    // Let the survivors drain the queue, then stop them politely.
    let drain = spawn_worker(dir, &url, "drain", lease, true);
    let drained = drain.wait_with_output().unwrap();
    assert!(
        drained.status.success(),
        "seed {seed}: {}",
        text(&drained.stderr)
    );
    for worker in workers {
        stop_politely(worker, seed);
    }

    let log = db.open();
    let interrupted = every_job_ended(log.as_ref(), &ids, seed);
    assert!(
        log.queued().unwrap().is_empty(),
        "seed {seed}: jobs left in the queue"
    );
    each_step_ran_once(dir, seed);
    let out = run(dir, &["verify", "--db", &url]);
    assert!(out.status.success(), "seed {seed}: {}", text(&out.stdout));
    let mut positions = Vec::new();
    log.scan(&mut |_, row| positions.push(row.unwrap().position))
        .unwrap();
    positions.sort_unstable();
    let expected: Vec<u64> = (1..=positions.len() as u64).collect();
    assert_eq!(positions, expected, "seed {seed}: positions skip");
    eprintln!(
        "failover on {}: {kills} kills, {interrupted} steps recorded interrupted, {} events",
        db.name(),
        positions.len()
    );
}

#[test]
fn failover_with_kill_9_on_postgres() {
    let Some(schema) = pg::schema("failover") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    failover(&Db::Pg(schema), dir.path());
}

#[test]
fn failover_with_kill_9_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    failover(&Db::File(dir.path().join("fleet.db")), dir.path());
}

/// A worker paused (SIGSTOP) past its lease while a step runs: another takes
/// the job over and records the step interrupted; resumed (SIGCONT), the
/// first can append nothing, and the step ran once.
fn zombie(db: &Db, dir: &Path) {
    let url = db.arg();
    let plan = json!({"contract_id": Uuid::nil(), "steps": [
        {"step_index": 0, "step_type": "command", "target": "slow",
         "parameters": {"argv": ["sh", "-c", "echo ran >> ran; sleep 3"], "cwd": dir.display().to_string()},
         "timeout_seconds": 60},
        {"step_index": 1, "step_type": "capability_enable", "target": "next"}]});
    let plan = write(dir, "plan.json", &plan);
    let out = run(dir, &["submit", &plan, "--db", &url]);
    let job: Uuid = text(&out.stdout).trim().parse().unwrap();
    let zombie = spawn_worker(dir, &url, "zombie", "1", false);
    let log = db.open();
    let give_up = Instant::now() + Duration::from_secs(20);
    // JobStarted, JobClaimed, StepStarted.
    while log.last_seq(job).unwrap() < 3 && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(log.last_seq(job).unwrap(), 3, "the step never started");
    let pid = nix::unistd::Pid::from_raw(zombie.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // The lease ran out: another worker takes the job over.
    let rescuer = spawn_worker(dir, &url, "rescuer", "1", true)
        .wait_with_output()
        .unwrap();
    assert!(rescuer.status.success(), "{}", text(&rescuer.stderr));
    assert!(
        text(&rescuer.stderr).contains("took job"),
        "{}",
        text(&rescuer.stderr)
    );
    let after_takeover = log.load_job(job).unwrap();
    let kinds: Vec<&str> = after_takeover.iter().map(|r| r.kind.as_str()).collect();
    // The rescuer records the step in doubt first (EXEC-002: nothing but
    // its outcome follows a step's start), then its claim naming it.
    assert_eq!(kinds, common::TAKEN_OVER_KINDS);
    match after_takeover[3].decode().unwrap().event {
        Event::StepFailed(f) => {
            assert_eq!(
                f.failure.kind,
                job_executor::events::FailureKind::Interrupted
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    match after_takeover[4].decode().unwrap().event {
        Event::JobClaimed(c) => assert_eq!(c.recorded_outcome, Some(0)),
        other => panic!("unexpected {other:?}"),
    }
    // The zombie wakes up, finishes its step, and is refused.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    std::thread::sleep(Duration::from_millis(4000));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let zombie = zombie.wait_with_output().unwrap();
    assert!(zombie.status.success(), "{}", text(&zombie.stderr));
    assert!(
        text(&zombie.stdout).contains("1 taken over by others"),
        "{}",
        text(&zombie.stdout)
    );
    assert_eq!(
        log.load_job(job).unwrap(),
        after_takeover,
        "the zombie appended"
    );
    assert_eq!(std::fs::read_to_string(dir.join("ran")).unwrap(), "ran\n");
    let out = run(dir, &["verify", "--db", &url]);
    assert!(out.status.success(), "{}", text(&out.stdout));
}

#[test]
fn a_zombie_worker_can_append_nothing_on_postgres() {
    let Some(schema) = pg::schema("zombie") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    zombie(&Db::Pg(schema), dir.path());
}

#[test]
fn a_zombie_worker_can_append_nothing_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    zombie(&Db::File(dir.path().join("zombie.db")), dir.path());
}

/// A cancel request from another host reaches the worker running the job
/// within one lease renewal: the step in flight sees it, finishes early,
/// its outcome is recorded, and the job ends CANCELLED.
#[test]
fn a_cancel_from_another_host_reaches_the_owning_worker() {
    let dir = tempfile::tempdir().unwrap();
    for db in both(dir.path(), "cancel") {
        let log = db.open();
        let job = Uuid::new_v4();
        let steps = vec![JobStep::new(0, "long", "t"), JobStep::new(1, "long", "t")];
        submit(&*log, &QueuedJob::new(job, Uuid::nil(), steps, "ops")).unwrap();
        let lease = Duration::from_millis(900);
        let mut worker = Worker::new(
            log.clone(),
            WorkerOptions::default()
                .with_worker_id("owner")
                .with_lease(lease)
                .until_idle(),
        );
        let noticed = Arc::new(std::sync::Mutex::new(None));
        let seen = noticed.clone();
        worker.register_handler("long", move |_: &JobStep, context: &ExecutionContext| {
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(30) {
                if context.cancel_requested.is_cancelled() {
                    *seen.lock().unwrap() = Some(Instant::now());
                    return StepOutput::succeeded(json!({"wound_up": true}));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            StepOutput::succeeded(json!({"wound_up": false}))
        });
        std::thread::scope(|scope| {
            let running = scope.spawn(|| worker.run().unwrap());
            while log.last_seq(job).unwrap() < 2 {
                std::thread::sleep(Duration::from_millis(10));
            }
            // Another host: its own connection, its own executor.
            let other_host = JobExecutor::builder().store(db.open()).build();
            let asked = Instant::now();
            other_host.request_cancel(job, "change freeze").unwrap();
            let report = running.join().unwrap();
            assert_eq!(report.finished, 1, "{}", db.name());
            let noticed = noticed.lock().unwrap().expect("the step saw the request");
            assert!(
                noticed - asked < lease * 2,
                "{}: noticed after {:?}",
                db.name(),
                noticed - asked
            );
        });
        let result = job_executor::replay(&*log, job).unwrap();
        assert_eq!(result.final_status, JobStatus::Cancelled, "{}", db.name());
        assert_eq!(result.step_results.len(), 1);
        assert_eq!(
            result.step_results[0].output,
            Some(json!({"wound_up": true}))
        );
    }
}

/// `jobs` shows a submitted job, then the worker holding it while it runs.
#[test]
fn jobs_shows_submitted_and_running_jobs_with_their_owner() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for db in both(d, "listing") {
        let url = db.arg();
        let plan = write(
            d,
            "plan.json",
            &json!({"contract_id": Uuid::nil(), "steps": [
                {"step_index": 0, "step_type": "command", "target": "t",
                 "parameters": {"argv": ["sleep", "2"]}}]}),
        );
        let id = text(&run(d, &["submit", &plan, "--db", &url]).stdout)
            .trim()
            .to_owned();
        let listed = text(&run(d, &["jobs", "--db", &url]).stdout);
        assert!(
            listed.contains(&format!("{id}\tSUBMITTED\t0/1 steps")),
            "{listed}"
        );
        let worker = spawn_worker(d, &url, "lister", "30", true);
        let give_up = Instant::now() + Duration::from_secs(10);
        let mut listed = String::new();
        while Instant::now() < give_up && !listed.contains("owner=lister") {
            listed = text(&run(d, &["jobs", "--db", &url]).stdout);
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(listed.contains(&format!("{id}\tRUNNING")), "{listed}");
        assert!(listed.contains("owner=lister"), "{listed}");
        assert!(worker.wait_with_output().unwrap().status.success());
        let listed = text(&run(d, &["jobs", "--db", &url]).stdout);
        assert!(listed.contains(&format!("{id}\tCOMPLETED")), "{listed}");
        assert!(!listed.contains("owner="), "{listed}");
    }
}

/// A log seen from a worker cut off from the queue once it has claimed its
/// first job: renewals fail, nothing more can be claimed, the queue looks
/// empty; appends still go through.
struct Unrenewable(Arc<dyn Log>, std::sync::atomic::AtomicBool);

impl job_executor::store::EventStore for Unrenewable {
    fn append_with(
        &self,
        records: &[job_executor::events::EventRecord],
        options: job_executor::store::AppendOptions,
    ) -> Result<Vec<u64>, job_executor::store::StoreError> {
        self.0.append_with(records, options)
    }
    fn last_seq(&self, job_id: Uuid) -> Result<u64, job_executor::store::StoreError> {
        self.0.last_seq(job_id)
    }
    fn visit_job(
        &self,
        job_id: Uuid,
        visit: &mut dyn FnMut(&job_executor::events::EventRecord) -> bool,
    ) -> Result<(), job_executor::store::StoreError> {
        self.0.visit_job(job_id, visit)
    }
    fn scan(
        &self,
        visit: &mut dyn FnMut(
            u64,
            Result<&job_executor::events::EventRecord, job_executor::store::StoreError>,
        ),
    ) -> Result<(), job_executor::store::StoreError> {
        self.0.scan(visit)
    }
    fn last_position(&self) -> Result<u64, job_executor::store::StoreError> {
        self.0.last_position()
    }
    fn job_ids(&self) -> Result<Vec<Uuid>, job_executor::store::StoreError> {
        self.0.job_ids()
    }
}

impl job_executor::store::JobQueue for Unrenewable {
    fn submit(&self, job: &QueuedJob) -> Result<(), job_executor::store::StoreError> {
        self.0.submit(job)
    }
    fn claim(
        &self,
        owner: &str,
        lease: Duration,
    ) -> Result<Option<job_executor::store::Claim>, job_executor::store::StoreError> {
        if self.1.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(None);
        }
        self.0.claim(owner, lease)
    }
    fn renew(
        &self,
        _owner: &str,
        _fences: &[job_executor::store::Fence],
        _lease: Duration,
    ) -> Result<Vec<job_executor::store::Fence>, job_executor::store::StoreError> {
        Err(job_executor::store::StoreError::Unavailable {
            target: job_executor::store::Target::Server("queue".into()),
            detail: "partitioned".into(),
        })
    }
    fn release(
        &self,
        fence: job_executor::store::Fence,
        finished: bool,
    ) -> Result<(), job_executor::store::StoreError> {
        self.0.release(fence, finished)
    }
    fn queued_job(
        &self,
        job_id: Uuid,
    ) -> Result<Option<(QueuedJob, job_executor::store::QueueState)>, job_executor::store::StoreError>
    {
        self.0.queued_job(job_id)
    }
    fn queued(
        &self,
    ) -> Result<Vec<job_executor::store::QueueEntry>, job_executor::store::StoreError> {
        Ok(Vec::new())
    }
}

/// A worker that cannot renew its lease starts no step once the lease may
/// have run out (the step in flight is still recorded); after the lease,
/// another worker takes the job up at its next step, and every step runs
/// once.
#[test]
fn a_worker_that_cannot_renew_its_lease_starts_no_more_steps() {
    let dir = tempfile::tempdir().unwrap();
    for db in both(dir.path(), "unrenewable") {
        let log = db.open();
        let job = Uuid::new_v4();
        let steps: Vec<JobStep> = (0..6).map(|i| JobStep::new(i, "slow", "t")).collect();
        submit(&*log, &QueuedJob::new(job, Uuid::nil(), steps, "ops")).unwrap();
        let runs: Arc<std::sync::Mutex<Vec<u32>>> = Arc::default();
        let handler = |runs: &Arc<std::sync::Mutex<Vec<u32>>>| {
            let runs = runs.clone();
            move |step: &JobStep, _: &ExecutionContext| {
                runs.lock().unwrap().push(step.step_index);
                std::thread::sleep(Duration::from_millis(250));
                StepOutput::succeeded(json!({}))
            }
        };
        let lease = Duration::from_millis(700);
        let options = WorkerOptions::default().with_lease(lease).until_idle();
        let mut cut_off = Worker::new(
            Arc::new(Unrenewable(log.clone(), Default::default())),
            options.clone().with_worker_id("cut-off"),
        );
        cut_off.register_handler("slow", handler(&runs));
        let report = cut_off.run().unwrap();
        assert_eq!(report.lost, 1, "{}: {report:?}", db.name());
        let started_by_first = runs.lock().unwrap().len();
        assert!(
            (1..6).contains(&started_by_first),
            "{}: {started_by_first} steps started on a lease of {lease:?}",
            db.name()
        );
        // Its last step's outcome is recorded: the job rests between steps.
        let result = job_executor::replay(&*log, job).unwrap();
        assert_eq!(result.step_results.len(), started_by_first);
        assert!(result.step_results.iter().all(|s| s.error.is_none()));
        // Once the lease has run out, another worker goes on from there.
        std::thread::sleep(lease);
        let mut healthy = Worker::new(log.clone(), options.with_worker_id("healthy"));
        healthy.register_handler("slow", handler(&runs));
        let report = healthy.run().unwrap();
        assert_eq!(report.finished, 1, "{}: {report:?}", db.name());
        assert_eq!(*runs.lock().unwrap(), (0..6).collect::<Vec<u32>>());
        let result = job_executor::replay(&*log, job).unwrap();
        assert_eq!(result.final_status, JobStatus::Completed);
    }
}

/// `--db` also takes a libpq `key=value` string.
#[test]
fn a_libpq_key_value_string_names_a_postgres_log() {
    let Some(schema) = pg::schema("keyvalue") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server = pg::server_url();
    let config: postgres::Config = server.parse().unwrap();
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let key_value = format!(
        "host={host} port={} user={} dbname={} options=-csearch_path={}",
        config.get_ports().first().copied().unwrap_or(5432),
        config.get_user().unwrap_or("postgres"),
        config.get_dbname().unwrap_or("test"),
        schema.name()
    );
    let plan = write(
        d,
        "plan.json",
        &json!({"contract_id": Uuid::nil(), "steps": [
            {"step_index": 0, "step_type": "capability_enable", "target": "x"}]}),
    );
    let out = run(d, &["run", &plan, "--db", &key_value]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The same log, through its URL.
    let listed = text(&run(d, &["jobs", "--db", &schema.url()]).stdout);
    assert!(listed.contains("COMPLETED\t1/1 steps"), "{listed}");
    assert!(!d.join(&key_value).exists(), "taken for a file name");
}
