//! A deterministic simulation of the worker fleet, in the spirit of
//! FoundationDB's simulator and TigerBeetle's VOPR.
//!
//! One seed decides everything: the jobs and their plans, the fleet (one
//! to three workers of one or two slots, each with a clock that drifts a
//! little), the fault rates (each fault off in about a third of the
//! seeds), and every move of the run. The workers are the engine's own
//! parts, composed as `Worker::run` composes them — `Leases` timed by the
//! worker's clock, `FencedStore`, `JobExecutor::take_up` under a
//! `RunControl`, `Ended`, `release` — on the real `MemoryStore`, whose
//! queue times leases by the simulated database clock. Each slot and each
//! lease renewer is a thread that runs only while it holds the baton
//! (`baton`): it hands it back at every store call and every wait on its
//! clock, so one scheduler (`scheduler`) interleaves them call by call,
//! and moves simulated time (`time`).
//!
//! Faults, at any point: an actor paused at a call — after its lease check,
//! before its append — for up to three leases; renewals dropped, or a
//! worker cut off from renewing for a while, so leases run out and other
//! workers take jobs over; a crash at an append, before or after its
//! commit (its commit hook run or not), or at any move (every actor of the
//! worker dies where it stands, its steps in flight abandoned); a commit
//! whose answer is lost (made, or not, the caller told the outcome is
//! unknown); a busy database; a worker asked to stop; handlers slower than
//! a lease, or stuck until their worker dies; failing steps; a canceller
//! elsewhere asking jobs to cancel, queued ones included. Then faults stop
//! and the fleet must finish every job.
//!
//! Checked as it happens (`world`): each handler runs at most once per
//! (job, step), and only under its job's current fence; every append made
//! under a fence that no longer holds is refused by the store itself
//! (`StoreError::Fenced`, counted), and none under one that holds. Checked
//! after (`check`): the log verifies (`verify::verify_store`), positions
//! are dense, every job ended, every handler call has its `StepStarted`
//! in the log. Every decision and the final log go into a trace whose
//! SHA-256 is the seed's fingerprint: the same seed, the same trace.
//!
//! This code uses only the crate's public API. It is shared, by `#[path]`,
//! by `examples/simulate.rs` (any number of seeds) and
//! `tests/it/simulation.rs` (the seeds CI runs).

mod baton;
mod check;
mod fleet;
mod lifecycle;
mod log;
mod rng;
mod scheduler;
mod time;
mod world;

pub use world::Counters;

use baton::Broken;
use scheduler::Sim;

/// What one seed came to.
pub struct SeedReport {
    pub seed: u64,
    pub counters: Counters,
    /// The broken rules found; empty for a clean seed.
    pub violations: Vec<String>,
    /// The SHA-256 of the seed's trace, in hex.
    pub trace_hash: String,
    /// The trace, line by line, when it was kept.
    pub trace: Vec<String>,
}

/// Runs `seed`, keeping its trace's lines when `keep_trace`.
pub fn run_seed(seed: u64, keep_trace: bool) -> SeedReport {
    let mut sim = Sim::new(seed, keep_trace);
    match sim.run() {
        Ok(()) => sim.check(),
        // Its actors are left where they are.
        Err(Broken(why)) => sim.world.lock().violation(why),
    }
    let world = sim.world.lock();
    SeedReport {
        seed,
        counters: world.counters,
        violations: world.violations.clone(),
        trace_hash: world.trace.hash(),
        trace: world.trace.lines.clone().unwrap_or_default(),
    }
}

/// What many seeds came to.
#[derive(Default)]
pub struct Totals {
    pub seeds: u64,
    pub counters: Counters,
    pub violations: u64,
    /// The seeds with violations.
    pub failed: Vec<SeedReport>,
}

impl Totals {
    /// The one JSON line a run of the simulation ends with.
    pub fn json(&self) -> String {
        let c = &self.counters;
        format!(
            "{{\"seeds\":{},\"jobs\":{},\"steps\":{},\"crashes\":{},\"takeovers\":{},\"fenced_appends\":{},\"interrupted\":{},\"cancels\":{},\"violations\":{}}}",
            self.seeds,
            c.jobs,
            c.steps,
            c.crashes,
            c.takeovers,
            c.fenced_appends,
            c.interrupted,
            c.cancels,
            self.violations
        )
    }
}

/// Runs `count` seeds from `start` on (keeping their traces' lines when
/// `keep_trace`), handing each report to `each`.
pub fn run_seeds(
    start: u64,
    count: u64,
    keep_trace: bool,
    mut each: impl FnMut(&SeedReport),
) -> Totals {
    let mut totals = Totals::default();
    for seed in start..start.saturating_add(count) {
        let report = run_seed(seed, keep_trace);
        each(&report);
        totals.seeds += 1;
        totals.counters += report.counters;
        totals.violations += report.violations.len() as u64;
        if !report.violations.is_empty() {
            totals.failed.push(report);
        }
    }
    totals
}

/// The command that replays `seed` alone, its trace printed.
pub fn replay_command(seed: u64) -> String {
    format!("cargo run --release --example simulate -- --seeds 1 --start {seed} --trace")
}
