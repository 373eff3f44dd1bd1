"""Request + target + layered environment -> Plan: every check that can run before any work.

The Plan is a value: immutable, JSON-serializable, computed the same way at Create (to reject bad
requests with ``ValidationException``) and in the worker (to run them). It is saved beside the
artifacts as the job's provenance, like llm-compressor's ``recipe.yaml``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from optjob.api.errors import ValidationException, truncate
from optjob.api.shapes import UNION_MEMBERS, CreateOptimizationJobRequest
from optjob.config_files import load_config
from optjob.errors import InputError
from optjob.pipeline.env import layer_env
from optjob.pipeline.stage import PlanError, PlannedStage, technique_for
from optjob.storage.archive import is_archive_key
from optjob.storage.eula import gated_source_reason
from optjob.storage.uri import parse_s3_uri
from optjob.targets.catalog import InstanceSpec, instance


class SourceRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    s3_uri: str | None = None
    model_name: str | None = Field(None, description="a SageMakerModel name, resolved by the registry")
    accept_eula: bool = False


class OutputRef(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    s3_uri: str
    kms_key_id: str | None = None
    model_name: str | None = None


class Plan(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    job_name: str
    region: str
    target: InstanceSpec
    source: SourceRef
    output: OutputRef
    stages: tuple[PlannedStage, ...]
    recommended_image: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def optimization_types(self) -> list[str]:
        return [stage.optimization_type for stage in self.stages]

    def summary_lines(self) -> list[str]:
        """What ``optjob validate`` prints: the target and the techniques in order."""
        lines = [f"target: {self.target.name}: {self.target.describe()} [{self.target.family}]"]
        source = self.source.s3_uri or f"SageMaker model {self.source.model_name}"
        lines.append(f"source: {source}" + (" (EULA accepted)" if self.source.accept_eula else ""))
        lines.append(f"output: {self.output.s3_uri}" + (" (SSE-KMS)" if self.output.kms_key_id else ""))
        for index, stage in enumerate(self.stages, 1):
            params = ", ".join(f"{k}={v}" for k, v in stage.params.items())
            lines.append(
                f"stage {index}: {stage.optimization_type} via {stage.engine}" + (f" ({params})" if params else "")
            )
        if self.recommended_image:
            lines.append(f"recommended inference image: {self.recommended_image}")
        lines.extend(f"warning: {w}" for w in self.all_warnings)
        return lines

    @property
    def all_warnings(self) -> list[str]:
        return [*self.warnings, *(w for stage in self.stages for w in stage.warnings)]


@cache
def _rules() -> dict[str, Any]:
    return load_config("techniques.yaml")


def _member_path(index: int, member: str) -> str:
    return f"optimizationConfigs.{index + 1}.member.{member[:1].lower()}{member[1:]}"


ModelResolver = Callable[[str], str | None]


def _check_source(
    request: CreateOptimizationJobRequest, problems: list[str], resolve_model: ModelResolver | None
) -> SourceRef:
    """Exactly one source; a gated bucket needs AcceptEula; a SageMakerModel must be registered."""
    source = request.model_source
    if (source.s3 is None) == (source.sage_maker_model is None):
        problems.append(
            "ModelSource must set exactly one of S3 (an S3 prefix holding the model) or SageMakerModel "
            "(a registered model name)"
        )
        return SourceRef()
    if source.s3 is not None:
        if not source.s3.s3_uri:
            problems.append("ModelSource.S3.S3Uri is required: the S3 prefix (or .tar.gz) holding the model")
        accept = bool(source.s3.model_access_config and source.s3.model_access_config.accept_eula)
        if source.s3.s3_uri and not accept:
            reason = gated_source_reason(source.s3.s3_uri)
            if reason:
                problems.append(reason)
        return SourceRef(s3_uri=source.s3.s3_uri, accept_eula=accept)
    name = source.sage_maker_model.model_name
    if not name:
        problems.append("ModelSource.SageMakerModel.ModelName is required")
        return SourceRef()
    resolved = resolve_model(name) if resolve_model else None
    if resolve_model is not None and resolved is None:
        problems.append(
            f"ModelSource.SageMakerModel.ModelName '{name}' is not a registered model; register it with "
            f"`optjob models register {name} s3://bucket/prefix/` or give ModelSource.S3.S3Uri"
        )
    return SourceRef(model_name=name, s3_uri=resolved)


def _check_overlap(source_uri: str | None, output_uri: str, problems: list[str]) -> None:
    """The output may not be the source, hold it or lie inside it: publishing there would change the
    source under every later job (a child prefix becomes part of the model the next job downloads),
    so this is refused at Create, before anything is downloaded."""
    if not source_uri or not output_uri:
        return
    try:
        source, output = parse_s3_uri(source_uri), parse_s3_uri(output_uri)
    except InputError:  # a malformed URI is reported by the check that reads it
        return
    if source.bucket != output.bucket:
        return
    # A source prefix is compared as a prefix; a source archive (a key not ending in /) as an object.
    archive = is_archive_key(source.key)
    source_key = source.key if archive else source.prefix
    if source_key.startswith(output.prefix) or (not archive and output.prefix.startswith(source_key)):
        relation = (
            "is the same as"
            if output.prefix == source_key
            else "contains"
            if source_key.startswith(output.prefix)
            else "is inside"
        )
        problems.append(
            f"OutputConfig.S3OutputLocation '{truncate(output_uri)}' {relation} the model source "
            f"'{truncate(source_uri)}': the output must be a prefix that neither holds nor is held by the source"
        )


_KMS_KEY_ID = r"(?:[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}|mrk-[0-9a-fA-F]{32})"
_KMS_ALIAS = r"alias/[a-zA-Z0-9/_-]+"
_KMS_KEY = re.compile(
    rf"{_KMS_KEY_ID}|{_KMS_ALIAS}|arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{{12}}:(?:key/{_KMS_KEY_ID}|{_KMS_ALIAS})"
)


def _check_kms_key(kms_key_id: str | None, problems: list[str]) -> None:
    """A KmsKeyId that no KMS key can have is refused at Create: S3 would only fail the job's first write
    (and an S3-compatible server may call that an internal error)."""
    if kms_key_id and not _KMS_KEY.fullmatch(kms_key_id):
        problems.append(
            f"OutputConfig.KmsKeyId '{truncate(kms_key_id)}' is not a KMS key: give a key id, a key ARN, an "
            "alias name (alias/...) or an alias ARN"
        )


def _check_combination(members: list[str], problems: list[str]) -> None:
    rules = _rules()["combinations"]
    seen: dict[str, int] = {}
    for member in members:
        seen[member] = seen.get(member, 0) + 1
    for member, count in seen.items():
        if count > rules["max_per_technique"]:
            problems.append(f"{member} appears {count} times in OptimizationConfigs; give each technique once")
    for member in rules["exclusive"]:
        if member in seen and len(seen) > 1:
            others = ", ".join(m for m in seen if m != member)
            problems.append(
                f"{member} cannot be combined with {others}: run the other techniques in one job, "
                f"then shard its output in a second job"
            )
    for first, second in rules["incompatible"]:
        if first in seen and second in seen:
            problems.append(f"{first} and {second} cannot be used in the same job")
    order = rules["order"]
    ranked = [order.index(m) for m in members if m in order]
    if ranked != sorted(ranked):
        problems.append("OptimizationConfigs must be ordered " + " -> ".join(m for m in order if m in seen))


def _fold_target(member: str, family: str) -> str | None:
    for rule in _rules()["combinations"].get("folded", []):
        if rule["member"] == member and family in rule["families"]:
            return str(rule["into"])
    return None


def _folded(request: CreateOptimizationJobRequest, family: str) -> dict[str, dict[str, str]]:
    """Members another member of this job applies itself (configs/techniques.yaml ``folded``), with
    the OverrideEnvironment each hands over."""
    members = {config.technique: config for config in request.optimization_configs}
    found = {}
    for member, config in members.items():
        into = _fold_target(member, family)
        if into is not None and into in members:
            found[member] = dict(getattr(config.config, "override_environment", None) or {})
    return found


def build_plan(
    request: CreateOptimizationJobRequest,
    *,
    region: str,
    resolve_image: bool = True,
    resolve_model: ModelResolver | None = None,
) -> Plan:
    """Check the request against the target and the rules; raise ValidationException listing all problems."""
    problems: list[str] = []
    target = instance(request.deployment_instance_type)
    source = _check_source(request, problems, resolve_model)
    output = OutputRef(
        s3_uri=request.output_config.s3_output_location,
        kms_key_id=request.output_config.kms_key_id,
        model_name=(
            request.output_config.sage_maker_model.model_name if request.output_config.sage_maker_model else None
        ),
    )

    _check_overlap(source.s3_uri, output.s3_uri, problems)
    _check_kms_key(output.kms_key_id, problems)

    members = [config.technique for config in request.optimization_configs]
    if not members:
        problems.append("OptimizationConfigs is empty: give at least one of " + ", ".join(UNION_MEMBERS))
    _check_combination(members, problems)

    techniques = _rules()["techniques"]
    defaults = _rules().get("container_defaults", {})
    folded = _folded(request, target.family)
    stages: list[PlannedStage] = []
    for index, config in enumerate(request.optimization_configs):
        member = config.technique
        path = _member_path(index, member)
        if member in folded:
            continue
        families = techniques[member]["families"]
        if target.family not in families:
            problems.append(
                f"{member} at '{path}' is not available for {target.name} ({target.family}): "
                + techniques[member].get("why_not", f"supported on {', '.join(families)} targets only")
            )
            continue
        override = getattr(config.config, "override_environment", None)
        carried = [folded[m] for m in folded if _fold_target(m, target.family) == member]
        env = layer_env(defaults, request.optimization_environment, *carried, override)
        try:
            stages.append(technique_for(member).plan(config.config, env, target, path=path))
        except PlanError as exc:
            note = f" ({', '.join(folded)} is applied by this {member})" if carried else ""
            problems.append(str(exc) + note)

    if problems:
        raise ValidationException(
            f"{len(problems)} problem{'s' if len(problems) != 1 else ''} with the optimization request: "
            + "; ".join(problems)
        )

    image = None
    if resolve_image and stages:
        image = _recommended_image(stages[-1], region)
    return Plan(
        job_name=request.optimization_job_name,
        region=region,
        target=target,
        source=source,
        output=output,
        stages=tuple(stages),
        recommended_image=image,
    )


def _recommended_image(last: PlannedStage, region: str) -> str | None:
    """The image that serves the final artifact: an explicit Image wins, else configs/images.yaml."""
    from optjob.package.images import recommended_image

    if last.image_framework is None and last.image is None:
        return None
    return recommended_image(last.image_framework, region, explicit_image=last.image)
