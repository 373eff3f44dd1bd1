"""JSON that a model brings (config.json, its index, safetensors headers), parsed so no file can hurt.

Python's ``json`` recurses once per nesting level and converts integers of any length, so a
hostile file can raise RecursionError or ValueError from deep inside a parser that was only
meant to read a table; unchecked, those end as "internal error ... this is a bug". Here every
such file is parsed in one place, bounded by ``configs/limits.yaml`` (``model.max_json_depth``),
and anything that is not acceptable JSON is an InputError naming the file.
"""

from __future__ import annotations

import json
from typing import Any

from optjob.errors import InputError
from optjob.limits import json_deeper_than, limits


def load_untrusted_json(raw: str | bytes, *, what: str, fix: str) -> Any:
    """``raw`` as JSON, or InputError: ``{what} is not valid JSON (why). {fix}``."""
    depth = limits().model.max_json_depth
    try:
        data = json.loads(raw)
    except RecursionError:
        raise InputError(f"{what} nests JSON deeper than {depth} levels. {fix}") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, an integer of over 4300 digits
        why = "an integer has more than 4300 digits" if "integer string conversion" in str(exc) else str(exc)
        raise InputError(f"{what} is not valid JSON ({why[:200]}). {fix}") from None
    if json_deeper_than(data, depth):
        raise InputError(f"{what} nests JSON deeper than {depth} levels. {fix}")
    return data
