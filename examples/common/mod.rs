//! What the workload examples share: the reference job's plan.

use job_executor::JobStep;

/// The reference plan: `steps` no-op steps, each with a small parameter
/// object.
pub fn plan(steps: usize) -> Vec<JobStep> {
    (0..steps)
        .map(|i| {
            let mut step = JobStep::new(i as u32, "noop", format!("node-{i:04}"));
            step.parameters = serde_json::json!({ "setting": "value", "index": i });
            step
        })
        .collect()
}

/// Events a job of `steps` successful steps records.
pub fn events_per_job(steps: usize) -> u64 {
    2 + 2 * steps as u64
}

/// A step event's payload in the raw baselines, of the engine's size.
pub const STEP_PAYLOAD: &str = r#"{"step_index":0,"output":{},"health_after":null}"#;

/// The kind and payload of row `seq` of a raw baseline's job of `events`
/// events: the kinds the log's rules accept, in a job's order, the plan
/// in the first.
pub fn raw_row(seq: u64, events: u64, plan_payload: &str) -> (&'static str, &str) {
    let kind = match seq {
        1 => "JobStarted",
        s if s == events => "JobCompleted",
        s if s % 2 == 0 => "StepStarted",
        _ => "StepSucceeded",
    };
    (kind, if seq == 1 { plan_payload } else { STEP_PAYLOAD })
}

/// The median of `values` (the upper one of an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
