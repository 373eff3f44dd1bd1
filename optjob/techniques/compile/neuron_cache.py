"""The Neuron compile cache in S3, keyed the way optimum-neuron keys its registry.

``OPTION_NEURON_COMPILE_CACHE_URL`` (or ``NEURON_COMPILE_CACHE_URL``) names a root. Under it::

    neuronxcc-<compiler version>/
      MODULE_<hlo hash>+<flags hash>/...            NEFFs, written by libneuronxla itself when a
                                                    Neuron worker compiles with this root as its cache
      0_REGISTRY/<optimum-neuron version>/<arch digest>/<entry hash>.json
                                                    optimum-neuron's registry entry, byte for byte
                                                    what its own code serializes
      0_OPTJOB/<optimum-neuron version>/<arch digest>/<entry hash>/
        model.pt, neuron_config.json, config.json   the compiled model (weights are not in it: the
                                                    traced graphs take them at load time)
        optjob-entry.json                           written last: sizes and sha256 of the files

The arch digest and the entry hash are computed by optimum-neuron's own ``SingleModelCacheEntry``
in the Neuron environment, so optimum-neuron users sharing the root find the same registry
entries, and their compiles reuse the NEFFs ours left. An entry is a hit for a job when its
neuron config equals the job's plan (the checkpoint fields aside: they name where weights came
from, not what was compiled) and its compiled model is complete. A hit whose files are missing
or disagree with the plan is corrupted: the job fails rather than publish it.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from optjob.errors import InputError
from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import EventSink
from optjob.storage.hashing import sha256_file
from optjob.storage.publish import get_json, put_json
from optjob.storage.s3 import S3Client, S3Settings, storage_error
from optjob.storage.transfer import TransferTask, run_transfers
from optjob.storage.uri import S3Location, parse_s3_uri

ENTRY_FILES = ("model.pt", "neuron_config.json", "config.json")
ENTRY_MANIFEST = "optjob-entry.json"
ARTIFACT_FOLDER = "0_OPTJOB"
CHECKPOINT_FIELDS = ("checkpoint_id", "checkpoint_revision")
CACHE_VARIABLES = ("OPTION_NEURON_COMPILE_CACHE_URL", "NEURON_COMPILE_CACHE_URL")


class CacheKey(BaseModel):
    """Where one export lives in the cache: compiler, optimum-neuron release, arch digest, entry hash."""

    neuronxcc: str
    optimum_neuron: str
    arch_digest: str
    hash: str

    @property
    def compiler_dir(self) -> str:
        return f"neuronxcc-{self.neuronxcc}"

    def registry_key(self, entry_hash: str | None = None) -> str:
        return f"{self._arch('0_REGISTRY')}/{entry_hash or self.hash}.json"

    def artifact_prefix(self, entry_hash: str | None = None) -> str:
        return f"{self._arch(ARTIFACT_FOLDER)}/{entry_hash or self.hash}/"

    def registry_dir(self) -> str:
        return self._arch("0_REGISTRY") + "/"

    def _arch(self, folder: str) -> str:
        return f"{self.compiler_dir}/{folder}/{self.optimum_neuron}/{self.arch_digest}"


class CacheHit(BaseModel):
    entry_hash: str
    uri: str
    files: dict[str, dict[str, Any]]


def cache_root(env: Mapping[str, str], *, path: str | None = None) -> S3Location | None:
    """The cache root the job names, or None; anything but an S3 URI is refused with the variable's name."""
    for name in CACHE_VARIABLES:
        value = env.get(name)
        if value:
            if not value.startswith(("s3://", "https://")):
                where = f" at '{path}'" if path else ""
                raise InputError(f"{name}='{value}'{where} must be an s3:// URI (the shared Neuron compile cache)")
            return parse_s3_uri(value)
    return None


def _differences(planned: Mapping[str, Any], found: Mapping[str, Any], *, ignore: tuple[str, ...] = ()) -> list[str]:
    keys = sorted((set(planned) | set(found)) - set(ignore))
    return [f"{k}: planned {planned.get(k)!r}, found {found.get(k)!r}" for k in keys if planned.get(k) != found.get(k)]


def is_torchscript_archive(path: Path) -> bool:
    """``torch.jit.save`` writes a zip holding ``<name>/data.pkl`` and ``<name>/code/``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/data.pkl") for n in names) and any("/code/" in n for n in names)


class NeuronCompileCache:
    """One cache root, read and written with the job's storage client."""

    def __init__(self, root: S3Location, client: S3Client, settings: S3Settings) -> None:
        self.root = root
        self.client = client
        self.settings = settings

    def _location(self, key: str) -> S3Location:
        return self.root.child(key)

    def lookup(self, key: CacheKey, neuron_config: Mapping[str, Any]) -> tuple[CacheHit | None, list[str]]:
        """The entry compiled for this plan, if any, and notes on near misses for the job log."""
        registry = self._location(key.registry_dir())
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=registry.bucket, Prefix=registry.key)
            names = [item["Key"] for page in pages for item in page.get("Contents", [])]
        except Exception as exc:
            raise storage_error(exc, "list the Neuron compile cache at", registry.uri) from exc
        notes: list[str] = []
        for name in sorted(n for n in names if n.endswith(".json") and "/" not in n[len(registry.key) :]):
            entry_hash = name[len(registry.key) : -len(".json")]
            entry = get_json(f"s3://{registry.bucket}/{name}", client=self.client) or {}
            if _differences(neuron_config, entry.get("neuron") or {}, ignore=CHECKPOINT_FIELDS):
                continue
            manifest_uri = self._location(key.artifact_prefix(entry_hash) + ENTRY_MANIFEST).uri
            manifest = get_json(manifest_uri, client=self.client)
            if manifest is None:
                notes.append(
                    f"registry entry {entry_hash} matches the plan but holds no compiled model from optjob "
                    "(an optimum-neuron user's entry, or an interrupted write); its NEFFs still speed up a compile"
                )
                continue
            return CacheHit(entry_hash=entry_hash, uri=manifest_uri, files=manifest.get("files", {})), notes
        return None, notes

    def fetch(
        self,
        key: CacheKey,
        hit: CacheHit,
        dest: Path,
        neuron_config: Mapping[str, Any],
        *,
        events: EventSink,
        cancel: CancelToken,
    ) -> list[Path]:
        """Download a hit into ``dest`` and check it against its manifest and the plan."""
        prefix = self._location(key.artifact_prefix(hit.entry_hash))

        def corrupted(why: str) -> InputError:
            return InputError(
                f"The Neuron compile-cache entry {prefix.uri} is corrupted: {why}. Nothing was published; delete "
                "that entry (or point OPTION_NEURON_COMPILE_CACHE_URL elsewhere) and run the job again"
            )

        absent = [name for name in ENTRY_FILES if name not in hit.files]
        if absent:
            raise corrupted(f"its {ENTRY_MANIFEST} lists no {', '.join(absent)}")
        dest.mkdir(parents=True, exist_ok=True)
        tasks = [
            TransferTask(prefix.bucket, prefix.key + name, dest / name, int(hit.files[name]["size"]))
            for name in ENTRY_FILES
        ]
        try:
            run_transfers(
                self.client, self.settings, tasks, direction="download", events=events, cancel=cancel, stage="cache"
            )
        except InputError as exc:
            raise corrupted(str(exc).split(". ")[0]) from None
        for name in ENTRY_FILES:
            if sha256_file(dest / name, cancel) != hit.files[name]["sha256"]:
                raise corrupted(f"{name} does not match the sha256 recorded in {ENTRY_MANIFEST}")
        cached = json.loads((dest / "neuron_config.json").read_text(encoding="utf-8"))
        wrong = _differences(neuron_config, cached)
        if wrong:
            raise corrupted(f"its neuron_config.json disagrees with the plan ({'; '.join(wrong[:3])})")
        if not is_torchscript_archive(dest / "model.pt"):
            raise corrupted("model.pt is not a TorchScript archive")
        return [dest / name for name in ENTRY_FILES]

    def store(
        self, key: CacheKey, serialized_entry: str, compiled_dir: Path, *, events: EventSink, cancel: CancelToken
    ) -> str:
        """Write this export's entry: compiled files, registry entry, then the manifest last."""
        prefix = self._location(key.artifact_prefix())
        paths = {name: compiled_dir / name for name in ENTRY_FILES}
        tasks = [
            TransferTask(prefix.bucket, prefix.key + name, path, path.stat().st_size) for name, path in paths.items()
        ]
        run_transfers(
            self.client, self.settings, tasks, direction="upload", events=events, cancel=cancel, stage="cache"
        )
        registry = self._location(key.registry_key())
        try:
            self.client.put_object(
                Bucket=registry.bucket, Key=registry.key, Body=serialized_entry.encode(), ContentType="application/json"
            )
        except Exception as exc:
            raise storage_error(exc, "write", registry.uri) from exc
        files = {
            name: {"size": path.stat().st_size, "sha256": sha256_file(path, cancel)} for name, path in paths.items()
        }
        manifest = prefix.child(ENTRY_MANIFEST).uri
        put_json(manifest, {"files": files, "key": key.model_dump(), "registry": registry.uri}, client=self.client)
        return manifest
