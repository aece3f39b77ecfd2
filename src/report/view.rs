//! The view model of a job's page and of the index, built from stored
//! events alone: no clock, no I/O, no randomness.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::ReportOptions;
use super::health::HealthView;
use super::text::{Cell, duration, ellipsis};
use super::timeline::{self, Moment, MomentKind, Outcome, StepSpan, Timeline};
use crate::events::{Event, EventRecord, FailureKind, JobStarted, format_timestamp};
use crate::model::{JobStatus, JobStep, StepStatus};
use crate::projection::{Projector, ReplayError};
use crate::result::{ClaimRef, ExecutionResult, StepResult};
use crate::verify::{JobReport, VerifyOptions, verify_job};

/// Steps shown in one table; a longer plan is split into sections of this
/// many, collapsed but for the first and any with a step that did not succeed.
pub(crate) const STEPS_PER_SECTION: usize = 500;

/// Characters of a job's final reason an index row keeps.
pub(crate) const REASON_CHARS_MAX: usize = 300;

/// Raw events shown in one table: the page lays out only the tables on
/// screen, so opening the events of a long job stays quick.
pub(crate) const EVENTS_PER_TABLE: usize = 1_000;

/// The checks the banner lists, in order, with what each guards.
const CHECKS: [(&str, &str); 8] = [
    ("EXEC-001", "steps execute in declared order"),
    ("EXEC-002", "every started step has exactly one outcome"),
    ("EXEC-003", "the job stops at its first failure"),
    ("EXEC-004", "health is observed, never modified"),
    ("EXEC-005", "the plan and contract never change"),
    ("EXEC-006", "no step is started twice"),
    ("CANCEL", "cancellation rules"),
    ("LOG", "log structure: seq numbers, decodable events"),
];

/// Where the events of a page come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// A job's log in a database.
    Log,
    /// An audit bundle, with what its own checks found beyond the log's
    /// (head, plan, evidence, canonical form).
    Bundle { problems: Vec<String> },
}

/// The verification banner.
#[derive(Clone, Debug)]
pub(crate) struct Verification {
    pub(crate) intact: bool,
    /// "stored log" or "audit bundle".
    pub(crate) source: &'static str,
    pub(crate) events: u64,
    /// `sha256:…` of the last event: recomputed when the chain holds, as
    /// stored otherwise.
    pub(crate) head: String,
    /// The first broken link of the chain: seq and what happened there.
    pub(crate) first_break: Option<(u64, String)>,
    pub(crate) macs: Macs,
    pub(crate) checks: Vec<CheckRow>,
    /// Everything found, in log order.
    pub(crate) problems: Vec<String>,
    /// Events written before digests existed: computed, not compared.
    pub(crate) unsealed: u64,
}

/// What the page says about MACs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Macs {
    /// Every event's MAC verified under the key given.
    Verified,
    /// A MAC did not verify: seq and why.
    Failed(u64, String),
    /// No key was given; this many events carry a MAC.
    NotChecked(usize),
}

/// One line of the checks list.
#[derive(Clone, Debug)]
pub(crate) struct CheckRow {
    pub(crate) id: &'static str,
    pub(crate) guards: &'static str,
    /// The first violation of this check, when there is one.
    pub(crate) violation: Option<String>,
}

/// One step of the plan, executed or not.
#[derive(Clone, Debug)]
pub(crate) struct StepRow {
    pub(crate) index: u32,
    pub(crate) step_type: String,
    pub(crate) target: String,
    pub(crate) parameters: Cell,
    pub(crate) timeout_seconds: Option<u64>,
    /// `COMPLETED`, `FAILED`, `IN DOUBT` or `NOT RUN`.
    pub(crate) status: &'static str,
    pub(crate) status_class: &'static str,
    pub(crate) failure_kind: Option<String>,
    pub(crate) error: Option<Cell>,
    pub(crate) output: Option<Cell>,
    pub(crate) health_after: Option<Cell>,
    pub(crate) started_at: Option<String>,
    pub(crate) took: Option<String>,
    /// Which workers started it and recorded its outcome, for a job run by
    /// workers.
    pub(crate) ran_by: Option<String>,
}

/// A run of consecutive steps shown as one table.
#[derive(Clone, Debug)]
pub(crate) struct StepSection {
    pub(crate) first: u32,
    pub(crate) last: u32,
    /// Open by default: the first section, and any with a step that did
    /// not succeed.
    pub(crate) open: bool,
    pub(crate) summary: String,
    pub(crate) rows: Vec<StepRow>,
}

/// One stored event, as the raw events table shows it.
#[derive(Clone, Debug)]
pub(crate) struct EventRow {
    pub(crate) seq: u64,
    pub(crate) kind: String,
    pub(crate) recorded_at: String,
    pub(crate) digest: Option<String>,
    pub(crate) mac: bool,
    /// What verification found at this seq.
    pub(crate) problems: Vec<String>,
}

impl EventRow {
    /// The first 12 hex digits: enough to tell digests apart by eye. A
    /// digest edited into something else is cut at a character boundary.
    pub(crate) fn digest_short(&self) -> &str {
        self.digest.as_deref().map_or("", |d| {
            d.char_indices().nth(12).map_or(d, |(at, _)| &d[..at])
        })
    }
}

/// A resumption of the job.
#[derive(Clone, Debug)]
pub(crate) struct Resumption {
    pub(crate) at: String,
    pub(crate) by: String,
    pub(crate) version: String,
}

/// A worker's claim on the job.
#[derive(Clone, Debug)]
pub(crate) struct ClaimRow {
    pub(crate) at: String,
    pub(crate) worker_id: String,
    pub(crate) host: String,
    pub(crate) epoch: u64,
    pub(crate) taken_over_from: Option<String>,
    /// The step left in doubt whose outcome the claim recorded.
    pub(crate) recorded_outcome: Option<u32>,
}

/// Everything one job's page shows.
#[derive(Clone, Debug)]
pub struct JobPage {
    pub(crate) job_id: Uuid,
    pub(crate) contract_id: Option<Uuid>,
    pub(crate) executed_by: String,
    pub(crate) executor_version: String,
    pub(crate) resumptions: Vec<Resumption>,
    /// The workers' claims, in order: who ran the job, takeovers included.
    pub(crate) claims: Vec<ClaimRow>,
    /// `None` when not even the job's first event can be folded.
    pub(crate) status: Option<JobStatus>,
    pub(crate) reason: String,
    pub(crate) cancel_requested: Option<String>,
    pub(crate) started_at: String,
    /// The terminal event's time; `None` for an unfinished job.
    pub(crate) ended_at: Option<String>,
    pub(crate) last_event_at: String,
    pub(crate) duration_us: i64,
    pub(crate) steps_planned: usize,
    pub(crate) steps_executed: usize,
    pub(crate) steps_succeeded: usize,
    pub(crate) steps_failed: usize,
    pub(crate) verification: Verification,
    /// Where and why folding the events stopped, when it did before the end.
    pub(crate) fold_stopped: Option<FoldStop>,
    pub(crate) timeline: Timeline,
    pub(crate) sections: Vec<StepSection>,
    pub(crate) health: HealthView,
    pub(crate) events: Vec<EventRow>,
    /// Link back to the index, on pages written with one.
    pub(crate) index_href: Option<String>,
}

impl JobPage {
    /// Builds the page of `job_id` from its stored `records` (seq order).
    pub(crate) fn build(
        job_id: Uuid,
        records: &[EventRecord],
        source: &Source,
        options: &ReportOptions,
        index_href: Option<&str>,
    ) -> JobPage {
        let report = verify_job(
            job_id,
            records,
            &VerifyOptions::default().with_key(options.key.clone()),
        );
        let (result, fold_stopped) = fold(job_id, records);
        let result = result.as_ref();
        let plan = job_started(records);
        let plan = plan.as_ref();
        let times = Times::of(records, result);
        let (resumptions, cancels) = lifecycle(records);
        let steps: &[StepResult] = result.map_or(&[], |r| &r.step_results);
        let plan_steps: &[JobStep] = plan.map_or(&[], |p| &p.plan);
        let spans = spans(steps, plan_steps, times.last_event);
        let moments = moments(steps, cancels, &resumptions);
        JobPage {
            job_id,
            contract_id: plan.map(|p| p.contract_id),
            executed_by: plan.map_or_else(String::new, |p| p.executed_by.clone()),
            executor_version: plan.map_or_else(String::new, |p| p.executor_version.clone()),
            resumptions: resumptions.into_iter().map(|(_, r)| r).collect(),
            claims: result.map_or_else(Vec::new, claim_rows),
            status: result.map(|r| r.final_status),
            reason: result.map_or_else(String::new, |r| r.final_reason.clone()),
            cancel_requested: cancel_reason(records),
            started_at: format_timestamp(&times.started),
            ended_at: times.ended.as_ref().map(format_timestamp),
            last_event_at: format_timestamp(&times.last_event),
            duration_us: (times.end_of_picture - times.started)
                .num_microseconds()
                .unwrap_or(i64::MAX),
            steps_planned: plan_steps.len(),
            steps_executed: steps.len(),
            steps_succeeded: result.map_or(0, |r| r.steps_succeeded),
            steps_failed: result.map_or(0, |r| r.steps_failed),
            verification: verification(&report, records, options, source),
            fold_stopped,
            timeline: timeline::draw(times.started, times.end_of_picture, &spans, &moments),
            sections: sections(plan_steps, steps),
            health: health(plan, result, steps),
            events: event_rows(records, &report),
            index_href: index_href.map(str::to_owned),
        }
    }

    /// The job's status word, `INVALID` when its log cannot be folded at all.
    pub(crate) fn status_label(&self) -> &'static str {
        self.status.map_or("INVALID", JobStatus::as_str)
    }

    /// The status's CSS class.
    pub(crate) fn status_class(&self) -> &'static str {
        status_class(self.status)
    }

    /// The duration, for people.
    pub(crate) fn duration(&self) -> String {
        duration(self.duration_us)
    }

    /// The job's line in the index.
    pub fn index_row(&self) -> IndexRow {
        IndexRow {
            job_id: self.job_id,
            status: self.status,
            steps_succeeded: self.steps_succeeded,
            steps_planned: self.steps_planned,
            started_at: self.started_at.clone(),
            duration_us: self.duration_us,
            owner: None,
            intact: self.verification.intact,
            // The index keeps a row per job: a long error is cut short there.
            reason: ellipsis(&self.reason, REASON_CHARS_MAX),
        }
    }
}

/// The claims of a job run by workers, as the summary lists them.
fn claim_rows(result: &ExecutionResult) -> Vec<ClaimRow> {
    result
        .claims
        .iter()
        .map(|c| ClaimRow {
            at: format_timestamp(&c.claimed_at),
            worker_id: c.worker_id.clone(),
            host: c.host.clone(),
            epoch: c.epoch,
            taken_over_from: c.taken_over_from.clone(),
            recorded_outcome: c.recorded_outcome,
        })
        .collect()
}

/// Who ran a step: one worker, or the one that started it and the one that
/// recorded its outcome when a takeover came between.
fn ran_by(step: &StepResult) -> Option<String> {
    let name = |c: &ClaimRef| format!("{} (epoch {})", c.worker_id, c.epoch);
    match (&step.started_by, &step.recorded_by) {
        (Some(started), Some(recorded)) if started == recorded => {
            Some(format!("by {}", name(started)))
        }
        (Some(started), Some(recorded)) => Some(format!(
            "started by {}, outcome recorded by {}",
            name(started),
            name(recorded)
        )),
        // An outcome with no claim recorded it: `recover` did.
        (Some(started), None) if step.status != StepStatus::Running => Some(format!(
            "started by {}, outcome recorded without a claim",
            name(started)
        )),
        (Some(started), None) => Some(format!("started by {}", name(started))),
        (None, Some(recorded)) => Some(format!("outcome recorded by {}", name(recorded))),
        (None, None) => None,
    }
}

/// The CSS class of a job status.
pub(crate) fn status_class(status: Option<JobStatus>) -> &'static str {
    match status {
        Some(JobStatus::Completed) => "completed",
        Some(JobStatus::Failed) => "failed",
        Some(JobStatus::Cancelled) => "cancelled",
        Some(JobStatus::Running | JobStatus::Pending) => "running",
        None => "invalid",
    }
}

/// When the job started and ended, as the page shows it.
struct Times {
    started: DateTime<Utc>,
    /// The terminal event's time; `None` for an unfinished job.
    ended: Option<DateTime<Utc>>,
    last_event: DateTime<Utc>,
    /// Where the timeline ends: the job's end, or its last event.
    end_of_picture: DateTime<Utc>,
}

impl Times {
    fn of(records: &[EventRecord], result: Option<&ExecutionResult>) -> Times {
        let last_event = records
            .iter()
            .map(EventRecord::recorded_at_time)
            .max()
            .unwrap_or_default();
        let started = result.map_or(last_event, |r| r.started_at);
        let ended = result
            .filter(|r| r.final_status != JobStatus::Running)
            .map(|r| r.completed_at);
        Times {
            started,
            ended,
            last_event,
            end_of_picture: ended.unwrap_or(last_event).max(started),
        }
    }
}

/// The job's `JobStarted`, when its first event decodes as one.
fn job_started(records: &[EventRecord]) -> Option<JobStarted> {
    match records.first()?.decode().ok()?.event {
        Event::JobStarted(started) => Some(started),
        _ => None,
    }
}

/// The reason of the job's first cancel request.
fn cancel_reason(records: &[EventRecord]) -> Option<String> {
    records
        .iter()
        .filter(|r| r.kind == "JobCancelRequested")
        .find_map(|r| match r.decode().map(|e| e.event) {
            Ok(Event::JobCancelRequested(request)) => Some(request.reason),
            _ => None,
        })
}

/// The timeline's bars: one per executed step; a step still running ends
/// at the log's last event.
fn spans(steps: &[StepResult], plan: &[JobStep], last_event: DateTime<Utc>) -> Vec<StepSpan> {
    steps
        .iter()
        .map(|step| {
            let planned = plan.get(step.step_index as usize);
            StepSpan {
                index: step.step_index,
                step_type: planned.map_or_else(|| "?".to_owned(), |p| p.step_type.clone()),
                target: planned.map_or_else(|| "?".to_owned(), |p| p.target.clone()),
                started_at: step.started_at,
                ended_at: if step.status == StepStatus::Running {
                    last_event.max(step.started_at)
                } else {
                    step.completed_at
                },
                outcome: outcome(step),
                detail: step.error.as_ref().map(|error| match step.failure_kind {
                    Some(kind) => format!("{}: {error}", failure_name(kind)),
                    None => error.clone(),
                }),
            }
        })
        .collect()
}

/// The timeline's marks, in time order: timeouts and interruptions, cancel
/// requests and cancellation, resumptions.
fn moments(
    steps: &[StepResult],
    cancels: Vec<Moment>,
    resumptions: &[(DateTime<Utc>, Resumption)],
) -> Vec<Moment> {
    let mut moments: Vec<Moment> = steps
        .iter()
        .filter_map(|step| {
            let kind = match step.failure_kind? {
                FailureKind::Timeout => MomentKind::TimedOut,
                FailureKind::Interrupted => MomentKind::Interrupted,
                _ => return None,
            };
            Some(Moment {
                at: step.completed_at,
                kind,
                title: format!(
                    "Step {} {} at {}: {}",
                    step.step_index,
                    kind.label(),
                    format_timestamp(&step.completed_at),
                    step.error.as_deref().unwrap_or_default()
                ),
            })
        })
        .collect();
    moments.extend(cancels);
    moments.extend(resumptions.iter().map(|(at, r)| Moment {
        at: *at,
        kind: MomentKind::Resumed,
        title: format!("Resumed at {} by {} (executor {})", r.at, r.by, r.version),
    }));
    moments.sort_by_key(|m| m.at);
    moments
}

/// Health before the job and after its last step that observed it.
fn health(
    plan: Option<&JobStarted>,
    result: Option<&ExecutionResult>,
    steps: &[StepResult],
) -> HealthView {
    HealthView::new(
        plan.and_then(|p| p.health_before.as_ref()),
        result.and_then(|r| r.health_after.as_ref()),
        steps
            .iter()
            .rev()
            .find(|s| s.status == StepStatus::Completed && s.health_after.is_some())
            .map(|s| s.step_index),
    )
}

/// The raw events table, each event with what verification found at it.
fn event_rows(records: &[EventRecord], report: &JobReport) -> Vec<EventRow> {
    records
        .iter()
        .map(|record| EventRow {
            seq: record.seq,
            kind: record.kind.clone(),
            recorded_at: record.recorded_at.clone(),
            digest: record.digest.clone(),
            mac: record.mac.is_some(),
            problems: report
                .violations
                .iter()
                .filter(|v| v.seq == record.seq)
                .map(|v| format!("{}: {}", v.check, v.message))
                .collect(),
        })
        .collect()
}

/// Where folding a log stopped before its end, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FoldStop {
    /// The last event folded.
    pub(crate) last_folded: u64,
    /// The first event not folded.
    pub(crate) seq: u64,
    /// Why it was refused.
    pub(crate) reason: String,
}

/// Folds the events as they stand, their digests set aside: the page shows
/// what the log says even when its chain is broken (the banner tells whether
/// it can be trusted). Folding stops at the first event the state machine
/// refuses; the result is then the job as of the events before it.
fn fold(job_id: Uuid, records: &[EventRecord]) -> (Option<ExecutionResult>, Option<FoldStop>) {
    let mut projector = Projector::new(job_id);
    let mut stopped = None;
    for record in records {
        let as_they_stand = EventRecord {
            digest: None,
            mac: None,
            ..record.clone()
        };
        if let Err(e) = projector.apply_record(&as_they_stand) {
            let reason = match e {
                ReplayError::Rejected { source, .. } => {
                    format!("{}: {source}", source.invariant())
                }
                ReplayError::Decode { source, .. } => source.to_string(),
                ReplayError::SeqGap {
                    expected, found, ..
                } => format!("seq {expected} expected, seq {found} found"),
                other => other.to_string(),
            };
            stopped = Some(FoldStop {
                last_folded: projector.events(),
                seq: record.seq,
                reason,
            });
            break;
        }
    }
    (projector.into_result(), stopped)
}

/// The moments of the job's life that are not step outcomes: resumptions,
/// cancel requests, cancellation.
fn lifecycle(records: &[EventRecord]) -> (Vec<(DateTime<Utc>, Resumption)>, Vec<Moment>) {
    let mut resumptions = Vec::new();
    let mut moments = Vec::new();
    for record in records {
        if !matches!(
            record.kind.as_str(),
            "JobResumed" | "JobCancelRequested" | "JobCancelled"
        ) {
            continue;
        }
        let Ok(recorded) = record.decode() else {
            continue;
        };
        let at = recorded.recorded_at;
        match recorded.event {
            Event::JobResumed(resumed) => resumptions.push((
                at,
                Resumption {
                    at: record.recorded_at.clone(),
                    by: resumed.executed_by,
                    version: resumed.executor_version,
                },
            )),
            Event::JobCancelRequested(request) => moments.push(Moment {
                at,
                kind: MomentKind::CancelRequested,
                title: format!(
                    "Cancel requested at {}: {}",
                    record.recorded_at, request.reason
                ),
            }),
            Event::JobCancelled(cancelled) => moments.push(Moment {
                at,
                kind: MomentKind::Cancelled,
                title: format!("Cancelled at {}: {}", record.recorded_at, cancelled.reason),
            }),
            _ => {}
        }
    }
    (resumptions, moments)
}

fn outcome(step: &StepResult) -> Outcome {
    match (step.status, step.failure_kind) {
        (StepStatus::Completed, _) => Outcome::Succeeded,
        (StepStatus::Failed, Some(FailureKind::Timeout)) => Outcome::TimedOut,
        (StepStatus::Failed, Some(FailureKind::Interrupted)) => Outcome::Interrupted,
        (StepStatus::Failed, _) => Outcome::Failed,
        _ => Outcome::InDoubt,
    }
}

/// The failure kind in its stored spelling (`no_handler`, `timeout`, …).
fn failure_name(kind: FailureKind) -> String {
    match serde_json::to_value(kind) {
        Ok(Value::String(name)) => name,
        _ => format!("{kind:?}"),
    }
}

/// The steps table: every planned step, executed or not, in sections.
fn sections(plan: &[JobStep], steps: &[StepResult]) -> Vec<StepSection> {
    // The machine only accepts results for planned steps, in order; a
    // result beyond the plan (an unreadable plan) still gets its row.
    let rows_total = plan.len().max(steps.len());
    let rows: Vec<StepRow> = (0..rows_total)
        .map(|position| {
            let planned = plan.get(position);
            let result = steps.get(position);
            step_row(position, planned, result)
        })
        .collect();
    let sections_total = rows.len().div_ceil(STEPS_PER_SECTION);
    let mut sections = Vec::with_capacity(sections_total);
    let mut rows = rows.into_iter().peekable();
    let mut first_section = true;
    while rows.peek().is_some() {
        let chunk: Vec<StepRow> = rows.by_ref().take(STEPS_PER_SECTION).collect();
        let first = chunk[0].index;
        let last = chunk[chunk.len() - 1].index;
        let count = |status: &str| chunk.iter().filter(|r| r.status == status).count();
        let counts: Vec<String> = [
            ("COMPLETED", "completed"),
            ("FAILED", "failed"),
            ("IN DOUBT", "in doubt"),
            ("NOT RUN", "not run"),
        ]
        .iter()
        .filter_map(|(status, words)| match count(status) {
            0 => None,
            n => Some(format!("{n} {words}")),
        })
        .collect();
        let troubled = chunk
            .iter()
            .any(|r| matches!(r.status, "FAILED" | "IN DOUBT"));
        sections.push(StepSection {
            first,
            last,
            open: first_section || troubled,
            summary: counts.join(", "),
            rows: chunk,
        });
        first_section = false;
    }
    sections
}

fn step_row(position: usize, planned: Option<&JobStep>, result: Option<&StepResult>) -> StepRow {
    let index = result.map_or(position as u32, |r| r.step_index);
    let (status, status_class) = match result.map(|r| r.status) {
        Some(StepStatus::Completed) => ("COMPLETED", "completed"),
        Some(StepStatus::Failed) => ("FAILED", "failed"),
        Some(_) => ("IN DOUBT", "in-doubt"),
        None => ("NOT RUN", "not-run"),
    };
    StepRow {
        index,
        step_type: planned.map_or_else(|| "?".to_owned(), |p| p.step_type.clone()),
        target: planned.map_or_else(|| "?".to_owned(), |p| p.target.clone()),
        parameters: planned.map_or_else(|| Cell::text("?"), |p| Cell::json(&p.parameters)),
        timeout_seconds: planned.map(|p| p.timeout_seconds),
        status,
        status_class,
        failure_kind: result.and_then(|r| r.failure_kind).map(failure_name),
        error: result.and_then(|r| r.error.as_deref()).map(Cell::text),
        output: result.and_then(|r| r.output.as_ref()).map(Cell::json),
        health_after: result
            .and_then(|r| r.health_after.as_ref())
            .map(Cell::observation),
        started_at: result.map(|r| format_timestamp(&r.started_at)),
        took: result.filter(|r| r.status != StepStatus::Running).map(|r| {
            duration(
                (r.completed_at - r.started_at)
                    .num_microseconds()
                    .unwrap_or(0),
            )
        }),
        ran_by: result.and_then(ran_by),
    }
}

/// The banner: what verifying the events (and, for a bundle, the bundle's
/// own checks) found.
fn verification(
    report: &JobReport,
    records: &[EventRecord],
    options: &ReportOptions,
    source: &Source,
) -> Verification {
    let bundle_problems = bundle_problems(report, source);
    let intact = report.is_ok() && bundle_problems.is_empty();
    let mut problems: Vec<String> = report
        .violations
        .iter()
        .map(|v| format!("seq {}: {}: {}", v.seq, v.check, v.message))
        .collect();
    if report.more_violations > 0 {
        problems.push(format!("… and {} more", report.more_violations));
    }
    problems.extend(bundle_problems);
    Verification {
        intact,
        source: match source {
            Source::Log => "stored log",
            Source::Bundle { .. } => "audit bundle",
        },
        events: report.events,
        head: shown_head(report, records),
        first_break: first_violation(report, "CHAIN"),
        macs: match (&options.key, first_violation(report, "MAC")) {
            (Some(_), Some((seq, message))) => Macs::Failed(seq, message),
            (Some(_), None) => Macs::Verified,
            (None, _) => Macs::NotChecked(records.iter().filter(|r| r.mac.is_some()).count()),
        },
        checks: CHECKS
            .iter()
            .map(|(id, guards)| CheckRow {
                id,
                guards,
                violation: first_violation(report, id)
                    .map(|(seq, message)| format!("seq {seq}: {message}")),
            })
            .collect(),
        problems,
        unsealed: report.unsealed,
    }
}

/// The seq and message of the first violation of `check`.
fn first_violation(report: &JobReport, check: &str) -> Option<(u64, String)> {
    report
        .violations
        .iter()
        .find(|v| v.check == check)
        .map(|v| (v.seq, v.message.clone()))
}

/// What a bundle's own checks found beyond the log's violations.
fn bundle_problems(report: &JobReport, source: &Source) -> Vec<String> {
    match source {
        Source::Log => Vec::new(),
        // The bundle's own checks repeat the log's violations (verify_job's
        // lines); only what is about the bundle itself is added.
        Source::Bundle { problems } => problems
            .iter()
            .filter(|p| !report.violations.iter().any(|v| v.to_string() == **p))
            .cloned()
            .collect(),
    }
}

/// The head the banner shows: recomputed when the chain holds, the last
/// event's stored digest otherwise.
fn shown_head(report: &JobReport, records: &[EventRecord]) -> String {
    if report.is_ok() {
        report.head.to_string()
    } else {
        records
            .last()
            .and_then(|r| r.digest.as_deref())
            .map_or_else(|| "none".to_owned(), |d| format!("sha256:{d}"))
    }
}

/// A job's line in the index: small, so that an index of many jobs is
/// written while only one job's events are in memory at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct IndexRow {
    /// The job.
    pub job_id: Uuid,
    /// Its status; `None` when its log cannot be folded.
    pub status: Option<JobStatus>,
    /// Steps that succeeded.
    pub steps_succeeded: usize,
    /// Steps in the plan.
    pub steps_planned: usize,
    /// When it started, as stored.
    pub started_at: String,
    /// From start to end (or to its last event), in microseconds.
    pub duration_us: i64,
    /// Who holds the job, where the log knows (worker leases); `None` until then.
    pub owner: Option<String>,
    /// Whether its log verified when the page was made.
    pub intact: bool,
    /// Its final reason.
    pub reason: String,
}

impl IndexRow {
    pub(crate) fn status_label(&self) -> &'static str {
        self.status.map_or("INVALID", JobStatus::as_str)
    }

    pub(crate) fn status_class(&self) -> &'static str {
        status_class(self.status)
    }

    pub(crate) fn duration(&self) -> String {
        duration(self.duration_us)
    }
}

/// The statuses the index counts, in display order.
pub(crate) const INDEX_STATUSES: [Option<JobStatus>; 5] = [
    Some(JobStatus::Completed),
    Some(JobStatus::Failed),
    Some(JobStatus::Cancelled),
    Some(JobStatus::Running),
    None,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_digest_edited_into_any_text_is_shortened_safely() {
        let row = |digest: &str| EventRow {
            seq: 1,
            kind: "JobStarted".into(),
            recorded_at: String::new(),
            digest: Some(digest.to_owned()),
            mac: false,
            problems: Vec::new(),
        };
        assert_eq!(row(&"ab".repeat(32)).digest_short(), "abababababab");
        assert_eq!(row("éééééééééééééé").digest_short(), "éééééééééééé");
        assert_eq!(row("short").digest_short(), "short");
    }
}
