"""A memory-limited cgroup to run a process in, for tests and benchmarks of the memory bound.

A streaming job's promise is "fits any model on a small worker"; the honest way to check it is
the way a container runtime enforces it: the kernel's cgroup limit, which kills the process when it
is exceeded. This creates a child cgroup (v2 ``memory.max`` with swap off, or v1
``memory.limit_in_bytes`` plus the memory+swap limit), moves a child process into it at start
(``preexec``), and removes it afterwards. Creating cgroups needs the right to write to the cgroup
filesystem (root in a container without a read-only ``/sys/fs/cgroup``); ``available()`` says
whether this host allows it, so a test can skip with the reason instead of failing.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

_ROOT = Path("/sys/fs/cgroup")


def _base() -> tuple[Path, int] | None:
    """Where to create the cgroup, and its version."""
    v1 = _ROOT / "memory"
    if (v1 / "memory.limit_in_bytes").exists() and os.access(v1, os.W_OK):
        return v1, 1
    v2 = _ROOT / "unified" if (_ROOT / "unified" / "cgroup.controllers").exists() else _ROOT
    writable = (v2 / "cgroup.controllers").exists() and os.access(v2, os.W_OK)
    if writable and "memory" in (v2 / "cgroup.subtree_control").read_text().split():
        return v2, 2
    return None


class MemoryCgroup:
    def __init__(self, limit_bytes: int, *, name: str | None = None) -> None:
        found = _base()
        if found is None:
            raise PermissionError("no writable cgroup filesystem with the memory controller on this host")
        base, self.version = found
        self.path = base / (name or f"optjob-limit-{uuid.uuid4().hex[:10]}")
        self.path.mkdir()
        self.limit_bytes = limit_bytes
        if self.version == 1:
            (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            swap = self.path / "memory.memsw.limit_in_bytes"
            if swap.exists():  # memory+swap = memory: the process cannot dodge the limit by swapping
                swap.write_text(str(limit_bytes))
        else:
            (self.path / "memory.max").write_text(str(limit_bytes))
            if (self.path / "memory.swap.max").exists():
                (self.path / "memory.swap.max").write_text("0")

    @staticmethod
    def available() -> str | None:
        """None when a limited cgroup can be created here, else why not."""
        try:
            MemoryCgroup(1 << 30).remove()
        except OSError as exc:
            return f"cannot create a memory cgroup here ({exc})"
        return None

    def preexec(self) -> None:
        """For ``subprocess.Popen(preexec_fn=...)``: the child joins the cgroup before it runs anything."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def oom_kills(self) -> int:
        """How many processes the kernel killed for exceeding the limit."""
        source = self.path / ("memory.oom_control" if self.version == 1 else "memory.events")
        try:
            for line in source.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def peak_bytes(self) -> int | None:
        """The cgroup's peak memory use (page cache included), where the kernel reports it."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> None:
        """Delete the cgroup (its processes must have exited)."""
        with contextlib.suppress(FileNotFoundError):
            self.path.rmdir()

    def __enter__(self) -> MemoryCgroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
