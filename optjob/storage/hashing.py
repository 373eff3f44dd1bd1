"""sha256 of local files, in parallel: the integrity record for downloads and the manifest.

hashlib releases the GIL on large updates, so a thread per file uses every core on multi-shard
models; the cancel token is checked between chunks so a stop is not held up by a 10 GB shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from optjob.runtime.cancel import CancelToken

_CHUNK = 4 * 1024 * 1024


def sha256_file(path: Path, cancel: CancelToken | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            if cancel is not None:
                cancel.raise_if_cancelled()
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: Sequence[Path], *, workers: int, cancel: CancelToken | None = None) -> list[str]:
    """Hex sha256 of each path, in order."""
    if not paths:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        return list(pool.map(lambda path: sha256_file(path, cancel), paths))
