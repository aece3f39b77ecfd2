//! Processes coming and going: workers started and restarted, crashed
//! (every actor of theirs dies wherever it is; steps in flight are
//! abandoned), asked to stop, cut off from renewing; handlers returning;
//! and the drain that lets the fleet finish every job once faults stop.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use job_executor::StepOutput;
use job_executor::events::TERMINAL_KINDS;
use job_executor::store::{EventStore, JobQueue};
use serde_json::json;

use super::baton::{ActorId, Broken, Go, State};
use super::fleet::{self, WorkerParts};
use super::scheduler::{Process, Sim};
use super::time::SimClock;
use super::world::LEASE_MICROS;

/// How long the fleet has to finish every job once faults stop.
pub(super) const DRAIN_MICROS: u64 = 40 * LEASE_MICROS;

impl Sim {
    /// Starts the next incarnation of the worker at `seat`.
    pub(super) fn start_worker(&mut self, seat: usize) -> Result<(), Broken> {
        let s = &mut self.seats[seat];
        let name = format!("w{seat}.{}", s.incarnations);
        s.incarnations += 1;
        s.restart_at = None;
        let clock = Arc::new(SimClock::new(self.time.clone(), s.rate_ppm));
        let parts = Arc::new(WorkerParts::new(
            name.clone(),
            self.log.clone(),
            clock,
            s.slots,
        ));
        let process = self.processes.len();
        s.process = Some(process);
        self.world
            .lock()
            .trace(format!("{} start {name}", self.time.now()));
        self.processes.push(Process {
            name,
            seat: Some(seat),
            actors: Vec::new(),
            parts: Some(parts.clone()),
            cut_off_until: 0,
        });
        for _ in 0..self.seats[seat].slots {
            let slot = parts.clone();
            let id = self.baton.spawn(process, move || slot.slot())?;
            self.processes[process].actors.push(id);
        }
        let id = self.baton.spawn(process, move || parts.renewer())?;
        self.processes[process].actors.push(id);
        let actors = self.processes[process].actors.clone();
        self.world.lock().workers.extend(actors);
        Ok(())
    }

    /// Starts the canceller.
    pub(super) fn start_canceller(&mut self) -> Result<(), Broken> {
        let process = self.processes.len();
        self.processes.push(Process {
            name: "canceller".into(),
            seat: None,
            actors: Vec::new(),
            parts: None,
            cut_off_until: 0,
        });
        let clock = Arc::new(SimClock::new(self.time.clone(), 1_000_000));
        let (log, jobs) = (self.log.clone(), self.jobs.clone());
        let id = self
            .baton
            .spawn(process, move || fleet::canceller(log, clock, jobs))?;
        self.processes[process].actors.push(id);
        Ok(())
    }

    /// A handler returns: its step is settled, and its actor runs until it
    /// hands the baton back.
    pub(super) fn settle(&mut self, pending: u64) -> Result<(), Broken> {
        let Some(p) = self.world.lock().pending.remove(&pending) else {
            return Ok(());
        };
        let step = p.call.step().step_index;
        {
            let mut world = self.world.lock();
            let job = world.job(p.call.context().job_id);
            let line = format!(
                "{} {job} step {step} returns, ok: {}",
                self.time.now(),
                p.succeeds
            );
            world.trace(line);
        }
        if p.succeeds {
            p.call
                .complete(StepOutput::succeeded(json!({ "step": step })));
        } else {
            p.call.complete(StepOutput::failed("simulated failure"));
        }
        self.baton.wait(p.actor)
    }

    /// Strikes a worker, now and then: a crash, a stop (SIGTERM), or a
    /// partition that drops its renewals for a while.
    pub(super) fn strike(&mut self) -> Result<(), Broken> {
        let (crash, stop, cut, pick, span) = {
            let mut world = self.world.lock();
            let faults = world.faults;
            let rng = &mut world.rng;
            (
                rng.chance(faults.crash),
                rng.chance(faults.stop),
                rng.chance(faults.partition),
                rng.next_u64(),
                rng.between(LEASE_MICROS, 3 * LEASE_MICROS),
            )
        };
        if !(crash || stop || cut) {
            return Ok(());
        }
        let running: Vec<usize> = self
            .processes
            .iter()
            .enumerate()
            .filter(|(_, p)| p.seat.is_some() && p.parts.is_some())
            .map(|(i, _)| i)
            .collect();
        let Some(&process) = running.get(pick as usize % running.len().max(1)) else {
            return Ok(());
        };
        let now = self.time.now();
        let seat = self.processes[process].seat.unwrap_or_default();
        if crash {
            return self.crash(process);
        }
        let name = self.processes[process].name.clone();
        if stop {
            if let Some(parts) = &self.processes[process].parts {
                parts.stop.store(true, Ordering::SeqCst);
            }
            self.seats[seat].restart_at = Some(now + span);
            self.world.lock().trace(format!("{now} stop {name}"));
        } else {
            self.processes[process].cut_off_until = now + span;
            self.world.lock().trace(format!("{now} cut off {name}"));
        }
        Ok(())
    }

    /// `process` crashes: every actor of it dies where it stands, and the
    /// steps it waited for are abandoned. A worker starts again later, as
    /// a new incarnation with nothing of the old one's state.
    pub(super) fn crash(&mut self, process: usize) -> Result<(), Broken> {
        let now = self.time.now();
        let restart = {
            let mut world = self.world.lock();
            world.counters.crashes += 1;
            world.trace(format!("{now} {} crashes", self.processes[process].name));
            world.rng.between(0, 2 * LEASE_MICROS)
        };
        self.kill(process)?;
        if let Some(seat) = self.processes[process].seat {
            self.seats[seat].restart_at = Some(now + restart);
        }
        Ok(())
    }

    /// Ends every actor of `process`.
    pub(super) fn kill(&mut self, process: usize) -> Result<(), Broken> {
        self.processes[process].parts = None;
        let actors = self.processes[process].actors.clone();
        // Steps whose handlers its commits started die with it, waited
        // for or not (a crash right after a commit).
        self.world
            .lock()
            .pending
            .retain(|_, p| !actors.contains(&p.actor));
        for id in actors {
            self.paused.remove(&id);
            self.end(id)?;
        }
        Ok(())
    }

    /// Ends actor `id` wherever it is.
    fn end(&mut self, id: ActorId) -> Result<(), Broken> {
        loop {
            match self.baton.actors[id].state {
                State::Gone | State::Running => return Ok(()),
                State::At(_) => self.baton.resume(id, Go::Die)?,
                // Its step's call dropped unsettled, it goes on to its
                // next call, where it dies.
                State::OnHandler => self.baton.wait(id)?,
            }
        }
    }

    /// Whether every job has ended and the queue is empty.
    pub(super) fn all_ended(&self) -> bool {
        self.late.iter().all(|(_, job)| job.is_none())
            && self.inner.queued().is_ok_and(|q| q.is_empty())
            && self.jobs.iter().all(|&job| {
                self.inner.load_job(job).is_ok_and(|events| {
                    events
                        .last()
                        .is_some_and(|e| TERMINAL_KINDS.contains(&e.kind.as_str()))
                })
            })
    }

    /// Faults stop; stuck handlers return, paused workers go on, stopped
    /// and crashed ones start again: every job must end.
    pub(super) fn drain(&mut self, moves: u64) -> Result<(), Broken> {
        let now = self.time.now();
        {
            let mut world = self.world.lock();
            world.draining = true;
            world.trace(format!("{now} drain"));
            for pending in world.pending.values_mut() {
                pending.due = Some(pending.due.unwrap_or(now).min(now + LEASE_MICROS));
            }
        }
        self.paused.clear();
        for process in &mut self.processes {
            process.cut_off_until = 0;
        }
        for seat in &mut self.seats {
            seat.restart_at = Some(now);
        }
        let deadline = now + DRAIN_MICROS;
        let mut moves = moves;
        while !self.all_ended() {
            // What has not ended by then is a violation `check` reports.
            if self.time.now() > deadline || moves > super::scheduler::MOVES_MAX {
                break;
            }
            self.step()?;
            moves += 1;
        }
        Ok(())
    }
}
