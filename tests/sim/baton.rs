//! The baton: every actor of the simulation (a worker's slot, its lease
//! renewer, the canceller) is a real thread running the engine's real
//! code, but only one of them runs at a time — the one the scheduler has
//! handed the baton to. An actor hands it back at every point where the
//! outside world could come between two of its actions: each call to the
//! store (`Point::Call`) and each wait on its clock (`Point::Sleep`). It
//! also hands it back, without stopping, once it is about to wait for a
//! step's handler (`Report::OnHandler`): from there it only folds what it
//! appended into its own run and blocks, touching nothing shared, until
//! the scheduler settles the step. So what happens between two reports is
//! decided by the scheduler alone: the same seed gives the same run.

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::thread::JoinHandle;
use std::time::Duration;

use job_executor::store::Fence;
use uuid::Uuid;

/// An actor, by its number in the seed (in the order they were started).
pub type ActorId = usize;

/// Where an actor handed the baton back.
#[derive(Clone, Debug)]
pub enum Point {
    /// Just started, before doing anything.
    Start,
    /// Waiting on its clock until this simulated time (µs).
    Sleep(u64),
    /// About to make a call to the store.
    Call(Call),
}

/// A call to the store, as the scheduler sees it before it is made.
#[derive(Clone, Debug)]
pub enum Call {
    /// An append to `job` from `seq` on, of these kinds, under this fence.
    Append {
        job: Uuid,
        seq: u64,
        kinds: Vec<String>,
        fence: Option<Fence>,
    },
    /// A claim of a job from the queue.
    Claim,
    /// A renewal of the leases of these fences.
    Renew(Vec<Fence>),
    /// A claim given up.
    Release(Fence, bool),
    /// A read (of one job, when it names one).
    Read(&'static str, Option<Uuid>),
}

/// What the scheduler has a resumed actor's store call come to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Made as asked.
    None,
    /// Not made: the database is busy (or, for a renewal, the network
    /// dropped it). Nothing is written.
    Busy,
    /// Made, but the answer is lost: the caller is told the outcome is
    /// unknown (an append) or that the database could not be reached.
    LoseAnswer,
    /// Not made, and the caller is told the outcome is unknown.
    Unknown,
    /// Made; then the actor's process crashes before the answer reaches
    /// it. `hook`: whether the append's commit hook (which starts a step's
    /// handler) ran before the crash.
    CrashAfter { hook: bool },
}

/// What the scheduler tells an actor it resumes.
pub enum Go {
    /// Go on, with the call (if any) coming to this.
    Run(Fault),
    /// The actor's process crashed: unwind and end.
    Die,
}

/// What an actor tells the scheduler.
pub enum Report {
    /// It handed the baton back at this point, and waits to be resumed.
    At(ActorId, Point),
    /// It is about to wait for the handler of the step it just started.
    OnHandler(ActorId),
    /// It ended; with a message when it panicked (a crash is no panic).
    Exited(ActorId, Option<String>),
}

/// The panic payload an actor unwinds with when its process crashes.
struct Crashed;

/// An actor's side of the baton.
struct Link {
    id: ActorId,
    go: Receiver<Go>,
    reports: Sender<Report>,
}

thread_local! {
    static LINK: RefCell<Option<Link>> = const { RefCell::new(None) };
}

/// The actor running on this thread; `None` on the scheduler's.
pub fn current() -> Option<ActorId> {
    LINK.with(|link| link.borrow().as_ref().map(|l| l.id))
}

/// Hands the baton back at `point` and waits to be resumed; what the
/// scheduler has the call come to. Off an actor's thread (the scheduler's
/// own calls) it returns at once. Unwinds when the process crashed.
pub fn pause_at(point: Point) -> Fault {
    let go = LINK.with(|link| {
        let link = link.borrow();
        let link = link.as_ref()?;
        if link.reports.send(Report::At(link.id, point)).is_err() {
            return Some(Go::Die);
        }
        Some(link.go.recv().unwrap_or(Go::Die))
    });
    match go {
        None => Fault::None,
        Some(Go::Run(fault)) => fault,
        Some(Go::Die) => crash(),
    }
}

/// Tells the scheduler this actor is about to wait for a step's handler.
pub fn on_handler() {
    LINK.with(|link| {
        if let Some(link) = link.borrow().as_ref() {
            let _ = link.reports.send(Report::OnHandler(link.id));
        }
    });
}

/// Ends this actor as its process's crash does: unwinding, without the
/// panic hook printing anything.
pub fn crash() -> ! {
    resume_unwind(Box::new(Crashed))
}

/// An actor's state, as the scheduler keeps it.
#[derive(Clone, Debug)]
pub enum State {
    /// Waiting at this point for the baton.
    At(Point),
    /// Waiting for its step's handler.
    OnHandler,
    /// Holding the baton.
    Running,
    /// Ended.
    Gone,
}

/// An actor, as the scheduler keeps it.
pub struct Actor {
    pub state: State,
    /// The process it belongs to.
    pub process: usize,
    go: Sender<Go>,
    thread: Option<JoinHandle<()>>,
}

/// Why a seed could not go on: an actor did not hand the baton back in
/// time (the engine hung), or could not be started.
#[derive(Debug)]
pub struct Broken(pub String);

/// How long an actor may hold the baton, in real time, before the run is
/// declared hung. Far beyond any one step of the engine's.
const HOLD_MAX: Duration = Duration::from_secs(60);

/// The scheduler's side: every actor of a seed, and their reports.
pub struct Baton {
    pub actors: Vec<Actor>,
    reports: Receiver<Report>,
    sender: Sender<Report>,
    /// Panics of actors (bugs, not crashes), as messages.
    pub panics: Vec<String>,
}

impl Baton {
    pub fn new() -> Self {
        let (sender, reports) = channel();
        Baton {
            actors: Vec::new(),
            reports,
            sender,
            panics: Vec::new(),
        }
    }

    /// Starts an actor of `process` running `body`, and waits for it to
    /// hand the baton back before it does anything.
    pub fn spawn(
        &mut self,
        process: usize,
        body: impl FnOnce() + Send + 'static,
    ) -> Result<ActorId, Broken> {
        let id = self.actors.len();
        let (go, receiver) = channel();
        let reports = self.sender.clone();
        let thread = std::thread::Builder::new()
            .name(format!("sim-actor-{id}"))
            .spawn(move || run_actor(id, receiver, reports, body))
            .map_err(|e| Broken(format!("cannot start actor {id}'s thread: {e}")))?;
        self.actors.push(Actor {
            state: State::Running,
            process,
            go,
            thread: Some(thread),
        });
        self.wait(id)?;
        Ok(id)
    }

    /// Resumes `id` (waiting at a point) with `go`, and waits until it
    /// hands the baton back.
    pub fn resume(&mut self, id: ActorId, go: Go) -> Result<(), Broken> {
        let actor = &mut self.actors[id];
        actor.state = State::Running;
        if actor.go.send(go).is_err() {
            actor.state = State::Gone;
            return Ok(());
        }
        self.wait(id)
    }

    /// Waits until `id`, which runs, hands the baton back: it stopped at
    /// a point, waits for a handler, or ended.
    pub fn wait(&mut self, id: ActorId) -> Result<(), Broken> {
        if matches!(self.actors[id].state, State::Gone) {
            return Ok(());
        }
        self.actors[id].state = State::Running;
        while matches!(self.actors[id].state, State::Running) {
            let report = match self.reports.recv_timeout(HOLD_MAX) {
                Ok(report) => report,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    return Err(Broken(format!(
                        "actor {id} kept the baton for {} s of real time: the engine hung",
                        HOLD_MAX.as_secs()
                    )));
                }
            };
            match report {
                Report::At(from, point) => self.actors[from].state = State::At(point),
                Report::OnHandler(from) => self.actors[from].state = State::OnHandler,
                Report::Exited(from, panic) => {
                    self.actors[from].state = State::Gone;
                    if let Some(thread) = self.actors[from].thread.take() {
                        let _ = thread.join();
                    }
                    self.panics
                        .extend(panic.map(|m| format!("actor {from} panicked: {m}")));
                }
            }
        }
        Ok(())
    }
}

/// An actor's thread: waits for the baton, runs `body`, reports its end.
fn run_actor(id: ActorId, go: Receiver<Go>, reports: Sender<Report>, body: impl FnOnce()) {
    let exit = reports.clone();
    LINK.with(|link| *link.borrow_mut() = Some(Link { id, go, reports }));
    let ran = catch_unwind(AssertUnwindSafe(|| {
        pause_at(Point::Start);
        body();
    }));
    let panic = match ran {
        Ok(()) => None,
        Err(payload) if payload.is::<Crashed>() => None,
        Err(payload) => Some(
            payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(a panic without a message)".to_owned()),
        ),
    };
    LINK.with(|link| link.borrow_mut().take());
    let _ = exit.send(Report::Exited(id, panic));
}
