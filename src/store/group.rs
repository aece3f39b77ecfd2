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
//! commit's time — unless commits are as short as a wake-up while every
//! job has a core of its own. A single job never waits.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::time::{Duration, Instant};

use uuid::Uuid;

use super::{Fence, StoreError};
use crate::events::{EventRecord, TERMINAL_KINDS};
use crate::sync::{Condvar, Mutex, MutexGuard, lock, mpsc, panic_message, wait_timeout};

/// The longest a leader waits for more appends, whatever a commit costs.
const GATHER_WAIT_MAX: Duration = Duration::from_millis(2);

/// The shortest wait worth a sleep: a commit that does not wait for the
/// disk (`synchronous = NORMAL`) is over before a sleeping leader would be
/// woken, so the leader commits at once instead. (The model checker has no
/// clock: there every wait is explored.)
#[cfg(not(feature = "shuttle"))]
const GATHER_WAIT_MIN: Duration = Duration::from_micros(50);
#[cfg(feature = "shuttle")]
const GATHER_WAIT_MIN: Duration = Duration::ZERO;

/// What one append comes to: its events' positions, or why it failed.
pub(super) type AppendResult = Result<Vec<u64>, StoreError>;
type PanicPayload = Box<dyn Any + Send>;

/// What to run once an append is committed.
pub(crate) struct Hook(pub(crate) Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

/// Runs the hook of an append that was committed (drops the others). A
/// panic in it is caught, to be raised again on the appending thread: the
/// append itself stays committed, and the leader goes on serving the rest.
fn run_hook(hook: Option<Hook>, result: &AppendResult) -> Option<PanicPayload> {
    match (hook, result) {
        (Some(Hook(hook)), Ok(_)) => catch_unwind(AssertUnwindSafe(hook)).err(),
        _ => None,
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
    fence: Option<Fence>,
    committed: Option<Hook>,
    reply: mpsc::SyncSender<Reply>,
}

/// One append of a batch, as the commit writes it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Batched<'a> {
    pub(crate) records: &'a [EventRecord],
    pub(crate) fence: Option<Fence>,
}

impl Pending {
    fn batched(&self) -> Batched<'_> {
        Batched {
            records: &self.records,
            fence: self.fence,
        }
    }
}

enum Reply {
    /// Your append is committed (or failed); with the panic of your hook,
    /// if it panicked.
    Done(AppendResult, Option<PanicPayload>),
    /// You lead the next group commit.
    Lead,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Done(result, panic) => f
                .debug_tuple("Done")
                .field(result)
                .field(&panic.is_some())
                .finish(),
            Reply::Lead => f.write_str("Lead"),
        }
    }
}

/// The appends a leader took from the queue. However the leader's turn
/// ends — even by a panic in its own code — every one of them gets an
/// answer and the lead passes on: nothing waits forever.
struct Batch<'g> {
    group: &'g GroupCommit,
    pending: Vec<Pending>,
}

impl Batch<'_> {
    /// Runs the hooks of the committed appends — their handlers start
    /// before anyone wakes — then answers each append.
    fn reply(&mut self, results: impl Iterator<Item = AppendResult>) {
        let pending = std::mem::take(&mut self.pending);
        let results = results.chain(std::iter::repeat_with(|| {
            Err(unknown("the commit returned no result for this append"))
        }));
        let mut replies = Vec::with_capacity(pending.len());
        for (pending, result) in pending.into_iter().zip(results) {
            let panic = run_hook(pending.committed, &result);
            replies.push((pending.reply, result, panic));
        }
        for (reply, result, panic) in replies {
            // Each follower waits for its reply: sending cannot fail.
            let _ = reply.send(Reply::Done(result, panic));
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        for pending in self.pending.drain(..) {
            let _ = pending.reply.send(Reply::Done(
                Err(unknown("the thread committing it stopped")),
                None,
            ));
        }
        self.group.hand_off();
    }
}

fn unknown(detail: impl Into<String>) -> StoreError {
    StoreError::OutcomeUnknown {
        detail: detail.into(),
    }
}

impl GroupCommit {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Commits `records` with whatever else is queued, through `commit`,
    /// which writes a batch of appends and returns one result per append;
    /// runs `committed` once they are committed.
    ///
    /// A panic in `commit` makes every append of its batch fail with
    /// [`StoreError::OutcomeUnknown`]; a panic in a hook is raised again on
    /// the thread whose append it belongs to, after that append is
    /// answered as committed. Either way later appends proceed.
    pub(crate) fn append(
        &self,
        records: &[EventRecord],
        fence: Option<Fence>,
        committed: Option<Hook>,
        commit: impl Fn(&[Batched<'_>]) -> Vec<AppendResult>,
    ) -> AppendResult {
        let mut state = self.lock();
        if !state.leading {
            // Lead at once, with our own records (not copied into the queue).
            state.leading = true;
            let job = records.first().map(|r| r.job_id);
            let continuing = records.last().is_some_and(|r| !ends_job(r));
            let mut batch = Batch {
                group: self,
                pending: self.gather(state, job, continuing),
            };
            let mut slices = vec![Batched { records, fence }];
            slices.extend(batch.pending.iter().map(Pending::batched));
            let mut results = self.commit_guarded(&slices, &commit).into_iter();
            let own = results
                .next()
                .unwrap_or_else(|| Err(unknown("the commit returned no result")));
            let own_panic = run_hook(committed, &own);
            batch.reply(results);
            drop(batch);
            if let Some(payload) = own_panic {
                resume_unwind(payload);
            }
            return own;
        }
        let (reply, replies) = mpsc::sync_channel(1);
        state.queue.push(Pending {
            records: records.to_vec(),
            fence,
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
            let mut batch = Batch {
                group: self,
                pending: self.gather(self.lock(), None, false),
            };
            let slices: Vec<Batched<'_>> = batch.pending.iter().map(Pending::batched).collect();
            let results = self.commit_guarded(&slices, &commit);
            batch.reply(results.into_iter());
            drop(batch);
            waiting = replies.recv();
        }
        match waiting {
            Ok(Reply::Done(result, panic)) => {
                if let Some(payload) = panic {
                    resume_unwind(payload);
                }
                result
            }
            Ok(Reply::Lead) | Err(_) => Err(unknown("the group commit lost track of the append")),
        }
    }

    /// Takes the queue as the next batch, after waiting (briefly) for the
    /// jobs of the recent batches to queue too. `own` is the leader's job
    /// when its records are not in the queue; `continuing` whether that
    /// job will append again.
    fn gather<'g>(
        &'g self,
        mut state: MutexGuard<'g, State>,
        own: Option<Uuid>,
        continuing: bool,
    ) -> Vec<Pending> {
        let expected = state.recent_jobs.len();
        let have = |state: &State| state.queue.len() + usize::from(own.is_some());
        let wait = (state.last_commit / 2).min(GATHER_WAIT_MAX);
        // Short commits are not worth a sleep while every job has a core
        // to run on: the others queue during the commit anyway. With more
        // jobs than cores they queue more slowly, and waiting pays again.
        if expected > have(&state) && (wait >= GATHER_WAIT_MIN || expected > cores()) {
            let deadline = Instant::now() + wait;
            state.leader_waiting = true;
            state.gather_target = expected - usize::from(own.is_some());
            while have(&state) < expected {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                state = wait_timeout(&self.state, &self.arrived, state, deadline - now);
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

    /// Runs `commit`, timing it; a panic in it leaves every append of the
    /// batch with an unknown outcome (the commit may or may not have
    /// happened), never a wedged group.
    fn commit_guarded(
        &self,
        batch: &[Batched<'_>],
        commit: &impl Fn(&[Batched<'_>]) -> Vec<AppendResult>,
    ) -> Vec<AppendResult> {
        let started = Instant::now();
        let results = catch_unwind(AssertUnwindSafe(|| commit(batch))).unwrap_or_else(|payload| {
            let detail = format!("the commit panicked: {}", panic_message(payload.as_ref()));
            batch.iter().map(|_| Err(unknown(detail.clone()))).collect()
        });
        self.lock().last_commit = started.elapsed();
        results
    }

    /// Ends a lead: the first waiting append, if any, leads the next commit.
    fn hand_off(&self) {
        let mut state = self.lock();
        while !state.queue.is_empty() {
            if state.queue[0].reply.send(Reply::Lead).is_ok() {
                return;
            }
            // Its thread is gone (it cannot be, while it waits; but a lead
            // sent nowhere would wedge the group): answer the next one.
            state.queue.remove(0);
        }
        state.leading = false;
    }
}

fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn ends_job(record: &EventRecord) -> bool {
    TERMINAL_KINDS.contains(&record.kind.as_str())
}

#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    //! Group commit under faults, with a stand-in for the database: a log
    //! in memory that a commit writes to, or panics before writing.

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier, Mutex};

    use super::*;

    /// The stand-in database: what was committed, and which commit panics.
    #[derive(Default)]
    struct Log {
        committed: Mutex<Vec<Uuid>>,
        commits: AtomicUsize,
        /// The commit (counting from 1) that panics; 0 for none.
        panic_at_commit: AtomicUsize,
    }

    impl Log {
        fn commit(&self, batch: &[Batched<'_>]) -> Vec<AppendResult> {
            let n = self.commits.fetch_add(1, Ordering::SeqCst) + 1;
            if self.panic_at_commit.load(Ordering::SeqCst) == n {
                panic!("injected panic in commit {n}");
            }
            let mut log = self.committed.lock().unwrap();
            batch
                .iter()
                .map(|append| {
                    log.push(append.records[0].job_id);
                    Ok(vec![log.len() as u64])
                })
                .collect()
        }

        fn holds(&self, job: Uuid) -> bool {
            self.committed.lock().unwrap().contains(&job)
        }
    }

    fn record(job: Uuid) -> Vec<EventRecord> {
        vec![EventRecord {
            job_id: job,
            seq: 1,
            kind: "JobStarted".into(),
            ..EventRecord::default()
        }]
    }

    /// Appends from `threads` threads at once, `rounds` each; returns each
    /// append's job and result (a panic in the append as `Err(message)`).
    fn hammer(
        group: &Arc<GroupCommit>,
        log: &Arc<Log>,
        threads: usize,
        rounds: usize,
        panicking_hook: Option<(usize, usize)>,
    ) -> Vec<(Uuid, Result<AppendResult, String>)> {
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (group, log, barrier) = (group.clone(), log.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    (0..rounds)
                        .map(|r| {
                            let job = Uuid::new_v4();
                            let hook: Box<dyn FnOnce() + Send> = if panicking_hook == Some((t, r)) {
                                Box::new(|| panic!("injected panic in a hook"))
                            } else {
                                Box::new(|| {})
                            };
                            let outcome = catch_unwind(AssertUnwindSafe(|| {
                                group
                                    .append(&record(job), None, Some(Hook(hook)), |b| log.commit(b))
                            }))
                            .map_err(|p| panic_message(p.as_ref()));
                            (job, outcome)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    }

    #[test]
    fn a_panicking_commit_leaves_its_appends_unknown_and_the_group_working() {
        for panic_at in 1..=6 {
            let log = Arc::new(Log {
                panic_at_commit: AtomicUsize::new(panic_at),
                ..Log::default()
            });
            let group = Arc::new(GroupCommit::default());
            let outcomes = hammer(&group, &log, 6, 4, None);
            let mut unknown = 0;
            for (job, outcome) in &outcomes {
                match outcome {
                    Ok(Ok(_)) => assert!(log.holds(*job)),
                    Ok(Err(StoreError::OutcomeUnknown { detail })) => {
                        assert!(detail.contains("injected panic"), "{detail}");
                        assert!(!log.holds(*job));
                        unknown += 1;
                    }
                    other => panic!("unexpected outcome {other:?}"),
                }
            }
            if log.commits.load(Ordering::SeqCst) >= panic_at {
                assert!(unknown >= 1, "the panicked batch had appends");
            }
            // The group is not wedged: a later append commits.
            log.panic_at_commit.store(0, Ordering::SeqCst);
            let job = Uuid::new_v4();
            assert!(
                group
                    .append(&record(job), None, None, |b| log.commit(b))
                    .is_ok()
            );
            assert!(log.holds(job));
        }
    }

    #[test]
    fn a_panicking_hook_panics_its_own_append_only() {
        for round in 0..20 {
            let log = Arc::new(Log::default());
            let group = Arc::new(GroupCommit::default());
            let outcomes = hammer(&group, &log, 6, 5, Some((round % 6, round % 5)));
            let panicked: Vec<_> = outcomes.iter().filter(|(_, o)| o.is_err()).collect();
            assert_eq!(panicked.len(), 1, "{outcomes:?}");
            let (job, outcome) = panicked[0];
            assert_eq!(outcome.as_ref().unwrap_err(), "injected panic in a hook");
            // Its append was committed before its hook ran.
            assert!(log.holds(*job));
            for (job, outcome) in &outcomes {
                if let Ok(result) = outcome {
                    assert!(result.is_ok(), "{result:?}");
                    assert!(log.holds(*job));
                }
            }
            let job = Uuid::new_v4();
            assert!(
                group
                    .append(&record(job), None, None, |b| log.commit(b))
                    .is_ok()
            );
        }
    }

    #[test]
    fn a_lead_handed_to_no_one_is_given_up() {
        let group = GroupCommit::default();
        {
            let mut state = group.lock();
            state.leading = true;
            let (reply, replies) = mpsc::sync_channel(1);
            drop(replies);
            state.queue.push(Pending {
                records: record(Uuid::new_v4()),
                fence: None,
                committed: None,
                reply,
            });
        }
        group.hand_off();
        let state = group.lock();
        assert!(!state.leading && state.queue.is_empty());
    }
}

#[cfg(all(test, feature = "shuttle"))]
mod model_check {
    //! Group commit under the model checker: three threads append (two
    //! appends each) against a stand-in database, while the scheduler tries
    //! thousands of interleavings, with and without a panicking commit or
    //! hook. In every one, every append gets the truth, hooks run exactly
    //! for the committed appends and before they return, and the group is
    //! never wedged: a deadlock fails the check.

    use std::panic::{AssertUnwindSafe, catch_unwind};

    use shuttle::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use shuttle::sync::{Arc, Mutex};
    use shuttle::thread;

    use super::*;

    const THREADS: usize = 3;
    const APPENDS: usize = 2;
    const ITERATIONS: usize = 3_000;

    fn record(job: Uuid) -> Vec<EventRecord> {
        vec![EventRecord {
            job_id: job,
            seq: 1,
            kind: "JobStarted".into(),
            ..EventRecord::default()
        }]
    }

    /// `panic_commit`: the commit (from 1) that panics before writing;
    /// `panic_hook`: the append (thread × APPENDS + round) whose hook panics.
    fn scenario(panic_commit: Option<usize>, panic_hook: Option<usize>) {
        let group = Arc::new(GroupCommit::default());
        let log = Arc::new(Mutex::new(Vec::<Uuid>::new()));
        let commits = Arc::new(AtomicUsize::new(0));
        let commit = {
            let (log, commits) = (log.clone(), commits.clone());
            move |batch: &[Batched<'_>]| -> Vec<AppendResult> {
                let n = commits.fetch_add(1, Ordering::SeqCst) + 1;
                if panic_commit == Some(n) {
                    panic!("commit {n} fails");
                }
                let mut log = log.lock().unwrap();
                batch
                    .iter()
                    .map(|append| {
                        log.push(append.records[0].job_id);
                        Ok(vec![log.len() as u64])
                    })
                    .collect()
            }
        };
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (group, log, commit) = (group.clone(), log.clone(), commit.clone());
                thread::spawn(move || {
                    for round in 0..APPENDS {
                        let n = t * APPENDS + round;
                        let job = Uuid::from_u128(n as u128 + 1);
                        let ran = Arc::new(AtomicBool::new(false));
                        let hook_ran = ran.clone();
                        let hook = Hook(Box::new(move || {
                            hook_ran.store(true, Ordering::SeqCst);
                            if panic_hook == Some(n) {
                                panic!("hook {n} fails");
                            }
                        }));
                        let outcome = catch_unwind(AssertUnwindSafe(|| {
                            group.append(&record(job), None, Some(hook), &commit)
                        }));
                        let stored = log.lock().unwrap().contains(&job);
                        match outcome {
                            Ok(Ok(_)) => assert!(stored && ran.load(Ordering::SeqCst)),
                            Ok(Err(StoreError::OutcomeUnknown { .. })) => {
                                assert!(panic_commit.is_some());
                                assert!(!stored && !ran.load(Ordering::SeqCst));
                            }
                            Ok(Err(other)) => panic!("unexpected failure {other}"),
                            // Its own hook's panic, after its append committed.
                            Err(_) => assert!(panic_hook == Some(n) && stored),
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        // Not wedged: one more append commits.
        assert!(
            group
                .append(&record(Uuid::nil()), None, None, &commit)
                .is_ok()
                || panic_commit.is_some()
        );
    }

    #[test]
    fn group_commit_model_check() {
        shuttle::check_pct(|| scenario(None, None), ITERATIONS, 3);
    }

    #[test]
    fn group_commit_model_check_with_a_panicking_commit() {
        shuttle::check_pct(|| scenario(Some(2), None), ITERATIONS, 3);
    }

    #[test]
    fn group_commit_model_check_with_a_panicking_hook() {
        shuttle::check_pct(|| scenario(None, Some(3)), ITERATIONS, 3);
    }
}
