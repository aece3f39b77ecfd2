//! Simulated time: microseconds since a seed began, moved on by the
//! scheduler alone; and the clocks read from it — the database's, exact,
//! and each worker's, which may run a little fast or slow.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use job_executor::clock::Clock;

use super::baton::{self, Point};

/// The simulation's time, shared by its clocks.
#[derive(Clone)]
pub struct SimTime {
    micros: Arc<AtomicU64>,
    /// What `Clock::instant` counts from.
    anchor: Instant,
}

impl SimTime {
    pub fn new() -> Self {
        SimTime {
            micros: Arc::default(),
            anchor: Instant::now(),
        }
    }

    /// Now, in µs since the seed began.
    pub fn now(&self) -> u64 {
        self.micros.load(Ordering::SeqCst)
    }

    /// Moves time on to `micros` (never back).
    pub fn set(&self, micros: u64) {
        self.micros.fetch_max(micros, Ordering::SeqCst);
    }
}

/// A clock on simulated time, running at `rate_ppm` millionths of its
/// speed (a worker's clock drifts; the database's does not).
pub struct SimClock {
    time: SimTime,
    rate_ppm: u64,
}

/// Where every seed's calendar starts: 2030-01-01T00:00:00Z.
const START_SECONDS: i64 = 1_893_456_000;

impl SimClock {
    pub fn new(time: SimTime, rate_ppm: u64) -> Self {
        SimClock { time, rate_ppm }
    }
}

impl Clock for SimClock {
    fn now(&self) -> DateTime<Utc> {
        let start = DateTime::from_timestamp(START_SECONDS, 0).unwrap_or_default();
        start + TimeDelta::microseconds(self.time.now() as i64)
    }

    fn instant(&self) -> Instant {
        let micros = u128::from(self.time.now()) * u128::from(self.rate_ppm) / 1_000_000;
        self.time.anchor + Duration::from_micros(micros as u64)
    }

    /// Hands the baton back until simulated time has moved on by
    /// `duration`.
    fn sleep(&self, duration: Duration) {
        let until = self.time.now() + duration.as_micros() as u64;
        baton::pause_at(Point::Sleep(until));
    }
}
