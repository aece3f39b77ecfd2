//! Time and job ids, injected so that an embedding can make execution
//! deterministic: the same plan, clock and ids give the same log, byte for byte.
//!
//! A clock also measures spans (a lease, a renewal period, a poll, a pause
//! before a retry) and waits: a simulation drives those with its own time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use uuid::Uuid;

use crate::model::JobStep;

/// A source of the times recorded on events, of the instants spans are
/// measured from, and of waiting.
pub trait Clock: Send + Sync {
    /// The current time. The executor truncates it to whole microseconds,
    /// the precision the log stores.
    fn now(&self) -> DateTime<Utc>;

    /// A reading of a monotonic clock, which spans are measured from: how
    /// long a worker trusts its lease, when it renews. The default is the
    /// process's monotonic clock ([`Instant::now`]), whatever
    /// [`now`](Self::now) reads: a clock that stamps events with logical
    /// times still times leases for real.
    fn instant(&self) -> Instant {
        Instant::now()
    }

    /// Waits `duration` of this clock's time: an idle worker's poll, a
    /// pause before an append is tried again. The default sleeps the
    /// thread.
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration);
    }
}

/// Wall-clock time.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that starts at a fixed instant and advances one tick per reading.
///
/// ```
/// use job_executor::clock::{Clock, LogicalClock};
/// let clock = LogicalClock::default();
/// let a = clock.now();
/// assert_eq!(clock.now() - a, chrono::TimeDelta::milliseconds(1));
/// ```
#[derive(Debug)]
pub struct LogicalClock {
    start: DateTime<Utc>,
    tick_micros: u64,
    readings: AtomicU64,
}

impl LogicalClock {
    /// The instant [`LogicalClock::default`] starts at: 2000-01-01T00:00:00Z.
    pub const EPOCH_SECONDS: i64 = 946_684_800;

    /// A clock reading `start`, then `start + tick`, `start + 2·tick`, ….
    pub fn new(start: DateTime<Utc>, tick: TimeDelta) -> Self {
        LogicalClock {
            start,
            tick_micros: tick.num_microseconds().unwrap_or(1).max(1) as u64,
            readings: AtomicU64::new(0),
        }
    }
}

impl Default for LogicalClock {
    /// Starts at 2000-01-01T00:00:00Z and ticks one millisecond per reading.
    fn default() -> Self {
        let start = DateTime::from_timestamp(Self::EPOCH_SECONDS, 0).unwrap_or_default();
        LogicalClock::new(start, TimeDelta::milliseconds(1))
    }
}

impl Clock for LogicalClock {
    fn now(&self) -> DateTime<Utc> {
        let n = self.readings.fetch_add(1, Ordering::Relaxed);
        let micros = n.saturating_mul(self.tick_micros).min(i64::MAX as u64) as i64;
        // Far past the end of time, the clock stays at the last instant it
        // can tell rather than panicking.
        self.start
            .checked_add_signed(TimeDelta::microseconds(micros))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}

/// Namespace of the job ids derived by [`derived_job_id`].
pub const JOB_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a6f_622d_6578_6563_7574_6f72_2d69_6473);

/// A job id derived from the contract and the plan (UUID v5), so that a
/// deterministic run of the same plan always names the same job.
pub fn derived_job_id(contract_id: Uuid, steps: &[JobStep]) -> Uuid {
    let mut name = contract_id.as_bytes().to_vec();
    // Serialising plain plan data to JSON cannot fail.
    name.extend(serde_json::to_vec(steps).unwrap_or_default());
    Uuid::new_v5(&JOB_ID_NAMESPACE, &name)
}
