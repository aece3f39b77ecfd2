//! What must hold once a seed has run, besides what the world checked as
//! it happened (each handler at most once per step and only under its
//! job's current fence; every stale append refused by the store's fence):
//! the log verifies, positions are dense, every job ended, every handler
//! call has its `StepStarted` in the log, no actor panicked. The log
//! itself goes into the trace, so two runs of a seed compare byte for
//! byte.

use std::collections::BTreeSet;

use job_executor::events::{Event, EventRecord};
use job_executor::model::FailureKind;
use job_executor::store::EventStore;
use job_executor::verify::{VerifyOptions, verify_store};

use uuid::Uuid;

use super::scheduler::Sim;
use super::world::State;

impl Sim {
    /// Checks what the seed left; counts its steps and interrupted steps.
    pub(super) fn check(&self) {
        let mut world = self.world.lock();
        for panic in &self.baton.panics {
            world.violation(panic.clone());
        }
        let events = self.inner.all_events();
        check_positions(&mut world, &events, self.inner.last_position().ok());
        let started = read_log(&mut world, &events);
        let unstarted: Vec<_> = world
            .called()
            .filter(|c| !started.contains(*c))
            .copied()
            .collect();
        for (job, step) in unstarted {
            let job = world.job(job);
            world.violation(format!(
                "{job}: the handler of step {step} ran with no StepStarted in the log"
            ));
        }
        let verified = verify_store(
            &*self.inner,
            &VerifyOptions::default(),
            |report| {
                for v in report.violations {
                    let job = world.job(v.job_id);
                    world.violation(format!(
                        "verify: {job} seq {}: {} {}",
                        v.seq, v.check, v.message
                    ));
                }
            },
            |_| {},
        );
        if let Err(e) = verified {
            world.violation(format!("verify: the log cannot be read: {e}"));
        }
        if !self.all_ended() {
            world.violation("some job did not end, or is still queued".into());
        }
    }
}

/// Positions are 1, 2, 3, … with no gap, and the last is the log's length.
fn check_positions(world: &mut State, events: &[EventRecord], last: Option<u64>) {
    if let Some((i, e)) = events
        .iter()
        .enumerate()
        .find(|(i, e)| e.position != *i as u64 + 1)
    {
        world.violation(format!(
            "positions are not dense: event {} is at {}",
            i + 1,
            e.position
        ));
    }
    if last != Some(events.len() as u64) {
        world.violation(format!(
            "the last position ({last:?}) is not the log's length, {}",
            events.len()
        ));
    }
}

/// Traces every event, counts steps started and steps interrupted, and
/// returns the (job, step) pairs started.
fn read_log(world: &mut State, events: &[EventRecord]) -> BTreeSet<(Uuid, u32)> {
    let mut started = BTreeSet::new();
    for e in events {
        let digest = e.digest.as_deref().unwrap_or("-");
        let job = world.job(e.job_id);
        world.trace(format!(
            "log {} {job} #{} {} {digest}",
            e.position, e.seq, e.kind
        ));
        match e.decode().map(|r| r.event) {
            Ok(Event::StepStarted(s)) => {
                world.counters.steps += 1;
                started.insert((e.job_id, s.step_index));
            }
            Ok(Event::StepFailed(f)) if f.failure.kind == FailureKind::Interrupted => {
                world.counters.interrupted += 1;
            }
            Ok(_) => {}
            Err(error) => {
                world.violation(format!("event at {} does not decode: {error}", e.position))
            }
        }
    }
    started
}
