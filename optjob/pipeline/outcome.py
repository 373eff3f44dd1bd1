"""What a finished job reports: the image to serve it with, warnings, figures, published files, sizes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunOutcome:
    recommended_image: str | None
    warnings: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)
    source_bytes: int = 0  # the model as it arrived
    output_bytes: int = 0  # what was published, manifest aside
    bytes_downloaded: int = 0  # what crossed the network (0 for a cache hit)

    def summary(self) -> dict[str, Any]:
        """What the store keeps of a COMPLETED job, for the console and ``/metrics``: everything the
        manifest says about the result, without the plan (the store has it already)."""
        return {
            "metrics": self.metrics,
            "warnings": self.warnings,
            "published": self.published,
            "source_bytes": self.source_bytes,
            "output_bytes": self.output_bytes,
            "bytes_downloaded": self.bytes_downloaded,
        }
