"""Training conversations for a draft head: read from the TrainingDataSource, every line's format detected.

SageMaker's ``ModelSpeculativeDecodingTrainingDataSource`` is an S3 prefix (``S3Prefix``: every
``.jsonl`` object below it, in key order) or a manifest (``ManifestFile``: a JSON array whose first
element is ``{"prefix": "s3://..."}`` followed by keys relative to it). Each line may be, detected per
line by its keys:

* ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}``
* OpenAI chat: ``{"messages": [{"role": ..., "content": "..." | [{"type": "text", "text": ...}]}]}``
* OpenAI completions: ``{"prompt": "...", "completion": "..."}``
* SageMaker endpoint data capture: ``{"captureData": {"endpointInput": {"data", "encoding"},
  "endpointOutput": {...}}}`` whose input is one of the above (or LMI's ``{"inputs": ...}``) and whose
  output is an OpenAI response or LMI's ``generated_text``.

A line that is none of these is counted (per reason) and skipped; a source with no usable
conversation fails the job naming the first bad file and line. Without a TrainingDataSource the
stage uses a prompt set shipped in the package (``optjob/data/speculative/prompts.jsonl``).
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from optjob.errors import InputError
from optjob.storage.objects import ObjectReader
from optjob.storage.s3 import S3Settings
from optjob.storage.uri import parse_s3_uri

BUILTIN_PROMPTS = "prompts.jsonl"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
          "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}  # fmt: skip


@dataclass(frozen=True)
class Conversation:
    """Turns as (role, text) with roles system/user/assistant; ``completion`` when it came as prompt/completion
    (rendered as raw continued text rather than as a dialogue)."""

    turns: tuple[tuple[str, str], ...]
    format: str
    completion: bool = False

    @property
    def prompt_turns(self) -> tuple[tuple[str, str], ...]:
        """Everything before the last assistant turn: what the target is asked to continue."""
        for index in range(len(self.turns) - 1, -1, -1):
            if self.turns[index][0] == "assistant":
                return self.turns[:index]
        return self.turns

    @property
    def reply(self) -> str | None:
        last = self.turns[-1] if self.turns else None
        return last[1] if last and last[0] == "assistant" else None


@dataclass
class TrainingData:
    """The conversations read and what the manifest records about where they came from."""

    conversations: list[Conversation]
    source: str
    files: list[dict[str, Any]] = field(default_factory=list)
    formats: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    lines: int = 0
    capped: bool = False

    def provenance(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "files": self.files,
            "lines": self.lines,
            "conversations": len(self.conversations),
            "formats": dict(self.formats),
            "skipped_lines": dict(self.skipped),
            "capped_at_max_samples": self.capped,
        }


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts; images and audio carry no text to train on
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type", "text") == "text"]
        joined = "".join(t for t in texts if isinstance(t, str))
        return joined or None
    return None


def _turns(items: Any, role_key: str, text_key: str) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(items, list) or not items:
        return None
    turns = []
    for item in items:
        if not isinstance(item, dict):
            return None
        role = _ROLES.get(str(item.get(role_key, "")).lower())
        text = _text(item.get(text_key))
        if role is None or text is None:
            return None
        turns.append((role, text))
    return tuple(turns)


def _capture_payload(part: Any) -> Any:
    """The JSON body inside one side of a data-capture record (JSON or BASE64 encoded)."""
    if not isinstance(part, dict) or "data" not in part:
        return None
    data = part["data"]
    if str(part.get("encoding", "JSON")).upper() == "BASE64":
        data = base64.b64decode(data).decode("utf-8")
    return json.loads(data) if isinstance(data, str) else data


def _capture_reply(output: Any) -> str | None:
    if isinstance(output, list) and output:
        output = output[0]
    if not isinstance(output, dict):
        return None
    if isinstance(output.get("generated_text"), str):
        return output["generated_text"]
    choices = output.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        message = choice.get("message")
        if isinstance(message, dict):
            return _text(message.get("content"))
        return _text(choice.get("text"))
    return None


def detect(record: Any) -> Conversation | str:
    """One line's conversation, or why it is not one (the reason is what the skip count is keyed by)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if "conversations" in record:
        turns = _turns(record["conversations"], "from", "value")
        return Conversation(turns, "sharegpt") if turns else "sharegpt without usable turns"
    if "messages" in record:
        turns = _turns(record["messages"], "role", "content")
        return Conversation(turns, "openai_chat") if turns else "openai chat without usable messages"
    if "prompt" in record:
        prompt, completion = record.get("prompt"), record.get("completion")
        if not isinstance(prompt, str) or not prompt or not isinstance(completion, (str, type(None))):
            return "openai completions without a text prompt"
        turns = (("user", prompt),) + ((("assistant", completion),) if completion else ())
        return Conversation(turns, "openai_completions", completion=True)
    capture = record.get("captureData")
    if isinstance(capture, dict):
        try:
            request = _capture_payload(capture.get("endpointInput"))
            response = _capture_payload(capture.get("endpointOutput"))
        except (ValueError, UnicodeDecodeError):
            return "data capture with undecodable data"
        if isinstance(request, dict) and isinstance(request.get("inputs"), str):  # LMI / TGI request
            request = {"prompt": request["inputs"]}
        inner = detect(request)
        if isinstance(inner, str):
            return f"data capture whose input is {inner}"
        reply = _capture_reply(response)
        turns = inner.prompt_turns + ((("assistant", reply),) if reply else ())
        return Conversation(turns, "sagemaker_capture", completion=inner.completion)
    return "no conversations, messages, prompt or captureData key"


class _Reader:
    """Lines of each data file, with the file's provenance recorded as it is read."""

    def __init__(self, settings: S3Settings | None, source: str, data_type: str) -> None:
        self.reader = ObjectReader(settings)
        self.source = source
        self.data_type = data_type

    def objects(self) -> list[dict[str, Any]]:
        if self.data_type == "ManifestFile":
            return self._manifest()
        listed = [o for o in self.reader.list_objects(self.source) if str(o["uri"]).endswith((".jsonl", ".json"))]
        if not listed:
            raise InputError(
                f"TrainingDataSource.S3Uri {self.source} (S3Prefix) holds no .jsonl files. Upload JSONL "
                "conversations (ShareGPT, OpenAI chat or completions, or endpoint data capture) under it, or leave "
                "TrainingDataSource out to train on the built-in prompts"
            )
        return sorted(listed, key=lambda o: str(o["uri"]))

    def _manifest(self) -> list[dict[str, Any]]:
        where = f"TrainingDataSource.S3Uri {self.source} (ManifestFile)"
        try:
            entries = json.loads(self.reader.read_text(self.source))
        except ValueError as exc:
            raise InputError(f"{where} is not JSON: {exc}") from None
        if not (isinstance(entries, list) and entries and isinstance(entries[0], dict) and "prefix" in entries[0]):
            raise InputError(
                f'{where} must be a JSON array whose first element is {{"prefix": "s3://bucket/prefix/"}} followed by '
                "keys relative to it (SageMaker's manifest format)"
            )
        prefix = parse_s3_uri(str(entries[0]["prefix"]))
        keys = [entry for entry in entries[1:] if isinstance(entry, str)]
        if not keys:
            raise InputError(f"{where} lists no files after its prefix entry")
        return [self.reader.head(prefix.child(key).uri) for key in keys]

    def lines(self, obj: dict[str, Any]) -> Iterator[str]:
        text = self.reader.read_text(str(obj["uri"]))
        yield from text.splitlines()


def _builtin_lines() -> Iterator[str]:
    with resources.files("optjob.data.speculative").joinpath(BUILTIN_PROMPTS).open(encoding="utf-8") as handle:
        yield from handle


def read_training_data(
    source: str | None, data_type: str | None, *, max_samples: int, settings: S3Settings | None = None
) -> TrainingData:
    """Conversations from the TrainingDataSource (or the built-in prompts), at most ``max_samples``."""
    if source is None:
        data = TrainingData([], "built-in prompts (optjob/data/speculative/prompts.jsonl)")
        _parse(data, "builtin:" + BUILTIN_PROMPTS, _builtin_lines(), max_samples)
        return data
    reader = _Reader(settings, source, data_type or "S3Prefix")
    data = TrainingData([], source)
    first_bad: str | None = None
    for obj in reader.objects():
        if len(data.conversations) >= max_samples:
            data.capped = True
            break
        before = len(data.conversations)
        try:
            bad = _parse(data, str(obj["uri"]), reader.lines(obj), max_samples)
        except UnicodeDecodeError:
            bad = f"{obj['uri']} line 1 (not UTF-8 text)"
            data.skipped["file not UTF-8 text"] += 1
        first_bad = first_bad or bad
        data.files.append({**obj, "conversations": len(data.conversations) - before})
    if not data.conversations:
        raise InputError(
            f"TrainingDataSource {source} holds no usable conversation"
            + (f"; the first unusable line is {first_bad}" if first_bad else "")
            + ". Each line must be a JSON object in ShareGPT ('conversations'), OpenAI chat ('messages'), OpenAI "
            "completions ('prompt'/'completion') or SageMaker data-capture ('captureData') form"
        )
    return data


def _parse(data: TrainingData, origin: str, lines: Iterator[str], max_samples: int) -> str | None:
    """Add one file's conversations; returns where its first unusable line is (for the FailureReason)."""
    first_bad = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        data.lines += 1
        try:
            found = detect(json.loads(line))
        except ValueError:
            found = "not JSON"
        if isinstance(found, str):
            data.skipped[found] += 1
            first_bad = first_bad or f"{origin} line {number} ({found})"
            continue
        if len(data.conversations) >= max_samples:
            data.capped = True
            break
        data.formats[found.format] += 1
        data.conversations.append(found)
    return first_bad
