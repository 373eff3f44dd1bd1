"""The worker's allocator setting: freed tensor memory goes back to the system."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import sys, psutil, torch
    from optjob.runtime.allocator import tune_allocator
    tuned = tune_allocator() if sys.argv[1] == "tuned" else False
    big = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
    del big  # freeing one mmapped block is what makes glibc raise its threshold
    blocks = [torch.empty(8 << 20, dtype=torch.uint8).fill_(1) for _ in range(24)]  # 192 MiB
    keep = blocks[-1]
    del blocks  # all but the last are freed
    info = psutil.Process().memory_info()
    print(tuned, (info.rss - info.shared) >> 20)
""")


def _retained(mode: str) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout.split()  # fmt: skip
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_are_returned_to_the_system() -> None:
    tuned, tuned_mib = _retained("tuned")
    _, default_mib = _retained("default")
    assert tuned
    assert default_mib - tuned_mib > 100, (default_mib, tuned_mib)  # glibc's default keeps ~176 MiB


def test_an_operators_own_setting_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from optjob.runtime.allocator import tune_allocator

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4194304")
    assert tune_allocator() is False
