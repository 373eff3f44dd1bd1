"""Process-wide settings from the environment: where state lives and which account/region we are.

Standard AWS names are honoured where they exist (``AWS_REGION``, ``AWS_DEFAULT_REGION``);
optjob's own knobs use the ``OPTJOB_`` prefix and are documented in the README.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_ACCOUNT = "000000000000"
DEFAULT_REGION = "us-east-1"


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    home: Path = Field(description="data directory: SQLite store, job logs, caches")
    region: str
    account_id: str = Field(pattern=r"\d{12}")
    partition: str = "aws"
    max_active_jobs: int = Field(20, ge=1, description="non-terminal jobs before ResourceLimitExceeded")
    executor_slots: int = Field(1, ge=1, description="jobs that run at once on this host")
    stop_grace_s: float = Field(120.0, gt=0, description="SIGTERM-to-SIGKILL grace for a stopping job")

    @property
    def db_path(self) -> Path:
        return self.home / "optjob.sqlite3"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def work_root(self) -> Path:
        return self.home / "work"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    def job_arn(self, name: str) -> str:
        return f"arn:{self.partition}:sagemaker:{self.region}:{self.account_id}:optimization-job/{name}"


def _partition(region: str) -> str:
    if region.startswith("cn-"):
        return "aws-cn"
    if region.startswith("us-gov-"):
        return "aws-us-gov"
    return "aws"


def load_settings(**overrides: object) -> Settings:
    """Settings from ``OPTJOB_*`` and the standard AWS region variables; keyword overrides win."""
    env = os.environ
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    values: dict[str, object] = {
        "home": Path(env.get("OPTJOB_HOME") or Path.home() / ".optjob").expanduser(),
        "region": region,
        "account_id": env.get("OPTJOB_ACCOUNT_ID", DEFAULT_ACCOUNT),
        "partition": _partition(region),
    }
    for key, var in (
        ("max_active_jobs", "OPTJOB_MAX_ACTIVE_JOBS"),
        ("executor_slots", "OPTJOB_EXECUTOR_SLOTS"),
        ("stop_grace_s", "OPTJOB_STOP_GRACE_SECONDS"),
    ):
        if env.get(var):
            values[key] = env[var]
    values.update(overrides)
    return Settings.model_validate(values)
