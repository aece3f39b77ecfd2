//! The in-memory event log: the default of `JobExecutor::new()`, and the
//! reference the SQLite store is tested against.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use uuid::Uuid;

use super::{EventStore, StoreError, check_batch};
use crate::events::EventRecord;

/// An event log held in memory; lost when dropped.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The whole log in position order; position = index + 1.
    events: Vec<EventRecord>,
    /// Each job's events as indices into `events`, in seq order.
    jobs: HashMap<Uuid, Vec<usize>>,
    /// Job ids in the order they started.
    job_order: Vec<Uuid>,
}

impl MemoryStore {
    /// An empty log.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-written:
        // appends validate first and only then push. So a poisoned lock is safe to reuse.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every event of the log in position order.
    pub fn all_events(&self) -> Vec<EventRecord> {
        self.lock().events.clone()
    }
}

impl EventStore for MemoryStore {
    fn append(&self, records: &[EventRecord]) -> Result<Vec<u64>, StoreError> {
        let (job_id, first_seq) = check_batch(records)?;
        let mut inner = self.lock();
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

    fn last_seq(&self, job_id: Uuid) -> Result<u64, StoreError> {
        Ok(self
            .lock()
            .jobs
            .get(&job_id)
            .map_or(0, |seqs| seqs.len() as u64))
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
