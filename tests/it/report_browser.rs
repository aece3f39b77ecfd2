//! The report as a person sees it: pages opened from `file://` in a real
//! headless Chromium (through chromedriver), checked on what the browser
//! shows, and the index's filter and sorting driven through it.
//!
//! Without chromium and chromedriver these tests skip, saying so on stderr;
//! `.ci/run` sets `JE_REQUIRE_BROWSER=1`, which makes them fail instead.
//!
//! `cargo test --test it -- --ignored report_browser::screenshots`
//! remakes the pictures in `docs/`.

use crate::browser;
use crate::common;

use std::io::ErrorKind;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use browser::Browser;
use chrono::TimeDelta;
use job_executor::clock::LogicalClock;
use job_executor::store::{EventStore, SqliteStore};
use job_executor::{
    ExecutionContext, FailingHandler, HealthObserver, JobExecutor, JobStep, NoOpHandler, StepOutput,
};
use serde_json::{Value, json};
use uuid::Uuid;

/// The job page's width on a laptop, and a phone's.
const DESKTOP: (u32, u32) = (1280, 900);
const PHONE_WIDTH: u32 = 375;

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/plans")
        .join(name)
        .to_str()
        .unwrap()
        .to_owned()
}

/// Runs the CLI and asserts its exit code.
fn cli_ok(dir: &Path, args: &[&str], code: i32) -> String {
    let out = common::cli(dir, args);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn job_id_of(evidence: &str) -> String {
    let value: Value = serde_json::from_str(evidence).unwrap();
    value["job_id"].as_str().unwrap().to_owned()
}

/// `report JOB_ID` of `db` into `dir/NAME.html`.
fn report(dir: &Path, db: &str, job_id: &str, name: &str) -> PathBuf {
    let out = dir.join(format!("{name}.html"));
    cli_ok(
        dir,
        &["report", job_id, "--db", db, "--out", out.to_str().unwrap()],
        0,
    );
    out
}

/// An executor on `db` with a logical clock starting at `start_ms`.
fn executor(db: &Path, start_ms: u64) -> JobExecutor {
    let store = Arc::new(SqliteStore::open(db).unwrap());
    let clock = LogicalClock::new(common::at(start_ms), TimeDelta::milliseconds(1));
    let mut executor = JobExecutor::builder()
        .store(store)
        .clock(Arc::new(clock))
        .build();
    executor.register_handler("noop", NoOpHandler);
    executor
}

/// Bars of the timeline as drawn: (first step, outcome, hover text).
async fn bars(browser: &Browser) -> Vec<(u64, String, String)> {
    let value = browser
        .eval(
            "return [...document.querySelectorAll('svg.timeline .bar')].map(g => {
                 const box = g.querySelector('rect').getBoundingClientRect();
                 return [Number(g.dataset.step), g.dataset.outcome,
                         g.querySelector('title').textContent, box.width > 0 && box.height > 0,
                         getComputedStyle(g.querySelector('rect')).fill];
             });",
        )
        .await;
    let drawn: Vec<(u64, String, String, bool, String)> = serde_json::from_value(value).unwrap();
    // Each outcome has its own colour, and every bar can be seen.
    for (step, outcome, _, visible, fill) in &drawn {
        assert!(visible, "bar of step {step} is drawn");
        for (other_step, other_outcome, _, _, other_fill) in &drawn {
            if outcome != other_outcome {
                assert_ne!(fill, other_fill, "steps {step} and {other_step}");
            }
        }
    }
    drawn
        .into_iter()
        .map(|(step, outcome, title, _, _)| (step, outcome, title))
        .collect()
}

/// The banner of a log that verifies without a key: every check passed,
/// and it says `events` (how many were checked).
async fn the_banner_says_intact(browser: &Browser, events: &str) {
    assert!(
        browser
            .text("#verification h2")
            .await
            .ends_with("Log intact")
    );
    let banner = browser.text("#verification").await;
    assert!(banner.contains(events), "{banner}");
    assert!(banner.contains("not checked: no key given"), "{banner}");
    assert_eq!(
        browser.texts("#checks li").await,
        [
            "✓ EXEC-001",
            "✓ EXEC-002",
            "✓ EXEC-003",
            "✓ EXEC-004",
            "✓ EXEC-005",
            "✓ EXEC-006",
            "✓ CANCEL",
            "✓ LOG"
        ]
    );
}

/// The halted job's raw events are there, collapsed, open on a click, and
/// open for printing.
async fn raw_events_open_on_a_click_and_for_printing(browser: &Browser) {
    let raw_visible = "return document.querySelector('table.events').checkVisibility();";
    assert_eq!(browser.eval(raw_visible).await, json!(false));
    click(browser, "#raw-events > summary").await;
    assert_eq!(browser.eval(raw_visible).await, json!(true));
    assert_eq!(
        browser.texts("table.events tbody td:nth-child(2)").await,
        [
            "JobStarted",
            "StepStarted",
            "StepSucceeded",
            "StepStarted",
            "StepFailed",
            "JobHalted"
        ]
    );

    // Printing opens what is collapsed, so the paper has it all.
    click(browser, "#raw-events > summary").await;
    assert_eq!(browser.eval(raw_visible).await, json!(false));
    browser
        .eval("dispatchEvent(new Event('beforeprint'));")
        .await;
    assert_eq!(browser.eval(raw_visible).await, json!(true));
    browser
        .eval("dispatchEvent(new Event('afterprint'));")
        .await;
    assert_eq!(browser.eval(raw_visible).await, json!(false));
    let pdf = browser
        .client
        .print(fantoccini::wd::PrintConfiguration::default())
        .await
        .unwrap();
    assert!(pdf.starts_with(b"%PDF"), "the page prints");
}

/// On a phone the page does not scroll sideways; wide tables and the
/// timeline scroll inside their own boxes.
async fn nothing_scrolls_sideways_on_a_phone(browser: &Browser) {
    browser
        .client
        .set_window_size(PHONE_WIDTH, 800)
        .await
        .unwrap();
    let widths = browser
        .eval(
            "return [document.documentElement.clientWidth, document.documentElement.scrollWidth];",
        )
        .await;
    let [client, scroll]: [u64; 2] = serde_json::from_value(widths).unwrap();
    assert!(client <= u64::from(PHONE_WIDTH), "{client}");
    assert_eq!(scroll, client, "nothing sticks out at {PHONE_WIDTH} px");
}

#[tokio::test]
async fn a_halted_job_shows_its_status_one_bar_per_step_and_an_intact_log() {
    let Some(browser) = Browser::start("halted job page", DESKTOP.0, DESKTOP.1).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let evidence = cli_ok(
        d,
        &[
            "run",
            &example("halts-on-unknown-step.json"),
            "--db",
            "x.db",
            "--deterministic",
        ],
        1,
    );
    let page = report(d, "x.db", &job_id_of(&evidence), "job");
    browser.open(&page).await;

    assert_eq!(browser.text("#job-status").await, "FAILED");
    assert_eq!(
        browser.text("#job-reason").await,
        "Step 1 failed: No handler registered for step type: reindex"
    );
    assert_eq!(
        browser.text("#steps-summary").await,
        "2 of 3 ran: 1 succeeded, 1 failed"
    );
    let bars = bars(&browser).await;
    assert_eq!(
        bars.iter()
            .map(|(step, outcome, _)| (*step, outcome.as_str()))
            .collect::<Vec<_>>(),
        [(0, "succeeded"), (1, "failed")],
        "one bar per executed step, none for the step that never ran"
    );
    assert!(
        bars[1].2.contains("Step 1 · reindex → search"),
        "{}",
        bars[1].2
    );
    assert!(bars[1].2.contains("No handler registered"), "{}", bars[1].2);

    the_banner_says_intact(&browser, "all 6 events").await;
    let statuses = browser.texts("table.steps tbody td.status .pill").await;
    assert_eq!(statuses, ["COMPLETED", "FAILED", "NOT RUN"]);
    let failure = browser.texts("table.steps tbody td.status").await;
    assert_eq!(failure, ["COMPLETED", "FAILED\nno_handler", "NOT RUN"]);

    raw_events_open_on_a_click_and_for_printing(&browser).await;
    nothing_scrolls_sideways_on_a_phone(&browser).await;
    browser.quit().await;
}

/// Relative luminance-ish brightness of a CSS `rgb(…)` colour, 0–255.
fn brightness(css: &Value) -> u32 {
    let text = css.as_str().unwrap();
    let numbers: Vec<u32> = text
        .trim_start_matches("rgba(")
        .trim_start_matches("rgb(")
        .trim_end_matches(')')
        .split(',')
        .take(3)
        .map(|n| n.trim().parse().unwrap())
        .collect();
    (numbers[0] * 299 + numbers[1] * 587 + numbers[2] * 114) / 1000
}

#[tokio::test]
async fn dark_mode_follows_the_system() {
    let Some(browser) = Browser::start_with(
        "dark mode",
        DESKTOP.0,
        DESKTOP.1,
        &[
            "--force-dark-mode",
            "--blink-settings=preferredColorScheme=0",
        ],
    )
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let evidence = cli_ok(
        d,
        &["run", &example("enable-billing.json"), "--db", "x.db"],
        0,
    );
    let page = report(d, "x.db", &job_id_of(&evidence), "job");
    browser.open(&page).await;
    assert_eq!(
        browser
            .eval("return matchMedia('(prefers-color-scheme: dark)').matches;")
            .await,
        json!(true)
    );
    let background = browser
        .eval("return getComputedStyle(document.body).backgroundColor;")
        .await;
    let text = browser
        .eval("return getComputedStyle(document.body).color;")
        .await;
    assert!(
        brightness(&background) < 60,
        "dark background: {background}"
    );
    assert!(brightness(&text) > 180, "light text: {text}");
    browser.quit().await;
}

/// A connection to the log's file that drops the guards, as an attacker
/// with write access would.
fn attacker(db: &Path) -> rusqlite::Connection {
    let raw = rusqlite::Connection::open(db).unwrap();
    raw.execute_batch(
        "DROP TRIGGER IF EXISTS events_no_update; DROP TRIGGER IF EXISTS events_no_delete;
         DROP TRIGGER IF EXISTS events_insert; PRAGMA ignore_check_constraints = ON;",
    )
    .unwrap();
    raw
}

/// In the log `db`: the second step's start of job `edited` now claims
/// the third step (EXEC-001), and job `inserted` gets a copy of its third
/// event, later ones renumbered.
fn edit_one_and_insert_into_the_other(db: &Path, edited: &str, inserted: &str) {
    let raw = attacker(db);
    raw.execute(
        "UPDATE events SET payload = '{\"step_index\":2}' WHERE job_id = ?1 AND seq = 4",
        [edited],
    )
    .unwrap();
    let records = common::reader(db)
        .load_job(inserted.parse().unwrap())
        .unwrap();
    common::insert_renumbered(&raw, &records, 3, true);
}

#[tokio::test]
async fn a_tampered_log_shows_its_first_broken_link() {
    let Some(browser) = Browser::start("tampered log page", DESKTOP.0, DESKTOP.1).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let plan = example("enable-billing.json");
    let edited = job_id_of(&cli_ok(d, &["run", &plan, "--db", "x.db"], 0));
    let inserted = job_id_of(&cli_ok(d, &["run", &plan, "--db", "x.db"], 0));
    edit_one_and_insert_into_the_other(&d.join("x.db"), &edited, &inserted);

    browser.open(&report(d, "x.db", &edited, "edited")).await;
    assert_eq!(
        browser
            .eval("return document.getElementById('verification').dataset.verdict;")
            .await,
        json!("broken")
    );
    assert!(
        browser
            .text("#verification h2")
            .await
            .ends_with("This log does not verify")
    );
    assert_eq!(
        browser.text("#first-break").await,
        "First broken link of the hash chain: seq 4 — event edited: its content does not match its digest."
    );
    // Replayed through the machine, the edited start breaks the order, and
    // the events after it no longer make sense either.
    let failing: Vec<String> = browser.texts("#checks li.fail").await;
    assert_eq!(failing[0], "✗ EXEC-001", "{failing:?}");
    assert!(
        browser
            .texts("#checks li.pass")
            .await
            .contains(&"✓ EXEC-006".to_owned())
    );
    assert!(browser.text("#head").await.starts_with("sha256:"));
    // The raw events say where, in red.
    click(&browser, "#raw-events > summary").await;
    let flagged = browser.texts("table.events tr.flagged").await;
    assert!(flagged[0].starts_with("4\tStepStarted"), "{flagged:?}");
    assert!(flagged[0].contains("CHAIN: event edited"), "{flagged:?}");
    let sound = browser.texts("table.events tbody tr:not(.flagged)").await;
    assert_eq!(sound.len(), 3, "seq 1-3 are sound: {sound:?}");
    // The page still shows what the log holds now: the refused event stops the fold.
    assert_eq!(browser.text(".as-of").await, "as of seq 3 of 8");
    assert_eq!(
        browser.text("#fold-stopped").await,
        "Shown as of seq 3: the state machine refuses seq 4 (EXEC-001: StepStarted for step 2, \
         but the next step in plan order is 1), so the status, summary, timeline and steps stop \
         there. The raw events list every stored event."
    );
    assert_eq!(
        browser.texts("svg .bar").await.len(),
        1,
        "the steps before the refusal"
    );

    browser
        .open(&report(d, "x.db", &inserted, "inserted"))
        .await;
    assert_eq!(
        browser.text("#first-break").await,
        "First broken link of the hash chain: seq 3 — event inserted at seq 3: later events were renumbered."
    );
    browser.quit().await;
}

/// Appends `events` (chained, times from 2000-01-01) as job `job_id`'s log.
fn append(db: &Path, job_id: Uuid, events: &[job_executor::events::Event]) {
    append_from(db, job_id, events, common::at(0));
}

/// [`append`], with times from `start`.
fn append_from(
    db: &Path,
    job_id: Uuid,
    events: &[job_executor::events::Event],
    start: chrono::DateTime<chrono::Utc>,
) {
    SqliteStore::open(db)
        .unwrap()
        .append(&common::records_from(job_id, events, start))
        .unwrap();
}

/// A log with jobs of every status, one of them tampered with.
struct Mixed {
    completed: Vec<Uuid>,
    failed: Uuid,
    cancelled: Uuid,
    running: Uuid,
    tampered: Uuid,
}

fn mixed_log(db: &Path) -> Mixed {
    let executor = executor(db, 1_000);
    let noop =
        |n: u32| -> Vec<JobStep> { (0..n).map(|i| JobStep::new(i, "noop", "svc")).collect() };
    let run = |steps: &[JobStep]| {
        let id = Uuid::new_v4();
        executor
            .execute_job(id, Uuid::new_v4(), steps, None, "ops")
            .unwrap();
        id
    };
    let completed = vec![run(&noop(2)), run(&noop(5))];
    let mut failing = noop(3);
    failing[1].step_type = "missing".into();
    let failed = run(&failing);
    let cancelled = Uuid::new_v4();
    append(db, cancelled, &common::stopped_between_steps(3, "noop"));
    executor.request_cancel(cancelled, "change freeze").unwrap();
    executor.recover().unwrap();
    let running = Uuid::new_v4();
    append(db, running, &common::stopped_between_steps(4, "noop"));
    let tampered = run(&noop(1));
    attacker(db)
        .execute(
            "UPDATE events SET recorded_at = '2000-01-01T00:00:09.000000Z' WHERE job_id = ?1 AND seq = 2",
            [tampered.to_string()],
        )
        .unwrap();
    Mixed {
        completed,
        failed,
        cancelled,
        running,
        tampered,
    }
}

/// The `data-job` of the index rows a person can see, in order.
async fn visible_jobs(browser: &Browser) -> Vec<String> {
    serde_json::from_value(
        browser
            .eval(
                "return [...document.querySelectorAll('#jobs tbody tr')]
                     .filter(r => r.checkVisibility()).map(r => r.dataset.job);",
            )
            .await,
    )
    .unwrap()
}

async fn click(browser: &Browser, selector: &str) {
    browser
        .client
        .find(fantoccini::Locator::Css(selector))
        .await
        .unwrap_or_else(|e| panic!("{selector}: {e}"))
        .click()
        .await
        .unwrap();
}

/// Each total of the index filters its rows to the jobs of that status
/// (the tampered job's log still says COMPLETED); `all` is every job, in
/// the order they started.
async fn each_filter_shows_its_jobs(browser: &Browser, jobs: &Mixed, all: &[String]) {
    click(browser, "#totals [data-filter=FAILED]").await;
    assert_eq!(visible_jobs(browser).await, [jobs.failed.to_string()]);
    assert_eq!(
        browser.text("#shown").await,
        "Showing 1 of 6 jobs (FAILED)."
    );
    assert_eq!(
        browser.eval("return document.querySelector('[data-filter=FAILED]').getAttribute('aria-pressed');").await,
        json!("true")
    );
    click(browser, "#totals [data-filter=COMPLETED]").await;
    let mut completed = [jobs.completed[0], jobs.completed[1], jobs.tampered];
    completed.sort_by_key(|id| all.iter().position(|a| *a == id.to_string()));
    assert_eq!(
        visible_jobs(browser).await,
        completed.iter().map(Uuid::to_string).collect::<Vec<_>>()
    );
    click(browser, "#totals [data-filter=CANCELLED]").await;
    assert_eq!(visible_jobs(browser).await, [jobs.cancelled.to_string()]);
    click(browser, "#totals [data-filter=RUNNING]").await;
    assert_eq!(visible_jobs(browser).await, [jobs.running.to_string()]);
    click(browser, "#totals [data-filter=BROKEN]").await;
    assert_eq!(visible_jobs(browser).await, [jobs.tampered.to_string()]);
    click(browser, "#totals [data-filter=all]").await;
    assert_eq!(visible_jobs(browser).await, all);
}

/// Sorting by duration, then the other way.
async fn sorting_by_duration_goes_both_ways(browser: &Browser) {
    let durations = "return [...document.querySelectorAll('#jobs tbody tr')].map(r => Number(r.dataset.duration));";
    click(browser, "th[data-key=duration] button").await;
    let ascending: Vec<i64> = serde_json::from_value(browser.eval(durations).await).unwrap();
    assert!(ascending.windows(2).all(|w| w[0] <= w[1]), "{ascending:?}");
    assert!(ascending.first() < ascending.last(), "{ascending:?}");
    click(browser, "th[data-key=duration] button").await;
    let descending: Vec<i64> = serde_json::from_value(browser.eval(durations).await).unwrap();
    assert!(
        descending.windows(2).all(|w| w[0] >= w[1]),
        "{descending:?}"
    );
    assert_eq!(
        browser
            .eval(
                "return document.querySelector('th[data-key=duration]').getAttribute('aria-sort');"
            )
            .await,
        json!("descending")
    );
}

#[tokio::test]
async fn the_index_filters_by_status_and_sorts_in_the_browser() {
    let Some(browser) = Browser::start("index filter", DESKTOP.0, DESKTOP.1).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let jobs = mixed_log(&d.join("x.db"));
    cli_ok(d, &["report", "--all", "--db", "x.db", "--out", "site"], 0);
    browser.open(&d.join("site/index.html")).await;

    let totals = browser.texts("#totals button").await;
    assert_eq!(
        totals
            .iter()
            .map(|t| t.replace('\n', " "))
            .collect::<Vec<_>>(),
        [
            "6 ALL",
            "3 COMPLETED",
            "1 FAILED",
            "1 CANCELLED",
            "1 RUNNING",
            "1 LOG DOES NOT VERIFY"
        ]
    );
    let all: Vec<String> = [
        jobs.completed[0],
        jobs.completed[1],
        jobs.failed,
        jobs.cancelled,
        jobs.running,
        jobs.tampered,
    ]
    .iter()
    .map(Uuid::to_string)
    .collect();
    assert_eq!(
        visible_jobs(&browser).await,
        all,
        "in the order they started"
    );

    each_filter_shows_its_jobs(&browser, &jobs, &all).await;
    sorting_by_duration_goes_both_ways(&browser).await;
    // Filtering keeps the order chosen.
    click(&browser, "#totals [data-filter=COMPLETED]").await;
    assert_eq!(visible_jobs(&browser).await.len(), 3);

    // A row leads to the job's page, and the page back to the index.
    click(&browser, "#totals [data-filter=all]").await;
    click(&browser, &format!("a[href='{}.html']", jobs.failed)).await;
    assert_eq!(browser.text("#job-status").await, "FAILED");
    assert_eq!(browser.text("#job-id").await, jobs.failed.to_string());
    click(&browser, "nav a").await;
    assert!(browser.text("h1").await.ends_with("6 jobs"));
    browser.quit().await;
}

/// A loopback listener that counts whoever connects: a page that loads
/// anything from it has made a network request.
struct Witness {
    listener: TcpListener,
    port: u16,
}

impl Witness {
    fn new() -> Witness {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        Witness { listener, port }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// What reached the listener so far, after giving late loads time to
    /// start: one entry per connection, its first line ("" for a connection
    /// that sent nothing).
    async fn arrivals(&self) -> Vec<String> {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut arrivals = Vec::new();
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    stream.set_nonblocking(false).unwrap();
                    stream
                        .set_read_timeout(Some(Duration::from_millis(300)))
                        .unwrap();
                    let mut buffer = [0u8; 256];
                    let n = std::io::Read::read(&mut stream, &mut buffer).unwrap_or(0);
                    let text = String::from_utf8_lossy(&buffer[..n]);
                    arrivals.push(text.lines().next().unwrap_or_default().to_owned());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return arrivals,
                Err(e) => panic!("{e}"),
            }
        }
    }
}

/// Values that would run code, open a dialog or load something, if a page
/// let them through as markup. Each one that ran would set `window.__pwned`.
fn hostile(witness: &Witness) -> [String; 6] {
    [
        "<script>window.__pwned=1;alert(1)</script>".to_owned(),
        "\"><img src=x onerror=\"window.__pwned=2;alert(2)\">".to_owned(),
        "</style><script>window.__pwned=3;alert(3)</script><style>".to_owned(),
        "</title><svg onload=\"window.__pwned=4;alert(4)\"></svg>".to_owned(),
        format!(
            "<img src=\"{}\"><link rel=\"stylesheet\" href=\"{}\"><iframe src=\"{}\"></iframe>",
            witness.url("img"),
            witness.url("css"),
            witness.url("frame")
        ),
        format!(
            "'><style>@import url({});</style><script src=\"{}\"></script>",
            witness.url("import"),
            witness.url("script")
        ),
    ]
}

/// A health observer whose every observation carries hostile text.
struct HostileHealth(String);

impl HealthObserver for HostileHealth {
    fn observe_health(&self) -> Value {
        json!({ "note": self.0 })
    }
}

/// Asserts that nothing on the open page ran, loaded or appeared that the
/// hostile values asked for.
async fn nothing_ran(browser: &Browser, witness: &Witness, page: &str) {
    assert!(
        browser.client.get_alert_text().await.is_err(),
        "{page}: a dialog opened"
    );
    let facts = browser
        .eval(
            "return {
                 pwned: typeof window.__pwned,
                 injected: document.querySelectorAll(
                     'img, iframe, link, object, embed, svg svg, [onerror], [onload]').length,
                 scripts: document.scripts.length,
                 styles: document.querySelectorAll('style').length,
                 loaded: performance.getEntriesByType('resource').length,
             };",
        )
        .await;
    assert_eq!(
        facts,
        json!({"pwned": "undefined", "injected": 0, "scripts": 1, "styles": 1, "loaded": 0}),
        "{page}"
    );
    let arrivals = witness.arrivals().await;
    assert!(arrivals.is_empty(), "{page} reached out: {arrivals:?}");
}

/// Runs a job into the log `db` whose every recorded value is one of the
/// `hostile` ones: step types, targets, parameters, output, error, health
/// and who executed it. Its job id.
fn run_hostile_job(db: &Path, hostile: [String; 6]) -> Uuid {
    let [script, attribute, style, title, network, import] = hostile;
    let mut executor = executor(db, 0);
    let output = json!({ "html": style, "title": title.clone(), "net": network.clone() });
    executor.register_handler("echo", move |_: &JobStep, _: &ExecutionContext| {
        StepOutput::succeeded(output.clone())
    });
    executor.register_handler(script.clone(), FailingHandler::new(import));
    let mut first = JobStep::new(0, "echo", script.clone());
    first.parameters = json!({ "q": attribute.clone(), "net": network.clone() });
    let steps = [first, JobStep::new(1, script, title)];
    let job_id = Uuid::new_v4();
    let health = HostileHealth(network);
    executor
        .execute_job(job_id, Uuid::new_v4(), &steps, Some(&health), &attribute)
        .unwrap();
    job_id
}

#[tokio::test]
async fn hostile_values_show_as_text_and_run_nothing() {
    let Some(browser) = Browser::start("hostile values", DESKTOP.0, DESKTOP.1).await else {
        return;
    };
    let witness = Witness::new();
    let values = hostile(&witness);
    let [script, attribute, style, title, network, import] = values.clone();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let job_id = run_hostile_job(&d.join("x.db"), values);
    let page = report(d, "x.db", &job_id.to_string(), "job");
    cli_ok(d, &["report", "--all", "--db", "x.db", "--out", "site"], 0);

    browser.open(&page).await;
    nothing_ran(&browser, &witness, "job page").await;
    // What a person reads is the values themselves.
    let types = browser.texts("table.steps tbody .type").await;
    let targets = browser.texts("table.steps tbody .target").await;
    assert_eq!(types, ["echo", script.as_str()]);
    assert_eq!(targets, [script.as_str(), title.as_str()]);
    let errors = browser.texts("table.steps tbody td.message").await;
    assert!(
        import.starts_with(errors[1].trim_end_matches('…')),
        "a long error is collapsed: {errors:?}"
    );
    let error = browser
        .eval("return document.querySelector('table.steps tbody tr:nth-child(2) td.message pre').textContent;")
        .await;
    assert_eq!(error, json!(import), "the handler's error, in full");
    assert_eq!(
        browser.text("#job-reason").await,
        format!("Step 1 failed: {import}")
    );
    let summary = browser.text("#summary").await;
    assert!(summary.contains(&attribute), "executed by: {summary}");
    let titles: Vec<String> = serde_json::from_value(
        browser
            .eval(
                "return [...document.querySelectorAll('svg .bar title')].map(t => t.textContent);",
            )
            .await,
    )
    .unwrap();
    assert!(
        titles[0].contains(&script) && titles[1].contains(&title),
        "{titles:?}"
    );
    // Collapsed JSON, opened, shows the output as JSON text.
    let output = browser
        .eval(
            "const d = document.querySelector('table.steps tbody tr:first-child td:nth-child(6) details');
             d.open = true; return d.querySelector('pre').textContent;",
        )
        .await;
    let shown: Value = serde_json::from_str(output.as_str().unwrap()).unwrap();
    assert_eq!(shown["html"], json!(style));
    assert_eq!(shown["net"], json!(network));
    nothing_ran(&browser, &witness, "job page, output opened").await;

    the_site_runs_nothing(&browser, &witness, &d.join("site"), job_id, &import).await;
    browser.quit().await;
}

/// The `site` written of the hostile job `job_id` (whose error is `import`)
/// runs and loads nothing either, index and page.
async fn the_site_runs_nothing(
    browser: &Browser,
    witness: &Witness,
    site: &Path,
    job_id: Uuid,
    import: &str,
) {
    browser.open(&site.join("index.html")).await;
    nothing_ran(browser, witness, "index").await;
    assert_eq!(
        browser
            .eval("return document.querySelector('#jobs tbody .pill').title;")
            .await,
        json!(format!("Step 1 failed: {import}"))
    );
    browser.open(&site.join(format!("{job_id}.html"))).await;
    nothing_ran(browser, witness, "job page of the site").await;
}

/// A script that adds to the page what escaping might let through: a
/// script, an image and a frame from the `witness`, a style; and records
/// which directives of the policy refused them.
fn injection(witness: &Witness) -> String {
    format!(
        "window.__violations = [];
         document.addEventListener('securitypolicyviolation',
             e => window.__violations.push(e.effectiveDirective));
         const s = document.createElement('script');
         s.textContent = 'window.__ran = 1';
         document.body.appendChild(s);
         const i = document.createElement('img');
         i.src = {img};
         document.body.appendChild(i);
         const st = document.createElement('style');
         st.textContent = 'body {{ background: rgb(255, 0, 0) }}';
         document.head.appendChild(st);
         const f = document.createElement('iframe');
         f.src = {frame};
         document.body.appendChild(f);",
        img = json!(witness.url("img")),
        frame = json!(witness.url("frame")),
    )
}

#[tokio::test]
async fn the_policy_stops_what_escaping_might_miss() {
    let Some(browser) = Browser::start("content security policy", DESKTOP.0, DESKTOP.1).await
    else {
        return;
    };
    let witness = Witness::new();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let evidence = cli_ok(
        d,
        &["run", &example("enable-billing.json"), "--db", "x.db"],
        0,
    );
    browser
        .open(&report(d, "x.db", &job_id_of(&evidence), "job"))
        .await;
    // The page's own style and script are allowed: the policy names their hashes.
    let styled = browser
        .eval("return getComputedStyle(document.getElementById('verification')).backgroundColor;")
        .await;
    assert_ne!(
        styled,
        json!("rgba(0, 0, 0, 0)"),
        "the inline style applies"
    );
    browser
        .eval("dispatchEvent(new Event('beforeprint'));")
        .await;
    assert_eq!(
        browser
            .eval("return document.getElementById('raw-events').open;")
            .await,
        json!(true),
        "the inline script runs"
    );
    // Markup that got into the page by mistake can neither run nor load.
    browser.eval(&injection(&witness)).await;
    // Chromium may open a connection for the frame before the policy
    // refuses the navigation; nothing is ever sent on it.
    let arrivals = witness.arrivals().await;
    assert!(
        arrivals.iter().all(String::is_empty),
        "requests: {arrivals:?}"
    );
    let outcome = browser
        .eval(
            "return [typeof window.__ran, getComputedStyle(document.body).backgroundColor,
                     [...new Set(window.__violations)].sort()];",
        )
        .await;
    assert_eq!(outcome[0], json!("undefined"));
    assert_ne!(outcome[1], json!("rgb(255, 0, 0)"));
    assert_eq!(
        outcome[2],
        json!(["frame-src", "img-src", "script-src-elem", "style-src-elem"])
    );
    browser.quit().await;
}

/// The moments marked on a page's timeline and its bars' outcomes.
async fn moments_and_outcomes(browser: &Browser) -> (Vec<String>, Vec<String>) {
    let moments = browser
        .eval("return [...document.querySelectorAll('svg .marker')].map(m => m.dataset.moment);")
        .await;
    let outcomes = browser
        .eval("return [...document.querySelectorAll('svg .bar')].map(b => b.dataset.outcome);")
        .await;
    (
        serde_json::from_value(moments).unwrap(),
        serde_json::from_value(outcomes).unwrap(),
    )
}

/// Jobs written into the log `db`, one per moment the timeline marks: a
/// step timed out, a step interrupted, a job cancelled, a job resumed, and
/// a step still in doubt, in that order.
fn jobs_of_every_moment(db: &Path) -> [Uuid; 5] {
    let mut executor = executor(db, 1_000);
    executor.register_handler("slow", |_: &JobStep, _: &ExecutionContext| {
        std::thread::sleep(Duration::from_secs(3));
        StepOutput::succeeded(json!({}))
    });

    let timed_out = Uuid::new_v4();
    let mut slow = JobStep::new(1, "slow", "db");
    slow.timeout_seconds = 1;
    executor
        .execute_job(
            timed_out,
            Uuid::new_v4(),
            &[JobStep::new(0, "noop", "db"), slow],
            None,
            "ops",
        )
        .unwrap();
    let interrupted = Uuid::new_v4();
    append(
        db,
        interrupted,
        &[common::started_of(2, "noop"), common::step_started(0)],
    );
    let cancelled = Uuid::new_v4();
    append(db, cancelled, &common::stopped_between_steps(3, "noop"));
    executor.request_cancel(cancelled, "change freeze").unwrap();
    executor.recover().unwrap();
    let resumed = Uuid::new_v4();
    append(db, resumed, &common::stopped_between_steps(3, "noop"));
    executor.resume(resumed, None, "night shift").unwrap();
    let in_doubt = Uuid::new_v4();
    append(
        db,
        in_doubt,
        &[common::started_of(1, "noop"), common::step_started(0)],
    );
    [timed_out, interrupted, cancelled, resumed, in_doubt]
}

#[tokio::test]
async fn the_timeline_marks_timeouts_interruptions_cancellations_and_resumptions() {
    let Some(browser) = Browser::start("timeline moments", DESKTOP.0, DESKTOP.1).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let [timed_out, interrupted, cancelled, resumed, in_doubt] =
        jobs_of_every_moment(&d.join("x.db"));
    let cases = [
        (
            timed_out,
            "FAILED",
            vec!["timed-out"],
            vec!["succeeded", "timed-out"],
        ),
        (
            interrupted,
            "FAILED",
            vec!["interrupted"],
            vec!["interrupted"],
        ),
        (
            cancelled,
            "CANCELLED",
            vec!["cancel-requested", "cancelled"],
            vec!["succeeded"],
        ),
        (
            resumed,
            "COMPLETED",
            vec!["resumed"],
            vec!["succeeded", "succeeded", "succeeded"],
        ),
        (in_doubt, "RUNNING", vec![], vec!["in-doubt"]),
    ];
    for (job_id, status, want_moments, want_outcomes) in cases {
        browser
            .open(&report(d, "x.db", &job_id.to_string(), &job_id.to_string()))
            .await;
        assert_eq!(browser.text("#job-status").await, status, "{job_id}");
        let (moments, outcomes) = moments_and_outcomes(&browser).await;
        assert_eq!(moments, want_moments, "{status}");
        assert_eq!(outcomes, want_outcomes, "{status}");
    }

    browser.open(&d.join(format!("{timed_out}.html"))).await;
    let title = browser
        .eval("return document.querySelector('svg .marker title').textContent;")
        .await;
    assert!(
        title.as_str().unwrap().contains("timed out after 1 s"),
        "{title}"
    );
    assert_eq!(
        browser
            .texts("table.steps tbody tr:nth-child(2) td.status .kind")
            .await,
        ["timeout"]
    );
    browser.open(&d.join(format!("{resumed}.html"))).await;
    assert!(browser.text("#summary").await.contains("by night shift"));
    browser.quit().await;
}

/// A clock for pictures: each reading advances by the next of `gaps_ms`,
/// so steps take different, realistic times, the same on every run.
struct ScriptedClock {
    start: chrono::DateTime<chrono::Utc>,
    gaps_ms: Vec<i64>,
    readings: std::sync::atomic::AtomicUsize,
}

impl job_executor::clock::Clock for ScriptedClock {
    fn now(&self) -> chrono::DateTime<chrono::Utc> {
        let n = self
            .readings
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let elapsed: i64 = (0..n).map(|i| self.gaps_ms[i % self.gaps_ms.len()]).sum();
        self.start + TimeDelta::milliseconds(elapsed)
    }
}

/// Health that changes as the demo job goes.
struct DemoHealth {
    observations: Vec<Value>,
    read: std::sync::atomic::AtomicUsize,
}

impl HealthObserver for DemoHealth {
    fn observe_health(&self) -> Value {
        let n = self.read.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.observations[n.min(self.observations.len() - 1)].clone()
    }
}

/// When the demo log's first job starts.
fn demo_start() -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::parse_from_rfc3339("2025-03-14T09:30:00Z")
        .unwrap()
        .to_utc()
}

/// The executor of the demo log: a scripted clock from [`demo_start`], and
/// handlers that answer as real ones would.
fn demo_executor(store: Arc<SqliteStore>) -> JobExecutor {
    let clock = ScriptedClock {
        start: demo_start(),
        gaps_ms: vec![120, 2_350, 40, 810, 35, 14_900, 60, 31_020, 25, 420],
        readings: std::sync::atomic::AtomicUsize::new(0),
    };
    let mut executor = JobExecutor::builder()
        .store(store)
        .clock(Arc::new(clock))
        .build();
    for kind in [
        "capability_enable",
        "capability_disable",
        "configuration_change",
    ] {
        executor.register_handler(kind, |step: &JobStep, _: &ExecutionContext| {
            StepOutput::succeeded(json!({ "target": step.target, "applied": step.parameters }))
        });
    }
    executor.register_handler("backup", |_: &JobStep, _: &ExecutionContext| {
        StepOutput::succeeded(json!({
            "exit_code": 0,
            "stdout": "",
            "stderr": "pg_dump: dumping contents of table \"public.invoices\"\npg_dump: dumping contents of table \"public.payments\"\npg_dump: dumping contents of table \"public.refunds\"\n",
            "bytes_written": 48_213_556,
        }))
    });
    executor.register_handler(
        "migrate",
        FailingHandler::new(
            "migration 0042_invoice_due_date_index failed: lock timeout after 30 s on relation \"invoices\"",
        ),
    );
    executor
}

fn demo_step(i: u32, kind: &str, target: &str, parameters: Value) -> JobStep {
    let mut step = JobStep::new(i, kind, target);
    step.parameters = parameters;
    step
}

/// The demo's maintenance job, which halts on a failed migration.
fn demo_maintenance_plan() -> [JobStep; 5] {
    [
        demo_step(
            0,
            "capability_disable",
            "billing-api",
            json!({"capability": "invoice-writes", "reason": "maintenance window"}),
        ),
        demo_step(
            1,
            "configuration_change",
            "billing-db",
            json!({"max_connections": 200, "statement_timeout_ms": 5000}),
        ),
        demo_step(
            2,
            "backup",
            "billing-db",
            json!({"argv": ["pg_dump", "--format=custom", "-f", "/backups/billing-2025-03-14.dump"]}),
        ),
        demo_step(3, "migrate", "billing-db", json!({"to_version": 42})),
        demo_step(
            4,
            "capability_enable",
            "billing-api",
            json!({"capability": "invoice-writes"}),
        ),
    ]
}

/// The health the maintenance job observes: the database under strain as
/// the migration waits for its lock.
fn demo_health() -> DemoHealth {
    DemoHealth {
        observations: vec![
            json!({"billing-api": {"status": "up", "p99_ms": 182}, "billing-db": {"connections": 41, "replication_lag_s": 0}, "error_rate": 0.002}),
            json!({"billing-api": {"status": "draining", "p99_ms": 95}, "billing-db": {"connections": 41, "replication_lag_s": 0}, "error_rate": 0.002}),
            json!({"billing-api": {"status": "draining", "p99_ms": 90}, "billing-db": {"connections": 12, "replication_lag_s": 0}, "error_rate": 0.001}),
            json!({"billing-api": {"status": "draining", "p99_ms": 91}, "billing-db": {"connections": 12, "replication_lag_s": 1}, "error_rate": 0.001}),
            json!({"billing-api": {"status": "draining", "p99_ms": 90}, "billing-db": {"connections": 57, "replication_lag_s": 4, "locks_waiting": 9}, "error_rate": 0.013}),
        ],
        read: std::sync::atomic::AtomicUsize::new(0),
    }
}

/// A rollout of a capability to `regions` regions, one step each.
fn rollout(regions: u32) -> Vec<JobStep> {
    (0..regions)
        .map(|i| {
            demo_step(
                i,
                "capability_enable",
                &format!("region-{}", i + 1),
                json!({"capability": "instant-refunds"}),
            )
        })
        .collect()
}

/// A log that looks like a week of operations, for the pictures in
/// `docs/`: returns the job that halted on a failed migration.
fn demo_log(db: &Path) -> Uuid {
    let executor = demo_executor(Arc::new(SqliteStore::open(db).unwrap()));
    let halted_plan = demo_maintenance_plan();
    let health = demo_health();
    let contract: Uuid = "0b6f3a55-1f0e-4c1e-9a8b-2d7c9e4f6a10".parse().unwrap();
    let ids: Vec<Uuid> = (1..=9u128)
        .map(|n| {
            Uuid::from_u128(0x7c3e_52a1_0000_4000_8000_0000_0000_0000 + n * 0x1_0000_0000_0001)
        })
        .collect();
    executor
        .execute_job(ids[0], contract, &rollout(3), None, "release-bot")
        .unwrap();
    executor
        .execute_job(ids[1], contract, &rollout(12), None, "release-bot")
        .unwrap();
    let halted = ids[2];
    executor
        .execute_job(halted, contract, &halted_plan, Some(&health), "ops@billing")
        .unwrap();
    executor
        .execute_job(ids[3], contract, &rollout(6), None, "release-bot")
        .unwrap();
    let later = |seconds: i64| demo_start() + TimeDelta::seconds(seconds);
    append_from(
        db,
        ids[4],
        &common::stopped_between_steps(4, "capability_enable"),
        later(210),
    );
    executor
        .request_cancel(ids[4], "change freeze for the quarter close")
        .unwrap();
    append_from(
        db,
        ids[5],
        &[
            common::started_of(2, "configuration_change"),
            common::step_started(0),
        ],
        later(225),
    );
    executor.recover().unwrap();
    executor
        .execute_job(ids[6], contract, &rollout(8), None, "release-bot")
        .unwrap();
    append_from(
        db,
        ids[7],
        &common::stopped_between_steps(5, "capability_enable"),
        later(400),
    );
    executor
        .execute_job(ids[8], contract, &rollout(4), None, "release-bot")
        .unwrap();
    attacker(db)
        .execute(
            "UPDATE events SET payload = replace(payload, 'region-2', 'region-9') WHERE job_id = ?1 AND seq = 1",
            [ids[8].to_string()],
        )
        .unwrap();
    halted
}

/// A picture of the whole page at `width`, however long it is.
async fn full_page(browser: &Browser, width: u32) -> Vec<u8> {
    // The window is the page plus what the browser keeps for itself.
    let height: u32 = serde_json::from_value(
        browser
            .eval(
                "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight;",
            )
            .await,
    )
    .unwrap();
    browser.client.set_window_size(width, height).await.unwrap();
    browser.client.screenshot().await.unwrap()
}

#[tokio::test]
#[ignore = "remakes the pictures in docs/: cargo test --test it -- --ignored report_browser::screenshots"]
async fn screenshots() {
    let Some(browser) = Browser::start("screenshots", 1280, 900).await else {
        panic!("the pictures need chromium and chromedriver");
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let halted = demo_log(&d.join("demo.db"));
    cli_ok(
        d,
        &["report", "--all", "--db", "demo.db", "--out", "site"],
        0,
    );
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    for (page, picture) in [
        (format!("site/{halted}.html"), "report-job.png"),
        ("site/index.html".to_owned(), "report-index.png"),
    ] {
        browser.client.set_window_size(1280, 900).await.unwrap();
        browser.open(&d.join(&page)).await;
        let png = full_page(&browser, 1280).await;
        assert!(png.starts_with(b"\x89PNG"), "{picture}");
        std::fs::write(docs.join(picture), png).unwrap();
    }
    browser.quit().await;
}

#[tokio::test]
async fn a_long_job_collapses_gracefully_and_every_row_can_still_be_read() {
    let Some(browser) = Browser::start("long job", DESKTOP.0, DESKTOP.1).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("x.db");
    let steps: Vec<JobStep> = (0..1_200).map(|i| JobStep::new(i, "noop", "svc")).collect();
    let job_id = Uuid::new_v4();
    executor(&db, 0)
        .execute_job(job_id, Uuid::new_v4(), &steps, None, "ops")
        .unwrap();
    let page = report(dir.path(), "x.db", &job_id.to_string(), "long");
    browser.open(&page).await;

    // The timeline draws runs of steps, each covering its share.
    let runs: Vec<(u64, u64, String)> = serde_json::from_value(
        browser
            .eval(
                "return [...document.querySelectorAll('svg .bar')].map(b =>
                     [Number(b.dataset.step), Number(b.dataset.steps), b.querySelector('title').textContent]);",
            )
            .await,
    )
    .unwrap();
    assert_eq!(runs.len(), 400);
    assert!(runs.iter().all(|(_, n, _)| *n == 3));
    assert_eq!(runs[399].0, 1_197);
    assert!(
        runs[0].2.starts_with("Steps 0–2 (3 steps): 3 succeeded"),
        "{}",
        runs[0].2
    );

    // The steps come in sections, the first one open.
    let sections = browser
        .eval("return [...document.querySelectorAll('#steps details.section')].map(d => d.open);")
        .await;
    assert_eq!(sections, json!([true, false, false]));
    let last_row = "#steps details.section:last-of-type tbody tr:last-child";
    click(&browser, "#steps details.section:last-of-type > summary").await;
    browser
        .eval(&format!(
            "document.querySelector({}).scrollIntoView();",
            json!(last_row)
        ))
        .await;
    let row = browser.text(last_row).await;
    assert!(
        row.starts_with("1199\t") && row.contains("noop") && row.contains("COMPLETED"),
        "{row:?}"
    );

    // So do the raw events: the last one can be scrolled to and read.
    click(&browser, "#raw-events > summary").await;
    let tables = browser
        .eval("return document.querySelectorAll('table.events').length;")
        .await;
    assert_eq!(tables, json!(3), "2,402 events in tables of 1,000");
    let last_event = "#raw-events .scroll:last-of-type tbody tr:last-child";
    browser
        .eval(&format!(
            "document.querySelector({}).scrollIntoView();",
            json!(last_event)
        ))
        .await;
    let text = browser.text(last_event).await;
    assert!(text.starts_with("2402\tJobCompleted"), "{text:?}");
    browser.quit().await;
}
