//! Deadlines for code the executor calls but cannot interrupt.
//!
//! A health observer is borrowed for the length of a call (`&dyn
//! HealthObserver`), so it can only run on the executor's own thread, and
//! nothing can stop it. What the executor can do is make sure a hung
//! observer never holds its job: before the call it arms an alarm whose
//! action records what must be recorded anyway (the step's outcome, without
//! health); if the call is not back by the deadline, one timer thread runs
//! the action. When the call returns, disarming tells whether the action
//! ran — then the executor stops — or never will.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::StoreError;
use crate::sync::{Condvar, Mutex, lock, thread, wait_timeout};

/// What an alarm does when it goes off; its result is kept for the caller.
pub(crate) type Action = Box<dyn FnOnce() -> Result<(), StoreError> + Send>;

/// One timer thread for every alarm of an executor, started on first use.
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    alarms: BTreeMap<(Instant, u64), Arc<Alarm>>,
    next_id: u64,
    timer_running: bool,
    /// When the timer thread wakes next on its own (`None`: not until told).
    /// An alarm due later needs no wake-up: arming one costs no thread
    /// switch, which matters at one alarm per step.
    timer_wakes_at: Option<Instant>,
    closed: bool,
}

/// While alarms come and go, the timer looks at them this often, so that
/// arming one never has to wake it (deadlines are a second or more away).
const TICK: Duration = Duration::from_millis(100);

/// After this long without an alarm, the timer sleeps until the next one.
const IDLE_AFTER: Duration = Duration::from_secs(10);

/// An armed alarm's action, until it fires or is disarmed. The timer runs
/// the action with this lock held, so disarming waits for a running action
/// to finish.
struct Alarm(Mutex<AlarmState>);

enum AlarmState {
    Armed(Action),
    Fired(Result<(), StoreError>),
    Disarmed,
}

/// An armed alarm, to be disarmed when the watched call returns.
pub(crate) struct Armed<'w> {
    watchdog: &'w Watchdog,
    key: (Instant, u64),
    alarm: Arc<Alarm>,
}

impl Watchdog {
    pub(crate) fn new() -> Self {
        Watchdog {
            shared: Arc::new(Shared::default()),
        }
    }

    /// Arms an alarm that runs `action` at `deadline`, unless disarmed first.
    pub(crate) fn arm(&self, deadline: Instant, action: Action) -> Armed<'_> {
        let alarm = Arc::new(Alarm(Mutex::new(AlarmState::Armed(action))));
        let mut state = lock(&self.shared.state);
        let key = (deadline, state.next_id);
        state.next_id += 1;
        let wake = state.timer_wakes_at.is_none_or(|at| deadline < at);
        state.alarms.insert(key, alarm.clone());
        if !state.timer_running {
            state.timer_running = true;
            let shared = self.shared.clone();
            let spawned = thread::Builder::new()
                .name("job-executor-watchdog".into())
                .spawn(move || timer(&shared));
            if let Err(e) = spawned {
                // The call then runs without a deadline, as it would have
                // before there was one: say so once, and try again next time.
                state.timer_running = false;
                eprintln!("job-executor: cannot start the watchdog thread: {e}");
            }
        } else if wake {
            self.shared.changed.notify_one();
        }
        Armed {
            watchdog: self,
            key,
            alarm,
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        lock(&self.shared.state).closed = true;
        self.shared.changed.notify_one();
    }
}

impl Armed<'_> {
    /// Disarms the alarm. `None` when its action never ran (nor will);
    /// otherwise what the action returned, once it has finished.
    pub(crate) fn disarm(self) -> Option<Result<(), StoreError>> {
        lock(&self.watchdog.shared.state).alarms.remove(&self.key);
        let mut alarm = lock(&self.alarm.0);
        match std::mem::replace(&mut *alarm, AlarmState::Disarmed) {
            AlarmState::Fired(result) => Some(result),
            AlarmState::Armed(_) | AlarmState::Disarmed => None,
        }
    }
}

fn timer(shared: &Shared) {
    let mut state = lock(&shared.state);
    let mut last_alarm = Instant::now();
    loop {
        if state.closed {
            return;
        }
        let now = Instant::now();
        let Some((&key, _)) = state.alarms.first_key_value() else {
            if now.duration_since(last_alarm) > IDLE_AFTER {
                state.timer_wakes_at = None;
                state = shared
                    .changed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            } else {
                state.timer_wakes_at = Some(now + TICK);
                state = wait_timeout(&shared.state, &shared.changed, state, TICK);
            }
            continue;
        };
        last_alarm = now;
        if key.0 > now {
            let sleep = (key.0 - now).min(TICK);
            state.timer_wakes_at = Some(now + sleep);
            state = wait_timeout(&shared.state, &shared.changed, state, sleep);
            continue;
        }
        let Some(alarm) = state.alarms.remove(&key) else {
            continue;
        };
        drop(state);
        let mut armed = lock(&alarm.0);
        if let AlarmState::Armed(action) = std::mem::replace(&mut *armed, AlarmState::Disarmed) {
            *armed = AlarmState::Fired(action());
        }
        drop(armed);
        state = lock(&shared.state);
    }
}

#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_alarm_fires_only_past_its_deadline_and_only_once() {
        let watchdog = Watchdog::new();
        let fired = Arc::new(AtomicUsize::new(0));
        let action = |fired: &Arc<AtomicUsize>| -> Action {
            let fired = fired.clone();
            Box::new(move || {
                fired.fetch_add(1, Ordering::SeqCst);
                Ok(())
            })
        };
        // Disarmed in time: never runs.
        let early = watchdog.arm(Instant::now() + Duration::from_secs(60), action(&fired));
        assert!(early.disarm().is_none());
        // Past its deadline: runs, and disarming reports it.
        let late = watchdog.arm(Instant::now() + Duration::from_millis(20), action(&fired));
        std::thread::sleep(Duration::from_millis(200));
        assert!(matches!(late.disarm(), Some(Ok(()))));
        // An earlier deadline armed after a later one still fires first.
        let far = watchdog.arm(Instant::now() + Duration::from_secs(60), action(&fired));
        let near = watchdog.arm(Instant::now() + Duration::from_millis(10), action(&fired));
        std::thread::sleep(Duration::from_millis(200));
        assert!(matches!(near.disarm(), Some(Ok(()))));
        assert!(far.disarm().is_none());
        assert_eq!(fired.load(Ordering::SeqCst), 2);
    }
}
