//! `job-executor report`: its command-line shapes, exit codes and files,
//! and that a page is a projection of the log: the same log and options give
//! the same bytes. What the pages look like in a browser is
//! `tests/it/report_browser.rs`.

use std::path::{Path, PathBuf};

use crate::common;

use common::cli;
use job_executor::report::{JobPage, ReportOptions};
use serde_json::Value;

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/plans")
        .join(name)
        .to_str()
        .unwrap()
        .to_owned()
}

/// Runs the CLI, asserts the exit code and an empty stderr, returns stdout.
fn run_ok(dir: &Path, args: &[&str], code: i32) -> Vec<u8> {
    let out = cli(dir, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(err.is_empty(), "{args:?}: {err}");
    out.stdout
}

fn job_id(evidence: &[u8]) -> String {
    let value: Value = serde_json::from_slice(evidence).unwrap();
    value["job_id"].as_str().unwrap().to_owned()
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap()
}

/// Every file in `dir`, by name, with its bytes.
fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// Everything in `dir`, recursively.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            paths.extend(tree(&path));
        }
        paths.push(path);
    }
    paths.sort();
    paths
}

#[test]
fn a_page_goes_to_stdout_or_to_the_out_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let evidence = run_ok(
        d,
        &[
            "run",
            &example("halts-on-unknown-step.json"),
            "--db",
            "x.db",
        ],
        1,
    );
    let id = job_id(&evidence);
    let page = run_ok(d, &["report", &id, "--db", "x.db"], 0);
    let html = text(&page);
    assert!(html.starts_with("<!DOCTYPE html>\n"), "{}", &html[..40]);
    assert!(html.ends_with("</html>\n"));
    assert!(html.contains(&format!("<code class=\"job-id\" id=\"job-id\">{id}</code>")));
    assert!(html.contains(">FAILED</span>"));

    let written = run_ok(d, &["report", &id, "--db", "x.db", "--out", "job.html"], 0);
    assert!(written.is_empty(), "nothing on stdout with --out");
    assert_eq!(std::fs::read(d.join("job.html")).unwrap(), page);
}

#[test]
fn the_same_log_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut pages = Vec::new();
    for db in ["a.db", "b.db"] {
        let mut ids = Vec::new();
        for (plan, code) in [
            ("enable-billing.json", 0),
            ("halts-on-unknown-step.json", 1),
        ] {
            let evidence = run_ok(
                d,
                &["run", &example(plan), "--db", db, "--deterministic"],
                code,
            );
            ids.push(job_id(&evidence));
        }
        for id in &ids {
            pages.push(run_ok(d, &["report", id, "--db", db], 0));
        }
        let site = format!("{db}.site");
        run_ok(d, &["report", "--all", "--db", db, "--out", &site], 0);
        pages.push(
            files(&d.join(&site))
                .into_iter()
                .flat_map(|(name, bytes)| name.into_bytes().into_iter().chain(bytes))
                .collect(),
        );
    }
    // Two fresh databases, the same plans: the same pages and sites, byte for byte.
    assert_eq!(pages[0..3], pages[3..6]);
    assert_ne!(pages[0], pages[1]);
    // And the library gives what the command line wrote.
    let a = common::reader(&d.join("a.db"));
    let id = job_id(&run_ok(
        d,
        &["replay", &job_id_of_page(&pages[0]), "--db", "a.db"],
        0,
    ));
    let records = job_executor::store::EventStore::load_job(&a, id.parse().unwrap()).unwrap();
    let page = JobPage::from_log(id.parse().unwrap(), &records, &ReportOptions::default())
        .unwrap()
        .render()
        .unwrap();
    assert_eq!(page.as_bytes(), pages[0]);
}

/// The job id a page is about.
fn job_id_of_page(page: &[u8]) -> String {
    let html = text(page);
    let start = html.find("id=\"job-id\">").unwrap() + "id=\"job-id\">".len();
    html[start..start + 36].to_owned()
}

#[test]
fn all_writes_an_index_and_the_same_page_per_job_as_one_report() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut ids = Vec::new();
    for (plan, code) in [
        ("enable-billing.json", 0),
        ("halts-on-unknown-step.json", 1),
        ("enable-billing.json", 0),
    ] {
        ids.push(job_id(&run_ok(
            d,
            &["run", &example(plan), "--db", "x.db"],
            code,
        )));
    }
    let out = run_ok(d, &["report", "--all", "--db", "x.db", "--out", "site"], 0);
    assert!(out.is_empty());
    let mut names: Vec<String> = ids.iter().map(|id| format!("{id}.html")).collect();
    names.push("index.html".to_owned());
    names.sort();
    let written = files(&d.join("site"));
    assert_eq!(
        written
            .iter()
            .map(|(name, _)| name.clone())
            .collect::<Vec<_>>(),
        names
    );
    let index = text(&written.iter().find(|(n, _)| n == "index.html").unwrap().1).to_owned();
    let rows: Vec<usize> = ids
        .iter()
        .map(|id| index.find(&format!("<a href=\"{id}.html\">")).unwrap())
        .collect();
    assert!(rows.windows(2).all(|w| w[0] < w[1]), "rows in start order");
    assert!(index.contains("<span class=\"count\">2</span><span class=\"label\">COMPLETED</span>"));
    assert!(index.contains("<span class=\"count\">1</span><span class=\"label\">FAILED</span>"));
    for id in &ids {
        let single = run_ok(d, &["report", id, "--db", "x.db"], 0);
        let in_site = std::fs::read(d.join("site").join(format!("{id}.html"))).unwrap();
        // The same page, with a way back to the index.
        let back = "<nav><a href=\"index.html\">← All jobs</a></nav>";
        assert!(text(&in_site).contains(back));
        assert!(
            text(&in_site).replacen(back, "", 1) == text(&single),
            "{id}: the site's page differs from the single report beyond the link back"
        );
    }
}

#[test]
fn bad_input_exits_2_with_one_line_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let evidence = run_ok(
        d,
        &["run", &example("enable-billing.json"), "--db", "x.db"],
        0,
    );
    let id = job_id(&evidence);
    std::fs::write(
        d.join("notes.txt"),
        "not a database, just notes\n".repeat(100),
    )
    .unwrap();
    std::fs::write(d.join("not-a-bundle.json"), "{\"format\": 1}").unwrap();
    std::fs::write(d.join("a-file"), "").unwrap();
    let unknown = "6f1c2a6e-8a49-4d1a-9d55-0e3a1f5b7c11";
    let page = ["--out", "page.html"];
    let site = ["--out", "site"];
    let cases: [(Vec<&str>, &str); 8] = [
        (
            [&["report", unknown, "--db", "x.db"][..], &page].concat(),
            "unknown job",
        ),
        (
            [&["report", "not-a-uuid", "--db", "x.db"][..], &page].concat(),
            "invalid job id",
        ),
        (
            [&["report", &id, "--db", "missing.db"][..], &page].concat(),
            "no such database",
        ),
        (
            [&["report", &id, "--db", "notes.txt"][..], &page].concat(),
            "not a job-executor database",
        ),
        (
            [&["report", "--bundle", "not-a-bundle.json"][..], &page].concat(),
            "not an audit bundle",
        ),
        (
            [&["report", "--bundle", "missing.json"][..], &page].concat(),
            "missing.json",
        ),
        (
            [&["report", "--all", "--db", "missing.db"][..], &site].concat(),
            "no such database",
        ),
        (vec!["report", "--all", "--db", "x.db"], "--out"),
    ];
    let before = tree(d);
    for (args, want) in cases {
        let out = cli(d, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {want:?} in {err:?}");
        if want != "--out" {
            // clap's own usage errors come with a usage block.
            assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err:?}");
        }
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_eq!(tree(d), before, "{args:?} wrote something");
    }
    // A directory to write into that is a file.
    let out = cli(d, &["report", "--all", "--db", "x.db", "--out", "a-file"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("a-file"), "{err}");
}

#[test]
fn a_bundle_gets_its_page_and_an_edited_one_a_red_banner() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let id = job_id(&run_ok(
        d,
        &[
            "run",
            &example("halts-on-unknown-step.json"),
            "--db",
            "x.db",
        ],
        1,
    ));
    run_ok(
        d,
        &["export", &id, "--db", "x.db", "--out", "bundle.json"],
        0,
    );
    let page = run_ok(d, &["report", "--bundle", "bundle.json"], 0);
    let html = text(&page);
    assert!(html.contains(&format!("id=\"job-id\">{id}</code>")));
    assert!(html.contains("data-verdict=\"intact\""));
    assert!(html.contains("from the audit bundle itself"));
    assert!(html.contains(">FAILED</span>"));

    // Someone rewrites the reason in the bundle's evidence.
    let bundle = std::fs::read_to_string(d.join("bundle.json")).unwrap();
    let edited = bundle.replacen(
        "\"final_reason\": \"Step 1 failed",
        "\"final_reason\": \"Step 9 failed",
        1,
    );
    assert_ne!(edited, bundle);
    std::fs::write(d.join("edited.json"), edited).unwrap();
    let page = run_ok(d, &["report", "--bundle", "edited.json"], 0);
    let html = text(&page);
    assert!(html.contains("data-verdict=\"broken\""));
    assert!(html.contains("The hash chain holds, but the audit bundle breaks the rules below."));
    assert!(
        html.contains(
            "evidence does not match what the events replay to (differs at: final_reason)"
        )
    );
    // The page is of what the events say, not of the edited evidence.
    assert!(html.contains("Step 1 failed: No handler registered"));
    assert!(!html.contains("Step 9 failed"));
}

#[test]
fn macs_are_checked_with_the_key_and_said_unchecked_without() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("key"), "a key of at least sixteen bytes\n").unwrap();
    std::fs::write(d.join("other"), "another key, also long enough\n").unwrap();
    let id = job_id(&run_ok(
        d,
        &[
            "run",
            &example("enable-billing.json"),
            "--db",
            "x.db",
            "--key-file",
            "key",
        ],
        0,
    ));
    let with_key = run_ok(d, &["report", &id, "--db", "x.db", "--key-file", "key"], 0);
    let html = text(&with_key);
    assert!(html.contains("data-verdict=\"intact\""));
    assert!(html.contains("every event's MAC verified under the key given"));

    let wrong = run_ok(
        d,
        &["report", &id, "--db", "x.db", "--key-file", "other"],
        0,
    );
    let html = text(&wrong);
    assert!(html.contains("data-verdict=\"broken\""));
    assert!(
        html.contains(
            "<strong>do not verify</strong>: seq 1: MAC does not authenticate the digest"
        )
    );

    let without = run_ok(d, &["report", &id, "--db", "x.db"], 0);
    let html = text(&without);
    assert!(html.contains("data-verdict=\"intact\""));
    assert!(html.contains("not checked: no key given (8 events carry a MAC"));
}

#[test]
fn hostile_values_are_escaped_in_the_markup() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let hostile = "</style><script>alert(1)</script>\"><img src=x onerror=alert(2)>";
    let plan = serde_json::json!({
        "contract_id": "0b6f3a55-1f0e-4c1e-9a8b-2d7c9e4f6a10",
        "steps": [{"step_index": 0, "step_type": hostile, "target": hostile,
                   "parameters": {"x": hostile}}]
    });
    std::fs::write(d.join("plan.json"), plan.to_string()).unwrap();
    let id = job_id(&run_ok(
        d,
        &["run", "plan.json", "--db", "x.db", "--executed-by", hostile],
        1,
    ));
    let page = run_ok(d, &["report", &id, "--db", "x.db"], 0);
    let html = text(&page);
    assert!(!html.contains("<img"), "no raw tag");
    assert!(!html.contains("<script>alert"), "no raw script");
    assert_eq!(
        html.matches("<script>").count(),
        1,
        "the page's own script only"
    );
    assert_eq!(
        html.matches("</style>").count(),
        1,
        "the page's own style only"
    );
    assert!(
        html.contains(
            "&#60;/style&#62;&#60;script&#62;alert(1)&#60;/script&#62;&#34;&#62;&#60;img"
        )
    );
}

mod any_edit {
    //! Property: whatever an attacker edits in a stored event, the report
    //! still renders (no panic on text that is no longer what was written)
    //! and says the log does not verify.

    use super::common;
    use job_executor::events::EventRecord;
    use job_executor::report::{JobPage, ReportOptions};
    use proptest::prelude::*;
    use uuid::Uuid;

    fn edit(text: &str, offset: usize, with: char) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        if chars.is_empty() {
            return with.to_string();
        }
        let at = offset % chars.len();
        chars[at] = with;
        chars.into_iter().collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn every_edit_renders_and_is_reported(
            event in 0usize..8,
            field in 0u8..5,
            offset in any::<usize>(),
            with in prop::sample::select(&['0', 'f', 'é', '"', '<', '}', ' ', '\u{1F600}'][..]),
        ) {
            let job_id = Uuid::from_u128(7);
            let mut records: Vec<EventRecord> = common::records(job_id, &common::completed_log(3));
            let original = records.clone();
            let record = &mut records[event];
            match field {
                0 => record.kind = edit(&record.kind, offset, with),
                1 => record.recorded_at = edit(&record.recorded_at, offset, with),
                2 => record.payload = edit(&record.payload, offset, with),
                3 => record.digest = record.digest.as_deref().map(|d| edit(d, offset, with)),
                _ => record.seq = record.seq.wrapping_add(offset as u64 % 3),
            }
            let page = JobPage::from_log(job_id, &records, &ReportOptions::default()).unwrap();
            let html = page.render().unwrap();
            prop_assert!(html.ends_with("</html>\n"));
            prop_assert_eq!(page.verified(), records == original);
        }
    }
}
