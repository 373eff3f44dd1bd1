"""Conversations to token ids the way the target will see them when it serves.

A tokenizer with a chat template renders the prompt turns with ``add_generation_prompt=True``; the
reply's ids are what the full conversation adds after the longest common prefix with the prompt
(BPE may merge the generation prompt's last characters with the reply, so the boundary is found, not
assumed). A base model without a chat template is rendered as plain text, which is how such models
are prompted in practice:

* a completions record (``prompt``/``completion``) is the prompt text followed directly by the completion;
* a dialogue is ``"<Role>: <text>"`` per turn (System, User, Assistant) separated by blank lines, and the
  prompt ends with ``"Assistant:"``, so the reply starts after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optjob.techniques.speculative.data import Conversation

_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}


@dataclass(frozen=True)
class Rendered:
    """One conversation as ids: the prompt, and the dataset's own reply (None when it has none)."""

    prompt: list[int]
    reply: list[int] | None
    truncated: bool = False


def _ids(value: Any) -> list[int]:
    if isinstance(value, dict) or hasattr(value, "keys"):
        value = value["input_ids"]
    if value and isinstance(value[0], list):
        value = value[0]
    return [int(v) for v in value]


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _plain(turns: tuple[tuple[str, str], ...]) -> str:
    return "".join(f"{_LABELS[role]}: {text}\n\n" for role, text in turns)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def render(conversation: Conversation, tokenizer: Any, *, max_len: int) -> Rendered | None:
    """Prompt and reply ids within ``max_len`` tokens in all; None when the prompt alone leaves no room."""
    prompt_turns = conversation.prompt_turns
    reply = conversation.reply
    if has_chat_template(tokenizer):
        messages = [{"role": role, "content": text} for role, text in prompt_turns]
        prompt = _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))
        full = None
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
            full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
    elif conversation.completion:
        prompt_text = prompt_turns[-1][1] if prompt_turns else ""
        prompt = _ids(tokenizer(prompt_text))
        full = _ids(tokenizer(prompt_text + reply)) if reply is not None else None
    else:
        prompt_text = _plain(prompt_turns) + "Assistant:"
        prompt = _ids(tokenizer(prompt_text))
        full = _ids(tokenizer(prompt_text + " " + reply)) if reply is not None else None
    reply_ids = None
    if full is not None:
        cut = _common_prefix(prompt, full)
        prompt, reply_ids = full[:cut], full[cut:]
    if len(prompt) >= max_len - 1:  # keep the prompt's end: that is what the reply continues
        return None
    truncated = reply_ids is not None and len(prompt) + len(reply_ids) > max_len
    if reply_ids is not None:
        reply_ids = reply_ids[: max_len - len(prompt)]
    return Rendered(prompt, reply_ids, truncated)
