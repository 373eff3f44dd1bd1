"""The source side of a streamed job, shared by both runners and by a helper worker: which files are
the weights, and what must hold before any of them is read (a model directory, in range, licensed,
an output prefix this job may claim, an index that names only shards that exist)."""

from __future__ import annotations

import os
from pathlib import Path

from optjob.errors import InputError
from optjob.pipeline.plan import Plan
from optjob.pipeline.transfer import ALLOW_PICKLE_ENV
from optjob.storage.eula import model_card_gating
from optjob.storage.inputs import SAFETENSORS_INDEX, index_weight_map, read_config
from optjob.storage.publish import Publisher
from optjob.storage.stream import StreamingFetch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


def weight_order(fetch: StreamingFetch) -> list[str]:
    weights = sorted(rel for rel in fetch.remotes if rel.endswith(".safetensors"))
    pickles = sorted(rel for rel in fetch.remotes if rel.lower().endswith(PICKLE_SUFFIXES))
    if not weights and pickles:  # say why the weights it has are not used, not that it has none
        raise InputError(
            f"{fetch.uri} holds only pickle weights ({pickles[0]}), which are refused as unsafe: unpickling can "
            "run arbitrary code. Convert them to safetensors in a trusted environment and upload those"
        )
    if not weights:
        raise InputError(f"{fetch.uri} holds no *.safetensors weights; a model directory needs them")
    if pickles and os.environ.get(ALLOW_PICKLE_ENV) != "1":
        raise InputError(
            f"{fetch.uri} holds pickle weights ({pickles[0]}); loading them can run code. Remove them "
            f"(the safetensors weights are used), or set {ALLOW_PICKLE_ENV}=1 to accept them"
        )
    return weights


def open_source(
    plan: Plan, fetch: StreamingFetch, source_dir: Path, small: list[str], weights: list[str], publisher: Publisher
) -> dict[str, str]:
    """Wait for the non-weight files, refuse what is not a model or not licensed, claim the output
    prefix, and return the index's weight map (empty without an index)."""
    for rel in small:
        fetch.wait(rel)
    if "config.json" not in small:
        raise InputError(f"{plan.source.s3_uri} has no config.json; it is not a Hugging Face model directory")
    read_config(source_dir / "config.json")  # its sizes in range before a tensor is read
    if not plan.source.accept_eula and (reason := model_card_gating(source_dir)):
        raise InputError(reason)
    publisher.open()  # refuse a prefix owned by another job before any work
    weight_map = index_weight_map(source_dir) if SAFETENSORS_INDEX in small else {}
    missing = sorted(set(weight_map.values()) - set(weights))
    if missing:
        raise InputError(f"{SAFETENSORS_INDEX} names shard {missing[0]}, which is missing from {fetch.uri}")
    return weight_map
