//! Embedding the executor: a SQLite log, a custom handler, a health
//! observer, and a replay of the stored job.
//!
//! Run with `cargo run --example embed`.

use std::sync::Arc;

use job_executor::store::SqliteStore;
use job_executor::{
    ExecutionContext, HealthObserver, JobExecutor, JobStep, StepOutput,
    execution_result_to_evidence,
};
use serde_json::{Value, json};
use uuid::Uuid;

struct StaticHealth;

impl HealthObserver for StaticHealth {
    fn observe_health(&self) -> Value {
        json!({ "status": "healthy", "error_rate": 0.001 })
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("job-executor-embed-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let store = Arc::new(SqliteStore::open(dir.join("log.db"))?);

    let mut executor = JobExecutor::builder().store(store).build();
    executor.register_handler(
        "capability_enable",
        |step: &JobStep, ctx: &ExecutionContext| {
            // A real handler would call the capability service here.
            StepOutput::succeeded(json!({ "enabled": step.target, "by": ctx.executed_by }))
        },
    );

    let steps = vec![
        JobStep::new(0, "capability_enable", "billing.invoices"),
        JobStep::new(1, "capability_enable", "billing.refunds"),
    ];
    let job_id = Uuid::new_v4();
    let result =
        executor.execute_job(job_id, Uuid::new_v4(), &steps, Some(&StaticHealth), "ops")?;
    let evidence = execution_result_to_evidence(&result);
    println!("{}", serde_json::to_string_pretty(&evidence)?);

    // The stored log replays to the same evidence.
    let replayed = execution_result_to_evidence(&executor.replay(job_id)?);
    assert_eq!(replayed, evidence);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
