"""End-to-end check: run the source and the output checkpoint forward, a decoder layer at a time,
and compare their next-token distributions on fixed inputs.

Why layer by layer: reloading both models whole cost two float32 copies of the model (3.9 GB of
peak memory for a 0.98 GB checkpoint), so the check was skipped for anything big. Here only one
decoder layer is materialized at a time (the source's, then the output's), the hidden states of
the verification inputs are carried forward, the embedding is read row by row for the tokens in
use and the LM head a block of vocabulary rows at a time; inside a layer each Linear's weight is read
when it runs and dropped after. Memory is one Linear in float32 plus activations, whatever the
model's size.

What is compared is what is on disk: the output's weights are decoded from its files with the
same decoders as the per-tensor check (compressed-tensors' compressors, bitsandbytes' quant
states), so save-time corruption (bitsandbytes' NF4 save-after-forward bug) shows, and input
activations are fake-quantized with compressed-tensors' own ``forward_quantize`` where the scheme
quantizes them (W8A8 FP8/INT8, NVFP4), as the serving kernel would. Everything runs in float32.

Inputs: the ``prompts`` of ``configs/verify.yaml`` tokenized by the source's tokenizer, or, when it
has none or it cannot be loaded, seeded token-id sequences from the vocabulary (the figures say
which, and why). Figures: KL(source || output) in nats per position, top-1 agreement over all
positions, and top-1 agreement over *confident* positions only, where the source's top-1
log-probability exceeds its runner-up by at least ``confident_margin`` nats (see verify.yaml for
why top-1 alone misleads on flat distributions).

It runs inside the job's worker (a second interpreter would hold another copy of torch and
transformers, ~0.4 GB, for no benefit now that only a layer is in memory) and stops between layers
when the job is cancelled. CLI, for looking at a pair of checkpoints by hand (prints one JSON
object): ``python -m optjob.verify.e2e SOURCE OUTPUT [--prompt TEXT ...]``
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_LM_HEAD_ROWS = 4096  # vocabulary rows of the LM head materialized at once (32 MB at hidden 2048)


@dataclass(frozen=True)
class Inputs:
    """Token ids to run, and where they came from (``tokenizer`` or ``token_ids``)."""

    ids: list[list[int]]
    kind: str
    warning: str | None = None


def verification_inputs(source: Path, prompts: list[str], *, max_tokens: int, token_ids: dict[str, Any]) -> Inputs:
    from optjob.model_tokenizer import load_tokenizer, token_id_sequences

    loaded = load_tokenizer(source)
    if loaded.ok:
        ids = [loaded.tokenizer(p, truncation=True, max_length=max_tokens)["input_ids"] for p in prompts]
        ids = [seq for seq in ids if len(seq) >= 2]
        if ids:
            return Inputs(ids, "tokenizer")
        warning = "the tokenizer turned every verification prompt into fewer than 2 tokens"
    else:
        warning = loaded.warning
    config = json.loads((source / "config.json").read_text())
    seqs = token_id_sequences(
        config,
        count=int(token_ids.get("sequences", len(prompts) or 6)),
        length=min(int(token_ids.get("length", 64)), max_tokens),
        seed=int(token_ids.get("seed", 0)),
    )
    return Inputs(seqs, "token_ids", f"{warning}; compared on seeded token-id sequences instead")


class _Checkpoint:
    """One side of the comparison: a checkpoint's tensors, decoded to float32 on demand."""

    def __init__(self, model_dir: Path, stack: ExitStack) -> None:
        from optjob.verify.tensors import CheckpointReader, WeightDecoder, ct_scheme

        self.reader = CheckpointReader(model_dir, stack)
        config = json.loads((model_dir / "config.json").read_text())
        self.qconfig: dict[str, Any] | None = config.get("quantization_config")
        self.decoder = WeightDecoder(self.reader, self.qconfig)
        scheme = ct_scheme(self.qconfig) if self.decoder.method == "compressed-tensors" else None
        self.input_args = getattr(scheme, "input_activations", None)
        self._decoded: dict[str, torch.Tensor] = {}  # a quantized embedding or LM head, read by rows

    def has(self, name: str) -> bool:
        return name in self.reader.map

    def state(self, prefix: str, *, lazy: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
        """Every tensor under ``prefix`` (a module path ending in '.'), quantized weights decoded,
        except the weights of the modules in ``lazy`` (read by ``weight`` when they run)."""
        out: dict[str, torch.Tensor] = {}
        for module in self.decoder.modules:
            if module.startswith(prefix) and module not in lazy:
                out[f"{module[len(prefix) :]}.weight"] = self.decoder.decode(module).float()
        for name in self.reader.map:
            if name.startswith(prefix) and not self.decoder.owns(name) and not _is_activation_param(name):
                if name.endswith(".weight") and name[: -len(".weight")] in lazy:
                    continue
                out[name[len(prefix) :]] = self.reader.get(name).float()
        return out

    def weight(self, module: str) -> torch.Tensor:
        """One module's weight in float32, decoded when quantized."""
        if self.decoder.is_quantized(module):
            return self.decoder.decode(module).float()
        return self.reader.get(f"{module}.weight").float()

    def activation_quantizers(self, layer: torch.nn.Module, prefix: str) -> list[Any]:
        """Forward pre-hooks that fake-quantize the inputs of the layer's quantized linears."""
        if self.decoder.method == "modelopt":
            return self._static_fp8_inputs(layer, prefix)
        if self.input_args is None:
            return []
        from compressed_tensors.quantization import QuantizationStatus
        from compressed_tensors.quantization.lifecycle.forward import forward_quantize

        args = self.input_args
        handles = []
        for local, module in layer.named_modules():
            full = f"{prefix}{local}"
            if not self.decoder.is_quantized(full):
                continue
            module.quantization_status = QuantizationStatus.FROZEN
            for suffix in ("input_scale", "input_zero_point", "input_global_scale"):
                if self.has(f"{full}.{suffix}"):
                    setattr(module, suffix, self.reader.get(f"{full}.{suffix}").float())

            def hook(mod: torch.nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
                return (forward_quantize(mod, inputs[0], "input", args), *inputs[1:])

            handles.append(module.register_forward_pre_hook(hook))
        return handles

    def _static_fp8_inputs(self, layer: torch.nn.Module, prefix: str) -> list[Any]:
        """Model Optimizer's W8A8 schemes: each quantized linear's input, times its ``pre_quant_scale``
        where stored (SmoothQuant), is cast to FP8 E4M3 or rounded to INT8 with the checkpoint's own
        static ``input_scale``, as the serving kernels do; the smoothing is divided out again because
        the decoded weight carries it. NVFP4 (W4A4) inputs are rounded to E2M1 per block of 16."""
        handles = []
        for local, module in layer.named_modules():
            full = f"{prefix}{local}"
            if not (self.decoder.is_quantized(full) and self.has(f"{full}.input_scale")):
                continue
            scale = self.reader.get(f"{full}.input_scale").float()
            if self.has(f"{full}.weight_scale_2"):  # NVFP4: per block of 16, relative to the static scale
                from optjob.verify import nvfp4

                def fp4(mod: torch.nn.Module, inputs: tuple[Any, ...], scale: torch.Tensor = scale) -> tuple[Any, ...]:
                    return (nvfp4.fake_quantize_activation(inputs[0], scale), *inputs[1:])

                handles.append(module.register_forward_pre_hook(fp4))
                continue
            smooth = self.reader.get(f"{full}.pre_quant_scale").float() if self.has(f"{full}.pre_quant_scale") else None
            as_int8 = self.reader.slice(f"{full}.weight").get_dtype() == "I8"

            def hook(mod: torch.nn.Module, inputs: tuple[Any, ...], scale: torch.Tensor = scale,
                     smooth: torch.Tensor | None = smooth, as_int8: bool = as_int8) -> tuple[Any, ...]:  # fmt: skip
                x = inputs[0] if smooth is None else inputs[0] * smooth
                if as_int8:
                    q = (x / scale).round().clamp(-128.0, 127.0) * scale
                else:
                    q = (x / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(x.dtype) * scale
                return (q if smooth is None else q / smooth, *inputs[1:])

            handles.append(module.register_forward_pre_hook(hook))
        return handles

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows of a tensor in float32: read from the file, or, for a quantized module, sliced from
        its weight decoded once (a quantized format cannot be read a row at a time)."""
        module = name.rpartition(".")[0]
        if self.decoder.is_quantized(module):
            if module not in self._decoded:
                self._decoded[module] = self.decoder.decode(module).float()
            return self._decoded[module][start:stop]
        return self.reader.slice(name)[start:stop].float()

    def embed(self, name: str, ids: list[int]) -> torch.Tensor:
        """The embedding rows of ``ids`` (each row read on its own: the table can be 1 GB)."""
        unique = sorted(set(ids))
        table = {i: self.rows(name, i, i + 1)[0] for i in unique}
        return torch.stack([table[i] for i in ids])


def _is_activation_param(name: str) -> bool:
    local = name.rpartition(".")[2]
    return local.startswith(("input_", "output_")) or local in ("k_scale", "v_scale")


def _skeleton(config: Any) -> Any:
    """The model on the meta device: module types and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def _weight_loader(side: _Checkpoint, module: str) -> Callable[..., None]:
    def load(mod: torch.nn.Module, inputs: tuple[Any, ...]) -> None:
        mod.weight = torch.nn.Parameter(side.weight(module), requires_grad=False)

    return load


def _drop_weight(mod: torch.nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
    mod.weight = torch.nn.Parameter(torch.empty(mod.weight.shape, device="meta"), requires_grad=False)


def _causal_mask(length: int) -> torch.Tensor:
    mask = torch.full((length, length), float("-inf")).triu(1)
    return mask[None, None]


class LayerwiseRunner:
    """Carries the hidden states of every input through one checkpoint, one decoder layer at a time."""

    def __init__(self, config: Any, supported: list[str]) -> None:
        model_type = getattr(config, "model_type", "")
        if model_type not in supported:
            raise UnsupportedArchitecture(
                f"layer-by-layer comparison supports {', '.join(supported)}; this model is {model_type!r}"
            )
        self.model = _skeleton(config)
        base = self.model.model
        self.layers = base.layers
        rotary_cls = type(base.rotary_emb)
        self.rotary = rotary_cls(config=config)  # built on the CPU: its frequencies are not in the checkpoint
        self.base_prefix = "model."
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def embed(self, side: _Checkpoint, ids: list[list[int]]) -> list[torch.Tensor]:
        return [side.embed(f"{self.base_prefix}embed_tokens.weight", seq)[None] for seq in ids]

    def run_layer(self, index: int, side: _Checkpoint, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """One decoder layer over every input, in one batch (right-padded: under a causal mask a
        position never sees the padding after it, so each input's figures are its own).

        Linear weights are read when their module runs and dropped when it returns, so memory holds
        one Linear in float32 (the largest, an MLP projection, 64 MiB at Llama-3.2-1B's size) rather
        than the whole layer (~230 MiB there, ~400 MiB at 3B), whatever the model's size."""
        prefix = f"{self.base_prefix}layers.{index}."
        layer = self.layers[index]
        linears = {f"{prefix}{local}": module for local, module in layer.named_modules()
                   if isinstance(module, torch.nn.Linear)}  # fmt: skip
        missing, unexpected = layer.load_state_dict(
            side.state(prefix, lazy=frozenset(linears)), strict=False, assign=True
        )
        lazy_weights = {f"{name[len(prefix) :]}.weight" for name in linears}
        if unexpected or set(missing) - lazy_weights:
            raise ValueError(f"layer {index}: missing {sorted(set(missing) - lazy_weights)}, unexpected {unexpected}")
        handles = side.activation_quantizers(layer, prefix)
        for name, module in linears.items():
            handles.append(module.register_forward_pre_hook(_weight_loader(side, name), prepend=True))
            handles.append(module.register_forward_hook(_drop_weight))
        try:
            lengths = [h.shape[1] for h in hidden]
            length = max(lengths)
            batch = torch.cat([torch.nn.functional.pad(h, (0, 0, 0, length - h.shape[1])) for h in hidden])
            positions = torch.arange(length)[None]
            with torch.no_grad():
                result = layer(
                    batch,
                    attention_mask=_causal_mask(length),
                    position_ids=positions,
                    position_embeddings=self.rotary(batch, positions),
                )
            return [result[row : row + 1, : lengths[row]] for row in range(len(hidden))]
        finally:
            for handle in handles:
                handle.remove()
            layer.to("meta")  # frees this layer's float32 norms and biases before the next is read

    def normed(self, side: _Checkpoint, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        """The final norm of each input's last hidden state, ``[positions, hidden]``."""
        norm = self.model.model.norm
        norm.load_state_dict(side.state(f"{self.base_prefix}norm."), strict=True, assign=True)
        with torch.no_grad():
            out = [norm(h)[0] for h in hidden]
        norm.to("meta")
        return out

    def head_stats(
        self, src: _Checkpoint, out: _Checkpoint, src_normed: torch.Tensor, out_normed: torch.Tensor
    ) -> PositionStats:
        """Per-position next-token figures of both sides, the LM heads read a block of rows at a time.

        No ``positions x vocabulary`` logits are kept (0.5 MB per position and side at a 128k
        vocabulary): softmax sums are accumulated online over the vocabulary blocks, rescaled as
        the running maximum moves, as in a streaming softmax.
        """
        heads = [self._head_name(side) for side in (src, out)]
        vocab = int(src.reader.slice(heads[0]).get_shape()[0])
        acc = OnlineHeadStats(src_normed.shape[0])
        with torch.no_grad():
            for start in range(0, vocab, _LM_HEAD_ROWS):
                a = src_normed @ src.rows(heads[0], start, start + _LM_HEAD_ROWS).T
                b = out_normed @ out.rows(heads[1], start, start + _LM_HEAD_ROWS).T
                acc.add(a, b, start)
        return acc.result()

    def _head_name(self, side: _Checkpoint) -> str:
        if not side.has("lm_head.weight") and self.tied:
            return f"{self.base_prefix}embed_tokens.weight"
        return "lm_head.weight"


@dataclass
class PositionStats:
    """Per position: KL(source || output) in nats, whether top-1 agrees, the source's top-1 margin."""

    kl: torch.Tensor
    same_top1: torch.Tensor
    margin: torch.Tensor

    @classmethod
    def from_log_probs(cls, s: torch.Tensor, o: torch.Tensor) -> PositionStats:
        """The same figures from whole log-probability rows (the reference the online form must equal)."""
        top2 = s.topk(2, dim=-1).values
        kl = (s.exp() * (s - o)).sum(-1)
        return cls(kl.double(), s.argmax(-1) == o.argmax(-1), (top2[:, 0] - top2[:, 1]).double())


class OnlineHeadStats:
    """Running softmax sums over vocabulary blocks for ``positions`` rows of source (a) and output
    (b) logits. KL(p_a || p_b) = sum(e^(a-m_a) (a - b)) / S_a - LSE(a) + LSE(b), with
    S = sum(e^(x - m)) and LSE = m + log S; all accumulators are float64 per position."""

    def __init__(self, positions: int) -> None:
        neg = torch.full((positions,), -math.inf, dtype=torch.float64)
        self.m_a, self.m_b = neg.clone(), neg.clone()
        self.s_a = torch.zeros(positions, dtype=torch.float64)
        self.s_b = torch.zeros(positions, dtype=torch.float64)
        self.t_ab = torch.zeros(positions, dtype=torch.float64)
        self.top2_a = torch.full((positions, 2), -math.inf)
        self.arg_a = torch.zeros(positions, dtype=torch.long)
        self.max_b = torch.full((positions,), -math.inf)
        self.arg_b = torch.zeros(positions, dtype=torch.long)

    def add(self, a: torch.Tensor, b: torch.Tensor, offset: int) -> None:
        new_m_a = torch.maximum(self.m_a, a.max(-1).values.double())
        new_m_b = torch.maximum(self.m_b, b.max(-1).values.double())
        e_a = torch.exp(a.double() - new_m_a[:, None])
        scale_a = torch.exp(self.m_a - new_m_a).nan_to_num(0.0)
        self.s_a = self.s_a * scale_a + e_a.sum(-1)
        self.t_ab = self.t_ab * scale_a + (e_a * (a - b).double()).sum(-1)
        scale_b = torch.exp(self.m_b - new_m_b).nan_to_num(0.0)
        self.s_b = self.s_b * scale_b + torch.exp(b.double() - new_m_b[:, None]).sum(-1)
        self.m_a, self.m_b = new_m_a, new_m_b
        block_a = a.topk(min(2, a.shape[1]), dim=-1)
        merged = torch.cat([self.top2_a, block_a.values], dim=-1)
        self.top2_a = merged.topk(2, dim=-1).values
        better_a = block_a.values[:, 0] > merged[:, 0]
        self.arg_a = torch.where(better_a, block_a.indices[:, 0] + offset, self.arg_a)
        block_b = b.max(-1)
        better_b = block_b.values > self.max_b
        self.max_b = torch.where(better_b, block_b.values, self.max_b)
        self.arg_b = torch.where(better_b, block_b.indices + offset, self.arg_b)

    def result(self) -> PositionStats:
        lse_a = self.m_a + torch.log(self.s_a)
        lse_b = self.m_b + torch.log(self.s_b)
        kl = self.t_ab / self.s_a - lse_a + lse_b
        margin = (self.top2_a[:, 0] - self.top2_a[:, 1]).double()
        return PositionStats(kl, self.arg_a == self.arg_b, margin)


class UnsupportedArchitecture(ValueError):
    """The model's forward is not the embed -> decoder layers -> norm -> LM head pattern we replay."""


class FigureSums:
    """Running totals of the next-token figures over positions, for one or more confidence margins."""

    def __init__(self, margins: tuple[float, ...]) -> None:
        self.margins = margins
        self.positions = self.agree = 0
        self.confident = dict.fromkeys(margins, 0)
        self.confident_agree = dict.fromkeys(margins, 0)
        self.kl_sum, self.kl_max, self.finite = 0.0, 0.0, True

    def add(self, stats: PositionStats) -> None:
        self.agree += int(stats.same_top1.sum())
        self.positions += int(stats.kl.shape[0])
        for margin in self.margins:
            sure = stats.margin >= margin
            self.confident[margin] += int(sure.sum())
            self.confident_agree[margin] += int((stats.same_top1 & sure).sum())
        self.finite = self.finite and bool(torch.isfinite(stats.kl).all())
        self.kl_sum += float(stats.kl.sum())
        self.kl_max = max(self.kl_max, float(stats.kl.max()))

    def result(self, margin: float) -> dict[str, Any]:
        confident = self.confident[margin]
        return {
            "top1_agreement": self.agree / self.positions,
            "confident_top1_agreement": (self.confident_agree[margin] / confident) if confident else None,
            "confident_positions": confident,
            "confident_margin": margin,
            "mean_kl": self.kl_sum / self.positions,
            "max_kl": self.kl_max,
            "positions": self.positions,
            "finite": self.finite,
        }


def replay(
    source: Path,
    output: Path,
    inputs: Inputs,
    *,
    supported: list[str],
    progress: Callable[[float, str], None] | None = None,
) -> tuple[PositionStats, list[float]]:
    """Replay source and output layer by layer: per-position next-token figures (every input's
    positions, in order) and the per-layer output errors.

    Each output layer also runs on the *source's* hidden states (teacher forcing), which gives a
    local figure per layer: the relative error of what the layer adds to the residual stream,
    ``||out_layer(h) - src_layer(h)|| / ||src_layer(h) - h||``. Unlike the final logits, it does not
    fade with depth or with a flat output distribution: a mis-scaled or swapped weight in any one
    layer shows there at full size, which is what catches corruption that error-compensating
    schemes (AWQ's rescaled channels) hide from the weight-space check.
    """
    from transformers import AutoConfig

    runner = LayerwiseRunner(AutoConfig.from_pretrained(source), supported)
    layers = len(runner.layers)
    errors: list[float] = []
    with ExitStack() as stack:
        src, out = _Checkpoint(source, stack), _Checkpoint(output, stack)
        src_h, out_h = runner.embed(src, inputs.ids), runner.embed(out, inputs.ids)
        count = len(src_h)
        for index in range(layers):
            src_next = runner.run_layer(index, src, src_h)
            both = runner.run_layer(index, out, [*out_h, *src_h])
            out_next, teacher = both[:count], both[count:]
            err = sum(float((t - s).pow(2).sum()) for t, s in zip(teacher, src_next, strict=True))
            ref = sum(float((s - h).pow(2).sum()) for s, h in zip(src_next, src_h, strict=True))
            errors.append(math.sqrt(err / ref) if ref > 0 else (0.0 if err == 0 else math.inf))
            src_h, out_h = src_next, out_next
            if progress is not None:
                progress((index + 1) / (layers + 1), f"decoder layer {index + 1}/{layers}")
        src_n = torch.cat(runner.normed(src, src_h))
        out_n = torch.cat(runner.normed(out, out_h))
        return runner.head_stats(src, out, src_n, out_n), errors


def compare(
    source: Path,
    output: Path,
    prompts: list[str],
    *,
    max_tokens: int = 128,
    confident_margin: float = 1.0,
    token_ids: dict[str, Any] | None = None,
    supported: list[str],
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """Figures of ``output`` against ``source``, computed layer by layer in this process.

    ``progress(fraction, message)`` is called after each decoder layer; it may raise (a job's
    cancellation) to stop the comparison there."""
    started = time.monotonic()
    inputs = verification_inputs(source, prompts, max_tokens=max_tokens, token_ids=token_ids or {})
    sums = FigureSums((confident_margin,))
    stats, errors = replay(source, output, inputs, supported=supported, progress=progress)
    sums.add(stats)
    figures = sums.result(confident_margin)
    worst = max(range(len(errors)), key=errors.__getitem__, default=None)
    figures.update(
        layer_rel_errors=[round(e, 6) for e in errors],
        max_layer_rel_error=errors[worst] if worst is not None else 0.0,
        worst_layer=worst,
    )
    figures.update(inputs=inputs.kind, sequences=len(inputs.ids), seconds=round(time.monotonic() - started, 3))
    if inputs.warning:
        figures["inputs_warning"] = inputs.warning
    return figures


def compare_as_configured(
    source: Path,
    output: Path,
    cfg: dict[str, Any],
    *,
    prompts: list[str] | None = None,
    max_tokens: int | None = None,
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """``compare`` with the settings of ``configs/verify.yaml`` (``cfg``), as the gate runs it."""
    e2e = cfg["e2e"]
    return compare(
        source,
        output,
        prompts or list(cfg["prompts"]),
        max_tokens=max_tokens or int(e2e.get("max_tokens", 128)),
        confident_margin=float(e2e["confident_margin"]),
        token_ids=dict(cfg.get("token_ids", {})),
        supported=list(e2e["architectures"]),
        progress=progress,
    )


def main(argv: list[str] | None = None) -> None:
    from optjob.runtime.allocator import tune_allocator
    from optjob.runtime.usage import PeakRss
    from optjob.verify.thresholds import thresholds_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--max-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    tune_allocator()
    with PeakRss() as memory:
        result = compare_as_configured(
            args.source,
            args.output,
            thresholds_config(),
            prompts=args.prompt,
            max_tokens=args.max_tokens,
            progress=lambda fraction, message: print(f"{fraction:6.1%} {message}", file=sys.stderr),
        )
    result["peak_rss_above_start_mib"] = round(memory.above_start_mib, 1)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
