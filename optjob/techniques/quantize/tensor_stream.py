"""Data-free quantization tensor by tensor: source bytes in, compressed bytes out, nothing whole.

``streaming.quantize_shards`` works a shard at a time from local files. Here a shard is a stream
(``storage.tensorstream``): its header is known first, so the output header is computed before any
data arrives — each targeted weight is run through llm-compressor's converter on the *meta*
device, which yields exactly the names, dtypes and shapes the real call will produce — and the
output is written front to back while the source is still arriving. Targeted weights are
assembled one at a time, quantized by the same converter as the file path (so the bytes are the
same as ``oneshot``'s), decoded again right there and compared with their source (the per-tensor
gate, with no second read), and written; every other tensor passes through as the byte pieces it
arrived in, never assembled (the 0.5 GB embedding of a 1B model costs a read-ahead window, not
its size).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from optjob.pipeline.cancel import CancelToken
from optjob.pipeline.events import NULL_SINK, EventSink
from optjob.runtime.phases import PhaseClock
from optjob.storage.safetensors_io import FLOAT_DTYPES, TORCH_TO_ST, torch_dtype
from optjob.storage.tensorstream.header import ShardHeader, build_header
from optjob.storage.tensorstream.reader import TensorBytes
from optjob.storage.tensorstream.writer import PlannedShardWriter
from optjob.techniques.quantize import fp8_cpu
from optjob.techniques.quantize.streaming import converter_for, is_ignored
from optjob.verify.tensors import StreamChecker

QUANTIZE, CAST, COPY = "quantize", "cast", "copy"
_CHECKS_AHEAD = 2


class SourceShard(Protocol):
    rel: str
    header: ShardHeader

    def tensors(self) -> Iterator[TensorBytes]: ...


class OutputShard(Protocol):
    writer: PlannedShardWriter

    def close(self) -> None: ...

    def abort(self) -> None: ...


@dataclass
class ShardPlan:
    header: ShardHeader
    actions: dict[str, str]  # source tensor -> quantize | cast | copy


@dataclass
class TensorStreamResult:
    weight_map: dict[str, str] = field(default_factory=dict)
    total_size: int = 0
    shards: int = 0
    quantized_modules: list[str] = field(default_factory=list)
    largest_quantized_bytes: int = 0


class ShardQuantizer:
    """Plans and quantizes shards for one scheme; one instance per job."""

    def __init__(self, config: Any, *, linear_modules: set[str], dtype: torch.dtype | None) -> None:
        from transformers.initialization import no_init_weights

        fp8_cpu.install()
        self._no_init = no_init_weights
        self.converter = converter_for(config)
        self.ignore = list(config.ignore or [])
        self.linear_modules = linear_modules
        self.dtype = dtype

    def action(self, name: str, st_dtype: str) -> str:
        module, _, param = name.rpartition(".")
        if param == "weight" and module in self.linear_modules and not is_ignored(module, self.ignore):
            return QUANTIZE
        if self.dtype is not None and st_dtype in FLOAT_DTYPES and TORCH_TO_ST[self.dtype] != st_dtype:
            return CAST
        return COPY

    def plan(self, source: ShardHeader) -> ShardPlan:
        """The output header and what happens to each source tensor, before any data is read."""
        entries: list[tuple[str, str, tuple[int, ...]]] = []
        actions: dict[str, str] = {}
        for span in source.spans:
            action = actions[span.name] = self.action(span.name, span.dtype)
            if action == QUANTIZE:
                meta = torch.empty(span.shape, dtype=self.dtype or torch_dtype(span.dtype), device="meta")
                with self._no_init():
                    produced = self.converter.process({span.name: meta})
                entries.extend((key, TORCH_TO_ST[value.dtype], tuple(value.shape)) for key, value in produced.items())
            elif action == CAST:
                assert self.dtype is not None
                entries.append((span.name, TORCH_TO_ST[self.dtype], span.shape))
            else:
                entries.append((span.name, span.dtype, span.shape))
        return ShardPlan(build_header(entries, {"format": "pt"}), actions)

    def quantize(
        self,
        shard: SourceShard,
        plan: ShardPlan,
        output: PlannedShardWriter,
        *,
        checker: StreamChecker,
        clock: PhaseClock,
        cancel: CancelToken,
    ) -> list[str]:
        """Stream one shard through; returns the modules quantized.

        Each weight's check (decode and compare, as costly as quantizing it) runs on a thread of its
        own while the next weight is quantized: torch releases the GIL, so on two cores the two
        overlap. At most ``_CHECKS_AHEAD`` checks wait, each holding its source and output tensors.
        """
        done: list[str] = []
        pending: deque[Future[None]] = deque()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="optjob-check") as pool:
            try:
                self._quantize_into(shard, plan, output, checker, clock, cancel, done, pending, pool)
                while pending:
                    _wait_check(pending.popleft(), clock, cancel)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
        output.check_complete()
        return done

    def _quantize_into(self, shard: SourceShard, plan: ShardPlan, output: PlannedShardWriter, checker: StreamChecker,
                       clock: PhaseClock, cancel: CancelToken, done: list[str], pending: deque[Future[None]],
                       pool: ThreadPoolExecutor) -> None:  # fmt: skip
        def checked(module: str, produced: dict[str, torch.Tensor], source: torch.Tensor) -> None:
            with clock.phase("verify"):
                checker.quantized(module, produced, source)

        for item in shard.tensors():
            cancel.raise_if_cancelled()
            action = plan.actions[item.name]
            if action == COPY:
                output.add_raw(item.name, item.pieces())
                checker.unquantized(item.name)
                continue
            source = item.tensor()
            if action == CAST:
                assert self.dtype is not None
                with clock.phase("quantize"):
                    cast = source.to(self.dtype)
                with clock.phase("verify"):
                    checker.unquantized(item.name, cast, source)
                output.add(item.name, cast)
                continue
            module = item.name.rpartition(".")[0]
            with clock.phase("quantize"):
                weight = source.to(self.dtype) if self.dtype is not None else source
                with self._no_init():
                    produced = self.converter.process({item.name: weight})
            while len(pending) >= _CHECKS_AHEAD:
                _wait_check(pending.popleft(), clock, cancel)
            pending.append(pool.submit(checked, module, produced, source))
            del weight, source
            for key, value in produced.items():
                output.add(key, value)
            done.append(module)


def _wait_check(future: Future[None], clock: PhaseClock, cancel: CancelToken) -> None:
    with clock.phase("wait_verify"):
        while True:
            cancel.raise_if_cancelled()
            try:
                future.result(timeout=0.1)
                return
            except TimeoutError:
                continue


def quantize_stream(
    shards: Iterable[SourceShard],
    open_output: Callable[[str, ShardHeader], OutputShard],
    *,
    quantizer: ShardQuantizer,
    checker: StreamChecker,
    clock: PhaseClock,
    cancel: CancelToken,
    events: EventSink = NULL_SINK,
    total_shards: int | None = None,
) -> TensorStreamResult:
    """Every shard: plan its output, open it, stream the tensors through, close it (upload completes)."""
    result = TensorStreamResult()
    for number, shard in enumerate(shards, 1):
        plan = quantizer.plan(shard.header)
        output = open_output(shard.rel, plan.header)
        try:
            modules = quantizer.quantize(shard, plan, output.writer, checker=checker, clock=clock, cancel=cancel)
            output.close()
        except BaseException:
            output.abort()
            raise
        result.shards += 1
        result.total_size += plan.header.data_bytes
        result.weight_map.update(dict.fromkeys((span.name for span in plan.header.spans), shard.rel))
        result.quantized_modules.extend(sorted(modules))
        for span in shard.header.spans:
            if plan.actions[span.name] == QUANTIZE:
                result.largest_quantized_bytes = max(result.largest_quantized_bytes, span.nbytes)
        fraction = number / total_shards if total_shards else None
        events("quantize", "shard", fraction, f"{shard.rel}: {len(modules)} weights quantized; {clock.summary()}")
    return result
