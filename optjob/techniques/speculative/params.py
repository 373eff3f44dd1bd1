"""Speculative decoding, planned: the OPTION_* knobs resolved and checked against configs/speculative.yaml.

Every knob has a default, a range and a one-line help in the YAML; ``resolve_params`` turns the
layered environment into ``SpeculativeParams`` (what the plan records) or raises ``PlanError`` naming
the variable, the value and the allowed range, so a bad value is a ValidationException at Create and
never an hour into a job.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict

from optjob.config_files import load_config
from optjob.errors import InputError
from optjob.pipeline.stage import PlanError
from optjob.storage.uri import parse_s3_uri

DRAFT_MODEL_ENV = "OPTION_SPECULATIVE_DRAFT_MODEL"
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


class TrainerRules(BaseModel):
    model_config = ConfigDict(frozen=True)

    ttt_steps: int
    learning_rate: float
    batch_size: int
    warmup_fraction: float
    max_draft_vocab: int
    draft_vocab_multiple: int
    regenerate_max_new_tokens: int
    feature_cache_mib: int
    seed: int


class EvaluationRules(BaseModel):
    model_config = ConfigDict(frozen=True)

    new_tokens: int
    cpu_max_target_params: int


class SpeculativeRules(BaseModel):
    model_config = ConfigDict(frozen=True)

    options: dict[str, dict[str, Any]]
    trainer: TrainerRules
    evaluation: EvaluationRules
    serving_root: str


@cache
def speculative_rules() -> SpeculativeRules:
    return SpeculativeRules.model_validate(load_config("speculative.yaml"))


class SpeculativeParams(BaseModel):
    """One speculative-decoding stage's resolved inputs (recorded in the plan and the manifest)."""

    model_config = ConfigDict(frozen=True)

    num_speculative_tokens: int
    max_samples: int
    epochs: int
    max_seq_len: int
    regenerate: bool
    eval_prompts: int
    draft_model: str | None = None
    training_data: str | None = None
    training_data_type: str | None = None

    @property
    def mode(self) -> str:
        return "draft_model" if self.draft_model else "eagle3"


def _integer(name: str, raw: str, rule: Mapping[str, Any], path: str) -> int:
    low, high = rule["min"], rule["max"]
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise PlanError(
            f"{name}='{raw}' at '{path}' must be an integer from {low} to {high} ({rule['help']}); "
            f"the default is {rule['default']}"
        )
    return value


def _boolean(name: str, raw: str, rule: Mapping[str, Any], path: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE | _FALSE:
        return value in _TRUE
    raise PlanError(f"{name}='{raw}' at '{path}' must be true or false ({rule['help']}); the default is true")


def _draft_uri(raw: str, path: str) -> str:
    try:
        parse_s3_uri(raw)
    except InputError as exc:
        raise PlanError(
            f"{DRAFT_MODEL_ENV}='{raw}' at '{path}' is not an s3:// URI of a model directory: {exc}"
        ) from None
    return raw


def resolve_params(
    env: Mapping[str, str], *, path: str, training_data: str | None = None, training_data_type: str | None = None
) -> SpeculativeParams:
    """The stage's knobs from the layered environment; unknown values raise ``PlanError``."""
    options = speculative_rules().options
    values: dict[str, Any] = {}
    for name, rule in options.items():
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            values[name] = rule["default"]
        elif name == DRAFT_MODEL_ENV:
            values[name] = _draft_uri(raw.strip(), path)
        elif isinstance(rule["default"], bool):
            values[name] = _boolean(name, raw, rule, path)
        else:
            values[name] = _integer(name, raw, rule, path)
    return SpeculativeParams(
        num_speculative_tokens=values["OPTION_NUM_SPECULATIVE_TOKENS"],
        max_samples=values["OPTION_EAGLE_MAX_SAMPLES"],
        epochs=values["OPTION_EAGLE_EPOCHS"],
        max_seq_len=values["OPTION_EAGLE_MAX_SEQ_LEN"],
        regenerate=values["OPTION_EAGLE_REGENERATE"],
        eval_prompts=values["OPTION_EAGLE_EVAL_PROMPTS"],
        draft_model=values[DRAFT_MODEL_ENV],
        training_data=training_data,
        training_data_type=training_data_type,
    )
