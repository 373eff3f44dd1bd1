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

from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import NULL_SINK, EventSink
from optjob.runtime.phases import PhaseClock
from optjob.storage.progress import FinishedUnit
from optjob.storage.safetensors_io import FLOAT_DTYPES, TORCH_TO_ST, torch_dtype
from optjob.storage.tensorstream.header import ShardHeader, build_header
from optjob.storage.tensorstream.reader import TensorBytes
from optjob.storage.tensorstream.writer import PlannedShardWriter
from optjob.techniques.quantize import fp8_cpu
from optjob.techniques.quantize.streaming import converter_for, is_ignored
from optjob.verify.tensors import BlockSums, StreamChecker, TensorFigures

QUANTIZE, CAST, COPY = "quantize", "cast", "copy"
_CHECKS_AHEAD = 2
BLOCK_BYTES = 4 << 20  # source bytes of a weight quantized (and checked) at a time


class SourceShard(Protocol):
    rel: str
    header: ShardHeader

    def tensors(self) -> Iterator[TensorBytes]: ...


class OutputShard(Protocol):
    writer: PlannedShardWriter

    def close(self, record: dict[str, Any] | None = None) -> None: ...

    def abort(self) -> None: ...


@dataclass
class ShardPlan:
    header: ShardHeader
    actions: dict[str, str]  # source tensor -> quantize | cast | copy
    row_blocks: dict[str, int] = field(default_factory=dict)  # weight -> rows per block, when blockwise
    streamed_output: dict[str, str] = field(default_factory=dict)  # weight -> its output written block by block


@dataclass
class TensorStreamResult:
    weight_map: dict[str, str] = field(default_factory=dict)
    total_size: int = 0
    shards: int = 0
    quantized_modules: list[str] = field(default_factory=list)
    largest_quantized_bytes: int = 0
    blockwise_weights: int = 0
    resumed: int = 0
    made_by_helpers: int = 0
    figures: list[TensorFigures] = field(default_factory=list)  # one per shard; merged for the gate


class ShardQuantizer:
    """Plans and quantizes shards for one scheme; one instance per job.

    Where the scheme quantizes rows independently (a scale per output channel, per group of a row,
    or per 128x128 block), a weight is quantized ``block_bytes`` of rows at a time: the converter
    runs on each block of rows, the quantized weight's bytes are written as they come and its small
    companions (scales) are concatenated and written after it. That is the same arithmetic on the
    same rows, so the tensors are identical to the whole-tensor result (tested), and memory holds a
    block, not the weight. Whether a weight is row-separable is decided, not assumed: the converter
    runs on the meta device for the whole shape and for the block shapes, and every output must be
    the concatenation of the blocks' outputs along its first dimension (a per-tensor scale is not,
    so such a scheme falls back to whole tensors).
    """

    def __init__(self, config: Any, *, linear_modules: set[str], dtype: torch.dtype | None,
                 block_bytes: int | None = None) -> None:  # fmt: skip
        from transformers.initialization import no_init_weights

        fp8_cpu.install()
        self._no_init = no_init_weights
        self.converter = converter_for(config)
        self.ignore = list(config.ignore or [])
        self.linear_modules = linear_modules
        self.dtype = dtype
        self.block_bytes = block_bytes or BLOCK_BYTES
        self._separable: dict[tuple[tuple[int, ...], torch.dtype], int | None] = {}

    def action(self, name: str, st_dtype: str) -> str:
        module, _, param = name.rpartition(".")
        if param == "weight" and module in self.linear_modules and not is_ignored(module, self.ignore):
            return QUANTIZE
        if self.dtype is not None and st_dtype in FLOAT_DTYPES and TORCH_TO_ST[self.dtype] != st_dtype:
            return CAST
        return COPY

    def _on_meta(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        with self._no_init():
            return self.converter.process({name: torch.empty(shape, dtype=dtype, device="meta")})

    def rows_per_block(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> int | None:
        """Rows per block for a row-separable weight big enough to split, else None."""
        if len(shape) != 2:
            return None
        rows, cols = shape
        row_bytes = cols * torch.empty(0, dtype=dtype).element_size()
        block = max(128, (self.block_bytes // max(row_bytes, 1)) // 128 * 128)
        if block >= rows:
            return None
        key = (shape, dtype)
        if key not in self._separable:
            full = self._on_meta(name, shape, dtype)
            sizes = [block] * (rows // block) + ([rows % block] if rows % block else [])
            parts = {size: self._on_meta(name, (size, cols), dtype) for size in set(sizes)}
            separable = all(
                value.ndim > 0
                and all(parts[size][out].dtype == value.dtype and parts[size][out].shape[1:] == value.shape[1:]
                        for size in parts)
                and sum(parts[size][out].shape[0] for size in sizes) == value.shape[0]
                for out, value in full.items()
            )  # fmt: skip
            self._separable[key] = block if separable else None
        return self._separable[key]

    def plan(self, source: ShardHeader) -> ShardPlan:
        """The output header and what happens to each source tensor, before any data is read."""
        entries: list[tuple[str, str, tuple[int, ...]]] = []
        plan = ShardPlan(source, {})
        for span in source.spans:
            action = plan.actions[span.name] = self.action(span.name, span.dtype)
            if action == QUANTIZE:
                dtype = self.dtype or torch_dtype(span.dtype)
                produced = self._on_meta(span.name, span.shape, dtype)
                outputs = [(key, TORCH_TO_ST[value.dtype], tuple(value.shape)) for key, value in produced.items()]
                block = self.rows_per_block(span.name, span.shape, dtype)
                if block is not None:  # the big output first, streamed; its companions after it
                    big = max(produced, key=lambda key: produced[key].numel() * produced[key].element_size())
                    outputs.sort(key=lambda entry: entry[0] != big)
                    plan.row_blocks[span.name], plan.streamed_output[span.name] = block, big
                entries.extend(outputs)
            elif action == CAST:
                assert self.dtype is not None
                entries.append((span.name, TORCH_TO_ST[self.dtype], span.shape))
            else:
                entries.append((span.name, span.dtype, span.shape))
        plan.header = build_header(entries, {"format": "pt"})
        return plan

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

        Checks (decode and compare, as costly as quantizing) run on a thread of their own, in order,
        while the next block is quantized: torch releases the GIL, so on two cores the two overlap.
        At most ``_CHECKS_AHEAD`` wait, each holding its block's source and output.
        """
        done: list[str] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="optjob-check") as pool:
            checks = _Checks(pool, clock, cancel)
            try:
                for item in shard.tensors():
                    cancel.raise_if_cancelled()
                    action = plan.actions[item.name]
                    if action == COPY:
                        output.add_raw(item.name, item.pieces())
                        checks.submit(checker.unquantized, item.name)
                    elif action == CAST:
                        self._cast(item, output, checker, checks, clock)
                    elif item.name in plan.row_blocks:
                        self._quantize_blocks(item, plan, output, checker, checks, clock)
                        done.append(item.name.rpartition(".")[0])
                    else:
                        self._quantize_whole(item, output, checker, checks, clock)
                        done.append(item.name.rpartition(".")[0])
                checks.drain()
            except BaseException:
                checks.abandon()
                raise
        output.check_complete()
        return done

    def _quantize_whole(self, item: TensorBytes, output: PlannedShardWriter, checker: StreamChecker,
                        checks: _Checks, clock: PhaseClock) -> None:  # fmt: skip
        source = item.tensor()
        with clock.phase("quantize"):
            weight = source.to(self.dtype) if self.dtype is not None else source
            with self._no_init():
                produced = self.converter.process({item.name: weight})
        checks.submit(checker.quantized, item.name.rpartition(".")[0], produced, source)
        del weight, source
        for key, value in produced.items():
            output.add(key, value)

    def _quantize_blocks(self, item: TensorBytes, plan: ShardPlan, output: PlannedShardWriter,
                         checker: StreamChecker, checks: _Checks, clock: PhaseClock) -> None:  # fmt: skip
        module = item.name.rpartition(".")[0]
        rows, cols = item.span.shape
        big = plan.streamed_output[item.name]
        row_bytes = item.span.nbytes // rows
        held: dict[str, list[torch.Tensor]] = {}
        sums = BlockSums()

        def produce() -> Iterator[memoryview]:
            for flat in item.blocks(plan.row_blocks[item.name] * row_bytes):
                source = flat.reshape(-1, cols)
                with clock.phase("quantize"):
                    weight = source.to(self.dtype) if self.dtype is not None else source
                    with self._no_init():
                        produced = self.converter.process({item.name: weight})
                checks.submit(checker.add_block, sums, module, produced, source)
                for key, value in produced.items():
                    if key == big:
                        yield memoryview(value.contiguous().reshape(-1).view(torch.uint8).numpy())
                    else:
                        held.setdefault(key, []).append(value)

        output.add_raw(big, produce())
        checks.submit(lambda: checker.record(module, *sums.result()))
        for key in [span.name for span in plan.header.spans if span.name in held]:
            output.add(key, torch.cat(held.pop(key)))

    def _cast(self, item: TensorBytes, output: PlannedShardWriter, checker: StreamChecker, checks: _Checks,
              clock: PhaseClock) -> None:  # fmt: skip
        assert self.dtype is not None
        sums, dtype = BlockSums(), self.dtype
        item_bytes = torch.empty(0, dtype=torch_dtype(item.span.dtype)).element_size()

        def produce() -> Iterator[memoryview]:
            for block in item.blocks(max(item_bytes, self.block_bytes // item_bytes * item_bytes)):
                with clock.phase("quantize"):
                    cast = block.to(dtype)
                checks.submit(sums.add, cast, block)
                yield memoryview(cast.view(torch.uint8).numpy())

        output.add_raw(item.name, produce())
        checks.submit(lambda: checker.unquantized(item.name, rel=sums.result()[0]))


class _Checks:
    """Check work on one thread, in submission order, at most ``_CHECKS_AHEAD`` queued."""

    def __init__(self, pool: ThreadPoolExecutor, clock: PhaseClock, cancel: CancelToken) -> None:
        self.pool, self.clock, self.cancel = pool, clock, cancel
        self.pending: deque[Future[None]] = deque()

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        while len(self.pending) >= _CHECKS_AHEAD:
            _wait_check(self.pending.popleft(), self.clock, self.cancel)

        def timed() -> None:
            with self.clock.phase("verify"):
                fn(*args)

        self.pending.append(self.pool.submit(timed))

    def drain(self) -> None:
        while self.pending:
            _wait_check(self.pending.popleft(), self.clock, self.cancel)

    def abandon(self) -> None:
        for future in self.pending:
            future.cancel()
        self.pending.clear()


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
    shards: Iterable[SourceShard | FinishedUnit],
    open_output: Callable[[str, ShardHeader], OutputShard],
    *,
    quantizer: ShardQuantizer,
    new_checker: Callable[[], StreamChecker],
    clock: PhaseClock,
    cancel: CancelToken,
    events: EventSink = NULL_SINK,
    total_shards: int | None = None,
) -> TensorStreamResult:
    """Every shard: plan its output, open it, stream the tensors through, close it (upload completes).

    A ``FinishedUnit`` is a shard an earlier attempt of the job finished (re-checked by the runner):
    its figures and tensor names come from the record this function left when it closed it, so the
    gate and the index account for it without redoing it. Each shard gets its own checker, so its
    figures can be recorded with it; the job's figures are merged from them."""
    result = TensorStreamResult()
    for number, shard in enumerate(shards, 1):
        fraction = number / total_shards if total_shards else None
        if isinstance(shard, FinishedUnit):
            record = shard.stage
            result.figures.append(TensorFigures(**record["figures"]))
            result.weight_map.update(dict.fromkeys(record["tensors"], shard.path))
            result.total_size += int(record["data_bytes"])
            result.quantized_modules.extend(record["quantized_modules"])
            result.shards += 1
            if shard.made_by:
                result.made_by_helpers += 1
                events("quantize", "shard", fraction, f"{shard.path}: made by a helper worker on {shard.made_by}")
            else:
                result.resumed += 1
                events("quantize", "shard", fraction, f"{shard.path}: finished by an earlier attempt, reused")
            continue
        plan = quantizer.plan(shard.header)
        checker = new_checker()
        output = open_output(shard.rel, plan.header)
        try:
            modules = sorted(
                quantizer.quantize(shard, plan, output.writer, checker=checker, clock=clock, cancel=cancel)
            )
            output.close({
                "figures": checker.figures.as_dict(), "tensors": [span.name for span in plan.header.spans],
                "data_bytes": plan.header.data_bytes, "quantized_modules": modules,
            })  # fmt: skip
        except BaseException:
            output.abort()
            raise
        result.figures.append(checker.figures)
        result.shards += 1
        result.total_size += plan.header.data_bytes
        result.weight_map.update(dict.fromkeys((span.name for span in plan.header.spans), shard.rel))
        result.quantized_modules.extend(modules)
        for span in shard.header.spans:
            if plan.actions[span.name] == QUANTIZE:
                result.largest_quantized_bytes = max(result.largest_quantized_bytes, span.nbytes)
        result.blockwise_weights += len(plan.row_blocks)
        events("quantize", "shard", fraction, f"{shard.rel}: {len(modules)} weights quantized; {clock.summary()}")
    return result
