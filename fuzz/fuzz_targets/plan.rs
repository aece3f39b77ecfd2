//! Any bytes as a plan file: refused with an error, or a plan that runs.
#![no_main]

use job_executor::clock::derived_job_id;
use job_executor::model::{PlanFile, validate_plan};
use job_executor::{JobStatus, create_default_executor, execution_result_to_evidence};
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

fuzz_target!(|data: &[u8]| {
    let Ok(plan) = serde_json::from_slice::<PlanFile>(data) else {
        return;
    };
    let _ = derived_job_id(plan.contract_id, &plan.steps);
    if validate_plan(&plan.steps).is_err() {
        return;
    }
    let executor = create_default_executor();
    let job = plan.job_id.unwrap_or_else(Uuid::new_v4);
    let result = executor
        .execute_job(job, plan.contract_id, &plan.steps, None, "fuzz")
        .expect("a valid plan runs");
    assert!(matches!(
        result.final_status,
        JobStatus::Completed | JobStatus::Failed
    ));
    let replayed = executor.replay(job).expect("a run replays");
    assert_eq!(
        execution_result_to_evidence(&replayed),
        execution_result_to_evidence(&result)
    );
});
