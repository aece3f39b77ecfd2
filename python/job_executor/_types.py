"""The plain data of the job executor: plan steps, handler outputs, results.

These are declarations only. The engine (``job_executor._native``) builds
them from what it recorded and reads them back; nothing here runs a step or
decides anything.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Protocol

from ._native import EXECUTOR_VERSION

if TYPE_CHECKING:
    from ._native import CancelSignal

# The digest of an empty log: the head of a result that recorded nothing.
_GENESIS_HEAD = "sha256:" + "0" * 64


class JobStatus(str, Enum):
    """Status of a whole job; members equal their names (``"COMPLETED"``)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class StepStatus(str, Enum):
    """Status of one step; members equal their names (``"FAILED"``)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"


@dataclass
class JobStep:
    """One declared step of a job plan. A plain, mutable value: the executor
    copies the plan when a job starts, so later edits change nothing recorded.
    ``step_index`` must be the step's position in the plan (0, 1, 2, ...)."""

    step_index: int
    step_type: str
    target: str
    parameters: Dict[str, Any] = field(default_factory=dict)
    timeout_seconds: int = 300


@dataclass(frozen=True)
class StepOutput:
    """What a handler returns for one step."""

    success: bool
    output: Optional[Any] = None
    error: Optional[str] = None


@dataclass(frozen=True)
class ExecutionContext:
    """What a handler may know about the step it runs. It grants no
    authority over governance state. ``cancel`` is raised when the step's
    deadline passes: a long handler polls ``cancel.is_cancelled()``."""

    job_id: uuid.UUID
    contract_id: uuid.UUID
    step_index: int
    step_type: str
    target: str
    executed_by: str
    started_at: datetime
    cancel: Optional[CancelSignal] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class StepResult:
    """The recorded outcome of one executed step."""

    step_index: int
    status: StepStatus
    started_at: datetime
    completed_at: datetime
    output: Optional[Any] = None
    error: Optional[str] = None
    health_after: Optional[Any] = None
    # "handler_failed", "no_handler", "panic" (a raised exception),
    # "timeout" or "interrupted"; None for a step that succeeded.
    failure_kind: Optional[str] = None


@dataclass(frozen=True)
class ExecutionResult:
    """The result of a job, folded from its event log: the same fold whether
    the job just ran or is replayed from the log years later. Only a result
    the executor returned has evidence (``execution_result_to_evidence``):
    it carries the engine's own value, which ``dataclasses.replace`` and
    hand-made results do not."""

    job_id: uuid.UUID
    final_status: JobStatus
    step_results: List[StepResult]
    steps_executed: int
    steps_succeeded: int
    steps_failed: int
    final_reason: str
    health_before: Optional[Any]
    health_after: Optional[Any]
    started_at: datetime
    completed_at: datetime
    contract_id: uuid.UUID = uuid.UUID(int=0)
    executed_by: str = ""
    executor_version: str = EXECUTOR_VERSION
    steps_planned: int = 0
    # Number of events in the job's log, and the chain digest of the last
    # one ("sha256:<hex>"), which commits to the whole log behind it.
    events: int = 0
    head: str = _GENESIS_HEAD
    head_mac: Optional[str] = None
    _native: Any = field(default=None, init=False, repr=False, compare=False)


@dataclass(frozen=True)
class Violation:
    """One broken rule in a stored log."""

    job_id: uuid.UUID
    seq: int
    # "EXEC-001" ... "EXEC-006", "CHAIN", "MAC", "EXPECT", "CANCEL" or "LOG".
    check: str
    message: str


@dataclass(frozen=True)
class VerifyReport:
    """The verdict on a whole log."""

    ok: bool
    jobs: int
    events: int
    failed_jobs: int
    violations: List[Violation]


@dataclass(frozen=True)
class Recovery:
    """What ``recover()`` did to one unfinished job. ``action`` is
    "interrupted" (the step in doubt was recorded failed and the job halted),
    "halted", "cancelled" or "resumable" (``step_index`` is then the step
    ``resume`` starts)."""

    job_id: uuid.UUID
    action: str
    step_index: Optional[int]


class StepHandler(Protocol):
    """Performs one type of step. A plain callable ``(step, context) ->
    StepOutput`` is a handler too."""

    def execute(self, step: JobStep, context: ExecutionContext) -> StepOutput: ...


class HealthObserver(Protocol):
    """Reads the current health of the platform, read-only."""

    def observe_health(self) -> Dict[str, Any]: ...
