//! Tamper evidence: the hash chain, keyed heads, audit bundles, and logs
//! written by the first schema.

use crate::common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use job_executor::bundle::{BundleError, export, verify_bundle};
use job_executor::chain::{Digest, HeadKey, chain};
use job_executor::clock::LogicalClock;
use job_executor::events::SCHEMA_VERSION;
use job_executor::store::{EventStore, SqliteStore};
use job_executor::verify::{JobReport, VerifyOptions, verify_store};
use job_executor::{
    FailingHandler, JobExecutor, JobStep, NoOpHandler, execution_result_to_evidence, replay,
};
use rusqlite::{Connection, params};
use serde_json::Value;
use uuid::Uuid;

fn key() -> HeadKey {
    HeadKey::new(*b"an auditor's secret key, 32 byte").unwrap()
}

fn executor(store: Arc<SqliteStore>, key: Option<HeadKey>) -> JobExecutor {
    let mut builder = JobExecutor::builder()
        .store(store)
        .clock(Arc::new(LogicalClock::default()));
    if let Some(key) = key {
        builder = builder.head_key(key);
    }
    let mut executor = builder.build();
    executor.register_handler("ok", NoOpHandler);
    executor.register_handler("fail", FailingHandler::default());
    executor
}

fn steps(types: &[&str]) -> Vec<JobStep> {
    types
        .iter()
        .enumerate()
        .map(|(i, t)| JobStep::new(i as u32, *t, format!("t{i}")))
        .collect()
}

fn reports(store: &dyn EventStore, options: &VerifyOptions) -> Vec<JobReport> {
    let mut reports = Vec::new();
    verify_store(store, options, |r| reports.push(r), |_| {}).unwrap();
    reports
}

fn open(path: &Path) -> SqliteStore {
    SqliteStore::open(path).unwrap()
}

fn read_only(path: &Path) -> SqliteStore {
    common::reader(path)
}

/// A connection for an attacker: guards dropped, checks ignored.
fn tamper(path: &Path) -> Connection {
    let raw = Connection::open(path).unwrap();
    raw.execute_batch(
        "DROP TRIGGER IF EXISTS events_no_update;
         DROP TRIGGER IF EXISTS events_no_delete;
         DROP TRIGGER IF EXISTS events_insert;
         DROP TRIGGER IF EXISTS events_follow;
         DROP TRIGGER IF EXISTS events_sealed;
         PRAGMA ignore_check_constraints = ON;",
    )
    .unwrap();
    raw
}

// --- the fixture written by the first schema --------------------------------

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/schema-v1");

fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    std::fs::copy(Path::new(FIXTURE).join("log.db"), &path).unwrap();
    (dir, path)
}

fn fixture_job(n: u128) -> Uuid {
    Uuid::from_u128(0x1000 + n)
}

/// The evidence the first version printed, and today's minus the keys added since.
fn old_and_new_evidence(store: &dyn EventStore, n: u128) -> (Value, Value, Value) {
    let old: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(FIXTURE).join(format!("evidence-{n}.json"))).unwrap(),
    )
    .unwrap();
    let mut now = execution_result_to_evidence(&replay(store, fixture_job(n)).unwrap());
    let event_log = now.as_object_mut().unwrap().remove("event_log").unwrap();
    (old, now, event_log)
}

#[test]
fn first_schema_log_replays_and_verifies_read_only() {
    let (_dir, path) = fixture_copy();
    let before = std::fs::read(&path).unwrap();
    let store = read_only(&path);
    for n in 1..=5 {
        let (old, now, event_log) = old_and_new_evidence(&store, n);
        assert_eq!(now, old, "job {n}: evidence changed");
        assert!(event_log["head"].as_str().unwrap().starts_with("sha256:"));
    }
    let all = reports(&store, &VerifyOptions::default());
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(JobReport::is_ok), "{all:?}");
    assert_eq!(all.iter().map(|r| r.unsealed).sum::<u64>(), 26);
    drop(store);
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "reading changed the fixture"
    );
}

#[test]
fn first_schema_events_are_upcast() {
    let (_dir, path) = fixture_copy();
    let store = read_only(&path);
    let records = store.load_job(fixture_job(2)).unwrap();
    let failed = records.iter().find(|r| r.kind == "StepFailed").unwrap();
    assert_eq!(failed.schema_version, 1);
    assert!(
        failed.payload.contains(r#""error":"quota"#),
        "{}",
        failed.payload
    );
    let decoded = failed.decode().unwrap().event;
    let job_executor::events::Event::StepFailed(step) = decoded else {
        panic!("not a StepFailed")
    };
    assert_eq!(step.failure.message, "quota \"exceeded\"\n");
}

#[test]
fn opening_a_first_schema_log_for_writing_seals_it_and_keeps_its_evidence() {
    let (_dir, path) = fixture_copy();
    let heads: Vec<Value> = {
        let store = read_only(&path);
        (1..=5).map(|n| old_and_new_evidence(&store, n).2).collect()
    };
    let store = open(&path);
    let version: u32 = Connection::open(&path)
        .unwrap()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, job_executor::store::DB_SCHEMA_VERSION);
    let all = reports(&store, &VerifyOptions::default());
    assert!(all.iter().all(|r| r.is_ok() && r.unsealed == 0), "{all:?}");
    for n in 1..=5 {
        let (old, now, event_log) = old_and_new_evidence(&store, n);
        assert_eq!(now, old, "job {n}: evidence changed by sealing");
        assert_eq!(
            event_log,
            heads[n as usize - 1],
            "job {n}: head changed by sealing"
        );
    }
    // Old and new events live side by side, and the old ones are now guarded.
    let new_job = Uuid::new_v4();
    executor(Arc::new(store), None)
        .execute_job(new_job, Uuid::new_v4(), &steps(&["ok"]), None, "ops")
        .unwrap();
    let raw = Connection::open(&path).unwrap();
    let edit = raw.execute(
        "UPDATE events SET payload = '{}' WHERE job_id = ?1 AND seq = 2",
        [fixture_job(1).to_string()],
    );
    assert!(edit.unwrap_err().to_string().contains("append-only"));
    let reseal = raw.execute(
        "UPDATE events SET digest = printf('%064d', 0) WHERE job_id = ?1 AND seq = 2",
        [fixture_job(1).to_string()],
    );
    assert!(reseal.unwrap_err().to_string().contains("append-only"));
    let kinds: Vec<u32> = read_only(&path)
        .load_job(new_job)
        .unwrap()
        .iter()
        .map(|r| r.schema_version)
        .collect();
    assert!(kinds.iter().all(|v| *v == SCHEMA_VERSION));
}

// --- tamper detection ---------------------------------------------------------

#[test]
fn an_untouched_log_verifies_and_every_event_has_a_digest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    let store = Arc::new(open(&path));
    let ex = executor(store.clone(), None);
    for types in [&["ok", "ok"][..], &["ok", "fail", "ok"], &[]] {
        ex.execute_job(Uuid::new_v4(), Uuid::new_v4(), &steps(types), None, "ops")
            .unwrap();
    }
    let all = reports(store.as_ref(), &VerifyOptions::default());
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|r| r.is_ok() && r.unsealed == 0));
    let missing: i64 = Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM events WHERE digest IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(missing, 0);
    let err = Connection::open(&path).unwrap().execute(
        "INSERT INTO events (job_id, seq, kind, schema_version, recorded_at, payload)
         VALUES (?1, 1, 'JobStarted', 2, '2000-01-01T00:00:00.000000Z', '{}')",
        [Uuid::new_v4().to_string()],
    );
    assert!(err.unwrap_err().to_string().contains("chain digest"));
}

/// Runs two jobs into a fresh file and returns the path and job ids.
fn two_jobs(dir: &Path, key: Option<HeadKey>) -> (PathBuf, Uuid, Uuid) {
    let path = dir.join("log.db");
    let ex = executor(Arc::new(open(&path)), key);
    let (a, b) = (Uuid::from_u128(0xA), Uuid::from_u128(0xB));
    ex.execute_job(a, Uuid::new_v4(), &steps(&["ok", "ok", "ok"]), None, "ops")
        .unwrap();
    ex.execute_job(b, Uuid::new_v4(), &steps(&["ok", "fail"]), None, "ops")
        .unwrap();
    (path, a, b)
}

/// The first violation of `job`, as `verify` reports it.
fn first_violation(path: &Path, job: Uuid, options: &VerifyOptions) -> Option<(u64, String)> {
    reports(&read_only(path), options)
        .into_iter()
        .find(|r| r.job_id == job)
        .and_then(|r| {
            r.violations
                .first()
                .map(|v| (v.seq, format!("{}: {}", v.check, v.message)))
        })
}

/// Two jobs written to `dir/name`, then each of `statements` run on the
/// file with its rules dropped, `?1` the first job's id.
fn two_jobs_then(dir: &Path, name: &str, statements: &[&str]) -> (PathBuf, Uuid, Uuid) {
    let (path, a, b) = two_jobs(&dir.join(name).tap_mkdir(), None);
    let raw = tamper(&path);
    for statement in statements {
        raw.execute(statement, [a.to_string()]).unwrap();
    }
    (path, a, b)
}

#[test]
fn verify_tells_apart_edit_delete_swap_and_insert() {
    let no = VerifyOptions::default();
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();

    let (path, a, b) = two_jobs_then(
        dir,
        "edit",
        &[
            "UPDATE events SET payload = replace(payload, '\"step_index\":1', '\"step_index\":2') WHERE job_id = ?1 AND seq = 4",
        ],
    );
    let (seq, what) = first_violation(&path, a, &no).unwrap();
    assert_eq!(seq, 4);
    assert!(
        what.starts_with("CHAIN: event edited: its content"),
        "{what}"
    );
    assert!(
        first_violation(&path, b, &no).is_none(),
        "job b is untouched"
    );

    let (path, a, _) = two_jobs_then(
        dir,
        "digest",
        &["UPDATE events SET digest = printf('%064d', 7) WHERE job_id = ?1 AND seq = 3"],
    );
    let (seq, what) = first_violation(&path, a, &no).unwrap();
    assert_eq!(
        (seq, what.as_str()),
        (3, "CHAIN: event edited: its stored digest was changed")
    );

    let delete = "DELETE FROM events WHERE job_id = ?1 AND seq = 3";
    let renumber = "UPDATE events SET seq = seq - 1 WHERE job_id = ?1 AND seq > 3";
    for (name, statements) in [
        ("delete", &[delete][..]),
        ("delete-renumber", &[delete, renumber][..]),
    ] {
        let (path, a, _) = two_jobs_then(dir, name, statements);
        let (seq, what) = first_violation(&path, a, &no).unwrap();
        assert_eq!(seq, 3, "{name}");
        assert!(what.starts_with("CHAIN: event deleted"), "{name}: {what}");
    }

    for (name, x, y, with_digests) in [("swap", 4, 5, true), ("swap-content", 2, 3, false)] {
        let (path, a, _) = two_jobs(&dir.join(name).tap_mkdir(), None);
        swap_rows(&tamper(&path), a, x, y, with_digests);
        let (seq, what) = first_violation(&path, a, &no).unwrap();
        let swapped = format!("CHAIN: events reordered: seq {x} and seq {y} swapped");
        assert_eq!((seq, what), (x, swapped));
    }

    for forge_digest in [false, true] {
        let sub = format!("insert-{forge_digest}");
        let (path, a, _) = two_jobs(&dir.join(sub).tap_mkdir(), None);
        let records = read_only(&path).load_job(a).unwrap();
        common::insert_renumbered(&tamper(&path), &records, 4, forge_digest);
        let (seq, what) = first_violation(&path, a, &no).unwrap();
        assert_eq!(seq, 4, "{what}");
        assert!(what.starts_with("CHAIN: event inserted at seq 4"), "{what}");
    }
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

/// Swaps two events of a job: their content, and their digests and MACs
/// too when `with_digests`.
fn swap_rows(raw: &Connection, job: Uuid, x: u64, y: u64, with_digests: bool) {
    let columns = if with_digests {
        "kind, schema_version, recorded_at, payload, digest, mac"
    } else {
        "kind, schema_version, recorded_at, payload"
    };
    let job = job.to_string();
    let position = |seq: u64| -> i64 {
        raw.query_row(
            "SELECT position FROM events WHERE job_id = ?1 AND seq = ?2",
            params![job, seq as i64],
            |r| r.get(0),
        )
        .unwrap()
    };
    let (px, py) = (position(x), position(y));
    let set = columns
        .split(", ")
        .map(|c| format!("{c} = (SELECT {c} FROM events WHERE position = ?2)"))
        .collect::<Vec<_>>()
        .join(", ");
    raw.execute_batch("CREATE TEMP TABLE saved AS SELECT * FROM events WHERE 0")
        .unwrap();
    raw.execute(
        "INSERT INTO saved SELECT * FROM events WHERE position = ?1",
        [px],
    )
    .unwrap();
    raw.execute(
        &format!("UPDATE events SET {set} WHERE position = ?1"),
        [px, py],
    )
    .unwrap();
    let restore = columns
        .split(", ")
        .map(|c| format!("{c} = (SELECT {c} FROM saved)"))
        .collect::<Vec<_>>()
        .join(", ");
    raw.execute(
        &format!("UPDATE events SET {restore} WHERE position = ?1"),
        [py],
    )
    .unwrap();
    raw.execute_batch("DROP TABLE saved").unwrap();
}

#[test]
fn expect_detects_a_cut_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (path, a, b) = two_jobs(dir.path(), None);
    let heads: HashMap<Uuid, Digest> = [a, b]
        .into_iter()
        .map(|j| (j, replay(&read_only(&path), j).unwrap().head))
        .collect();
    let options = VerifyOptions::default().with_expected_heads(heads.clone());
    assert!(
        reports(&read_only(&path), &options)
            .iter()
            .all(JobReport::is_ok)
    );
    // Without the kept head, a cut tail is just a shorter (unfinished) log.
    tamper(&path)
        .execute(
            "DELETE FROM events WHERE job_id = ?1 AND seq >= 7",
            [a.to_string()],
        )
        .unwrap();
    assert!(first_violation(&path, a, &VerifyOptions::default()).is_none());
    let (seq, what) = first_violation(&path, a, &options).unwrap();
    assert_eq!(seq, 7);
    assert!(
        what.starts_with("EXPECT: the log does not contain the expected head"),
        "{what}"
    );
    assert!(first_violation(&path, b, &options).is_none());
}

// --- keyed heads ----------------------------------------------------------------

#[test]
fn a_log_rechained_without_the_key_fails_keyed_verification() {
    let dir = tempfile::tempdir().unwrap();
    let (path, a, b) = two_jobs(dir.path(), Some(key()));
    let keyed = VerifyOptions::default().with_key(Some(key()));
    assert!(
        reports(&read_only(&path), &keyed)
            .iter()
            .all(JobReport::is_ok)
    );

    // A forger edits step 1's outcome of job a and recomputes every digest
    // after it: the chain is consistent again, but the MACs are not theirs.
    let records = read_only(&path).load_job(a).unwrap();
    let raw = tamper(&path);
    let mut head = Digest::GENESIS;
    for record in &records {
        let mut record = record.clone();
        if record.seq == 5 {
            record.payload = record.payload.replace("{}", r#"{"forged":true}"#);
        }
        head = chain(&head, &record);
        raw.execute(
            "UPDATE events SET payload = ?2, digest = ?3 WHERE position = ?1",
            params![record.position as i64, record.payload, head.to_hex()],
        )
        .unwrap();
    }
    let unkeyed = reports(&read_only(&path), &VerifyOptions::default());
    assert!(
        unkeyed.iter().all(JobReport::is_ok),
        "without the key the forgery holds"
    );
    let (seq, what) = first_violation(&path, a, &keyed).unwrap();
    assert_eq!(seq, 5);
    assert!(what.starts_with("MAC: MAC does not authenticate"), "{what}");
    assert!(first_violation(&path, b, &keyed).is_none());

    // Dropping the MACs does not help either, nor does a wrong key.
    raw.execute(
        "UPDATE events SET mac = NULL WHERE job_id = ?1",
        [b.to_string()],
    )
    .unwrap();
    let (seq, what) = first_violation(&path, b, &keyed).unwrap();
    assert_eq!(
        (seq, what.as_str()),
        (1, "MAC: no MAC: the event was not written with the key")
    );
    let wrong = VerifyOptions::default().with_key(Some(
        HeadKey::new(*b"some other key, also 32 bytes...").unwrap(),
    ));
    assert!(first_violation(&path, a, &wrong).is_some());
}

// --- bundles ------------------------------------------------------------------------

#[test]
fn bundle_round_trip_and_every_edited_byte_fails() {
    let dir = tempfile::tempdir().unwrap();
    for key in [None, Some(key())] {
        let (path, _, b) = two_jobs(
            &dir.path().join(format!("{}", key.is_some())).tap_mkdir(),
            key.clone(),
        );
        let store = read_only(&path);
        let live = replay(&store, b).unwrap();
        let bytes = export(&store, b, key.as_ref()).unwrap().to_bytes();
        let result = verify_bundle(&bytes, key.as_ref()).unwrap();
        assert_eq!(
            execution_result_to_evidence(&result),
            execution_result_to_evidence(&live)
        );
        assert_eq!(result.head, live.head);
        assert_eq!(key.is_some(), result.head_mac.is_some());
        // Every single-byte edit anywhere in the file is caught.
        let mut edited = bytes.clone();
        for i in 0..bytes.len() {
            for replacement in [bytes[i] ^ 0x01, b' '] {
                if replacement == bytes[i] {
                    continue;
                }
                edited[i] = replacement;
                assert!(
                    verify_bundle(&edited, key.as_ref()).is_err(),
                    "edit of byte {i} ({:?} -> {:?}) passed",
                    bytes[i] as char,
                    replacement as char
                );
            }
            edited[i] = bytes[i];
        }
        // So is a byte added or removed.
        let mut longer = bytes.clone();
        longer.insert(bytes.len() / 2, b' ');
        assert!(verify_bundle(&longer, key.as_ref()).is_err());
        let shorter = [&bytes[..100], &bytes[101..]].concat();
        assert!(verify_bundle(&shorter, key.as_ref()).is_err());
        if key.is_some() {
            let wrong = HeadKey::new(*b"some other key, also 32 bytes...").unwrap();
            assert!(matches!(
                verify_bundle(&bytes, Some(&wrong)),
                Err(BundleError::Broken { .. })
            ));
        }
    }
}

#[test]
fn a_broken_log_is_not_exported() {
    let dir = tempfile::tempdir().unwrap();
    let (path, a, _) = two_jobs(dir.path(), None);
    tamper(&path)
        .execute(
            "DELETE FROM events WHERE job_id = ?1 AND seq = 2",
            [a.to_string()],
        )
        .unwrap();
    let err = export(&read_only(&path), a, None).unwrap_err();
    assert!(matches!(err, BundleError::LogDoesNotVerify { .. }), "{err}");
    assert!(err.to_string().contains("seq 2"), "{err}");
}
