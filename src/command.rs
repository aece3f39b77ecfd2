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

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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

/// Reads a pipe to its end, keeping the first `OUTPUT_BYTES_MAX` bytes.
fn capture(mut pipe: impl Read + Send + 'static) -> JoinHandle<(Vec<u8>, bool)> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut truncated = false;
        let mut buffer = [0u8; 8192];
        loop {
            match pipe.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = OUTPUT_BYTES_MAX - kept.len();
                    kept.extend_from_slice(&buffer[..n.min(room)]);
                    // Keep draining, so the child never blocks on a full pipe.
                    truncated |= n > room;
                }
            }
        }
        (kept, truncated)
    })
}

fn kill_group(pid: u32) {
    // The child leads its own group (process_group(0)), so -pid names it.
    // SAFETY: kill(2) takes plain integers and has no memory effects; an
    // already-empty group yields ESRCH, which is fine.
    unsafe {
        libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
    }
}

impl StepHandler for CommandHandler {
    fn execute(&self, step: &JobStep, context: &ExecutionContext) -> StepOutput {
        let invocation = match parse(&step.parameters) {
            Ok(invocation) => invocation,
            Err(error) => return StepOutput::failed(error),
        };
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
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                return StepOutput::failed(format!(
                    "command: cannot run {:?}: {e}",
                    invocation.argv[0]
                ));
            }
        };
        let pid = child.id();
        let stdout = child.stdout.take().map(capture);
        let stderr = child.stderr.take().map(capture);
        let (exited, exit) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = exited.send(child.wait());
        });
        let mut stopped = None;
        let status = loop {
            let wait = match context.deadline {
                Some(deadline) => {
                    CANCEL_POLL.min(deadline.saturating_duration_since(Instant::now()))
                }
                None => CANCEL_POLL,
            };
            match exit.recv_timeout(wait) {
                Ok(status) => break status,
                Err(RecvTimeoutError::Timeout) => {
                    let past_deadline = context.deadline.is_some_and(|d| Instant::now() >= d);
                    if stopped.is_none() && (past_deadline || context.cancel.is_cancelled()) {
                        stopped = Some(if past_deadline {
                            format!("timed out after {} s", step.timeout_seconds)
                        } else {
                            "cancelled".to_owned()
                        });
                        kill_group(pid);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    break Err(std::io::Error::other("lost track of the child process"));
                }
            }
        };
        // Whatever the program left running in its group goes with it.
        kill_group(pid);
        let (stdout, stdout_truncated) = stdout.map_or_else(Default::default, join_capture);
        let (stderr, stderr_truncated) = stderr.map_or_else(Default::default, join_capture);
        let status = match status {
            Ok(status) => status,
            Err(e) => return StepOutput::failed(format!("command: {e}")),
        };
        let mut output = Map::new();
        output.insert("exit_code".into(), json!(status.code()));
        output.insert("signal".into(), json!(status.signal()));
        output.insert("stdout".into(), json!(String::from_utf8_lossy(&stdout)));
        output.insert("stdout_truncated".into(), json!(stdout_truncated));
        output.insert("stderr".into(), json!(String::from_utf8_lossy(&stderr)));
        output.insert("stderr_truncated".into(), json!(stderr_truncated));
        let output = Value::Object(output);
        match (stopped, describe_failure(status)) {
            (Some(reason), _) => StepOutput {
                success: false,
                output,
                error: Some(reason),
            },
            (None, None) => StepOutput::succeeded(output),
            (None, Some(error)) => StepOutput {
                success: false,
                output,
                error: Some(error),
            },
        }
    }
}

fn join_capture(handle: JoinHandle<(Vec<u8>, bool)>) -> (Vec<u8>, bool) {
    handle.join().unwrap_or_default()
}

fn describe_failure(status: ExitStatus) -> Option<String> {
    match (status.code(), status.signal()) {
        (Some(0), _) => None,
        (Some(code), _) => Some(format!("command exited with status {code}")),
        (None, Some(signal)) => Some(format!("command killed by signal {signal}")),
        (None, None) => Some("command ended without a status".to_owned()),
    }
}
