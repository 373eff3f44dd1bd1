"""RecommendedInferenceImage: the DJL LMI image URI for a framework and region, from configs/images.yaml.

The tables (account per region, dnsSuffix, repository and tag per framework) are data so a new
LMI release or region is a config change. An explicit ``Image`` in the request always wins,
matching SageMaker, whose fixtures return the image that ran the optimization.
"""

from __future__ import annotations

from typing import Any

from optjob.config_files import load_config


def _tables() -> dict[str, Any]:
    return dict(load_config("images.yaml"))


def account_for(region: str) -> str:
    tables = _tables()
    if region in tables["default_account_regions"]:
        return str(tables["default_account"])
    try:
        return str(tables["accounts"][region])
    except KeyError:
        raise KeyError(f"region {region!r} has no DJL image account in configs/images.yaml") from None


def known_regions() -> frozenset[str]:
    """Every region the image tables cover: the regions SageMaker serves, so the ones optjob accepts a
    signature for (a region outside them has no image and no ARN a real client could use)."""
    tables = _tables()
    return frozenset(tables["default_account_regions"]) | frozenset(tables["accounts"])


def dns_suffix(region: str) -> str:
    for row in _tables()["dns_suffixes"]:
        if region.startswith(row["prefix"]):
            return str(row["suffix"])
    return "amazonaws.com"


def recommended_image(framework: str, region: str, explicit_image: str | None = None) -> str:
    """``{account}.dkr.ecr.{region}.{dnsSuffix}/{repository}:{tag}`` (or the framework's fixed ``uri``), or
    ``explicit_image`` if given."""
    if explicit_image:
        return explicit_image
    tables = _tables()
    try:
        fw = tables["frameworks"][framework]
    except KeyError:
        known = ", ".join(sorted(tables["frameworks"]))
        raise KeyError(f"unknown image framework {framework!r}; configs/images.yaml has {known}") from None
    if "uri" in fw:  # a full image reference, the same in every region
        return str(fw["uri"])
    if region in fw.get("exclude_regions", []):
        raise KeyError(f"{framework} images are not published in {region}")
    return f"{account_for(region)}.dkr.ecr.{region}.{dns_suffix(region)}/{fw['repository']}:{fw['tag']}"
