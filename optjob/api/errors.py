"""SageMaker's API errors, with the codes botocore maps to exceptions and SageMaker's message format.

Every transport (CLI, HTTP server, worker) raises and renders these the same way:
``{"__type": code, "message": text}`` on the wire, ``code: text`` on a terminal. The validation
message reproduces SageMaker's: ``2 validation errors detected: Value 'x' at 'modelSource.s3.s3Uri'
failed to satisfy constraint: Member must ...; Value null at ...``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from optjob.api.constraints import ERROR_TYPE
from optjob.limits import json_deeper_than, limits

ShapeT = TypeVar("ShapeT", bound=BaseModel)


class ApiError(Exception):
    """An error the API returns to the caller (HTTP 400 unless stated)."""

    code: str = "InternalFailure"
    http_status: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, str]:
        return {"__type": self.code, "message": self.message}

    def __str__(self) -> str:
        return self.message


class ValidationException(ApiError):
    code = "ValidationException"


class ResourceInUse(ApiError):
    code = "ResourceInUse"


class ResourceLimitExceeded(ApiError):
    code = "ResourceLimitExceeded"


class ResourceNotFound(ApiError):
    code = "ResourceNotFound"


class SerializationException(ApiError):
    code = "SerializationException"


class UnknownOperationException(ApiError):
    code = "UnknownOperationException"


class InternalFailure(ApiError):
    code = "InternalFailure"
    http_status = 500


def validation_message(violations: Sequence[str]) -> str:
    """SageMaker's header plus the violations joined by ``; ``: at most ``max_listed_violations`` of
    them, so a request of many bad members cannot make an error larger than itself."""
    count = len(violations)
    noun = "error" if count == 1 else "errors"
    shown = limits().api.max_listed_violations
    text = f"{count} validation {noun} detected: " + "; ".join(violations[:shown])
    return text + (f"; and {count - shown} more" if count > shown else "")


def violation(value: Any, path: str, constraint: str) -> str:
    return f"Value {render_value(value)} at '{path}' failed to satisfy constraint: {constraint}"


def render_value(value: Any) -> str:
    """How SageMaker prints the offending value: ``null`` bare, everything else in quotes."""
    if value is None:
        return "null"
    return f"'{truncate(_java_like(value))}'"


def truncate(text: str, limit: int | None = None) -> str:
    """``text`` cut to the configured echo length with ``...``: an error repeats enough of a value to
    recognise it, never the whole of a large one."""
    limit = limit or limits().api.max_echoed_value_chars
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _java_like(value: Any, depth: int = 0) -> str:
    if depth > limits().api.max_json_depth:
        return "..."
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_java_like(v, depth + 1)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_java_like(v, depth + 1) for v in value) + "]"
    if isinstance(value, BaseModel):
        return _java_like(value.model_dump(by_alias=True, exclude_none=True), depth + 1)
    return str(value)


def camel_path(loc: Iterable[str | int]) -> str:
    """pydantic's location to SageMaker's: camelCase members, list items as ``N.member`` (1-based)."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"{item + 1}.member")
        else:
            parts.append(item[:1].lower() + item[1:])
    return ".".join(parts)


_BUILTIN_MESSAGES = {
    "missing": "Member must not be null",
    "string_type": "Member must be a string",
    "int_type": "Member must be an integer",
    "int_from_float": "Member must be an integer",
    "bool_type": "Member must be a boolean",
    "list_type": "Member must be a list",
    "dict_type": "Member must be a structure (a JSON object)",
    "model_type": "Member must be a structure (a JSON object)",
    "model_attributes_type": "Member must be a structure (a JSON object)",
}


def _constraint_text(error: dict[str, Any], model: type[BaseModel]) -> str:
    kind = error["type"]
    if kind == ERROR_TYPE:
        return error["ctx"]["constraint"]
    if kind == "extra_forbidden":
        return "Member is not a recognized member of this structure (names are case-sensitive)"
    if kind in _BUILTIN_MESSAGES:
        return _BUILTIN_MESSAGES[kind]
    return f"Member {error['msg'][:1].lower()}{error['msg'][1:]}"


def from_pydantic(exc: ValidationError, model: type[BaseModel]) -> ValidationException:
    """Turn every pydantic error into one SageMaker violation, in request order."""
    violations = []
    for error in exc.errors(include_url=False):
        value = None if error["type"] == "missing" else error.get("input")
        violations.append(violation(value, camel_path(error["loc"]), _constraint_text(error, model)))
    return ValidationException(validation_message(violations))


def parse(model: type[ShapeT], data: Any) -> ShapeT:
    """Validate wire data (a dict from JSON) into ``model``, raising SageMaker's ValidationException."""
    if not isinstance(data, dict):
        raise SerializationException(f"Expected a JSON object for {model.__name__}, got {type(data).__name__}")
    if json_deeper_than(data, limits().api.max_json_depth):
        raise SerializationException(_too_deep())
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_pydantic(exc, model) from None


def load_json(body: str | bytes) -> Any:
    """A request body as JSON data, or a SerializationException that says what is wrong with it.

    Strict JSON only (no ``NaN``/``Infinity``), nesting at most ``max_json_depth`` deep, integers
    within Python's digit limit: what is not a request never reaches validation, so no input can
    make it recurse without bound or raise something other than an ApiError."""
    try:
        data = json.loads(body or b"{}", parse_constant=_refuse_constant)
    except RecursionError:
        raise SerializationException(_too_deep()) from None
    except UnicodeDecodeError as exc:
        raise SerializationException(f"Request body is not valid JSON: {truncate(str(exc))}") from None
    except ValueError as exc:  # JSONDecodeError, a NaN, or an integer past Python's digit limit
        why = "an integer has more than 4300 digits" if "integer string conversion" in str(exc) else str(exc)
        raise SerializationException(f"Request body is not valid JSON: {truncate(why)}") from None
    if json_deeper_than(data, limits().api.max_json_depth):
        raise SerializationException(_too_deep())
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _too_deep() -> str:
    return f"Request body nests JSON deeper than {limits().api.max_json_depth} levels; no SageMaker shape does"
