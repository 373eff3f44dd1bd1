"""The installed botocore's SageMaker model, read independently of optjob's shapes.

Two test suites use it: the conformance test compares our pydantic models with it member by
member, and the property test uses ``oracle_valid`` — a small interpreter of the model's
constraints written without optjob code — as the judge of which requests are valid.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import regex
from botocore.loaders import Loader

OPERATIONS = (
    "CreateOptimizationJob",
    "DescribeOptimizationJob",
    "ListOptimizationJobs",
    "StopOptimizationJob",
    "DeleteOptimizationJob",
)


@cache
def service_model() -> dict[str, Any]:
    return Loader().load_service_model("sagemaker", "service-2")


def shape(name: str) -> dict[str, Any]:
    return service_model()["shapes"][name]


def operation_shapes() -> dict[str, tuple[str, str | None, list[str]]]:
    """Operation -> (input shape, output shape or None, error shapes)."""
    ops = service_model()["operations"]
    return {
        op: (
            ops[op]["input"]["shape"],
            ops[op].get("output", {}).get("shape"),
            [e["shape"] for e in ops[op].get("errors", [])],
        )
        for op in OPERATIONS
    }


def reachable_shapes() -> set[str]:
    """Every shape reachable from the five operations' inputs, outputs and errors."""
    todo = []
    for inp, out, errors in operation_shapes().values():
        todo += [inp, *errors] + ([out] if out else [])
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        s = shape(name)
        if s["type"] == "structure":
            todo += [m["shape"] for m in s["members"].values()]
        elif s["type"] == "list":
            todo.append(s["member"]["shape"])
        elif s["type"] == "map":
            todo += [s["key"]["shape"], s["value"]["shape"]]
    return seen


def oracle_valid(shape_name: str, value: Any) -> bool:
    """Whether ``value`` satisfies ``shape_name`` exactly as the botocore model states it."""
    s = shape(shape_name)
    kind = s["type"]
    if kind == "structure":
        if not isinstance(value, dict):
            return False
        members = s["members"]
        if any(key not in members for key in value):
            return False
        if any(value.get(req) is None for req in s.get("required", [])):
            return False
        present = [k for k, v in value.items() if v is not None]
        if s.get("union") and len(present) != 1:
            return False
        return all(oracle_valid(members[k]["shape"], value[k]) for k in present)
    if kind == "list":
        if not isinstance(value, list):
            return False
        if not s.get("min", 0) <= len(value) <= s.get("max", 10**9):
            return False
        return all(item is not None and oracle_valid(s["member"]["shape"], item) for item in value)
    if kind == "map":
        if not isinstance(value, dict):
            return False
        if not s.get("min", 0) <= len(value) <= s.get("max", 10**9):
            return False
        return all(
            oracle_valid(s["key"]["shape"], k) and v is not None and oracle_valid(s["value"]["shape"], v)
            for k, v in value.items()
        )
    if kind == "string":
        if not isinstance(value, str):
            return False
        if "enum" in s:
            return value in s["enum"]
        if not s.get("min", 0) <= len(value) <= s.get("max", 10**9):
            return False
        return "pattern" not in s or regex.fullmatch(s["pattern"], value) is not None
    if kind == "integer":
        if not isinstance(value, int) or isinstance(value, bool):
            return False
        return s.get("min", -(10**18)) <= value <= s.get("max", 10**18)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "timestamp":
        return isinstance(value, int | float) and not isinstance(value, bool)
    raise AssertionError(f"shape type {kind} not handled by the oracle")
