"""The quick start: validate an example request and print the plan it turns into."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "configs" / "examples" / "fp8-g6-12xlarge.json"


def main() -> int:
    optjob = [sys.executable, "-m", "optjob"]
    print(f"==> optjob validate {EXAMPLE.relative_to(ROOT)}", flush=True)
    return subprocess.call([*optjob, "validate", str(EXAMPLE)])


if __name__ == "__main__":
    raise SystemExit(main())
