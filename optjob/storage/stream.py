"""Fetch a source prefix file by file, in the order a streaming stage consumes it.

``fetch_model`` downloads everything in parallel and returns when the whole model is local; a
stage that works shard by shard would then wait for the slowest shard before starting. Here a
background thread downloads one file at a time (each still multipart and parallel inside), in
the consumer's order, and hands every file over as soon as its size and checksum are verified,
so download, quantization and upload overlap. No cache: a streaming job reads each shard once.

Files are written under a sibling ``<dest>.incoming`` directory and renamed into ``dest`` only
once verified, so ``dest`` never holds a partial or unchecked file: the transfer manager's
temporary names (``shard.safetensors.F7e5DEDC``) once showed up there mid-download and were
copied into a published model as if they were part of it.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from optjob.runtime.cancel import CancelToken
from optjob.runtime.events import NULL_SINK
from optjob.storage.archive import is_archive_key
from optjob.storage.hashing import sha256_file
from optjob.storage.s3 import S3Client, S3Settings, make_client
from optjob.storage.source import STAGE, FetchedFile, FetchedModel, RemoteFile, checked_download, list_remote_files
from optjob.storage.transfer import TransferTask, run_transfers
from optjob.storage.uri import parse_s3_uri

_WAIT_S = 0.1


def can_stream(uri: str) -> bool:
    """A prefix can be fetched file by file; a single archive has to be read front to back."""
    return not is_archive_key(parse_s3_uri(uri).key)


class StreamingFetch:
    """Lists the prefix on construction; ``start`` downloads in the given order on a thread."""

    def __init__(
        self,
        uri: str,
        dest_dir: Path,
        *,
        settings: S3Settings | None = None,
        cancel: CancelToken | None = None,
        client: S3Client | None = None,
    ) -> None:
        self.uri = uri
        self.location = parse_s3_uri(uri)
        self.dest = Path(dest_dir)
        self.incoming = self.dest.with_name(self.dest.name + ".incoming")
        self.settings = settings or S3Settings()
        self.cancel = (cancel or CancelToken()).child()  # stop() ends this fetch, not the job
        self.client = client or make_client(self.settings)
        self.dropped: list[str] = []  # not model files: never downloaded, named in the manifest's warnings
        listed = list_remote_files(self.client, self.location, self.settings, self.cancel, dropped=self.dropped)
        self.remotes: dict[str, RemoteFile] = {remote.rel: remote for remote in listed}
        self.files: dict[str, FetchedFile] = {}
        self.bytes_done = 0
        self._ready = {rel: threading.Event() for rel in self.remotes}
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._wanted: list[str] = list(self.remotes)

    @property
    def total_bytes(self) -> int:
        return sum(remote.size for remote in self.remotes.values())

    def size(self, rel: str) -> int:
        return self.remotes[rel].size

    def start(self, order: list[str], *, only: bool = False) -> None:
        """Download every listed file: those in ``order`` first, in that order, then the rest
        (``only``: just those in ``order``; the caller reads the others some other way)."""
        rest = [] if only else sorted(set(self.remotes) - set(order))
        sequence = [rel for rel in order if rel in self.remotes] + rest
        self._wanted = list(sequence)
        self.dest.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, args=(sequence,), name="optjob-fetch", daemon=True)
        self._thread.start()

    def _run(self, sequence: list[str]) -> None:
        try:
            for rel in sequence:
                self.cancel.raise_if_cancelled()
                remote = self.remotes[rel]
                partial = self.incoming / rel
                partial.parent.mkdir(parents=True, exist_ok=True)
                task = TransferTask(self.location.bucket, remote.key, partial, remote.size, etag=remote.etag)
                # Events belong to the consumer's thread: progress is read from bytes_done instead.
                run_transfers(self.client, self.settings, [task], direction="download", events=NULL_SINK,
                              cancel=self.cancel, stage=STAGE)  # fmt: skip
                checked = checked_download(remote, task, sha256_file(partial, self.cancel))
                final = self.dest / rel
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(partial, final)
                self.files[rel] = checked
                self.bytes_done += remote.size
                self._ready[rel].set()
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            self._error = exc
            for event in self._ready.values():
                event.set()
        finally:
            shutil.rmtree(self.incoming, ignore_errors=True)

    def wait(self, rel: str) -> Path:
        """The local path of ``rel`` once downloaded and verified; raises the download's error."""
        ready = self._ready[rel]
        while not ready.wait(_WAIT_S):
            self.cancel.raise_if_cancelled()
        if self._error is not None:
            raise self._error
        return self.dest / rel

    def result(self) -> FetchedModel:
        """Every file, after all downloads finished (raises the download's error)."""
        for rel in self._wanted:
            self.wait(rel)
        if self._thread is not None:
            self._thread.join()  # its cleanup of the incoming directory is done too
        files = [self.files[rel] for rel in sorted(self.files)]
        return FetchedModel(
            source_uri=self.uri, path=self.dest, files=files, total_bytes=sum(f.size for f in files),
            etags={remote.key: remote.etag for remote in self.remotes.values()},
            archive=False, from_cache=False, bytes_downloaded=self.bytes_done, dropped=self.dropped,
        )  # fmt: skip

    def stop(self) -> None:
        """Cancel outstanding downloads and wait for the thread (used on failure paths)."""
        if self._thread is not None and self._thread.is_alive():
            self.cancel.cancel("pipeline ended")
            self._thread.join(timeout=30)
