"""Shared helpers for the job_executor tests."""

from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional

import pytest

import job_executor as je


def plan(*step_types: str, timeout_seconds: int = 300) -> List[je.JobStep]:
    """A plan with one step per type, indices in order, targets named after them."""
    return [
        je.JobStep(i, step_type, f"target-{i}", {"n": i}, timeout_seconds)
        for i, step_type in enumerate(step_types)
    ]


def run(executor: je.JobExecutor, steps: List[je.JobStep], **kwargs: Any) -> je.ExecutionResult:
    return executor.execute_job(
        job_id=kwargs.pop("job_id", uuid.uuid4()),
        contract_id=kwargs.pop("contract_id", uuid.uuid4()),
        steps=steps,
        **kwargs,
    )


class Recorder:
    """A class-style handler that records every call."""

    def __init__(self, output: Optional[Dict[str, Any]] = None) -> None:
        self.calls: List[tuple] = []
        self.output = output if output is not None else {}

    def execute(self, step: je.JobStep, context: je.ExecutionContext) -> je.StepOutput:
        self.calls.append((step.step_index, step.step_type, context.step_index))
        return je.StepOutput(success=True, output=dict(self.output, index=step.step_index))


class CountingObserver:
    """A health observer that counts its reads and returns a fresh dict."""

    def __init__(self) -> None:
        self.reads = 0

    def observe_health(self) -> Dict[str, Any]:
        self.reads += 1
        return {"status": "healthy", "reads": self.reads}


@pytest.fixture
def db(tmp_path) -> str:
    return str(tmp_path / "jobs.db")
