"""Neuron compile jobs on this host: the S3 compile cache, optimum-cli as a subprocess, the layout gate.

optimum-neuron 0.4.5 runs in its own environment (scripts/neuron_env.sh, no Neuron SDK), as on a
worker. The cache key is optimum-neuron's own (checked here against its export code path); a
cache entry seeded in the layout optimum-neuron's registry and optjob's artifact folder use
completes a job on real S3 with no SDK; a miss runs the real ``optimum-cli export neuron`` and its
refusal becomes the FailureReason; corrupted entries fail the job and publish nothing.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from optjob.api.errors import parse
from optjob.api.shapes import CreateOptimizationJobRequest
from optjob.errors import InputError, JobCancelled, ToolchainMissing
from optjob.package.serving import read_serving_properties
from optjob.pipeline.plan import build_plan
from optjob.pipeline.run import run_plan
from optjob.pipeline.stage import technique_for
from optjob.pipeline.tool_process import run_tool
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import Event, EventSink
from optjob.storage.layout import MANIFEST_NAME
from optjob.techniques.compile.neuron_compile import export_input
from optjob.techniques.compile.neuron_env import cache_entry
from optjob.techniques.compile.neuron_layout import layout_problems, shard_name
from tests.support.s3server import S3Bucket

ROOT = Path(__file__).resolve().parent.parent
ARN = "arn:aws:sagemaker:us-east-1:000000000000:optimization-job/{}"
COMPILER = "neuronxcc-2.21.33363.0+82129205"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optjob.testing import build_tiny_llama

    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny") / "model",
        hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=500, shards=2, train_steps=0,
    )  # fmt: skip


@pytest.fixture
def neuron_env(neuron_python: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = Path(neuron_python).parent.parent
    monkeypatch.setenv("OPTJOB_NEURON_ENV", str(root))
    return root


def _plan(source: str, output: str, cache: str | None, name: str = "neuron-1"):
    env = {"OPTION_TENSOR_PARALLEL_DEGREE": "2", "OPTION_DTYPE": "fp16", "OPTION_N_POSITIONS": "256"}
    if cache:
        env["OPTION_NEURON_COMPILE_CACHE_URL"] = cache
    wire = {
        "OptimizationJobName": name,
        "RoleArn": "arn:aws:iam::000000000000:role/optjob",
        "ModelSource": {"S3": {"S3Uri": source}},
        "DeploymentInstanceType": "ml.inf2.xlarge",
        "OptimizationConfigs": [{"ModelCompilationConfig": {"OverrideEnvironment": env}}],
        "OutputConfig": {"S3OutputLocation": output},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
    }
    return build_plan(parse(CreateOptimizationJobRequest, wire), region="us-east-1")


def _planned_neuron_config(plan, model: Path) -> dict[str, Any]:
    stage = plan.stages[0]
    config = json.loads((model / "config.json").read_text())
    return technique_for(stage.technique).neuron_export(stage, config).neuron_config


def _run(plan, tmp_path: Path, events: list[Event] | None = None, cancel: CancelToken | None = None):
    sink = EventSink(events.append if events is not None else None)
    return run_plan(plan, work_dir=tmp_path / "work", job_arn=ARN.format(plan.job_name), events=sink, cancel=cancel)


class _Graph(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def _seed(bucket: S3Bucket, neuron_root: Path, model: Path, neuron_config: dict[str, Any], tmp_path: Path,
          *, drop: str | None = None, neuron_json: dict[str, Any] | None = None) -> str:  # fmt: skip
    """An entry as a Neuron worker leaves it: optimum-neuron's registry file, optjob's compiled model.

    The registry file is ``SingleModelCacheEntry.serialize()`` from optimum-neuron itself (another
    model id than the job's, as when someone else compiled the same architecture). The compiled
    model is a real TorchScript archive; a Neuron one needs the SDK to make.
    """
    entry = cache_entry(
        neuron_root,
        model_dir=export_input(model, tmp_path / "seed-input", neuron_config["torch_dtype"]),
        model_id="someone/else",
        task="text-generation",
        neuron_config=neuron_config,
    )
    base = f"cache/{COMPILER}"
    registry = f"{base}/0_REGISTRY/0.4.5/{entry['arch_digest']}/{entry['hash']}.json"
    bucket.client.put_object(Bucket=bucket.name, Key=registry, Body=entry["serialized"].encode())
    files = tmp_path / "seed-files"
    files.mkdir(exist_ok=True)
    torch.jit.save(torch.jit.script(_Graph()), files / "model.pt")
    (files / "neuron_config.json").write_text(json.dumps(neuron_json or neuron_config, indent=2))
    (files / "config.json").write_text((model / "config.json").read_text())
    artifact = f"{base}/0_OPTJOB/0.4.5/{entry['arch_digest']}/{entry['hash']}/"
    import hashlib

    listed = {}
    for path in sorted(files.iterdir()):
        listed[path.name] = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        if path.name != drop:
            bucket.client.upload_file(str(path), bucket.name, artifact + path.name)
    bucket.client.put_object(
        Bucket=bucket.name, Key=artifact + "optjob-entry.json", Body=json.dumps({"files": listed}).encode()
    )
    return artifact


def test_the_cache_key_is_the_one_optimum_neurons_export_registers(neuron_python: str, tmp_path: Path) -> None:
    """Our key for a model equals the registry path optimum-neuron's own export code would write."""
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 300,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-05, "torch_dtype": "bfloat16",
    }  # fmt: skip
    request = {
        "config": config, "batch_size": 1, "sequence_length": 512, "tensor_parallel_size": 2, "instance_type": "inf2",
        "dtype": None, "task": "text-generation", "model_id": "org/tiny", "checkpoint_revision": "a" * 40,
    }  # fmt: skip
    import subprocess

    done = subprocess.run(
        [neuron_python, str(ROOT / "scripts" / "neuron_plan_crosscheck.py")],
        input=json.dumps(request), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    theirs = json.loads(done.stdout)["cache"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config))
    ours = cache_entry(
        Path(neuron_python).parent.parent,
        model_dir=model,
        model_id="org/tiny",
        task="text-generation",
        neuron_config=theirs["entry"]["neuron"],
    )
    assert ours["arch_digest"] == theirs["arch_digest"] == theirs["lookup_arch_digest"]
    assert ours["hash"] == theirs["entry_hash"]
    assert f"{COMPILER}/{ours['registry_folder']}/{ours['arch_digest']}/{ours['hash']}.json" == theirs["registry_path"]


def test_a_cache_hit_completes_the_job_without_the_neuron_sdk(
    s3_bucket: S3Bucket, tiny_llama: Path, neuron_env: Path, tmp_path: Path
) -> None:
    s3_bucket.upload_dir(tiny_llama, "model")
    plan = _plan(s3_bucket.uri("model/"), s3_bucket.uri("out/"), s3_bucket.uri("cache/"))
    planned = _planned_neuron_config(plan, tiny_llama)
    assert planned["torch_dtype"] == "float16" and planned["tp_degree"] == 2 and planned["sequence_length"] == 256
    artifact = _seed(s3_bucket, neuron_env, tiny_llama, planned, tmp_path)
    events: list[Event] = []
    outcome = _run(plan, tmp_path, events)

    keys = {k[len("out/") :] for k in s3_bucket.keys("out/")}
    assert {"model.pt", "neuron_config.json", "config.json", "serving.properties", "tokenizer.json"} <= keys
    assert {"model-00001-of-00002.safetensors", "model.safetensors.index.json"} <= keys  # sharded at load time
    get = lambda key: s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=key)["Body"].read()  # noqa: E731
    assert json.loads(get("out/neuron_config.json")) == planned
    # OPTION_DTYPE is written where optimum-neuron reads the dtype from
    assert json.loads(get("out/config.json"))["dtype"] == "float16"
    assert get("out/model.pt") == get(artifact + "model.pt")
    figures = json.loads(get(f"out/{MANIFEST_NAME}"))["metrics"]["1:Compilation"]
    assert figures["compile_cache"] == "hit" and figures["compile_cache_entry"] == s3_bucket.uri(
        artifact + "optjob-entry.json"
    )
    assert figures["serving_environment"]["SM_ON_TENSOR_PARALLEL_SIZE"] == "2"
    properties = (tmp_path / "serving.properties").write_bytes(get("out/serving.properties"))
    properties = read_serving_properties(tmp_path / "serving.properties")
    assert properties["option.tensor_parallel_degree"] == "2" and properties["option.n_positions"] == "256"
    assert properties["option.dtype"] == "fp16" and properties["option.max_rolling_batch_size"] == "1"
    assert "huggingface-vllm-inference-neuronx:0.11.0-optimum0.4.5" in outcome.recommended_image
    assert any("compile-cache hit" in e.message for e in events)
    # no new entry is written for a hit
    assert len([k for k in s3_bucket.keys("cache/") if k.endswith("optjob-entry.json")]) == 1


def test_a_miss_without_the_sdk_fails_with_optimum_clis_own_error(
    s3_bucket: S3Bucket, tiny_llama: Path, neuron_env: Path, tmp_path: Path
) -> None:
    s3_bucket.upload_dir(tiny_llama, "model")
    plan = _plan(s3_bucket.uri("model/"), s3_bucket.uri("out/"), s3_bucket.uri("cache/"))
    events: list[Event] = []
    with pytest.raises(ToolchainMissing) as failed:
        _run(plan, tmp_path, events)
    reason = str(failed.value)
    assert f"The compile cache at {s3_bucket.uri('cache/')} has no entry for this export" in reason
    assert "no Neuron SDK (neuronx-cc, torch-neuronx, neuronx-distributed, libneuronxla)" in reason
    # optimum-cli registers `export neuron` only with torch-neuronx installed: its argparse refusal is the cause
    assert "optimum-cli export neuron stopped with: Optimum CLI tool: error: unrecognized arguments: neuron" in reason
    assert "Dockerfile.neuron" in reason and "fills the cache" in reason
    started = next(e for e in events if e.step == "compile" and e.fraction == 0.0).message.split()
    assert started[0].endswith("/bin/optimum-cli") and started[1:3] == ["export", "neuron"]
    assert started[started.index("--instance_type") + 1] == "inf2"
    assert started[started.index("--sequence_length") + 1] == "256"
    assert s3_bucket.keys("out/") == [] and not [k for k in s3_bucket.keys("cache/") if "0_OPTJOB" in k]


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        ({"drop": "model.pt"}, "is corrupted: Cannot download"),
        ({"neuron_json": "wrong"}, "its neuron_config.json disagrees with the plan (batch_size: planned 1, found 8)"),
    ],
    ids=["missing-file", "neuron-config-disagrees"],
)
def test_a_corrupted_entry_fails_the_job_and_publishes_nothing(
    s3_bucket: S3Bucket, tiny_llama: Path, neuron_env: Path, tmp_path: Path, damage: dict, fragment: str
) -> None:
    s3_bucket.upload_dir(tiny_llama, "model")
    plan = _plan(s3_bucket.uri("model/"), s3_bucket.uri("out/"), s3_bucket.uri("cache/"))
    planned = _planned_neuron_config(plan, tiny_llama)
    if damage.get("neuron_json") == "wrong":
        damage = {"neuron_json": {**planned, "batch_size": 8}}
    _seed(s3_bucket, neuron_env, tiny_llama, planned, tmp_path, **damage)
    with pytest.raises(InputError) as failed:
        _run(plan, tmp_path)
    assert fragment in str(failed.value) and "Nothing was published" in str(failed.value)
    assert s3_bucket.keys("out/") == []


def test_no_neuron_environment_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.host import toolchain_present

    monkeypatch.setenv("OPTJOB_NEURON_ENV", str(tmp_path / "absent"))
    assert not toolchain_present("neuron_env")
    (tmp_path / "present" / "bin").mkdir(parents=True)
    (tmp_path / "present" / "bin" / "python").symlink_to(sys.executable)
    monkeypatch.setenv("OPTJOB_NEURON_ENV", str(tmp_path / "present"))
    assert toolchain_present("neuron_env")


def test_a_cache_url_that_is_not_s3_is_refused_at_create() -> None:
    from optjob.api.errors import ValidationException

    with pytest.raises(ValidationException, match="OPTION_NEURON_COMPILE_CACHE_URL='/var/tmp/cache' at 'optimiz"):
        _plan("s3://models/llama/", "s3://models/out/", "/var/tmp/cache")


def _layout(directory: Path, neuron_config: dict[str, Any], *, ranks: int | None, weights: bool = False) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    (directory / "neuron_config.json").write_text(json.dumps(neuron_config))
    torch.jit.save(torch.jit.script(_Graph()), directory / "model.pt")
    for rank in range(ranks or 0):
        (directory / shard_name(rank)).parent.mkdir(parents=True, exist_ok=True)
        (directory / shard_name(rank)).write_bytes(b"x")
    if weights:
        (directory / "model.safetensors").write_bytes(b"x")
    return directory


def test_the_layout_gate_names_what_optimum_neuron_would_miss(tmp_path: Path) -> None:
    planned = {"tp_degree": 4, "batch_size": 1, "neuronxcc_version": "2.21.33363.0+82129205"}
    assert layout_problems(_layout(tmp_path / "ok", planned, ranks=4), planned) == []
    assert layout_problems(_layout(tmp_path / "on-load", planned, ranks=None, weights=True), planned) == []
    short = layout_problems(_layout(tmp_path / "short", planned, ranks=3), planned)
    assert short == [
        "checkpoint/weights holds ['tp0_sharded_checkpoint.safetensors', 'tp1_sharded_checkpoint.safetensors', "
        "'tp2_sharded_checkpoint.safetensors'] where tensor-parallel degree 4 needs "
        "['tp0_sharded_checkpoint.safetensors', 'tp1_sharded_checkpoint.safetensors', "
        "'tp2_sharded_checkpoint.safetensors', 'tp3_sharded_checkpoint.safetensors']"
    ]
    other = {**planned, "neuronxcc_version": "2.22.0.0+1"}
    assert layout_problems(_layout(tmp_path / "compiler", other, ranks=4), planned) == [
        "neuron_config.json has neuronxcc_version='2.22.0.0+1' where the plan has '2.21.33363.0+82129205'"
    ]
    bare = _layout(tmp_path / "bare", planned, ranks=None)
    (bare / "model.pt").write_bytes(b"not an archive")
    assert layout_problems(bare, planned) == [
        "model.pt is not a TorchScript archive",
        "no weights: neither checkpoint/weights/ (pre-sharded) nor *.safetensors (sharded on load)",
    ]


def test_a_stop_ends_the_tool_and_everything_it_started(tmp_path: Path) -> None:
    """SIGTERM reaches the tool's whole process group; one that ignores it is killed after the grace."""
    script = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
        "print('child', child.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    events: list[Event] = []
    cancel = CancelToken()

    def stop_when_started(event: Event) -> None:
        events.append(event)
        if event.message.startswith("child"):
            cancel.cancel("StopOptimizationJob")

    started = time.monotonic()
    with pytest.raises(JobCancelled, match="StopOptimizationJob"):
        run_tool([sys.executable, "-c", script], env=dict(os.environ), cwd=tmp_path,
                 events=EventSink(stop_when_started), cancel=cancel, stage="Compilation", step="compile",
                 grace_s=1.0)  # fmt: skip
    assert time.monotonic() - started < 30
    child = int(events[0].message.split()[1])
    for _ in range(50):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the tool's child outlived the stop")


def test_tool_output_becomes_events_and_the_tail_is_kept(tmp_path: Path) -> None:
    events: list[Event] = []
    script = "import sys\nfor i in range(60): print(f'line {i}')\nprint('ERROR: boom', file=sys.stderr)\nsys.exit(3)"
    done = run_tool([sys.executable, "-c", script], env=dict(os.environ), cwd=tmp_path, events=EventSink(events.append),
                    cancel=CancelToken(), stage="Compilation", step="compile")  # fmt: skip
    assert done.returncode == 3 and done.tail[-1] == "ERROR: boom" and len(done.tail) == 40
    assert [e.message for e in events][:2] == ["line 0", "line 1"] and len(events) == 61


def test_validate_plans_the_inf2_example_with_its_cache_path(neuron_env: Path, tmp_path: Path) -> None:
    """`optjob validate` prints, for the example spec and a Llama-3-8B config, the export and the registry folder
    the job will look in, keyed by optimum-neuron's own code."""
    from typer.testing import CliRunner

    import optjob.cli.validate  # noqa: F401  (registers the command on the app)
    from optjob.cli import app

    llama3 = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
        "bos_token_id": 128000, "eos_token_id": 128001,
    }  # fmt: skip
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(llama3))
    example = ROOT / "configs" / "examples" / "neuron-compile-inf2-48xlarge.json"
    result = CliRunner().invoke(app, ["validate", str(example), "--model-config", str(model / "config.json")])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    assert (
        "optimum-cli export neuron --model MODEL_DIR --task text-generation --batch_size 4 --sequence_length 8192 "
        "--tensor_parallel_size 24 --instance_type inf2 OUTPUT_DIR"
    ) in lines
    planned = json.loads(next(line for line in lines if line.startswith("neuron_config.json: ")).split(": ", 1)[1])
    assert (planned["tp_degree"], planned["torch_dtype"], planned["continuous_batching"]) == (24, "float16", True)
    assert "attention: replicate-to-tp-degree, 48 heads / 24 KV heads after padding, 2 / 1 per rank" in lines
    assert any("checkpoint/weights/tp{0..23}_sharded_checkpoint.safetensors" in line for line in lines)
    entry = cache_entry(
        neuron_env, model_dir=export_input(model, tmp_path / "export", "float16"), model_id="x/y",
        task="text-generation", neuron_config=planned,
    )  # fmt: skip
    registry = f"{COMPILER}/0_REGISTRY/0.4.5/{entry['arch_digest']}/*.json"
    assert f"compile cache: s3://optjob-neuron-cache/compile-cache/; looks up {registry}" in result.output


def test_a_stored_entry_is_found_fetched_and_checked(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """What a Neuron worker writes after a compile (files, registry entry, manifest last) is the next job's hit."""
    from optjob.runtime.events import NULL_SINK
    from optjob.storage.s3 import S3Settings, make_client
    from optjob.storage.uri import parse_s3_uri
    from optjob.techniques.compile.neuron_cache import CacheKey, NeuronCompileCache

    planned = {"tp_degree": 2, "batch_size": 1, "checkpoint_id": None, "torch_dtype": "bfloat16"}
    compiled = _layout(tmp_path / "compiled", planned, ranks=2)
    cache = NeuronCompileCache(parse_s3_uri(s3_bucket.uri("cache/")), make_client(S3Settings()), S3Settings())
    key = CacheKey(neuronxcc="2.21.33363.0+82129205", optimum_neuron="0.4.5", arch_digest="ab" * 32, hash="0123")
    serialized = json.dumps({"_entry_class": "SingleModelCacheEntry", "_model_id": "optjob/job-1", "neuron": planned})
    manifest = cache.store(key, serialized, compiled, events=NULL_SINK, cancel=CancelToken())
    prefix = f"cache/{COMPILER}"
    assert s3_bucket.keys("cache/") == sorted([
        f"{prefix}/0_OPTJOB/0.4.5/{'ab' * 32}/0123/{name}"
        for name in ("config.json", "model.pt", "neuron_config.json", "optjob-entry.json")
    ] + [f"{prefix}/0_REGISTRY/0.4.5/{'ab' * 32}/0123.json"])  # fmt: skip
    assert manifest == s3_bucket.uri(f"{prefix}/0_OPTJOB/0.4.5/{'ab' * 32}/0123/optjob-entry.json")
    # another job's export of the same architecture: another entry hash, the same neuron config (a hub id aside)
    other = key.model_copy(update={"hash": "4567"})
    hit, notes = cache.lookup(other, {**planned, "checkpoint_id": "org/model"})
    assert hit is not None and hit.entry_hash == "0123" and notes == []
    fetched = cache.fetch(other, hit, tmp_path / "fetched", planned, events=NULL_SINK, cancel=CancelToken())
    assert [p.read_bytes() for p in fetched] == [(compiled / p.name).read_bytes() for p in fetched]
    assert cache.lookup(other, {**planned, "batch_size": 4}) == (None, [])
