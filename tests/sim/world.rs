//! What the simulation knows besides the store: the seed's randomness and
//! fault rates, the trace, the ground truth of every job's epoch, every
//! handler call, the steps in flight, the counters and the violations
//! found as they happen. Actors reach it only while holding the baton, the
//! scheduler only while every actor waits: its lock is never contended.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard};

use job_executor::StepCall;
use job_executor::store::{Claim, Fence, StoreError};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::baton::{self, ActorId, Call};
use super::rng::Rng;
use super::time::SimTime;

/// How often each fault strikes in one seed, per mille of its chances.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    /// An actor paused at a store call (after its lease check).
    pub pause: u64,
    /// A crash at an append, before or after its commit.
    pub crash_at_append: u64,
    /// A call made whose answer is lost.
    pub lose_answer: u64,
    /// An append not made, its caller told the outcome is unknown.
    pub unknown: u64,
    /// A busy database: the call is not made.
    pub busy: u64,
    /// A renewal dropped on its way.
    pub drop_renewal: u64,
    /// A worker's crash, at any move.
    pub crash: u64,
    /// A worker asked to stop (SIGTERM), at any move.
    pub stop: u64,
    /// A worker cut off from renewing for a while, at any move.
    pub partition: u64,
    /// A handler slower than a lease.
    pub slow: u64,
    /// A handler that never returns on its own.
    pub stuck: u64,
    /// A handler that fails its step.
    pub failing: u64,
}

impl Faults {
    /// The rates of a seed, drawn from its generator: each fault is off in
    /// about a third of the seeds, so that each is also seen alone.
    pub fn draw(rng: &mut Rng) -> Self {
        Faults {
            pause: rng.rate(40),
            crash_at_append: rng.rate(25),
            lose_answer: rng.rate(25),
            unknown: rng.rate(25),
            busy: rng.rate(40),
            drop_renewal: rng.rate(300),
            crash: rng.rate(8),
            stop: rng.rate(4),
            partition: rng.rate(6),
            slow: rng.rate(250),
            stuck: rng.rate(60),
            failing: rng.rate(120),
        }
    }
}

/// What a seed (or many) came to, besides its violations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Jobs submitted.
    pub jobs: u64,
    /// Steps started (`StepStarted` in the log).
    pub steps: u64,
    /// Workers crashed.
    pub crashes: u64,
    /// Claims that took a job over from an owner whose lease ran out.
    pub takeovers: u64,
    /// Appends the store refused for their fence (`StoreError::Fenced`).
    pub fenced_appends: u64,
    /// Steps recorded `interrupted`.
    pub interrupted: u64,
    /// Cancels recorded (requests, and queued jobs ended before they
    /// started).
    pub cancels: u64,
}

impl std::ops::AddAssign for Counters {
    fn add_assign(&mut self, other: Counters) {
        self.jobs += other.jobs;
        self.steps += other.steps;
        self.crashes += other.crashes;
        self.takeovers += other.takeovers;
        self.fenced_appends += other.fenced_appends;
        self.interrupted += other.interrupted;
        self.cancels += other.cancels;
    }
}

/// A step whose handler was started and has not returned.
pub struct Pending {
    pub call: StepCall,
    /// The actor waiting for it.
    pub actor: ActorId,
    /// When it returns (µs); `None`: stuck, it never does on its own.
    pub due: Option<u64>,
    /// Whether it succeeds.
    pub succeeds: bool,
}

/// The seed's trace: every decision and what came of it, hashed; kept
/// line by line when asked for.
pub struct Trace {
    hasher: Sha256,
    pub lines: Option<Vec<String>>,
}

impl Trace {
    pub fn hash(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }
}

/// The shared state; see the module's documentation.
pub struct World(Mutex<State>);

pub struct State {
    pub time: SimTime,
    pub rng: Rng,
    pub faults: Faults,
    /// No more faults: every job is to end.
    pub draining: bool,
    pub trace: Trace,
    /// Jobs, by the number traces name them with.
    jobs: BTreeMap<Uuid, usize>,
    /// Each job's epoch, as the claims the store made moved it.
    epochs: BTreeMap<Uuid, u64>,
    /// Handler calls per (job, step).
    calls: BTreeMap<(Uuid, u32), u32>,
    pub pending: BTreeMap<u64, Pending>,
    next_pending: u64,
    /// The fence of the append each actor is making.
    appending: BTreeMap<ActorId, Option<Fence>>,
    /// The actor whose store call just started a handler.
    started: Option<ActorId>,
    /// The actors of workers (whose every append is fenced).
    pub workers: BTreeSet<ActorId>,
    pub counters: Counters,
    pub violations: Vec<String>,
}

impl World {
    pub fn new(seed: u64, time: SimTime, keep_trace: bool) -> Self {
        let mut rng = Rng::new(seed);
        let faults = Faults::draw(&mut rng);
        World(Mutex::new(State {
            time,
            rng,
            faults,
            draining: false,
            trace: Trace {
                hasher: Sha256::new(),
                lines: keep_trace.then(Vec::new),
            },
            jobs: BTreeMap::new(),
            epochs: BTreeMap::new(),
            calls: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_pending: 0,
            appending: BTreeMap::new(),
            started: None,
            workers: BTreeSet::new(),
            counters: Counters::default(),
            violations: Vec::new(),
        }))
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // An actor that panics holding it is reported; what it holds is
        // still what the simulation knows.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Adds `line` to the trace.
    pub fn trace(&mut self, line: String) {
        self.trace.hasher.update(line.as_bytes());
        self.trace.hasher.update(b"\n");
        if let Some(lines) = &mut self.trace.lines {
            lines.push(line);
        }
    }

    /// Records a broken rule, in the trace too.
    pub fn violation(&mut self, what: String) {
        self.trace(format!("VIOLATION {what}"));
        self.violations.push(what);
    }

    /// Names a new job `j<n>`.
    pub fn add_job(&mut self, job: Uuid) {
        let n = self.jobs.len();
        self.jobs.insert(job, n);
        self.counters.jobs += 1;
    }

    /// A job as traces name it.
    pub fn job(&self, job: Uuid) -> String {
        self.jobs
            .get(&job)
            .map_or_else(|| job.to_string(), |n| format!("j{n}"))
    }

    /// A store call as traces show it.
    pub fn show(&self, call: &Call) -> String {
        let epoch = |fence: &Option<Fence>| fence.map_or("-".into(), |f| f.epoch.to_string());
        match call {
            Call::Append {
                job,
                seq,
                kinds,
                fence,
            } => format!(
                "append {} #{seq} {} under epoch {}",
                self.job(*job),
                kinds.join("+"),
                epoch(fence)
            ),
            Call::Claim => "claim".into(),
            Call::Renew(fences) => {
                let held: Vec<String> = fences
                    .iter()
                    .map(|f| format!("{}@{}", self.job(f.job_id), f.epoch))
                    .collect();
                format!("renew [{}]", held.join(" "))
            }
            Call::Release(fence, finished) => format!(
                "release {}@{} finished: {finished}",
                self.job(fence.job_id),
                fence.epoch
            ),
            Call::Read(what, job) => match job {
                Some(job) => format!("{what} {}", self.job(*job)),
                None => (*what).to_owned(),
            },
        }
    }

    /// Notes a claim the store made.
    pub fn claimed(&mut self, owner: &str, claim: &Claim) {
        let job = claim.fence.job_id;
        self.epochs.insert(job, claim.fence.epoch);
        let mut line = format!(
            "claim {} by {owner} at epoch {}",
            self.job(job),
            claim.fence.epoch
        );
        if let Some(previous) = &claim.taken_over_from {
            self.counters.takeovers += 1;
            let _ = write!(line, ", taken over from {previous}");
        }
        self.trace(line);
    }

    /// Notes that `actor` is about to append under `fence`.
    pub fn appending(&mut self, actor: Option<ActorId>, fence: Option<Fence>) {
        if let Some(actor) = actor {
            self.appending.insert(actor, fence);
        }
    }

    /// Judges the store's answer to an append by `actor` under `fence`: a
    /// worker's appends are all fenced; one under a fence that no longer
    /// holds must be refused by the store's own check (`Fenced`) — not let
    /// through, nor refused for another reason — and one under a fence
    /// that holds must not be.
    pub fn appended(
        &mut self,
        actor: Option<ActorId>,
        job: Uuid,
        fence: Option<Fence>,
        answer: &Result<Vec<u64>, StoreError>,
    ) {
        let shown = match answer {
            Ok(positions) => format!("ok {positions:?}"),
            Err(e) => format!("{e}"),
        };
        self.trace(format!("append {} -> {shown}", self.job(job)));
        let Some(fence) = fence else {
            if actor.is_some_and(|a| self.workers.contains(&a)) {
                self.violation(format!(
                    "{}: a worker appended without a fence: {shown}",
                    self.job(job)
                ));
            }
            return;
        };
        let current = self.epochs.get(&fence.job_id).copied();
        let stale = current != Some(fence.epoch);
        let fenced = matches!(answer, Err(StoreError::Fenced { .. }));
        if fenced {
            self.counters.fenced_appends += 1;
        }
        if stale && !fenced {
            self.violation(format!(
                "{}: an append under epoch {} (the job is at epoch {current:?}) was not refused by the store's fence: {shown}",
                self.job(job),
                fence.epoch
            ));
        } else if !stale && fenced {
            self.violation(format!(
                "{}: the store refused an append under epoch {}, which holds",
                self.job(job),
                fence.epoch
            ));
        }
    }

    /// Takes the note that `actor`'s append started a handler; the append
    /// is over.
    pub fn take_started(&mut self, actor: Option<ActorId>) -> bool {
        if let Some(actor) = actor {
            self.appending.remove(&actor);
        }
        actor.is_some() && self.started.take() == actor
    }

    /// A step's handler starts, on `actor`'s commit hook: counted, checked
    /// (at most once per step, only under the job's current fence), and
    /// given how long it takes.
    pub fn handler_started(&mut self, actor: Option<ActorId>, call: StepCall) {
        let (job, step) = (call.context().job_id, call.step().step_index);
        let calls = self.calls.entry((job, step)).or_insert(0);
        *calls += 1;
        let calls = *calls;
        self.trace(format!(
            "handler {} step {step} starts (call {calls})",
            self.job(job)
        ));
        if calls > 1 {
            self.violation(format!(
                "{}: the handler of step {step} ran {calls} times",
                self.job(job)
            ));
        }
        let Some(actor) = actor else {
            self.violation(format!(
                "{}: step {step} started off any actor",
                self.job(job)
            ));
            return;
        };
        let Some(&fence) = self.appending.get(&actor) else {
            self.violation(format!(
                "{}: the handler of step {step} started outside the commit of its StepStarted",
                self.job(job)
            ));
            self.pend(call, actor);
            // Nothing else will tell the scheduler the actor now waits.
            baton::on_handler();
            return;
        };
        let current = self.epochs.get(&job).copied();
        if fence.map(|f| f.epoch) != current {
            self.violation(format!(
                "{}: the handler of step {step} started under fence {fence:?}; the job is at epoch {current:?}",
                self.job(job)
            ));
        }
        self.pend(call, actor);
        self.started = Some(actor);
    }

    /// Keeps a started step's call until its handler returns.
    fn pend(&mut self, call: StepCall, actor: ActorId) {
        let due = self.handler_time();
        let succeeds = !self.rng.chance(self.faults.failing);
        let pending = Pending {
            call,
            actor,
            due,
            succeeds,
        };
        self.pending.insert(self.next_pending, pending);
        self.next_pending += 1;
    }

    /// When a handler started now returns: soon; slower than a lease; or
    /// never on its own.
    fn handler_time(&mut self) -> Option<u64> {
        let now = self.time.now();
        let faults = self.faults;
        if self.draining {
            return Some(now + self.rng.between(1_000, 200_000));
        }
        if self.rng.chance(faults.stuck) {
            None
        } else if self.rng.chance(faults.slow) {
            Some(now + self.rng.between(LEASE_MICROS / 2, 3 * LEASE_MICROS))
        } else {
            Some(now + self.rng.between(1_000, LEASE_MICROS / 5))
        }
    }

    /// The (job, step) pairs whose handler was called.
    pub fn called(&self) -> impl Iterator<Item = &(Uuid, u32)> {
        self.calls.keys()
    }
}

/// Every lease in the simulation, in µs.
pub const LEASE_MICROS: u64 = 3_000_000;
