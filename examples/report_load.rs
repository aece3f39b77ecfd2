//! How long a browser takes to show the report page of a large job.
//!
//! Runs a job of `--steps` steps (10,000 by default) into an in-memory log,
//! renders its page, opens it `--runs` times in headless Chromium (through
//! chromedriver, as the browser tests do) and prints, per run and as the
//! median: navigation start to the `load` event, and to the first frame
//! painted after it (the page is then on screen and laid out); then how much
//! longer it takes to open every collapsed section (all the steps, all the
//! raw events) and paint them.
//!
//! ```text
//! cargo run --release --example report_load -- --steps 10000 --runs 7
//! ```

#[path = "../tests/it/browser.rs"]
#[allow(dead_code)] // the tests' browser helpers, of which this program needs a few
mod browser;

use std::sync::Arc;
use std::time::Instant;

use job_executor::clock::LogicalClock;
use job_executor::report::{JobPage, ReportOptions};
use job_executor::store::{EventStore, MemoryStore};
use job_executor::{ExecutionContext, JobExecutor, JobStep, StepOutput};
use serde_json::json;
use uuid::Uuid;

fn argument(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Runs a job of `steps_total` steps into a memory log.
fn long_job(steps_total: u32) -> (Arc<MemoryStore>, Uuid) {
    let store = Arc::new(MemoryStore::new());
    let mut executor = JobExecutor::builder()
        .store(store.clone())
        .clock(Arc::new(LogicalClock::default()))
        .build();
    executor.register_handler(
        "capability_enable",
        |step: &JobStep, _: &ExecutionContext| {
            StepOutput::succeeded(json!({ "enabled": step.parameters["capability"] }))
        },
    );
    let steps: Vec<JobStep> = (0..steps_total)
        .map(|i| {
            let mut step = JobStep::new(i, "capability_enable", format!("service-{}", i % 50));
            step.parameters = json!({ "capability": format!("feature-{i}") });
            step
        })
        .collect();
    let job_id = Uuid::new_v4();
    executor
        .execute_job(job_id, Uuid::new_v4(), &steps, None, "load-test")
        .expect("the job runs");
    (store, job_id)
}

/// Opens the page at `url` once, from a blank page. Milliseconds from
/// navigation start to DOMContentLoaded, to load, and to the first frame
/// painted after it; then how much longer opening every collapsed section
/// and painting it takes.
async fn open_once(browser: &browser::Browser, url: &str) -> [f64; 4] {
    browser
        .client
        .goto("about:blank")
        .await
        .expect("blank page");
    browser.client.goto(url).await.expect("the page opens");
    // The load event has fired; wait for the frame after it.
    let timing = browser
        .client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const nav = performance.getEntriesByType('navigation')[0];
             requestAnimationFrame(() => requestAnimationFrame(() =>
                 done([nav.domContentLoadedEventEnd, nav.loadEventEnd, performance.now()])));",
            vec![],
        )
        .await
        .expect("timings");
    let [dom, load, painted]: [f64; 3] = serde_json::from_value(timing).expect("numbers");
    // A reader who opens every collapsed section: every step's row and
    // every raw event laid out and painted.
    let expanded = browser
        .client
        .execute_async(
            "const done = arguments[arguments.length - 1];
             const start = performance.now();
             for (const d of document.querySelectorAll('details:not(.cell)')) d.open = true;
             document.body.getBoundingClientRect();
             requestAnimationFrame(() => requestAnimationFrame(() =>
                 done(performance.now() - start)));",
            vec![],
        )
        .await
        .expect("timing");
    let expanded: f64 = serde_json::from_value(expanded).expect("a number");
    [dom, load, painted, expanded]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let steps_total = argument("--steps", 10_000) as u32;
    let runs = argument("--runs", 7).max(1);
    let (store, job_id) = long_job(steps_total);

    let started = Instant::now();
    let records = store.load_job(job_id).expect("the log reads");
    let html = JobPage::from_log(job_id, &records, &ReportOptions::default())
        .and_then(|page| page.render())
        .expect("the page renders");
    let render_ms = started.elapsed().as_secs_f64() * 1e3;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("job.html");
    std::fs::write(&path, &html).expect("the page is written");
    println!(
        "{steps_total} steps, {} events: page of {:.1} MiB built and rendered in {render_ms:.0} ms",
        records.len(),
        html.len() as f64 / (1024.0 * 1024.0)
    );

    let Some(browser) = browser::Browser::start("report_load", 1280, 900).await else {
        std::process::exit(1);
    };
    let url = format!("file://{}", path.display());
    let (mut loads, mut paints, mut opens) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let [dom, load, painted, expanded] = open_once(&browser, &url).await;
        println!(
            "run {run}: DOMContentLoaded {dom:.0} ms, load {load:.0} ms, painted {painted:.0} ms; \
             every section opened and painted in {expanded:.0} ms more"
        );
        loads.push(load);
        paints.push(painted);
        opens.push(expanded);
    }
    let rows: u64 = serde_json::from_value(
        browser
            .eval("return document.querySelectorAll('table.steps tbody tr').length;")
            .await,
    )
    .expect("a count");
    assert_eq!(rows, u64::from(steps_total), "every step has its row");
    println!(
        "median of {runs}: load {:.0} ms, painted {:.0} ms; every section opened {:.0} ms more",
        median(&mut loads),
        median(&mut paints),
        median(&mut opens)
    );
    browser.quit().await;
}
