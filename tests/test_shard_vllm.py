"""The sharding stage's files against vLLM itself: every tensor of every rank, bit for bit.

vLLM serves a wrong layout without complaint, so this is the check that matters. It runs vLLM
0.32.0 (the layout configs/sharding.yaml targets) on CPU in its own environment, built by
scripts/vllm_env.sh, through scripts/vllm_crosscheck.py: vLLM builds its own model for each rank
(gloo, one process per rank), loads the Hugging Face checkpoint with its own weight loaders, and
the job's files must hold exactly that state, split into the same part files vLLM's own
``save_model`` writes, and load back through vLLM's ``ShardedStateLoader``.

Set OPTJOB_SKIP_VLLM_CROSSCHECK=1 to skip it on a machine that cannot build the side environment
(about 2 minutes and 3.5 GB the first time); CI never sets it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.shard_models import build_model
from tests.test_shard_layout import run_stage

ROOT = Path(__file__).resolve().parent.parent
PART_BYTES = 30_000  # small parts, so the part boundaries are checked too

pytestmark = pytest.mark.skipif(
    os.environ.get("OPTJOB_SKIP_VLLM_CROSSCHECK") == "1", reason="OPTJOB_SKIP_VLLM_CROSSCHECK=1"
)


CASES = [
    # Llama: vocabulary 500 (not a multiple of 64), 2 KV heads: split at TP 2, replicated at TP 4.
    ("llama", 2, {}),
    ("llama", 4, {}),
    # Qwen2: q/k/v biases, tied embeddings.
    ("qwen2", 2, {"tied": True}),
    ("qwen2", 4, {"tied": True}),
    # The other two layouts of configs/sharding.yaml: Mistral (vLLM's own class), Qwen3 (q/k norms).
    ("mistral", 2, {}),
    ("qwen3", 4, {"tied": True}),
]


@pytest.mark.parametrize(("kind", "degree", "extra"), CASES, ids=[f"{k}-tp{d}" for k, d, _ in CASES])
def test_files_match_vllms_own_per_rank_state(
    vllm_python: str, kind: str, degree: int, extra: dict, tmp_path: Path
) -> None:
    model = build_model(kind, tmp_path / "src", **extra)
    out = tmp_path / "out"
    result, _ = run_stage(model, out, degree, part_bytes=PART_BYTES)
    assert result.metrics["parts_per_rank"] > 1
    checked = subprocess.run(
        [vllm_python, str(ROOT / "scripts" / "vllm_crosscheck.py"), "--model", str(model), "--sharded", str(out),
         "--tp", str(degree), "--part-bytes", str(PART_BYTES)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    lines = [json.loads(line) for line in checked.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no verdict from the cross-check:\n{checked.stderr[-4000:]}"
    ranks, verdict = lines[:-1], lines[-1]
    for rank in ranks:
        assert rank["missing"] == [] and rank["extra"] == [] and rank["different"] == [], rank
        assert rank["parts_match"], rank
        assert rank["reload_equal"], rank
        assert rank["tensors"] == result.metrics["tensors_per_rank"]
    assert len(ranks) == degree and verdict == {"ok": True, "tp": degree}, checked.stderr[-4000:]
    assert checked.returncode == 0


def test_crosscheck_catches_a_wrong_layout(vllm_python: str, tmp_path: Path) -> None:
    """The check can fail: files written for TP 2 with one rank's KV rows swapped are caught."""
    from safetensors.torch import load_file, save_file

    model = build_model("llama", tmp_path / "src")
    out = tmp_path / "out"
    run_stage(model, out, 2)
    path = out / "model-rank-1-part-0.safetensors"
    state = load_file(str(path))
    name = "model.layers.0.self_attn.qkv_proj.weight"
    state[name] = state[name].flip(0).contiguous()
    save_file(state, str(path))
    checked = subprocess.run(
        [vllm_python, str(ROOT / "scripts" / "vllm_crosscheck.py"), "--model", str(model), "--sharded", str(out),
         "--tp", "2"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    lines = [json.loads(line) for line in checked.stdout.splitlines() if line.startswith("{")]
    assert checked.returncode == 1, checked.stderr[-4000:]
    assert lines[1]["different"] == [name] and lines[0]["different"] == []
    assert lines[-1]["ok"] is False
