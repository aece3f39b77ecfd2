//! The in-memory event log: the default of `JobExecutor::new()`, and the
//! reference the SQLite store is tested against.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use uuid::Uuid;

use super::{
    AppendOptions, Claim, EventStore, Fence, JobQueue, QueueEntry, QueueState, QueuedJob,
    StoreError, check_batch,
};
use crate::clock::{Clock, SystemClock};
use crate::events::{EventRecord, format_timestamp};

/// An event log held in memory; lost when dropped.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// The database's clock: what its queue times leases (and submissions) by.
    clock: Arc<dyn Clock>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::with_clock(Arc::new(SystemClock))
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// The whole log in position order; position = index + 1.
    events: Vec<EventRecord>,
    /// Each job's events as indices into `events`, in seq order.
    jobs: HashMap<Uuid, Vec<usize>>,
    /// Job ids in the order they started.
    job_order: Vec<Uuid>,
    /// The job queue, in submission order.
    queue: Vec<Queued>,
}

/// A row of the job queue.
#[derive(Debug)]
struct Queued {
    job: QueuedJob,
    state: QueueState,
    owner: Option<String>,
    epoch: u64,
    lease_until: Option<SystemTime>,
    submitted_at: String,
}

impl MemoryStore {
    /// An empty log.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// An empty log whose queue times leases by `clock` — the database's
    /// clock, which a simulation drives.
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        MemoryStore {
            inner: Mutex::default(),
            clock,
        }
    }

    /// The database's clock, now.
    fn now(&self) -> SystemTime {
        self.clock.now().into()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-written:
        // appends validate first and only then push. So a poisoned lock is safe to reuse.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends under the lock, checking the fence and the seq first.
    fn append_locked(
        &self,
        records: &[EventRecord],
        fence: Option<Fence>,
    ) -> Result<Vec<u64>, StoreError> {
        let (job_id, first_seq) = check_batch(records)?;
        let mut inner = self.lock();
        if let Some(fence) = fence {
            let found = inner
                .queue
                .iter()
                .find(|q| q.job.job_id == fence.job_id)
                .map(|q| q.epoch);
            if found != Some(fence.epoch) {
                return Err(StoreError::Fenced {
                    job_id: fence.job_id,
                    epoch: fence.epoch,
                    found,
                });
            }
        }
        let last = inner.jobs.get(&job_id).map_or(0, |seqs| seqs.len() as u64);
        if last + 1 != first_seq {
            return Err(StoreError::Conflict {
                job_id,
                expected: first_seq,
                found: last,
            });
        }
        if last == 0 {
            inner.job_order.push(job_id);
        }
        let mut positions = Vec::with_capacity(records.len());
        for record in records {
            let index = inner.events.len();
            let position = index as u64 + 1;
            inner.events.push(EventRecord {
                position,
                ..record.clone()
            });
            inner.jobs.entry(job_id).or_default().push(index);
            positions.push(position);
        }
        Ok(positions)
    }

    /// Every event of the log in position order.
    pub fn all_events(&self) -> Vec<EventRecord> {
        self.lock().events.clone()
    }
}

impl EventStore for MemoryStore {
    fn append_with(
        &self,
        records: &[EventRecord],
        options: AppendOptions,
    ) -> Result<Vec<u64>, StoreError> {
        let positions = self.append_locked(records, options.fence)?;
        if let Some(committed) = options.committed {
            committed();
        }
        Ok(positions)
    }

    fn last_seq(&self, job_id: Uuid) -> Result<u64, StoreError> {
        Ok(self
            .lock()
            .jobs
            .get(&job_id)
            .map_or(0, |seqs| seqs.len() as u64))
    }

    fn visit_job(
        &self,
        job_id: Uuid,
        visit: &mut dyn FnMut(&EventRecord) -> bool,
    ) -> Result<(), StoreError> {
        // Copied out first: `visit` runs with the lock released.
        for record in self.load_job(job_id)? {
            if !visit(&record) {
                break;
            }
        }
        Ok(())
    }

    fn load_job(&self, job_id: Uuid) -> Result<Vec<EventRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner.jobs.get(&job_id).map_or_else(Vec::new, |indices| {
            indices.iter().map(|&i| inner.events[i].clone()).collect()
        }))
    }

    fn job_ids(&self) -> Result<Vec<Uuid>, StoreError> {
        Ok(self.lock().job_order.clone())
    }

    fn scan(
        &self,
        visit: &mut dyn FnMut(u64, Result<&EventRecord, StoreError>),
    ) -> Result<(), StoreError> {
        let inner = self.lock();
        for (group, job) in inner.job_order.iter().enumerate() {
            for &index in &inner.jobs[job] {
                visit(group as u64, Ok(&inner.events[index]));
            }
        }
        Ok(())
    }

    fn last_position(&self) -> Result<u64, StoreError> {
        Ok(self.lock().events.len() as u64)
    }
}

impl JobQueue for MemoryStore {
    fn submit(&self, job: &QueuedJob) -> Result<(), StoreError> {
        let mut inner = self.lock();
        let stored = inner
            .jobs
            .get(&job.job_id)
            .map_or(0, |seqs| seqs.len() as u64);
        if stored > 0 || inner.queue.iter().any(|q| q.job.job_id == job.job_id) {
            return Err(StoreError::Conflict {
                job_id: job.job_id,
                expected: 0,
                found: stored,
            });
        }
        inner.queue.push(Queued {
            job: job.clone(),
            state: QueueState::Submitted,
            owner: None,
            epoch: 0,
            lease_until: None,
            submitted_at: format_timestamp(&self.clock.now()),
        });
        Ok(())
    }

    fn claim(&self, owner: &str, lease: Duration) -> Result<Option<Claim>, StoreError> {
        let now = self.now();
        let mut inner = self.lock();
        let claimable = |q: &Queued| q.state == QueueState::Submitted;
        let expired = |q: &Queued| {
            q.state == QueueState::Running && q.lease_until.is_some_and(|until| until <= now)
        };
        let index = inner
            .queue
            .iter()
            .position(claimable)
            .or_else(|| inner.queue.iter().position(expired));
        let Some(queued) = index.map(|i| &mut inner.queue[i]) else {
            return Ok(None);
        };
        let taken_over_from = queued.owner.replace(owner.to_owned());
        queued.state = QueueState::Running;
        queued.epoch += 1;
        queued.lease_until = now.checked_add(lease);
        Ok(Some(Claim {
            job: queued.job.clone(),
            fence: Fence {
                job_id: queued.job.job_id,
                epoch: queued.epoch,
            },
            taken_over_from,
        }))
    }

    fn renew(
        &self,
        owner: &str,
        fences: &[Fence],
        lease: Duration,
    ) -> Result<Vec<Fence>, StoreError> {
        let until = self.now().checked_add(lease);
        let mut inner = self.lock();
        let mut held = Vec::new();
        for queued in &mut inner.queue {
            let fence = Fence {
                job_id: queued.job.job_id,
                epoch: queued.epoch,
            };
            if queued.state == QueueState::Running
                && queued.owner.as_deref() == Some(owner)
                && fences.contains(&fence)
            {
                queued.lease_until = until;
                held.push(fence);
            }
        }
        Ok(held)
    }

    fn release(&self, fence: Fence, finished: bool) -> Result<(), StoreError> {
        let mut inner = self.lock();
        if let Some(queued) = inner
            .queue
            .iter_mut()
            .find(|q| q.job.job_id == fence.job_id && q.epoch == fence.epoch)
            && queued.state == QueueState::Running
        {
            queued.state = if finished {
                QueueState::Finished
            } else {
                QueueState::Submitted
            };
            queued.owner = None;
            queued.lease_until = None;
        }
        Ok(())
    }

    fn queued_job(&self, job_id: Uuid) -> Result<Option<(QueuedJob, QueueState)>, StoreError> {
        Ok(self
            .lock()
            .queue
            .iter()
            .find(|q| q.job.job_id == job_id)
            .map(|q| (q.job.clone(), q.state)))
    }

    fn queued(&self) -> Result<Vec<QueueEntry>, StoreError> {
        let now = self.now();
        Ok(self
            .lock()
            .queue
            .iter()
            .filter(|q| q.state != QueueState::Finished)
            .map(|q| QueueEntry {
                job_id: q.job.job_id,
                state: q.state,
                owner: q.owner.clone(),
                epoch: q.epoch,
                lease_expired: q.lease_until.is_some_and(|until| until <= now),
                submitted_at: q.submitted_at.clone(),
                steps: q.job.steps.len(),
            })
            .collect())
    }
}
