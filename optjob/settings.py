"""Process-wide settings from the environment: where state lives and which account/region we are.

Standard AWS names are honoured where they exist (``AWS_REGION``, ``AWS_DEFAULT_REGION``);
optjob's own knobs use the ``OPTJOB_`` prefix and are documented in docs/jobs.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_ACCOUNT = "000000000000"
DEFAULT_REGION = "us-east-1"
ROLES_FILE_ENV = "OPTJOB_ROLES_FILE"
ASSUME_ROLE_ENV = "OPTJOB_ASSUME_ROLE"
RoleCredentials = Literal["ambient", "roles-file", "sts"]


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True)

    home: Path = Field(description="data directory: SQLite store, job logs, caches")
    region: str
    account_id: str = Field(pattern=r"\d{12}")
    max_active_jobs: int = Field(20, ge=1, description="non-terminal jobs before ResourceLimitExceeded")
    executor_slots: int = Field(1, ge=1, description="jobs that run at once on this host")
    stop_grace_s: float = Field(120.0, gt=0, description="SIGTERM-to-SIGKILL grace for a stopping job")
    executor: Literal["local", "ray"] = Field(
        "local", description="what runs workers: 'local' (processes on this host) or 'ray' (the cluster at RAY_ADDRESS)"
    )
    ray_address: str | None = Field(None, description="the Ray cluster's GCS address (RAY_ADDRESS), or 'auto'")
    ray_node_ip: str | None = Field(
        None, description="this host's address as Ray nodes see it (OPTJOB_RAY_NODE_IP; 127.0.0.2 on loopback)"
    )
    role_credentials: RoleCredentials = Field(
        "ambient",
        description="where a job's S3 credentials come from: 'ambient' (optjob's own AWS credential chain, "
        "RoleArn recorded only), 'roles-file' (the role's keys in roles_file) or 'sts' (AssumeRole)",
    )
    roles_file: Path | None = Field(None, description="INI file: role ARN sections with that role's keys")

    @model_validator(mode="after")
    def _roles_file_given(self) -> Settings:
        if (self.role_credentials == "roles-file") != (self.roles_file is not None):
            raise ValueError("role_credentials 'roles-file' and roles_file go together")
        return self

    @property
    def role_source(self) -> str:
        """What a job created now records as its credentials' source (a path, never a secret)."""
        return f"roles-file:{self.roles_file}" if self.roles_file is not None else self.role_credentials

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


EXECUTOR_ENV = "OPTJOB_EXECUTOR"


def load_settings(**overrides: object) -> Settings:
    """Settings from ``OPTJOB_*`` and the standard AWS region variables; keyword overrides win."""
    env = os.environ
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    values: dict[str, object] = {
        "home": Path(env.get("OPTJOB_HOME") or Path.home() / ".optjob").expanduser(),
        "region": region,
        "account_id": env.get("OPTJOB_ACCOUNT_ID", DEFAULT_ACCOUNT),
    }
    for key, var in (
        ("max_active_jobs", "OPTJOB_MAX_ACTIVE_JOBS"),
        ("executor_slots", "OPTJOB_EXECUTOR_SLOTS"),
        ("stop_grace_s", "OPTJOB_STOP_GRACE_SECONDS"),
        ("executor", EXECUTOR_ENV),
        ("ray_address", "RAY_ADDRESS"),
        ("ray_node_ip", "OPTJOB_RAY_NODE_IP"),
    ):
        if env.get(var):
            values[key] = env[var]
    if env.get(ROLES_FILE_ENV):
        values["role_credentials"] = "roles-file"
        values["roles_file"] = Path(env[ROLES_FILE_ENV]).expanduser().absolute()
    elif env.get(ASSUME_ROLE_ENV) == "1":
        values["role_credentials"] = "sts"
    values.update(overrides)
    return Settings.model_validate(values)
