//! Group commit: many threads' appends share one commit.
//!
//! One thread at a time leads: it writes its own append and every append
//! queued meanwhile in one transaction, so one commit (one fsync at FULL)
//! serves many jobs. Each append still gets its own result, and none returns
//! before its events are committed — a job's `StepStarted` is durable before
//! its handler runs, as with a commit of its own. An append may come with a
//! hook to run once it is committed (the executor starts the step's handler
//! with it): the leader runs the hooks right after the commit, before it
//! wakes anyone. When the leader is done it hands the lead to the first
//! append that queued during its commit.
//!
//! With several jobs running, a leader that commits the instant it leads
//! would only catch the jobs that happened to be waiting; the others arrive
//! a moment later and form the next, equally small batch. So a leader waits
//! for the jobs seen in the last two batches to queue, at most half a
//! commit's time. A single job never waits.

use std::sync::mpsc;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::StoreError;
use crate::events::{EventRecord, TERMINAL_KINDS};

/// The longest a leader waits for more appends, whatever a commit costs.
const GATHER_WAIT_MAX: Duration = Duration::from_millis(2);

type AppendResult = Result<Vec<u64>, StoreError>;

/// What to run once an append is committed.
pub(crate) struct Hook(pub(crate) Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

/// Runs the hook of an append that was committed; drops the others.
fn run_hook(hook: Option<Hook>, result: &AppendResult) {
    if let (Some(Hook(hook)), Ok(_)) = (hook, result) {
        hook();
    }
}

#[derive(Debug, Default)]
pub(crate) struct GroupCommit {
    state: Mutex<State>,
    arrived: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// A thread is leading: it will serve the queue or hand it on.
    leading: bool,
    /// The leader waits on `arrived` for more appends.
    leader_waiting: bool,
    /// The queue length the waiting leader waits for: it is woken once,
    /// when the queue reaches it, not at every arrival.
    gather_target: usize,
    queue: Vec<Pending>,
    /// Distinct jobs of the last two batches: how many appends to expect.
    recent_jobs: Vec<Uuid>,
    last_batch_jobs: Vec<Uuid>,
    /// How long the last commit took.
    last_commit: Duration,
}

#[derive(Debug)]
struct Pending {
    records: Vec<EventRecord>,
    committed: Option<Hook>,
    reply: mpsc::SyncSender<Reply>,
}

#[derive(Debug)]
enum Reply {
    /// Your append is committed (or failed).
    Done(AppendResult),
    /// You lead the next group commit.
    Lead,
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update of the state is a single step: a poisoned lock still
        // guards consistent data.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Commits `records` with whatever else is queued, through `commit`,
    /// which writes a batch of appends and returns one result per append;
    /// runs `committed` once they are committed.
    pub(crate) fn append(
        &self,
        records: &[EventRecord],
        committed: Option<Hook>,
        commit: impl Fn(&[&[EventRecord]]) -> Vec<AppendResult>,
    ) -> AppendResult {
        let mut state = self.lock();
        if !state.leading {
            // Lead at once, with our own records (not copied into the queue).
            state.leading = true;
            let job = records.first().map(|r| r.job_id);
            let continuing = records.last().is_some_and(|r| !ends_job(r));
            let queued = self.gather(state, job, continuing);
            let mut slices = vec![records];
            slices.extend(queued.iter().map(|p| p.records.as_slice()));
            let mut results = self.commit_timed(&slices, &commit).into_iter();
            let own = results.next().unwrap_or_else(lost);
            run_hook(committed, &own);
            self.reply(queued, results);
            return own;
        }
        let (reply, replies) = mpsc::sync_channel(1);
        state.queue.push(Pending {
            records: records.to_vec(),
            committed,
            reply,
        });
        if state.leader_waiting && state.queue.len() >= state.gather_target {
            self.arrived.notify_one();
        }
        drop(state);
        let mut waiting = replies.recv();
        if let Ok(Reply::Lead) = waiting {
            // Our own append is in the queue we now take.
            let batch = self.gather(self.lock(), None, false);
            let slices: Vec<&[EventRecord]> = batch.iter().map(|p| p.records.as_slice()).collect();
            let results = self.commit_timed(&slices, &commit);
            self.reply(batch, results.into_iter());
            waiting = replies.recv();
        }
        match waiting {
            Ok(Reply::Done(result)) => result,
            _ => lost(),
        }
    }

    /// Takes the queue as the next batch, after waiting (briefly) for the
    /// jobs of the recent batches to queue too. `own` is the leader's job
    /// when its records are not in the queue; `continuing` whether that
    /// job will append again.
    fn gather(
        &self,
        mut state: MutexGuard<'_, State>,
        own: Option<Uuid>,
        continuing: bool,
    ) -> Vec<Pending> {
        let expected = state.recent_jobs.len();
        let have = |state: &State| state.queue.len() + usize::from(own.is_some());
        if expected > have(&state) {
            let deadline = Instant::now() + (state.last_commit / 2).min(GATHER_WAIT_MAX);
            state.leader_waiting = true;
            state.gather_target = expected - usize::from(own.is_some());
            while have(&state) < expected {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                state = self
                    .arrived
                    .wait_timeout(state, deadline - now)
                    .map_or_else(|poisoned| poisoned.into_inner().0, |(state, _)| state);
            }
            state.leader_waiting = false;
        }
        let batch = std::mem::take(&mut state.queue);
        // A job whose append ends it will not come back: do not wait for it.
        // The buffers are reused: no allocation per commit.
        let State {
            recent_jobs,
            last_batch_jobs,
            ..
        } = &mut *state;
        recent_jobs.clear();
        recent_jobs.append(last_batch_jobs);
        last_batch_jobs.extend(
            own.filter(|_| continuing).into_iter().chain(
                batch
                    .iter()
                    .filter_map(|p| p.records.last())
                    .filter(|r| !ends_job(r))
                    .map(|r| r.job_id),
            ),
        );
        recent_jobs.extend_from_slice(last_batch_jobs);
        recent_jobs.sort_unstable();
        recent_jobs.dedup();
        batch
    }

    fn commit_timed(
        &self,
        batch: &[&[EventRecord]],
        commit: &impl Fn(&[&[EventRecord]]) -> Vec<AppendResult>,
    ) -> Vec<AppendResult> {
        let started = Instant::now();
        let results = commit(batch);
        self.lock().last_commit = started.elapsed();
        results
    }

    /// Runs the hooks of the committed appends of `batch` — their handlers
    /// start before anyone wakes — then replies to each, and hands on the
    /// lead.
    fn reply(&self, batch: Vec<Pending>, results: impl Iterator<Item = AppendResult>) {
        let mut replies = Vec::with_capacity(batch.len());
        for (pending, result) in batch.into_iter().zip(results) {
            run_hook(pending.committed, &result);
            replies.push((pending.reply, result));
        }
        for (reply, result) in replies {
            // Each follower waits for its reply: sending cannot fail.
            let _ = reply.send(Reply::Done(result));
        }
        self.hand_off();
    }

    /// Ends a lead: the first waiting append, if any, leads the next commit.
    fn hand_off(&self) {
        let mut state = self.lock();
        match state.queue.first() {
            Some(next) => {
                let _ = next.reply.send(Reply::Lead);
            }
            None => state.leading = false,
        }
    }
}

fn ends_job(record: &EventRecord) -> bool {
    TERMINAL_KINDS.contains(&record.kind.as_str())
}

fn lost() -> AppendResult {
    Err(StoreError::InvalidAppend(
        "the append was lost by its group commit".into(),
    ))
}
