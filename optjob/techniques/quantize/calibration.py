"""Calibration text: the built-in corpus, user JSONL (plain, ShareGPT, OpenAI chat), and how to read it.

Calibrated schemes (AWQ, GPTQ, SmoothQuant, static FP8, NVFP4) need a few hundred short texts that
look like what the model will serve. SageMaker's container downloads cnn_dailymail from the Hub;
optjob never touches the Hub, so it ships a small corpus of English prose (Python standard-library
docstrings, < 300 KB) inside the package and accepts the user's own JSONL through
``OPTION_CALIB_DATASET``.

Where the bytes come from is a ``CalibrationSource``: a local path / ``file://`` URI for tests and
air-gapped hosts, or the job's storage client for ``s3://`` URIs. Parsing is the same for all.
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sysconfig
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

from optjob.errors import InputError
from optjob.storage.objects import ObjectReader
from optjob.storage.s3 import S3Settings

BUILTIN = "builtin"
BUILTIN_FILE = "stdlib_docstrings.jsonl"


@runtime_checkable
class CalibrationSource(Protocol):
    """Something that turns a dataset URI into the JSONL text lines it names."""

    def read_lines(self, uri: str) -> Iterator[str]: ...


class LocalCalibrationSource:
    """Reads a plain path or ``file://`` URI; a directory means every ``*.jsonl`` in it, sorted."""

    def read_lines(self, uri: str) -> Iterator[str]:
        path = Path(urlparse(uri).path) if uri.startswith("file://") else Path(uri)
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise InputError(
                f"OPTION_CALIB_DATASET={uri}: no such JSONL file or directory. Check the path, or leave "
                "OPTION_CALIB_DATASET unset to use the built-in corpus"
            )
        for file in files:
            with file.open(encoding="utf-8") as handle:
                yield from handle


class StorageCalibrationSource:
    """Adapts the job's storage client (``optjob.storage``) for ``s3://`` URIs.

    The storage layer is owned elsewhere; this adapter accepts any client exposing either
    ``read_text(uri) -> str`` or ``read_bytes(uri) -> bytes`` (objects) and, for a prefix,
    ``list(uri) -> Iterable[str]`` of object URIs.
    """

    def __init__(self, storage: Any) -> None:
        self._storage = storage

    def _read(self, uri: str) -> str:
        if hasattr(self._storage, "read_text"):
            return str(self._storage.read_text(uri))
        if hasattr(self._storage, "read_bytes"):
            return bytes(self._storage.read_bytes(uri)).decode("utf-8")
        raise InputError(
            f"OPTION_CALIB_DATASET={uri}: this worker's storage client cannot read objects. Run the job through "
            "optjob (run, serve or the worker entrypoint), which gives it one"
        )

    def read_lines(self, uri: str) -> Iterator[str]:
        uris = [uri]
        if uri.endswith("/") and hasattr(self._storage, "list"):
            uris = sorted(u for u in self._storage.list(uri) if u.endswith(".jsonl"))
        for one in uris:
            yield from self._read(one).splitlines()


def source_for(uri: str, storage: Any = None) -> CalibrationSource:
    if uri.startswith("s3://") or uri.startswith("https://"):
        if storage is None:
            raise InputError(
                f"OPTION_CALIB_DATASET={uri}: no storage client is configured for this worker. Run the job through "
                "optjob (run, serve or the worker entrypoint), which gives it one"
            )
        if isinstance(storage, S3Settings):  # what the job runner passes: the job's own S3 settings
            storage = ObjectReader(storage)
        return StorageCalibrationSource(storage)
    return LocalCalibrationSource()


def text_of(record: Any) -> str:
    """One calibration text from a JSONL record in any of the three accepted shapes.

    * plain: ``{"text": "..."}`` (also ``prompt``/``completion``) or a bare JSON string
    * ShareGPT: ``{"conversations": [{"from": "human", "value": "..."}, ...]}``
    * OpenAI chat: ``{"messages": [{"role": "user", "content": "..."}, ...]}``
    """
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return ""
    if isinstance(record.get("text"), str):
        return record["text"]
    turns = record.get("messages") or record.get("conversations")
    if isinstance(turns, list):
        parts = []
        for turn in turns:
            if not isinstance(turn, dict):
                continue
            content = turn.get("content", turn.get("value"))
            if isinstance(content, list):  # OpenAI content parts
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            if isinstance(content, str):
                parts.append(content)
        return "\n".join(parts)
    pieces = [record.get(k) for k in ("prompt", "completion")]
    return "\n".join(p for p in pieces if isinstance(p, str))


def parse_jsonl(lines: Iterable[str], *, origin: str) -> list[str]:
    """Non-empty texts from JSONL lines; a malformed line is an InputError naming its number.

    Empty texts are dropped here because llm-compressor turns an empty sample into a float
    ``input_ids`` tensor and crashes deep inside the embedding (cpu-feasibility §4).
    """
    texts = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{origin} line {number}: not valid JSON ({exc.msg})") from None
        text = text_of(record).strip()
        if text:
            texts.append(text)
    if not texts:
        raise InputError(f"{origin}: no usable calibration text (expected text, messages or conversations)")
    return texts


def builtin_path() -> Path:
    return Path(str(resources.files("optjob") / "data" / "calibration" / BUILTIN_FILE))


def load_texts(uri: str | None, *, storage: Any = None) -> list[str]:
    """The calibration texts named by ``OPTION_CALIB_DATASET`` (None or ``builtin`` = shipped corpus)."""
    if not uri or uri == BUILTIN:
        with builtin_path().open(encoding="utf-8") as handle:
            return parse_jsonl(handle, origin="built-in calibration corpus")
    return parse_jsonl(source_for(uri, storage).read_lines(uri), origin=f"OPTION_CALIB_DATASET={uri}")


# --- building the shipped corpus -------------------------------------------------------------

_CORPUS_MODULES = (
    "argparse",
    "ast",
    "asyncio",
    "calendar",
    "collections",
    "concurrent",
    "configparser",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "ftplib",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "html",
    "http",
    "imaplib",
    "inspect",
    "ipaddress",
    "json",
    "logging",
    "mailbox",
    "multiprocessing",
    "netrc",
    "numbers",
    "optparse",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "shutil",
    "smtplib",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "tokenize",
    "typing",
    "unittest",
    "urllib",
    "uuid",
    "warnings",
    "weakref",
    "xml",
    "zipfile",
)


def stdlib_docstrings(max_bytes: int = 280_000, *, min_chars: int = 80) -> list[str]:
    """Prose docstrings from a fixed list of stdlib modules, deterministic for one Python version."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for name in _CORPUS_MODULES:
        pkg = root / name
        files.extend(sorted(pkg.rglob("*.py")) if pkg.is_dir() else [root / f"{name}.py"])
    seen: set[str] = set()
    texts: list[str] = []
    for file in files:
        if not file.is_file() or "test" in file.parts[-2:-1]:
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and doc not in seen:
                    seen.add(doc)
                    texts.append(" ".join(doc.split())[:1200])
    random.Random(0).shuffle(texts)
    out, size = [], 0
    for text in texts:
        line_bytes = len(json.dumps({"text": text})) + 1
        if size + line_bytes > max_bytes:
            break
        out.append(text)
        size += line_bytes
    return out


def write_builtin_corpus(path: Path | None = None) -> Path:
    path = path or builtin_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for text in stdlib_docstrings():
            handle.write(json.dumps({"text": text}) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the shipped calibration corpus")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    print(write_builtin_corpus(args.out))


if __name__ == "__main__":
    main()
