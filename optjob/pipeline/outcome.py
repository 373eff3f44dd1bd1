"""What a finished job reports: the image to serve it with, warnings, figures, published files."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunOutcome:
    recommended_image: str | None
    warnings: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    published: list[str] = field(default_factory=list)
