//! The scheduler: one seeded generator decides every move of a seed —
//! which actor runs next and what its store call comes to, when a handler
//! returns, when time moves on, and when a worker pauses, crashes, is
//! stopped, cut off from renewing or restarted. Then, with faults off,
//! it lets the fleet finish every job, and stops everything.

use std::collections::BTreeMap;
use std::sync::Arc;

use job_executor::JobStep;
use job_executor::store::{MemoryStore, QueuedJob};
use job_executor::worker::submit;
use uuid::Uuid;

use super::baton::{ActorId, Baton, Broken, Call, Fault, Go, Point, State};
use super::fleet::{STEP_TYPE, WorkerParts};
use super::log::SimLog;
use super::time::{SimClock, SimTime};
use super::world::{LEASE_MICROS, State as WorldState, World};

/// How long, in simulated time, the faulty part of a seed lasts at most.
pub(super) const HORIZON_MICROS: u64 = 12 * LEASE_MICROS;
/// Moves a seed may make at most (a bound on a run that never settles).
pub(super) const MOVES_MAX: u64 = 200_000;
/// How often, per mille of moves, time passes by a little on its own.
const TIME_PASSES: u64 = 150;

/// A process: a worker's incarnation, or the canceller.
pub(super) struct Process {
    pub(super) name: String,
    /// Its worker's seat; `None` for the canceller.
    pub(super) seat: Option<usize>,
    pub(super) actors: Vec<ActorId>,
    /// Its parts, while it may run (dropped once it crashed).
    pub(super) parts: Option<Arc<WorkerParts>>,
    /// Renewals dropped until this time (a partition).
    pub(super) cut_off_until: u64,
}

/// A worker's place in the fleet, across its incarnations.
pub(super) struct Seat {
    pub(super) incarnations: usize,
    pub(super) process: Option<usize>,
    pub(super) restart_at: Option<u64>,
    pub(super) slots: usize,
    /// How fast its clock runs, in millionths.
    pub(super) rate_ppm: u64,
}

/// One move of the scheduler.
#[derive(Clone, Copy, Debug)]
enum Move {
    /// Hand the baton to an actor waiting at a point.
    Resume(ActorId),
    /// A handler returns.
    Settle(u64),
    /// A worker starts again.
    Restart(usize),
    /// A job is submitted.
    Submit(usize),
}

/// What the scheduler has a store call come to.
enum Decision {
    Go(Fault),
    /// The caller's process crashes before the call is made.
    CrashBefore,
}

/// One seed's simulation.
pub struct Sim {
    pub(super) time: SimTime,
    pub(super) world: Arc<World>,
    pub(super) inner: Arc<MemoryStore>,
    pub(super) log: Arc<SimLog>,
    pub(super) baton: Baton,
    pub(super) processes: Vec<Process>,
    pub(super) seats: Vec<Seat>,
    /// Actors paused at a call, until a time.
    pub(super) paused: BTreeMap<ActorId, u64>,
    pub(super) jobs: Vec<Uuid>,
    /// Jobs submitted once their time comes.
    pub(super) late: Vec<(u64, Option<QueuedJob>)>,
}

impl Sim {
    /// The simulation of `seed`: its store, its jobs and its fleet, drawn
    /// from the seed.
    pub(super) fn new(seed: u64, keep_trace: bool) -> Self {
        let time = SimTime::new();
        let world = Arc::new(World::new(seed, time.clone(), keep_trace));
        let inner = Arc::new(MemoryStore::with_clock(Arc::new(SimClock::new(
            time.clone(),
            1_000_000,
        ))));
        let log = Arc::new(SimLog {
            inner: inner.clone(),
            world: world.clone(),
        });
        let mut sim = Sim {
            time,
            world,
            inner,
            log,
            baton: Baton::new(),
            processes: Vec::new(),
            seats: Vec::new(),
            paused: BTreeMap::new(),
            jobs: Vec::new(),
            late: Vec::new(),
        };
        sim.plan();
        sim
    }

    /// Draws the seed's jobs and fleet.
    fn plan(&mut self) {
        let mut world = self.world.lock();
        let rng = &mut world.rng;
        let (jobs, seats) = (rng.between(1, 7), rng.between(1, 3));
        let mut planned = Vec::new();
        for _ in 0..jobs {
            let steps: Vec<JobStep> = (0..rng.between(0, 4) as u32)
                .map(|i| {
                    // Now and then a step no handler is registered for.
                    let kind = if rng.chance(40) {
                        "unregistered"
                    } else {
                        STEP_TYPE
                    };
                    let mut step = JobStep::new(i, kind, format!("t{i}"));
                    // Deadlines are the engine's real time: out of reach.
                    step.timeout_seconds = 86_400;
                    step
                })
                .collect();
            let job = QueuedJob::new(rng.uuid(), rng.uuid(), steps, "sim");
            let at = if rng.chance(300) {
                rng.below(HORIZON_MICROS / 2)
            } else {
                0
            };
            planned.push((at, job));
        }
        for _ in 0..seats {
            self.seats.push(Seat {
                incarnations: 0,
                process: None,
                restart_at: Some(0),
                slots: rng.between(1, 2) as usize,
                rate_ppm: rng.between(970_000, 1_030_000),
            });
        }
        for (at, job) in planned {
            world.add_job(job.job_id);
            self.jobs.push(job.job_id);
            self.late.push((at, Some(job)));
        }
    }

    /// Runs the seed: the faulty part, then the drain, then everything
    /// stopped.
    pub(super) fn run(&mut self) -> Result<(), Broken> {
        self.start_canceller()?;
        let mut moves = 0;
        while self.time.now() < HORIZON_MICROS && moves < MOVES_MAX {
            if moves % 16 == 0 && self.all_ended() {
                break;
            }
            self.step()?;
            moves += 1;
        }
        self.drain(moves)?;
        for process in 0..self.processes.len() {
            self.kill(process)?;
        }
        Ok(())
    }

    fn draining(&self) -> bool {
        self.world.lock().draining
    }

    /// One move, chosen by the seed.
    pub(super) fn step(&mut self) -> Result<(), Broken> {
        if !self.draining() {
            self.strike()?;
        }
        let moves = self.moves();
        if moves.is_empty() {
            self.advance();
            return Ok(());
        }
        let (passes, pick, little) = {
            let mut world = self.world.lock();
            let passes = world.rng.chance(TIME_PASSES);
            let pick = world.rng.below(moves.len() as u64) as usize;
            (passes, pick, world.rng.between(1, 50_000))
        };
        if passes {
            self.time.set(self.time.now() + little);
        }
        self.make(moves[pick])
    }

    /// The moves possible now, in a fixed order.
    fn moves(&self) -> Vec<Move> {
        let now = self.time.now();
        let mut moves = Vec::new();
        for (id, actor) in self.baton.actors.iter().enumerate() {
            let ready = match &actor.state {
                State::At(Point::Sleep(until)) => *until <= now,
                State::At(_) => self.paused.get(&id).is_none_or(|until| *until <= now),
                _ => false,
            };
            if ready {
                moves.push(Move::Resume(id));
            }
        }
        let world = self.world.lock();
        for (id, pending) in &world.pending {
            if pending.due.is_some_and(|due| due <= now) {
                moves.push(Move::Settle(*id));
            }
        }
        for (seat, s) in self.seats.iter().enumerate() {
            if s.restart_at.is_some_and(|at| at <= now) && self.gone(s.process) {
                moves.push(Move::Restart(seat));
            }
        }
        for (index, (at, job)) in self.late.iter().enumerate() {
            if job.is_some() && *at <= now {
                moves.push(Move::Submit(index));
            }
        }
        moves
    }

    /// Whether `process` (if any) has no actor left.
    fn gone(&self, process: Option<usize>) -> bool {
        process.is_none_or(|p| {
            self.processes[p]
                .actors
                .iter()
                .all(|&id| matches!(self.baton.actors[id].state, State::Gone))
        })
    }

    /// Moves time on to the next thing due, or to the end of the seed.
    fn advance(&mut self) {
        let now = self.time.now();
        let mut times: Vec<u64> = self
            .baton
            .actors
            .iter()
            .filter_map(|actor| match actor.state {
                State::At(Point::Sleep(until)) => Some(until),
                _ => None,
            })
            .collect();
        times.extend(self.paused.values());
        times.extend(self.seats.iter().filter_map(|s| s.restart_at));
        times.extend(
            self.late
                .iter()
                .filter(|(_, j)| j.is_some())
                .map(|(at, _)| at),
        );
        times.extend(self.world.lock().pending.values().filter_map(|p| p.due));
        // Nothing will ever be due: the seed is over, drain included.
        let end = now.max(HORIZON_MICROS) + super::lifecycle::DRAIN_MICROS + 1;
        let next = times.into_iter().filter(|&t| t > now).min();
        self.time.set(next.unwrap_or(end));
    }

    /// Makes `m`.
    fn make(&mut self, m: Move) -> Result<(), Broken> {
        match m {
            Move::Resume(id) => self.resume(id),
            Move::Settle(pending) => self.settle(pending),
            Move::Restart(seat) => self.start_worker(seat),
            Move::Submit(index) => {
                if let Some(job) = self.late[index].1.take() {
                    let submitted = submit(&*self.inner, &job);
                    let mut world = self.world.lock();
                    let line = format!("submit {}: {submitted:?}", world.job(job.job_id));
                    world.trace(line);
                }
                Ok(())
            }
        }
    }

    /// Hands the baton to `id`, waiting at a point; at a store call, what
    /// the call comes to is drawn first (a pause, a fault, a crash).
    fn resume(&mut self, id: ActorId) -> Result<(), Broken> {
        self.paused.remove(&id);
        let State::At(point) = self.baton.actors[id].state.clone() else {
            return Ok(());
        };
        let process = self.baton.actors[id].process;
        let Point::Call(call) = point else {
            return self.baton.resume(id, Go::Run(Fault::None));
        };
        let decision = {
            let mut world = self.world.lock();
            let now = self.time.now();
            let pause = world.faults.pause;
            if !world.draining && world.rng.chance(pause) {
                let until = now + world.rng.between(1, 3 * LEASE_MICROS);
                self.paused.insert(id, until);
                let (name, call) = (&self.processes[process].name, world.show(&call));
                world.trace(format!(
                    "{now} pause a{id} ({name}) at {call} until {until}"
                ));
                return Ok(());
            }
            let decision = self.decide(&mut world, process, &call);
            let shown = match &decision {
                Decision::Go(fault) => format!("{fault:?}"),
                Decision::CrashBefore => "crash before".into(),
            };
            let (name, call) = (&self.processes[process].name, world.show(&call));
            world.trace(format!("{now} a{id} ({name}) {call}: {shown}"));
            decision
        };
        match decision {
            Decision::CrashBefore => self.crash(process),
            Decision::Go(fault) => {
                self.baton.resume(id, Go::Run(fault))?;
                if let Fault::CrashAfter { .. } = fault {
                    self.crash(process)?;
                }
                Ok(())
            }
        }
    }

    /// What a store call of `process` comes to, drawn from `world`'s
    /// generator at its fault rates (none while draining).
    fn decide(&self, world: &mut WorldState, process: usize, call: &Call) -> Decision {
        if world.draining {
            return Decision::Go(Fault::None);
        }
        let (faults, rng) = (world.faults, &mut world.rng);
        let worker = self.processes[process].seat.is_some();
        let cut_off = self.processes[process].cut_off_until > self.time.now();
        let fault = match call {
            Call::Append { .. } if worker && rng.chance(faults.crash_at_append) => {
                match rng.below(3) {
                    0 => return Decision::CrashBefore,
                    n => Fault::CrashAfter { hook: n == 1 },
                }
            }
            Call::Claim if worker && rng.chance(faults.crash_at_append) => {
                Fault::CrashAfter { hook: false }
            }
            Call::Renew(_) if cut_off || rng.chance(faults.drop_renewal) => Fault::Busy,
            Call::Read(..) if rng.chance(faults.busy / 2) => Fault::Busy,
            Call::Read(..) => Fault::None,
            _ if rng.chance(faults.lose_answer) => Fault::LoseAnswer,
            Call::Append { .. } if rng.chance(faults.unknown) => Fault::Unknown,
            _ if rng.chance(faults.busy) => Fault::Busy,
            _ => Fault::None,
        };
        Decision::Go(fault)
    }
}
