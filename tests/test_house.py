"""The house rules that code can check: no import circles (scripts/check_imports.py, run in CI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "scripts" / "check_imports.py"


def _check(*packages: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(CHECK), *map(str, packages)], capture_output=True, text=True, timeout=60)


def test_optjob_has_no_import_circles() -> None:
    result = _check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no import circles" in result.stdout


def test_a_circle_hidden_inside_a_function_is_found(tmp_path: Path) -> None:
    package = tmp_path / "house"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from house.sub import a  # a package registering its part\n")
    (package / "sub" / "a.py").write_text("from house import b\n")
    (package / "b.py").write_text("def late():\n    from .sub.a import x  # the circle load time never sees\n")
    (package / "c.py").write_text("import house.b\n")
    result = _check(package)
    assert result.returncode == 1
    assert "import circle: house.b <-> house.sub.a" in result.stdout
    assert "house.c" not in result.stdout and "house.sub <->" not in result.stdout


def test_the_control_plane_does_not_import_the_model_libraries() -> None:
    """``optjob serve``, the executor and the job service run no model: importing torch (a few hundred MB)
    there would be paid by every API process. Workers import it when a job needs it."""
    code = (
        "import sys, optjob.cli.serve, optjob.jobs.daemon, optjob.jobs.service, optjob.api.app, optjob.console.routes;"
        "print(sorted(m for m in ('torch', 'transformers', 'llmcompressor', 'modelopt', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
