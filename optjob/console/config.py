"""``configs/console.yaml`` as typed settings: the console's and /metrics' knobs are data."""

from __future__ import annotations

from functools import cache

from pydantic import BaseModel, ConfigDict, Field

from optjob.config_files import load_config


class ConsoleConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    session_hours: float = Field(gt=0)
    refresh_seconds: float = Field(gt=0, le=5)
    log_tail_records: int = Field(ge=1, le=10_000)
    page_size: int = Field(ge=1, le=100)
    secret_key_words: tuple[str, ...]


class MetricsConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    job_seconds_buckets: tuple[float, ...]
    phase_seconds_buckets: tuple[float, ...]
    request_seconds_buckets: tuple[float, ...]


class ObservabilityConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    console: ConsoleConfig
    metrics: MetricsConfig


@cache
def observability_config() -> ObservabilityConfig:
    return ObservabilityConfig.model_validate(load_config("console.yaml"))
