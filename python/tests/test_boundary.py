"""What happens at the boundary between Python and the engine: exceptions,
wrong return values, raising observers, deadlines, threads and signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from typing import Any, Dict, List

import pytest

import job_executor as je
from conftest import CountingObserver, Recorder, plan, run


def test_a_raising_handler_fails_its_step_with_the_tracebacks_last_line() -> None:
    def bad_target(step: je.JobStep, context: je.ExecutionContext) -> je.StepOutput:
        raise ValueError(f"bad target {step.target}")

    def bare(step: je.JobStep, context: je.ExecutionContext) -> je.StepOutput:
        raise KeyError

    after = Recorder()
    executor = je.JobExecutor({"bad": bad_target, "bare": bare, "after": after})
    result = run(executor, plan("bad", "after"))
    (step,) = result.step_results
    assert step.status == je.StepStatus.FAILED
    assert step.error == "Execution error: ValueError: bad target target-0"
    assert step.failure_kind == "panic"
    assert result.final_reason == "Step 0 failed: Execution error: ValueError: bad target target-0"
    assert after.calls == []
    assert run(executor, plan("bare")).step_results[0].error == "Execution error: KeyError"
    # The executor stays usable.
    assert run(executor, plan("after")).final_status == je.JobStatus.COMPLETED


def test_a_handler_returning_something_else_than_a_step_output_fails_clearly() -> None:
    executor = je.JobExecutor(
        {
            "dict": lambda s, c: {"success": True},
            "none": lambda s, c: None,
            "set": lambda s, c: je.StepOutput(True, {"ids": {1, 2}}),
            "nan": lambda s, c: je.StepOutput(True, {"ratio": float("nan")}),
        }
    )
    errors = {t: run(executor, plan(t)).step_results[0] for t in ("dict", "none", "set", "nan")}
    assert errors["dict"].error.startswith("Execution error: TypeError: returned dict instead of a StepOutput")
    assert "returned NoneType instead of a StepOutput" in errors["none"].error
    assert "set cannot be recorded as JSON" in errors["set"].error
    assert "cannot be recorded as JSON" in errors["nan"].error
    assert all(s.status == je.StepStatus.FAILED and s.failure_kind == "panic" for s in errors.values())


def test_a_handler_reporting_failure_is_a_handler_failure() -> None:
    executor = je.JobExecutor({"f": lambda s, c: je.StepOutput(False, {"tried": 1}, "quota exceeded")})
    (step,) = run(executor, plan("f")).step_results
    assert (step.error, step.failure_kind, step.output) == ("quota exceeded", "handler_failed", {"tried": 1})


def test_an_observer_raising_before_the_first_step_records_nothing() -> None:
    recorder = Recorder()

    class Down:
        def observe_health(self) -> Dict[str, Any]:
            raise ConnectionError("health service down")

    executor = je.JobExecutor({"r": recorder})
    job_id = uuid.uuid4()
    with pytest.raises(je.HealthObserverError, match="ConnectionError: health service down") as raised:
        run(executor, plan("r"), job_id=job_id, health_observer=Down())
    assert isinstance(raised.value.__cause__, ConnectionError)
    assert recorder.calls == []
    with pytest.raises(je.UnknownJobError):
        executor.events(job_id)


def test_an_observer_raising_after_a_step_keeps_its_outcome_and_resume_goes_on(db: str) -> None:
    class FailsSecondRead(CountingObserver):
        def observe_health(self) -> Dict[str, Any]:
            health = super().observe_health()
            if self.reads == 2:
                raise RuntimeError("sensor glitch")
            return health

    recorder = Recorder()
    executor = je.JobExecutor({"r": recorder}, db=db)
    job_id = uuid.uuid4()
    with pytest.raises(je.HealthObserverError) as raised:
        run(executor, plan("r", "r", "r"), job_id=job_id, health_observer=FailsSecondRead())
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert recorder.calls == [(0, "r", 0)]
    events = executor.events(job_id)
    assert [e["kind"] for e in events] == ["JobStarted", "StepStarted", "StepSucceeded"]
    assert events[-1]["payload"]["health_after"] is None
    stopped = executor.replay(job_id)
    assert stopped.final_status == je.JobStatus.RUNNING
    resumed = executor.resume(job_id, health_observer=CountingObserver())
    assert resumed.final_status == je.JobStatus.COMPLETED
    assert recorder.calls == [(0, "r", 0), (1, "r", 1), (2, "r", 2)]
    assert executor.verify().ok


def test_a_step_past_its_deadline_is_recorded_timed_out_and_its_signal_raised() -> None:
    saw_cancel = threading.Event()
    finished = threading.Event()

    def slow(step: je.JobStep, context: je.ExecutionContext) -> je.StepOutput:
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if context.cancel.is_cancelled():
                    saw_cancel.set()
                    break
                time.sleep(0.01)
            return je.StepOutput(True, {"late": True})
        finally:
            finished.set()

    after = Recorder()
    executor = je.JobExecutor({"slow": slow, "after": after})
    started = time.monotonic()
    result = run(executor, plan("slow", "after", timeout_seconds=1))
    elapsed = time.monotonic() - started
    (step,) = result.step_results
    assert step.error == "timed out after 1 s" and step.failure_kind == "timeout"
    assert result.final_status == je.JobStatus.FAILED
    assert 0.9 < elapsed < 3
    assert after.calls == []
    assert saw_cancel.wait(5) and finished.wait(5)
    # The late result was dropped: the recorded outcome stays the timeout.
    assert executor.replay(result.job_id).step_results[0].output is None


def test_jobs_in_threads_run_their_python_handlers_at_once() -> None:
    # Four handlers meet at a barrier: they can only pass it if all four run
    # at the same time, so each calling thread released the interpreter
    # while its job waited on its handler.
    barrier = threading.Barrier(4, timeout=20)

    def meet(step: je.JobStep, context: je.ExecutionContext) -> je.StepOutput:
        return je.StepOutput(True, {"arrival": barrier.wait()})

    executor = je.JobExecutor({"meet": meet})
    results: List[je.ExecutionResult] = []
    threads = [threading.Thread(target=lambda: results.append(run(executor, plan("meet")))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 4
    assert all(r.final_status == je.JobStatus.COMPLETED for r in results)
    assert sorted(r.step_results[0].output["arrival"] for r in results) == [0, 1, 2, 3]


def test_a_job_calls_its_python_handlers_on_one_python_thread_of_its_own() -> None:
    # Without an observer a job is driven on a Python handler thread: every
    # step is called there (no hand-over per step), never on the caller's
    # thread, and that thread is a daemon the interpreter can leave behind.
    seen: List[Any] = []

    def note(step: je.JobStep, context: je.ExecutionContext) -> je.StepOutput:
        thread = threading.current_thread()
        seen.append((thread.ident, thread.daemon, thread.name))
        return je.StepOutput(True, {})

    executor = je.JobExecutor({"note": note})
    result = run(executor, plan("note", "note", "note"))
    assert result.final_status == je.JobStatus.COMPLETED
    assert len(seen) == 3 and len(set(seen)) == 1
    ident, daemon, name = seen[0]
    assert ident != threading.get_ident() and daemon and name == "job-executor-handler"
    # With an observer, steps are handed over one by one, each still on a
    # Python handler thread.
    seen.clear()
    result = run(executor, plan("note", "note"), health_observer=CountingObserver())
    assert result.final_status == je.JobStatus.COMPLETED
    assert all(daemon and ident != threading.get_ident() for ident, daemon, _ in seen)


def _python(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_ctrl_c_cancels_the_job_after_recording_the_step_in_flight(db: str) -> None:
    job_id = uuid.uuid4()
    child = _python(
        """
        import signal, sys, time, uuid
        import job_executor as je

        # Python leaves SIGINT ignored when it starts with it ignored (as
        # under a non-interactive shell's `&`): handle it as a terminal does.
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def slow(step, context):
            time.sleep(0.3)
            return je.StepOutput(True, {"index": step.step_index})

        executor = je.JobExecutor({"slow": slow}, db=sys.argv[1])
        steps = [je.JobStep(i, "slow", "t", {}) for i in range(40)]
        print("ready", flush=True)
        try:
            executor.execute_job(job_id=uuid.UUID(sys.argv[2]), contract_id=uuid.uuid4(), steps=steps)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(130)
        print("finished", flush=True)
        """,
        db,
        str(job_id),
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(1.2)
    child.send_signal(signal.SIGINT)
    sent = time.monotonic()
    out, err = child.communicate(timeout=30)
    assert child.returncode == 130, err
    assert out.strip() == "interrupted"
    # The step in flight ran to its end (at most 0.3 s) before the interrupt.
    assert time.monotonic() - sent < 5
    executor = je.JobExecutor(db=db)
    result = executor.replay(job_id)
    assert result.final_status == je.JobStatus.CANCELLED
    assert 1 <= result.steps_executed < 40
    assert all(s.status == je.StepStatus.COMPLETED for s in result.step_results)
    kinds = [e["kind"] for e in executor.events(job_id)]
    assert kinds[-2:] == ["JobCancelRequested", "JobCancelled"] or kinds[-1] == "JobCancelled"
    assert "JobCancelRequested" in kinds
    assert executor.verify().ok


def test_a_killed_process_leaves_its_step_in_doubt_and_recover_never_reruns_it(db: str, tmp_path) -> None:
    marker = tmp_path / "ran"
    job_id = uuid.uuid4()
    child = _python(
        """
        import sys, time, uuid
        import job_executor as je

        def step(step, context):
            with open(sys.argv[3], "a") as ran:
                ran.write(f"{step.step_index}\\n")
            if step.step_index == 1:
                time.sleep(60)
            return je.StepOutput(True, {})

        executor = je.JobExecutor({"s": step}, db=sys.argv[1])
        steps = [je.JobStep(i, "s", "t", {}) for i in range(3)]
        executor.execute_job(job_id=uuid.UUID(sys.argv[2]), contract_id=uuid.uuid4(), steps=steps)
        """,
        db,
        str(job_id),
        str(marker),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if marker.exists() and marker.read_text().split() == ["0", "1"]:
            break
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    assert marker.read_text().split() == ["0", "1"]

    calls: List[int] = []
    executor = je.JobExecutor({"s": lambda s, c: (calls.append(s.step_index), je.StepOutput(True))[1]}, db=db)
    assert executor.replay(job_id).final_status == je.JobStatus.RUNNING
    with pytest.raises(je.StepInDoubtError):
        executor.resume(job_id)
    (recovery,) = executor.recover()
    assert (recovery.job_id, recovery.action, recovery.step_index) == (job_id, "interrupted", 1)
    result = executor.replay(job_id)
    assert result.final_status == je.JobStatus.FAILED
    assert result.step_results[1].failure_kind == "interrupted"
    with pytest.raises(je.JobEndedError):
        executor.resume(job_id)
    assert calls == [] and marker.read_text().split() == ["0", "1"]
    assert executor.verify().ok


def test_a_handler_that_never_returns_does_not_hold_the_job_or_the_exit() -> None:
    child = _python(
        """
        import time, uuid
        import job_executor as je

        def stuck(step, context):
            while True:
                time.sleep(0.05)

        executor = je.JobExecutor({"stuck": stuck, "ok": je.NoOpHandler()})
        result = executor.execute_job(job_id=uuid.uuid4(), contract_id=uuid.uuid4(),
                                      steps=[je.JobStep(0, "stuck", "t", {}, 1)])
        print(result.final_reason, flush=True)
        again = executor.execute_job(job_id=uuid.uuid4(), contract_id=uuid.uuid4(),
                                     steps=[je.JobStep(0, "ok", "t", {})])
        print(again.final_status.value, flush=True)
        """
    )
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out.split("\n")[:2] == ["Step 0 failed: timed out after 1 s", "COMPLETED"]


def test_an_observer_past_its_deadline_stops_the_job_after_recording_the_step() -> None:
    class Slow(CountingObserver):
        def observe_health(self) -> Dict[str, Any]:
            health = super().observe_health()
            if self.reads == 2:
                time.sleep(0.6)
            return health

    recorder = Recorder()
    executor = je.JobExecutor({"r": recorder}, health_timeout_seconds=0.2)
    job_id = uuid.uuid4()
    with pytest.raises(je.HealthObserverError, match="did not answer within 0.2 s"):
        run(executor, plan("r", "r"), job_id=job_id, health_observer=Slow())
    assert recorder.calls == [(0, "r", 0)]
    assert [e["kind"] for e in executor.events(job_id)] == ["JobStarted", "StepStarted", "StepSucceeded"]
    with pytest.raises(ValueError, match="health_timeout_seconds"):
        je.JobExecutor(health_timeout_seconds=-1)


def test_polling_changes_how_the_engine_waits_not_what_it_records(tmp_path) -> None:
    logs = []
    for polling in (False, True):
        executor = je.JobExecutor(
            {"py": lambda s, c: je.StepOutput(True, {"i": s.step_index})},
            db=str(tmp_path / f"{polling}.db"),
            deterministic=True,
            polling=polling,
        )
        run(executor, plan("py", "py", "py"), job_id=uuid.UUID(int=7), contract_id=uuid.UUID(int=8))
        logs.append(executor.events(uuid.UUID(int=7)))
    assert logs[0] == logs[1]
