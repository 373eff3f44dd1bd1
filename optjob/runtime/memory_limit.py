"""The memory this process may use: its cgroup's limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``).

A container, a Kubernetes pod or a batch job sets the limit; when a job outgrows it the kernel
kills the worker with SIGKILL and the user sees only "killed by signal 9". A streaming job knows
what it needs (a fixed budget), so it compares that with what the limit leaves after the
libraries are loaded and fails before any work, naming both numbers.
"""

from __future__ import annotations

from pathlib import Path

_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60  # v1 reports "no limit" as a page-rounded 2**63


def cgroup_limit_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = _ROOT) -> int | None:
    """The tightest memory limit on this process's cgroup and its ancestors, or None when unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base, names = (root / "unified" if (root / "unified").is_dir() else root), ("memory.max",)
        elif "memory" in controllers.split(","):
            base, names = root / "memory", ("memory.limit_in_bytes",)
        else:
            continue
        here = base / path.lstrip("/")
        while True:
            for name in names:
                value = _read(here / name)
                if value is not None:
                    limits.append(value)
            if here == base or base not in here.parents:
                break
            here = here.parent
    return min(limits) if limits else None


def _read(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    value = int(text)
    return value if value < _UNLIMITED else None
