//! The queue's gauges, read from the store when scraped — at most once a
//! second, however often.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use super::{Health, PREFIX};
use crate::store::{JobQueue, QueueSummary};

/// How long a reading of the queue is reused.
const READ_EVERY: Duration = Duration::from_secs(1);

/// `queue_jobs{status="submitted"|"running"}` and
/// `queue_oldest_submitted_age_seconds`: the whole fleet's queue, as its
/// store counts it (by the database's clock where the store has one).
pub struct QueueGauges {
    queue: Arc<dyn JobQueue>,
    health: Option<Arc<Health>>,
    last: Mutex<Option<(Instant, QueueSummary)>>,
}

impl std::fmt::Debug for QueueGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueGauges").finish_non_exhaustive()
    }
}

impl QueueGauges {
    /// The gauges of `queue`; each reading (or failure to read) is told to
    /// `health`, when given.
    pub fn new(queue: Arc<dyn JobQueue>, health: Option<Arc<Health>>) -> Self {
        QueueGauges {
            queue,
            health,
            last: Mutex::new(None),
        }
    }

    /// Adds the gauges to `registry`, under the prefix `job_executor_`.
    pub fn register(self, registry: &mut Registry) {
        registry
            .sub_registry_with_prefix(PREFIX)
            .register_collector(Box::new(self));
    }

    /// The queue as last read, read again when that is over a second old;
    /// `None` when it could never be read.
    fn summary(&self) -> Option<QueueSummary> {
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if last
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= READ_EVERY)
        {
            match self.queue.queue_summary() {
                Ok(summary) => {
                    if let Some(health) = &self.health {
                        health.store_answered();
                    }
                    *last = Some((Instant::now(), summary));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the job queue for its gauges");
                    if let Some(health) = &self.health {
                        health.store_failed(&e);
                    }
                }
            }
        }
        last.as_ref().map(|(_, summary)| summary.clone())
    }
}

impl Collector for QueueGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // A queue that cannot be read shows no value rather than a stale one
        // it never had.
        let Some(summary) = self.summary() else {
            return Ok(());
        };
        let jobs: Family<Vec<(String, String)>, Gauge> = Family::default();
        for (status, count) in [
            ("submitted", summary.submitted),
            ("running", summary.running),
        ] {
            jobs.get_or_create(&vec![("status".to_owned(), status.to_owned())])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
        jobs.encode(encoder.encode_descriptor(
            "queue_jobs",
            "Jobs in the queue of the whole fleet, by state",
            None,
            jobs.metric_type(),
        )?)?;
        let age = ConstGauge::new(
            summary
                .oldest_submitted_age
                .map_or(0.0, |a| a.as_secs_f64()),
        );
        age.encode(encoder.encode_descriptor(
            "queue_oldest_submitted_age_seconds",
            "How long the oldest submitted job has waited (0 when none waits)",
            None,
            age.metric_type(),
        )?)?;
        Ok(())
    }
}
