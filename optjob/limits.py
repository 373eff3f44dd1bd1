"""``configs/limits.yaml`` as one typed object: the bounds hostile or careless input meets.

Rules are data: how large a request body may be, how deep its JSON may nest and how much of an
offending value an error repeats are read from the file, once, so an operator can tighten them
without touching code.
"""

from __future__ import annotations

from functools import cache

from pydantic import BaseModel, ConfigDict, Field

from optjob.config_files import load_config


class ApiLimits(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_body_bytes: int = Field(gt=0)
    max_json_depth: int = Field(gt=1)
    max_echoed_value_chars: int = Field(gt=3)
    max_listed_violations: int = Field(gt=0)


class Limits(BaseModel):
    """``configs/limits.yaml``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api: ApiLimits


@cache
def limits() -> Limits:
    return Limits.model_validate(load_config("limits.yaml"))
