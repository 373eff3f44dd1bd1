"""vLLM's per-rank tensors for one model and degree, from ``config.json`` and ``configs/sharding.yaml``.

vLLM itself does not notice a wrong layout (it copies what fits and serves nonsense), so every
rule lives in one place, as data, and this module only interprets it: which tensors each rank
holds, in vLLM's ``state_dict`` order, and how each piece is cut from the source tensors
(``Splitter``). The gate (``check``) describes the same layout again in its own terms, so a slip
in either shows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from optjob.config_files import load_config
from optjob.errors import InputError

SPLITS = ("vocab", "qkv", "merged", "columns", "replicate", "buffer")
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@cache
def rules() -> dict[str, Any]:
    return load_config("sharding.yaml")


def vllm_version() -> str:
    return str(rules()["vllm"]["version"])


def file_name(rank: int, part: int) -> str:
    return str(rules()["vllm"]["file_pattern"]).format(rank=rank, part=part)


def supported_architectures() -> list[str]:
    return sorted(rules()["architectures"])


class Geometry(BaseModel):
    """What of ``config.json`` decides the per-rank layout."""

    model_config = ConfigDict(frozen=True)

    architecture: str
    layout: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype: str  # bf16 | fp16, what the per-rank files hold
    flags: dict[str, bool]

    @property
    def padded_vocab(self) -> int:
        pad = int(rules()["vllm"]["vocab_padding"])
        return -(-self.vocab // pad) * pad

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]


def geometry(config: Mapping[str, Any], *, dtype: str | None = None) -> Geometry:
    """The geometry of a model, or InputError naming what makes it unshardable and the fix.

    ``dtype`` (OPTION_DTYPE: bf16 | fp16) overrides the checkpoint's own dtype, which must
    otherwise be one vLLM serves as is.
    """
    archs = config.get("architectures") or []
    arch = archs[0] if archs else "(none: config.json has no 'architectures')"
    layout = rules()["architectures"].get(arch)
    if layout is None:
        raise InputError(
            f"ModelShardingConfig supports the architectures {', '.join(supported_architectures())}; this model "
            f"is {arch}. Shard a model of a supported architecture, or serve this one without pre-sharding"
        )
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, Mapping) else "unknown"
        raise InputError(
            f"the model is quantized ({method}); ModelShardingConfig shards bf16/fp16 checkpoints only, because a "
            "quantized model's per-rank layout is repacked by vLLM's kernels on the target GPU. Shard the "
            "unquantized model, or serve the quantized one with vLLM's default loader"
        )
    source_dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    resolved = dtype or rules()["dtypes"].get(source_dtype)
    if resolved not in _TORCH_DTYPES:
        raise InputError(
            f"the model's dtype is {source_dtype or 'not recorded in config.json'}; sharded_state files are served "
            "as stored, so they must be bf16 or fp16. Set OPTION_DTYPE=bf16 (or fp16) to convert while sharding"
        )
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    flags = {
        "attention_bias": bool(config.get("attention_bias") or config.get("bias")),
        "mlp_bias": bool(config.get("mlp_bias")),
        "qk_norm": bool(config.get("qk_norm")),
    }
    if "qkv_bias" in config:  # vLLM's Llama: qkv_bias overrides attention_bias for q/k/v only
        flags["attention_bias"] = bool(config["qkv_bias"])
    return Geometry(
        architecture=arch,
        layout=layout,
        layers=int(config["num_hidden_layers"]),
        hidden=hidden,
        heads=heads,
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        tied=bool(config.get("tie_word_embeddings", False)),
        dtype=resolved,
        flags=flags,
    )


def degree_problems(geo: Geometry, degree: int) -> list[str]:
    """vLLM's divisibility rules for tensor parallelism, each naming the numbers that break it."""
    problems = []
    if geo.heads % degree:
        problems.append(f"num_attention_heads={geo.heads} is not divisible by OPTION_TENSOR_PARALLEL_DEGREE={degree}")
    if geo.kv_heads >= degree and geo.kv_heads % degree:
        problems.append(f"num_key_value_heads={geo.kv_heads} is not divisible by the degree {degree}")
    if geo.kv_heads < degree and degree % geo.kv_heads:
        problems.append(
            f"the degree {degree} is not a multiple of num_key_value_heads={geo.kv_heads} (KV heads are "
            "replicated only when the degree is a multiple of them)"
        )
    if geo.intermediate % degree:
        problems.append(f"intermediate_size={geo.intermediate} is not divisible by the degree {degree}")
    if geo.padded_vocab % degree:
        problems.append(f"vocab_size={geo.vocab} padded to {geo.padded_vocab} is not divisible by the degree {degree}")
    return problems


@dataclass(frozen=True)
class Entry:
    """One tensor every rank holds: vLLM's name, how it is cut, and the source tensors it comes from."""

    name: str
    split: str
    sources: tuple[str, ...] = ()


def entries(geo: Geometry) -> list[Entry]:
    """vLLM's per-rank tensors in ``state_dict`` order (which decides how they fall into parts)."""
    layout = rules()["layouts"][geo.layout]
    buffers = rules()["vllm"]["attention_buffers"]

    def expand(items: list[dict[str, Any]], layer: str | None) -> Iterator[Entry]:
        for item in items:
            if "buffers" in item:
                module = item["buffers"].format(layer=layer)
                yield from (Entry(f"{module}.{buf}", "buffer") for buf in buffers)
                continue
            if item.get("when") and not geo.flags.get(item["when"], False):
                continue
            split = item["split"]
            if split not in SPLITS:
                raise ValueError(f"configs/sharding.yaml: unknown split {split!r} for {item['name']}")
            yield Entry(item["name"].format(layer=layer), split, tuple(s.format(layer=layer) for s in item["from"]))

    out = list(expand(layout["head"], None))
    for index in range(geo.layers):
        out.extend(expand(layout["layer"], f"model.layers.{index}"))
    out.extend(expand(layout["tail"], None))
    if geo.tied:
        tied = layout["tied"]
        out = [e for e in out if e.name != tied["keep"]]
        out = [Entry(tied["keep"], e.split, (tied["from"],)) if e.name == tied["drop"] else e for e in out]
    return out


def block_rows(width: int, dtype: torch.dtype, target_bytes: int = 32 << 20) -> int:
    """Rows per block so that a block of a ``width``-wide tensor is about ``target_bytes``."""
    return max(1, target_bytes // (width * torch.empty(0, dtype=dtype).element_size()))


@dataclass(frozen=True)
class RowBlocks:
    """A piece too large to hold at once: its shape and dtype, and its rows block by block."""

    shape: list[int]
    dtype: torch.dtype
    blocks: Callable[[], Iterator[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.empty(0, dtype=self.dtype).element_size()


class SourceAccess:
    """How a splitter reads source tensors: whole, or a range of rows or of columns."""

    def __init__(
        self,
        shape: Callable[[str], list[int]],
        rows: Callable[[str, int, int], torch.Tensor],
        columns: Callable[[str, int, int], torch.Tensor],
        whole: Callable[[str], torch.Tensor],
    ) -> None:
        self.shape, self.rows, self.columns, self.whole = shape, rows, columns, whole


class Splitter:
    """Cuts each entry into its per-rank pieces, reading no more of the source than a rank needs."""

    def __init__(self, geo: Geometry, degree: int, source: SourceAccess) -> None:
        self.geo, self.degree, self.src = geo, degree, source

    def piece(self, entry: Entry, rank: int) -> torch.Tensor | RowBlocks:
        """The entry's piece for ``rank``, in the output dtype."""
        if entry.split == "buffer":
            return torch.tensor(1.0, dtype=torch.float32)
        self._check_shapes(entry)
        if entry.split == "replicate":
            piece = self.src.whole(entry.sources[0])
        elif entry.split == "columns":  # vLLM's RowParallelLinear splits the input dimension
            per = self.src.shape(entry.sources[0])[1] // self.degree
            piece = self.src.columns(entry.sources[0], rank * per, (rank + 1) * per)
        elif entry.split == "vocab":
            return self._vocab(entry, rank)
        else:
            piece = getattr(self, f"_{entry.split}")(entry, rank)
        return piece.to(self.geo.torch_dtype).contiguous()

    def _check_shapes(self, entry: Entry) -> None:
        geo = self.geo
        expected: dict[str, list[int]] = {}
        if entry.split == "vocab":
            expected[entry.sources[0]] = [geo.vocab, geo.hidden]
        elif entry.split == "qkv":
            q, k, v = entry.sources
            tail = [geo.hidden] if q.endswith("weight") else []
            expected = {q: [geo.heads * geo.head_dim, *tail], k: [geo.kv_heads * geo.head_dim, *tail]}
            expected[v] = expected[k]
        for name, shape in expected.items():
            actual = self.src.shape(name)
            if actual != shape:
                raise InputError(
                    f"{name} has shape {actual}, but config.json implies {shape} (vocab_size, hidden_size, heads "
                    "and head_dim); the checkpoint and its config.json disagree. Fix config.json or re-export the model"
                )

    def _vocab(self, entry: Entry, rank: int) -> RowBlocks:
        """The largest piece of all, so it is handed over as row blocks (padding rows zero)."""
        geo = self.geo
        per = geo.padded_vocab // self.degree
        start, stop = rank * per, min((rank + 1) * per, geo.vocab)
        step = block_rows(geo.hidden, geo.torch_dtype)

        def blocks() -> Iterator[torch.Tensor]:
            for first in range(start, start + per, step):
                last = min(first + step, start + per)
                real = max(0, min(last, stop) - first)
                block = self.src.rows(entry.sources[0], first, first + real).to(geo.torch_dtype) if real else None
                if real == last - first:
                    yield block
                    continue
                padded = torch.zeros(last - first, geo.hidden, dtype=geo.torch_dtype)
                if block is not None:
                    padded[:real] = block
                yield padded

        return RowBlocks([per, geo.hidden], geo.torch_dtype, blocks)

    def _kv_rows(self, rank: int) -> tuple[int, int]:
        geo, degree = self.geo, self.degree
        if geo.kv_heads >= degree:
            per = geo.kv_heads * geo.head_dim // degree
            return rank * per, (rank + 1) * per
        head = rank // (degree // geo.kv_heads)  # replicated: ranks share a KV head in blocks
        return head * geo.head_dim, (head + 1) * geo.head_dim

    def _qkv(self, entry: Entry, rank: int) -> torch.Tensor:
        q, k, v = entry.sources
        per_q = self.geo.heads * self.geo.head_dim // self.degree
        kv_start, kv_stop = self._kv_rows(rank)
        return torch.cat(
            [
                self.src.rows(q, rank * per_q, (rank + 1) * per_q),
                self.src.rows(k, kv_start, kv_stop),
                self.src.rows(v, kv_start, kv_stop),
            ]
        )

    def _merged(self, entry: Entry, rank: int) -> torch.Tensor:
        parts = []
        for name in entry.sources:
            per = self.src.shape(name)[0] // self.degree
            parts.append(self.src.rows(name, rank * per, (rank + 1) * per))
        return torch.cat(parts)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN-safe, and -0.0 is not 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))
