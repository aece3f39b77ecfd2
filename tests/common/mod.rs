//! Builders shared by the integration tests.
#![allow(dead_code)]

use chrono::{DateTime, TimeDelta, Utc};
use job_executor::JobStep;
use job_executor::chain::{Digest, chain};
use job_executor::events::{
    Event, EventRecord, Failure, FailureKind, JobCompleted, JobHalted, JobStarted, StepFailed,
    StepStarted, StepSucceeded,
};
use serde_json::json;
use uuid::Uuid;

pub fn started(steps: u32) -> Event {
    started_of(steps, "noop")
}

/// `JobStarted` of a plan of `steps` steps of type `step_type`.
pub fn started_of(steps: u32, step_type: &str) -> Event {
    Event::JobStarted(JobStarted {
        contract_id: Uuid::nil(),
        plan: (0..steps)
            .map(|i| JobStep::new(i, step_type, "t"))
            .collect(),
        executed_by: "tester".into(),
        executor_version: "0.0.0".into(),
        health_before: None,
    })
}

/// A job of `steps` steps of `step_type` whose first step succeeded and
/// whose executor then stopped, between steps (as a log written by an
/// executor that committed each event on its own can end).
pub fn stopped_between_steps(steps: u32, step_type: &str) -> Vec<Event> {
    vec![started_of(steps, step_type), step_started(0), succeeded(0)]
}

pub fn step_started(step_index: u32) -> Event {
    Event::StepStarted(StepStarted { step_index })
}

pub fn succeeded(step_index: u32) -> Event {
    Event::StepSucceeded(StepSucceeded {
        step_index,
        output: json!({}),
        health_after: None,
    })
}

pub fn failed(step_index: u32) -> Event {
    Event::StepFailed(StepFailed {
        step_index,
        failure: Failure {
            kind: FailureKind::HandlerFailed,
            message: "boom".into(),
        },
        output: None,
        health_after: None,
    })
}

pub fn completed() -> Event {
    Event::JobCompleted(JobCompleted {})
}

pub fn halted(step_index: u32) -> Event {
    Event::JobHalted(JobHalted { step_index })
}

/// A fixed instant plus `n` milliseconds.
pub fn at(n: u64) -> DateTime<Utc> {
    DateTime::from_timestamp(946_684_800, 0).unwrap() + TimeDelta::milliseconds(n as i64)
}

/// `events` encoded and chained as job `job_id`'s records, seq 1, 2, ….
pub fn records(job_id: Uuid, events: &[Event]) -> Vec<EventRecord> {
    let mut head = Digest::GENESIS;
    events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut record = EventRecord::encode(job_id, i as u64 + 1, at(i as u64), e);
            head = chain(&head, &record);
            record.digest = Some(head.to_hex());
            record
        })
        .collect()
}

/// The log of a job of `steps` steps that all succeed.
pub fn completed_log(steps: u32) -> Vec<Event> {
    let mut events = vec![started(steps)];
    for i in 0..steps {
        events.push(step_started(i));
        events.push(succeeded(i));
    }
    events.push(completed());
    events
}
