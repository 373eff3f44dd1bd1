"""optjob-worker: run exactly one optimization job in a container and exit (AWS Batch, Kubernetes, Slurm).

The worker is the service's pipeline without the service: the job's state lives beside its output
as ``optjob-status.json`` (``workers.status``), its progress goes to stdout as JSON lines
(``workers.jsonlog``), and its exit status tells the scheduler what happened (``workers.exitcodes``).
See docs/workers.md for images, manifests and the exit-code table.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("optjob")
except metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
