"""What this host has: NVIDIA GPUs (model, count, compute capability, CUDA), Neuron devices, or neither.

A scheduler places the container; it does not promise the host matches the job (a queue with
mixed instance types, a node selector left out). The worker therefore looks for itself before
doing any work and reports what it found as its first log line.

Detection prefers the vendors' own tools, which need no Python GPU stack and cost milliseconds:
``nvidia-smi`` for GPUs and the driver's CUDA version, ``neuron-ls`` (or ``/dev/neuron*``) for
Neuron devices. ``torch.cuda`` is asked only when device nodes exist but ``nvidia-smi`` does not,
because importing torch on a CPU-only host just to learn there is no GPU costs seconds. The CUDA
runtime the image was built with is read from torch's ``version.py`` without importing torch.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from optjob.techniques.compile.neuron_env import TOOLCHAIN as NEURON_TOOLCHAIN
from optjob.techniques.compile.neuron_env import present as neuron_env_present
from optjob.techniques.compile.neuron_plan import neuron_rules

_TOOL_TIMEOUT_S = 20.0
_NEURON_PACKAGES = ("neuronx-cc", "torch-neuronx", "libneuronxla", "optimum-neuron")
_NEURON_SDK_RELEASE = Path("/opt/aws/neuron/RELEASE")  # not always present; read when it is


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mib: int | None = None
    compute_capability: str | None = None


@dataclass(frozen=True)
class HostInfo:
    """Everything the capability check and the first log line need; JSON-serialisable via ``as_dict``."""

    cpu_count: int
    memory_gib: float
    gpus: tuple[Gpu, ...] = ()
    cuda_driver_version: str | None = None
    cuda_runtime_version: str | None = None
    nvidia_driver_version: str | None = None
    neuron_devices: int = 0
    neuron_cores: int | None = None
    neuron_sdk: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        if self.gpus:
            return "cuda"
        if self.neuron_devices:
            return "neuron"
        return "cpu"

    def summary(self) -> str:
        """One phrase for logs and refusal reasons, e.g. ``2 x NVIDIA H100 80GB HBM3 (sm_90), CUDA 12.8``."""
        parts: list[str] = []
        if self.gpus:
            names: dict[str, int] = {}
            for gpu in self.gpus:
                cc = f" (sm_{gpu.compute_capability.replace('.', '')})" if gpu.compute_capability else ""
                names[gpu.name + cc] = names.get(gpu.name + cc, 0) + 1
            parts.append(", ".join(f"{count} x {name}" for name, count in names.items()))
            if self.cuda_driver_version:
                parts.append(f"CUDA {self.cuda_driver_version}")
        if self.neuron_devices:
            cores = f", {self.neuron_cores} NeuronCores" if self.neuron_cores else ""
            sdk = ", ".join(f"{k} {v}" for k, v in self.neuron_sdk.items())
            parts.append(f"{self.neuron_devices} Neuron devices{cores}" + (f" ({sdk})" if sdk else ""))
        if not parts:
            parts.append(f"CPU only ({self.cpu_count} cores, {self.memory_gib:.1f} GiB)")
        return ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind
        data["summary"] = self.summary()
        return data


def _run(args: list[str]) -> str | None:
    try:
        result = subprocess.run(args, capture_output=True, text=True, timeout=_TOOL_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def _nvidia_smi() -> tuple[list[Gpu], str | None, str | None, list[str]]:
    """GPUs, CUDA driver version and NVIDIA driver version from ``nvidia-smi`` (empty without it)."""
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return [], None, None, []
    notes: list[str] = []
    listing = _run([binary, "--query-gpu=name,memory.total,compute_cap,driver_version",
                    "--format=csv,noheader,nounits"])  # fmt: skip
    gpus: list[Gpu] = []
    driver = None
    if listing is None:
        notes.append("nvidia-smi is installed but failed (driver not loaded, or no GPU visible to this container)")
    else:
        for line in listing.strip().splitlines():
            cells = [cell.strip() for cell in line.split(",")]
            if not cells or not cells[0]:
                continue
            memory = int(float(cells[1])) if len(cells) > 1 and _is_number(cells[1]) else None
            cc = cells[2] if len(cells) > 2 and re.fullmatch(r"\d+\.\d+", cells[2]) else None
            driver = cells[3] if len(cells) > 3 and cells[3] else driver
            gpus.append(Gpu(cells[0], memory, cc))
    cuda = None
    banner = _run([binary]) if gpus else None
    if banner:
        match = re.search(r"CUDA Version:\s*([0-9.]+)", banner)
        cuda = match.group(1) if match else None
    return gpus, cuda, driver, notes


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _torch_gpus() -> list[Gpu]:
    """Fallback when /dev/nvidia* exists without nvidia-smi (a minimal image): ask torch."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        gpus.append(Gpu(props.name, props.total_memory // (1024 * 1024), f"{props.major}.{props.minor}"))
    return gpus


def torch_cuda_runtime() -> str | None:
    """The CUDA version torch was built for (``None`` for a CPU build), read without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return None
    version_file = Path(spec.origin).parent / "version.py"
    try:
        text = version_file.read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(r"^cuda(?::[^=]*)?=\s*['\"]([0-9.]+)['\"]", text, re.MULTILINE)
    return match.group(1) if match else None


def _neuron(dev_dir: Path) -> tuple[int, int | None, list[str]]:
    """Neuron device and core counts from ``neuron-ls --json-output``, else from device nodes."""
    notes: list[str] = []
    binary = shutil.which("neuron-ls")
    if binary is not None:
        listing = _run([binary, "--json-output"])
        if listing:
            try:
                devices = json.loads(listing)
            except json.JSONDecodeError:
                devices = None
            if isinstance(devices, list):
                cores = sum(int(d.get("nc_count", 0) or 0) for d in devices if isinstance(d, dict))
                return len(devices), cores or None, notes
        notes.append("neuron-ls is installed but gave no device list")
    nodes = [p for p in dev_dir.glob("neuron*") if re.fullmatch(r"neuron\d+", p.name)]
    return len(nodes), None, notes


def neuron_sdk_versions() -> dict[str, str]:
    versions: dict[str, str] = {}
    for package in _NEURON_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        release = _NEURON_SDK_RELEASE.read_text(encoding="utf-8").strip()
    except OSError:
        release = ""
    if release:
        versions["sdk"] = release.splitlines()[0]
    return versions


def detect_host(dev_dir: Path | str = "/dev") -> HostInfo:
    """Look at this host once; cheap (no torch import on CPU-only hosts)."""
    dev = Path(dev_dir)
    gpus, cuda, driver, notes = _nvidia_smi()
    if not gpus and any(re.fullmatch(r"nvidia\d+", p.name) for p in dev.glob("nvidia*")):
        gpus = _torch_gpus()
        if gpus:
            notes.append("GPUs found through torch.cuda (nvidia-smi is not installed)")
    neuron_devices, neuron_cores, neuron_notes = _neuron(dev)
    return HostInfo(
        cpu_count=os.cpu_count() or 1,
        memory_gib=round(psutil.virtual_memory().total / 2**30, 1),
        gpus=tuple(gpus),
        cuda_driver_version=cuda,
        cuda_runtime_version=torch_cuda_runtime(),
        nvidia_driver_version=driver,
        neuron_devices=neuron_devices,
        neuron_cores=neuron_cores,
        neuron_sdk=neuron_sdk_versions(),
        notes=tuple(notes + neuron_notes),
    )


def toolchain_present(module: str) -> bool:
    """Whether a technique's toolchain is here: a module importable in optjob's environment (e.g.
    ``tensorrt_llm``), or, for ``neuron_env``, optimum-neuron's own environment beside it."""
    if module == NEURON_TOOLCHAIN:
        return neuron_env_present(os.environ, neuron_rules().optimum_neuron)
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
