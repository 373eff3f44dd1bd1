"""The benchmark scripts' core functions at toy scale, so the instruments cannot rot between full runs.

The full benchmarks take tens of minutes and run by hand (see each script's docstring); these
tests run the same code paths on a sub-megabyte model: reference-model training and its
determinism, one scheme of the quality benchmark on both sides (ours and llm-compressor's), the
synthetic sharded checkpoint writer, and the peak-RSS sampler. The end-to-end pipeline benchmark
(S3 server, optjob run, baseline process) is the one slow test.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_common  # noqa: E402
import bench_pipeline  # noqa: E402
import bench_quality  # noqa: E402
import make_reference_model  # noqa: E402


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private OPTJOB_CACHE_DIR: builds here are fresh, so determinism is really tested."""
    path = tmp_path_factory.mktemp("bench-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTJOB_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def reference(cache_dir: Path) -> make_reference_model.ReferenceModel:
    return make_reference_model.build_reference_model(make_reference_model.QUICK, log_every=0)


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.suffix in (".safetensors", ".json"):
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_reference_model_learns_and_is_deterministic(
    reference: make_reference_model.ReferenceModel, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = reference.report
    assert report["built_now"] and report["corpus"]["heldout_files"] >= 1
    assert report["trained_perplexity"] < report["random_init_perplexity"]
    assert (reference.model_dir / "tokenizer.json").is_file() and reference.heldout_ids().numel() > 0
    again = make_reference_model.build_reference_model(make_reference_model.QUICK, log_every=0)
    assert not again.report["built_now"] and again.root == reference.root  # cached by its arguments
    monkeypatch.setenv("OPTJOB_CACHE_DIR", str(cache_dir / "second"))
    rebuilt = make_reference_model.build_reference_model(make_reference_model.QUICK, log_every=0)
    assert rebuilt.report["built_now"]
    assert _digest(rebuilt.model_dir) == _digest(reference.model_dir)  # same seed, same bytes
    assert rebuilt.report["trained_perplexity"] == report["trained_perplexity"]


def test_quality_benchmark_one_scheme_both_sides(
    reference: make_reference_model.ReferenceModel, tmp_path: Path
) -> None:
    source = bench_common.load_causal_lm(reference.model_dir, float32=True)
    ref = bench_common.SourceReference.build(source, reference.eval_windows(2))
    rows = {
        side: bench_quality.quantize_and_score(
            side, "fp8_dynamic", reference.model_dir, tmp_path, ref, calib_size=8, max_seq=32
        )
        for side in ("ours", "baseline")
    }
    for row in rows.values():
        assert math.isfinite(row["perplexity"]) and row["finite"]
        assert 0.0 <= row["mean_kl"] < 0.1 and row["top1_agreement"] > 0.8
        assert row["quantize_wall_s"] > 0 and row["peak_rss_mib"] > 0
    assert rows["ours"]["gate_passed"] and rows["ours"]["engine"] == "streaming"
    no_worse, target = bench_quality.verdict("fp8_dynamic", rows["ours"], rows["baseline"])
    assert no_worse in ("yes",) or no_worse.startswith("NO")
    assert target.startswith(("met", "MISSED"))
    text = bench_quality.summarize(["fp8_dynamic"], list(rows.values()), ref.perplexity)
    assert "fp8_dynamic" in text


def test_baseline_recipes_build_for_every_llmcompressor_scheme() -> None:
    for name, scheme in bench_quality.SCHEMES.items():
        if scheme.kind == "llmcompressor":
            assert bench_quality.baseline_recipe(name)
        else:
            assert bench_quality.bnb_config(name) is not None


def test_synthetic_checkpoint_is_sharded_indexed_and_loadable(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    arch = bench_pipeline.SynthArch(name="t", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                                    vocab=256, max_shard_bytes=40_000)  # fmt: skip
    info = bench_pipeline.write_synthetic_checkpoint(tmp_path / "m", arch)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert info["shards"] > 1 and len(set(index["weight_map"].values())) == info["shards"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as Llama-3.2-1B


def test_peak_rss_sampler_sees_a_child_allocation(tmp_path: Path) -> None:
    code = "import time; b = bytearray(300 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.5)"
    measured = bench_common.run_measured("alloc", [sys.executable, "-c", code], log_path=tmp_path / "log")
    assert measured.rc == 0 and measured.peak_tree_bytes > 300 * 2**20


@pytest.mark.slow
def test_pipeline_benchmark_quick_end_to_end(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_pipeline.py"), "--quick", "--json", str(out)]
    proc = subprocess.run([*cmd, "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    results = record["results"]
    for run in ("a", "a2", "b"):
        assert results[run]["rc"] == 0 and results[run]["wall_s"] > 0
    assert set(results["throughput_s"]) >= {"download aws s3 cp", "upload aws s3 cp"}


@pytest.mark.slow
def test_speculative_benchmark_quick_end_to_end(cache_dir: Path, tmp_path: Path) -> None:
    """The EAGLE-3 benchmark on the toy reference model: stage phases, head vs floor vs draft LM at k=3 and 5."""
    out = tmp_path / "speculative.json"
    cmd = [sys.executable, str(SCRIPTS / "bench_speculative.py"), "--quick", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert set(record["phases"]) == {"read_data", "regenerate", "train", "evaluate"}
    figures = record["figures"]
    assert len(figures) == 6 and all(f["lossless"] == f"{f['prompts']}/{f['prompts']}" for f in figures.values())
    head, floor = figures["EAGLE-3 head (optjob) k=3"], figures["untrained head (floor) k=3"]
    assert head["mean_accepted_length"] > floor["mean_accepted_length"]
    assert "mean accepted length at k=3" in proc.stdout
