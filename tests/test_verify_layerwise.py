"""The layer-by-layer end-to-end check: equal to the whole-model comparison, no tokenizer needed,
and models that are weights-only or untrained go through a real job's gate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from optjob.testing import build_tiny_llama
from optjob.verify.e2e import (
    FigureSums,
    Inputs,
    OnlineHeadStats,
    PositionStats,
    compare,
    replay,
    verification_inputs,
)
from optjob.verify.gate import thresholds_config
from tests.support.stages import run_quantization_stage

SUPPORTED = ["llama"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "m")


@pytest.fixture(scope="module")
def nf4_out(tiny, tmp_path_factory) -> Path:
    from optjob.techniques.quantize import engines
    from optjob.techniques.quantize.params import parse_params

    out = tmp_path_factory.mktemp("nf4") / "out"
    params = parse_params({"OPTION_QUANTIZE": "nf4", "OPTION_BNB_DOUBLE_QUANT": "false"})
    engines.bnb_quantize(tiny, out, params, dtype="fp32")
    return out


def _log_probs(model, ids: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([seq])).logits[0].float().log_softmax(-1) for seq in ids]


def _whole_model(source: Path, weights_from: Path | None = None):
    """transformers' whole model in float32; with ``weights_from``, every weight of that checkpoint
    (quantized ones decoded) assigned in place of the source's."""
    from contextlib import ExitStack

    from transformers import AutoModelForCausalLM

    from optjob.verify.tensors import CheckpointReader, WeightDecoder

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    if weights_from is not None:
        qconfig = json.loads((weights_from / "config.json").read_text()).get("quantization_config")
        state = model.state_dict()
        with ExitStack() as stack:
            reader = CheckpointReader(weights_from, stack)
            decoder = WeightDecoder(reader, qconfig)
            for module in decoder.modules:
                state[f"{module}.weight"] = decoder.decode(module).float()
            for name in reader.map:
                if not decoder.owns(name) and name in state:
                    state[name] = reader.get(name).float()
        model.load_state_dict(state)
    return model


def _stats(src: list[torch.Tensor], out: list[torch.Tensor]) -> PositionStats:
    parts = [PositionStats.from_log_probs(s, o) for s, o in zip(src, out, strict=True)]
    return PositionStats(*(torch.cat([getattr(p, f) for p in parts]) for f in ("kl", "same_top1", "margin")))


def _figures(stats: PositionStats, margin: float = 0.2) -> dict:
    sums = FigureSums((margin,))
    sums.add(stats)
    return sums.result(margin)


def test_replayed_source_predicts_exactly_what_transformers_predicts(tiny: Path) -> None:
    from contextlib import ExitStack

    from transformers import AutoConfig

    from optjob.verify.e2e import LayerwiseRunner, _Checkpoint

    ids = verification_inputs(tiny, list(thresholds_config()["prompts"]), max_tokens=128, token_ids={}).ids
    runner = LayerwiseRunner(AutoConfig.from_pretrained(tiny), SUPPORTED)
    with ExitStack() as stack:
        side = _Checkpoint(tiny, stack)
        hidden = runner.embed(side, ids)
        for index in range(len(runner.layers)):
            hidden = runner.run_layer(index, side, hidden)
        head = side.rows("lm_head.weight", 0, 1 << 30)
        mine = [(h @ head.T).log_softmax(-1) for h in runner.normed(side, hidden)]
    for got, ref in zip(mine, _log_probs(_whole_model(tiny), ids), strict=True):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_layer_by_layer_equals_the_whole_model_comparison(tiny: Path, nf4_out: Path) -> None:
    cfg = thresholds_config()
    inputs = verification_inputs(tiny, list(cfg["prompts"]), max_tokens=128, token_ids={})
    assert inputs.kind == "tokenizer" and len(inputs.ids) == len(cfg["prompts"])
    stats, errors = replay(tiny, nf4_out, inputs, supported=SUPPORTED)
    assert len(errors) == 4 and all(0 < e < 0.1 for e in errors)
    whole = _stats(_log_probs(_whole_model(tiny), inputs.ids), _log_probs(_whole_model(tiny, nf4_out), inputs.ids))
    torch.testing.assert_close(stats.kl, whole.kl, atol=1e-6, rtol=1e-3)
    assert torch.equal(stats.same_top1, whole.same_top1)
    torch.testing.assert_close(stats.margin, whole.margin, atol=1e-4, rtol=1e-4)
    layered, reference = _figures(stats), _figures(whole)
    # the same absolute tolerance as per position: NF4's CPU kernels differ by host (AVX-512 or not)
    assert layered["mean_kl"] == pytest.approx(reference["mean_kl"], rel=1e-3, abs=1e-6) and layered["mean_kl"] > 0
    for key in ("top1_agreement", "confident_top1_agreement", "confident_positions", "positions"):
        assert layered[key] == reference[key]


def test_layer_by_layer_agrees_with_the_real_loader(tiny: Path, nf4_out: Path) -> None:
    """transformers loading the NF4 directory itself (bitsandbytes' modules, whose CPU matmul is
    less exact than float32) predicts what the replay of the files predicts."""
    from transformers import AutoModelForCausalLM

    inputs = verification_inputs(tiny, list(thresholds_config()["prompts"]), max_tokens=128, token_ids={})
    stats, _ = replay(tiny, nf4_out, inputs, supported=SUPPORTED)
    loaded = AutoModelForCausalLM.from_pretrained(nf4_out, device_map="cpu", dtype=torch.float32).eval()
    real = _stats(_log_probs(_whole_model(tiny), inputs.ids), _log_probs(loaded, inputs.ids))
    torch.testing.assert_close(stats.kl, real.kl, atol=2e-3, rtol=0.05)
    assert _figures(stats)["top1_agreement"] == pytest.approx(_figures(real)["top1_agreement"], abs=0.011)


@pytest.mark.parametrize("block", [1, 7, 64, 5000])
def test_online_head_statistics_equal_the_whole_vocabulary_figures(block: int) -> None:
    gen = torch.Generator().manual_seed(block)
    a = torch.randn(9, 300, generator=gen) * 4
    b = a + 0.3 * torch.randn(9, 300, generator=gen)
    b[3] = a[3]  # an identical position: KL exactly 0
    online = OnlineHeadStats(9)
    for start in range(0, 300, block):
        online.add(a[:, start : start + block], b[:, start : start + block], start)
    got = online.result()
    ref = PositionStats.from_log_probs(a.double().log_softmax(-1).float(), b.double().log_softmax(-1).float())
    torch.testing.assert_close(got.kl, ref.kl, atol=1e-6, rtol=1e-5)
    assert torch.equal(got.same_top1, ref.same_top1) and abs(float(got.kl[3])) < 1e-9
    torch.testing.assert_close(got.margin, ref.margin, atol=1e-5, rtol=1e-5)


def test_identical_checkpoints_compare_as_identical(tiny: Path) -> None:
    """Equal up to float rounding: the output side runs its inputs and the teacher-forced ones as one
    batch, so its matrix products are blocked differently from the source side's."""
    figures = compare(tiny, tiny, ["Open the file and read it."], supported=SUPPORTED, confident_margin=0.25)
    assert abs(figures["mean_kl"]) < 1e-9 and figures["top1_agreement"] == 1.0
    assert figures["max_layer_rel_error"] < 1e-5 and figures["inputs"] == "tokenizer"


@pytest.fixture(scope="module")
def weights_only(tmp_path_factory) -> Path:
    """config.json + safetensors shards, no tokenizer: how many fine-tunes are published."""
    return build_tiny_llama(tmp_path_factory.mktemp("wo") / "m", shards=3, tokenizer=False)


def test_without_a_tokenizer_seeded_token_ids_are_compared(weights_only: Path) -> None:
    first = verification_inputs(weights_only, ["text"], max_tokens=128, token_ids={"seed": 3, "length": 40})
    again = verification_inputs(weights_only, ["text"], max_tokens=128, token_ids={"seed": 3, "length": 40})
    assert first.kind == "token_ids" and first.ids == again.ids and "no tokenizer files" in (first.warning or "")
    vocab = json.loads((weights_only / "config.json").read_text())["vocab_size"]
    assert all(len(seq) == 40 and min(seq) >= 0 and max(seq) < vocab for seq in first.ids)


def test_an_unloadable_tokenizer_is_a_warning_not_a_failure(tiny: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "tokenizer.json").write_text("{not a tokenizer")
    inputs = verification_inputs(broken, ["text"], max_tokens=128, token_ids={})
    assert inputs.kind == "token_ids" and "could not be loaded" in (inputs.warning or "")
    assert isinstance(inputs, Inputs)


def _run_job_stage(model: Path, env: dict[str, str], tmp_path: Path) -> dict:
    result = run_quantization_stage(model, env, tmp_path)
    assert (tmp_path / "out" / "config.json").is_file()
    return result.metrics


@pytest.mark.parametrize("fp8_scheme", ["FP8_DYNAMIC", "FP8"])
def test_weights_only_checkpoint_completes_fp8(weights_only: Path, tmp_path: Path, fp8_scheme: str) -> None:
    metrics = _run_job_stage(weights_only, {"OPTION_QUANTIZE": "fp8", "OPTION_FP8_SCHEME": fp8_scheme}, tmp_path)
    verification = metrics["verification"]
    assert verification["passed"] and verification["e2e"]["inputs"] == "token_ids"
    assert any("no tokenizer files" in note for note in verification["notes"])
    if fp8_scheme == "FP8":  # calibrated: on token ids, since there is no text to tokenize
        assert metrics["engine_details"]["calibration_inputs"] == "token_ids"
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_untrained_model_completes_fp8_dynamic(tmp_path: Path) -> None:
    """Flat next-token distributions: top-1 flips on noise, so it is judged only where confident."""
    model = build_tiny_llama(tmp_path / "m", train_steps=0, seed=1)
    metrics = _run_job_stage(model, {"OPTION_QUANTIZE": "fp8", "OPTION_FP8_SCHEME": "FP8_DYNAMIC"}, tmp_path)
    e2e = metrics["verification"]["e2e"]
    assert metrics["verification"]["passed"]
    assert e2e["confident_positions"] < e2e["positions"]  # the flat positions were not judged on top-1


def test_gate_reports_the_comparisons_own_peak_memory_and_stops_when_cancelled(tiny: Path, nf4_out: Path) -> None:
    from optjob.errors import JobCancelled
    from optjob.runtime.cancel import CancelToken
    from optjob.verify.gate import run_gate

    report = run_gate(tiny, nf4_out, "nf4")
    assert 0 <= report.e2e["peak_rss_above_start_mib"] < report.e2e["rss_at_start_mib"]
    assert len(report.e2e["layer_rel_errors"]) == 4
    cancel = CancelToken()
    cancel.cancel("stopped")
    with pytest.raises(JobCancelled):
        run_gate(tiny, nf4_out, "nf4", cancel=cancel)
