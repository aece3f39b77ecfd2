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
use std::time::Instant;

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
    closed: bool,
}

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
        let earliest = state.alarms.keys().next().is_none_or(|first| key < *first);
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
        } else if earliest {
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
    loop {
        if state.closed {
            return;
        }
        let now = Instant::now();
        let Some((&key, _)) = state.alarms.first_key_value() else {
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            continue;
        };
        if key.0 > now {
            state = wait_timeout(&shared.state, &shared.changed, state, key.0 - now);
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
