//! The `command` step type: runs a program directly (no shell) as one step.
//!
//! ```json
//! {"step_index": 0, "step_type": "command", "target": "db",
//!  "parameters": {"argv": ["pg_dump", "-f", "/backups/db.sql"], "cwd": "/srv", "env": {"PGUSER": "ops"}},
//!  "timeout_seconds": 600}
//! ```
//!
//! The program runs in a process group of its own, with stdin closed. A
//! non-zero exit fails the step. At the step's deadline (or when its cancel
//! signal is raised) the whole group is killed; when the program exits, what
//! is left of its group is killed too, so a step never outlives itself. The
//! output records the exit code (or signal) and stdout and stderr, each kept
//! up to [`OUTPUT_BYTES_MAX`] with a `truncated` flag.
//!
//! The order is what makes the kill safe: the program's exit is detected
//! without reaping it (`waitid` with `WNOWAIT`), its group is killed while
//! its process id — which names the group — still belongs to it, and only
//! then is it reaped; no signal can reach a process that reused the id. The
//! child is always reaped (no zombie), and system calls a signal interrupts
//! are retried. A process that leaves the group (`setsid`) is beyond the
//! step's reach; its hold on the output pipes is given up after a second.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

use serde_json::{Map, Value, json};

use crate::handler::StepHandler;
use crate::model::{ExecutionContext, JobStep, StepOutput};

/// Bytes kept of each of stdout and stderr.
pub const OUTPUT_BYTES_MAX: usize = 64 * 1024;

/// How often a waiting step looks at its cancel signal.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// Runs `parameters.argv` as a child process. See the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct CommandHandler;

/// The parsed parameters of a `command` step.
struct Invocation {
    argv: Vec<String>,
    cwd: Option<String>,
    env: Vec<(String, String)>,
}

fn parse(parameters: &Value) -> Result<Invocation, String> {
    let object = parameters
        .as_object()
        .ok_or("command: parameters must be an object")?;
    if let Some(key) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "argv" | "cwd" | "env"))
    {
        return Err(format!(
            "command: unknown parameter {key:?} (expected argv, cwd, env)"
        ));
    }
    let argv: Vec<String> = match object.get("argv") {
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or("command: parameters.argv must be a non-empty array of strings")?,
        _ => return Err("command: parameters.argv must be a non-empty array of strings".into()),
    };
    let cwd = match object.get("cwd") {
        None => None,
        Some(Value::String(cwd)) => Some(cwd.clone()),
        Some(_) => return Err("command: parameters.cwd must be a string".into()),
    };
    let env = match object.get("env") {
        None => Vec::new(),
        Some(Value::Object(vars)) => vars
            .iter()
            .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_owned())))
            .collect::<Option<_>>()
            .ok_or("command: parameters.env must map names to strings")?,
        Some(_) => return Err("command: parameters.env must be an object".into()),
    };
    Ok(Invocation { argv, cwd, env })
}

/// Reads a pipe to its end, keeping the first `OUTPUT_BYTES_MAX` bytes, and
/// sends what it kept when the pipe closes.
fn capture(mut pipe: impl Read + Send + 'static) -> mpsc::Receiver<Captured> {
    let (done, captured) = mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut truncated = false;
        let mut buffer = [0u8; 8192];
        loop {
            match pipe.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => {
                    let room = OUTPUT_BYTES_MAX - kept.len();
                    kept.extend_from_slice(&buffer[..n.min(room)]);
                    // Keep draining, so the child never blocks on a full pipe.
                    truncated |= n > room;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = done.send(Captured { kept, truncated });
    });
    captured
}

/// What a pipe's reader kept.
#[derive(Default)]
struct Captured {
    kept: Vec<u8>,
    truncated: bool,
}

/// How long, once the program's group is gone, its output may take to
/// drain: a process that left the group (`setsid`) can hold the pipes open
/// forever, and must not hold the step.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Retries a system call that a signal interrupted.
fn retrying<T>(mut call: impl FnMut() -> nix::Result<T>) -> nix::Result<T> {
    loop {
        match call() {
            Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// Kills every process of the group the child leads. Only ever called
/// while the child is not yet reaped: its process id, and so the group's,
/// cannot have been given to another process.
fn kill_group(pid: Pid) {
    // An already-empty group yields ESRCH, which is fine.
    let _ = killpg(pid, Signal::SIGKILL);
}

/// A started program and the threads that watch it.
struct Running {
    pid: Pid,
    stdout: Option<mpsc::Receiver<Captured>>,
    stderr: Option<mpsc::Receiver<Captured>>,
    /// Told once the child has exited — detected without reaping it.
    exited: mpsc::Receiver<nix::Result<()>>,
}

impl Running {
    fn start(invocation: Invocation) -> Result<Running, String> {
        let mut command = Command::new(&invocation.argv[0]);
        command
            .args(&invocation.argv[1..])
            .envs(invocation.env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(cwd) = &invocation.cwd {
            command.current_dir(cwd);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("command: cannot run {:?}: {e}", invocation.argv[0]))?;
        let pid = Pid::from_raw(
            child
                .id()
                .try_into()
                .map_err(|_| "command: process id out of range")?,
        );
        let stdout = child.stdout.take().map(capture);
        let stderr = child.stderr.take().map(capture);
        // `child` is dropped without `wait`: the child is reaped below, only
        // after its group has been killed.
        let (notify, exited) = mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
            let _ = notify.send(retrying(|| waitid(Id::Pid(pid), flags)).map(|_| ()));
        });
        Ok(Running {
            pid,
            stdout,
            stderr,
            exited,
        })
    }

    /// Waits for the program to exit, killing its group at the step's
    /// deadline or when its cancel signal is raised. Returns why it was
    /// stopped, if it was.
    fn supervise(
        &self,
        step: &JobStep,
        context: &ExecutionContext,
    ) -> Result<Option<String>, String> {
        let mut stopped = None;
        loop {
            let wait = match context.deadline {
                Some(deadline) => {
                    CANCEL_POLL.min(deadline.saturating_duration_since(Instant::now()))
                }
                None => CANCEL_POLL,
            };
            match self.exited.recv_timeout(wait) {
                Ok(Ok(())) => return Ok(stopped),
                Ok(Err(e)) => return Err(format!("command: waiting for the program: {e}")),
                Err(RecvTimeoutError::Timeout) => {
                    let past_deadline = context.deadline.is_some_and(|d| Instant::now() >= d);
                    if stopped.is_none() && (past_deadline || context.cancel.is_cancelled()) {
                        stopped = Some(if past_deadline {
                            format!("timed out after {} s", step.timeout_seconds)
                        } else {
                            "cancelled".to_owned()
                        });
                        kill_group(self.pid);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err("command: lost track of the child process".to_owned());
                }
            }
        }
    }

    /// Kills what is left of the program's group (the child has exited but
    /// is not reaped, so the group id is still its own), then reaps the
    /// child and collects its output.
    fn finish(self) -> (nix::Result<WaitStatus>, Captured, Captured) {
        kill_group(self.pid);
        let status = retrying(|| waitpid(self.pid, None));
        let drain = |pipe: Option<mpsc::Receiver<Captured>>| {
            pipe.and_then(|p| p.recv_timeout(DRAIN_GRACE).ok())
                .unwrap_or_default()
        };
        (status, drain(self.stdout), drain(self.stderr))
    }
}

impl StepHandler for CommandHandler {
    fn execute(&self, step: &JobStep, context: &ExecutionContext) -> StepOutput {
        let running = match parse(&step.parameters).and_then(Running::start) {
            Ok(running) => running,
            Err(error) => return StepOutput::failed(error),
        };
        let stopped = running.supervise(step, context);
        let (status, stdout, stderr) = running.finish();
        let stopped = match stopped {
            Ok(stopped) => stopped,
            Err(error) => return StepOutput::failed(error),
        };
        let (exit_code, signal) = match status {
            Ok(WaitStatus::Exited(_, code)) => (Some(code), None),
            Ok(WaitStatus::Signaled(_, signal, _)) => (None, Some(signal as i32)),
            Ok(other) => {
                return StepOutput::failed(format!("command: unexpected status {other:?}"));
            }
            Err(e) => return StepOutput::failed(format!("command: reaping the program: {e}")),
        };
        let mut output = Map::new();
        output.insert("exit_code".into(), json!(exit_code));
        output.insert("signal".into(), json!(signal));
        output.insert(
            "stdout".into(),
            json!(String::from_utf8_lossy(&stdout.kept)),
        );
        output.insert("stdout_truncated".into(), json!(stdout.truncated));
        output.insert(
            "stderr".into(),
            json!(String::from_utf8_lossy(&stderr.kept)),
        );
        output.insert("stderr_truncated".into(), json!(stderr.truncated));
        let output = Value::Object(output);
        match stopped.or_else(|| describe_failure(exit_code, signal)) {
            Some(error) => StepOutput {
                success: false,
                output,
                error: Some(error),
            },
            None => StepOutput::succeeded(output),
        }
    }
}

fn describe_failure(exit_code: Option<i32>, signal: Option<i32>) -> Option<String> {
    match (exit_code, signal) {
        (Some(0), _) => None,
        (Some(code), _) => Some(format!("command exited with status {code}")),
        (None, Some(signal)) => Some(format!("command killed by signal {signal}")),
        (None, None) => Some("command ended without a status".to_owned()),
    }
}
