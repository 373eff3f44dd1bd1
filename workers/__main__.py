"""``optjob-worker`` / ``python -m workers``: the container entrypoint. See ``workers.supervisor``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from optjob.runtime.allocator import tune_allocator
from workers import __version__, exitcodes
from workers.jsonlog import JsonLog
from workers.spec import SPEC_ENV, SPEC_URI_ENV
from workers.supervisor import CONTROL_PLANE_ENV, WORK_DIR_ENV, Options, Supervisor

_EPILOG = "exit status:\n" + "\n".join(
    f"  {code:>3}  {status:<11} {meaning}" for code, status, meaning, _ in exitcodes.TABLE
)


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error, which a scheduler cannot tell from a Python crash: use 64."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(exitcodes.EXIT_USAGE)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="optjob-worker",
        description=(
            "Run exactly one optimization job and exit. The CreateOptimizationJob request comes from "
            f"--spec, else ${SPEC_ENV} (inline JSON/YAML), else ${SPEC_URI_ENV} (a file or S3 URI). The job's "
            "status is written to optjob-status.json at its S3OutputLocation; logs are JSON lines on stdout."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--spec", metavar="FILE|s3://BUCKET/KEY", help="the request (JSON or YAML)")
    p.add_argument(
        "--control-plane",
        action="store_true",
        default=os.environ.get(CONTROL_PLANE_ENV, "") in ("1", "true", "yes"),
        help=f"also record the job in the store of $OPTJOB_HOME (or set {CONTROL_PLANE_ENV}=1)",
    )
    p.add_argument(
        "--work-dir", type=Path, metavar="DIR",
        help=f"scratch space for the model (default ${WORK_DIR_ENV}, else the system temp directory)",
    )  # fmt: skip
    p.add_argument("--check-host", action="store_true", help="print what this host has (JSON) and exit 0")
    p.add_argument("--version", action="version", version=f"optjob-worker {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.check_host:
        from workers.host import detect_host

        print(json.dumps(detect_host().as_dict(), indent=2))
        return 0
    tune_allocator()
    log = JsonLog()
    supervisor = Supervisor(Options(spec=args.spec, control_plane=args.control_plane, work_dir=args.work_dir), log)
    supervisor.install_signals()
    try:
        return supervisor.run()
    except Exception as exc:  # noqa: BLE001 - a bug must not exit 1, which reads as a Python crash
        traceback.print_exc(file=sys.stderr)
        log.error("internal", message=f"internal error: {type(exc).__name__}: {exc}")
        log.info("exit", exit_code=exitcodes.EXIT_INTERNAL)
        return exitcodes.EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
