"""The same 20-step no-op job, run from Python through job_executor and
through DBOS Transact, side by side in one run.

Both engines write to a fresh SQLite file in WAL mode with
synchronous=FULL (every step's record durable before the next step). Each
configuration (engine x T threads) runs --jobs jobs per run, T at once; the
runs alternate the engines' order, each after os.sync(), and the figures are
medians over --runs runs, with the ratio taken within each run.

    python python/bench/bench_dbos.py --jobs 200 --runs 5 --threads 1,8

Needs the package (pip install ./python) and dbos (pip install dbos).
Prints one JSON line per measurement and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List

import sqlalchemy
from sqlalchemy import event

import job_executor as je

# DBOS records a step in its system database before the workflow goes on:
# the same durability the engine gives each step. DBOS sets neither WAL nor
# synchronous on its SQLite engine; both engines get the same pragmas here.
@event.listens_for(sqlalchemy.engine.Engine, "connect")
def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
    if type(dbapi_conn).__module__.startswith("sqlite3"):
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()


from dbos import DBOS  # noqa: E402  (after the listener, so DBOS's engine gets it)


@DBOS.step()
def dbos_noop_step(index: int) -> None:
    return None


@DBOS.workflow()
def dbos_job(steps: int) -> int:
    for index in range(steps):
        dbos_noop_step(index)
    return steps


def noop(step: je.JobStep, context: je.ExecutionContext) -> je.StepOutput:
    return je.StepOutput(success=True, output={})


class DbosRunner:
    name = "dbos"

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "dbos.sqlite")
        DBOS(config={"name": "bench", "system_database_url": f"sqlite:///{self.path}"})
        DBOS.launch()
        with sqlalchemy.create_engine(f"sqlite:///{self.path}").connect() as conn:
            self.pragmas = (
                conn.exec_driver_sql("PRAGMA journal_mode").scalar(),
                conn.exec_driver_sql("PRAGMA synchronous").scalar(),
            )

    def job(self, steps: int) -> None:
        assert dbos_job(steps) == steps

    def close(self) -> None:
        DBOS.destroy(destroy_registry=False)


class EngineRunner:
    def __init__(self, directory: str, native: bool, polling: bool = False) -> None:
        self.path = os.path.join(directory, "engine.db")
        handler = je.NoOpHandler() if native else noop
        self.executor = je.JobExecutor(
            {"noop": handler}, db=self.path, synchronous="full", polling=polling
        )
        self.contract = uuid.uuid4()
        self.plan: List[je.JobStep] = []

    def job(self, steps: int) -> None:
        if len(self.plan) != steps:
            self.plan = [je.JobStep(i, "noop", f"target-{i}") for i in range(steps)]
        result = self.executor.execute_job(
            job_id=uuid.uuid4(), contract_id=self.contract, steps=self.plan, executed_by="bench"
        )
        assert result.final_status == je.JobStatus.COMPLETED

    def close(self) -> None:
        report = self.executor.verify()
        assert report.ok, report.violations


def fsync_micros(directory: str, samples: int = 200) -> float:
    """Median latency of a small write + fsync in `directory`: the floor of
    a durable commit on this disk, at the moment of the run."""
    path = os.path.join(directory, "fsync.probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        times = []
        for _ in range(samples):
            started = time.perf_counter()
            os.write(fd, b"x" * 128)
            os.fsync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(times) * 1e6


def measure(runner, jobs: int, steps: int, threads: int) -> float:
    """Steps per second for `jobs` jobs, `threads` at a time."""
    for _ in range(max(2, threads)):
        runner.job(steps)  # warm-up: connections, caches, handler threads
    os.sync()
    started = time.perf_counter()
    if threads == 1:
        for _ in range(jobs):
            runner.job(steps)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for future in [pool.submit(runner.job, steps) for _ in range(jobs)]:
                future.result()
    elapsed = time.perf_counter() - started
    return jobs * steps / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", default="1,8")
    parser.add_argument("--native", action="store_true", help="also measure the engine with its Rust no-op handler")
    parser.add_argument("--polling", action="store_true", help="also measure the engine with polling=True")
    args = parser.parse_args()
    import dbos as dbos_package
    from importlib.metadata import version

    print(
        json.dumps(
            {
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "sqlite (python)": __import__("sqlite3").sqlite_version,
                "dbos": version("dbos"),
                "job_executor": je.EXECUTOR_VERSION,
                "jobs": args.jobs,
                "steps": args.steps,
                "runs": args.runs,
            }
        ),
        flush=True,
    )
    del dbos_package
    threads = [int(t) for t in args.threads.split(",")]
    makers: Dict[str, Callable[[str], object]] = {
        "job_executor": lambda d: EngineRunner(d, native=False),
        "dbos": DbosRunner,
    }
    if args.polling:
        makers["job_executor, polling=True"] = lambda d: EngineRunner(d, native=False, polling=True)
    if args.native:
        makers["job_executor, Rust no-op handler"] = lambda d: EngineRunner(d, native=True)
    rates: Dict[tuple, List[float]] = {}
    ratios: Dict[int, List[float]] = {}
    for run in range(args.runs):
        for t in threads:
            names = list(makers)
            if run % 2:
                names.reverse()
            measured: Dict[str, float] = {}
            for name in names:
                with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as directory:
                    runner = makers[name](directory)
                    try:
                        rate = measure(runner, args.jobs, args.steps, t)
                    finally:
                        runner.close()
                    measured[name] = rate
                    rates.setdefault((name, t), []).append(rate)
                    line = {
                        "run": run,
                        "engine": name,
                        "threads": t,
                        "steps_per_s": round(rate, 1),
                        "fsync_us": round(fsync_micros(directory)),
                    }
                    if isinstance(runner, DbosRunner):
                        line["pragmas"] = runner.pragmas
                    print(json.dumps(line), flush=True)
            ratios.setdefault(t, []).append(measured["job_executor"] / measured["dbos"])
    print()
    print("| engine | T | steps/s (median) | min | max |")
    print("|---|---|---|---|---|")
    for (name, t), values in sorted(rates.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"| {name} | {t} | {statistics.median(values):,.0f} | {min(values):,.0f} | {max(values):,.0f} |")
    print()
    for t, values in sorted(ratios.items()):
        print(
            f"T={t}: job_executor / dbos = {statistics.median(values):.1f}x "
            f"(median of {len(values)} within-run ratios; range {min(values):.1f}-{max(values):.1f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
