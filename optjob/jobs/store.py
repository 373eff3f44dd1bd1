"""Durable job records: one SQLite database (WAL) per data directory, shared by every process.

The CLI, the HTTP server, the executor and each worker open the same file at once, so every
state change is a compare-and-set inside ``BEGIN IMMEDIATE``: ``transition`` only moves a job
whose status is still one the caller expected. That is what makes a Stop racing a completion,
or two executors racing for one queued job, safe without any lock beyond SQLite's own.

Jobs belong to a tenant, an (account, region) pair: names are unique per tenant, as SageMaker's are
per account and region, so every row also carries a ``job_key`` unique across tenants. The key is
what the executor, the worker, the scratch directory and the logs use; it is the plain name for the
store's home tenant (the account and region optjob runs as), which keeps single-tenant data
directories exactly as they were, and ``NAME.ACCOUNT.REGION`` otherwise (names cannot hold dots).

The schema carries a version (``PRAGMA user_version``); a database written by a newer optjob is
refused rather than misread, and an older one is migrated in place. Times are epoch seconds
rounded to milliseconds, the precision the API returns, so filters on List compare exactly what
Describe shows.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optjob.api.shapes import TERMINAL_STATUSES, CreateOptimizationJobRequest

if TYPE_CHECKING:
    from optjob.pipeline.plan import Plan

SCHEMA_VERSION = 4
ACTIVE_STATUSES: tuple[str, ...] = ("STARTING", "INPROGRESS", "STOPPING")
FINAL_STATUSES: tuple[str, ...] = tuple(sorted(TERMINAL_STATUSES))

_JOBS_TABLE = """
CREATE TABLE jobs (
    job_key            TEXT PRIMARY KEY,    -- unique across tenants (see the module docstring)
    account_id         TEXT NOT NULL,
    region             TEXT NOT NULL,
    name               TEXT NOT NULL,
    arn                TEXT NOT NULL,
    status             TEXT NOT NULL,
    creation_time      REAL NOT NULL,
    last_modified_time REAL NOT NULL,
    start_time         REAL,
    end_time           REAL,
    failure_reason     TEXT,
    output_image       TEXT,
    instance_type      TEXT NOT NULL,
    max_instance_count INTEGER,
    optimization_types TEXT NOT NULL,       -- '|Quantization|Compilation|': substring-searchable
    max_runtime_s      REAL,
    max_pending_s      REAL,
    request_json       TEXT NOT NULL,
    plan_json          TEXT NOT NULL,
    tags_json          TEXT NOT NULL,
    log_path           TEXT NOT NULL,
    worker_pid         INTEGER,
    worker_ctime       REAL,                -- the worker's start time, to tell a reused pid apart
    stop_reason        TEXT,                -- 'user' (StopOptimizationJob) or 'timeout'
    stop_requested_at  REAL,
    last_event_json    TEXT,
    role_source        TEXT NOT NULL,       -- where the worker gets RoleArn's credentials (never the secrets)
    executor_ref       TEXT,                -- what a non-process executor runs the job as (a Ray actor's name)
    attempts           INTEGER NOT NULL DEFAULT 0,  -- attempts started (more than one after a lost node)
    outcome_json       TEXT,                -- how it ended: figures, sizes, warnings (see JobRecord.outcome)
    UNIQUE (account_id, region, name)
);
CREATE INDEX jobs_by_creation ON jobs (account_id, region, creation_time, name);
CREATE INDEX jobs_by_status ON jobs (status, name);
CREATE INDEX jobs_by_modified ON jobs (account_id, region, last_modified_time)
"""
_SESSIONS_TABLE = """
CREATE TABLE console_sessions (
    token_sha256  TEXT PRIMARY KEY,        -- the cookie's token is never stored, only its hash
    access_key_id TEXT NOT NULL,           -- the signed-in principal's key (its secret is never stored)
    region        TEXT NOT NULL,
    csrf_token    TEXT NOT NULL,
    created       REAL NOT NULL,
    expires       REAL NOT NULL
)
"""
_SCHEMA = (
    _JOBS_TABLE
    + """;
CREATE TABLE models (
    name          TEXT PRIMARY KEY,
    s3_uri        TEXT NOT NULL,
    creation_time REAL NOT NULL
);
"""
    + _SESSIONS_TABLE
)


class StoreError(Exception):
    """The database cannot be used (e.g. written by a newer optjob)."""


class DuplicateJob(StoreError):
    """A job with this name already exists."""


class TooManyActiveJobs(StoreError):
    """Creating the job would exceed the limit on non-terminal jobs."""


def now_ms(clock: float | None = None) -> float:
    """Epoch seconds at millisecond precision, the resolution the API exposes."""
    return round(time.time() if clock is None else clock, 3)


@dataclass(frozen=True)
class JobRecord:
    """One row of ``jobs``, typed. ``request_json``/``plan_json`` stay text until needed."""

    job_key: str
    account_id: str
    region: str
    name: str
    arn: str
    status: str
    creation_time: float
    last_modified_time: float
    start_time: float | None
    end_time: float | None
    failure_reason: str | None
    output_image: str | None
    instance_type: str
    max_instance_count: int | None
    optimization_types: str
    max_runtime_s: float | None
    max_pending_s: float | None
    request_json: str
    plan_json: str
    tags_json: str
    log_path: str
    worker_pid: int | None
    worker_ctime: float | None
    stop_reason: str | None
    stop_requested_at: float | None
    last_event_json: str | None
    role_source: str
    executor_ref: str | None = None
    attempts: int = 0
    outcome_json: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def types(self) -> list[str]:
        return [t for t in self.optimization_types.split("|") if t]

    @property
    def last_event(self) -> dict[str, Any] | None:
        return json.loads(self.last_event_json) if self.last_event_json else None

    @property
    def tags(self) -> list[dict[str, str]]:
        return json.loads(self.tags_json)

    @property
    def outcome(self) -> dict[str, Any]:
        """What the worker recorded when the job ended (``optjob.pipeline.outcome.outcome_summary``):
        per-stage figures, sizes and warnings; empty for a job that has not ended or ended before
        schema 4."""
        return json.loads(self.outcome_json) if self.outcome_json else {}


JOB_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(JobRecord))
_UPDATABLE = frozenset(JOB_COLUMNS) - {
    "job_key",
    "account_id",
    "region",
    "name",
    "arn",
    "creation_time",
    "request_json",
    "plan_json",
    "role_source",
}


def encode_types(types: Iterable[str]) -> str:
    return "|" + "|".join(types) + "|"


def job_key(name: str, account_id: str, region: str, *, home: tuple[str, str]) -> str:
    """The row's key: the plain name in the home tenant (account, region), else NAME.ACCOUNT.REGION."""
    return name if (account_id, region) == home else f"{name}.{account_id}.{region}"


def _arn_tenant(arn: str) -> tuple[str, str]:
    """(account, region) of ``arn:PARTITION:sagemaker:REGION:ACCOUNT:optimization-job/NAME``."""
    parts = arn.split(":")
    return parts[4], parts[3]


@dataclass(frozen=True)
class ModelRecord:
    name: str
    s3_uri: str
    creation_time: float


@dataclass(frozen=True)
class ConsoleSession:
    """A signed-in console user: which key signed in, for which region, until when."""

    token_sha256: str
    access_key_id: str
    region: str
    csrf_token: str
    created: float
    expires: float


class Store:
    """The jobs database. Safe to share between threads: each thread gets its own connection."""

    def __init__(self, db_path: Path, *, busy_timeout_s: float = 30.0) -> None:
        """``db_path``: the SQLite file, created (or migrated from an older schema) on first use."""
        self.db_path = Path(db_path)
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    # --- connections and transactions ----------------------------------------------------

    @property
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=self._busy_timeout_s, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``: takes the write lock up front so read-then-write cannot interleave."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.db_path} has schema version {version}, newer than this optjob "
                    f"understands ({SCHEMA_VERSION}); upgrade optjob or use another OPTJOB_HOME"
                )
            if version == 0:
                _run_script(conn, _SCHEMA)
            elif version == 1:
                _migrate_v1(conn)  # rebuilds jobs in the current shape
                _run_script(conn, _SESSIONS_TABLE)
            elif version == 2:
                _migrate_v2(conn)
                _migrate_v3(conn)
            elif version == 3:
                _migrate_v3(conn)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # --- jobs ----------------------------------------------------------------------------

    def create_job(self, record: JobRecord, *, max_active: int) -> JobRecord:
        """Insert a new job; raises DuplicateJob or TooManyActiveJobs without inserting.

        The name is unique per tenant (account and region); the active-job limit is per account,
        across regions, since every region's jobs run on this one host. Returns the record as stored: its key
        is qualified when the plain one is taken by a job of another tenant (a data directory
        whose home account or region was changed), so keys never collide.
        """
        tenant = (record.account_id, record.region)
        with self.transaction() as conn:
            taken = "SELECT 1 FROM jobs WHERE account_id = ? AND region = ? AND name = ?"
            if conn.execute(taken, (*tenant, record.name)).fetchone():
                raise DuplicateJob(record.name)
            # The limit counts the account's jobs in every region: they all share this host.
            active = conn.execute(
                f"SELECT COUNT(*) FROM jobs WHERE account_id = ? AND status IN ({_marks(ACTIVE_STATUSES)})",
                (record.account_id, *ACTIVE_STATUSES),
            ).fetchone()[0]
            if active >= max_active:
                raise TooManyActiveJobs(str(active))
            if conn.execute("SELECT 1 FROM jobs WHERE job_key = ?", (record.job_key,)).fetchone():
                record = replace(record, job_key=job_key(record.name, *tenant, home=("", "")))
            values = [getattr(record, column) for column in JOB_COLUMNS]
            conn.execute(f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) VALUES ({_marks(JOB_COLUMNS)})", values)
        return record

    def get(self, key: str) -> JobRecord | None:
        """The job with this ``job_key`` (what workers, the executor and outcomes hold)."""
        row = self._conn.execute("SELECT * FROM jobs WHERE job_key = ?", (key,)).fetchone()
        return _record(row) if row else None

    def find(self, account_id: str, region: str, name: str) -> JobRecord | None:
        """The tenant's job with this name (what API callers name)."""
        row = self._conn.execute(
            "SELECT * FROM jobs WHERE account_id = ? AND region = ? AND name = ?", (account_id, region, name)
        ).fetchone()
        return _record(row) if row else None

    def active(self) -> list[JobRecord]:
        """Every non-terminal job, oldest first (the executor's queue order)."""
        rows = self._conn.execute(
            f"SELECT * FROM jobs WHERE status IN ({_marks(ACTIVE_STATUSES)}) ORDER BY creation_time, name",
            ACTIVE_STATUSES,
        ).fetchall()
        return [_record(row) for row in rows]

    def transition(
        self,
        key: str,
        *,
        expect: Sequence[str],
        to: str | None = None,
        now: float | None = None,
        where_pid: tuple[int | None, ...] | None = None,
        **changes: Any,
    ) -> bool:
        """Compare-and-set: apply ``changes`` (and ``status=to``) only if the status is in ``expect``.

        ``where_pid`` additionally requires ``worker_pid`` to be one of the given values (``None``
        meaning unset), so a worker can claim a job only if no other worker owns it. A status
        change bumps LastModifiedTime; entering a terminal status sets OptimizationEndTime.
        Returns whether the row changed.
        """
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        moment = now_ms(now)
        if to is not None:
            changes["status"] = to
            changes["last_modified_time"] = moment
            if to in TERMINAL_STATUSES:
                changes.setdefault("end_time", moment)
        if not changes:
            return False
        sets = ", ".join(f"{column} = ?" for column in changes)
        where = f"job_key = ? AND status IN ({_marks(expect)})"
        params: list[Any] = [*changes.values(), key, *expect]
        if where_pid is not None:
            pids = [p for p in where_pid if p is not None]
            clauses = ["worker_pid IS NULL"] if None in where_pid else []
            if pids:
                clauses.append(f"worker_pid IN ({_marks(pids)})")
            where += f" AND ({' OR '.join(clauses)})"
            params.extend(pids)
        with self.transaction() as conn:
            return conn.execute(f"UPDATE jobs SET {sets} WHERE {where}", params).rowcount == 1

    def record_event(self, key: str, event: dict[str, Any]) -> None:
        """Keep the latest progress event; it is not a change of the job, so LastModifiedTime stays."""
        with self.transaction() as conn:
            conn.execute("UPDATE jobs SET last_event_json = ? WHERE job_key = ?", (json.dumps(event), key))

    def delete_terminal(self, key: str) -> str:
        """Delete a terminal job: returns ``deleted``, ``missing`` or the status that forbade it."""
        with self.transaction() as conn:
            row = conn.execute("SELECT status FROM jobs WHERE job_key = ?", (key,)).fetchone()
            if row is None:
                return "missing"
            if row["status"] not in TERMINAL_STATUSES:
                return row["status"]
            conn.execute("DELETE FROM jobs WHERE job_key = ?", (key,))
            return "deleted"

    def select(
        self, tenant: tuple[str, str], where: str, params: Sequence[Any], order_by: str, limit: int
    ) -> list[JobRecord]:
        """One tenant's rows for List; ``where`` and ``order_by`` are built by ``optjob.jobs.listing`` only."""
        sql = f"SELECT * FROM jobs WHERE account_id = ? AND region = ? AND ({where or '1'}) ORDER BY {order_by} LIMIT ?"
        return [_record(row) for row in self._conn.execute(sql, [*tenant, *params, limit]).fetchall()]

    # --- the model registry (ModelSource.SageMakerModel / OutputConfig.SageMakerModel) ---

    def register_model(self, name: str, s3_uri: str, *, now: float | None = None) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO models (name, s3_uri, creation_time) VALUES (?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET s3_uri = excluded.s3_uri",
                (name, s3_uri, now_ms(now)),
            )

    def get_model(self, name: str) -> ModelRecord | None:
        row = self._conn.execute("SELECT * FROM models WHERE name = ?", (name,)).fetchone()
        return ModelRecord(**dict(row)) if row else None

    def list_models(self) -> list[ModelRecord]:
        rows = self._conn.execute("SELECT * FROM models ORDER BY name").fetchall()
        return [ModelRecord(**dict(row)) for row in rows]

    # --- the console's sign-in sessions ----------------------------------------------------

    def create_session(self, session: ConsoleSession) -> None:
        """Store a new session and drop every expired one (sessions are few; this keeps the table small)."""
        with self.transaction() as conn:
            conn.execute("DELETE FROM console_sessions WHERE expires < ?", (session.created,))
            conn.execute(
                "INSERT INTO console_sessions (token_sha256, access_key_id, region, csrf_token, created, expires) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (session.token_sha256, session.access_key_id, session.region, session.csrf_token,
                 session.created, session.expires),
            )  # fmt: skip

    def get_session(self, token_sha256: str, *, now: float) -> ConsoleSession | None:
        row = self._conn.execute(
            "SELECT * FROM console_sessions WHERE token_sha256 = ? AND expires >= ?", (token_sha256, now)
        ).fetchone()
        return ConsoleSession(**dict(row)) if row else None

    def delete_session(self, token_sha256: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM console_sessions WHERE token_sha256 = ?", (token_sha256,))

    def count_by_status_and_type(self) -> list[tuple[str, str, int]]:
        """(status, optimization types as stored, jobs) over every tenant: what /metrics reports."""
        rows = self._conn.execute(
            "SELECT status, optimization_types, COUNT(*) AS n FROM jobs GROUP BY status, optimization_types"
        ).fetchall()
        return [(row["status"], row["optimization_types"], int(row["n"])) for row in rows]

    def ended(self) -> list[JobRecord]:
        """Every terminal job, for the figures /metrics derives from how jobs ended."""
        rows = self._conn.execute(
            f"SELECT * FROM jobs WHERE status IN ({_marks(FINAL_STATUSES)})", FINAL_STATUSES
        ).fetchall()
        return [_record(row) for row in rows]

    def ping(self) -> None:
        """Raise if the database cannot be read (``/readyz``)."""
        self._conn.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()


def _marks(items: Sequence[Any]) -> str:
    return ", ".join("?" for _ in items)


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    # executescript would COMMIT our transaction; run the statements one by one.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _migrate_v1(conn: sqlite3.Connection) -> None:
    """Schema 1 (one tenant, keyed by name) to 2: each job's tenant is read from its ARN, its key
    is its name (unique in schema 1), and its credentials were always the ambient ones."""
    for index in ("jobs_by_creation", "jobs_by_status", "jobs_by_modified"):
        conn.execute(f"DROP INDEX IF EXISTS {index}")
    conn.execute("ALTER TABLE jobs RENAME TO jobs_v1")
    _run_script(conn, _JOBS_TABLE)
    old_columns = [c for c in JOB_COLUMNS if c not in ("job_key", "account_id", "region", "role_source", *_V3_COLUMNS)]
    for row in conn.execute(f"SELECT {', '.join(old_columns)} FROM jobs_v1").fetchall():
        account_id, region = _arn_tenant(row["arn"])
        values = {"job_key": row["name"], "account_id": account_id, "region": region, "role_source": "ambient"}
        values.update({column: row[column] for column in old_columns})
        conn.execute(f"INSERT INTO jobs ({', '.join(values)}) VALUES ({_marks(list(values))})", list(values.values()))
    conn.execute("DROP TABLE jobs_v1")


def _record(row: sqlite3.Row) -> JobRecord:
    return JobRecord(**{column: row[column] for column in JOB_COLUMNS})


def starting_record(
    request: CreateOptimizationJobRequest,
    plan: Plan | None,
    arn: str,
    *,
    now: float,
    log_path: str,
    home: tuple[str, str] | None = None,
    role_source: str = "ambient",
    worker_pid: int | None = None,
    worker_ctime: float | None = None,
) -> JobRecord:
    """A new job's record: STARTING, created now (``plan`` None: planning failed; a container worker
    that runs the job itself passes its own pid). The tenant is the ARN's; ``home`` is the store's
    home tenant, whose jobs are keyed by their plain name (None: the ARN's tenant is home)."""
    stopping = request.stopping_condition
    name = request.optimization_job_name
    account_id, region = _arn_tenant(arn)
    return JobRecord(
        job_key=job_key(name, account_id, region, home=home or (account_id, region)),
        account_id=account_id,
        region=region,
        name=name,
        arn=arn,
        status="STARTING",
        creation_time=now,
        last_modified_time=now,
        start_time=None,
        end_time=None,
        failure_reason=None,
        output_image=None,
        instance_type=request.deployment_instance_type,
        max_instance_count=request.max_instance_count,
        optimization_types=encode_types(plan.optimization_types if plan else []),
        max_runtime_s=stopping.max_runtime_in_seconds,
        max_pending_s=stopping.max_pending_time_in_seconds,
        request_json=json.dumps(request.dump()),
        plan_json=plan.model_dump_json() if plan else "null",
        tags_json=json.dumps([tag.dump() for tag in request.tags or []]),
        log_path=log_path,
        worker_pid=worker_pid,
        worker_ctime=worker_ctime,
        stop_reason=None,
        stop_requested_at=None,
        last_event_json=None,
        role_source=role_source,
    )


_V3_COLUMNS = ("executor_ref", "attempts", "outcome_json")


def _migrate_v2(conn: sqlite3.Connection) -> None:
    """Schema 2 to 3: the executor's reference to a job's worker and the attempt count (for retries)."""
    conn.execute("ALTER TABLE jobs ADD COLUMN executor_ref TEXT")
    conn.execute("ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0")


def _migrate_v3(conn: sqlite3.Connection) -> None:
    """Schema 3 to 4: how each job ended (its figures, for the console and /metrics) and the console's
    sign-in sessions."""
    conn.execute("ALTER TABLE jobs ADD COLUMN outcome_json TEXT")
    _run_script(conn, _SESSIONS_TABLE)
