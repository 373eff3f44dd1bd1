"""ModelSpeculativeDecodingConfig: an EAGLE-3 head trained for the target, or a draft model you bring,
measured offline before anything is published.

The stage, top to bottom: read the training conversations (``data``), render them as the target
sees them (``render``), hold out evaluation prompts, regenerate the replies with the target itself
(on-policy), train the head online from the target's forward passes (``train``), save it in
speculators' format and load it back from those files (``eagle3``), measure it against an untrained
head with lossless greedy speculative decoding (``evaluate``), gate on ``configs/verify.yaml`` and
package it beside the target (``package``).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from optjob.config_files import load_config
from optjob.errors import InfrastructureError, InputError, VerificationFailed, reason_sentence
from optjob.pipeline.env import env_to_properties
from optjob.pipeline.stage import PlanError, PlannedStage, StageContext, StageNeeds, StageResult, Technique, register
from optjob.runtime.usage import PeakRss, peak_rss_mib
from optjob.targets.catalog import InstanceSpec
from optjob.techniques.speculative import draft_model as byo
from optjob.techniques.speculative import package
from optjob.techniques.speculative.data import read_training_data
from optjob.techniques.speculative.eagle3 import config_dict, load_head, save_head
from optjob.techniques.speculative.evaluate import DraftModelProposer, Figures, measure, reference_outputs
from optjob.techniques.speculative.params import SpeculativeParams, resolve_params, speculative_rules
from optjob.techniques.speculative.render import has_chat_template, render
from optjob.techniques.speculative.target import Target, aux_layer_ids, eos_ids, load_target
from optjob.techniques.speculative.train import Sample, choose_draft_vocab, init_head, train_head

STAGE = "SpeculativeDecoding"


class Phases:
    """Seconds and peak RSS of each phase of the stage, for the manifest (where did the time go)."""

    def __init__(self) -> None:
        self.figures: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        with PeakRss() as rss:
            yield
        self.figures[name] = {"seconds": round(time.monotonic() - started, 1), "peak_rss_mib": round(rss.peak_mib)}


def gate_rules() -> dict[str, float]:
    return dict(load_config("verify.yaml")["speculative"])


def judge(figures: Figures, floor: Figures, what: str) -> dict[str, Any]:
    """Lossless and clearly better than the floor, or VerificationFailed with the figures."""
    rules = gate_rules()
    got, base = figures.as_dict(), floor.as_dict()
    detail = (
        f"measured: mean accepted length {got['mean_accepted_length']} (floor {base['mean_accepted_length']}), "
        f"acceptance rate {got['acceptance_rate']} (floor {base['acceptance_rate']}), per-position "
        f"{got['per_position_acceptance']}, lossless {got['lossless']} at k={figures.k}."
    )
    if figures.lossless != figures.prompts or floor.lossless != floor.prompts:
        bad = figures.mismatches or floor.mismatches
        raise VerificationFailed(
            reason_sentence(
                f"Speculative decoding with the {what} changed the target's greedy output on "
                f"{figures.prompts - figures.lossless + floor.prompts - floor.lossless} held-out prompt(s) (first: "
                f"{bad[0] if bad else '?'}); a draft may only change speed, so this is a defect and nothing was "
                "published.",
                detail=detail,
            )
        )
    needed = base["mean_accepted_length"] + rules["min_accepted_length_gain"]
    if got["mean_accepted_length"] < needed or got["acceptance_rate"] < rules["min_acceptance_rate"]:
        raise VerificationFailed(
            reason_sentence(
                f"The {what} is not clearly better than an untrained draft: it needs a mean accepted length of at "
                f"least {needed:.2f} and an acceptance rate of at least {rules['min_acceptance_rate']} "
                "(configs/verify.yaml speculative); nothing was published. Train on more conversations that look like "
                "the traffic (TrainingDataSource, OPTION_EAGLE_MAX_SAMPLES) or for more epochs (OPTION_EAGLE_EPOCHS).",
                detail=detail,
            )
        )
    return {"passed": True, "required_mean_accepted_length": round(needed, 4), **rules}


@register
class SpeculativeDecodingTechnique(Technique):
    config_member = "ModelSpeculativeDecodingConfig"
    optimization_type = "SpeculativeDecoding"

    def plan(self, config: BaseModel, env: Mapping[str, str], target: InstanceSpec, *, path: str) -> PlannedStage:
        source = getattr(config, "training_data_source", None)
        if source is not None and not source.s3_uri:
            raise PlanError(
                f"TrainingDataSource.S3Uri is required at '{path}': the S3 prefix or manifest of JSONL conversations"
            )
        params = resolve_params(
            env,
            path=path,
            training_data=source.s3_uri if source else None,
            training_data_type=(source.s3_data_type or "S3Prefix") if source else None,
        )
        return PlannedStage(
            technique=self.config_member,
            optimization_type=self.optimization_type,
            engine="draft_model" if params.draft_model else "eagle3",
            params={"technique": config.technique, **params.model_dump(exclude_none=True)},
            env=dict(env),
            image_framework="lmi",
            # Trains on the worker's GPU when it has one and on its CPU otherwise; a CPU worker refuses
            # targets too large to train in reasonable time once config.json is known (configs/speculative.yaml).
            needs=StageNeeds(accelerator=False, calibration_data=params.draft_model is None),
            serving_properties=env_to_properties(env),
        )

    def model_problems(self, stage: PlannedStage, config: Mapping[str, Any], target: InstanceSpec) -> list[str]:
        layers = int(config.get("num_hidden_layers") or 0)
        if stage.engine == "eagle3" and layers and layers < 3:
            return [f"EAGLE-3 fuses three decoder layers' states; this model has {layers} layers"]
        return []

    def run(self, stage: PlannedStage, ctx: StageContext) -> StageResult:
        params = SpeculativeParams.model_validate({k: v for k, v in stage.params.items() if k != "technique"})
        started = time.monotonic()
        _check_cpu_size(ctx.input_dir)
        tokenizer = _tokenizer(ctx.input_dir)
        ctx.events(STAGE, "load", 0.0, "loading the target")
        target = load_target(ctx.input_dir)
        package.copy_model(ctx.input_dir, ctx.output_dir)
        if params.draft_model:
            metrics = _bring_your_own(params, stage, ctx, target, tokenizer)
        else:
            metrics = _train_eagle3(params, stage, ctx, target, tokenizer)
        metrics.update(seconds=round(time.monotonic() - started, 1), peak_rss_mib=round(peak_rss_mib()))
        return StageResult(metrics=metrics, warnings=data_warnings(metrics, params), serving_properties={})

    def model_plan_lines(self, stage: PlannedStage, config: Mapping[str, Any], target: InstanceSpec) -> list[str]:
        if stage.engine != "eagle3" or not config.get("num_hidden_layers"):
            return []
        layers = int(config["num_hidden_layers"])
        if layers < 3:
            return []
        return [
            f"EAGLE-3 head: one Llama decoder layer (hidden {config.get('hidden_size')}, "
            f"{config.get('num_attention_heads')} heads) over target layers {aux_layer_ids(layers)} of {layers}; "
            f"k={stage.params.get('num_speculative_tokens')}; published under {package.SPECULATOR_DIR}/"
        ]


def data_warnings(metrics: Mapping[str, Any], params: SpeculativeParams) -> list[str]:
    """What a person should know about the data the head was trained and measured on (Describe shows it)."""
    warnings = []
    skipped = (metrics.get("training_data") or {}).get("skipped_lines") or {}
    if skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        warnings.append(f"TrainingDataSource: {sum(skipped.values())} line(s) skipped ({reasons})")
    for key, what in (
        ("truncated_to_max_seq_len", f"truncated to OPTION_EAGLE_MAX_SEQ_LEN={params.max_seq_len} tokens"),
        ("prompt_longer_than_max_seq_len", f"skipped: the prompt alone exceeds {params.max_seq_len} tokens"),
        ("empty_reply", "skipped: the target ended the reply at once"),
    ):
        if metrics.get(key):
            warnings.append(f"{metrics[key]} conversation(s) {what}")
    held = metrics.get("held_out_prompts")
    if held is not None and held < params.eval_prompts:
        warnings.append(
            f"acceptance measured on {held} held-out prompts, fewer than OPTION_EAGLE_EVAL_PROMPTS="
            f"{params.eval_prompts}: the data has too few conversations (at most a quarter are held out for training)"
        )
    return warnings


def _check_cpu_size(model_dir: Path) -> None:
    """A CPU-only worker refuses targets it would take hours to train against (before loading anything)."""
    if torch.cuda.is_available():
        return
    limit = speculative_rules().evaluation.cpu_max_target_params
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    params = weights // 2  # 16-bit checkpoints; an FP8 one is counted twice, on the safe side
    if params > limit:
        raise InfrastructureError(
            f"Training an EAGLE-3 head against this {params / 1e9:.1f} B-parameter target on a CPU-only worker would "
            f"take hours to days (the limit is {limit / 1e9:.1f} B parameters, configs/speculative.yaml). Run the job "
            "on a worker with an NVIDIA GPU"
        )


def _tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise InputError(
            f"Speculative decoding needs the target's tokenizer to render the training conversations, and none loads "
            f"from the model directory ({type(exc).__name__}). Upload tokenizer.json and tokenizer_config.json "
            "with the model"
        ) from None


def _pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0


def _eval_count(params: SpeculativeParams, available: int) -> int:
    return max(1, min(params.eval_prompts, available // 4))


def prepare_training_data(
    params: SpeculativeParams, ctx: StageContext, target: Target, tokenizer: Any, phases: Phases | None = None
) -> tuple[list[Sample], list[list[int]], dict[str, Any]]:
    """Training samples and held-out prompts (ids), with the counts the manifest records."""
    rules = speculative_rules().trainer
    phases = phases or Phases()
    ctx.events(STAGE, "data", 0.0, f"reading {params.training_data or 'the built-in prompts'}")
    with phases("read_data"):
        data = read_training_data(
            params.training_data, params.training_data_type, max_samples=params.max_samples, settings=ctx.storage
        )
    counts: Counter[str] = Counter()
    rendered = []
    for conversation in data.conversations:
        one = render(conversation, tokenizer, max_len=params.max_seq_len)
        if one is None:
            counts["prompt_longer_than_max_seq_len"] += 1
            continue
        counts["truncated_to_max_seq_len"] += int(one.truncated)
        rendered.append(one)
    if len(rendered) < 2:
        raise InputError(
            f"Only {len(rendered)} of {len(data.conversations)} conversations fit OPTION_EAGLE_MAX_SEQ_LEN="
            f"{params.max_seq_len} tokens with room for a reply; raise it or send shorter conversations"
        )
    random.Random(rules.seed).shuffle(rendered)
    held = _eval_count(params, len(rendered))
    evaluation, training = rendered[:held], rendered[held:]
    eos = eos_ids(ctx.input_dir, tokenizer)
    todo = [i for i, r in enumerate(training) if params.regenerate or r.reply is None]
    with phases("regenerate"):
        replies = _regenerate(ctx, target, [training[i].prompt for i in todo], params, tokenizer, eos)
    replies = dict(zip(todo, replies, strict=True))
    samples = []
    for i, one in enumerate(training):
        reply = replies.get(i, one.reply) or []
        if not reply:
            counts["empty_reply"] += 1
            continue
        samples.append(Sample(one.prompt + reply, [False] * len(one.prompt) + [True] * len(reply)))
    if not samples:
        raise InputError("No training conversation has a reply to learn from (the target ended every reply at once)")
    figures = {
        "training_data": data.provenance(),
        "chat_template": has_chat_template(tokenizer),
        "rendered": "chat template" if has_chat_template(tokenizer) else "plain text (no chat template)",
        "train_conversations": len(samples),
        "held_out_prompts": len(evaluation),
        "regenerated": len(replies),
        "train_tokens": sum(len(s.ids) for s in samples),
        "supervised_tokens": sum(sum(s.reply_mask) for s in samples),
        **counts,
    }
    return samples, [r.prompt for r in evaluation], figures


def _regenerate(
    ctx: StageContext,
    target: Target,
    prompts: list[list[int]],
    params: SpeculativeParams,
    tokenizer: Any,
    eos: set[int],
) -> list[list[int]]:
    """The target's own greedy replies (token ids as generated), in batches, with progress."""
    limit = speculative_rules().trainer.regenerate_max_new_tokens
    replies: list[list[int]] = []
    for start in range(0, len(prompts), 16):
        ctx.cancel.raise_if_cancelled()
        chunk = prompts[start : start + 16]
        limits = [min(limit, params.max_seq_len - len(p)) for p in chunk]
        replies += target.generate(chunk, max_new_tokens=limits, pad_id=_pad_id(tokenizer), eos_ids=eos)
        ctx.events(
            STAGE, "regenerate", len(replies) / len(prompts),
            f"regenerating replies with the target: {len(replies)}/{len(prompts)}",
        )  # fmt: skip
    return replies


def _measure_pair(
    target: Target,
    drafter: Any,
    floor: Any,
    prompts: list[list[int]],
    params: SpeculativeParams,
    ctx: StageContext,
    eos: set[int],
    what: str,
) -> tuple[Figures, Figures, float]:
    new_tokens = speculative_rules().evaluation.new_tokens
    references, greedy_seconds = reference_outputs(
        target, prompts, new_tokens, eos, events=ctx.events, cancel=ctx.cancel
    )
    k = params.num_speculative_tokens
    common = dict(k=k, new_tokens=new_tokens, eos=eos, events=ctx.events, cancel=ctx.cancel)
    floor_figures = measure(target, floor, prompts, references, label=f"untrained {what} (floor)", **common)
    figures = measure(target, drafter, prompts, references, label=what, **common)
    return figures, floor_figures, greedy_seconds


def _train_eagle3(
    params: SpeculativeParams, stage: PlannedStage, ctx: StageContext, target: Target, tokenizer: Any
) -> dict[str, Any]:
    rules = speculative_rules()
    phases = Phases()
    samples, prompts, metrics = prepare_training_data(params, ctx, target, tokenizer, phases)
    vocab = choose_draft_vocab(samples, target.vocab_size, rules.trainer)
    head = init_head(target, vocab, target.aux_ids, rules.trainer.seed)
    floor = init_head(target, vocab, target.aux_ids, rules.trainer.seed).to(target.device).eval()
    ctx.events(
        STAGE,
        "train",
        0.0,
        f"training an EAGLE-3 head: {len(samples)} conversations, draft vocabulary {len(vocab.ids)}",
    )
    with phases("train"):
        report = train_head(
            head, target, samples, vocab, epochs=params.epochs, rules=rules.trainer, pad_id=_pad_id(tokenizer),
            events=ctx.events, cancel=ctx.cancel,
        )  # fmt: skip
    dtype_name = str(getattr(target.config, "dtype", None) or "bfloat16").replace("torch.", "")
    dtype = getattr(torch, dtype_name, torch.bfloat16)
    speculator = ctx.output_dir / package.SPECULATOR_DIR
    verifier = rules.serving_root
    config = config_dict(
        head.cfg, k=params.num_speculative_tokens, verifier=verifier,
        verifier_architectures=list(getattr(target.config, "architectures", None) or []), dtype=dtype_name,
    )  # fmt: skip
    save_head(head.cpu(), speculator, config, dtype)
    published, _ = load_head(speculator)  # measure what was written, not what is in memory
    eos = eos_ids(ctx.input_dir, tokenizer)
    with phases("evaluate"):
        figures, floor_figures, greedy_seconds = _measure_pair(
            target, published.to(target.device), floor, prompts, params, ctx, eos, "EAGLE-3 head"
        )
    gate = judge(figures, floor_figures, "trained EAGLE-3 head")
    evaluation = {
        "k": params.num_speculative_tokens,
        "new_tokens": rules.evaluation.new_tokens,
        "eos_token_ids": sorted(eos),
        "prompts": prompts,
        "figures": figures.as_dict(),
        "floor": floor_figures.as_dict(),
    }
    package.write_evaluation(speculator, evaluation)
    served = f"{rules.serving_root}/{package.SPECULATOR_DIR}"
    properties = package.write_package_properties(
        ctx.output_dir, ctx.input_dir, stage.serving_properties,
        package.speculative_config("eagle3", served, params.num_speculative_tokens),
        f"EAGLE-3 head in {package.SPECULATOR_DIR}/ (speculators format), trained by optjob; measured mean accepted "
        f"length {figures.as_dict()['mean_accepted_length']} at k={params.num_speculative_tokens}",
    )  # fmt: skip
    metrics.update(
        draft=package.SPECULATOR_DIR,
        phases=phases.figures,
        aux_hidden_state_layer_ids=list(head.cfg.aux_layer_ids),
        draft_vocab_size=len(vocab.ids),
        draft_vocab_coverage=round(vocab.coverage, 4),
        training=report.as_dict(),
        acceptance=figures.as_dict(),
        floor=floor_figures.as_dict(),
        greedy_reference_seconds=round(greedy_seconds, 1),
        gate=gate,
        speculative_config=json.loads(properties["option.speculative_config"]),
    )
    return metrics


def _bring_your_own(
    params: SpeculativeParams, stage: PlannedStage, ctx: StageContext, target: Target, tokenizer: Any
) -> dict[str, Any]:
    uri = str(params.draft_model)
    rules = speculative_rules()
    phases = Phases()
    with phases("fetch_draft"):
        fetched = byo.fetch_draft(
            uri, ctx.work_dir / "draft-model", settings=ctx.storage, events=ctx.events, cancel=ctx.cancel
        )
    byo.check_compatible(uri, tokenizer, fetched.path, target.vocab_size)
    draft = byo.load_draft(fetched.path, target.device)
    floor = byo.load_draft(fetched.path, target.device, random_init=True)
    data = read_training_data(
        params.training_data, params.training_data_type, max_samples=params.max_samples, settings=ctx.storage
    )
    rendered = [r for r in (render(c, tokenizer, max_len=params.max_seq_len) for c in data.conversations) if r]
    random.Random(rules.trainer.seed).shuffle(rendered)
    prompts = [r.prompt for r in rendered[: params.eval_prompts]]
    eos = eos_ids(ctx.input_dir, tokenizer)
    with phases("evaluate"):
        figures, floor_figures, greedy_seconds = _measure_pair(
            target, DraftModelProposer(draft), DraftModelProposer(floor), prompts, params, ctx, eos, "draft model"
        )
    gate = judge(figures, floor_figures, f"draft model {uri}")
    package.copy_model(fetched.path, ctx.output_dir / package.DRAFT_MODEL_DIR)
    served = f"{rules.serving_root}/{package.DRAFT_MODEL_DIR}"
    properties = package.write_package_properties(
        ctx.output_dir, ctx.input_dir, stage.serving_properties,
        package.speculative_config("draft_model", served, params.num_speculative_tokens),
        f"draft model from {uri} in {package.DRAFT_MODEL_DIR}/; measured mean accepted length "
        f"{figures.as_dict()['mean_accepted_length']} at k={params.num_speculative_tokens}",
    )  # fmt: skip
    return {
        "draft": package.DRAFT_MODEL_DIR,
        "draft_model": {"uri": uri, "etags": fetched.etags, "bytes": fetched.total_bytes},
        "held_out_prompts": len(prompts),
        "evaluation_data": data.provenance(),
        "phases": phases.figures,
        "acceptance": figures.as_dict(),
        "floor": floor_figures.as_dict(),
        "greedy_reference_seconds": round(greedy_seconds, 1),
        "gate": gate,
        "speculative_config": json.loads(properties["option.speculative_config"]),
    }
