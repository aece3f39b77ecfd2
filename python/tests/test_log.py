"""What the original never had: the event log, replay, verify, determinism,
keys, cancellation."""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import uuid
from typing import Any, Dict, List

import pytest

import job_executor as je
from conftest import CountingObserver, plan, run

HANDLERS = {"ok": je.NoOpHandler(), "fail": je.FailingHandler("refused")}


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def rows(path: str) -> List[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute(
            "SELECT job_id, seq, kind, schema_version, recorded_at, payload, digest, mac "
            "FROM events ORDER BY position"
        ).fetchall()


def test_replay_gives_the_live_evidence_byte_for_byte(db: str) -> None:
    executor = je.JobExecutor(
        dict(HANDLERS, echo=lambda s, c: je.StepOutput(True, {"target": s.target, "ratio": 0.25})), db=db
    )
    lives = [
        run(executor, plan("ok", "echo", "ok"), health_observer=CountingObserver()),
        run(executor, plan("echo", "fail", "ok"), health_observer=CountingObserver()),
        run(executor, plan("missing")),
    ]
    reopened = je.JobExecutor(db=db)
    for live in lives:
        replayed = reopened.replay(live.job_id)
        assert replayed == live
        assert canonical(je.execution_result_to_evidence(replayed)) == canonical(je.execution_result_to_evidence(live))
    with pytest.raises(je.UnknownJobError):
        reopened.replay(uuid.uuid4())


def test_events_are_the_stored_log_in_seq_order(db: str) -> None:
    executor = je.JobExecutor(HANDLERS, db=db)
    result = run(executor, plan("ok", "fail"), executed_by="ops")
    events = executor.events(result.job_id)
    assert [e["kind"] for e in events] == [
        "JobStarted",
        "StepStarted",
        "StepSucceeded",
        "StepStarted",
        "StepFailed",
        "JobHalted",
    ]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(e["job_id"] == str(result.job_id) for e in events)
    assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", e["digest"]) for e in events)
    assert events[-1]["digest"] == result.head
    assert events[0]["payload"]["executed_by"] == "ops"
    assert events[4]["payload"]["failure"] == {"kind": "handler_failed", "message": "refused"}
    assert len(events) == result.events


def test_the_log_is_append_only_in_the_database(db: str) -> None:
    executor = je.JobExecutor(HANDLERS, db=db)
    run(executor, plan("ok"))
    with sqlite3.connect(db) as conn:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("UPDATE events SET payload = '{}' WHERE seq = 2")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute("DELETE FROM events")


def tamper(db: str, sql: str, *args: Any) -> None:
    """Edits the log as an attacker with write access would: drop the
    append-only triggers, then change rows."""
    with sqlite3.connect(db) as conn:
        triggers = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")]
        assert "events_no_update" in triggers
        for name in triggers:
            conn.execute(f'DROP TRIGGER "{name}"')
        assert conn.execute(sql, args).rowcount == 1


def test_verify_names_the_job_and_seq_of_an_edited_event(db: str) -> None:
    executor = je.JobExecutor(dict(HANDLERS, echo=lambda s, c: je.StepOutput(True, {"amount": 10})), db=db)
    honest = run(executor, plan("ok", "ok"))
    target = run(executor, plan("echo", "ok"))
    assert executor.verify().ok
    tamper(
        db,
        "UPDATE events SET payload = replace(payload, '\"amount\":10', '\"amount\":1000') "
        "WHERE job_id = ? AND seq = 3",
        str(target.job_id),
    )
    report = je.JobExecutor(db=db).verify()
    assert not report.ok
    assert (report.jobs, report.failed_jobs) == (2, 1)
    assert {(v.job_id, v.seq, v.check) for v in report.violations} == {(target.job_id, 3, "CHAIN")}
    assert "edited" in report.violations[0].message
    with pytest.raises(je.ReplayError, match="hash chain broken"):
        executor.replay(target.job_id)
    assert executor.replay(honest.job_id) == honest


def test_a_kept_head_reveals_a_cut_off_tail(db: str) -> None:
    executor = je.JobExecutor(HANDLERS, db=db)
    result = run(executor, plan("ok", "ok"))
    tamper(db, "DELETE FROM events WHERE job_id = ? AND seq = 6", str(result.job_id))
    # The shorter chain is consistent on its own ...
    assert executor.verify().violations == []
    # ... but not with the head the evidence carried.
    report = executor.verify(expect={result.job_id: result.head})
    assert not report.ok
    assert [(v.job_id, v.check) for v in report.violations] == [(result.job_id, "EXPECT")]


def test_deterministic_runs_give_byte_identical_logs(tmp_path) -> None:
    contract_id = uuid.UUID("0b6f3a55-1f0e-4c1e-9a8b-2d7c9e4f6a10")
    steps = plan("ok", "ok", "fail", "ok")
    job_ids = [uuid.UUID(int=1), je.derived_job_id(contract_id, steps)]
    assert job_ids[1] == je.derived_job_id(contract_id, plan("ok", "ok", "fail", "ok"))

    def once(path: str, deterministic: bool) -> List[Dict[str, Any]]:
        executor = je.JobExecutor(HANDLERS, db=path, deterministic=deterministic)
        evidence = []
        for job_id in job_ids:
            result = run(executor, steps, job_id=job_id, contract_id=contract_id, health_observer=CountingObserver())
            evidence.append(je.execution_result_to_evidence(result))
        return evidence

    paths = [str(tmp_path / f"{name}.db") for name in ("a", "b", "c")]
    first, second = once(paths[0], True), once(paths[1], True)
    assert canonical(first) == canonical(second)
    assert rows(paths[0]) == rows(paths[1])
    assert first[0]["timing"]["started_at"] == "2000-01-01T00:00:00.000000Z"
    events = [je.JobExecutor(db=p).events(job_ids[1]) for p in paths[:2]]
    assert canonical(events[0]) == canonical(events[1])
    # The wall clock makes the same jobs differ: the comparison above can fail.
    once(paths[2], False)
    assert rows(paths[2]) != rows(paths[0])


def test_a_key_authenticates_every_head(db: str) -> None:
    key = b"a secret of at least sixteen bytes"
    executor = je.JobExecutor(HANDLERS, db=db, key=key)
    result = run(executor, plan("ok"))
    evidence = je.execution_result_to_evidence(result)
    assert re.fullmatch(r"hmac-sha256:[0-9a-f]{64}", evidence["event_log"]["head_mac"])
    assert executor.verify().ok
    assert not je.JobExecutor(db=db, key=b"another key, sixteen bytes or more").verify().ok
    with pytest.raises(ValueError, match="16"):
        je.JobExecutor(key=b"short")


def test_cancel_stops_a_running_job_before_its_next_step(db: str) -> None:
    release = threading.Event()
    in_step = threading.Event()

    def hold(step: je.JobStep, context: je.ExecutionContext) -> je.StepOutput:
        in_step.set()
        assert release.wait(20)
        return je.StepOutput(True, {})

    executor = je.JobExecutor({"hold": hold}, db=db)
    job_id = uuid.uuid4()
    results: List[je.ExecutionResult] = []
    worker = threading.Thread(target=lambda: results.append(run(executor, plan("hold", "hold", "hold"), job_id=job_id)))
    worker.start()
    assert in_step.wait(20)
    # From another executor on the same log, as another process would.
    other = je.JobExecutor(db=db)
    assert other.cancel(job_id, reason="operator asked") is True
    assert other.cancel(job_id) is False
    release.set()
    worker.join(20)
    (result,) = results
    assert result.final_status == je.JobStatus.CANCELLED
    assert result.steps_executed == 1 and result.step_results[0].status == je.StepStatus.COMPLETED
    assert executor.events(job_id)[-1]["payload"]["reason"] == "operator asked"
    with pytest.raises(je.JobEndedError):
        other.cancel(job_id)
    with pytest.raises(je.UnknownJobError):
        other.cancel(uuid.uuid4())


def test_a_file_that_is_not_a_log_is_refused_and_left_untouched(tmp_path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"shopping list: eggs, milk\n")
    with pytest.raises(je.EventLogError, match="not a job-executor database"):
        je.JobExecutor(db=str(path))
    assert path.read_bytes() == b"shopping list: eggs, milk\n"
    assert issubclass(je.EventLogError, je.ExecutorError)


def test_one_executor_is_shared_by_threads_running_different_jobs(db: str) -> None:
    executor = je.JobExecutor(dict(HANDLERS, py=lambda s, c: je.StepOutput(True, {"i": s.step_index})), db=db)
    results: List[je.ExecutionResult] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(5):
            result = run(executor, plan("ok", "py", "ok", "py"))
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 40
    assert all(r.final_status == je.JobStatus.COMPLETED for r in results)
    report = executor.verify()
    assert report.ok and report.jobs == 40 and report.events == 40 * 10


def test_metrics_text_counts_the_jobs_and_steps_run():
    parser = pytest.importorskip("prometheus_client.openmetrics.parser")
    executor = je.JobExecutor(dict(HANDLERS))
    run(executor, plan("ok", "ok"))
    run(executor, plan("ok", "fail", "ok"))
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in parser.text_string_to_metric_families(executor.metrics_text())
        for s in family.samples
    }
    assert samples[("job_executor_jobs_total", (("status", "completed"),))] == 1
    assert samples[("job_executor_jobs_total", (("status", "failed"),))] == 1
    ok = (("status", "completed"), ("step_type", "ok"))
    assert samples[("job_executor_steps_total", ok)] == 3
    failed = (("status", "failed"), ("step_type", "fail"))
    assert samples[("job_executor_steps_total", failed)] == 1
    assert samples[("job_executor_jobs_running", ())] == 0
    assert je.create_default_executor().metrics_text().endswith("# EOF\n")
