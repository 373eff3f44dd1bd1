"""A Neuron compile stage, start to finish: cache lookup, ``optimum-cli export neuron``, layout check.

The order is what makes a job cheap and its failures clear:

1. the export's input is the job's model with the planned dtype written into its ``config.json``
   (optimum-neuron compiles in the config's dtype and ignores ``--torch_dtype``);
2. with a compile cache, optimum-neuron's own code (in the Neuron environment) gives the entry's
   key; a hit is downloaded, checked against its manifest and the plan, and published with the
   job's weights beside it (sharded at load time) on any host, Neuron SDK or not;
3. on a miss, ``optimum-cli export neuron`` runs with exactly the planned arguments in its own
   process group (``tool_process``); libneuronxla writes its NEFFs into the same cache root;
4. the compiled directory must match the plan (``neuron_layout``) before anything is published,
   and only then is the cache entry written, manifest last.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from optjob.errors import InfrastructureError, ToolchainMissing, VerificationFailed
from optjob.pipeline.stage import StageContext, StageResult
from optjob.pipeline.tool_process import run_tool
from optjob.storage.s3 import S3Settings, make_client
from optjob.techniques.compile.neuron_cache import CacheKey, NeuronCompileCache, cache_root
from optjob.techniques.compile.neuron_env import WORKER_IMAGE, NeuronEnvironment, cache_entry, locate, probe
from optjob.techniques.compile.neuron_layout import layout_problems
from optjob.techniques.compile.neuron_plan import TASK, NeuronExportPlan, neuron_rules

STAGE = "Compilation"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def export_input(source: Path, dest: Path, dtype: str) -> Path:
    """The job's model as optimum-neuron should see it: every file linked, ``config.json`` in ``dtype``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "config.json":
            (dest / item.name).symlink_to(item.resolve())
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    for key in ("dtype", "torch_dtype"):
        if key in config or key == "torch_dtype" and "dtype" not in config:
            config[key] = dtype
    (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return dest


def _is_weight(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEXES


def _assemble(output: Path, compiled: Path, model: Path, *, keep_weights: bool) -> None:
    """The published directory: the compiled files, then the model's other files that are not there."""
    for item in compiled.iterdir():
        target = output / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            shutil.copy2(item, target)
    for item in model.iterdir():
        if (output / item.name).exists() or item.is_dir() or (_is_weight(item.name) and not keep_weights):
            continue
        shutil.copy2(item.resolve(), output / item.name)


def _compiler_cause(tail: list[str]) -> str:
    """The line of the tool's output that says why it stopped."""
    for line in reversed(tail):
        if "error" in line.lower():
            return line.strip()
    return tail[-1].strip() if tail else "no output"


def _check_versions(env: NeuronEnvironment, plan: NeuronExportPlan) -> None:
    rules = neuron_rules()
    if env.optimum_neuron != rules.optimum_neuron:
        raise InfrastructureError(
            f"The Neuron environment at {env.root} has optimum-neuron {env.optimum_neuron}, but the plan is for "
            f"{rules.optimum_neuron} (configs/neuron.yaml); rebuild it with scripts/neuron_env.sh or the image "
            f"{WORKER_IMAGE}"
        )
    planned = plan.neuron_config["neuronxcc_version"]
    if env.neuronxcc is not None and env.neuronxcc != planned:
        raise InfrastructureError(
            f"The Neuron worker's compiler is neuronx-cc {env.neuronxcc}, but configs/neuron.yaml plans {planned}; "
            "optimum-neuron refuses to load a model whose neuron_config.json names another compiler. Set "
            "neuronx_cc in configs/neuron.yaml to the installed version, or use the pinned worker image"
        )


def compile_cache_key(root: Path, model: Path, plan: NeuronExportPlan, *, model_id: str) -> tuple[CacheKey, dict]:
    """The cache key of this export (optimum-neuron's own digest and hash) and its serialized registry entry."""
    entry = cache_entry(root, model_dir=model, model_id=model_id, task=TASK, neuron_config=plan.neuron_config)
    key = CacheKey(
        neuronxcc=plan.neuron_config["neuronxcc_version"],
        optimum_neuron=neuron_rules().optimum_neuron,
        arch_digest=entry["arch_digest"],
        hash=entry["hash"],
    )
    return key, entry


def run_neuron_compile(plan: NeuronExportPlan, ctx: StageContext) -> StageResult:
    rules = neuron_rules()
    root = locate(os.environ, rules.optimum_neuron)
    env = probe(root)
    _check_versions(env, plan)
    ctx.events(
        STAGE,
        "environment",
        None,
        f"optimum-neuron {env.optimum_neuron} at {root}; "
        + (f"neuronx-cc {env.neuronxcc}" if env.can_compile else f"no Neuron SDK ({', '.join(env.missing)})"),
    )
    model = export_input(ctx.input_dir, ctx.work_dir / "neuron-input", plan.export_dtype)
    metrics: dict[str, object] = {
        "optimum_neuron": env.optimum_neuron,
        "target": plan.target,
        "neuron_config": plan.neuron_config,
    }
    location = cache_root(ctx.env)
    cache = key = entry = None
    if location is not None:
        settings = ctx.storage or S3Settings()
        cache = NeuronCompileCache(location, make_client(settings), settings)
        key, entry = compile_cache_key(root, model, plan, model_id=f"optjob/{ctx.job_name}")
        metrics["compile_cache_key"] = key.model_dump()
        hit, notes = cache.lookup(key, plan.neuron_config)
        for note in notes:
            ctx.events(STAGE, "cache", None, note)
        if hit is not None:
            ctx.events(STAGE, "cache", None, f"compile-cache hit: {hit.uri}")
            cached = ctx.work_dir / "neuron-cached"
            cache.fetch(key, hit, cached, plan.neuron_config, events=ctx.events, cancel=ctx.cancel)
            (cached / "config.json").write_bytes((model / "config.json").read_bytes())
            _assemble(ctx.output_dir, cached, model, keep_weights=True)
            problems = layout_problems(ctx.output_dir, plan.neuron_config)
            if problems:
                raise VerificationFailed(f"The compile-cache hit {hit.uri} does not load as planned: {problems[0]}")
            return StageResult(metrics={**metrics, "compile_cache": "hit", "compile_cache_entry": hit.uri})
        ctx.events(STAGE, "cache", None, f"compile-cache miss under {location.uri} for arch {key.arch_digest[:12]}")
    compiled = _compile(plan, ctx, env, model, cache_uri=location.uri if location else None, key=key)
    metrics.update(compiled)
    compiled_dir = ctx.work_dir / "neuron-export"
    _assemble(ctx.output_dir, compiled_dir, model, keep_weights=False)
    if cache is not None and key is not None and entry is not None:
        metrics["compile_cache_entry"] = cache.store(
            key, entry["serialized"], compiled_dir, events=ctx.events, cancel=ctx.cancel
        )
    metrics["compile_cache"] = "miss" if cache is not None else "off"
    return StageResult(metrics=metrics)


def _compile(
    plan: NeuronExportPlan,
    ctx: StageContext,
    env: NeuronEnvironment,
    model: Path,
    *,
    cache_uri: str | None,
    key: CacheKey | None,
) -> dict[str, object]:
    out = ctx.work_dir / "neuron-export"
    if out.exists():
        shutil.rmtree(out)
    cli = env.optimum_cli or str(env.root / "bin" / "optimum-cli")
    argv = [cli, *(str(model) if a == "MODEL_DIR" else str(out) if a == "OUTPUT_DIR" else a for a in plan.cli_args[1:])]
    tool_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    tool_env.update(
        HF_HUB_OFFLINE="1",
        PATH=f"{env.root / 'bin'}{os.pathsep}{tool_env.get('PATH', '')}",
        NEURON_COMPILE_CACHE_URL=cache_uri or str(ctx.work_dir / "neuron-compile-cache"),
    )
    ctx.events(STAGE, "compile", 0.0, " ".join(argv))
    run = run_tool(
        argv, env=tool_env, cwd=ctx.work_dir, events=ctx.events, cancel=ctx.cancel, stage=STAGE, step="compile"
    )
    if run.returncode != 0:
        cause = _compiler_cause(run.tail)
        if not env.can_compile:
            where = (
                f"The compile cache at {cache_uri} has no entry for this export (arch {key.arch_digest[:12]}, "
                f"entry {key.hash})"
                if cache_uri and key
                else "No compile cache was named (OPTION_NEURON_COMPILE_CACHE_URL)"
            )
            raise ToolchainMissing(
                f"{where}, and this host cannot compile: the Neuron environment at {env.root} has no Neuron SDK "
                f"({', '.join(env.missing)}); optimum-cli export neuron stopped with: {cause}. Run the job on a "
                f"Neuron worker ({WORKER_IMAGE}), which compiles it" + (" and fills the cache" if cache_uri else "")
            )
        raise InfrastructureError(f"optimum-cli export neuron failed (exit {run.returncode}): {cause}")
    planned = {**plan.neuron_config, "neuronxcc_version": env.neuronxcc or plan.neuron_config["neuronxcc_version"]}
    problems = layout_problems(out, planned)
    if problems:
        raise VerificationFailed(
            f"optimum-cli export neuron finished, but its output does not match the plan: {'; '.join(problems[:3])}. "
            "Nothing was published"
        )
    return {"compile_seconds": run.seconds}
