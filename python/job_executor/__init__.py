"""A deterministic, event-sourced executor of governance jobs.

The original ``job_executor`` module's API over a Rust engine: steps run in
declared order, the job stops at the first failure, nothing is retried,
health is observed and never modified, and every fact is recorded in an
append-only, hash-chained event log that replays to the same evidence.
"""

from ._native import (
    EXECUTOR_VERSION,
    CancelSignal,
    ConflictError,
    EventLogError,
    ExecutorError,
    FailingHandler,
    HealthObserverError,
    InvalidPlanError,
    JobAlreadyExistsError,
    JobEndedError,
    JobExecutor,
    NoOpHandler,
    ReplayError,
    StepInDoubtError,
    UnknownJobError,
    create_default_executor,
    derived_job_id,
    execution_result_to_evidence,
)
from ._types import (
    ExecutionContext,
    ExecutionResult,
    HealthObserver,
    JobStatus,
    JobStep,
    Recovery,
    StepHandler,
    StepOutput,
    StepResult,
    StepStatus,
    VerifyReport,
    Violation,
)

__all__ = [
    "EXECUTOR_VERSION",
    "CancelSignal",
    "ConflictError",
    "EventLogError",
    "ExecutionContext",
    "ExecutionResult",
    "ExecutorError",
    "FailingHandler",
    "HealthObserver",
    "HealthObserverError",
    "InvalidPlanError",
    "JobAlreadyExistsError",
    "JobEndedError",
    "JobExecutor",
    "JobStatus",
    "JobStep",
    "NoOpHandler",
    "Recovery",
    "ReplayError",
    "StepHandler",
    "StepInDoubtError",
    "StepOutput",
    "StepResult",
    "StepStatus",
    "UnknownJobError",
    "VerifyReport",
    "Violation",
    "create_default_executor",
    "derived_job_id",
    "execution_result_to_evidence",
]

__version__ = EXECUTOR_VERSION
