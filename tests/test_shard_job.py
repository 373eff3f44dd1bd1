"""A sharding job against the real S3 server: streamed, gated, published with the manifest last.

These go through ``run_plan`` exactly as a worker does: the request is planned, the source is
fetched shard by shard, the per-rank parts are uploaded as they pass the gate, and the manifest
(vLLM layout version, degree, sha256 per file) is written last. A refused model or a Stop leaves
nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from optjob.api.errors import parse
from optjob.api.shapes import CreateOptimizationJobRequest
from optjob.cli.validate import read_spec
from optjob.errors import InputError, JobCancelled, VerificationFailed
from optjob.pipeline.plan import build_plan
from optjob.pipeline.run import run_plan
from optjob.pipeline.streaming import streaming_technique
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import Event, EventSink
from optjob.storage.layout import MANIFEST_NAME
from tests.support.s3server import S3Bucket
from tests.support.shard_models import build_model

ARN = "arn:aws:sagemaker:us-east-1:000000000000:optimization-job/{}"
EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "examples" / "shard-tp2-g6-12xlarge.json"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The quick start's model (tokenizer, generation config, index over three shards)."""
    from optjob.testing import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny") / "model",
        hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=500, shards=3, train_steps=0,
    )  # fmt: skip


def _plan(source: str, output: str, degree: int = 2, name: str = "shard-1"):
    wire = read_spec(str(EXAMPLE))
    wire.update(OptimizationJobName=name, ModelSource={"S3": {"S3Uri": source}})
    wire["OutputConfig"]["S3OutputLocation"] = output
    wire["OptimizationConfigs"][0]["ModelShardingConfig"]["OverrideEnvironment"]["OPTION_TENSOR_PARALLEL_DEGREE"] = str(
        degree
    )
    return build_plan(parse(CreateOptimizationJobRequest, wire), region="us-east-1")


def _run(plan, tmp_path: Path, *, events: list[Event] | None = None, cancel: CancelToken | None = None):
    sink = EventSink(events.append if events is not None else None)
    return run_plan(plan, work_dir=tmp_path / "work", job_arn=ARN.format(plan.job_name), events=sink, cancel=cancel)


def test_example_spec_shards_and_publishes_with_the_manifest_last(
    s3_bucket: S3Bucket, tiny_llama: Path, tmp_path: Path
) -> None:
    s3_bucket.upload_dir(tiny_llama, "model")
    plan = _plan(s3_bucket.uri("model/"), s3_bucket.uri("out/"))
    assert streaming_technique(plan) is not None  # shard by shard, overlapped with the transfers
    events: list[Event] = []
    outcome = _run(plan, tmp_path, events=events)

    keys = {k[len("out/") :] for k in s3_bucket.keys("out/")}
    ranks = sorted(k for k in keys if k.startswith("model-rank-"))
    assert ranks == ["model-rank-0-part-0.safetensors", "model-rank-1-part-0.safetensors"]
    # every non-weight file of the source travels; the source's weights and weight index do not
    sources = {p.name for p in tiny_llama.iterdir()}
    carried = {n for n in sources if not n.endswith(".safetensors") and n != "model.safetensors.index.json"}
    assert carried <= keys and "tokenizer.json" in carried and "generation_config.json" in carried
    assert not keys & {n for n in sources if n.endswith(".safetensors")} and "model.safetensors.index.json" not in keys
    manifest = json.loads(s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=f"out/{MANIFEST_NAME}")["Body"].read())
    assert {f["path"] for f in manifest["files"]} == keys - {MANIFEST_NAME}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"])
    figures = manifest["metrics"]["1:Sharding"]
    assert figures["vllm_layout_version"] == "0.32.0" and figures["tensor_parallel_degree"] == 2
    assert figures["gate"]["passed"] and figures["gate"]["tensors_checked"] == 2 * figures["tensors_per_rank"]
    assert figures["padded_vocab_size"] == 512
    assert set(outcome.published) == {f["path"] for f in manifest["files"]}
    props = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="out/serving.properties")["Body"].read().decode()
    assert "option.load_format=sharded_state" in props and "option.tensor_parallel_degree=2" in props

    local = tmp_path / "rank0.safetensors"
    s3_bucket.client.download_file(s3_bucket.name, "out/model-rank-0-part-0.safetensors", str(local))
    assert load_file(str(local))["model.embed_tokens.weight"].shape == (256, 128)  # 512 padded rows / 2 ranks
    assert ("shard", "done") in [(e.stage, e.step) for e in events]
    assert not (tmp_path / "work").exists()


def test_stop_mid_job_publishes_nothing(s3_bucket: S3Bucket, tiny_llama: Path, tmp_path: Path) -> None:
    s3_bucket.upload_dir(tiny_llama, "model")
    cancel = CancelToken()

    def stop_after_first_layer(event: Event) -> None:
        if (event.stage, event.step) == ("shard", "tensor"):
            cancel.cancel("StopOptimizationJob")

    with pytest.raises(JobCancelled):
        run_plan(_plan(s3_bucket.uri("model/"), s3_bucket.uri("out/")), work_dir=tmp_path / "work",
                 job_arn=ARN.format("shard-1"), events=EventSink(stop_after_first_layer), cancel=cancel)  # fmt: skip
    assert s3_bucket.keys("out/") == []
    assert not (tmp_path / "work").exists()


def test_a_layout_slip_caught_by_the_gate_removes_what_was_uploaded(
    s3_bucket: S3Bucket, tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optjob.techniques.shard.layout import Splitter

    s3_bucket.upload_dir(tiny_llama, "model")
    # A sharder bug the gate must catch: every rank takes KV head 0. Rank 0's file is already
    # uploaded when the last rank reveals it; the failed job must take it back.
    monkeypatch.setattr(Splitter, "_kv_rows", lambda self, rank: (0, self.geo.head_dim))
    events: list[Event] = []
    with pytest.raises(VerificationFailed, match="sharding gate"):
        _run(_plan(s3_bucket.uri("model/"), s3_bucket.uri("out/")), tmp_path, events=events)
    assert any(e.stage == "upload" for e in events)  # something had been shipped before the verdict
    assert s3_bucket.keys("out/") == [] and s3_bucket.multipart_uploads() == []


def test_unsupported_architecture_fails_before_any_weight_with_nothing_published(
    s3_bucket: S3Bucket, tmp_path: Path
) -> None:
    model = build_model("llama", tmp_path / "src")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (model / "config.json").write_text(json.dumps(config))
    s3_bucket.upload_dir(model, "model")
    with pytest.raises(InputError, match="this model is FalconForCausalLM"):
        _run(_plan(s3_bucket.uri("model/"), s3_bucket.uri("out/")), tmp_path)
    assert s3_bucket.keys("out/") == []


def test_quantized_source_is_refused_with_nothing_published(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    model = build_model("qwen2", tmp_path / "src")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8"}
    (model / "config.json").write_text(json.dumps(config))
    s3_bucket.upload_dir(model, "model")
    with pytest.raises(InputError, match=r"quantized \(modelopt\)"):
        _run(_plan(s3_bucket.uri("model/"), s3_bucket.uri("out/")), tmp_path)
    assert s3_bucket.keys("out/") == []
