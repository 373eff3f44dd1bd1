"""The store: compare-and-set transitions, and several processes writing one database at once."""

# Fixtures are imported from tests.support.jobs, so their parameters shadow the imports.
# ruff: noqa: F811

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

from optjob.jobs.service import JobService
from optjob.jobs.store import SCHEMA_VERSION, ConsoleSession, Store
from optjob.settings import Settings, load_settings
from tests.support.jobs import home, make_request, service, settings  # noqa: F401


def test_transition_is_compare_and_set(service: JobService) -> None:
    service.create(make_request("cas"))
    store = service.store
    assert not store.transition("cas", expect=("INPROGRESS",), to="COMPLETED")
    assert store.get("cas").status == "STARTING"
    assert store.transition("cas", expect=("STARTING",), to="INPROGRESS", now=1_800_000_000.0, worker_pid=42)
    record = store.get("cas")
    assert (record.status, record.last_modified_time, record.end_time) == ("INPROGRESS", 1_800_000_000.0, None)
    # Only the recorded worker (or nobody) may claim it.
    assert not store.transition("cas", expect=("INPROGRESS",), worker_ctime=1.0, where_pid=(None, 7))
    assert store.transition("cas", expect=("INPROGRESS",), worker_ctime=1.0, where_pid=(None, 42))
    assert store.transition("cas", expect=("INPROGRESS",), to="FAILED", now=1_800_000_005.0, failure_reason="x")
    record = store.get("cas")
    assert (record.end_time, record.last_modified_time) == (1_800_000_005.0, 1_800_000_005.0)


def test_wal_mode_and_schema_version(settings: Settings) -> None:
    Store(settings.db_path)
    conn = sqlite3.connect(settings.db_path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def _hammer(home: str, worker: int, results: multiprocessing.Queue) -> None:  # runs in a child process
    import os

    os.environ["OPTJOB_HOME"] = home
    service = JobService(load_settings(max_active_jobs=1000), start_executor=False)
    for index in range(20):
        service.create(make_request(f"w{worker}-{index}"))
    won = service.store.transition("contended", expect=("STARTING",), to="INPROGRESS", worker_pid=worker)
    results.put((worker, won))


def test_processes_write_concurrently_and_one_claim_wins(home: Path, service: JobService) -> None:
    service.create(make_request("contended"))
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()
    workers = [context.Process(target=_hammer, args=(str(home), n, results)) for n in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(timeout=60)
        assert process.exitcode == 0
    outcomes = [results.get(timeout=5) for _ in workers]
    winners = [worker for worker, won in outcomes if won]
    assert len(winners) == 1
    assert service.store.get("contended").worker_pid == winners[0]
    assert len(service.store.active()) == 81


def test_schema_2_database_gains_the_executor_columns(service: JobService) -> None:
    """A data directory written before the Ray executor keeps its jobs and gains executor_ref/attempts."""
    service.create(make_request("old"))
    db_path = service.settings.db_path
    conn = sqlite3.connect(db_path)
    conn.execute("ALTER TABLE jobs DROP COLUMN executor_ref")
    conn.execute("ALTER TABLE jobs DROP COLUMN attempts")
    conn.execute("ALTER TABLE jobs DROP COLUMN outcome_json")  # schema 4's
    conn.execute("DROP TABLE console_sessions")
    conn.execute("PRAGMA user_version=2")
    conn.commit()
    conn.close()
    migrated = Store(db_path)
    columns = {row[1] for row in sqlite3.connect(db_path).execute("PRAGMA table_info(jobs)")}
    assert {"executor_ref", "attempts"} <= columns
    assert sqlite3.connect(db_path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    record = migrated.get("old")
    assert (record.status, record.attempts, record.executor_ref) == ("STARTING", 0, None)


def test_schema_3_database_gains_outcomes_and_console_sessions(service: JobService) -> None:
    """A data directory written before the console keeps its jobs and gains outcome_json and the
    sessions table; the migrated store records and returns both."""
    service.create(make_request("older"))
    db_path = service.settings.db_path
    conn = sqlite3.connect(db_path)
    conn.execute("ALTER TABLE jobs DROP COLUMN outcome_json")
    conn.execute("DROP TABLE console_sessions")
    conn.execute("PRAGMA user_version=3")
    conn.commit()
    conn.close()
    migrated = Store(db_path)
    assert sqlite3.connect(db_path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert migrated.get("older").outcome == {}
    assert migrated.transition("older", expect=("STARTING",), outcome_json='{"failure_kind": "input"}')
    assert migrated.get("older").outcome == {"failure_kind": "input"}
    session = ConsoleSession("ab" * 32, "AKIA", "us-east-1", "csrf", created=100.0, expires=200.0)
    migrated.create_session(session)
    assert migrated.get_session("ab" * 32, now=150.0) == session
    assert migrated.get_session("ab" * 32, now=250.0) is None  # expired
    migrated.delete_session("ab" * 32)
    assert migrated.get_session("ab" * 32, now=150.0) is None
