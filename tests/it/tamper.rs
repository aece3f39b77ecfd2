//! Property: any single change made directly in the database, with the
//! guards dropped, is reported by `verify` with the right job and seq; an
//! untouched log always passes — in a SQLite file and in a PostgreSQL
//! schema, each changed with that database's own tools (an [`Attacker`]).
//!
//! The changes: a changed byte in any column the chain covers (job_id, seq,
//! kind, schema_version, recorded_at, payload, digest, and mac in keyed mode),
//! a deleted event, two events swapped, an event inserted, and the tail cut
//! (caught with the heads an auditor kept, `--expect`). `position` and
//! `job_no` are the store's index of the whole log, not part of any job's
//! evidence, and are not covered by the chain (see ARCHITECTURE.md).

use crate::common;

use std::collections::HashMap;
use std::sync::Arc;

use common::backend::{self, Backend};
use job_executor::chain::{Digest, HeadKey};
use job_executor::clock::LogicalClock;
use job_executor::events::EventRecord;
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

fn write_log(log: &Backend, jobs: &[Vec<bool>], keyed: bool) -> Vec<Uuid> {
    let mut builder = JobExecutor::builder()
        .store(log.open_for_speed())
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

fn verify(log: &Backend, options: &VerifyOptions) -> Vec<JobReport> {
    let mut reports = Vec::new();
    verify_store(log.reader().as_ref(), options, |r| reports.push(r), |_| {}).unwrap();
    reports
}

/// What an attacker holding the database can do once its guards are
/// dropped: one implementation per store, each change made in that
/// database's own terms. Events are named by their `position`.
trait Attacker {
    /// The position of the job's event at `seq`.
    fn position(&mut self, job: Uuid, seq: u64) -> i64;
    /// A text column (`job_id` as text), `None` when NULL.
    fn text(&mut self, position: i64, column: &str) -> Option<String>;
    /// Writes a text column; `false` when the database refuses the value.
    fn set_text(&mut self, position: i64, column: &str, value: &str) -> bool;
    /// Writes the seq; `false` when the database refuses it (a seq the job
    /// already has).
    fn set_seq(&mut self, position: i64, seq: i64) -> bool;
    /// Flips one bit of the schema version.
    fn flip_schema_version(&mut self, position: i64, bit: u8) -> bool;
    fn delete(&mut self, position: i64);
    /// Swaps a column's values between two events.
    fn swap(&mut self, a: i64, b: i64, column: &str);
    /// See [`common::insert_renumbered`].
    fn insert_renumbered(&mut self, records: &[EventRecord], seq: u64, forge_digest: bool);
    /// Deletes the job's events from `seq` on.
    fn cut_tail(&mut self, job: Uuid, seq: u64);
}

/// The SQLite file, its triggers dropped and CHECK constraints ignored.
struct SqliteAttacker(Connection);

impl SqliteAttacker {
    fn new(log: &Backend) -> Self {
        let raw = Connection::open(log.path()).unwrap();
        raw.execute_batch(
            "DROP TRIGGER events_no_update; DROP TRIGGER events_no_delete;
             DROP TRIGGER events_insert;
             PRAGMA ignore_check_constraints = ON;",
        )
        .unwrap();
        SqliteAttacker(raw)
    }
}

impl Attacker for SqliteAttacker {
    fn position(&mut self, job: Uuid, seq: u64) -> i64 {
        self.0
            .query_row(
                "SELECT position FROM events WHERE job_id = ?1 AND seq = ?2",
                params![job.to_string(), seq as i64],
                |r| r.get(0),
            )
            .unwrap()
    }

    fn text(&mut self, position: i64, column: &str) -> Option<String> {
        self.0
            .query_row(
                &format!("SELECT {column} FROM events WHERE position = ?1"),
                [position],
                |r| r.get(0),
            )
            .unwrap()
    }

    fn set_text(&mut self, position: i64, column: &str, value: &str) -> bool {
        self.0
            .execute(
                &format!("UPDATE events SET {column} = ?2 WHERE position = ?1"),
                params![position, value],
            )
            .is_ok()
    }

    fn set_seq(&mut self, position: i64, seq: i64) -> bool {
        self.0
            .execute(
                "UPDATE events SET seq = ?2 WHERE position = ?1",
                params![position, seq],
            )
            .is_ok()
    }

    fn flip_schema_version(&mut self, position: i64, bit: u8) -> bool {
        self.0
            .execute(
                "UPDATE events SET schema_version = (schema_version | ?2) - (schema_version & ?2)
                 WHERE position = ?1",
                params![position, 1i64 << bit],
            )
            .is_ok()
    }

    fn delete(&mut self, position: i64) {
        self.0
            .execute("DELETE FROM events WHERE position = ?1", [position])
            .unwrap();
    }

    fn swap(&mut self, a: i64, b: i64, column: &str) {
        self.0
            .execute(
                &format!(
                    "UPDATE events SET {column} = CASE position
                       WHEN ?1 THEN (SELECT {column} FROM events WHERE position = ?2)
                       ELSE (SELECT {column} FROM events WHERE position = ?1) END
                     WHERE position IN (?1, ?2)"
                ),
                params![a, b],
            )
            .unwrap();
    }

    fn insert_renumbered(&mut self, records: &[EventRecord], seq: u64, forge_digest: bool) {
        common::insert_renumbered(&self.0, records, seq, forge_digest);
    }

    fn cut_tail(&mut self, job: Uuid, seq: u64) {
        self.0
            .execute(
                "DELETE FROM events WHERE job_id = ?1 AND seq >= ?2",
                params![job.to_string(), seq as i64],
            )
            .unwrap();
    }
}

/// The PostgreSQL schema, its user triggers disabled and its CHECK
/// constraints dropped. `job_id` is a `uuid` there: an edit that leaves
/// no UUID is refused by the column type itself.
struct PgAttacker(postgres::Client);

impl PgAttacker {
    fn new(log: &Backend) -> Self {
        let mut raw = log.schema().client();
        raw.batch_execute("ALTER TABLE events DISABLE TRIGGER USER")
            .unwrap();
        let checks: Vec<String> = raw
            .query(
                "SELECT conname::text FROM pg_constraint
                 WHERE conrelid = 'events'::regclass AND contype = 'c'",
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert!(
            !checks.is_empty(),
            "the events table has CHECK constraints to drop"
        );
        for check in checks {
            raw.batch_execute(&format!("ALTER TABLE events DROP CONSTRAINT \"{check}\""))
                .unwrap();
        }
        PgAttacker(raw)
    }
}

impl Attacker for PgAttacker {
    fn position(&mut self, job: Uuid, seq: u64) -> i64 {
        self.0
            .query_one(
                "SELECT position FROM events WHERE job_id = $1 AND seq = $2",
                &[&job, &(seq as i64)],
            )
            .unwrap()
            .get(0)
    }

    fn text(&mut self, position: i64, column: &str) -> Option<String> {
        self.0
            .query_one(
                &format!("SELECT {column}::text FROM events WHERE position = $1"),
                &[&position],
            )
            .unwrap()
            .get(0)
    }

    fn set_text(&mut self, position: i64, column: &str, value: &str) -> bool {
        let column_type = if column == "job_id" { "uuid" } else { "text" };
        self.0
            .execute(
                &format!(
                    "UPDATE events SET {column} = CAST($2::text AS {column_type})
                     WHERE position = $1"
                ),
                &[&position, &value],
            )
            .is_ok()
    }

    fn set_seq(&mut self, position: i64, seq: i64) -> bool {
        self.0
            .execute(
                "UPDATE events SET seq = $2 WHERE position = $1",
                &[&position, &seq],
            )
            .is_ok()
    }

    fn flip_schema_version(&mut self, position: i64, bit: u8) -> bool {
        self.0
            .execute(
                "UPDATE events SET schema_version = (schema_version | $2) - (schema_version & $2)
                 WHERE position = $1",
                &[&position, &(1i32 << bit)],
            )
            .is_ok()
    }

    fn delete(&mut self, position: i64) {
        self.0
            .execute("DELETE FROM events WHERE position = $1", &[&position])
            .unwrap();
    }

    fn swap(&mut self, a: i64, b: i64, column: &str) {
        self.0
            .execute(
                &format!(
                    "UPDATE events SET {column} = CASE position
                       WHEN $1 THEN (SELECT {column} FROM events WHERE position = $2)
                       ELSE (SELECT {column} FROM events WHERE position = $1) END
                     WHERE position IN ($1, $2)"
                ),
                &[&a, &b],
            )
            .unwrap();
    }

    fn insert_renumbered(&mut self, records: &[EventRecord], seq: u64, forge_digest: bool) {
        common::insert_renumbered_pg(&mut self.0, records, seq, forge_digest);
    }

    fn cut_tail(&mut self, job: Uuid, seq: u64) {
        self.0
            .execute(
                "DELETE FROM events WHERE job_id = $1 AND seq >= $2",
                &[&job, &(seq as i64)],
            )
            .unwrap();
    }
}

fn attacker(log: &Backend) -> Box<dyn Attacker> {
    match log {
        Backend::Sqlite { .. } => Box::new(SqliteAttacker::new(log)),
        Backend::Postgres(_) => Box::new(PgAttacker::new(log)),
    }
}

/// Replaces the character at `offset` (mod its length) of a text column.
fn edit_text(
    raw: &mut dyn Attacker,
    position: i64,
    column: &str,
    offset: usize,
    with: char,
) -> bool {
    let Some(text) = raw.text(position, column) else {
        return false;
    };
    let chars: Vec<char> = text.chars().collect();
    let at = offset % chars.len();
    if chars[at] == with {
        return false;
    }
    let mut edited = chars;
    edited[at] = with;
    let edited: String = edited.into_iter().collect();
    raw.set_text(position, column, &edited)
}

/// Applies the mutation to event `seq` of `job`. Returns the seq that must be
/// reported, or `None` when the mutation could not be applied (a UNIQUE
/// index the attacker cannot drop, a column type, a no-op edit).
fn apply(log: &Backend, job: Uuid, seq: u64, last: u64, mutation: &Mutation) -> Option<u64> {
    let records = log.reader().load_job(job).unwrap();
    let mut raw = attacker(log);
    let raw = raw.as_mut();
    let position = raw.position(job, seq);
    match mutation {
        Mutation::EditByte {
            column,
            offset,
            replacement,
        } => {
            let applied = match column {
                Column::JobId => edit_text(raw, position, "job_id", *offset, *replacement),
                Column::Kind => edit_text(raw, position, "kind", *offset, *replacement),
                Column::RecordedAt => {
                    edit_text(raw, position, "recorded_at", *offset, *replacement)
                }
                Column::Payload => edit_text(raw, position, "payload", *offset, *replacement),
                Column::Digest => edit_text(raw, position, "digest", *offset, *replacement),
                Column::Mac => edit_text(raw, position, "mac", *offset, *replacement),
                Column::Seq(bit) => {
                    let new = seq ^ (1 << bit);
                    new >= 1 && raw.set_seq(position, new as i64)
                }
                Column::SchemaVersion(bit) => raw.flip_schema_version(position, *bit),
            };
            applied.then_some(seq)
        }
        Mutation::Delete => {
            raw.delete(position);
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
            let other_position = raw.position(job, other);
            for column in columns {
                raw.swap(position, other_position, column);
            }
            Some(seq.min(other))
        }
        Mutation::Insert { forge_digest } => {
            raw.insert_renumbered(&records, seq, *forge_digest);
            Some(seq)
        }
        Mutation::CutTail => {
            raw.cut_tail(job, seq);
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

/// The heads of `jobs` an auditor keeps.
fn kept_heads(log: &Backend, jobs: &[Uuid]) -> HashMap<Uuid, Digest> {
    let reader = log.reader();
    jobs.iter()
        .map(|&j| (j, replay(reader.as_ref(), j).unwrap().head))
        .collect()
}

/// The seq of the event to change, of the `last` of its job; rejects the
/// cases a mutation cannot apply to.
fn target_seq(
    mutation: &Mutation,
    event: &prop::sample::Index,
    last: u64,
    keyed: bool,
) -> Result<u64, TestCaseError> {
    let mut seq = 1 + event.index(last as usize) as u64;
    if matches!(mutation, Mutation::CutTail) {
        seq = seq.max(2); // a log cut to nothing has no job left to name
        prop_assume!(seq <= last);
    }
    if matches!(
        mutation,
        Mutation::EditByte {
            column: Column::Mac,
            ..
        }
    ) {
        prop_assume!(keyed);
    }
    Ok(seq)
}

/// Whether the mutation of event `seq` (of `last`) only shortens the job's
/// log: a cut tail, or a last event deleted or moved away to another job id
/// (which is the same thing for this job). Only a kept head reveals it.
fn cuts_the_tail(mutation: &Mutation, seq: u64, last: u64) -> bool {
    matches!(mutation, Mutation::CutTail)
        || (seq == last
            && matches!(
                mutation,
                Mutation::Delete
                    | Mutation::EditByte {
                        column: Column::JobId | Column::Seq(_),
                        ..
                    }
            ))
}

#[test]
fn verify_finds_every_single_change() {
    let test = "verify_finds_every_single_change";
    let config = Config {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/tamper.txt",
        ))),
        ..Config::default()
    };
    for backend in Backend::all(test) {
        let case = (
            jobs(),
            any::<bool>(),
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
            mutation(),
        );
        backend::check_fresh(
            &backend,
            test,
            config.clone(),
            case,
            |(plans, keyed, target, event, mutation), log| {
                let jobs = write_log(log, &plans, keyed);
                let job = jobs[target.index(jobs.len())];
                let plain = VerifyOptions::default().with_key(keyed.then(key));
                let with_heads = plain.clone().with_expected_heads(kept_heads(log, &jobs));

                // Untouched: everything passes, with or without the kept heads.
                prop_assert!(verify(log, &plain).iter().all(JobReport::is_ok));
                prop_assert!(verify(log, &with_heads).iter().all(JobReport::is_ok));

                let last = log.reader().last_seq(job).unwrap();
                let seq = target_seq(&mutation, &event, last, keyed)?;
                let Some(expected_seq) = apply(log, job, seq, last, &mutation) else {
                    return Err(TestCaseError::reject("mutation not applicable"));
                };

                // With the heads an auditor kept, every change is found at its seq.
                let found = first_violation_seq(&verify(log, &with_heads), job);
                prop_assert_eq!(
                    found,
                    Some(expected_seq),
                    "{:?} at seq {} of {}",
                    mutation,
                    seq,
                    last
                );

                // Without them, all but a cut tail.
                if !cuts_the_tail(&mutation, seq, last) {
                    let found = first_violation_seq(&verify(log, &plain), job);
                    prop_assert_eq!(
                        found,
                        Some(expected_seq),
                        "{:?} at seq {} of {} (no heads)",
                        mutation,
                        seq,
                        last
                    );
                }
                Ok(())
            },
        );
    }
}
