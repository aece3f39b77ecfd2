//! The handler pool's idle workers exit after their keep-alive. Alone in its
//! own test binary: it counts the process's handler threads.

use std::time::{Duration, Instant};

use job_executor::{ExecutionContext, JobExecutor, JobStatus, JobStep, PoolOptions, StepOutput};
use serde_json::json;
use uuid::Uuid;

fn step(index: u32, step_type: &str, timeout_seconds: u64) -> JobStep {
    JobStep {
        timeout_seconds,
        ..JobStep::new(index, step_type, "t")
    }
}

fn handler_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("job-executor-ha"))
        .count()
}

#[test]
fn idle_handler_threads_exit_after_the_keep_alive() {
    let options = PoolOptions::default().with_idle_keep_alive(Duration::from_millis(100));
    let mut executor = JobExecutor::builder().handler_pool(options).build();
    executor.register_handler("ok", |_: &JobStep, _: &ExecutionContext| {
        StepOutput::succeeded(json!({}))
    });
    let steps: Vec<JobStep> = (0..5).map(|i| step(i, "ok", 5)).collect();
    executor
        .execute_job(Uuid::new_v4(), Uuid::nil(), &steps, None, "t")
        .unwrap();
    assert!(handler_threads() >= 1);
    let give_up = Instant::now() + Duration::from_secs(5);
    while handler_threads() > 0 && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        handler_threads(),
        0,
        "idle workers outlived their keep-alive"
    );
    // The pool starts workers again when needed.
    let result = executor
        .execute_job(Uuid::new_v4(), Uuid::nil(), &steps, None, "t")
        .unwrap();
    assert_eq!(result.final_status, JobStatus::Completed);
}
