"""Constraint markers that carry botocore's shape rules onto pydantic fields.

Each marker names the botocore shape it mirrors and holds that shape's bounds, so one object
does three jobs: it validates (raising errors whose text is SageMaker's ``Member must ...``
wording), it documents, and the conformance test reads it back to compare member by member
with the installed botocore model. pydantic's built-in ``min_length``/``pattern`` are not used
because their messages differ from SageMaker's and because botocore's patterns need the
``regex`` engine (``\\p{L}`` classes, look-ahead) with full-match semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import regex
from pydantic import GetCoreSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

ERROR_TYPE = "sagemaker_constraint"


def constraint_error(message: str, value: Any = None) -> PydanticCustomError:
    """An error pydantic collects like its own, whose text is SageMaker's constraint wording."""
    return PydanticCustomError(ERROR_TYPE, "{constraint}", {"constraint": message})


@dataclass(frozen=True)
class StrRule:
    """A botocore ``string`` shape: length bounds and a pattern matched against the whole value."""

    shape: str
    min: int | None = None
    max: int | None = None
    pattern: str | None = None

    def problems(self, value: str) -> list[str]:
        found = []
        if self.min is not None and len(value) < self.min:
            found.append(f"Member must have length greater than or equal to {self.min}")
        if self.max is not None and len(value) > self.max:
            found.append(f"Member must have length less than or equal to {self.max}")
        if self.pattern is not None and _compiled(self.pattern).fullmatch(value) is None:
            found.append(f"Member must satisfy regular expression pattern: {self.pattern}")
        return found

    def _check(self, value: str) -> str:
        found = self.problems(value)
        if found:
            raise constraint_error(found[0])
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler):
        return core_schema.no_info_after_validator_function(self._check, core_schema.str_schema(strict=True))


@dataclass(frozen=True)
class EnumRule:
    """A botocore ``string`` shape with an ``enum``; the error lists every allowed value."""

    shape: str
    values: tuple[str, ...]

    def _check(self, value: str) -> str:
        if value not in self.values:
            raise constraint_error("Member must satisfy enum value set: [" + ", ".join(self.values) + "]")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler):
        return core_schema.no_info_after_validator_function(self._check, core_schema.str_schema(strict=True))


@dataclass(frozen=True)
class IntRule:
    """A botocore ``integer`` shape with an inclusive range."""

    shape: str
    min: int | None = None
    max: int | None = None

    def _check(self, value: int) -> int:
        if self.min is not None and value < self.min:
            raise constraint_error(f"Member must have value greater than or equal to {self.min}")
        if self.max is not None and value > self.max:
            raise constraint_error(f"Member must have value less than or equal to {self.max}")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler):
        return core_schema.no_info_after_validator_function(self._check, core_schema.int_schema(strict=True))


@dataclass(frozen=True)
class BoolRule:
    """A botocore ``boolean`` shape: JSON true/false only, never the string "true"."""

    shape: str

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler):
        return core_schema.bool_schema(strict=True)


@dataclass(frozen=True)
class ListRule:
    """A botocore ``list`` shape: the size bounds; the member type is the annotation's item type."""

    shape: str
    min: int | None = None
    max: int | None = None

    def _check(self, value: list) -> list:
        if self.min is not None and len(value) < self.min:
            raise constraint_error(f"Member must have length greater than or equal to {self.min}")
        if self.max is not None and len(value) > self.max:
            raise constraint_error(f"Member must have length less than or equal to {self.max}")
        return value

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler):
        return core_schema.no_info_after_validator_function(self._check, handler(source))


@dataclass(frozen=True)
class MapRule:
    """A botocore ``map`` of string to string, checked whole so errors read like SageMaker's.

    SageMaker reports a bad key or value against the map itself ("Map value must satisfy
    constraint: [...]"), not against a synthetic per-key path, so the map validates itself.
    """

    shape: str
    key: StrRule
    value: StrRule
    min: int | None = None
    max: int | None = None

    def _check(self, mapping: Any) -> dict[str, str]:
        if not isinstance(mapping, dict):
            raise constraint_error("Member must be a map of string to string")
        if self.min is not None and len(mapping) < self.min:
            raise constraint_error(f"Member must have length greater than or equal to {self.min}")
        if self.max is not None and len(mapping) > self.max:
            raise constraint_error(f"Member must have length less than or equal to {self.max}")
        for k, v in mapping.items():
            if not isinstance(v, str):
                raise constraint_error(
                    "Map value must satisfy constraint: [Member must be a string]"
                    if v is not None
                    else "Map value must satisfy constraint: [Member must not be null]"
                )
            key_problems = self.key.problems(k)
            if key_problems:
                raise constraint_error("Map key must satisfy constraint: [" + ", ".join(key_problems) + "]")
            value_problems = self.value.problems(v)
            if value_problems:
                raise constraint_error("Map value must satisfy constraint: [" + ", ".join(value_problems) + "]")
        return dict(mapping)

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler):
        return core_schema.no_info_plain_validator_function(self._check)


@dataclass(frozen=True)
class TimestampRule:
    """A botocore ``timestamp``: epoch seconds (int or float) or ISO-8601 in; epoch seconds out.

    The JSON protocol's default timestamp format is ``unixtimestamp``; botocore sends ints or
    floats and parses floats, so responses carry fractional epoch seconds as SageMaker does.
    """

    shape: str

    def _parse(self, value: Any) -> datetime:
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        if isinstance(value, bool):
            raise constraint_error("Member must be a timestamp (epoch seconds)")
        if isinstance(value, int | float):
            return _from_epoch(value)
        if isinstance(value, str):
            try:
                seconds = float(value)
            except ValueError:
                pass
            else:
                return _from_epoch(seconds)
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError as exc:
                raise constraint_error("Member must be a timestamp (epoch seconds)") from exc
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        raise constraint_error("Member must be a timestamp (epoch seconds)")

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler):
        return core_schema.no_info_plain_validator_function(
            self._parse,
            serialization=core_schema.plain_serializer_function_ser_schema(to_epoch, when_used="json-unless-none"),
        )


def _from_epoch(seconds: float) -> datetime:
    """Epoch seconds as an aware datetime; one outside what a datetime holds (1e300, -1e18, NaN) is a
    constraint violation naming the range, not an overflow."""
    try:
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (OverflowError, OSError, ValueError):
        raise constraint_error("Member must be a timestamp (epoch seconds) between 0001-01-01 and 9999-12-31") from None


def to_epoch(moment: datetime) -> float:
    """Epoch seconds with millisecond precision, the form SageMaker returns."""
    return round(moment.timestamp(), 3)


_PATTERNS: dict[str, regex.Pattern] = {}


def _compiled(pattern: str) -> regex.Pattern:
    compiled = _PATTERNS.get(pattern)
    if compiled is None:
        compiled = _PATTERNS[pattern] = regex.compile(pattern)
    return compiled


def fullmatch(pattern: str, value: str) -> bool:
    """Whether ``value`` matches botocore ``pattern`` end to end (botocore >= 1.41 drops anchors)."""
    return _compiled(pattern).fullmatch(value) is not None
