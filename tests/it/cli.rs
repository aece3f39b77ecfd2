//! The `job-executor` binary, end to end: output, exit codes, and that bad
//! input writes nothing.

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::common;

use common::cli;
use serde_json::Value;

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/plans")
        .join(name)
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

fn run_ok(dir: &Path, args: &[&str], code: i32) -> String {
    let out = cli(dir, args);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
    stdout(&out)
}

/// Asserts exit 2, a single line on stderr, nothing on stdout.
fn refused(dir: &Path, args: &[&str], want: &str) -> String {
    let out = cli(dir, args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "one line on stderr: {err:?}");
    assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", stdout(&out));
    err
}

fn job_id(evidence: &str) -> String {
    let value: Value = serde_json::from_str(evidence).unwrap();
    value["job_id"].as_str().unwrap().to_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

/// `events` printed the log of the enable-billing plan, run as job `id`:
/// one JSON object a line, in seq order, with the plan as given.
fn check_events_of_enable_billing(events: &str, id: &str, plan: &Path) {
    let lines: Vec<Value> = events
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = lines.iter().map(|l| l["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "JobStarted",
            "StepStarted",
            "StepSucceeded",
            "StepStarted",
            "StepSucceeded",
            "StepStarted",
            "StepSucceeded",
            "JobCompleted"
        ]
    );
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["seq"], i as u64 + 1);
        assert_eq!(line["job_id"], id);
        assert_eq!(line["schema_version"], job_executor::events::SCHEMA_VERSION);
        assert!(line["digest"].as_str().unwrap().starts_with("sha256:"));
        assert!(line["position"].as_u64().unwrap() >= 1);
        assert!(line["recorded_at"].as_str().unwrap().ends_with('Z'));
        assert!(line["payload"].is_object());
    }
    let plan_json: Value = serde_json::from_str(&std::fs::read_to_string(plan).unwrap()).unwrap();
    assert_eq!(lines[0]["payload"]["plan"][2]["timeout_seconds"], 60);
    assert_eq!(lines[0]["payload"]["contract_id"], plan_json["contract_id"]);
}

#[test]
fn run_replay_events_jobs_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plan = example("enable-billing.json");
    let evidence = run_ok(d, &["run", plan.to_str().unwrap(), "--db", "x.db"], 0);
    let value: Value = serde_json::from_str(&evidence).unwrap();
    assert_eq!(value["final_status"], "COMPLETED");
    assert_eq!(value["execution_summary"]["steps_succeeded"], 3);
    let id = job_id(&evidence);

    let replayed = run_ok(d, &["replay", &id, "--db", "x.db"], 0);
    assert_eq!(replayed, evidence, "replay is byte-identical to run");

    let events = run_ok(d, &["events", &id, "--db", "x.db"], 0);
    check_events_of_enable_billing(&events, &id, &plan);

    let failing = run_ok(
        d,
        &[
            "run",
            example("halts-on-unknown-step.json").to_str().unwrap(),
            "--db",
            "x.db",
        ],
        1,
    );
    let failed: Value = serde_json::from_str(&failing).unwrap();
    assert_eq!(failed["final_status"], "FAILED");
    assert_eq!(
        failed["final_reason"],
        "Step 1 failed: No handler registered for step type: reindex"
    );
    assert_eq!(
        run_ok(d, &["replay", &job_id(&failing), "--db", "x.db"], 0),
        failing
    );

    let jobs = run_ok(d, &["jobs", "--db", "x.db"], 0);
    let rows: Vec<&str> = jobs.lines().collect();
    assert_eq!(rows.len(), 2);
    assert!(rows[0].starts_with(&id) && rows[0].contains("COMPLETED") && rows[0].contains("3/3"));
    assert!(rows[1].contains("FAILED") && rows[1].contains("1/3"));

    let verdict = run_ok(d, &["verify", "--db", "x.db"], 0);
    assert!(
        verdict.contains("ok: 2 jobs, 14 events: hash chains intact"),
        "{verdict}"
    );
}

#[test]
fn db_defaults_to_a_file_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let evidence = run_ok(
        dir.path(),
        &["run", example("enable-billing.json").to_str().unwrap()],
        0,
    );
    assert!(dir.path().join("job-executor.db").exists());
    assert_eq!(
        run_ok(dir.path(), &["replay", &job_id(&evidence)], 0),
        evidence
    );
}

#[test]
fn deterministic_runs_are_byte_identical_across_fresh_databases() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut outputs = Vec::new();
    for db in ["a.db", "b.db"] {
        for plan in ["enable-billing.json", "halts-on-unknown-step.json"] {
            let plan = example(plan);
            let out = cli(
                d,
                &["run", plan.to_str().unwrap(), "--db", db, "--deterministic"],
            );
            let evidence = stdout(&out);
            let events = run_ok(d, &["events", &job_id(&evidence), "--db", db], 0);
            outputs.push((out.status.code(), evidence, events));
        }
    }
    assert_eq!(outputs[0], outputs[2]);
    assert_eq!(outputs[1], outputs[3]);
    assert_ne!(outputs[0].1, outputs[1].1);
    assert_eq!(outputs[0].0, Some(0));
    assert_eq!(outputs[1].0, Some(1));
}

#[test]
fn bad_plans_are_refused_and_create_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let contract = "6f1c2a6e-8a49-4d1a-9d55-0e3a1f5b7c11";
    let cases = [
        ("missing.json", None, "cannot read plan"),
        ("syntax.json", Some("{\"contract_id\": "), "malformed plan"),
        (
            "unknown.json",
            Some(&*format!(
                r#"{{"contract_id":"{contract}","steps":[],"priority":1}}"#
            )),
            "unknown field `priority`",
        ),
        (
            "step-field.json",
            Some(&*format!(
                r#"{{"contract_id":"{contract}","steps":[{{"step_index":0,"step_type":"a","target":"b","retry":true}}]}}"#
            )),
            "unknown field `retry`",
        ),
        (
            "no-contract.json",
            Some(r#"{"steps":[]}"#),
            "missing field `contract_id`",
        ),
        (
            "bad-uuid.json",
            Some(r#"{"contract_id":"not-a-uuid","steps":[]}"#),
            "malformed plan",
        ),
        (
            "order.json",
            Some(&*format!(
                r#"{{"contract_id":"{contract}","steps":[{{"step_index":1,"step_type":"a","target":"b"}}]}}"#
            )),
            "step_index must equal",
        ),
    ];
    for (name, text, want) in cases {
        let path = match text {
            Some(text) => write(d, name, text),
            None => d.join(name).to_str().unwrap().to_owned(),
        };
        let err = refused(d, &["run", &path, "--db", "x.db"], want);
        assert!(err.contains(name), "the message names the plan file: {err}");
        assert!(!d.join("x.db").exists(), "{name}: a database was created");
    }
}

#[test]
fn a_job_that_already_ran_is_refused_and_the_database_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plan = example("enable-billing.json");
    let plan = plan.to_str().unwrap();
    run_ok(d, &["run", plan, "--db", "x.db", "--deterministic"], 0);
    let before = std::fs::read(d.join("x.db")).unwrap();
    refused(
        d,
        &["run", plan, "--db", "x.db", "--deterministic"],
        "executed at most once",
    );
    let fixed = write(
        d,
        "fixed.json",
        r#"{"job_id":"11111111-2222-4333-8444-555555555555","contract_id":"6f1c2a6e-8a49-4d1a-9d55-0e3a1f5b7c11","steps":[]}"#,
    );
    run_ok(d, &["run", &fixed, "--db", "y.db"], 0);
    let before_y = std::fs::read(d.join("y.db")).unwrap();
    refused(
        d,
        &["run", &fixed, "--db", "y.db"],
        "11111111-2222-4333-8444-555555555555",
    );
    assert_eq!(std::fs::read(d.join("x.db")).unwrap(), before);
    assert_eq!(std::fs::read(d.join("y.db")).unwrap(), before_y);
}

#[test]
fn unknown_jobs_and_databases_are_refused_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let unknown = "00000000-0000-4000-8000-000000000000";
    for cmd in ["replay", "events"] {
        refused(d, &[cmd, unknown, "--db", "none.db"], "no such database");
        refused(d, &[cmd, "not-a-uuid", "--db", "none.db"], "invalid job id");
    }
    refused(d, &["jobs", "--db", "none.db"], "no such database");
    refused(d, &["verify", "--db", "none.db"], "no such database");
    assert!(!d.join("none.db").exists());

    run_ok(
        d,
        &[
            "run",
            example("enable-billing.json").to_str().unwrap(),
            "--db",
            "x.db",
        ],
        0,
    );
    let before = std::fs::read(d.join("x.db")).unwrap();
    for cmd in ["replay", "events"] {
        refused(d, &[cmd, unknown, "--db", "x.db"], "unknown job");
    }
    run_ok(d, &["jobs", "--db", "x.db"], 0);
    run_ok(d, &["verify", "--db", "x.db"], 0);
    assert_eq!(
        std::fs::read(d.join("x.db")).unwrap(),
        before,
        "reads wrote to the database"
    );
}

#[test]
fn a_foreign_file_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let notes = write(d, "notes.db", "these are my notes\n");
    let plan = example("enable-billing.json");
    for args in [
        vec!["run", plan.to_str().unwrap(), "--db", &notes],
        vec!["jobs", "--db", &notes],
        vec!["verify", "--db", &notes],
    ] {
        refused(d, &args, "not a job-executor database");
    }
    assert_eq!(
        std::fs::read_to_string(&notes).unwrap(),
        "these are my notes\n"
    );
}

#[test]
fn verify_names_each_broken_job_and_seq() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = run_ok(
        d,
        &[
            "run",
            example("enable-billing.json").to_str().unwrap(),
            "--db",
            "x.db",
        ],
        0,
    );
    let bad = run_ok(
        d,
        &[
            "run",
            example("halts-on-unknown-step.json").to_str().unwrap(),
            "--db",
            "x.db",
        ],
        1,
    );
    let (good_id, bad_id) = (job_id(&good), job_id(&bad));
    {
        // Someone with write access drops the guards and edits the log.
        let raw = rusqlite::Connection::open(d.join("x.db")).unwrap();
        raw.execute_batch("DROP TRIGGER events_no_update; DROP TRIGGER events_no_delete;")
            .unwrap();
        // The failed job now claims step 2 started instead of step 1 (EXEC-001) ...
        raw.execute(
            "UPDATE events SET payload = '{\"step_index\":2}' WHERE job_id = ?1 AND seq = 4",
            [&bad_id],
        )
        .unwrap();
        // ... and the good job loses an outcome (EXEC-002).
        raw.execute(
            "DELETE FROM events WHERE job_id = ?1 AND seq = 5",
            [&good_id],
        )
        .unwrap();
    }
    let out = cli(d, &["verify", "--db", "x.db"]);
    let report = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    for want in [
        format!("job {bad_id} seq 4: CHAIN: event edited"),
        format!("job {bad_id} seq 4: EXEC-001"),
        format!("job {good_id} seq 5: CHAIN: event deleted"),
        format!("job {good_id} seq 6: EXEC-002"),
        "FAILED: 2 of 2 jobs do not verify".to_owned(),
    ] {
        assert!(report.contains(&want), "{want:?} not in {report}");
    }
    // Replay refuses a broken log rather than guess.
    refused(d, &["replay", &bad_id, "--db", "x.db"], "hash chain broken");
}

/// In `d`, beside the log `x.db` holding job `id` (of `plan`): a malformed
/// `--expect` and a key file too short or missing are refused, and a run
/// refused for its key writes nothing.
fn bad_heads_and_keys_are_refused(d: &Path, plan: &Path, id: &str) {
    refused(
        d,
        &["verify", "--db", "x.db", "--expect", "nonsense"],
        "invalid --expect",
    );
    refused(
        d,
        &[
            "verify",
            "--db",
            "x.db",
            "--expect",
            &format!("{id}=sha256:ABC"),
        ],
        "invalid --expect",
    );
    let short = write(d, "short", "tiny");
    refused(
        d,
        &["verify", "--db", "x.db", "--key-file", &short],
        "at least 16",
    );
    refused(
        d,
        &["verify", "--db", "x.db", "--key-file", "nope"],
        "cannot read key file",
    );
    let before = std::fs::read(d.join("x.db")).unwrap();
    refused(
        d,
        &[
            "run",
            plan.to_str().unwrap(),
            "--db",
            "x.db",
            "--key-file",
            &short,
        ],
        "at least 16",
    );
    assert_eq!(std::fs::read(d.join("x.db")).unwrap(), before);
}

/// `run` of `plan` into `x.db` in `d`, keyed with the key file `key`;
/// asserts the exit `code` and returns the evidence.
fn run_keyed(d: &Path, plan: &Path, key: &str, code: i32) -> String {
    run_ok(
        d,
        &[
            "run",
            plan.to_str().unwrap(),
            "--db",
            "x.db",
            "--key-file",
            key,
        ],
        code,
    )
}

#[test]
fn export_verify_and_replay_a_bundle_offline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = write(d, "key", "a key of at least sixteen bytes\n");
    let plan = example("halts-on-unknown-step.json");
    let evidence = run_keyed(d, &plan, &key, 1);
    let id = job_id(&evidence);
    let value: Value = serde_json::from_str(&evidence).unwrap();
    assert_eq!(value["event_log"]["events"], 6);
    assert!(
        value["event_log"]["head"]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(
        value["event_log"]["head_mac"]
            .as_str()
            .unwrap()
            .starts_with("hmac-sha256:")
    );

    let to_stdout = run_ok(d, &["export", &id, "--db", "x.db", "--key-file", &key], 0);
    run_ok(
        d,
        &["export", &id, "--db", "x.db", "--out", "bundle.json"],
        0,
    );
    assert_eq!(
        std::fs::read_to_string(d.join("bundle.json")).unwrap(),
        to_stdout
    );
    // Offline: the database is gone.
    std::fs::remove_file(d.join("x.db")).unwrap();
    let ok = run_ok(
        d,
        &["verify", "--bundle", "bundle.json", "--key-file", &key],
        0,
    );
    assert!(
        ok.starts_with(&format!("ok: bundle of job {id}: 6 events")),
        "{ok}"
    );
    assert_eq!(
        run_ok(d, &["replay", "--bundle", "bundle.json"], 0),
        evidence
    );

    bundles_edited_or_under_another_key_fail(d, &to_stdout);
}

/// In `d`, beside `bundle.json` (whose text is `bundle`): an edited copy,
/// another key, a missing file and a file that is no bundle all fail.
fn bundles_edited_or_under_another_key_fail(d: &Path, bundle: &str) {
    let edited = bundle.replacen("No handler registered", "No handler registred", 1);
    write(d, "edited.json", &edited);
    let out = cli(d, &["verify", "--bundle", "edited.json"]);
    assert_eq!(out.status.code(), Some(1));
    let report = stdout(&out);
    assert!(report.contains("CHAIN: event edited"), "{report}");
    assert!(report.contains("FAILED"), "{report}");
    let out = cli(d, &["replay", "--bundle", "edited.json"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());

    let other_key = write(d, "other", "another key, sixteen bytes or more");
    let out = cli(
        d,
        &[
            "verify",
            "--bundle",
            "bundle.json",
            "--key-file",
            &other_key,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(stdout(&out).contains("MAC"), "{}", stdout(&out));

    refused(d, &["verify", "--bundle", "missing.json"], "missing.json");
    write(d, "not-a-bundle.json", "{\"hello\": 1}");
    refused(
        d,
        &["verify", "--bundle", "not-a-bundle.json"],
        "not an audit bundle",
    );
}

#[test]
fn verify_with_kept_heads_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = write(d, "key", "0123456789abcdef0123456789abcdef");
    let plan = example("enable-billing.json");
    let evidence = run_keyed(d, &plan, &key, 0);
    let value: Value = serde_json::from_str(&evidence).unwrap();
    let head = value["event_log"]["head"].as_str().unwrap();
    let expect = format!("{}={head}", job_id(&evidence));
    let ok = run_ok(
        d,
        &[
            "verify",
            "--db",
            "x.db",
            "--expect",
            &expect,
            "--key-file",
            &key,
        ],
        0,
    );
    assert!(ok.contains("heads authenticated"), "{ok}");

    let other = format!("{}=sha256:{}", job_id(&evidence), "0".repeat(64));
    let out = cli(d, &["verify", "--db", "x.db", "--expect", &other]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("EXPECT"), "{}", stdout(&out));
    let unknown = format!("00000000-0000-4000-8000-000000000000={head}");
    let out = cli(d, &["verify", "--db", "x.db", "--expect", &unknown]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("no events for this job"),
        "{}",
        stdout(&out)
    );

    bad_heads_and_keys_are_refused(d, &plan, &job_id(&evidence));

    // A job written without the key does not verify under it.
    run_ok(d, &["run", plan.to_str().unwrap(), "--db", "x.db"], 0);
    let out = cli(d, &["verify", "--db", "x.db", "--key-file", &key]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("MAC: no MAC"), "{}", stdout(&out));
}
