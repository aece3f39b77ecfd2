//! Fuzzing of everything that reads untrusted bytes or numbers: the plan
//! parser, the bundle verifier, and the decoder of stored rows. Inputs are
//! byte mutations of valid documents, extreme numbers put where numbers go,
//! and rows of any type in any column. None may panic (debug builds check
//! every arithmetic overflow), and what is accepted must make sense.
//!
//! The same three entry points have `cargo fuzz` targets under `fuzz/`
//! (see `fuzz/README.md`); what either finds is kept here as a regression.

use crate::common;

use std::path::Path;
use std::sync::Arc;

use job_executor::bundle::{AuditBundle, export, verify_bundle};
use job_executor::clock::{LogicalClock, derived_job_id};
use job_executor::events::EventRecord;
use job_executor::model::{PlanFile, validate_plan};
use job_executor::projection::replay_all;
use job_executor::store::{APPLICATION_ID, DB_SCHEMA_VERSION, EventStore, SqliteStore};
use job_executor::verify::{VerifyOptions, verify_store};
use job_executor::{
    FailingHandler, JobExecutor, JobStatus, JobStep, NoOpHandler, create_default_executor,
    execution_result_to_evidence,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use rusqlite::types::Value as Sql;
use uuid::Uuid;

const PLAN: &str = r#"{
  "job_id": "1d3c19b8-6de4-5ade-a4fc-aab994522342",
  "contract_id": "6f1c2a6e-8a49-4d1a-9d55-0e3a1f5b7c11",
  "steps": [
    {"step_index": 0, "step_type": "capability_enable", "target": "billing", "parameters": {"n": 1}},
    {"step_index": 1, "step_type": "configuration_change", "target": "billing", "timeout_seconds": 60},
    {"step_index": 2, "step_type": "capability_add", "target": "billing", "parameters": {}}
  ]
}"#;

/// Numbers that break careless arithmetic.
const EXTREMES: [&str; 12] = [
    "0",
    "-1",
    "1",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "-9223372036854775808",
    "1e999",
    "0.5",
];

/// Extreme values for the numeric fields of a bundle.
const WIDE: [u64; 8] = [
    0,
    1,
    u32::MAX as u64,
    u32::MAX as u64 + 1,
    i64::MAX as u64,
    i64::MAX as u64 + 1,
    u64::MAX - 1,
    u64::MAX,
];

/// A number in a bundle, to be overwritten.
enum Slot<'a> {
    U64(&'a mut u64),
    U32(&'a mut u32),
    Json(&'a mut serde_json::Value),
}

impl Slot<'_> {
    /// Sets the number (as near to `value` as its type allows); whether
    /// that changed it.
    fn set(self, value: u64) -> bool {
        match self {
            Slot::U64(n) => std::mem::replace(n, value) != value,
            Slot::U32(n) => {
                let value = u32::try_from(value).unwrap_or(u32::MAX);
                std::mem::replace(n, value) != value
            }
            Slot::Json(n) => std::mem::replace(n, value.into()) != value,
        }
    }
}

/// Every number of a bundle.
fn number_slots(bundle: &mut AuditBundle) -> Vec<Slot<'_>> {
    fn json<'a>(value: &'a mut serde_json::Value, slots: &mut Vec<Slot<'a>>) {
        match value {
            serde_json::Value::Number(_) => slots.push(Slot::Json(value)),
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| json(v, slots)),
            serde_json::Value::Object(map) => map.values_mut().for_each(|v| json(v, slots)),
            _ => {}
        }
    }
    let mut slots = vec![Slot::U32(&mut bundle.format_version)];
    for event in &mut bundle.events {
        slots.push(Slot::U64(&mut event.seq));
        slots.push(Slot::U32(&mut event.schema_version));
    }
    for step in &mut bundle.plan.steps {
        slots.push(Slot::U32(&mut step.step_index));
        slots.push(Slot::U64(&mut step.timeout_seconds));
    }
    json(&mut bundle.evidence, &mut slots);
    slots
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: usize,
        bits: u8,
    },
    Insert {
        at: usize,
        byte: u8,
    },
    Delete {
        at: usize,
        len: usize,
    },
    /// Replaces the n-th number in the text with an extreme one.
    Number {
        nth: usize,
        extreme: usize,
    },
    Duplicate {
        at: usize,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => (any::<usize>(), 1u8..).prop_map(|(at, bits)| Mutation::Flip { at, bits }),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Insert { at, byte }),
        1 => (any::<usize>(), 1usize..16).prop_map(|(at, len)| Mutation::Delete { at, len }),
        3 => (any::<usize>(), 0..EXTREMES.len()).prop_map(|(nth, extreme)| Mutation::Number { nth, extreme }),
        1 => (any::<usize>(), 1usize..64).prop_map(|(at, len)| Mutation::Duplicate { at, len }),
    ]
}

/// Where the numbers are in `bytes`: runs of digits and '-'.
fn numbers(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = None;
    for (i, b) in bytes.iter().enumerate() {
        let digit = b.is_ascii_digit() || *b == b'-';
        match (digit, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                spans.push((s, i));
                start = None;
            }
            _ => {}
        }
    }
    spans
}

fn mutate(original: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut bytes = original.to_vec();
    for mutation in mutations {
        if bytes.is_empty() {
            break;
        }
        let n = bytes.len();
        match *mutation {
            Mutation::Flip { at, bits } => bytes[at % n] ^= bits,
            Mutation::Insert { at, byte } => bytes.insert(at % (n + 1), byte),
            Mutation::Delete { at, len } => {
                let at = at % n;
                bytes.drain(at..(at + len).min(n));
            }
            Mutation::Number { nth, extreme } => {
                let spans = numbers(&bytes);
                if let Some(&(start, end)) = spans.get(nth % spans.len().max(1)) {
                    bytes.splice(start..end, EXTREMES[extreme].bytes());
                }
            }
            Mutation::Duplicate { at, len } => {
                let at = at % n;
                let copy: Vec<u8> = bytes[at..(at + len).min(n)].to_vec();
                bytes.splice(at..at, copy);
            }
        }
    }
    bytes
}

/// A bundle of a job with a failed step, made once: its canonical bytes.
fn bundle_bytes() -> &'static [u8] {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES.get_or_init(|| {
        let store = Arc::new(SqliteStore::open_in_memory().unwrap());
        let mut executor = JobExecutor::builder()
            .store(store.clone())
            .clock(Arc::new(LogicalClock::default()))
            .build();
        executor.register_handler("ok", NoOpHandler);
        executor.register_handler("fail", FailingHandler::new("déjà \"vu\" ✓"));
        let job = Uuid::from_u128(7);
        let steps = [
            JobStep::new(0, "ok", "a"),
            JobStep::new(1, "fail", "b"),
            JobStep::new(2, "ok", "c"),
        ];
        executor
            .execute_job(job, Uuid::from_u128(8), &steps, None, "fuzz")
            .unwrap();
        export(store.as_ref(), job, None).unwrap().to_bytes()
    })
}

fn config(cases: u32, file: &'static str) -> Config {
    Config {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(file))),
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config(1024, "proptest-regressions/fuzz.txt"))]

    /// A mutated plan is refused with an error, or it is a plan that runs,
    /// whatever its numbers (a timeout of u64::MAX seconds included).
    #[test]
    fn the_plan_parser_takes_any_bytes(mutations in prop::collection::vec(mutation(), 1..6)) {
        let bytes = mutate(PLAN.as_bytes(), &mutations);
        let Ok(plan) = serde_json::from_slice::<PlanFile>(&bytes) else { return Ok(()) };
        let _ = derived_job_id(plan.contract_id, &plan.steps);
        if validate_plan(&plan.steps).is_err() {
            return Ok(());
        }
        let executor = create_default_executor();
        let job = plan.job_id.unwrap_or_else(Uuid::new_v4);
        let result = executor.execute_job(job, plan.contract_id, &plan.steps, None, "fuzz").unwrap();
        prop_assert!(matches!(result.final_status, JobStatus::Completed | JobStatus::Failed));
        let replayed = executor.replay(job).unwrap();
        prop_assert_eq!(execution_result_to_evidence(&replayed), execution_result_to_evidence(&result));
    }

    /// A bundle changed in any way does not verify — and never panics.
    #[test]
    fn the_bundle_verifier_takes_any_bytes(mutations in prop::collection::vec(mutation(), 1..6)) {
        let original = bundle_bytes();
        let bytes = mutate(original, &mutations);
        let verdict = verify_bundle(&bytes, None);
        if bytes == original {
            prop_assert!(verdict.is_ok());
        } else {
            prop_assert!(verdict.is_err(), "a changed bundle verified");
        }
    }

    /// A bundle with any of its numbers — seqs, versions, step indices,
    /// timeouts, counts in the evidence — set to an extreme, written in
    /// canonical form so that every check behind the form runs: unless the
    /// number was already that, it does not verify; it never panics.
    #[test]
    fn the_bundle_verifier_takes_any_number(nth in any::<usize>(), extreme in 0..WIDE.len()) {
        let original = bundle_bytes();
        let mut bundle: AuditBundle = serde_json::from_slice(original).unwrap();
        let mut slots = number_slots(&mut bundle);
        let changed = slots.swap_remove(nth % slots.len()).set(WIDE[extreme]);
        let bytes = bundle.to_bytes();
        let verdict = verify_bundle(&bytes, None);
        prop_assert_eq!(verdict.is_ok(), !changed, "{:?}", verdict.err());
    }

    /// Stored events of any kind, version, time and payload decode or are
    /// refused with an error.
    #[test]
    fn the_event_decoder_takes_any_record(
        kind in prop_oneof![
            prop::sample::select(&job_executor::events::EVENT_KINDS[..]).prop_map(str::to_owned),
            ".{0,12}",
        ],
        schema_version in prop_oneof![Just(1u32), Just(2), any::<u32>()],
        recorded_at in prop_oneof![
            Just("2000-01-01T00:00:00.000000Z".to_owned()),
            "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{6}Z",
            ".{0,30}",
        ],
        payload_mutations in prop::collection::vec(mutation(), 0..4),
        seq in prop_oneof![Just(u64::MAX), Just(0), Just(1), Just(i64::MAX as u64 + 1), any::<u64>()],
    ) {
        let payload = mutate(
            br#"{"step_index":4294967295,"failure":{"kind":"timeout","message":"m"},"output":null,"health_after":null}"#,
            &payload_mutations,
        );
        let record = EventRecord {
            seq,
            kind,
            schema_version,
            recorded_at,
            payload: String::from_utf8_lossy(&payload).into_owned(),
            ..EventRecord::default()
        };
        let _ = record.decode();
        let _ = record.to_json_line();
        let report = job_executor::verify::verify_job(record.job_id, std::slice::from_ref(&record), &VerifyOptions::default());
        prop_assert!(!report.is_ok() || seq == 1);
    }
}

/// A value of any SQLite type, biased to what the columns usually hold.
fn sql_value(usual: impl Strategy<Value = Sql> + 'static) -> impl Strategy<Value = Sql> {
    prop_oneof![
        6 => usual,
        1 => Just(Sql::Null),
        1 => any::<i64>().prop_map(Sql::Integer),
        1 => prop::collection::vec(any::<u8>(), 0..8).prop_map(Sql::Blob),
        1 => ".{0,40}".prop_map(Sql::Text),
        1 => any::<f64>().prop_map(Sql::Real),
    ]
}

fn text(s: &'static str) -> impl Strategy<Value = Sql> {
    Just(Sql::Text(s.to_owned()))
}

/// A row of the events table, with anything in any column.
fn row() -> impl Strategy<Value = Vec<Sql>> {
    (
        sql_value((1i64..50).prop_map(Sql::Integer)),
        sql_value(prop::sample::select(vec![
            Sql::Text(Uuid::from_u128(1).to_string()),
            Sql::Text(Uuid::from_u128(2).to_string()),
        ])),
        sql_value((1i64..3).prop_map(Sql::Integer)),
        sql_value(prop_oneof![
            (1i64..6).prop_map(Sql::Integer),
            Just(Sql::Integer(i64::MAX)),
            Just(Sql::Integer(i64::MIN))
        ]),
        sql_value(prop::sample::select(
            job_executor::events::EVENT_KINDS
                .iter()
                .map(|k| Sql::Text((*k).to_owned()))
                .collect::<Vec<_>>(),
        )),
        sql_value(prop_oneof![
            Just(Sql::Integer(2)),
            Just(Sql::Integer(1)),
            Just(Sql::Integer(i64::MAX))
        ]),
        sql_value(text("2000-01-01T00:00:00.000000Z")),
        sql_value(text(r#"{"step_index":0}"#)),
        sql_value(prop_oneof![
            Just(Sql::Null),
            text("0000000000000000000000000000000000000000000000000000000000000000")
        ]),
        sql_value(Just(Sql::Null)),
    )
        .prop_map(|(a, b, c, d, e, f, g, h, i, j)| vec![a, b, c, d, e, f, g, h, i, j])
}

/// A file that claims to be a current job-executor log, with an events
/// table of the right columns but none of the checks: anything can be in it.
fn lawless_log(path: &Path, rows: &[Vec<Sql>]) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch(
        "CREATE TABLE events (position ANY, job_id ANY, job_no ANY, seq ANY, kind ANY,
             schema_version ANY, recorded_at ANY, payload ANY, digest ANY, mac ANY);",
    )
    .unwrap();
    conn.pragma_update(None, "application_id", APPLICATION_ID)
        .unwrap();
    conn.pragma_update(None, "user_version", DB_SCHEMA_VERSION)
        .unwrap();
    for row in rows {
        conn.execute(
            "INSERT INTO events VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            rusqlite::params_from_iter(row.iter()),
        )
        .unwrap();
    }
}

proptest! {
    #![proptest_config(config(256, "proptest-regressions/fuzz-rows.txt"))]

    /// Every reader of a log — listing, loading, replaying, verifying —
    /// takes rows of any type and value: each row is read or reported,
    /// never a panic, never silently dropped.
    #[test]
    fn the_row_decoder_takes_any_row(rows in prop::collection::vec(row(), 1..12)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lawless.db");
        lawless_log(&path, &rows);
        let store = common::reader(&path);
        let mut events = 0;
        let scanned = store.scan(&mut |_, _| events += 1);
        if scanned.is_ok() {
            prop_assert_eq!(events, rows.len());
        }
        if let Ok(ids) = store.job_ids() {
            for id in ids {
                let _ = store.load_job(id);
                let _ = job_executor::replay(&store, id);
            }
        }
        let _ = store.unfinished_jobs();
        let _ = store.last_position();
        let _ = replay_all(&store, |_, _| {});
        let mut reported = 0;
        let verified = verify_store(&store, &VerifyOptions::default(), |r| reported += r.events, |_| {});
        if let Ok(summary) = verified {
            prop_assert_eq!(summary.events as usize, rows.len());
        }
        drop(store);
        // Opening it for writing migrates nothing (it claims to be current)
        // and refuses or accepts it without a panic.
        let _ = SqliteStore::open(&path).map(|s| s.job_ids());
    }
}

// Inputs the fuzzers found, kept as plain tests.

/// A stored (or bundled) seq of u64::MAX is reported: the seq expected
/// after it is not computed as `seq + 1`, which would overflow.
#[test]
fn a_seq_of_u64_max_is_reported_not_overflowed() {
    let record = EventRecord {
        seq: u64::MAX,
        kind: "JobStarted".into(),
        schema_version: 2,
        recorded_at: "2000-01-01T00:00:00.000000Z".into(),
        payload: "{}".into(),
        ..EventRecord::default()
    };
    let report = job_executor::verify::verify_job(
        record.job_id,
        &[record.clone(), record],
        &VerifyOptions::default(),
    );
    assert!(!report.is_ok());
    let mut bundle: AuditBundle = serde_json::from_slice(bundle_bytes()).unwrap();
    bundle.events[2].seq = u64::MAX;
    assert!(verify_bundle(&bundle.to_bytes(), None).is_err());
}

/// Seqs past what a database integer holds are refused at the door, not
/// cast into negative numbers.
#[test]
fn a_seq_beyond_the_log_is_refused_by_every_store() {
    let job = Uuid::from_u128(3);
    let mut records = common::records(job, &common::completed_log(0));
    for record in &mut records {
        record.seq += job_executor::store::SEQ_MAX;
    }
    for store in [
        Arc::new(SqliteStore::open_in_memory().unwrap()) as Arc<dyn EventStore>,
        Arc::new(job_executor::store::MemoryStore::new()),
    ] {
        let err = store.append(&records).unwrap_err();
        assert!(err.to_string().contains("beyond the largest"), "{err}");
        assert_eq!(store.last_seq(job).unwrap(), 0);
    }
}

/// A logical clock ticking past the end of representable time stays there.
#[test]
fn a_logical_clock_saturates_at_the_end_of_time() {
    use job_executor::clock::Clock;
    let clock = LogicalClock::new(
        chrono::DateTime::<chrono::Utc>::MAX_UTC - chrono::TimeDelta::seconds(1),
        chrono::TimeDelta::days(365),
    );
    assert!(clock.now() < clock.now() || clock.now() == chrono::DateTime::<chrono::Utc>::MAX_UTC);
    assert_eq!(clock.now(), chrono::DateTime::<chrono::Utc>::MAX_UTC);
}
