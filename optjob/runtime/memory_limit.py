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


def _limited_groups(proc_cgroup: Path, root: Path) -> list[tuple[int, Path, str]]:
    """(limit, directory, stat key for anonymous memory) of every limited cgroup above this process."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    found: list[tuple[int, Path, str]] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            base, name, anon = (root / "unified" if (root / "unified").is_dir() else root), "memory.max", "anon"
        elif "memory" in controllers.split(","):
            base, name, anon = root / "memory", "memory.limit_in_bytes", "total_rss"
        else:
            continue
        here = base / path.lstrip("/")
        while True:
            value = _read(here / name)
            if value is not None:
                found.append((value, here, anon))
            if here == base or base not in here.parents:
                break
            here = here.parent
    return found


def cgroup_headroom_bytes(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = _ROOT) -> tuple[int, int] | None:
    """(limit, limit minus the anonymous memory already charged to that cgroup), for the tightest limit.

    The whole cgroup counts, not this process: a container's supervisor or a sibling process shares
    the limit. Page cache is left out because the kernel reclaims it before it kills anything."""
    groups = _limited_groups(proc_cgroup, root)
    if not groups:
        return None
    limit, directory, key = min(groups, key=lambda group: group[0])
    used = 0
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                used = int(value)
                break
    except (OSError, ValueError):
        return limit, limit
    return limit, limit - used


def _read(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    value = int(text)
    return value if value < _UNLIMITED else None
