"""The original module's API, in the shape its callers and tests use it."""

from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import datetime, timezone

import pytest

import job_executor as je
from conftest import Recorder, plan, run


def test_version_is_a_read_only_semantic_version() -> None:
    executor = je.JobExecutor()
    assert executor.version == je.EXECUTOR_VERSION
    assert re.fullmatch(r"\d+\.\d+\.\d+", je.EXECUTOR_VERSION)
    with pytest.raises(AttributeError):
        executor.version = "9.9.9"  # type: ignore[misc]
    assert executor.version == je.EXECUTOR_VERSION


def test_a_chosen_executor_version_is_recorded() -> None:
    executor = je.JobExecutor(None, "4.2.0")
    executor.register_handler("ok", je.NoOpHandler())
    result = run(executor, plan("ok"))
    assert executor.version == "4.2.0"
    assert result.executor_version == "4.2.0"
    assert je.execution_result_to_evidence(result)["executor_version"] == "4.2.0"


def test_handlers_passed_to_the_constructor_are_registered() -> None:
    recorder = Recorder()
    executor = je.JobExecutor(handlers={"a": recorder, "b": lambda s, c: je.StepOutput(True)})
    result = run(executor, plan("a", "b"))
    assert result.final_status == je.JobStatus.COMPLETED
    assert recorder.calls == [(0, "a", 0)]


def test_the_executor_has_no_retry_contract_or_eligibility_knobs() -> None:
    executor = je.create_default_executor()
    names = {name.lower() for name in dir(executor)}
    for forbidden in ("retry", "retries", "max_retries", "contract", "eligibility", "eligible"):
        assert not any(forbidden in name for name in names), forbidden


def test_statuses_compare_as_the_originals_str_enums() -> None:
    assert je.JobStatus.COMPLETED == "COMPLETED"
    assert je.JobStatus.FAILED == "FAILED"
    assert je.StepStatus.FAILED == "FAILED"
    assert je.JobStatus("CANCELLED") is je.JobStatus.CANCELLED
    assert isinstance(je.JobStatus.PENDING, str)
    assert [s.value for s in je.StepStatus] == ["PENDING", "RUNNING", "COMPLETED", "FAILED", "SKIPPED"]


def test_job_step_is_a_plain_mutable_value_with_a_default_timeout() -> None:
    step = je.JobStep(0, "capability_enable", "billing", {"flag": True})
    assert step.timeout_seconds == 300
    step.target = "invoices"
    step.parameters["flag"] = False
    assert step == je.JobStep(0, "capability_enable", "invoices", {"flag": False}, 300)


def test_results_outputs_and_contexts_are_frozen() -> None:
    result = run(je.create_default_executor(), plan("capability_enable"))
    output = je.StepOutput(success=True)
    for value, attribute in [
        (result, "final_status"),
        (result.step_results[0], "status"),
        (output, "success"),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, attribute, None)
    assert output.output is None and output.error is None
    assert dataclasses.is_dataclass(result) and dataclasses.is_dataclass(output)


def test_ids_are_uuids_and_times_are_aware_utc() -> None:
    contexts = []

    def handler(step: je.JobStep, context: je.ExecutionContext) -> je.StepOutput:
        contexts.append(context)
        return je.StepOutput(True, {})

    executor = je.JobExecutor({"h": handler})
    job_id, contract_id = uuid.uuid4(), uuid.uuid4()
    result = run(executor, plan("h"), job_id=job_id, contract_id=contract_id, executed_by="ops")
    (context,) = contexts
    assert context.job_id == job_id and context.contract_id == contract_id
    assert isinstance(result.job_id, uuid.UUID) and result.job_id == job_id
    assert (context.step_index, context.step_type, context.target, context.executed_by) == (0, "h", "target-0", "ops")
    for moment in (result.started_at, result.completed_at, context.started_at, result.step_results[0].started_at):
        assert isinstance(moment, datetime)
        assert moment.utcoffset() == timezone.utc.utcoffset(None)
    assert result.started_at <= context.started_at <= result.completed_at
    with pytest.raises(dataclasses.FrozenInstanceError):
        context.step_index = 5  # type: ignore[misc]


def test_builtin_handlers_can_be_called_directly() -> None:
    context = je.ExecutionContext(
        uuid.uuid4(), uuid.uuid4(), 0, "x", "t", "ops", datetime.now(timezone.utc)
    )
    step = je.JobStep(0, "x", "t", {})
    assert je.NoOpHandler().execute(step, context) == je.StepOutput(True, {}, None)
    assert je.FailingHandler().execute(step, context) == je.StepOutput(False, {}, "Intentional failure")
    assert je.FailingHandler(error_message="nope").execute(step, context).error == "nope"


def test_default_executor_runs_the_seed_step_types_and_nothing_else() -> None:
    executor = je.create_default_executor()
    types = [
        "capability_enable",
        "capability_disable",
        "capability_add",
        "capability_remove",
        "configuration_change",
        "unknown",
    ]
    assert run(executor, plan(*types)).final_status == je.JobStatus.COMPLETED
    result = run(executor, plan("reindex"))
    assert result.final_status == je.JobStatus.FAILED
    assert result.step_results[0].error == "No handler registered for step type: reindex"
    assert result.step_results[0].failure_kind == "no_handler"


def test_failing_handler_fails_the_job_with_the_seed_reason() -> None:
    executor = je.JobExecutor()
    executor.register_handler("ok", je.NoOpHandler())
    executor.register_handler("fail", je.FailingHandler(error_message="disk on fire"))
    result = run(executor, plan("ok", "fail", "ok"))
    assert result.final_status == je.JobStatus.FAILED
    assert result.final_reason == "Step 1 failed: disk on fire"
    assert (result.steps_executed, result.steps_succeeded, result.steps_failed) == (2, 1, 1)
    assert [s.status for s in result.step_results] == [je.StepStatus.COMPLETED, je.StepStatus.FAILED]


def test_an_empty_plan_completes_with_zero_steps() -> None:
    result = run(je.create_default_executor(), [])
    assert result.final_status == je.JobStatus.COMPLETED
    assert result.final_reason == "All steps completed successfully"
    assert result.steps_executed == 0 and result.step_results == []


def test_handlers_as_classes_lambdas_functions_and_callables() -> None:
    class Callable:
        def __call__(self, step: je.JobStep, context: je.ExecutionContext) -> je.StepOutput:
            return je.StepOutput(True, {"kind": "callable"})

    def function(step: je.JobStep, context: je.ExecutionContext) -> je.StepOutput:
        return je.StepOutput(True, {"kind": "function", "target": step.target})

    executor = je.JobExecutor()
    executor.register_handler("class", Recorder({"kind": "class"}))
    executor.register_handler("lambda", lambda step, context: je.StepOutput(True, {"kind": "lambda"}))
    executor.register_handler("function", function)
    executor.register_handler("callable", Callable())
    result = run(executor, plan("class", "lambda", "function", "callable"))
    assert result.final_status == je.JobStatus.COMPLETED
    assert [s.output["kind"] for s in result.step_results] == ["class", "lambda", "function", "callable"]
    assert result.step_results[2].output["target"] == "target-2"


def test_a_handler_that_is_neither_callable_nor_has_execute_is_refused() -> None:
    executor = je.JobExecutor()
    with pytest.raises(TypeError, match="execute"):
        executor.register_handler("x", 42)


def test_registering_again_replaces_the_handler() -> None:
    executor = je.JobExecutor()
    executor.register_handler("x", je.FailingHandler())
    executor.register_handler("x", je.NoOpHandler())
    assert run(executor, plan("x")).final_status == je.JobStatus.COMPLETED


def test_evidence_has_the_pinned_shape() -> None:
    observer_values = iter([{"h": 0}, {"h": 1}])

    class Observer:
        def observe_health(self):
            return next(observer_values)

    result = run(je.create_default_executor(), plan("capability_enable"), health_observer=Observer())
    evidence = je.execution_result_to_evidence(result)
    assert isinstance(evidence, dict)
    assert evidence["job_id"] == str(result.job_id)
    assert evidence["final_status"] == "COMPLETED"
    assert evidence["final_reason"] == "All steps completed successfully"
    assert evidence["execution_summary"] == {
        "steps_planned": 1,
        "steps_executed": 1,
        "steps_succeeded": 1,
        "steps_failed": 0,
    }
    (step,) = evidence["step_results"]
    assert {"step_index", "status", "started_at", "completed_at", "output", "error"} <= set(step)
    assert step["status"] == "COMPLETED" and step["output"] == {}
    assert evidence["health_observations"] == {"before": {"h": 0}, "after": {"h": 1}}
    assert set(evidence["timing"]) == {"started_at", "completed_at", "duration_seconds"}
    assert evidence["timing"]["started_at"].endswith("Z")
    assert evidence["executor_version"] == je.EXECUTOR_VERSION
    assert evidence["event_log"]["events"] == 4
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", evidence["event_log"]["head"])
    assert evidence["event_log"]["head"] == result.head


def test_only_a_result_the_executor_returned_has_evidence() -> None:
    # A result is a projection of its event log: a hand-made one, or one
    # edited with dataclasses.replace, has no log behind it.
    now = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
    made = je.ExecutionResult(
        job_id=uuid.UUID(int=1),
        final_status=je.JobStatus.COMPLETED,
        step_results=[],
        steps_executed=0,
        steps_succeeded=0,
        steps_failed=0,
        final_reason="All steps completed successfully",
        health_before=None,
        health_after=None,
        started_at=now,
        completed_at=now,
    )
    real = run(je.create_default_executor(), [])
    assert je.execution_result_to_evidence(real)["job_id"] == str(real.job_id)
    edited = dataclasses.replace(real, final_status=je.JobStatus.FAILED)
    for result in (made, edited):
        with pytest.raises(TypeError, match="made by hand"):
            je.execution_result_to_evidence(result)


def test_steps_must_be_job_steps() -> None:
    executor = je.create_default_executor()
    with pytest.raises(TypeError, match=r"steps\[0\]"):
        run(executor, [{"step_index": 0}])
    with pytest.raises(TypeError):
        executor.execute_job(job_id="not a uuid", contract_id=uuid.uuid4(), steps=[])
