"""Type stubs of the compiled engine module."""

import uuid
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

from ._types import (
    ExecutionContext,
    ExecutionResult,
    HealthObserver,
    JobStep,
    Recovery,
    StepHandler,
    StepOutput,
    VerifyReport,
)

EXECUTOR_VERSION: str

Handler = Union[StepHandler, Callable[[JobStep, ExecutionContext], StepOutput]]

class CancelSignal:
    """Raised when a step's deadline passes."""

    def is_cancelled(self) -> bool: ...

class NoOpHandler:
    """Always succeeds with an empty output."""

    def __init__(self) -> None: ...
    def execute(self, step: JobStep, context: ExecutionContext) -> StepOutput: ...

class FailingHandler:
    """Always fails with ``error_message`` (default ``"Intentional failure"``)."""

    def __init__(self, error_message: Optional[str] = None) -> None: ...
    def execute(self, step: JobStep, context: ExecutionContext) -> StepOutput: ...

class JobExecutor:
    """Executes governance job steps in order and records every fact in an
    append-only event log.

    ``db``: ``None`` keeps the log in memory; a path opens (or creates) a
    SQLite log, a ``postgres://`` URL a PostgreSQL one; ``":memory:"`` is a
    private in-memory SQLite database.
    ``deterministic``: events are stamped by a logical clock, so the same
    jobs give byte-identical logs. ``key``: authenticates every event's
    digest with HMAC-SHA256 (at least 16 bytes). ``synchronous``: ``"full"``
    (every event durable before the executor goes on) or ``"normal"``.
    ``polling``: the engine polls briefly for a step's outcome instead of
    sleeping, which pays while no more jobs run than there are cores.
    ``health_timeout_seconds``: how long the health observer has to answer
    (default 30 s); past it, the job stops as if the observer had raised.
    """

    def __init__(
        self,
        handlers: Optional[Mapping[str, Handler]] = None,
        executor_version: str = ...,
        *,
        db: Optional[str] = None,
        deterministic: bool = False,
        key: Optional[bytes] = None,
        synchronous: str = "full",
        polling: bool = False,
        health_timeout_seconds: Optional[float] = None,
    ) -> None: ...
    @property
    def version(self) -> str: ...
    def register_handler(self, step_type: str, handler: Handler) -> None: ...
    def execute_job(
        self,
        job_id: uuid.UUID,
        contract_id: uuid.UUID,
        steps: Iterable[JobStep],
        health_observer: Optional[HealthObserver] = None,
        executed_by: str = "system",
    ) -> ExecutionResult: ...
    def resume(
        self,
        job_id: uuid.UUID,
        health_observer: Optional[HealthObserver] = None,
        executed_by: str = "system",
    ) -> ExecutionResult: ...
    def replay(self, job_id: uuid.UUID) -> ExecutionResult: ...
    def events(self, job_id: uuid.UUID) -> List[Dict[str, Any]]: ...
    def verify(self, expect: Optional[Mapping[uuid.UUID, str]] = None) -> VerifyReport: ...
    def recover(self) -> List[Recovery]: ...
    def cancel(self, job_id: uuid.UUID, reason: str = "cancelled on request") -> bool: ...
    def metrics_text(self) -> str: ...

def create_default_executor() -> JobExecutor: ...
def execution_result_to_evidence(result: ExecutionResult) -> Dict[str, Any]: ...
def derived_job_id(contract_id: uuid.UUID, steps: Iterable[JobStep]) -> uuid.UUID: ...

class ExecutorError(Exception): ...
class JobAlreadyExistsError(ExecutorError): ...
class InvalidPlanError(ExecutorError): ...
class UnknownJobError(ExecutorError): ...
class JobEndedError(ExecutorError): ...
class StepInDoubtError(ExecutorError): ...
class ConflictError(ExecutorError): ...
class EventLogError(ExecutorError): ...
class ReplayError(ExecutorError): ...
class HealthObserverError(ExecutorError): ...
