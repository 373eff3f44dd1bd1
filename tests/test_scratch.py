"""Scratch removal: gone at once, deleted before the process exits, leftovers of killed processes swept."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from optjob.pipeline.scratch import DISCARD_DIR, discard, sweep


def _fill(path: Path) -> Path:
    (path / "source").mkdir(parents=True)
    (path / "source" / "model.safetensors").write_bytes(os.urandom(1 << 20))
    return path


def test_discard_removes_the_directory_at_once_and_its_contents_soon(tmp_path: Path) -> None:
    work = _fill(tmp_path / "job-1")
    thread = discard(work)
    assert not work.exists()  # the job's directory is gone before discard returns
    assert thread is not None and not thread.daemon  # the interpreter waits for it at exit
    thread.join(timeout=30)
    assert list((tmp_path / DISCARD_DIR).iterdir()) == []
    assert discard(tmp_path / "never-there") is None


def test_a_process_finishes_deleting_before_it_exits(tmp_path: Path) -> None:
    work = _fill(tmp_path / "job-2")
    code = textwrap.dedent(f"""
        import shutil, sys
        from pathlib import Path
        from optjob.pipeline import scratch
        real = shutil.rmtree
        def slow(path, **kw):
            import time; time.sleep(1.0); real(path, **kw)
        scratch.shutil.rmtree = slow
        scratch.discard(Path({str(work)!r}))
        print("returned", flush=True)
        sys.exit(0)  # no join here: the process itself must wait for the deletion
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "returned"
    assert list((tmp_path / DISCARD_DIR).iterdir()) == []


def test_sweep_removes_leftovers_of_dead_processes_only(tmp_path: Path) -> None:
    bin_dir = tmp_path / DISCARD_DIR
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = _fill(bin_dir / f"job-3.{dead.pid}.abcd1234")
    mine = _fill(bin_dir / f"job-4.{os.getpid()}.abcd1234")  # a live process is still deleting it
    odd = _fill(bin_dir / "not-ours")
    sweep(tmp_path)
    assert not left.exists() and not odd.exists()
    assert mine.exists()
