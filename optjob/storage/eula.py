"""Does this model require accepting a license (ModelAccessConfig.AcceptEula)?

Two kinds of evidence, checked at two moments. Where the model *lives* (a JumpStart private
cache bucket, or any pattern in ``configs/gated-sources.yaml``) is known from the request alone,
so Create rejects it at once. What the model *is* (its model card's license or gating fields) is
known only after download, so the job fails before any optimization and before anything is
written to the output. Both messages name the license and the exact field to set.
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from optjob.config_files import load_config
from optjob.storage.uri import parse_s3_uri

ACCEPT_FIELD = "ModelSource.S3.ModelAccessConfig.AcceptEula: true"
_FRONT_MATTER = re.compile(r"\A\ufeff?---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)
_GATED_KEYS = ("extra_gated_prompt", "extra_gated_fields", "extra_gated_heading")


class GatedSource(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: str
    prefix: str = "*"
    reason: str


class GatedConfig(BaseModel):
    """``configs/gated-sources.yaml``: gated bucket/prefix globs and licenses needing acceptance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sources: list[GatedSource] = []
    licenses: dict[str, str] = {}

    def license_name(self, license_id: str) -> str | None:
        wanted = license_id.strip().lower()
        return next((name for key, name in self.licenses.items() if key.lower() == wanted), None)


def gated_config() -> GatedConfig:
    return GatedConfig.model_validate(load_config("gated-sources.yaml") or {})


def gated_source_reason(uri: str) -> str | None:
    """Why ``uri`` needs AcceptEula (a message for ValidationException), or None if it does not."""
    location = parse_s3_uri(uri)
    for source in gated_config().sources:
        if fnmatchcase(location.bucket, source.bucket) and fnmatchcase(location.key, source.prefix):
            return (
                f"ModelSource.S3.S3Uri {uri} is a gated model source ({source.reason}). Its end-user "
                f"license agreement must be accepted before use: set {ACCEPT_FIELD}."
            )
    return None


def _front_matter(text: str) -> dict[str, Any]:
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        # A broken card must not hide gating: fall back to reading the top-level keys line by line.
        data = {}
        for line in match.group(1).splitlines():
            key, sep, value = line.partition(":")
            if sep and key and not key[0].isspace():
                data[key.strip()] = value.strip().strip("'\"") or True
    return data if isinstance(data, dict) else {}


def _licenses(card: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for key in ("license", "license_name"):
        value = card.get(key)
        values = value if isinstance(value, list) else [value]
        found.extend(str(item) for item in values if isinstance(item, str | int | float) and str(item))
    return found


def model_card_gating(model_dir: Path | str) -> str | None:
    """Why the model card requires AcceptEula (a FailureReason), or None if it does not."""
    readme = next((Path(model_dir) / name for name in ("README.md", "readme.md")
                   if (Path(model_dir) / name).is_file()), None)  # fmt: skip
    if readme is None:
        return None
    card = _front_matter(readme.read_text(encoding="utf-8", errors="replace"))
    config = gated_config()
    for license_id in _licenses(card):
        name = config.license_name(license_id)
        if name is not None:
            return (
                f"The model card (README.md) declares license '{license_id}' ({name}), which requires "
                f"accepting its end-user license agreement before use: set {ACCEPT_FIELD}."
            )
    gated = [key for key in _GATED_KEYS if card.get(key)]
    if gated:
        licensed = ", ".join(_licenses(card)) or "not named"
        return (
            f"The model card (README.md) declares gated access ({', '.join(gated)}; license: {licensed}), "
            f"so its terms must be accepted before use: set {ACCEPT_FIELD}."
        )
    return None
