"""Speculative decoding jobs: EAGLE-3 heads trained from the TrainingDataSource, bring-your-own draft models.

Jobs run through ``run_plan`` as a worker runs them (real S3 server, the tiny trained Llama as the
target), and through ``optjob run`` for the shipped example. The published head is checked against
an EAGLE-3 drafter written separately from vLLM's semantics (``tests/support/eagle3_reference.py``), which
must reproduce the acceptance figures the job recorded.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from optjob.api.errors import ValidationException, parse
from optjob.api.shapes import CreateOptimizationJobRequest
from optjob.errors import InputError, VerificationFailed
from optjob.pipeline.plan import build_plan
from optjob.pipeline.run import run_plan
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import Event, EventSink
from optjob.storage.layout import MANIFEST_NAME
from optjob.techniques.quantize.calibration import load_texts
from optjob.techniques.speculative.data import detect, read_training_data
from optjob.techniques.speculative.evaluate import Figures, measure, reference_outputs
from optjob.techniques.speculative.target import Target, aux_layer_ids, load_target
from optjob.techniques.speculative.technique import judge
from optjob.techniques.speculative.train import DraftVocab, init_head
from tests.support.eagle3_reference import ReferenceEagle3, replay
from tests.support.s3server import S3Bucket

ROOT = Path(__file__).resolve().parent.parent
ARN = "arn:aws:sagemaker:us-east-1:000000000000:optimization-job/{}"
EXAMPLE = ROOT / "configs" / "examples" / "eagle-g6-12xlarge.json"
FAST = {"OPTION_EAGLE_MAX_SAMPLES": "72", "OPTION_EAGLE_EPOCHS": "3", "OPTION_EAGLE_MAX_SEQ_LEN": "128",
        "OPTION_EAGLE_EVAL_PROMPTS": "6"}  # fmt: skip


@pytest.fixture(scope="module")
def target_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from optjob.testing import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("target") / "model")


def _put(bucket: S3Bucket, key: str, body: bytes) -> None:
    bucket.client.put_object(Bucket=bucket.name, Key=key, Body=body)


def _texts() -> list[str]:
    return [t[:300] for t in load_texts(None)]


def _capture(request: dict[str, Any], response: dict[str, Any], encoding: str = "JSON") -> dict[str, Any]:
    def side(body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body)
        if encoding == "BASE64":
            data = base64.b64encode(data.encode()).decode()
        return {"observedContentType": "application/json", "mode": "INPUT", "data": data, "encoding": encoding}

    return {"captureData": {"endpointInput": side(request), "endpointOutput": side(response)},
            "eventMetadata": {"eventId": "e"}, "eventVersion": "0"}  # fmt: skip


def _mixed_lines(texts: list[str], start: int, count: int) -> list[str]:
    """Every accepted format in turn, as users send them."""
    lines = []
    for i in range(start, start + count):
        prompt, reply = texts[i], texts[i + 1]
        kind = i % 5
        if kind == 0:
            record: dict[str, Any] = {
                "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]
            }
        elif kind == 1:
            record = {"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": prompt}]},
                                   {"role": "assistant", "content": reply}]}  # fmt: skip
        elif kind == 2:
            record = {"prompt": prompt, "completion": reply}
        elif kind == 3:
            record = _capture({"messages": [{"role": "user", "content": prompt}]},
                              {"choices": [{"message": {"role": "assistant", "content": reply}}]})  # fmt: skip
        else:
            record = _capture({"inputs": prompt, "parameters": {}}, [{"generated_text": reply}], "BASE64")
        lines.append(json.dumps(record))
    return lines


def _plan(source: str, output: str, env: dict[str, str], data: dict[str, str] | None = None, name: str = "eagle-1"):
    wire = json.loads(EXAMPLE.read_text())
    wire.update(OptimizationJobName=name, ModelSource={"S3": {"S3Uri": source}}, OptimizationEnvironment=env)
    wire["OutputConfig"]["S3OutputLocation"] = output
    config = wire["OptimizationConfigs"][0]["ModelSpeculativeDecodingConfig"]
    config.pop("TrainingDataSource", None)
    if data:
        config["TrainingDataSource"] = data
    return build_plan(parse(CreateOptimizationJobRequest, wire), region="us-east-1")


def _run(plan: Any, tmp_path: Path, events: list[Event] | None = None, cancel: CancelToken | None = None) -> Any:
    sink = EventSink(events.append if events is not None else None)
    return run_plan(plan, work_dir=tmp_path / "work", job_arn=ARN.format(plan.job_name), events=sink, cancel=cancel)


def _manifest(bucket: S3Bucket, prefix: str) -> dict[str, Any]:
    return json.loads(bucket.client.get_object(Bucket=bucket.name, Key=f"{prefix}{MANIFEST_NAME}")["Body"].read())


# --- training data ---------------------------------------------------------------------------------


def test_every_format_is_detected_per_line() -> None:
    lines = [json.loads(line) for line in _mixed_lines(_texts(), 0, 5)]
    found = [detect(record) for record in lines]
    assert [c.format for c in found] == ["sharegpt", "openai_chat", "openai_completions", "sagemaker_capture",
                                         "sagemaker_capture"]  # fmt: skip
    assert all(c.reply and c.prompt_turns for c in found)
    assert found[1].turns[0] == ("system", "Be brief.") and found[2].completion and found[4].completion
    assert detect({"text": "x"}) == "no conversations, messages, prompt or captureData key"
    assert detect({"messages": [{"role": "user", "content": 3}]}) == "openai chat without usable messages"
    assert detect(["a"]) == "not a JSON object"


def test_prefix_and_manifest_sources_record_provenance(s3_bucket: S3Bucket) -> None:
    texts = _texts()
    good = "\n".join(_mixed_lines(texts, 0, 10)) + "\n{not json\n" + json.dumps({"text": "plain"}) + "\n"
    _put(s3_bucket, "chats/a.jsonl", good.encode())
    _put(s3_bucket, "chats/sub/b.jsonl", "\n".join(_mixed_lines(texts, 20, 5)).encode())
    _put(s3_bucket, "chats/readme.txt", b"ignored")
    data = read_training_data(s3_bucket.uri("chats/"), "S3Prefix", max_samples=100)
    assert len(data.conversations) == 15 and data.lines == 17
    assert data.skipped == {"not JSON": 1, "no conversations, messages, prompt or captureData key": 1}
    record = data.provenance()
    assert [f["uri"] for f in record["files"]] == [s3_bucket.uri("chats/a.jsonl"), s3_bucket.uri("chats/sub/b.jsonl")]
    assert all(len(f["etag"]) >= 32 and f["size"] > 0 for f in record["files"])
    assert record["formats"] == {"sharegpt": 3, "openai_chat": 3, "openai_completions": 3, "sagemaker_capture": 6}

    manifest = [{"prefix": s3_bucket.uri("chats/")}, "sub/b.jsonl"]
    _put(s3_bucket, "lists/train.manifest", json.dumps(manifest).encode())
    listed = read_training_data(s3_bucket.uri("lists/train.manifest"), "ManifestFile", max_samples=3)
    assert len(listed.conversations) == 3 and listed.capped
    assert [f["uri"] for f in listed.files] == [s3_bucket.uri("chats/sub/b.jsonl")]


def test_bad_sources_name_the_first_bad_file_and_line(s3_bucket: S3Bucket) -> None:
    with pytest.raises(InputError, match=r"holds no \.jsonl files"):
        read_training_data(s3_bucket.uri("nothing/"), "S3Prefix", max_samples=10)
    _put(s3_bucket, "bad/x.jsonl", b'{"text": "a"}\n\n[1, 2]\n')
    with pytest.raises(InputError) as info:
        read_training_data(s3_bucket.uri("bad/"), "S3Prefix", max_samples=10)
    assert f"{s3_bucket.uri('bad/x.jsonl')} line 1 (no conversations, messages, prompt or captureData key)" in str(
        info.value
    )
    _put(s3_bucket, "binary/y.jsonl", b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="not UTF-8"):
        read_training_data(s3_bucket.uri("binary/"), "S3Prefix", max_samples=10)
    _put(s3_bucket, "lists/bad.manifest", b'["chats/a.jsonl"]')
    with pytest.raises(InputError, match=r'first element is \{"prefix"'):
        read_training_data(s3_bucket.uri("lists/bad.manifest"), "ManifestFile", max_samples=10)
    with pytest.raises(InputError, match="no such object"):
        read_training_data(s3_bucket.uri("lists/missing.manifest"), "ManifestFile", max_samples=10)


# --- planning ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OPTION_NUM_SPECULATIVE_TOKENS": "0"}, "OPTION_NUM_SPECULATIVE_TOKENS='0' at 'optimizationConfigs.1.member"
         ".modelSpeculativeDecodingConfig' must be an integer from 1 to 10"),
        ({"OPTION_EAGLE_EPOCHS": "many"}, "OPTION_EAGLE_EPOCHS='many'"),
        ({"OPTION_EAGLE_REGENERATE": "maybe"}, "OPTION_EAGLE_REGENERATE='maybe' at"),
        ({"OPTION_SPECULATIVE_DRAFT_MODEL": "/local/draft"}, "OPTION_SPECULATIVE_DRAFT_MODEL='/local/draft'"),
    ],
)  # fmt: skip
def test_unknown_knob_values_are_validation_errors(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationException) as info:
        _plan("s3://bkt/m/", "s3://bkt/o/", env)
    assert message in str(info.value)


def test_plan_records_the_knobs_and_trains_on_any_host() -> None:
    plan = _plan("s3://bkt/m/", "s3://bkt/o/", {"OPTION_NUM_SPECULATIVE_TOKENS": "5"},
                 {"S3Uri": "s3://bkt/d/", "S3DataType": "ManifestFile"})  # fmt: skip
    stage = plan.stages[0]
    assert stage.engine == "eagle3" and not stage.needs.accelerator
    assert stage.params["num_speculative_tokens"] == 5 and stage.params["training_data_type"] == "ManifestFile"
    assert stage.params["regenerate"] is True and stage.params["epochs"] == 4
    byo = _plan("s3://bkt/m/", "s3://bkt/o/", {"OPTION_SPECULATIVE_DRAFT_MODEL": "s3://bkt/draft/"})
    assert byo.stages[0].engine == "draft_model"


def test_validate_with_a_model_config_names_the_layers_the_head_reads() -> None:
    from optjob.pipeline.stage import technique_for

    plan = _plan("s3://bkt/m/", "s3://bkt/o/", {})
    lines = technique_for("ModelSpeculativeDecodingConfig").model_plan_lines(
        plan.stages[0], {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32}, plan.target
    )
    assert lines == ["EAGLE-3 head: one Llama decoder layer (hidden 4096, 32 heads) over target layers [2, 16, 29] "
                     "of 32; k=3; published under speculator/"]  # fmt: skip


def test_auxiliary_layers_are_distinct_on_shallow_models() -> None:
    assert aux_layer_ids(4) == [1, 2, 3]
    assert aux_layer_ids(6) == [1, 3, 5]
    assert aux_layer_ids(32) == [2, 16, 29]  # vLLM's default where it is distinct
    with pytest.raises(InputError, match="only 2 layers"):
        aux_layer_ids(2)


def test_an_architecture_without_decoder_layers_is_named() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(InputError, match="cannot hook GPT2LMHeadModel"):
        Target(model, [1, 2, 3], torch.device("cpu"))


# --- the gate ------------------------------------------------------------------------------------------


def test_a_decoder_that_changes_the_output_fails_and_an_untrained_head_is_the_floor(target_model: Path) -> None:
    target = load_target(target_model)
    vocab = DraftVocab(torch.arange(256), 1.0)
    head = init_head(target, vocab, target.aux_ids, seed=0)
    prompts = [[1, 40 + i, 41 + i, 42] for i in range(3)]
    common: dict[str, Any] = dict(k=3, new_tokens=12, eos=set(), events=EventSink(), cancel=CancelToken())
    refs, _ = reference_outputs(target, prompts, 12, set(), events=EventSink(), cancel=CancelToken())
    floor = measure(target, head, prompts, refs, label="floor", **common)
    assert floor.lossless == 3 and floor.as_dict()["mean_accepted_length"] < 1.2

    def accepts_everything(target: Target, proposer: Any, prompt: list[int], n: int, k: int, eos: set[int],
                           figures: Figures) -> list[int]:  # fmt: skip
        figures.rounds += 1
        figures.proposed += k
        figures.accepted += k
        return [*prompt[:k], *refs[0]][:n]  # drafts taken unverified: a broken verifier

    broken = measure(target, head, prompts, refs, label="broken", decode=accepts_everything, **common)
    with pytest.raises(VerificationFailed, match=r"changed the target's greedy output on 3 held-out prompt\(s\)"):
        judge(broken, floor, "trained EAGLE-3 head")
    with pytest.raises(VerificationFailed, match="not clearly better than an untrained draft") as info:
        judge(floor, floor, "trained EAGLE-3 head")
    assert "mean accepted length" in str(info.value) and "configs/verify.yaml" in str(info.value)


# --- jobs ------------------------------------------------------------------------------------------------


def test_eagle3_job_trains_on_every_format_and_an_independent_drafter_reproduces_its_figures(
    s3_bucket: S3Bucket, target_model: Path, tmp_path: Path
) -> None:
    s3_bucket.upload_dir(target_model, "model")
    texts = _texts()
    _put(s3_bucket, "chats/part-1.jsonl", "\n".join(_mixed_lines(texts, 0, 50)).encode())
    long_one = {"prompt": texts[200], "completion": " ".join(texts[201:230])}  # longer than OPTION_EAGLE_MAX_SEQ_LEN
    part2 = [json.dumps(long_one), "not json", *_mixed_lines(texts, 100, 30)]
    _put(s3_bucket, "chats/part-2.jsonl", "\n".join(part2).encode())
    plan = _plan(
        s3_bucket.uri("model/"),
        s3_bucket.uri("out/"),
        FAST,
        {"S3Uri": s3_bucket.uri("chats/"), "S3DataType": "S3Prefix"},
    )
    events: list[Event] = []
    outcome = _run(plan, tmp_path, events)
    assert "TrainingDataSource: 1 line(s) skipped (1 not JSON)" in outcome.warnings
    assert any("truncated to OPTION_EAGLE_MAX_SEQ_LEN=128 tokens" in w for w in outcome.warnings)

    steps = {e.step for e in events if e.stage == "SpeculativeDecoding"}
    assert {"data", "regenerate", "train", "evaluate"} <= steps
    assert any(e.step == "train" and e.eta_s is not None and "loss" in e.message for e in events)
    manifest = _manifest(s3_bucket, "out/")
    figures = manifest["metrics"]["1:SpeculativeDecoding"]
    data = figures["training_data"]
    assert data["conversations"] == 72 and data["skipped_lines"] == {"not JSON": 1} and data["capped_at_max_samples"]
    assert [f["uri"] for f in data["files"]] == [
        s3_bucket.uri("chats/part-1.jsonl"),
        s3_bucket.uri("chats/part-2.jsonl"),
    ]
    assert set(data["formats"]) == {"sharegpt", "openai_chat", "openai_completions", "sagemaker_capture"}
    assert figures["rendered"] == "plain text (no chat template)" and figures["regenerated"] == figures[
        "train_conversations"
    ] + figures.get("empty_reply", 0)
    assert figures["held_out_prompts"] == 6 and figures["truncated_to_max_seq_len"] >= 1
    acceptance, floor = figures["acceptance"], figures["floor"]
    assert acceptance["lossless"] == "6/6" and floor["lossless"] == "6/6"
    assert acceptance["mean_accepted_length"] >= floor["mean_accepted_length"] + 0.25 and figures["gate"]["passed"]

    keys = set(s3_bucket.keys("out/"))
    expected = {"model.safetensors", "config.json", "tokenizer.json", "speculator/config.json",
                "speculator/model.safetensors", "speculator/evaluation.json", "serving.properties"}  # fmt: skip
    assert {f"out/{name}" for name in expected} <= keys
    local = tmp_path / "published"
    for key in keys:
        (local / key[4:]).parent.mkdir(parents=True, exist_ok=True)
        s3_bucket.client.download_file(s3_bucket.name, key, str(local / key[4:]))
    # the target is published exactly as it came in
    assert (local / "model.safetensors").read_bytes() == (target_model / "model.safetensors").read_bytes()
    config = json.loads((local / "speculator" / "config.json").read_text())
    assert config["speculators_model_type"] == "eagle3" and config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
    assert {config[k] for k in ("norm_before_fc", "fc_norm", "norm_output")} == {False} and config[
        "norm_before_residual"
    ]
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    assert config["speculators_config"]["verifier"]["name_or_path"] == "/opt/ml/model"
    with safe_open(str(local / "speculator" / "model.safetensors"), framework="pt") as handle:
        names = set(handle.keys())
        d2t, t2d = handle.get_tensor("d2t"), handle.get_tensor("t2d")
    assert not any(n.startswith("model.") for n in names)
    assert {"embed_tokens.weight", "fc.weight", "lm_head.weight", "layers.0.hidden_norm.weight"} <= names
    assert d2t.dtype == torch.int64 and t2d.dtype == torch.bool and int(t2d.sum()) == config["draft_vocab_size"]
    assert torch.equal(torch.arange(len(d2t)) + d2t, t2d.nonzero().flatten())  # offsets, not ids
    properties = (local / "serving.properties").read_text()
    assert (
        'option.speculative_config={"method":"eagle3","model":"/opt/ml/model/speculator","num_speculative_tokens":3}'
        in properties
    )
    assert "option.eagle_" not in properties

    evaluation = json.loads((local / "speculator" / "evaluation.json").read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
    again = replay(model, ReferenceEagle3(local / "speculator"), evaluation["prompts"], evaluation["k"],
                   evaluation["new_tokens"], set(evaluation["eos_token_ids"]))  # fmt: skip
    recorded = evaluation["figures"]
    assert again["rounds"] == recorded["rounds"]
    assert again["mean_accepted_length"] == recorded["mean_accepted_length"] == acceptance["mean_accepted_length"]
    assert again["per_position_acceptance"] == recorded["per_position_acceptance"]


def test_replies_from_the_dataset_train_without_regeneration(
    s3_bucket: S3Bucket, target_model: Path, tmp_path: Path
) -> None:
    s3_bucket.upload_dir(target_model, "model")
    _put(s3_bucket, "data/chats.jsonl", "\n".join(_mixed_lines(_texts(), 0, 80)).encode())
    _put(s3_bucket, "data/train.manifest", json.dumps([{"prefix": s3_bucket.uri("data/")}, "chats.jsonl"]).encode())
    env = {**FAST, "OPTION_EAGLE_REGENERATE": "false", "OPTION_NUM_SPECULATIVE_TOKENS": "2"}
    plan = _plan(s3_bucket.uri("model/"), s3_bucket.uri("off/"), env,
                 {"S3Uri": s3_bucket.uri("data/train.manifest"), "S3DataType": "ManifestFile"})  # fmt: skip
    try:
        _run(plan, tmp_path)
    except VerificationFailed as exc:  # off-policy data may not beat the floor on a tiny target: then nothing is out
        assert "not clearly better" in str(exc) and s3_bucket.keys("off/") == []
        return
    figures = _manifest(s3_bucket, "off/")["metrics"]["1:SpeculativeDecoding"]
    assert figures["regenerated"] == 0 and figures["acceptance"]["k"] == 2
    assert figures["training_data"]["files"][0]["uri"] == s3_bucket.uri("data/chats.jsonl")


def test_stop_mid_training_publishes_nothing_and_removes_scratch(
    s3_bucket: S3Bucket, target_model: Path, tmp_path: Path
) -> None:
    s3_bucket.upload_dir(target_model, "model")
    plan = _plan(s3_bucket.uri("model/"), s3_bucket.uri("stopped/"), {**FAST, "OPTION_EAGLE_EPOCHS": "50"})
    cancel = CancelToken()
    events: list[Event] = []

    def stop_when_training(event: Event) -> None:
        events.append(event)
        if event.step == "train" and event.fraction and event.fraction > 0:
            cancel.cancel("StopOptimizationJob")

    from optjob.errors import JobCancelled

    with pytest.raises(JobCancelled):
        run_plan(
            plan,
            work_dir=tmp_path / "work",
            job_arn=ARN.format("s"),
            events=EventSink(stop_when_training),
            cancel=cancel,
        )
    assert any(e.step == "train" for e in events)
    assert s3_bucket.keys("stopped/") == [] and s3_bucket.multipart_uploads("stopped/") == []
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_bring_your_own_draft_model_is_checked_measured_and_packaged(
    s3_bucket: S3Bucket, target_model: Path, tmp_path: Path
) -> None:
    from optjob.testing import build_tiny_llama

    s3_bucket.upload_dir(target_model, "model")
    # a draft with the target's tokenizer: here the target's own weights, so every draft must be accepted
    s3_bucket.upload_dir(target_model, "draft")
    other = build_tiny_llama(tmp_path / "other", layers=2, hidden=128, intermediate=256, vocab=1024, train_steps=0)
    s3_bucket.upload_dir(other, "other")

    env = {**FAST, "OPTION_SPECULATIVE_DRAFT_MODEL": s3_bucket.uri("other/")}
    with pytest.raises(InputError) as info:
        _run(_plan(s3_bucket.uri("model/"), s3_bucket.uri("bad/"), env), tmp_path / "a")
    assert f"OPTION_SPECULATIVE_DRAFT_MODEL={s3_bucket.uri('other/')} cannot draft for this target" in str(info.value)
    assert "tokens" in str(info.value) and s3_bucket.keys("bad/") == []

    env = {**FAST, "OPTION_SPECULATIVE_DRAFT_MODEL": s3_bucket.uri("draft/")}
    _run(_plan(s3_bucket.uri("model/"), s3_bucket.uri("byo/"), env), tmp_path / "b")
    keys = set(s3_bucket.keys("byo/"))
    assert {"byo/draft_model/config.json", "byo/draft_model/model.safetensors", "byo/model.safetensors"} <= keys
    figures = _manifest(s3_bucket, "byo/")["metrics"]["1:SpeculativeDecoding"]
    assert figures["draft_model"]["uri"] == s3_bucket.uri("draft/") and figures["draft_model"]["etags"]
    assert set(figures["phases"]) == {"fetch_draft", "evaluate"} and figures["evaluation_data"]["conversations"] > 0
    assert figures["acceptance"]["lossless"] == "6/6" and figures["gate"]["passed"]
    assert figures["acceptance"]["acceptance_rate"] == 1.0 and figures["floor"]["mean_accepted_length"] < 1.2
    properties = (
        s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="byo/serving.properties")["Body"].read().decode()
    )
    assert '"method":"draft_model","model":"/opt/ml/model/draft_model"' in properties


def test_the_example_runs_end_to_end_with_optjob_run(s3_bucket: S3Bucket, target_model: Path, tmp_path: Path) -> None:
    s3_bucket.upload_dir(target_model, "model")
    spec = json.loads(EXAMPLE.read_text())
    spec["ModelSource"]["S3"]["S3Uri"] = s3_bucket.uri("model/")
    spec["OutputConfig"]["S3OutputLocation"] = s3_bucket.uri("example/")
    spec["OptimizationEnvironment"] = {**spec.get("OptimizationEnvironment", {}), **FAST}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OPTJOB_"))}
    env.update(s3_bucket.server.aws_env(), OPTJOB_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-m", "optjob", "run", str(path)], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    figures = _manifest(s3_bucket, "example/")["metrics"]["1:SpeculativeDecoding"]
    assert figures["training_data"]["source"].startswith("built-in prompts") and figures["gate"]["passed"]


def test_a_head_is_trained_for_the_quantized_target_the_job_publishes(
    s3_bucket: S3Bucket, target_model: Path, tmp_path: Path
) -> None:
    """[Quantization, SpeculativeDecoding]: the head learns the FP8 model that is served, which is published
    exactly as the quantization stage wrote it, with both stages' serving options."""
    s3_bucket.upload_dir(target_model, "model")
    wire = json.loads(EXAMPLE.read_text())
    wire.update(OptimizationJobName="fp8-eagle", ModelSource={"S3": {"S3Uri": s3_bucket.uri("model/")}},
                OptimizationEnvironment=FAST)  # fmt: skip
    wire["OutputConfig"]["S3OutputLocation"] = s3_bucket.uri("fp8-eagle/")
    quantize = {"OverrideEnvironment": {"OPTION_QUANTIZE": "fp8", "OPTION_FP8_SCHEME": "FP8_DYNAMIC"}}
    wire["OptimizationConfigs"].insert(0, {"ModelQuantizationConfig": quantize})
    plan = build_plan(parse(CreateOptimizationJobRequest, wire), region="us-east-1")
    assert plan.optimization_types == ["Quantization", "SpeculativeDecoding"]
    _run(plan, tmp_path)
    config = json.loads(s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="fp8-eagle/config.json")["Body"].read())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    figures = _manifest(s3_bucket, "fp8-eagle/")["metrics"]
    assert figures["1:Quantization"]["verification"]["passed"]
    assert figures["2:SpeculativeDecoding"]["gate"]["passed"]
    properties = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key="fp8-eagle/serving.properties")["Body"].read()
    assert b"option.quantize=compressed-tensors" in properties and b"option.speculative_config=" in properties
