//! The templates (`templates/` at the crate root) and the page shell they
//! share: inline style and script, and the Content-Security-Policy that
//! allows exactly those two and nothing else.
//!
//! Every value reaches the HTML through an askama expression, escaped; the
//! only text inserted unescaped is this crate's own stylesheet and script,
//! whose hashes the policy names.

use std::io;
use std::sync::LazyLock;

use askama::Template;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::view::{INDEX_STATUSES, IndexRow, JobPage, Macs, status_class};
use crate::model::JobStatus;

const STYLE: &str = include_str!("../../templates/assets/report.css");
const SCRIPT: &str = include_str!("../../templates/assets/report.js");

/// What every page carries around its content.
pub(crate) struct Shell {
    pub(crate) csp: String,
    pub(crate) style: &'static str,
    pub(crate) script: &'static str,
    /// The crate's version, in the footer and the generator tag.
    pub(crate) version: &'static str,
}

/// The policy: nothing may load or run but the page's own style and script
/// (named by hash), and images only as `data:` URLs. Even a value that
/// escaped escaping could then neither run code nor reach the network.
fn content_security_policy(style: &str, script: &str) -> String {
    let hash = |text: &str| {
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes()))
    };
    format!(
        "default-src 'none'; style-src 'sha256-{}'; script-src 'sha256-{}'; img-src data:; base-uri 'none'; form-action 'none'",
        hash(style),
        hash(script)
    )
}

static SHELL: LazyLock<Shell> = LazyLock::new(|| Shell {
    csp: content_security_policy(STYLE, SCRIPT),
    style: STYLE,
    script: SCRIPT,
    version: env!("CARGO_PKG_VERSION"),
});

#[derive(Template)]
#[template(path = "job.html")]
struct JobTemplate<'a> {
    shell: &'a Shell,
    page: &'a JobPage,
}

#[derive(Template)]
#[template(path = "index.html")]
struct IndexTemplate<'a> {
    shell: &'a Shell,
    rows: &'a [IndexRow],
    totals: &'a [Total],
    jobs: usize,
    broken: usize,
}

/// A status and how many jobs have it, for the index's totals and filters.
pub(crate) struct Total {
    pub(crate) label: &'static str,
    pub(crate) class: &'static str,
    pub(crate) count: usize,
}

/// Renders a job's page.
pub(crate) fn job(page: &JobPage) -> Result<String, askama::Error> {
    let mut html = JobTemplate {
        shell: &SHELL,
        page,
    }
    .render()?;
    // Templates drop their file's last newline; a text file ends with one.
    html.push('\n');
    Ok(html)
}

/// Renders the index of `rows` into `out`.
pub(crate) fn index(rows: &[IndexRow], out: &mut dyn io::Write) -> io::Result<()> {
    let totals: Vec<Total> = INDEX_STATUSES
        .iter()
        .map(|status| Total {
            label: status.map_or("INVALID", JobStatus::as_str),
            class: status_class(*status),
            count: rows.iter().filter(|r| r.status == *status).count(),
        })
        .filter(|t| t.count > 0 || t.label != "INVALID")
        .collect();
    IndexTemplate {
        shell: &SHELL,
        rows,
        totals: &totals,
        jobs: rows.len(),
        broken: rows.iter().filter(|r| !r.intact).count(),
    }
    .write_into(out)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_hashes_of_the_inline_style_and_script() {
        let csp = content_security_policy("a{}", "1");
        // sha256("a{}") and sha256("1"), base64.
        let style = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(b"a{}"));
        let script = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(b"1"));
        assert!(csp.starts_with("default-src 'none'; "));
        assert!(csp.contains(&format!("style-src 'sha256-{style}'")));
        assert!(csp.contains(&format!("script-src 'sha256-{script}'")));
        assert!(!csp.contains("unsafe"));
    }
}
