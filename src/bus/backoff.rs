//! Capped exponential backoff with jitter, for reconnecting to a broker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::BusError;

/// How long to wait before the n-th attempt to reconnect: `initial`
/// doubled each attempt, capped at `max`, then a random share of it (full
/// jitter above half the delay) so that many clients dropped at once do
/// not come back at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The delay before attempt `attempt` (0 for the first), given a
    /// `jitter` drawn uniformly from [0, 1): between half the capped
    /// exponential delay and all of it.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        let capped = self.initial.saturating_mul(factor).min(self.max);
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        capped.mul_f64(0.5 + jitter / 2.0)
    }

    /// The delay before attempt `attempt`, with a jitter from the system's
    /// randomness.
    pub fn delay_jittered(&self, attempt: u32) -> Duration {
        let bits = uuid::Uuid::new_v4().as_u64_pair().0 >> 11;
        self.delay(attempt, bits as f64 / (1u64 << 53) as f64)
    }
}

/// Sleeps for `duration`, waking early (and returning `false`) once `stop`
/// is raised.
pub(crate) fn sleep_unless_stopped(duration: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + duration;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

/// Waits out a passing failure of `who` (`intake`, `publish`): sleeps as
/// `backoff` says for the `failures`-th failure in a row, and, when the
/// connection was lost, reconnects — again and again, backing off further,
/// until it works or `stop` is raised. Returns whether it reconnected.
///
/// # Errors
/// `error` itself when it is not passing; a reconnection's error that is
/// not.
pub(crate) fn wait_out(
    who: &str,
    error: BusError,
    backoff: &Backoff,
    failures: &mut u32,
    stop: &AtomicBool,
    reconnect: &mut dyn FnMut() -> Result<(), BusError>,
) -> Result<bool, BusError> {
    if !error.is_transient() {
        return Err(error);
    }
    eprintln!("job-executor {who}: {error}; trying again");
    let mut error = error;
    loop {
        let delay = backoff.delay_jittered(*failures);
        *failures = failures.saturating_add(1);
        if !sleep_unless_stopped(delay, stop) || !error.needs_reconnect() {
            return Ok(false);
        }
        match reconnect() {
            Ok(()) => return Ok(true),
            Err(e) if e.is_transient() => error = e,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_jitters_within_half() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        assert_eq!(backoff.delay(0, 1.0), Duration::from_millis(100));
        assert_eq!(backoff.delay(0, 0.0), Duration::from_millis(50));
        assert_eq!(backoff.delay(2, 0.0), Duration::from_millis(200));
        assert_eq!(backoff.delay(4, 1.0), Duration::from_secs(1));
        assert_eq!(backoff.delay(u32::MAX, 0.0), Duration::from_millis(500));
        assert_eq!(backoff.delay(3, f64::NAN), Duration::from_millis(400));
        for attempt in 0..40 {
            let delay = backoff.delay_jittered(attempt);
            assert!(delay <= backoff.max, "{delay:?} at attempt {attempt}");
        }
    }

    #[test]
    fn a_raised_stop_cuts_the_sleep_short() {
        let stop = AtomicBool::new(true);
        let started = Instant::now();
        assert!(!sleep_unless_stopped(Duration::from_secs(10), &stop));
        assert!(started.elapsed() < Duration::from_secs(1));
        stop.store(false, Ordering::Relaxed);
        assert!(sleep_unless_stopped(Duration::from_millis(1), &stop));
    }
}
