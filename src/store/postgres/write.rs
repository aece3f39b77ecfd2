//! Appends to the PostgreSQL log. A group commit's batch is first written
//! by one statement in a transaction of its own (one round trip); when the
//! server refuses it, nothing was written, and the shared batch driver
//! writes the appends again one by one, so that each fails alone.

use postgres::error::SqlState;
use postgres::types::ToSql;
use postgres::{Client, Row, Statement};
use uuid::Uuid;

use super::super::group::{AppendResult, Batched};
use super::super::sql::{self, BatchWriter};
use super::super::{Fence, StoreError};
use super::{Conn, LAST_SEQ, PgStore, error_text};
use crate::events::EventRecord;

impl PgStore {
    /// Writes every append of `batch` in one transaction and returns one
    /// result per append: the whole batch in one statement, or, when the
    /// server refuses it, each append decided alone. A commit whose
    /// outcome cannot be known (the connection dropped during COMMIT)
    /// leaves every append of it unknown.
    pub(super) fn commit_batch(&self, batch: &[Batched<'_>]) -> Vec<AppendResult> {
        let mut writer = match self.writer() {
            Ok(writer) => writer,
            Err(e) => return fail_all(batch, &e),
        };
        let Some(conn) = writer.as_mut() else {
            return fail_all(batch, &self.lost("the writer is gone"));
        };
        match self.attempt_whole(conn, batch) {
            Whole::Done(positions) => return positions.into_iter().map(Ok).collect(),
            Whole::Failed(error) => return fail_all(batch, &error),
            // Nothing was written: decide each append on its own.
            Whole::Refused => {}
        }
        let statements = (
            conn.prepared(FENCE),
            conn.prepared(HEAD),
            conn.prepared(INSERT),
        );
        let (fence, head, insert) = match statements {
            (Ok(f), Ok(h), Ok(i)) => (f, h, i),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                return fail_all(batch, &self.classify("appending events", e));
            }
        };
        let mut writer = Writer {
            store: self,
            conn,
            fence,
            head,
            insert,
            open: false,
            position: 0,
            job_no: 0,
        };
        sql::commit_batch(&mut writer, batch)
    }

    /// The common case in one statement: every append of the batch written
    /// by one INSERT that also takes the head row's positions, in a
    /// transaction of its own (one round trip) when no append is fenced.
    /// Anything refused — a lost fence, a conflict, a broken rule — leaves
    /// nothing written, and the batch driver then decides each append
    /// alone.
    fn attempt_whole(&self, conn: &mut Conn, batch: &[Batched<'_>]) -> Whole {
        let whole = match conn.prepared(WHOLE) {
            Ok(whole) => whole,
            Err(e) => return Whole::Failed(self.classify("appending events", e)),
        };
        let rows = WholeRows::new(batch);
        let params = rows.params();
        let fences: Vec<Fence> = batch.iter().filter_map(|append| append.fence).collect();
        let outcome = if fences.is_empty() {
            // Autocommit: the statement is its own transaction.
            conn.client.query_one(&whole, &params)
        } else {
            match self.whole_fenced(conn, &fences, &whole, &params) {
                Ok(outcome) => outcome,
                Err(decided) => return decided,
            }
        };
        let row = match outcome {
            Ok(row) => row,
            // The server refused it: nothing was committed.
            Err(e) if e.as_db_error().is_some() && !e.is_closed() => return Whole::Refused,
            Err(e) => {
                return Whole::Failed(StoreError::OutcomeUnknown {
                    detail: format!(
                        "{}: the connection failed during a commit: {}",
                        self.target,
                        error_text(&e)
                    ),
                });
            }
        };
        let mut next: i64 = row.get(0);
        Whole::Done(
            batch
                .iter()
                .map(|append| {
                    (0..append.records.len())
                        .map(|_| {
                            next += 1;
                            next.cast_unsigned()
                        })
                        .collect()
                })
                .collect(),
        )
    }

    /// The whole batch in a transaction that first reads every fenced
    /// job's epoch under a share lock; `Err` when that decides the batch
    /// (a lost fence: refused; a failed read: failed).
    fn whole_fenced(
        &self,
        conn: &mut Conn,
        fences: &[Fence],
        whole: &Statement,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Result<Row, postgres::Error>, Whole> {
        let failed = |e| Whole::Failed(self.classify("appending events", e));
        let fence_check = conn.prepared(FENCES).map_err(failed)?;
        let mut tx = conn.client.transaction().map_err(failed)?;
        let ids: Vec<Uuid> = fences.iter().map(|f| f.job_id).collect();
        let held = match tx.query(&fence_check, &[&ids]) {
            Ok(rows) => rows,
            Err(e) if e.as_db_error().is_some() => return Err(Whole::Refused),
            Err(e) => return Err(failed(e)),
        };
        let epoch = |job: Uuid| {
            held.iter()
                .find(|row| row.get::<_, Uuid>(0) == job)
                .and_then(|row| u64::try_from(row.get::<_, i64>(1)).ok())
        };
        if fences.iter().any(|f| epoch(f.job_id) != Some(f.epoch)) {
            return Err(Whole::Refused);
        }
        match tx.query_one(whole, params) {
            Ok(row) => Ok(tx.commit().map(|()| row)),
            Err(e) if e.as_db_error().is_some() => Err(Whole::Refused),
            Err(e) => Err(failed(e)),
        }
    }
}

/// What writing a whole batch in one statement came to.
enum Whole {
    /// Written and committed: each append's positions.
    Done(Vec<Vec<u64>>),
    /// Refused by the server (or a lost fence): nothing written.
    Refused,
    /// The connection failed: the outcome is the error's.
    Failed(StoreError),
}

/// A batch's rows as the columns [`WHOLE`] unnests.
struct WholeRows<'a> {
    total: i64,
    new_jobs: i64,
    job_ids: Vec<Uuid>,
    /// A starting job's rank among the batch's new jobs (1, 2, …); 0 for a
    /// job that started before.
    new_job: Vec<i64>,
    seqs: Vec<i64>,
    kinds: Vec<&'a str>,
    versions: Vec<i32>,
    times: Vec<&'a str>,
    payloads: Vec<&'a str>,
    digests: Vec<Option<&'a str>>,
    macs: Vec<Option<&'a str>>,
}

impl<'a> WholeRows<'a> {
    fn new(batch: &[Batched<'a>]) -> Self {
        let total: usize = batch.iter().map(|append| append.records.len()).sum();
        let mut rows = WholeRows {
            total: total as i64,
            new_jobs: 0,
            job_ids: Vec::with_capacity(total),
            new_job: Vec::with_capacity(total),
            seqs: Vec::with_capacity(total),
            kinds: Vec::with_capacity(total),
            versions: Vec::with_capacity(total),
            times: Vec::with_capacity(total),
            payloads: Vec::with_capacity(total),
            digests: Vec::with_capacity(total),
            macs: Vec::with_capacity(total),
        };
        for append in batch {
            let starts = starts(append.records);
            if starts {
                rows.new_jobs += 1;
            }
            let rank = if starts { rows.new_jobs } else { 0 };
            for record in append.records {
                rows.job_ids.push(record.job_id);
                rows.new_job.push(rank);
                // check_batch has bounded every seq by SEQ_MAX, which fits an i64.
                rows.seqs.push(record.seq as i64);
                rows.kinds.push(&record.kind);
                rows.versions
                    .push(i32::try_from(record.schema_version).unwrap_or(i32::MAX));
                rows.times.push(&record.recorded_at);
                rows.payloads.push(&record.payload);
                rows.digests.push(record.digest.as_deref());
                rows.macs.push(record.mac.as_deref());
            }
        }
        rows
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 11] {
        [
            &self.total,
            &self.new_jobs,
            &self.job_ids,
            &self.new_job,
            &self.seqs,
            &self.kinds,
            &self.versions,
            &self.times,
            &self.payloads,
            &self.digests,
            &self.macs,
        ]
    }
}

/// The writing connection, as the batch driver uses it, with the
/// statements it writes with and the positions and job numbers its
/// transaction took from the head row.
struct Writer<'a> {
    store: &'a PgStore,
    conn: &'a mut Conn,
    fence: Statement,
    head: Statement,
    insert: Statement,
    /// A transaction is open.
    open: bool,
    /// The last position and job number taken.
    position: i64,
    job_no: i64,
}

impl Writer<'_> {
    fn failed(&self, error: postgres::Error) -> StoreError {
        self.store.classify("appending events", error)
    }
}

impl BatchWriter for Writer<'_> {
    type Error = postgres::Error;

    fn begin(&mut self) -> Result<(), StoreError> {
        self.conn
            .client
            .batch_execute("BEGIN")
            .map_err(|e| self.failed(e))?;
        self.open = true;
        Ok(())
    }

    fn epoch(&mut self, job_id: Uuid) -> Result<Option<i64>, StoreError> {
        // Under a share lock of the job's row: a takeover (which updates
        // the row) cannot commit before this transaction.
        match self.conn.client.query_opt(&self.fence, &[&job_id]) {
            Ok(row) => Ok(row.map(|row| row.get(0))),
            Err(e) => Err(self.failed(e)),
        }
    }

    fn reserve(&mut self, appends: &[&[EventRecord]]) -> Result<(), StoreError> {
        let total: i64 = appends.iter().map(|records| records.len() as i64).sum();
        let new_jobs = appends.iter().filter(|records| starts(records)).count() as i64;
        match self.conn.client.query_one(&self.head, &[&total, &new_jobs]) {
            Ok(row) => {
                (self.position, self.job_no) = (row.get(0), row.get(1));
                Ok(())
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    fn write(&mut self, records: &[EventRecord]) -> Result<Vec<u64>, postgres::Error> {
        let count = records.len() as i64;
        let positions: Vec<i64> = (1..=count).map(|n| self.position + n).collect();
        let number = starts(records).then_some(self.job_no + 1);
        insert_rows(
            &mut self.conn.client,
            &self.insert,
            records,
            &positions,
            number,
        )?;
        self.position += count;
        if number.is_some() {
            self.job_no += 1;
        }
        Ok(positions.into_iter().map(i64::cast_unsigned).collect())
    }

    fn refuse(
        &mut self,
        records: &[EventRecord],
        ahead: Option<u64>,
        error: postgres::Error,
    ) -> StoreError {
        // The server aborted the transaction: nothing can be read in it.
        self.rollback();
        let violation = matches!(
            error.code(),
            Some(c) if *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::NOT_NULL_VIOLATION
                || c.code() == "JE003"
        );
        let conn = &mut *self.conn;
        let stored = |job_id: Uuid| {
            let statement = conn.prepared(&LAST_SEQ).ok()?;
            let row = conn.client.query_one(&statement, &[&job_id]).ok()?;
            Some(row.get::<_, i64>(0).max(0).cast_unsigned())
        };
        sql::insert_error(records, violation, stored, ahead, || {
            self.store.classify("appending events", error)
        })
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        self.open = false;
        match self.conn.client.batch_execute("COMMIT") {
            Ok(()) => Ok(()),
            Err(e) if e.is_closed() || e.as_db_error().is_none() => {
                Err(StoreError::OutcomeUnknown {
                    detail: format!(
                        "{}: the connection failed during COMMIT: {}",
                        self.store.target,
                        error_text(&e)
                    ),
                })
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    fn rollback(&mut self) {
        if std::mem::take(&mut self.open) {
            let _ = self.conn.client.batch_execute("ROLLBACK");
        }
    }
}

/// Every append of `batch` fails with `error`.
fn fail_all(batch: &[Batched<'_>], error: &StoreError) -> Vec<AppendResult> {
    vec![Err(error.clone()); batch.len()]
}

/// Whether `records` start their job.
fn starts(records: &[EventRecord]) -> bool {
    records.first().is_some_and(|r| r.seq == 1)
}

const FENCE: &str = "SELECT epoch FROM jobs WHERE job_id = $1 FOR SHARE";
const HEAD: &str = "UPDATE log_head SET position = position + $1, job_no = job_no + $2
                    RETURNING position - $1, job_no - $2";
const INSERT: &str = "INSERT INTO events
        (position, job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest, mac)
    SELECT t.position, $1,
           coalesce($2, (SELECT e.job_no FROM events e WHERE e.job_id = $1 AND e.seq = 1)),
           t.seq, t.kind, t.schema_version, t.recorded_at, t.payload, t.digest, t.mac
    FROM unnest($3::bigint[], $4::bigint[], $5::text[], $6::integer[], $7::text[], $8::text[],
                $9::text[], $10::text[])
         WITH ORDINALITY AS t(position, seq, kind, schema_version, recorded_at, payload, digest, mac, n)
    ORDER BY t.n";
/// Every fenced job's epoch, under a share lock of its row.
const FENCES: &str = "SELECT job_id, epoch FROM jobs WHERE job_id = ANY($1) FOR SHARE";
/// A whole batch: positions (and new jobs' numbers) from the head row, whose
/// lock is held to the commit, then every row, numbered in the batch's
/// order (the rules are checked once the statement's rows are all in, so
/// the order rows go in does not matter). Returns the position before the
/// first row; the insert runs to completion though nothing reads it.
const WHOLE: &str = "WITH head AS (
        UPDATE log_head SET position = position + $1, job_no = job_no + $2
        RETURNING position - $1 AS first, job_no - $2 AS last_job),
    inserted AS (
        INSERT INTO events
            (position, job_id, job_no, seq, kind, schema_version, recorded_at, payload, digest, mac)
        SELECT head.first + t.n, t.job_id,
               CASE WHEN t.new_job > 0 THEN head.last_job + t.new_job
                    ELSE (SELECT e.job_no FROM events e WHERE e.job_id = t.job_id AND e.seq = 1) END,
               t.seq, t.kind, t.schema_version, t.recorded_at, t.payload, t.digest, t.mac
        FROM head, unnest($3::uuid[], $4::bigint[], $5::bigint[], $6::text[], $7::integer[],
                          $8::text[], $9::text[], $10::text[], $11::text[])
             WITH ORDINALITY AS t(job_id, new_job, seq, kind, schema_version, recorded_at,
                                  payload, digest, mac, n))
    SELECT head.first FROM head";

/// Inserts one job's consecutive records at `positions`, as job number
/// `job_no` when they start the job (else the number its start got).
fn insert_rows(
    client: &mut Client,
    insert: &Statement,
    records: &[EventRecord],
    positions: &[i64],
    job_no: Option<i64>,
) -> Result<u64, postgres::Error> {
    let job_id = records[0].job_id;
    // check_batch has bounded every seq by SEQ_MAX, which fits an i64.
    let seqs: Vec<i64> = records.iter().map(|r| r.seq as i64).collect();
    let kinds: Vec<&str> = records.iter().map(|r| r.kind.as_str()).collect();
    let versions: Vec<i32> = records
        .iter()
        .map(|r| i32::try_from(r.schema_version).unwrap_or(i32::MAX))
        .collect();
    let times: Vec<&str> = records.iter().map(|r| r.recorded_at.as_str()).collect();
    let payloads: Vec<&str> = records.iter().map(|r| r.payload.as_str()).collect();
    let digests: Vec<Option<&str>> = records.iter().map(|r| r.digest.as_deref()).collect();
    let macs: Vec<Option<&str>> = records.iter().map(|r| r.mac.as_deref()).collect();
    client.execute(
        insert,
        &[
            &job_id, &job_no, &positions, &seqs, &kinds, &versions, &times, &payloads, &digests,
            &macs,
        ],
    )
}
