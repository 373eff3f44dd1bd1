"""The sharding stage at its edge: per-rank files with vLLM's names, shapes and values, and its refusals.

Expectations here are written from vLLM's rules directly (not from optjob's layout code): which
tensors a rank holds, the padded vocabulary, the KV head each rank gets. The cross-check against
vLLM itself is tests/test_shard_vllm.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from optjob.errors import InputError, VerificationFailed
from optjob.pipeline.stage import PlanError, StageContext, StageResult, technique_for
from optjob.storage.safetensors_io import ShardReader
from optjob.targets.catalog import instance
from tests.support.shard_models import build_model

BUFFERS = ("_k_scale", "_v_scale", "_q_scale", "_prob_scale")


class ShardingConfig(BaseModel):
    Image: str | None = None


def run_stage(
    model: Path, out: Path, degree: int, *, env: dict[str, str] | None = None, part_bytes: int | None = None,
    target: str = "ml.p4d.24xlarge",
) -> tuple[StageResult, list[Path]]:  # fmt: skip
    tech = technique_for("ModelShardingConfig")
    spec = instance(target)
    stage = tech.plan(ShardingConfig(), {"OPTION_TENSOR_PARALLEL_DEGREE": str(degree), **(env or {})}, spec, path="p")
    if part_bytes is not None:
        stage = stage.model_copy(update={"params": {**stage.params, "part_max_bytes": part_bytes}})
    shipped: list[Path] = []
    ctx = StageContext(job_name="t", input_dir=model, output_dir=out, work_dir=out.parent / "work", target=spec)
    weights = sorted(model.glob("*.safetensors"))
    return tech.run_streaming(stage, ctx, iter(weights), shipped.append), shipped


def rank_state(out: Path, rank: int) -> dict[str, torch.Tensor]:
    """All tensors one rank holds, across its part files."""
    state: dict[str, torch.Tensor] = {}
    for path in out.glob(f"model-rank-{rank}-part-*.safetensors"):
        state.update(load_file(str(path)))
    return state


def source_state(model: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in model.glob("*.safetensors"):
        state.update(load_file(str(path)))
    return state


def expected_names(config: dict, *, qkv_bias: bool, o_bias: bool, mlp_bias: bool, qk_norm: bool) -> set[str]:
    names = {"model.norm.weight", "lm_head.weight"}
    if not config.get("tie_word_embeddings"):
        names.add("model.embed_tokens.weight")
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        names |= {f"{p}.{n}" for n in ("self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "mlp.down_proj.weight",
                                        "mlp.gate_up_proj.weight", "input_layernorm.weight",
                                        "post_attention_layernorm.weight")}  # fmt: skip
        names |= {f"{p}.self_attn.attn.{b}" for b in BUFFERS}
        if qkv_bias:
            names.add(f"{p}.self_attn.qkv_proj.bias")
        if o_bias:
            names.add(f"{p}.self_attn.o_proj.bias")
        if mlp_bias:
            names |= {f"{p}.mlp.gate_up_proj.bias", f"{p}.mlp.down_proj.bias"}
        if qk_norm:
            names |= {f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"}
    return names


CASES = [
    # kind, degree, tied, (qkv_bias, o_bias, mlp_bias, qk_norm)
    ("llama", 1, False, (False, False, False, False)),
    ("llama", 2, False, (False, False, False, False)),
    ("llama", 4, False, (False, False, False, False)),
    ("llama", 8, True, (False, False, False, False)),
    ("llama-bias", 4, False, (True, True, True, False)),
    ("mistral", 2, False, (False, False, False, False)),
    ("qwen2", 2, True, (True, False, False, False)),
    ("qwen2", 4, True, (True, False, False, False)),
    ("qwen3", 2, False, (False, False, False, True)),
    ("qwen3", 4, True, (False, False, False, True)),
]


@pytest.mark.parametrize(
    ("kind", "degree", "tied", "flags"), CASES, ids=[f"{c[0]}-tp{c[1]}{'-tied' if c[2] else ''}" for c in CASES]
)
def test_each_rank_holds_vllms_tensors(kind: str, degree: int, tied: bool, flags: tuple, tmp_path: Path) -> None:
    model = build_model(kind, tmp_path / "src", tied=tied)
    config = json.loads((model / "config.json").read_text())
    result, shipped = run_stage(model, tmp_path / "out", degree)
    out = tmp_path / "out"
    src = source_state(model)
    hd = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    heads, kv, vocab = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    padded = -(-vocab // 64) * 64
    embed = src["model.embed_tokens.weight"]
    want = expected_names(config, qkv_bias=flags[0], o_bias=flags[1], mlp_bias=flags[2], qk_norm=flags[3])

    for rank in range(degree):
        state = rank_state(out, rank)
        assert set(state) == want
        assert all(t.dtype == torch.bfloat16 for n, t in state.items() if "_scale" not in n)
        assert all(state[f"model.layers.0.self_attn.attn.{b}"].item() == 1.0 for b in BUFFERS)
        # Vocabulary: padded to 64, equal row blocks, zero padding, first rows from the source.
        head = state["lm_head.weight"]
        per = padded // degree
        assert head.shape == (per, config["hidden_size"])
        rows = range(rank * per, min((rank + 1) * per, vocab))
        lm_source = embed if tied else src["lm_head.weight"]
        assert torch.equal(head[: len(rows)], lm_source[rows.start : rows.stop])
        assert not head[len(rows) :].any()
        # Attention: this rank's q heads, then its (possibly replicated) KV head(s).
        qkv = state["model.layers.1.self_attn.qkv_proj.weight"]
        q_rows, kv_rows = heads * hd // degree, max(1, kv // degree) * hd
        assert qkv.shape[0] == q_rows + 2 * kv_rows
        kv_head = rank * kv // degree  # the first KV head this rank serves
        k_src = src["model.layers.1.self_attn.k_proj.weight"]
        assert torch.equal(
            qkv[:q_rows], src["model.layers.1.self_attn.q_proj.weight"][rank * q_rows : (rank + 1) * q_rows]
        )
        assert torch.equal(qkv[q_rows : q_rows + kv_rows], k_src[kv_head * hd : kv_head * hd + kv_rows])
        # MLP: gate rows then up rows of this rank; down_proj split by columns.
        inter = config["intermediate_size"] // degree
        gate_up = state["model.layers.0.mlp.gate_up_proj.weight"]
        assert torch.equal(gate_up[inter:], src["model.layers.0.mlp.up_proj.weight"][rank * inter : (rank + 1) * inter])
        down = state["model.layers.0.mlp.down_proj.weight"]
        assert torch.equal(down, src["model.layers.0.mlp.down_proj.weight"][:, rank * inter : (rank + 1) * inter])
        assert torch.equal(state["model.norm.weight"], src["model.norm.weight"])

    gate = result.metrics["gate"]
    assert gate["passed"] and gate["tensors_checked"] == degree * len(want) and gate["files_checked"] == degree
    assert result.metrics["kv_replicated"] == (kv < degree)
    assert sorted(p.name for p in shipped) == sorted(p.name for p in out.glob("model-rank-*.safetensors"))
    assert len(shipped) == degree  # one part per rank at vLLM's default part size
    assert not (out / "model.safetensors.index.json").exists() and not list(out.glob("model-0*.safetensors"))
    props = (out / "serving.properties").read_text()
    assert "option.load_format=sharded_state" in props and f"option.tensor_parallel_degree={degree}" in props
    assert "vLLM 0.32.0" in props


def test_parts_close_where_vllm_closes_them(tmp_path: Path) -> None:
    model = build_model("llama", tmp_path / "src")
    result, shipped = run_stage(model, tmp_path / "out", 2, part_bytes=30_000)
    parts = result.metrics["parts_per_rank"]
    assert parts > 2 and len(shipped) == 2 * parts
    for rank in range(2):
        sizes = []
        for part in range(parts):
            with ShardReader(tmp_path / "out" / f"model-rank-{rank}-part-{part}.safetensors") as reader:
                # in write order, i.e. vLLM's state_dict order
                sizes.append([reader.read(name).numel() * reader.read(name).element_size() for name in reader.names()])
        for this, following in zip(sizes, sizes[1:], strict=False):
            # a part closes only when the next tensor would take it past the limit
            assert sum(this) <= 30_000 or len(this) == 1
            assert sum(this) + following[0] > 30_000


def test_fp32_source_needs_a_dtype_and_converts_with_one(tmp_path: Path) -> None:
    model = build_model("llama", tmp_path / "src", dtype=torch.float32)
    with pytest.raises(InputError, match="OPTION_DTYPE=bf16"):
        run_stage(model, tmp_path / "out", 2)
    result, _ = run_stage(model, tmp_path / "out2", 2, env={"OPTION_DTYPE": "fp16"})
    state = rank_state(tmp_path / "out2", 0)
    assert state["model.norm.weight"].dtype == torch.float16 and result.metrics["dtype"] == "fp16"
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["dtype"] == "float16"
    assert "option.dtype=fp16" in (tmp_path / "out2" / "serving.properties").read_text()


def test_degree_that_breaks_vllms_rules_names_the_numbers(tmp_path: Path) -> None:
    model = build_model("llama", tmp_path / "src", heads=6, kv_heads=3, hidden=96, intermediate=192)
    with pytest.raises(InputError) as info:
        run_stage(model, tmp_path / "out", 4)
    reason = str(info.value)
    assert "num_attention_heads=6 is not divisible by OPTION_TENSOR_PARALLEL_DEGREE=4" in reason
    assert "num_key_value_heads=3" in reason and "(8 GPUs) use one of 1" in reason  # 2 and 8 break the KV rule
    assert not list((tmp_path / "out").glob("model-rank-*"))


def test_unsupported_architecture_is_refused_by_name(tmp_path: Path) -> None:
    model = build_model("llama", tmp_path / "src")
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"supports the architectures LlamaForCausalLM.*this model is GPT2LMHeadModel"):
        run_stage(model, tmp_path / "out", 2)


def test_quantized_source_is_refused_with_the_reason(tmp_path: Path) -> None:
    model = build_model("llama", tmp_path / "src")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"quantized \(compressed-tensors\).*repacked by vLLM's kernels"):
        run_stage(model, tmp_path / "out", 2)


def test_a_tensor_vllm_has_no_place_for_fails_the_job(tmp_path: Path) -> None:
    model = build_model("llama", tmp_path / "src")
    first = sorted(model.glob("*.safetensors"))[0]
    tensors = load_file(str(first))
    tensors["model.layers.0.mlp.extra_gate.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(tensors, str(first), metadata={"format": "pt"})
    with pytest.raises(InputError, match="has no place for .*extra_gate"):
        run_stage(model, tmp_path / "out", 2)


def test_gate_stops_a_layout_slip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optjob.techniques.shard.layout import Splitter

    model = build_model("llama", tmp_path / "src")
    # A sharder bug: every rank takes KV head 0, as an off-by-one in the replication rule would.
    monkeypatch.setattr(Splitter, "_kv_rows", lambda self, rank: (0, self.geo.head_dim))
    with pytest.raises(VerificationFailed, match="sharding gate: .*qkv_proj.weight.*nothing was published"):
        run_stage(model, tmp_path / "out", 4)


def test_gate_reads_back_what_is_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optjob.storage import safetensors_io

    original = safetensors_io.ShardWriter.add

    def flip(self, name, tensor):  # noqa: ANN001, ANN202 - a disk that corrupts one tensor on rank 1
        if name == "model.norm.weight" and "rank-1" in self.path.name:
            tensor = tensor.clone()
            tensor.view(torch.int16)[0] ^= 1
        original(self, name, tensor)

    monkeypatch.setattr(safetensors_io.ShardWriter, "add", flip)
    model = build_model("llama", tmp_path / "src")
    with pytest.raises(VerificationFailed, match="model.norm.weight on rank 1 does not hold model.norm.weight"):
        run_stage(model, tmp_path / "out", 2)


def test_plan_requires_a_degree_that_divides_the_gpus_and_a_servable_dtype() -> None:
    tech = technique_for("ModelShardingConfig")
    spec = instance("ml.g6.12xlarge")
    with pytest.raises(PlanError, match="OPTION_TENSOR_PARALLEL_DEGREE is required"):
        tech.plan(ShardingConfig(), {}, spec, path="p")
    with pytest.raises(PlanError, match="must divide the 4 GPUs"):
        tech.plan(ShardingConfig(), {"OPTION_TENSOR_PARALLEL_DEGREE": "3"}, spec, path="p")
    with pytest.raises(PlanError, match="OPTION_DTYPE='fp32'.*use bf16, fp16"):
        tech.plan(ShardingConfig(), {"OPTION_TENSOR_PARALLEL_DEGREE": "2", "OPTION_DTYPE": "fp32"}, spec, path="p")


def test_a_single_kv_head_is_replicated_on_every_rank(tmp_path: Path) -> None:
    model = build_model("llama", tmp_path / "src", kv_heads=1)
    result, _ = run_stage(model, tmp_path / "out", 8)
    src = source_state(model)
    hd = 64 // 8
    for rank in range(8):
        qkv = rank_state(tmp_path / "out", rank)["model.layers.0.self_attn.qkv_proj.weight"]
        assert qkv.shape[0] == 8 * hd // 8 + 2 * hd  # one q head, the one k and the one v head
        assert torch.equal(qkv[hd : 2 * hd], src["model.layers.0.self_attn.k_proj.weight"])
        assert torch.equal(qkv[2 * hd :], src["model.layers.0.self_attn.v_proj.weight"])
    assert result.metrics["kv_replicated"] and result.metrics["gate"]["passed"]


def test_gate_own_layout_must_put_every_source_tensor_back_together() -> None:
    from optjob.techniques.shard import check
    from optjob.techniques.shard.layout import Entry, geometry

    config = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 8, "num_key_value_heads": 2,
              "hidden_size": 64, "intermediate_size": 128, "vocab_size": 500, "num_hidden_layers": 1,
              "dtype": "bfloat16"}  # fmt: skip
    geo = geometry(config)
    down = Entry("model.layers.0.mlp.down_proj.weight", "columns", ("model.layers.0.mlp.down_proj.weight",))
    shapes = {down.sources[0]: [64, 128]}
    for degree in (1, 2, 4, 8):
        check.check_tiling(geo, degree, down, shapes)  # the real map tiles
    qkv = Entry("qkv", "qkv", ("q", "k", "v"))
    check.check_tiling(geo, 4, qkv, {"q": [64, 64], "k": [16, 64], "v": [16, 64]})  # 2 KV heads, each on 2 ranks
    with pytest.raises(VerificationFailed, match="covers 128 of the 130 columns"):
        check.check_tiling(geo, 4, down, {down.sources[0]: [64, 130]})  # 130 columns do not split 4 ways
