"""Where the job's CreateOptimizationJob request comes from, and its validation (exactly Create's).

Sources, first one set wins: ``--spec FILE|s3://...``, ``OPTJOB_SPEC`` (the request itself, JSON
or YAML, as a Kubernetes ConfigMap or a Batch environment override hands it over), then
``OPTJOB_SPEC_URI`` (a file or an S3 URI, what a job definition with a parameter passes). The
text is parsed by ``optjob validate``'s own reader and validated by the same two steps as
``CreateOptimizationJob``: the API shapes, then the planner, so a spec the worker accepts is one
the service would have accepted and vice versa.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optjob.api.errors import ApiError, ValidationException, parse
from optjob.api.shapes import CreateOptimizationJobRequest
from optjob.cli.validate import UnreadableSpec, read_spec
from optjob.errors import InputError, JobFailed
from optjob.pipeline.plan import Plan, build_plan
from optjob.storage.s3 import make_client, storage_error
from optjob.storage.uri import parse_s3_uri

SPEC_ENV = "OPTJOB_SPEC"
SPEC_URI_ENV = "OPTJOB_SPEC_URI"


class NoSpec(Exception):
    """No spec was given at all: a usage error (exit 64), not a failed job."""


@dataclass(frozen=True)
class SpecSource:
    kind: str  # "argument", "OPTJOB_SPEC" or "OPTJOB_SPEC_URI"
    value: str

    def describe(self) -> str:
        if self.kind == SPEC_ENV:
            return f"{SPEC_ENV} (inline, {len(self.value)} characters)"
        return f"{self.value} (from {self.kind})"


def choose_source(argument: str | None, environ: dict[str, str] | None = None) -> SpecSource:
    env = os.environ if environ is None else environ
    if argument:
        return SpecSource("--spec", argument)
    if env.get(SPEC_ENV, "").strip():
        return SpecSource(SPEC_ENV, env[SPEC_ENV])
    if env.get(SPEC_URI_ENV, "").strip():
        return SpecSource(SPEC_URI_ENV, env[SPEC_URI_ENV].strip())
    raise NoSpec(
        f"no job spec: pass --spec FILE|s3://bucket/key, or set {SPEC_ENV} (the request as JSON) or "
        f"{SPEC_URI_ENV} (a file or S3 URI)"
    )


def _is_s3(value: str) -> bool:
    return value.startswith(("s3://", "https://"))


def _parse_text(text: str, name: str) -> dict[str, Any]:
    """Parse with ``optjob validate``'s reader (JSON, else YAML, must be an object) so both agree."""
    with tempfile.TemporaryDirectory(prefix="optjob-spec-") as tmp:
        path = Path(tmp) / "spec"
        path.write_text(text, encoding="utf-8")
        try:
            return read_spec(str(path))
        except UnreadableSpec as exc:
            raise InputError(f"the job spec from {name} is unreadable: {str(exc).replace(str(path), name)}") from None


def _download(uri: str) -> str:
    location = parse_s3_uri(uri)
    client = make_client()
    try:
        body = client.get_object(Bucket=location.bucket, Key=location.key)["Body"].read()
    except Exception as exc:
        raise storage_error(exc, "read the job spec at", uri) from exc
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"the job spec at {uri} is not UTF-8 text") from None


def load_raw(source: SpecSource) -> dict[str, Any]:
    """The request as a dict. Raises InputError (unreadable, missing) or InfrastructureError (S3 down)."""
    if source.kind == SPEC_ENV:
        return _parse_text(source.value, SPEC_ENV)
    if _is_s3(source.value):
        return _parse_text(_download(source.value), source.value)
    try:
        return read_spec(source.value)
    except UnreadableSpec as exc:
        raise InputError(f"the job spec is unreadable: {exc}") from None


def validate(
    raw: dict[str, Any], *, region: str, resolve_model: Callable[[str], str | None] | None
) -> tuple[CreateOptimizationJobRequest, Plan]:
    """Create's validation: shapes, then the planner. Raises ApiError (ValidationException)."""
    request = parse(CreateOptimizationJobRequest, raw)
    plan = plan_request(request, region=region, resolve_model=resolve_model)
    return request, plan


def plan_request(
    request: CreateOptimizationJobRequest, *, region: str, resolve_model: Callable[[str], str | None] | None
) -> Plan:
    try:
        return build_plan(request, region=region, resolve_model=resolve_model)
    except JobFailed as exc:  # a planner check that speaks the pipeline's language, as in JobService.create
        raise ValidationException(str(exc)) from None


def no_registry(name: str) -> str | None:
    """Standalone workers have no model registry: every SageMakerModel name is unknown."""
    return None


__all__ = ["ApiError", "NoSpec", "SpecSource", "choose_source", "load_raw", "no_registry", "validate"]
