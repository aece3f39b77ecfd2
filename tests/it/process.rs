//! The binary under real crashes and real faults: `kill -9`, racing
//! processes, cancel and resume from another process, read-only, locked and
//! full databases.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cli;
use job_executor::store::{EventStore, SqliteStore};
use job_executor::{JobExecutor, JobStep, NoOpHandler};
use serde_json::{Value, json};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_job-executor");

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn expect_code(out: &Output, code: i32, what: &str) -> String {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: stdout {} stderr {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn write_plan(dir: &Path, name: &str, job_id: Option<Uuid>, steps: &[Value]) -> String {
    let mut plan = json!({
        "contract_id": "6f1c2a6e-8a49-4d1a-9d55-0e3a1f5b7c11",
        "steps": steps,
    });
    if let Some(id) = job_id {
        plan["job_id"] = json!(id);
    }
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec_pretty(&plan).unwrap()).unwrap();
    path.to_str().unwrap().to_owned()
}

fn command_step(i: usize, argv: &[&str]) -> Value {
    json!({"step_index": i, "step_type": "command", "target": format!("s{i}"),
           "parameters": {"argv": argv}, "timeout_seconds": 30})
}

fn evidence_of(dir: &Path, db: &str, job: Uuid) -> Value {
    let out = cli(dir, &["replay", &job.to_string(), "--db", db]);
    serde_json::from_str(&expect_code(&out, 0, "replay")).unwrap()
}

fn verify_ok(dir: &Path, db: &str) {
    let out = cli(dir, &["verify", "--db", db]);
    let report = expect_code(&out, 0, "verify");
    assert!(report.starts_with("ok:"), "{report}");
}

#[test]
fn kill_9_mid_step_is_recovered_as_interrupted() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let marker = d.join("marker");
    let job = Uuid::new_v4();
    let plan = write_plan(
        d,
        "plan.json",
        Some(job),
        &[
            command_step(0, &["true"]),
            // The step kills the executor that runs it.
            command_step(1, &["sh", "-c", "kill -9 $PPID; sleep 1"]),
            command_step(2, &["touch", marker.to_str().unwrap()]),
        ],
    );
    let out = cli(d, &["run", &plan, "--db", "x.db"]);
    assert_eq!(out.status.code(), None, "the executor was killed: {out:?}");
    assert!(out.stdout.is_empty());

    let recovered = expect_code(&cli(d, &["recover", "--db", "x.db"]), 0, "recover");
    assert!(
        recovered.contains(&format!("{job}: step 1 was in doubt")),
        "{recovered}"
    );
    let evidence = evidence_of(d, "x.db", job);
    assert_eq!(evidence["final_status"], "FAILED");
    assert_eq!(evidence["step_results"][1]["failure_kind"], "interrupted");
    assert_eq!(evidence["step_results"].as_array().unwrap().len(), 2);
    std::thread::sleep(Duration::from_millis(200));
    assert!(!marker.exists(), "the third step ran");
    verify_ok(d, "x.db");
    let again = expect_code(&cli(d, &["recover", "--db", "x.db"]), 0, "recover again");
    assert!(again.contains("0 unfinished jobs"), "{again}");
}

/// A small deterministic generator, so that a failing run can be replayed
/// from the seed it prints.
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

/// The steps of `job` that ran (their numbers appended to `lines`) ran
/// once each, in plan order, and each has its `StepStarted` in the log `db`.
fn each_step_ran_once_in_order_and_was_logged(db: &Path, job: Uuid, lines: &Path, context: &str) {
    let ran: Vec<usize> = std::fs::read_to_string(lines)
        .unwrap_or_default()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let mut seen = std::collections::HashSet::new();
    for i in &ran {
        assert!(seen.insert(*i), "{context}: step {i} ran twice: {ran:?}");
    }
    // Every step that ran has its StepStarted in the log.
    let store = SqliteStore::open(db).unwrap();
    let started: std::collections::HashSet<usize> = store
        .load_job(job)
        .unwrap()
        .iter()
        .filter(|r| r.kind == "StepStarted")
        .map(|r| r.decode().unwrap())
        .map(|r| match r.event {
            job_executor::events::Event::StepStarted(s) => s.step_index as usize,
            _ => unreachable!(),
        })
        .collect();
    assert!(
        seen.is_subset(&started),
        "{context}: {seen:?} not within {started:?}"
    );
    // Steps run in order, without gaps.
    assert_eq!(ran, (0..ran.len()).collect::<Vec<_>>(), "{context}");
}

#[test]
fn twenty_random_kill_9s_never_run_a_step_twice() {
    let seed = common::kill_seed("kill test");
    let mut rng = Lcg(seed);
    let steps = 120;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut outcomes = Vec::new();
    for run in 0..20 {
        let lines = d.join(format!("lines-{run}"));
        let job = Uuid::new_v4();
        let plan_steps: Vec<Value> = (0..steps)
            .map(|i| {
                let line = format!("echo {i} >> {}", lines.display());
                command_step(i, &["sh", "-c", &line])
            })
            .collect();
        let plan = write_plan(d, &format!("plan-{run}.json"), Some(job), &plan_steps);
        let db = format!("run-{run}.db");
        let mut child = Command::new(BIN)
            .args(["run", &plan, "--db", &db])
            .current_dir(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = Duration::from_millis(20 + rng.next() % 330);
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let context = format!("seed {seed}, run {run}, killed after {delay:?}");
        if !d.join(&db).exists() {
            outcomes.push("before the database");
            continue;
        }
        let recovered = expect_code(&cli(d, &["recover", "--db", &db]), 0, &context);
        if recovered.contains("resume") {
            expect_code(
                &cli(d, &["resume", &job.to_string(), "--db", &db]),
                0,
                &context,
            );
            outcomes.push("resumed");
        } else if recovered.contains("in doubt") {
            outcomes.push("interrupted");
        } else if recovered.contains("0 unfinished jobs") {
            let jobs = expect_code(&cli(d, &["jobs", "--db", &db]), 0, &context);
            outcomes.push(if jobs.is_empty() {
                "never started"
            } else {
                "finished"
            });
        } else {
            panic!("{context}: unexpected recovery: {recovered}");
        }
        verify_ok(d, &db);

        each_step_ran_once_in_order_and_was_logged(&d.join(&db), job, &lines, &context);
    }
    eprintln!("kill test outcomes: {outcomes:?}");
}

#[test]
fn two_processes_racing_on_one_job_id_run_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lines = d.join("lines");
    let job = Uuid::new_v4();
    let line = format!("echo ran >> {}; sleep 0.3", lines.display());
    let plan = write_plan(
        d,
        "plan.json",
        Some(job),
        &[command_step(0, &["sh", "-c", &line])],
    );
    expect_code(&cli(d, &["jobs", "--db", "x.db"]), 2, "no database yet");
    // Create the database first, so that both processes race on the job only.
    let warm = write_plan(d, "warm.json", None, &[]);
    expect_code(&cli(d, &["run", &warm, "--db", "x.db"]), 0, "warm up");
    let spawn = || {
        Command::new(BIN)
            .args(["run", &plan, "--db", "x.db"])
            .current_dir(d)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let codes: Vec<Option<i32>> = outs.iter().map(|o| o.status.code()).collect();
    assert!(
        codes.contains(&Some(0)) && codes.contains(&Some(2)),
        "{outs:?}"
    );
    let loser = outs.iter().find(|o| o.status.code() == Some(2)).unwrap();
    let message = text(&loser.stderr);
    assert!(message.contains("executed at most once"), "{message}");
    assert_eq!(message.lines().count(), 1);
    assert_eq!(std::fs::read_to_string(&lines).unwrap(), "ran\n");
    verify_ok(d, "x.db");
}

#[test]
fn cancel_from_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let marker = d.join("marker");
    let started = d.join("started");
    let job = Uuid::new_v4();
    let first = format!("touch {}; sleep 1", started.display());
    let plan = write_plan(
        d,
        "plan.json",
        Some(job),
        &[
            command_step(0, &["sh", "-c", &first]),
            command_step(1, &["touch", marker.to_str().unwrap()]),
        ],
    );
    let running = Command::new(BIN)
        .args(["run", &plan, "--db", "x.db"])
        .current_dir(d)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the first step never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let id = job.to_string();
    let asked = cli(
        d,
        &["cancel", &id, "--db", "x.db", "--reason", "change freeze"],
    );
    let said = expect_code(&asked, 0, "cancel");
    assert!(
        said.starts_with(&format!("cancel requested for job {id}")),
        "{said}"
    );
    let again = expect_code(&cli(d, &["cancel", &id, "--db", "x.db"]), 0, "cancel again");
    assert!(again.contains("already requested"), "{again}");

    let out = running.wait_with_output().unwrap();
    let evidence: Value = serde_json::from_str(&expect_code(&out, 1, "the cancelled run")).unwrap();
    assert_eq!(evidence["final_status"], "CANCELLED");
    assert_eq!(
        evidence["final_reason"],
        "Cancelled before step 1: change freeze"
    );
    assert_eq!(evidence["step_results"][0]["status"], "COMPLETED");
    assert!(!marker.exists(), "a step started after the request");
    verify_ok(d, "x.db");

    let late = cli(d, &["cancel", &id, "--db", "x.db"]);
    expect_code(&late, 2, "cancel of an ended job");
    assert!(
        text(&late.stderr).contains("already ended"),
        "{}",
        text(&late.stderr)
    );
    let unknown = cli(d, &["cancel", &Uuid::new_v4().to_string(), "--db", "x.db"]);
    expect_code(&unknown, 2, "cancel of an unknown job");
    assert!(text(&unknown.stderr).contains("unknown job"));
}

/// Writes a job into `db` whose store failed after `appends` appends.
fn stopped_job(db: &Path, appends: usize) -> Uuid {
    let store = Arc::new(common::FaultyStore::new(
        Arc::new(SqliteStore::open(db).unwrap()),
        appends + 1,
        common::Fault::BeforeCommit,
    ));
    let mut executor = JobExecutor::builder().store(store).build();
    executor.register_handler("configuration_change", NoOpHandler);
    let steps: Vec<JobStep> = (0..3)
        .map(|i| JobStep::new(i, "configuration_change", "t"))
        .collect();
    let job = Uuid::new_v4();
    assert!(
        executor
            .execute_job(job, Uuid::nil(), &steps, None, "lib")
            .is_err()
    );
    job
}

#[test]
fn resume_continues_between_steps_and_refuses_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("x.db");
    let between = Uuid::new_v4();
    SqliteStore::open(&db)
        .unwrap()
        .append(&common::records(
            between,
            &common::stopped_between_steps(3, "configuration_change"),
        ))
        .unwrap();
    let in_doubt = stopped_job(&db, 1);

    let refused = cli(d, &["resume", &in_doubt.to_string(), "--db", "x.db"]);
    expect_code(&refused, 2, "resume of a step in doubt");
    assert!(
        text(&refused.stderr).contains("run `recover` first"),
        "{}",
        text(&refused.stderr)
    );

    let out = cli(
        d,
        &[
            "resume",
            &between.to_string(),
            "--db",
            "x.db",
            "--executed-by",
            "night",
        ],
    );
    let evidence: Value = serde_json::from_str(&expect_code(&out, 0, "resume")).unwrap();
    assert_eq!(evidence["final_status"], "COMPLETED");
    assert_eq!(evidence["execution_summary"]["steps_succeeded"], 3);
    let events = expect_code(
        &cli(d, &["events", &between.to_string(), "--db", "x.db"]),
        0,
        "events",
    );
    assert!(events.contains(r#""kind":"JobResumed""#), "{events}");
    assert!(events.contains(r#""executed_by":"night""#), "{events}");

    let finished = cli(d, &["resume", &between.to_string(), "--db", "x.db"]);
    expect_code(&finished, 2, "resume of a finished job");
    assert!(text(&finished.stderr).contains("already ended"));
    let unknown = cli(d, &["resume", &Uuid::new_v4().to_string(), "--db", "x.db"]);
    expect_code(&unknown, 2, "resume of an unknown job");
    let missing = cli(d, &["resume", &between.to_string(), "--db", "none.db"]);
    expect_code(&missing, 2, "resume without a database");
    assert!(!d.join("none.db").exists());
    verify_ok(d, "x.db");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_read_only_database_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plan = write_plan(d, "plan.json", None, &[command_step(0, &["true"])]);
    expect_code(&cli(d, &["run", &plan, "--db", "x.db"]), 0, "first run");
    let db = d.join("x.db");
    let before = std::fs::read(&db).unwrap();
    let mut run = Command::new(BIN);
    if is_root() {
        // Permissions do not bind root: run as nobody, who may read but not write.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(d.join("plan.json"), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        run = Command::new("setpriv");
        run.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN]);
    } else {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    let out = run
        .args(["run", &plan, "--db", db.to_str().unwrap()])
        .current_dir(d)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("read-only") || stderr.contains("unable to open"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read(&db).unwrap(), before, "no partial event");
    verify_ok(d, "x.db");
}

#[test]
fn a_locked_database_fails_cleanly_after_the_busy_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plan = write_plan(d, "plan.json", None, &[command_step(0, &["true"])]);
    expect_code(&cli(d, &["run", &plan, "--db", "x.db"]), 0, "first run");
    let holder = rusqlite::Connection::open(d.join("x.db")).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE").unwrap();
    let start = Instant::now();
    let out = cli(d, &["run", &plan, "--db", "x.db"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        start.elapsed() >= Duration::from_secs(5),
        "gave up before the busy timeout"
    );
    assert!(stderr.contains("locked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1);
    holder.execute_batch("ROLLBACK").unwrap();
    drop(holder);
    let jobs = expect_code(&cli(d, &["jobs", "--db", "x.db"]), 0, "jobs");
    assert_eq!(jobs.lines().count(), 1, "no partial job: {jobs}");
    verify_ok(d, "x.db");
}

/// A real full disk: a 1 MiB tmpfs, where this machine lets the test mount one.
#[test]
fn a_full_disk_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let mnt: PathBuf = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = is_root()
        && Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                "size=256k",
                "tmpfs",
                mnt.to_str().unwrap(),
            ])
            .status()
            .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!(
            "skipped: cannot mount a small tmpfs here (the max_page_count test in tests/it/lifecycle.rs covers a full database)"
        );
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let d = dir.path();
    let steps: Vec<Value> = (0..2000)
        .map(|i| json!({"step_index": i, "step_type": "configuration_change", "target": "node-with-a-longish-name"}))
        .collect();
    let plan = write_plan(d, "plan.json", None, &steps);
    let db = mnt.join("x.db");
    let out = cli(d, &["run", &plan, "--db", db.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no space left"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1);
    // What was committed verifies; recovery needs no room for a new job.
    let verdict = cli(d, &["verify", "--db", db.to_str().unwrap()]);
    assert_eq!(verdict.status.code(), Some(0), "{}", text(&verdict.stdout));
}
