"""The one interface every optimization technique implements.

A technique has two halves that run at different times:

* ``plan`` runs at Create (and again in the worker), touches no model and no network, and turns
  one ``OptimizationConfig`` element plus the layered environment and the target's capabilities
  into a ``PlannedStage``: resolved parameters, what the stage needs, and warnings. Bad input
  raises ``PlanError`` and becomes a ``ValidationException`` before any work starts.
* ``run`` executes a ``PlannedStage`` in a worker: it reads ``ctx.input_dir`` (a local model
  directory), writes a complete model directory to ``ctx.output_dir``, reports progress through
  ``ctx.events`` and checks ``ctx.cancel`` between units of work.

Adding a technique is adding a module under ``optjob/techniques`` that subclasses ``Technique``
and decorates it with ``register``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import NULL_SINK, EventSink
from optjob.runtime.phases import PhaseClock
from optjob.targets.catalog import InstanceSpec


class PlanError(ValueError):
    """A request that cannot be planned; the message names the field and the fix."""


class StageNeeds(BaseModel):
    """What a stage declares it needs; the planner and the worker check these against the host."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    accelerator: bool = Field(False, description="needs a GPU/Neuron device on the worker host")
    toolchain: str | None = Field(None, description="external tool it drives, e.g. tensorrt_llm")
    calibration_data: bool = False
    whole_model_in_memory: bool = Field(True, description="False for shard-by-shard streaming stages")


class PlannedStage(BaseModel):
    """One resolved step of a Plan: immutable, JSON-serializable, saved beside the artifacts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    technique: str = Field(description="the OptimizationConfig member, e.g. ModelQuantizationConfig")
    optimization_type: str = Field(description="the name List reports, e.g. Quantization")
    engine: str = Field(description="what does the work, e.g. llmcompressor")
    params: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict, description="layered OPTION_* environment")
    image: str | None = Field(None, description="explicit Image from the request, if any")
    image_framework: str | None = Field(None, description="configs/images.yaml framework key")
    needs: StageNeeds = Field(default_factory=StageNeeds)
    warnings: tuple[str, ...] = ()
    serving_properties: dict[str, str] = Field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a running stage may touch; nothing else is reachable from a stage."""

    job_name: str
    input_dir: Path
    output_dir: Path
    work_dir: Path
    target: InstanceSpec
    env: Mapping[str, str] = field(default_factory=dict)
    events: EventSink = NULL_SINK
    cancel: CancelToken = field(default_factory=CancelToken)
    storage: Any = None  # optjob.storage client for stage inputs such as calibration data
    clock: PhaseClock | None = None  # where a streaming stage's time goes (the runner reads it)


@dataclass
class StageResult:
    """What a stage reports back: figures for the manifest and warnings for Describe."""

    metrics: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    serving_properties: dict[str, str] = field(default_factory=dict)


class Technique(ABC):
    """Base of every technique plug-in (quantization, compilation, sharding, speculative)."""

    config_member: ClassVar[str]
    optimization_type: ClassVar[str]

    @abstractmethod
    def plan(
        self,
        config: BaseModel,
        env: Mapping[str, str],
        target: InstanceSpec,
        *,
        path: str,
    ) -> PlannedStage:
        """Resolve and check one config element; ``path`` is its camelCase request path."""

    @abstractmethod
    def run(self, stage: PlannedStage, ctx: StageContext) -> StageResult:
        """Turn ``ctx.input_dir`` into a complete model directory at ``ctx.output_dir``."""

    def model_problems(self, stage: PlannedStage, config: Mapping[str, Any], target: InstanceSpec) -> list[str]:
        """What makes this model's ``config.json`` unfit for the planned stage (none by default).

        The worker finds the same problems when ``config.json`` arrives; this lets a caller who has
        the file (``optjob validate --model-config``) find them before a job is created.
        """
        return []

    def model_plan_lines(self, stage: PlannedStage, config: Mapping[str, Any], target: InstanceSpec) -> list[str]:
        """What the stage will do with this particular model, for ``optjob validate --model-config``
        (nothing beyond the plan by default)."""
        return []


class StreamingTechnique(Technique):
    """A technique that can work file by file, so download, work and upload overlap.

    When a plan has this one stage and it declares ``whole_model_in_memory=False``, the runner
    calls ``run_streaming`` instead of ``run``: ``ctx.input_dir`` already holds every non-weight
    file (config, index, tokenizer); ``weights`` yields each local ``*.safetensors`` file in index
    order as soon as it has been downloaded and checked; the stage hands every output file that is
    final to ``on_output`` (the runner uploads it at once) and must still leave the complete,
    verified directory at ``ctx.output_dir``.
    """

    @abstractmethod
    def run_streaming(
        self,
        stage: PlannedStage,
        ctx: StageContext,
        weights: Iterable[Path],
        on_output: Callable[[Path], None],
    ) -> StageResult:
        """Like ``run``, consuming ``weights`` lazily and reporting final output files."""


class TensorStreamingTechnique(StreamingTechnique):
    """A streaming technique that maps tensors to tensors, so it need not wait for whole files.

    The runner prefers ``run_tensor_streaming`` when the stage offers it: ``shards`` yields each
    source weight file as a stream (``rel``, ``header`` known at once, ``tensors()`` in data order,
    a bounded read-ahead behind it) and ``open_output(rel, header)`` opens the output file whose
    header the stage computed up front; its ``writer`` takes the tensors in that order, ``close``
    makes the file final (uploaded, hashed), ``abort`` abandons it. ``ctx.input_dir`` holds the
    non-weight files; both sides' weight files are also spooled to local disk (``ctx.input_dir``,
    ``ctx.output_dir``) for the checks that run after the stream.
    """

    def import_libraries(self) -> None:
        """Import what ``run_tensor_streaming`` needs (the runner then checks the memory left)."""

    @abstractmethod
    def run_tensor_streaming(
        self,
        stage: PlannedStage,
        ctx: StageContext,
        shards: Iterable[Any],
        open_output: Callable[[str, Any], Any],
    ) -> StageResult:
        """Like ``run_streaming``, a tensor at a time."""

    def run_tensor_units(
        self,
        stage: PlannedStage,
        ctx: StageContext,
        shards: Iterable[Any],
        open_output: Callable[[str, Any], Any],
    ) -> None:
        """Only these shards, each closed (uploaded) with its record, and no whole-model checks: a
        helper worker of a multi-worker job runs this; the job's own worker merges the records and
        runs the checks. Stages that cannot split their work leave it unimplemented."""
        raise NotImplementedError(f"{type(self).__name__} cannot split its work over several workers")


_REGISTRY: dict[str, type[Technique]] = {}


def register(cls: type[Technique]) -> type[Technique]:
    _REGISTRY[cls.config_member] = cls
    return cls


def technique_for(config_member: str) -> Technique:
    """The plug-in for one OptimizationConfig member, imported on first use."""
    from optjob import techniques

    techniques.load_all()
    try:
        return _REGISTRY[config_member]()
    except KeyError:
        raise PlanError(f"{config_member} is not supported by this optjob build") from None


def registered() -> dict[str, type[Technique]]:
    from optjob import techniques

    techniques.load_all()
    return dict(_REGISTRY)
