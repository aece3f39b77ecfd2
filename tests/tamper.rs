//! Property: any single change made directly in the SQLite file, with the
//! guards dropped, is reported by `verify` with the right job and seq; an
//! untouched log always passes.
//!
//! The changes: a changed byte in any column the chain covers (job_id, seq,
//! kind, schema_version, recorded_at, payload, digest, and mac in keyed mode),
//! a deleted event, two events swapped, an event inserted, and the tail cut
//! (caught with the heads an auditor kept, `--expect`). `position` and
//! `job_no` are the store's index of the whole log, not part of any job's
//! evidence, and are not covered by the chain (see ARCHITECTURE.md).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use job_executor::chain::{Digest, HeadKey};
use job_executor::clock::LogicalClock;
use job_executor::store::{EventStore, SqliteOptions, SqliteStore, Synchronous};
use job_executor::verify::{JobReport, VerifyOptions, verify_store};
use job_executor::{FailingHandler, JobExecutor, JobStep, NoOpHandler, replay};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use rusqlite::{Connection, params};
use uuid::Uuid;

fn key() -> HeadKey {
    HeadKey::new(*b"property-test key of 32 bytes!!!").unwrap()
}

#[derive(Clone, Debug)]
enum Column {
    JobId,
    Seq(u8),
    Kind,
    SchemaVersion(u8),
    RecordedAt,
    Payload,
    Digest,
    Mac,
}

#[derive(Clone, Debug)]
enum Mutation {
    EditByte {
        column: Column,
        offset: usize,
        replacement: char,
    },
    Delete,
    Swap {
        other: usize,
        with_digests: bool,
    },
    Insert {
        forge_digest: bool,
    },
    CutTail,
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let column = prop_oneof![
        Just(Column::JobId),
        (0u8..6).prop_map(Column::Seq),
        Just(Column::Kind),
        (0u8..3).prop_map(Column::SchemaVersion),
        Just(Column::RecordedAt),
        Just(Column::Payload),
        Just(Column::Digest),
        Just(Column::Mac),
    ];
    let replacement = prop::sample::select(&['0', '7', 'a', 'f', 'x', 'Z', '"', ' '][..]);
    prop_oneof![
        4 => (column, any::<usize>(), replacement).prop_map(|(column, offset, replacement)| {
            Mutation::EditByte { column, offset, replacement }
        }),
        1 => Just(Mutation::Delete),
        1 => (any::<usize>(), any::<bool>())
            .prop_map(|(other, with_digests)| Mutation::Swap { other, with_digests }),
        1 => any::<bool>().prop_map(|forge_digest| Mutation::Insert { forge_digest }),
        1 => Just(Mutation::CutTail),
    ]
}

/// Job plans: step outcomes, true = succeeds.
fn jobs() -> impl Strategy<Value = Vec<Vec<bool>>> {
    prop::collection::vec(
        prop::collection::vec(prop::bool::weighted(0.85), 0..=6),
        1..=3,
    )
}

fn write_log(path: &Path, jobs: &[Vec<bool>], keyed: bool) -> Vec<Uuid> {
    let options = SqliteOptions::default().with_synchronous(Synchronous::Normal);
    let store = Arc::new(SqliteStore::open_with(path, &options).unwrap());
    let mut builder = JobExecutor::builder()
        .store(store)
        .clock(Arc::new(LogicalClock::default()));
    if keyed {
        builder = builder.head_key(key());
    }
    let mut executor = builder.build();
    executor.register_handler("ok", NoOpHandler);
    executor.register_handler("fail", FailingHandler::default());
    jobs.iter()
        .enumerate()
        .map(|(n, outcomes)| {
            let job_id = Uuid::from_u128(0xA000 + n as u128);
            let steps: Vec<JobStep> = outcomes
                .iter()
                .enumerate()
                .map(|(i, ok)| JobStep::new(i as u32, if *ok { "ok" } else { "fail" }, "t"))
                .collect();
            executor
                .execute_job(job_id, Uuid::nil(), &steps, None, "prop")
                .unwrap();
            job_id
        })
        .collect()
}

fn reopen(path: &Path) -> SqliteStore {
    common::reader(path)
}

fn verify(path: &Path, options: &VerifyOptions) -> Vec<JobReport> {
    let mut reports = Vec::new();
    verify_store(&reopen(path), options, |r| reports.push(r), |_| {}).unwrap();
    reports
}

fn tamper(path: &Path) -> Connection {
    let raw = Connection::open(path).unwrap();
    raw.execute_batch(
        "DROP TRIGGER events_no_update; DROP TRIGGER events_no_delete;
         DROP TRIGGER events_insert;
         PRAGMA ignore_check_constraints = ON;",
    )
    .unwrap();
    raw
}

/// Replaces the character at `offset` (mod its length) of a text column.
fn edit_text(raw: &Connection, position: i64, column: &str, offset: usize, with: char) -> bool {
    let text: Option<String> = raw
        .query_row(
            &format!("SELECT {column} FROM events WHERE position = ?1"),
            [position],
            |r| r.get(0),
        )
        .unwrap();
    let Some(text) = text else { return false };
    let chars: Vec<char> = text.chars().collect();
    let at = offset % chars.len();
    if chars[at] == with {
        return false;
    }
    let mut edited = chars;
    edited[at] = with;
    let edited: String = edited.into_iter().collect();
    raw.execute(
        &format!("UPDATE events SET {column} = ?2 WHERE position = ?1"),
        params![position, edited],
    )
    .is_ok()
}

/// Applies the mutation to event `seq` of `job`. Returns the seq that must be
/// reported, or `None` when the mutation could not be applied (a UNIQUE
/// index the attacker cannot drop, a no-op edit).
fn apply(path: &Path, job: Uuid, seq: u64, last: u64, mutation: &Mutation) -> Option<u64> {
    let raw = tamper(path);
    let job_text = job.to_string();
    let position: i64 = raw
        .query_row(
            "SELECT position FROM events WHERE job_id = ?1 AND seq = ?2",
            params![job_text, seq as i64],
            |r| r.get(0),
        )
        .unwrap();
    match mutation {
        Mutation::EditByte {
            column,
            offset,
            replacement,
        } => {
            let applied = match column {
                Column::JobId => edit_text(&raw, position, "job_id", *offset, *replacement),
                Column::Kind => edit_text(&raw, position, "kind", *offset, *replacement),
                Column::RecordedAt => edit_text(&raw, position, "recorded_at", *offset, *replacement),
                Column::Payload => edit_text(&raw, position, "payload", *offset, *replacement),
                Column::Digest => edit_text(&raw, position, "digest", *offset, *replacement),
                Column::Mac => edit_text(&raw, position, "mac", *offset, *replacement),
                Column::Seq(bit) => {
                    let new = seq ^ (1 << bit);
                    new >= 1
                        && raw
                            .execute(
                                "UPDATE events SET seq = ?2 WHERE position = ?1",
                                params![position, new as i64],
                            )
                            .is_ok()
                }
                Column::SchemaVersion(bit) => raw
                    .execute(
                        "UPDATE events SET schema_version = (schema_version | ?2) - (schema_version & ?2) WHERE position = ?1",
                        params![position, 1i64 << bit],
                    )
                    .is_ok(),
            };
            applied.then_some(seq)
        }
        Mutation::Delete => {
            raw.execute("DELETE FROM events WHERE position = ?1", [position])
                .unwrap();
            Some(seq)
        }
        Mutation::Swap {
            other,
            with_digests,
        } => {
            let other = 1 + (*other as u64 % last);
            if other == seq {
                return None;
            }
            let columns: &[&str] = if *with_digests {
                &[
                    "kind",
                    "schema_version",
                    "recorded_at",
                    "payload",
                    "digest",
                    "mac",
                ]
            } else {
                &["kind", "schema_version", "recorded_at", "payload"]
            };
            let other_position: i64 = raw
                .query_row(
                    "SELECT position FROM events WHERE job_id = ?1 AND seq = ?2",
                    params![job_text, other as i64],
                    |r| r.get(0),
                )
                .unwrap();
            for column in columns {
                raw.execute(
                    &format!(
                        "UPDATE events SET {column} = CASE position
                           WHEN ?1 THEN (SELECT {column} FROM events WHERE position = ?2)
                           ELSE (SELECT {column} FROM events WHERE position = ?1) END
                         WHERE position IN (?1, ?2)"
                    ),
                    params![position, other_position],
                )
                .unwrap();
            }
            Some(seq.min(other))
        }
        Mutation::Insert { forge_digest } => {
            let records = reopen(path).load_job(job).unwrap();
            common::insert_renumbered(&raw, &records, seq, *forge_digest);
            Some(seq)
        }
        Mutation::CutTail => {
            raw.execute(
                "DELETE FROM events WHERE job_id = ?1 AND seq >= ?2",
                params![job_text, seq as i64],
            )
            .unwrap();
            Some(seq)
        }
    }
}

fn first_violation_seq(reports: &[JobReport], job: Uuid) -> Option<u64> {
    reports
        .iter()
        .find(|r| r.job_id == job)
        .and_then(|r| r.violations.first())
        .map(|v| v.seq)
}

proptest! {
    #![proptest_config(Config {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/tamper.txt",
        ))),
        ..Config::default()
    })]

    #[test]
    fn verify_finds_every_single_change(
        plans in jobs(),
        keyed in any::<bool>(),
        target in any::<prop::sample::Index>(),
        event in any::<prop::sample::Index>(),
        mutation in mutation(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let jobs = write_log(&path, &plans, keyed);
        let job = jobs[target.index(jobs.len())];
        let heads: HashMap<Uuid, Digest> = jobs
            .iter()
            .map(|&j| (j, replay(&reopen(&path), j).unwrap().head))
            .collect();
        let plain = VerifyOptions::default().with_key(keyed.then(key));
        let with_heads = plain.clone().with_expected_heads(heads);

        // Untouched: everything passes, with or without the kept heads.
        prop_assert!(verify(&path, &plain).iter().all(JobReport::is_ok));
        prop_assert!(verify(&path, &with_heads).iter().all(JobReport::is_ok));

        let last = reopen(&path).last_seq(job).unwrap();
        let mut seq = 1 + event.index(last as usize) as u64;
        if matches!(mutation, Mutation::CutTail) {
            seq = seq.max(2); // a log cut to nothing has no job left to name
            prop_assume!(seq <= last);
        }
        if matches!(mutation, Mutation::EditByte { column: Column::Mac, .. }) {
            prop_assume!(keyed);
        }
        let Some(expected_seq) = apply(&path, job, seq, last, &mutation) else {
            return Err(TestCaseError::reject("mutation not applicable"));
        };

        // With the heads an auditor kept, every change is found at its seq.
        let found = first_violation_seq(&verify(&path, &with_heads), job);
        prop_assert_eq!(found, Some(expected_seq), "{:?} at seq {} of {}", mutation, seq, last);

        // Without them, all but a cut tail (or a last event moved away to
        // another job id, which is the same thing for this job).
        let tail_only = matches!(mutation, Mutation::CutTail)
            || (seq == last
                && matches!(
                    mutation,
                    Mutation::Delete | Mutation::EditByte { column: Column::JobId | Column::Seq(_), .. }
                ));
        if !tail_only {
            let found = first_violation_seq(&verify(&path, &plain), job);
            prop_assert_eq!(found, Some(expected_seq), "{:?} at seq {} of {} (no heads)", mutation, seq, last);
        }
    }
}
