"""``configs/limits.yaml`` as one typed object: the bounds hostile or careless input meets.

Rules are data: how large a request body may be, how deep its JSON may nest, how much of an
offending value an error repeats, and which config.json numbers a model may claim are read from
the file, once, so an operator can tighten them without touching code.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from optjob.config_files import load_config


class ApiLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_body_bytes: int = Field(gt=0)
    max_json_depth: int = Field(gt=1)
    max_echoed_value_chars: int = Field(gt=3)
    max_listed_violations: int = Field(gt=0)


class ModelLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_json_depth: int = Field(gt=1)
    config_ranges: dict[str, tuple[int, int]]


class RedactionRules(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    secret_name_words: tuple[str, ...]
    secret_value_patterns: tuple[str, ...]


class ArchiveLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_total_gib: float = Field(gt=0)
    max_files: int = Field(gt=0)
    max_ratio: float = Field(gt=1)
    ratio_floor_mib: float = Field(ge=0)


class ModelFiles(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keep: tuple[str, ...]


class JobLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stop_deadline_seconds: float = Field(gt=0)


class Limits(BaseModel):
    """``configs/limits.yaml``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api: ApiLimits
    model: ModelLimits
    redaction: RedactionRules
    archive: ArchiveLimits
    model_files: ModelFiles
    jobs: JobLimits


@cache
def limits() -> Limits:
    return Limits.model_validate(load_config("limits.yaml"))


def json_deeper_than(data: Any, limit: int) -> bool:
    """Whether parsed JSON nests objects and arrays more than ``limit`` levels. Iterative, so data
    nested as deep as a parser allowed cannot exhaust the stack here either."""
    stack = [(data, 1)]
    while stack:
        value, level = stack.pop()
        if isinstance(value, dict | list):
            if level > limit:
                return True
            stack.extend((child, level + 1) for child in (value.values() if isinstance(value, dict) else value))
    return False
