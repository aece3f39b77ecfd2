"""The same API over a PostgreSQL log: `db=` takes a URL as well as a path.

The server is `JE_PG_URL` (default postgres://postgres@127.0.0.1:5432/test);
each test gets a schema of its own, made and dropped with `psql`. Without a
server (or psql) the tests are skipped, unless JE_REQUIRE_PG=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from typing import Iterator

import pytest

import job_executor as je
from conftest import CountingObserver, plan, run

SERVER = os.environ.get("JE_PG_URL", "postgres://postgres@127.0.0.1:5432/test")


def psql(sql: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["psql", SERVER, "-v", "ON_ERROR_STOP=1", "-qc", sql], capture_output=True, text=True, timeout=30
    )


@pytest.fixture
def pg_url() -> Iterator[str]:
    name = f"je_py_{uuid.uuid4().hex[:12]}"
    reason = None
    if shutil.which("psql") is None:
        reason = "psql is not installed"
    else:
        made = psql(f"CREATE SCHEMA {name}")
        if made.returncode != 0:
            reason = f"no PostgreSQL server at {SERVER}: {made.stderr.strip()}"
    if reason is not None:
        if os.environ.get("JE_REQUIRE_PG") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    separator = "&" if "?" in SERVER else "?"
    try:
        yield f"{SERVER}{separator}options=-csearch_path%3D{name}"
    finally:
        psql(f"DROP SCHEMA {name} CASCADE")


def test_a_postgres_log_runs_replays_and_verifies_like_a_file(pg_url: str) -> None:
    executor = je.JobExecutor({"ok": je.NoOpHandler(), "py": lambda s, c: je.StepOutput(True, {"i": s.step_index})}, db=pg_url)
    live = run(executor, plan("ok", "py", "missing"), health_observer=CountingObserver())
    assert live.final_status == je.JobStatus.FAILED
    other = je.JobExecutor(db=pg_url)
    assert other.replay(live.job_id) == live
    assert je.execution_result_to_evidence(other.replay(live.job_id)) == je.execution_result_to_evidence(live)
    assert [e["kind"] for e in other.events(live.job_id)][-1] == "JobHalted"
    with pytest.raises(je.JobAlreadyExistsError):
        run(other, plan("ok"), job_id=live.job_id)
    report = other.verify()
    assert report.ok and report.jobs == 1


def test_an_unreachable_server_is_an_event_log_error() -> None:
    with pytest.raises(je.EventLogError):
        je.JobExecutor(db="postgres://nobody@127.0.0.1:9/none?connect_timeout=2")
