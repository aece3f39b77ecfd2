//! The HTML audit report: one self-contained page per job, and an index of
//! a whole log.
//!
//! A report is a projection, like the evidence. A [`JobPage`] is built from
//! a job's stored events (and the [`ReportOptions`]) alone: the verification
//! banner is [`crate::verify::verify_job`] run on those events, the summary,
//! timeline and steps are their fold, and the templates in `templates/` only
//! format what the page holds. Nothing in building or rendering reads a
//! clock, a file or the network, so the same events and options give the
//! same bytes, every time.
//!
//! A page opens from `file://` and needs nothing else: its style and its one
//! small script are inline, its timeline is inline SVG, and a
//! Content-Security-Policy lets nothing load or run but those two. Every
//! value from a plan, a handler, an error or the log is escaped.
//!
//! [`write_site`] is the one function here that does I/O: it reads a store
//! and writes the pages of every job, one job's events in memory at a time.
//!
//! ```
//! use job_executor::report::{JobPage, ReportOptions};
//! use job_executor::store::EventStore;
//! use job_executor::{create_default_executor, JobStep};
//! use uuid::Uuid;
//!
//! let store = std::sync::Arc::new(job_executor::store::MemoryStore::new());
//! let mut executor = job_executor::JobExecutor::builder().store(store.clone()).build();
//! executor.register_handler("capability_enable", job_executor::NoOpHandler);
//! let job_id = Uuid::new_v4();
//! let steps = [JobStep::new(0, "capability_enable", "billing")];
//! executor.execute_job(job_id, Uuid::new_v4(), &steps, None, "ops").unwrap();
//!
//! let records = store.load_job(job_id).unwrap();
//! let page = JobPage::from_log(job_id, &records, &ReportOptions::default()).unwrap();
//! let html = page.render().unwrap();
//! assert!(html.contains("COMPLETED") && html.contains("Log intact"));
//! ```

mod health;
mod render;
mod text;
mod timeline;
mod view;

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use uuid::Uuid;

pub use view::{IndexRow, JobPage};

use crate::bundle::{AuditBundle, BundleError, verify_bundle};
use crate::chain::HeadKey;
use crate::events::EventRecord;
use crate::store::{EventStore, StoreError};
use view::Source;

/// The index page's file name in a directory written by [`write_site`].
pub const INDEX_FILE: &str = "index.html";

/// What a report is made with, besides the events.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct ReportOptions {
    /// Check every event's MAC under this key; without it, the banner says
    /// MACs were not checked.
    pub key: Option<HeadKey>,
    /// The worker holding each running job, shown in the index (the
    /// queue's view when the report is made).
    pub owners: std::collections::HashMap<Uuid, String>,
}

impl ReportOptions {
    /// Also checks every event's MAC under `key`.
    pub fn with_key(mut self, key: Option<HeadKey>) -> Self {
        self.key = key;
        self
    }

    /// With the owners of running jobs, for the index.
    pub fn with_owners(mut self, owners: std::collections::HashMap<Uuid, String>) -> Self {
        self.owners = owners;
        self
    }
}

/// Why a report cannot be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// The log has no events for the job.
    #[error("unknown job {job_id}: the log has no events for it")]
    UnknownJob {
        /// The job asked for.
        job_id: Uuid,
    },
    /// The file is not an audit bundle.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The log could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A page could not be written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A template failed to render (a bug: the view model is plain data).
    #[error("cannot render the report: {0}")]
    Render(String),
}

impl JobPage {
    /// The page of `job_id`, from its stored events in seq order (as
    /// [`EventStore::load_job`] returns them). A log that does not verify
    /// still gets its page, with the banner saying what is wrong.
    ///
    /// # Errors
    /// [`ReportError::UnknownJob`] when `records` is empty.
    pub fn from_log(
        job_id: Uuid,
        records: &[EventRecord],
        options: &ReportOptions,
    ) -> Result<JobPage, ReportError> {
        if records.is_empty() {
            return Err(ReportError::UnknownJob { job_id });
        }
        Ok(JobPage::build(job_id, records, &Source::Log, options, None))
    }

    /// The page of the job in an audit bundle (the file's bytes). The banner
    /// reports the bundle's own checks too: head, plan, evidence, and that
    /// the file is byte for byte as exported.
    ///
    /// # Errors
    /// [`ReportError::Bundle`] when `bytes` is not an audit bundle at all.
    pub fn from_bundle(bytes: &[u8], options: &ReportOptions) -> Result<JobPage, ReportError> {
        let problems = match verify_bundle(bytes, options.key.as_ref()) {
            Ok(_) => Vec::new(),
            Err(BundleError::Broken { problems }) => problems,
            Err(e) => return Err(e.into()),
        };
        // verify_bundle has parsed these bytes already.
        let bundle = AuditBundle::from_bytes(bytes)?;
        let records = bundle.event_records();
        Ok(JobPage::build(
            bundle.job_id,
            &records,
            &Source::Bundle { problems },
            options,
            None,
        ))
    }

    /// The job.
    pub fn job_id(&self) -> Uuid {
        self.job_id
    }

    /// Whether the log (or bundle) verified when the page was made.
    pub fn verified(&self) -> bool {
        self.verification.intact
    }

    /// The page as HTML.
    ///
    /// # Errors
    /// [`ReportError::Render`] should a template fail.
    pub fn render(&self) -> Result<String, ReportError> {
        render::job(self).map_err(|e| ReportError::Render(e.to_string()))
    }
}

/// Writes the index of `rows` (one per job, in the order given) as HTML.
///
/// # Errors
/// The writer's error.
pub fn write_index(rows: &[IndexRow], out: &mut dyn Write) -> io::Result<()> {
    render::index(rows, out)
}

/// The file name of a job's page in a directory written by [`write_site`].
pub fn page_file_name(job_id: Uuid) -> String {
    format!("{job_id}.html")
}

/// What [`write_site`] wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SiteSummary {
    /// Job pages written (besides the index).
    pub jobs: usize,
    /// Jobs whose log did not verify.
    pub broken: usize,
}

/// Writes a page per job of `store` and [`INDEX_FILE`] listing them all into
/// `dir` (created if missing), streaming: one job's events are in memory at a
/// time, plus one [`IndexRow`] per job for the index.
///
/// # Errors
/// [`ReportError::Store`] when the log cannot be read, [`ReportError::File`]
/// when `dir` or a page cannot be written.
pub fn write_site(
    store: &dyn EventStore,
    dir: &Path,
    options: &ReportOptions,
) -> Result<SiteSummary, ReportError> {
    let job_ids = store.job_ids()?;
    std::fs::create_dir_all(dir).map_err(|source| ReportError::File {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut rows = Vec::with_capacity(job_ids.len());
    for job_id in job_ids {
        let records = store.load_job(job_id)?;
        if records.is_empty() {
            // Rows changed behind the store's back since the ids were read.
            continue;
        }
        let page = JobPage::build(job_id, &records, &Source::Log, options, Some(INDEX_FILE));
        let path = dir.join(page_file_name(job_id));
        write_file(&path, page.render()?.as_bytes())?;
        let mut row = page.index_row();
        row.owner = options.owners.get(&job_id).cloned();
        rows.push(row);
    }
    let path = dir.join(INDEX_FILE);
    let file = std::fs::File::create(&path).map_err(|source| ReportError::File {
        path: path.clone(),
        source,
    })?;
    let mut out = io::BufWriter::new(file);
    write_index(&rows, &mut out)
        .and_then(|()| out.flush())
        .map_err(|source| ReportError::File { path, source })?;
    Ok(SiteSummary {
        jobs: rows.len(),
        broken: rows.iter().filter(|r| !r.intact).count(),
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), ReportError> {
    std::fs::write(path, bytes).map_err(|source| ReportError::File {
        path: path.to_path_buf(),
        source,
    })
}
