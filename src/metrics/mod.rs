//! Metrics for a fleet's dashboards: what the engine did (jobs, steps,
//! appends, leases), what the queue holds, and whether the process is
//! healthy — in the Prometheus exposition format, written by the
//! `prometheus-client` crate.
//!
//! [`Metrics`] holds the engine's counters, gauges and histograms. An
//! executor given one ([`ExecutorBuilder::metrics`](crate::executor::ExecutorBuilder::metrics))
//! counts into it, and so does a [`Worker`](crate::worker::Worker) on that
//! executor; an executor given none counts nothing and pays nothing.
//! [`Metrics::register`] adds them to a registry, an embedder's own or
//! [`Metrics::registry`]'s, under the prefix `job_executor_`;
//! [`QueueGauges`] adds the queue's depth and age, read from the store at
//! most once a second however often it is scraped. [`Health`] answers the
//! probes, and [`serve`] (feature `metrics-server`) serves `/metrics`,
//! `/healthz` and `/readyz` over HTTP.
//!
//! ```
//! use std::sync::Arc;
//! use job_executor::metrics::Metrics;
//! use job_executor::{JobExecutor, JobStep, NoOpHandler};
//! use uuid::Uuid;
//!
//! let metrics = Arc::new(Metrics::new());
//! let mut executor = JobExecutor::builder().metrics(metrics.clone()).build();
//! executor.register_handler("capability_enable", NoOpHandler);
//! let steps = [JobStep::new(0, "capability_enable", "billing")];
//! executor.execute_job(Uuid::new_v4(), Uuid::new_v4(), &steps, None, "ops")?;
//! let text = metrics.encode_text();
//! assert!(text.contains(r#"job_executor_jobs_total{status="completed"} 1"#));
//! # Ok::<(), job_executor::ExecutorError>(())
//! ```

mod health;
mod queue;
#[cfg(feature = "metrics-server")]
mod serve;

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

pub use health::Health;
pub use queue::QueueGauges;
#[cfg(feature = "metrics-server")]
pub use serve::{MetricsServer, serve};

use crate::model::{JobStatus, StepStatus};

/// The prefix of every metric's name.
pub const PREFIX: &str = "job_executor";

/// Upper bounds of `step_duration_seconds`' buckets: a step takes from a
/// millisecond to its deadline (300 s by default).
const STEP_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.01, 0.025, 0.1, 0.25, 1.0, 2.5, 10.0, 30.0, 120.0, 300.0,
];

/// Upper bounds of `append_duration_seconds`' buckets: a commit takes tens
/// of microseconds in memory, milliseconds with an fsync or a round trip.
const APPEND_BUCKETS: [f64; 11] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5,
];

/// A status label: a job's or a step's status, in lower case.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Status {
    completed,
    failed,
    cancelled,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    status: Status,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step_type: String,
    status: Status,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepTypeLabel {
    step_type: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// One step type's instruments, looked up once and kept: counting a step
/// costs a map read and no allocation.
#[derive(Clone)]
struct StepInstruments {
    completed: Counter,
    failed: Counter,
    duration: Histogram,
}

/// The engine's metrics. Shared (`Arc`) by the executors and workers that
/// count into it and the registries that expose it.
pub struct Metrics {
    jobs: Family<JobLabels, Counter>,
    steps: Family<StepLabels, Counter>,
    step_duration: HistogramFamily<StepTypeLabel>,
    append_duration: Histogram,
    jobs_running: Gauge,
    lease_renewals: Counter,
    takeovers: Counter,
    fenced_appends: Counter,
    by_step_type: RwLock<HashMap<String, StepInstruments>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("jobs_running", &self.jobs_running.get())
            .finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every metric at zero.
    pub fn new() -> Self {
        let metrics = Metrics {
            jobs: Family::default(),
            steps: Family::default(),
            step_duration: Family::new_with_constructor(|| Histogram::new(STEP_BUCKETS)),
            append_duration: Histogram::new(APPEND_BUCKETS),
            jobs_running: Gauge::default(),
            lease_renewals: Counter::default(),
            takeovers: Counter::default(),
            fenced_appends: Counter::default(),
            by_step_type: RwLock::new(HashMap::new()),
        };
        // Every job status shows from the start, at 0.
        for status in [Status::completed, Status::failed, Status::cancelled] {
            let _ = metrics.jobs.get_or_create(&JobLabels { status });
        }
        metrics
    }

    /// Adds these metrics to `registry`, under the prefix `job_executor_`
    /// (so an embedder's registry holds them beside its own).
    pub fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix(PREFIX);
        registry.register(
            "jobs",
            "Jobs ended here, by final status",
            self.jobs.clone(),
        );
        registry.register(
            "steps",
            "Step outcomes recorded here, by step type and status",
            self.steps.clone(),
        );
        registry.register(
            "step_duration_seconds",
            "Time from a step's start to its outcome, of the steps started here",
            self.step_duration.clone(),
        );
        registry.register(
            "append_duration_seconds",
            "Time an append to the event log took, until committed",
            self.append_duration.clone(),
        );
        registry.register(
            "jobs_running",
            "Jobs this process is running",
            self.jobs_running.clone(),
        );
        registry.register(
            "lease_renewals",
            "Leases renewed by this process's workers",
            self.lease_renewals.clone(),
        );
        registry.register(
            "takeovers",
            "Jobs this process's workers took over from a worker whose lease ran out",
            self.takeovers.clone(),
        );
        registry.register(
            "fenced_appends",
            "Appends refused because the claim they were made under was taken over",
            self.fenced_appends.clone(),
        );
        let version = vec![("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned())];
        registry.register("build", "This build of job-executor", Info::new(version));
    }

    /// A registry holding these metrics alone.
    pub fn registry(&self) -> Registry {
        let mut registry = Registry::default();
        self.register(&mut registry);
        registry
    }

    /// These metrics in the OpenMetrics text format (what `/metrics`
    /// serves to a scraper that asks for it).
    pub fn encode_text(&self) -> String {
        encode_openmetrics(&self.registry())
    }

    /// A job ended here with `status`.
    pub fn job_ended(&self, status: JobStatus) {
        let status = match status {
            JobStatus::Completed => Status::completed,
            JobStatus::Failed => Status::failed,
            JobStatus::Cancelled => Status::cancelled,
            // Not an end.
            JobStatus::Pending | JobStatus::Running => return,
        };
        self.jobs.get_or_create(&JobLabels { status }).inc();
    }

    /// A step's outcome was recorded here; `took` is the time since its
    /// start, when it started here.
    pub fn step_ended(&self, step_type: &str, status: StepStatus, took: Option<Duration>) {
        let known = self
            .by_step_type
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(step_type)
            .cloned();
        let instruments = known.unwrap_or_else(|| self.step_instruments(step_type));
        match status {
            StepStatus::Completed => instruments.completed.inc(),
            _ => instruments.failed.inc(),
        };
        if let Some(took) = took {
            instruments.duration.observe(took.as_secs_f64());
        }
    }

    /// The instruments of `step_type`, made and kept on first use.
    fn step_instruments(&self, step_type: &str) -> StepInstruments {
        let counter = |status| {
            self.steps
                .get_or_create(&StepLabels {
                    step_type: step_type.to_owned(),
                    status,
                })
                .clone()
        };
        let instruments = StepInstruments {
            completed: counter(Status::completed),
            failed: counter(Status::failed),
            duration: self
                .step_duration
                .get_or_create(&StepTypeLabel {
                    step_type: step_type.to_owned(),
                })
                .clone(),
        };
        self.by_step_type
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(step_type.to_owned(), instruments.clone());
        instruments
    }

    /// An append to the log took `took` (committed or not).
    pub fn append_took(&self, took: Duration) {
        self.append_duration.observe(took.as_secs_f64());
    }

    /// A job starts running here: counted in `jobs_running` until the
    /// guard is dropped.
    pub fn job_running(&self) -> RunningGuard<'_> {
        self.jobs_running.inc();
        RunningGuard(&self.jobs_running)
    }

    /// `leases` leases were renewed.
    pub fn leases_renewed(&self, leases: usize) {
        self.lease_renewals.inc_by(leases as u64);
    }

    /// A worker here took a job over from one whose lease ran out.
    pub fn taken_over(&self) {
        self.takeovers.inc();
    }

    /// An append was refused: its claim had been taken over.
    pub fn append_fenced(&self) {
        self.fenced_appends.inc();
    }
}

/// Counts a job in `jobs_running` while it lives.
#[derive(Debug)]
pub struct RunningGuard<'a>(&'a Gauge);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `registry` in the OpenMetrics text format.
pub fn encode_openmetrics(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

/// `registry` in the Prometheus text format, version 0.0.4 (what
/// `/metrics` serves to a scraper that does not ask for OpenMetrics).
pub fn encode_prometheus(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, registry);
    text
}
