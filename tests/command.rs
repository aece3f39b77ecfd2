//! The `command` handler's process handling: the child is always reaped, its
//! group is killed before that (never after, when its id could be reused),
//! and system calls interrupted by signals are retried. Alone in its test
//! binary: one test installs a signal handler for the whole process.

use std::time::{Duration, Instant};

use job_executor::command::CommandHandler;
use job_executor::{ExecutionContext, JobStep, StepHandler, StepOutput};
use serde_json::json;
use uuid::Uuid;

fn run(argv: &[&str], timeout_seconds: u64) -> StepOutput {
    let mut step = JobStep::new(0, "command", "t");
    step.parameters = json!({ "argv": argv });
    step.timeout_seconds = timeout_seconds;
    let mut context =
        ExecutionContext::new(Uuid::nil(), Uuid::nil(), &step, "t", chrono::Utc::now());
    context.deadline = Instant::now().checked_add(Duration::from_secs(timeout_seconds));
    CommandHandler.execute(&step, &context)
}

/// The pids a script printed, one per line.
fn pids(out: &StepOutput) -> Vec<u32> {
    out.output["stdout"]
        .as_str()
        .unwrap()
        .lines()
        .map(|line| line.trim().parse().unwrap())
        .collect()
}

/// Whether `pid` is a live process, or a zombie this process must reap.
fn lingers(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // After the command's name in parentheses: state, then parent pid.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next().unwrap();
    let parent: u32 = fields.next().unwrap().parse().unwrap();
    state != "Z" || parent == std::process::id()
}

fn assert_gone(pids: &[u32]) {
    // A killed grandchild is reaped by init, which may take a moment.
    let give_up = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|&p| lingers(p)) && Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pid in pids {
        assert!(!lingers(pid), "process {pid} is still there");
    }
}

#[test]
fn a_finished_command_leaves_no_zombie_and_nothing_of_its_group() {
    let out = run(&["sh", "-c", "echo $$; sleep 300 & echo $!"], 30);
    assert!(out.success, "{:?}", out.error);
    let pids = pids(&out);
    assert_eq!(pids.len(), 2);
    assert_gone(&pids);
}

#[test]
fn a_command_past_its_deadline_is_killed_with_its_group_and_reaped() {
    let started = Instant::now();
    let out = run(&["sh", "-c", "echo $$; sleep 300 & echo $!; sleep 300"], 1);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.error.as_deref(), Some("timed out after 1 s"));
    let pids = pids(&out);
    assert_eq!(pids.len(), 2);
    assert_gone(&pids);
}

#[test]
fn a_process_that_leaves_the_group_cannot_hold_the_step() {
    // setsid puts the sleeper in a session of its own, with the output pipe
    // still open: the step ends anyway, within the drain grace.
    let started = Instant::now();
    let out = run(&["sh", "-c", "setsid sleep 5 & echo started"], 30);
    assert!(out.success, "{:?}", out.error);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

extern "C" fn ignore(_: libc::c_int) {}

/// Sends SIGUSR1 to every thread of this process, again and again, until
/// `until`: whatever system call a thread is in gets interrupted.
fn pester(until: Instant) {
    while Instant::now() < until {
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let Ok(tid) = task.file_name().to_string_lossy().parse::<libc::pid_t>() else {
                continue;
            };
            // SAFETY: tgkill takes plain integers; a thread that is gone
            // yields ESRCH.
            unsafe {
                libc::syscall(libc::SYS_tgkill, std::process::id(), tid, libc::SIGUSR1);
            }
        }
        std::thread::sleep(Duration::from_micros(300));
    }
}

#[test]
fn system_calls_interrupted_by_signals_are_retried() {
    // A handler installed without SA_RESTART: blocking calls fail with EINTR
    // whenever the signal arrives.
    // SAFETY: the handler does nothing, which is async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        action.sa_flags = 0;
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()),
            0
        );
    }
    for _ in 0..5 {
        let until = Instant::now() + Duration::from_millis(700);
        let pestering = std::thread::spawn(move || pester(until));
        let out = run(&["sh", "-c", "sleep 0.3; echo done; echo $$"], 30);
        pestering.join().unwrap();
        assert!(out.success, "{:?} {}", out.error, out.output);
        let stdout = out.output["stdout"].as_str().unwrap();
        assert!(stdout.starts_with("done\n"), "{stdout:?}");
        let shell: u32 = stdout.lines().nth(1).unwrap().parse().unwrap();
        assert_gone(&[shell]);
    }
}
