//! The checker for stored logs: hash chain, keyed heads, and invariants.
//!
//! It reads a job's stored events as they are, one at a time: it checks the
//! seq numbers, recomputes the hash chain and compares it with the stored
//! digests (and MACs, given the key), decodes each event and folds it through
//! the same state machine the executor uses. Unlike replay it does not stop
//! at the first problem: it reports the first broken link of each job's chain,
//! telling apart an edited, a deleted, an inserted event and a swapped pair,
//! and every invariant violation, each with the job id and seq number.
//!
//! [`verify_store`] streams the whole log: memory stays bounded whatever the
//! number of jobs or events.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use crate::chain::{self, Digest, HeadKey, HeadMac, leaf_hash_at, link};
use crate::events::EventRecord;
use crate::machine::{self, JobState};
use crate::model::JobStatus;
use crate::store::{EventStore, StoreError};

/// Violations kept per job; past this, the report counts the rest.
pub const VIOLATIONS_PER_JOB_MAX: usize = 100;

/// One broken rule in a stored log.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Violation {
    /// The job.
    pub job_id: Uuid,
    /// The seq of the offending event (for a cut tail, the first one missing).
    pub seq: u64,
    /// `"EXEC-001"` … `"EXEC-006"`; `"CHAIN"` for the hash chain, `"MAC"` for
    /// keyed heads, `"EXPECT"` for a head the auditor kept, `"CANCEL"` for
    /// the cancellation rules; `"LOG"` for the
    /// log's own structure (seq numbers, decodable events).
    pub check: &'static str,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "job {} seq {}: {}: {}",
            self.job_id, self.seq, self.check, self.message
        )
    }
}

/// The verdict on one job's log.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobReport {
    /// The job.
    pub job_id: Uuid,
    /// Events stored for it.
    pub events: u64,
    /// Its status as the accepted events describe it.
    pub status: JobStatus,
    /// The chain digest of its last event, as recomputed.
    pub head: Digest,
    /// Events with no stored digest (written before the chain existed and not
    /// yet sealed): their digests were computed, not compared.
    pub unsealed: u64,
    /// The violations found, in the order found (at most
    /// [`VIOLATIONS_PER_JOB_MAX`]); empty for a sound log.
    pub violations: Vec<Violation>,
    /// Violations found beyond those kept.
    pub more_violations: u64,
}

impl JobReport {
    /// Whether the log passed every check.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }
}

/// What to check beyond the chain and the invariants.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct VerifyOptions {
    /// Check every event's MAC under this key.
    pub key: Option<HeadKey>,
    /// Heads an auditor kept: each job's log must contain its head, which
    /// detects a tail cut off after the head was taken.
    pub expect: HashMap<Uuid, Digest>,
}

impl VerifyOptions {
    /// Also checks every event's MAC under `key`.
    pub fn with_key(mut self, key: Option<HeadKey>) -> Self {
        self.key = key;
        self
    }

    /// Also checks that each job's log contains the head kept for it.
    pub fn with_expected_heads(mut self, expect: HashMap<Uuid, Digest>) -> Self {
        self.expect = expect;
        self
    }
}

/// A link that did not hold, waiting for the next event to tell what happened.
struct PendingBreak {
    record: EventRecord,
    /// Digest of the event before it.
    previous: Digest,
    /// Digest of the event before that one.
    before_previous: Digest,
}

/// Checks one job's events, fed in seq order.
struct JobVerifier<'a> {
    options: &'a VerifyOptions,
    job_id: Uuid,
    state: JobState,
    expected_seq: u64,
    events: u64,
    unsealed: u64,
    /// Digest of the last event while the chain holds.
    head: Digest,
    /// Digest of the event before it.
    previous_head: Digest,
    chain_broken: bool,
    pending: Option<PendingBreak>,
    mac_reported: bool,
    expected_found: bool,
    violations: Vec<Violation>,
    more_violations: u64,
}

impl<'a> JobVerifier<'a> {
    fn new(job_id: Uuid, options: &'a VerifyOptions) -> Self {
        JobVerifier {
            options,
            job_id,
            state: JobState::new(),
            expected_seq: 1,
            events: 0,
            unsealed: 0,
            head: Digest::GENESIS,
            previous_head: Digest::GENESIS,
            chain_broken: false,
            pending: None,
            mac_reported: false,
            expected_found: false,
            violations: Vec::new(),
            more_violations: 0,
        }
    }

    fn flag(&mut self, seq: u64, check: &'static str, message: String) {
        if self.violations.len() < VIOLATIONS_PER_JOB_MAX {
            self.violations.push(Violation {
                job_id: self.job_id,
                seq,
                check,
                message,
            });
        } else {
            self.more_violations += 1;
        }
    }

    fn push(&mut self, record: &EventRecord) {
        self.events += 1;
        if let Some(pending) = self.pending.take() {
            let (seq, message) = classify(&pending, Some(record));
            self.flag(seq, "CHAIN", message);
        }
        let seq = record.seq;
        if seq != self.expected_seq {
            let message = if seq > self.expected_seq {
                format!(
                    "event deleted: seq {}..={} missing before seq {seq}",
                    self.expected_seq,
                    seq - 1
                )
            } else {
                format!(
                    "event inserted: seq {seq} appears again after seq {}",
                    self.expected_seq - 1
                )
            };
            let at = self.expected_seq.min(seq);
            if !self.chain_broken {
                self.chain_broken = true;
                self.flag(at, "CHAIN", message);
            } else {
                self.flag(at, "LOG", message);
            }
        }
        // A stored seq is untrusted: at the very top it saturates, and the
        // next event is flagged, rather than wrapping to 0.
        self.expected_seq = seq.saturating_add(1);
        self.check_chain(record);
        self.check_decode_and_machine(record);
    }

    fn check_chain(&mut self, record: &EventRecord) {
        if self.chain_broken {
            return;
        }
        let computed = chain::chain(&self.head, record);
        match &record.digest {
            None => self.unsealed += 1,
            Some(stored) if computed.matches_hex(stored) => {}
            Some(_) => {
                self.chain_broken = true;
                self.pending = Some(PendingBreak {
                    record: record.clone(),
                    previous: self.head,
                    before_previous: self.previous_head,
                });
                return;
            }
        }
        self.previous_head = self.head;
        self.head = computed;
        if self.options.expect.get(&self.job_id) == Some(&computed) {
            self.expected_found = true;
        }
        if let Some(key) = &self.options.key {
            if self.mac_reported {
                return;
            }
            let problem = match record.mac.as_deref().map(HeadMac::from_hex) {
                None => Some("no MAC: the event was not written with the key".to_owned()),
                Some(None) => Some("malformed MAC".to_owned()),
                Some(Some(tag)) if !key.verify(&computed, &tag) => Some(
                    "MAC does not authenticate the digest: written or re-chained without the key"
                        .to_owned(),
                ),
                Some(Some(_)) => None,
            };
            if let Some(message) = problem {
                self.mac_reported = true;
                self.flag(record.seq, "MAC", message);
            }
        }
    }

    fn check_decode_and_machine(&mut self, record: &EventRecord) {
        if record.job_id != self.job_id {
            self.flag(
                record.seq,
                "LOG",
                format!("event belongs to job {}", record.job_id),
            );
            return;
        }
        match record.decode() {
            Ok(recorded) => match machine::apply(self.state, &recorded.event) {
                Ok(next) => self.state = next,
                Err(refusal) => self.flag(record.seq, refusal.invariant(), refusal.to_string()),
            },
            Err(e) => self.flag(
                record.seq,
                "LOG",
                format!("malformed {} event: {e}", record.kind),
            ),
        }
    }

    fn finish(mut self) -> JobReport {
        if let Some(pending) = self.pending.take() {
            let (seq, message) = classify(&pending, None);
            self.flag(seq, "CHAIN", message);
        }
        if let Some(expected) = self.options.expect.get(&self.job_id).copied()
            && !self.expected_found
            && !self.chain_broken
        {
            self.flag(
                self.expected_seq,
                "EXPECT",
                format!(
                    "the log does not contain the expected head {expected}: events after seq {} were cut off, or the log was rewritten",
                    self.expected_seq - 1
                ),
            );
        }
        // Chain breaks are classified one event late; report in log order,
        // the chain first at each seq since it says what happened there.
        self.violations
            .sort_by_key(|v| (v.seq, !matches!(v.check, "CHAIN" | "MAC")));
        JobReport {
            job_id: self.job_id,
            events: self.events,
            status: self.state.status(),
            head: self.head,
            unsealed: self.unsealed,
            violations: self.violations,
            more_violations: self.more_violations,
        }
    }
}

fn stored_digest(record: &EventRecord) -> Option<Digest> {
    record.digest.as_deref().and_then(Digest::from_hex)
}

/// Tells what happened at a broken link, looking at the event after it:
/// the first explanation that the digests bear out.
fn classify(pending: &PendingBreak, next: Option<&EventRecord>) -> (u64, String) {
    let seq = pending.record.seq;
    let Some(stored) = stored_digest(&pending.record) else {
        return (seq, "event edited: its digest is malformed".to_owned());
    };
    let link = BrokenLink {
        pending,
        stored,
        next: next.and_then(|next| Some((next, stored_digest(next)?))),
    };
    if let Some(explained) = link.inserted_before() {
        return explained;
    }
    let Some((next, _)) = link.next else {
        let what = if next.is_some() {
            "chain broken: the event or its digest was changed"
        } else {
            "event edited: the last event does not match its digest"
        };
        return (seq, what.to_owned());
    };
    let explanation = [
        link.edited_content(),
        link.edited_digest(),
        link.swapped(next.seq),
        link.inserted_here(),
        link.deleted_here(),
    ]
    .into_iter()
    .flatten()
    .next();
    (
        seq,
        explanation
            .unwrap_or_else(|| "chain broken: the event or its digest was changed".to_owned()),
    )
}

/// A broken link and what the digests around it say.
struct BrokenLink<'a> {
    pending: &'a PendingBreak,
    /// The broken event's stored digest.
    stored: Digest,
    /// The event after it, with its stored digest.
    next: Option<(&'a EventRecord, Digest)>,
}

/// Whether `record`, put at `at` after the digest `previous`, has `digest`.
fn follows(previous: &Digest, record: &EventRecord, at: u64, digest: &Digest) -> bool {
    link(previous, &leaf_hash_at(record, at)) == *digest
}

impl BrokenLink<'_> {
    /// This event belongs one place earlier: the one before it was
    /// inserted (with a well-formed digest) and the rest renumbered.
    fn inserted_before(&self) -> Option<(u64, String)> {
        let seq = self.pending.record.seq;
        (seq > 1
            && follows(
                &self.pending.before_previous,
                &self.pending.record,
                seq - 1,
                &self.stored,
            ))
        .then(|| {
            (
                seq - 1,
                format!(
                    "event inserted at seq {}: later events were renumbered",
                    seq - 1
                ),
            )
        })
    }

    /// The next event links to this one's stored digest: this event's
    /// bytes were changed after its digest was taken.
    fn edited_content(&self) -> Option<String> {
        let (next, next_stored) = self.next?;
        follows(&self.stored, next, next.seq, &next_stored)
            .then(|| "event edited: its content does not match its digest".to_owned())
    }

    /// This event's bytes are intact and the next one links to them: only
    /// the stored digest was changed.
    fn edited_digest(&self) -> Option<String> {
        let (next, next_stored) = self.next?;
        let intact = link(
            &self.pending.previous,
            &chain::leaf_hash(&self.pending.record),
        );
        follows(&intact, next, next.seq, &next_stored)
            .then(|| "event edited: its stored digest was changed".to_owned())
    }

    /// The next event belongs at this one's place.
    fn next_belongs_here(&self) -> bool {
        let Some((next, next_stored)) = self.next else {
            return false;
        };
        let (previous, seq) = (&self.pending.previous, self.pending.record.seq);
        follows(previous, next, seq, &next_stored) || follows(previous, next, seq, &self.stored)
    }

    /// The two events traded places (with or without their digests).
    fn swapped(&self, next_seq: u64) -> Option<String> {
        let (next, next_stored) = self.next?;
        let record = &self.pending.record;
        let this_belongs_next = follows(&next_stored, record, next.seq, &self.stored)
            || follows(&self.stored, record, next.seq, &next_stored);
        (self.next_belongs_here() && this_belongs_next).then(|| {
            format!(
                "events reordered: seq {} and seq {next_seq} swapped",
                record.seq
            )
        })
    }

    /// The next event is the one that belongs here: this one was inserted
    /// and the ones after it renumbered.
    fn inserted_here(&self) -> Option<String> {
        self.next_belongs_here().then(|| {
            format!(
                "event inserted at seq {}: later events were renumbered",
                self.pending.record.seq
            )
        })
    }

    /// The events from here on are the original ones shifted down by one:
    /// the event at this seq was deleted and the rest renumbered.
    fn deleted_here(&self) -> Option<String> {
        let (next, next_stored) = self.next?;
        let shifted = next.seq.checked_add(1)?;
        follows(&self.stored, next, shifted, &next_stored).then(|| {
            format!(
                "event deleted: the original seq {} is gone and later events were renumbered",
                self.pending.record.seq
            )
        })
    }
}

/// The job a group of rows belongs to: its first row's job id, unless that
/// row's digest only holds with the second row's job id (the first row's id
/// was changed after it was written).
fn job_of(first: &EventRecord, second: Option<&EventRecord>) -> Uuid {
    let sealed_as = |job_id: Uuid| {
        first.seq == 1
            && first.digest.as_deref().is_some_and(|stored| {
                let as_job = EventRecord {
                    job_id,
                    ..first.clone()
                };
                chain::chain(&Digest::GENESIS, &as_job).matches_hex(stored)
            })
    };
    match second {
        Some(second) if second.job_id != first.job_id && !sealed_as(first.job_id) => {
            if sealed_as(second.job_id) {
                second.job_id
            } else {
                first.job_id
            }
        }
        _ => first.job_id,
    }
}

/// Checks one job's stored events (as `load_job` returns them).
pub fn verify_job(job_id: Uuid, records: &[EventRecord], options: &VerifyOptions) -> JobReport {
    let mut verifier = JobVerifier::new(job_id, options);
    for record in records {
        verifier.push(record);
    }
    verifier.finish()
}

/// Totals of a whole-log verification.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// Jobs checked.
    pub jobs: u64,
    /// Events checked.
    pub events: u64,
    /// Jobs with at least one violation.
    pub failed_jobs: u64,
    /// Events without a stored digest.
    pub unsealed: u64,
}

/// Checks every job in `store`, streaming: each job's report goes to
/// `on_report` as soon as its last event has been read, and `on_progress`
/// gets the number of events read so far every 4096 events.
///
/// # Errors
/// [`StoreError`] when the log cannot be read.
pub fn verify_store(
    store: &dyn EventStore,
    options: &VerifyOptions,
    on_report: impl FnMut(JobReport),
    mut on_progress: impl FnMut(u64),
) -> Result<Summary, StoreError> {
    let mut walk = LogWalk {
        options,
        on_report,
        summary: Summary::default(),
        seen_expected: HashSet::new(),
        first: None,
        current: None,
        unreadable: Vec::new(),
    };
    store.scan(&mut |group, row| {
        walk.summary.events += 1;
        if walk.summary.events.is_multiple_of(4096) {
            on_progress(walk.summary.events);
        }
        match row {
            Ok(record) => walk.record(group, record),
            Err(e) => walk.unreadable.push(e.to_string()),
        }
    })?;
    Ok(walk.finish())
}

/// A walk through the whole log, one group of rows (a job) after another.
struct LogWalk<'a, R> {
    options: &'a VerifyOptions,
    on_report: R,
    summary: Summary,
    /// The jobs with a kept head seen so far: memory stays independent of
    /// the number of jobs.
    seen_expected: HashSet<Uuid>,
    /// A job's first row waits for its second, to tell which job id is the
    /// job's when the first row's was changed.
    first: Option<(u64, EventRecord)>,
    current: Option<(u64, JobVerifier<'a>)>,
    /// Rows that could not be read at all.
    unreadable: Vec<String>,
}

impl<'a, R: FnMut(JobReport)> LogWalk<'a, R> {
    fn record(&mut self, group: u64, record: &EventRecord) {
        if let Some((g, verifier)) = self.current.as_mut()
            && *g == group
        {
            verifier.push(record);
            return;
        }
        if let Some((g, pending)) = self.first.take() {
            if g == group {
                let mut verifier = self.start(pending, Some(record));
                verifier.push(record);
                self.current = Some((group, verifier));
                return;
            }
            let verifier = self.start(pending, None);
            self.report(verifier);
        }
        if let Some((_, done)) = self.current.take() {
            self.report(done);
        }
        self.first = Some((group, record.clone()));
    }

    /// A verifier for the job whose first row is `first`.
    fn start(&mut self, first: EventRecord, second: Option<&EventRecord>) -> JobVerifier<'a> {
        let job_id = job_of(&first, second);
        if self.options.expect.contains_key(&job_id) {
            self.seen_expected.insert(job_id);
        }
        let mut verifier = JobVerifier::new(job_id, self.options);
        verifier.push(&first);
        verifier
    }

    fn report(&mut self, verifier: JobVerifier<'_>) {
        let report = verifier.finish();
        self.summary.jobs += 1;
        self.summary.unsealed += report.unsealed;
        if !report.is_ok() {
            self.summary.failed_jobs += 1;
        }
        (self.on_report)(report);
    }

    /// Reports the jobs still open, the unreadable rows and the kept heads
    /// of jobs the log does not have.
    fn finish(mut self) -> Summary {
        if let Some((_, pending)) = self.first.take() {
            let verifier = self.start(pending, None);
            self.report(verifier);
        }
        if let Some((_, done)) = self.current.take() {
            self.report(done);
        }
        // Rows whose job id itself is unreadable belong to no job; report
        // them under the nil id so that they are not lost.
        for detail in std::mem::take(&mut self.unreadable) {
            let mut verifier = JobVerifier::new(Uuid::nil(), self.options);
            verifier.flag(0, "LOG", detail);
            self.report(verifier);
        }
        let options = self.options;
        for (job_id, head) in &options.expect {
            if !self.seen_expected.contains(job_id) {
                let mut verifier = JobVerifier::new(*job_id, options);
                verifier.flag(
                    1,
                    "EXPECT",
                    format!("the log has no events for this job, expected head {head}"),
                );
                self.report(verifier);
            }
        }
        self.summary
    }
}
