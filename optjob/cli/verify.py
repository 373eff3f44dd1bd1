"""``optjob verify serve``: serve a published model directory with vLLM's CPU engine and say what it saw."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from optjob.cli import app
from optjob.verify import serve as serve_check

verify_app = typer.Typer(help="Check published artifacts with the engine that serves them.")
app.add_typer(verify_app, name="verify")

EXIT_PASSED, EXIT_FAILED, EXIT_NOT_RUN = 0, 1, 2


def _local(location: str, scratch: Path, what: str) -> Path:
    """A directory as given, or a published s3:// prefix downloaded into scratch."""
    if not location.startswith("s3://"):
        return Path(location)
    return download_published(location, scratch / what)


def download_published(uri: str, dest: Path) -> Path:
    """Every file a job published under ``uri`` (the manifest's list), checked against its size and sha256.

    Why not the source fetch: it keeps model files only (configs/limits.yaml model_files), and a published
    directory also holds serving.properties, which says how a user serves it."""
    from optjob.storage.hashing import sha256_file
    from optjob.storage.layout import MANIFEST_NAME
    from optjob.storage.s3 import make_client
    from optjob.storage.uri import parse_s3_uri

    place = parse_s3_uri(uri if uri.endswith("/") else uri + "/")
    client = make_client()
    manifest = json.loads(client.get_object(Bucket=place.bucket, Key=place.key + MANIFEST_NAME)["Body"].read())
    for entry in manifest["files"]:
        relative = Path(entry["path"])
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"{uri}{MANIFEST_NAME} names a file outside the prefix: {entry['path']}")
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(place.bucket, place.key + entry["path"], str(target))
        digest = sha256_file(target)
        if entry.get("sha256") and digest != entry["sha256"]:
            raise ValueError(f"{uri}{entry['path']} does not match the manifest's sha256: re-publish it")
    return dest


@verify_app.command("serve")
def serve(
    artifact: Annotated[str, typer.Argument(help="Published model directory or s3:// output prefix.")],
    source: Annotated[
        str | None,
        typer.Option(
            help="The model the artifact was made from (directory or s3://): a quantized artifact's "
            "greedy output is compared with it in the same engine."
        ),
    ] = None,  # fmt: skip
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Serve ARTIFACT with vLLM's real CPU engine (scripts/vllm_cpu_env.sh builds it), greedy, on held-out
    prompts: a quantized artifact against its source (token-prefix agreement, first divergence); a
    speculator with its serving.properties speculative_config (lossless vs plain greedy, vLLM's own mean
    accepted length beside the job's offline figure); sharded_state at its degree. Exit 0 passed, 1 failed,
    2 not run (a kind the CPU build has no kernel for, or no engine environment)."""
    console = Console()
    with tempfile.TemporaryDirectory(prefix="optjob-verify-") as tmp:
        scratch = Path(tmp)
        try:
            report = serve_check.check(
                _local(artifact, scratch, "artifact"),
                source=_local(source, scratch, "source") if source else None,
            )
        except (FileNotFoundError, ValueError) as exc:
            console.print(f"not run: {exc}", markup=False, style="red")
            raise typer.Exit(EXIT_NOT_RUN) from None
    if json_out:
        typer.echo(report.model_dump_json(indent=1))
    else:
        console.print(f"{report.kind}: {report.directory}", markup=False)
        if not report.ran:
            console.print(f"not run: {report.reason_not_run}", markup=False)
        else:
            shown = {k: v for k, v in report.figures.items() if k != "prefix_lengths"}
            console.print(json.dumps(shown, indent=1), markup=False, highlight=False)
            console.print(f"engine seconds: {report.engine_seconds}", markup=False)
            for problem in report.problems:
                console.print(f"  - {problem}", markup=False, style="red", soft_wrap=True)
            console.print("passed" if report.passed else "FAILED", markup=False)
    raise typer.Exit(EXIT_NOT_RUN if not report.ran else EXIT_PASSED if report.passed else EXIT_FAILED)
