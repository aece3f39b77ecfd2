//! The store as the simulation's actors reach it: the real `MemoryStore`,
//! behind a wire the scheduler controls. Every call hands the baton back
//! first (so any other actor, or time, can come between two calls) and
//! comes to what the scheduler decides: made, not made (busy), made with
//! its answer lost, or made just before the caller's process crashes.
//! What the store answers to a fenced append is judged against the ground
//! truth the world keeps.

use std::sync::Arc;
use std::time::Duration;

use job_executor::events::EventRecord;
use job_executor::store::{
    AppendOptions, Claim, EventStore, Fence, JobQueue, MemoryStore, QueueEntry, QueueState,
    QueuedJob, StoreError, Target,
};
use uuid::Uuid;

use super::baton::{self, Call, Fault, Point};
use super::world::World;

/// The store behind the simulated wire.
pub struct SimLog {
    pub inner: Arc<MemoryStore>,
    pub world: Arc<World>,
}

fn busy() -> StoreError {
    StoreError::Busy {
        target: Target::Server("sim".into()),
        detail: "simulated: the database is busy".into(),
    }
}

fn lost() -> StoreError {
    StoreError::Unavailable {
        target: Target::Server("sim".into()),
        detail: "simulated: the connection dropped; the answer was lost".into(),
    }
}

fn unknown(made: bool) -> StoreError {
    let made = if made { "made" } else { "not made" };
    StoreError::OutcomeUnknown {
        detail: format!("simulated: the connection dropped during COMMIT ({made})"),
    }
}

impl SimLog {
    /// A call that reads: made, or refused as busy.
    fn read<T>(
        &self,
        what: &'static str,
        job: Option<Uuid>,
        read: impl FnOnce(&MemoryStore) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        match baton::pause_at(Point::Call(Call::Read(what, job))) {
            Fault::None => read(&self.inner),
            _ => Err(busy()),
        }
    }

    /// A queue call that writes: `Busy` not made; `LoseAnswer` made, then
    /// the caller told the database could not be reached; `CrashAfter`
    /// made, then the caller's process crashes.
    fn write<T>(
        &self,
        call: Call,
        write: impl FnOnce(&MemoryStore) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let fault = baton::pause_at(Point::Call(call));
        if fault == Fault::Busy {
            return Err(busy());
        }
        let answer = write(&self.inner);
        match fault {
            Fault::CrashAfter { .. } => baton::crash(),
            Fault::LoseAnswer | Fault::Unknown => Err(lost()),
            _ => answer,
        }
    }
}

impl EventStore for SimLog {
    fn append_with(
        &self,
        records: &[EventRecord],
        mut options: AppendOptions,
    ) -> Result<Vec<u64>, StoreError> {
        let Some(first) = records.first() else {
            return self.inner.append_with(records, options);
        };
        let (job, fence) = (first.job_id, options.fence);
        let call = Call::Append {
            job,
            seq: first.seq,
            kinds: records.iter().map(|r| r.kind.clone()).collect(),
            fence,
        };
        let fault = baton::pause_at(Point::Call(call));
        match fault {
            Fault::Busy => return Err(busy()),
            Fault::Unknown => return Err(unknown(false)),
            // The commit happens, but its hook does not run: the caller
            // never hears of it.
            Fault::LoseAnswer | Fault::CrashAfter { hook: false } => options.committed = None,
            Fault::None | Fault::CrashAfter { hook: true } => {}
        }
        let actor = baton::current();
        self.world.lock().appending(actor, fence);
        let answer = self.inner.append_with(records, options);
        let on_handler = {
            let mut world = self.world.lock();
            world.appended(actor, job, fence, &answer);
            world.take_started(actor)
        };
        match fault {
            Fault::CrashAfter { .. } => baton::crash(),
            Fault::LoseAnswer => return Err(unknown(answer.is_ok())),
            _ => {}
        }
        if on_handler {
            baton::on_handler();
        }
        answer
    }

    fn visit_job(
        &self,
        job_id: Uuid,
        visit: &mut dyn FnMut(&EventRecord) -> bool,
    ) -> Result<(), StoreError> {
        self.read("visit_job", Some(job_id), |s| s.visit_job(job_id, visit))
    }

    fn last_seq(&self, job_id: Uuid) -> Result<u64, StoreError> {
        self.read("last_seq", Some(job_id), |s| s.last_seq(job_id))
    }

    fn load_job(&self, job_id: Uuid) -> Result<Vec<EventRecord>, StoreError> {
        self.read("load_job", Some(job_id), |s| s.load_job(job_id))
    }

    fn scan(
        &self,
        visit: &mut dyn FnMut(u64, Result<&EventRecord, StoreError>),
    ) -> Result<(), StoreError> {
        self.read("scan", None, |s| s.scan(visit))
    }

    fn last_position(&self) -> Result<u64, StoreError> {
        self.read("last_position", None, EventStore::last_position)
    }

    fn unfinished_jobs(&self) -> Result<Vec<Uuid>, StoreError> {
        self.read("unfinished_jobs", None, EventStore::unfinished_jobs)
    }

    fn job_ids(&self) -> Result<Vec<Uuid>, StoreError> {
        self.read("job_ids", None, EventStore::job_ids)
    }
}

impl JobQueue for SimLog {
    fn submit(&self, job: &QueuedJob) -> Result<(), StoreError> {
        self.write(Call::Read("submit", Some(job.job_id)), |s| s.submit(job))
    }

    fn claim(&self, owner: &str, lease: Duration) -> Result<Option<Claim>, StoreError> {
        self.write(Call::Claim, |s| {
            let claim = s.claim(owner, lease)?;
            if let Some(claim) = &claim {
                self.world.lock().claimed(owner, claim);
            }
            Ok(claim)
        })
    }

    fn renew(
        &self,
        owner: &str,
        fences: &[Fence],
        lease: Duration,
    ) -> Result<Vec<Fence>, StoreError> {
        let mut sorted = fences.to_vec();
        sorted.sort_by_key(|f| (f.job_id, f.epoch));
        self.write(Call::Renew(sorted), |s| s.renew(owner, fences, lease))
    }

    fn release(&self, fence: Fence, finished: bool) -> Result<(), StoreError> {
        self.write(Call::Release(fence, finished), |s| {
            s.release(fence, finished)
        })
    }

    fn queued_job(&self, job_id: Uuid) -> Result<Option<(QueuedJob, QueueState)>, StoreError> {
        self.read("queued_job", Some(job_id), |s| s.queued_job(job_id))
    }

    fn queued(&self) -> Result<Vec<QueueEntry>, StoreError> {
        self.read("queued", None, JobQueue::queued)
    }
}
