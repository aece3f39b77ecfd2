"""EXEC-001..006, through the Python API, checked on the live result and on
the stored events."""

from __future__ import annotations

import uuid
from typing import Any, Dict, List

import pytest

import job_executor as je
from conftest import CountingObserver, Recorder, plan, run


def kinds(events: List[Dict[str, Any]]) -> List[str]:
    return [e["kind"] for e in events]


def test_exec_001_steps_execute_in_declared_order(db: str) -> None:
    order: List[int] = []
    executor = je.JobExecutor(db=db)
    executor.register_handler("a", lambda s, c: (order.append(s.step_index), je.StepOutput(True, {}))[1])
    executor.register_handler("b", Recorder())
    result = run(executor, plan("a", "b", "a", "b", "a"))
    assert order == [0, 2, 4]
    assert [s.step_index for s in result.step_results] == [0, 1, 2, 3, 4]
    started = [e["payload"]["step_index"] for e in executor.events(result.job_id) if e["kind"] == "StepStarted"]
    assert started == [0, 1, 2, 3, 4]


def test_exec_001_a_plan_out_of_order_is_refused_before_anything_is_recorded(db: str) -> None:
    recorder = Recorder()
    executor = je.JobExecutor({"a": recorder}, db=db)
    steps = plan("a", "a")
    steps[0].step_index, steps[1].step_index = 1, 0
    job_id = uuid.uuid4()
    with pytest.raises(je.InvalidPlanError, match="step_index"):
        run(executor, steps, job_id=job_id)
    assert recorder.calls == []
    with pytest.raises(je.UnknownJobError):
        executor.events(job_id)


def test_exec_002_every_started_step_has_exactly_one_outcome_next(db: str) -> None:
    executor = je.JobExecutor({"ok": je.NoOpHandler(), "fail": je.FailingHandler()}, db=db)
    for steps in (plan("ok", "ok", "ok"), plan("ok", "fail", "ok"), plan("missing")):
        result = run(executor, steps)
        events = executor.events(result.job_id)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        for i, event in enumerate(events):
            if event["kind"] == "StepStarted":
                outcome = events[i + 1]
                assert outcome["kind"] in ("StepSucceeded", "StepFailed")
                assert outcome["payload"]["step_index"] == event["payload"]["step_index"]
        assert kinds(events).count("StepStarted") == result.steps_executed == len(result.step_results)


def test_exec_003_the_job_stops_at_the_first_failure(db: str) -> None:
    after = Recorder()
    executor = je.JobExecutor({"ok": je.NoOpHandler(), "fail": je.FailingHandler("broken"), "after": after}, db=db)
    result = run(executor, plan("ok", "fail", "after", "after"))
    assert after.calls == []
    assert result.final_status == je.JobStatus.FAILED
    assert result.final_reason == "Step 1 failed: broken"
    assert kinds(executor.events(result.job_id)) == [
        "JobStarted",
        "StepStarted",
        "StepSucceeded",
        "StepStarted",
        "StepFailed",
        "JobHalted",
    ]
    completed = run(executor, plan("ok", "after"))
    assert kinds(executor.events(completed.job_id))[-1] == "JobCompleted"


def test_exec_004_health_is_observed_before_and_after_each_step_and_copied() -> None:
    observer = CountingObserver()
    returned: List[Dict[str, Any]] = []

    class Keeping(CountingObserver):
        def observe_health(self) -> Dict[str, Any]:
            health = super().observe_health()
            returned.append(health)
            return health

    executor = je.JobExecutor({"ok": je.NoOpHandler(), "fail": je.FailingHandler()})
    result = run(executor, plan("ok", "ok", "fail", "ok"), health_observer=observer)
    assert observer.reads == 1 + 3
    assert result.health_before == {"status": "healthy", "reads": 1}
    assert [s.health_after for s in result.step_results] == [
        {"status": "healthy", "reads": 2},
        {"status": "healthy", "reads": 3},
        {"status": "healthy", "reads": 4},
    ]
    # The last observation after a successful step.
    assert result.health_after == {"status": "healthy", "reads": 3}

    keeping = Keeping()
    kept = run(executor, plan("ok"), health_observer=keeping)
    # What the observer returned is copied: changing it, or the result's
    # copy, changes nothing recorded.
    returned[0]["status"] = "tampered"
    kept.health_before["status"] = "tampered"
    assert executor.replay(kept.job_id).health_before == {"status": "healthy", "reads": 1}


def test_exec_005_the_plan_and_contract_recorded_never_change() -> None:
    steps = plan("mutate", "mutate")
    contract_id = uuid.uuid4()

    def mutate(step: je.JobStep, context: je.ExecutionContext) -> je.StepOutput:
        # A handler gets its own copy of the step: editing it, or the
        # caller's plan while the job runs, reaches nothing recorded.
        step.target = "elsewhere"
        step.parameters["n"] = 99
        steps[1].target = "changed by the caller mid-job"
        return je.StepOutput(True, {"saw": step.target})

    executor = je.JobExecutor({"mutate": mutate})
    result = run(executor, steps, contract_id=contract_id)
    started = executor.events(result.job_id)[0]["payload"]
    assert started["contract_id"] == str(contract_id)
    assert [(s["target"], s["parameters"]) for s in started["plan"]] == [("target-0", {"n": 0}), ("target-1", {"n": 1})]
    assert result.contract_id == contract_id
    assert result.final_status == je.JobStatus.COMPLETED


def test_exec_006_a_handler_runs_at_most_once_and_a_job_id_once(db: str) -> None:
    recorder = Recorder()
    executor = je.JobExecutor({"r": recorder}, db=db)
    job_id = uuid.uuid4()
    run(executor, plan("r", "r"), job_id=job_id)
    assert recorder.calls == [(0, "r", 0), (1, "r", 1)]
    events_before = executor.events(job_id)
    with pytest.raises(je.JobAlreadyExistsError, match="at most once"):
        run(executor, plan("r", "r"), job_id=job_id)
    # Nothing appended, no handler run, even from another executor on the log.
    other = je.JobExecutor({"r": recorder}, db=db)
    with pytest.raises(je.JobAlreadyExistsError):
        run(other, plan("r"), job_id=job_id)
    assert recorder.calls == [(0, "r", 0), (1, "r", 1)]
    assert executor.events(job_id) == events_before
    starts = [e["payload"]["step_index"] for e in events_before if e["kind"] == "StepStarted"]
    assert len(starts) == len(set(starts))


def test_every_invariant_holds_on_the_stored_log(db: str) -> None:
    executor = je.JobExecutor({"ok": je.NoOpHandler(), "fail": je.FailingHandler()}, db=db)
    for steps in (plan("ok", "ok"), plan("ok", "fail", "ok"), plan(), plan("nope")):
        run(executor, steps, health_observer=CountingObserver())
    report = je.JobExecutor(db=db).verify()
    assert report.ok, report.violations
    assert (report.jobs, report.failed_jobs, report.violations) == (4, 0, [])
