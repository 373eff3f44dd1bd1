"""Generated requests: our validator accepts exactly what the botocore model's constraints allow.

Valid requests are generated from the installed botocore model; invalid ones by one mutation at
a random path (a required member removed, a bound crossed, a pattern broken, an unknown member,
a union element with zero or two members, a bad enum). The judge is ``oracle_valid``, an
interpreter of the botocore model independent of optjob's code, so a mutation that happens to
stay valid is judged valid.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optjob.api.errors import ApiError, parse
from optjob.api.shapes import OPERATIONS
from tests.support.botocore_model import operation_shapes, oracle_valid, shape

# Patterns hypothesis cannot generate from directly (Unicode property classes, look-ahead), mapped
# to a regex that generates a subset of the same language.
_GENERATION_PATTERNS = {
    r"([\p{L}\p{Z}\p{N}_.:/=+\-@]*)": r"[a-zA-Z0-9 _.:/=+\-@]*",
    r"(?!\s*$).+": r"[A-Za-z_][A-Za-z0-9_]*",
}


def _string(s: dict[str, Any]) -> st.SearchStrategy[str]:
    if "enum" in s:
        return st.sampled_from(s["enum"])
    lo, hi = s.get("min", 0), min(s.get("max", 40), 80)
    if "pattern" in s:
        pattern = _GENERATION_PATTERNS.get(s["pattern"], s["pattern"])
        return st.from_regex(pattern, fullmatch=True).filter(lambda v: lo <= len(v) <= s.get("max", 10**9))
    return st.text(min_size=lo, max_size=hi)


@st.composite
def valid_value(draw: st.DrawFn, shape_name: str, depth: int = 0) -> Any:
    s = shape(shape_name)
    kind = s["type"]
    if kind == "structure":
        members = s["members"]
        required = set(s.get("required", []))
        if s.get("union"):
            chosen = [draw(st.sampled_from(sorted(members)))]
        else:
            chosen = [m for m in sorted(members) if m in required or draw(st.booleans())]
        return {m: draw(valid_value(members[m]["shape"], depth + 1)) for m in chosen}
    if kind == "list":
        lo, hi = s.get("min", 0), min(s.get("max", 3), 3)
        return draw(st.lists(valid_value(s["member"]["shape"], depth + 1), min_size=lo, max_size=max(lo, hi)))
    if kind == "map":
        keys = st.from_regex(r"OPTION_[A-Z_]{1,20}", fullmatch=True)
        return draw(
            st.dictionaries(keys, _string(shape(s["value"]["shape"])), max_size=min(s.get("max", 3), 3))
        )
    if kind == "string":
        return draw(_string(s))
    if kind == "integer":
        return draw(st.integers(s.get("min", 0), s.get("max", 10**7)))
    if kind == "boolean":
        return draw(st.booleans())
    if kind == "timestamp":
        return draw(st.integers(1_500_000_000, 2_000_000_000))
    raise AssertionError(kind)


def _paths(value: Any, shape_name: str, prefix: tuple = ()) -> list[tuple[tuple, str]]:
    """Every (path, shape) inside a generated value, the root included."""
    found = [(prefix, shape_name)]
    s = shape(shape_name)
    if s["type"] == "structure" and isinstance(value, dict):
        for key, sub in value.items():
            found += _paths(sub, s["members"][key]["shape"], (*prefix, key))
    elif s["type"] == "list" and isinstance(value, list):
        for index, sub in enumerate(value):
            found += _paths(sub, s["member"]["shape"], (*prefix, index))
    return found


def _mutations(s: dict[str, Any], value: Any) -> list[Any]:
    """Candidate replacements for a value of shape ``s``; some invalid, some accidentally valid."""
    kind = s["type"]
    out: list[Any] = []
    if kind == "structure":
        for req in s.get("required", []):
            out.append({k: v for k, v in value.items() if k != req})
        out.append({**value, "NotAMember": "x"})
        if s.get("union"):
            out.append({})
            members = sorted(s["members"])
            out.append({members[0]: {}, members[1]: {}})
    elif kind == "string" and "enum" in s:
        out += [value + "x", value.lower() if value.lower() != value else value + "Y"]
    elif kind == "string":
        if "max" in s:
            out.append("a" * (s["max"] + 1))
        if s.get("min", 0) > 0:
            out.append("")
        out += ["bad value!", "-leading-dash", "has space", "arn:aws:iam::12:role/x"]
    elif kind == "integer":
        if "min" in s:
            out.append(s["min"] - 1)
        if "max" in s:
            out.append(s["max"] + 1)
    elif kind == "list":
        if "max" in s:
            out.append(value + value[:1] * (s["max"] + 1 - len(value)) if value else value)
        if s.get("min", 0) > 0:
            out.append([])
    elif kind == "map":
        out += [{" ": "v"}, {"K": "v" * 257}, {f"K{i}": "v" for i in range(26)}]
    return out


def _set(root: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    root = copy.deepcopy(root)
    cursor = root
    for step in path[:-1]:
        cursor = cursor[step]
    cursor[path[-1]] = new
    return root


@st.composite
def mutated(draw: st.DrawFn, shape_name: str) -> Any:
    value = draw(valid_value(shape_name))
    candidates = [(p, s) for p, s in _paths(value, shape_name) if _mutations(shape(s), _get(value, p))]
    path, sub_shape = draw(st.sampled_from(candidates))
    replacement = draw(st.sampled_from(_mutations(shape(sub_shape), _get(value, path))))
    return _set(value, path, replacement)


def _get(root: Any, path: tuple) -> Any:
    for step in path:
        root = root[step]
    return root


def _ours_accepts(model: type, data: Any) -> bool:
    try:
        parse(model, data)
    except ApiError:
        return False
    return True


INPUTS = [(op, OPERATIONS[op][0], inp) for op, (inp, _, _) in operation_shapes().items()]
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(("operation", "model", "shape_name"), INPUTS, ids=[i[0] for i in INPUTS])
@PROPERTY
@given(data=st.data())
def test_generated_valid_requests_are_accepted(
    operation: str, model: type, shape_name: str, data: st.DataObject
) -> None:
    value = data.draw(valid_value(shape_name))
    assert oracle_valid(shape_name, value), "generator produced an invalid value"
    assert _ours_accepts(model, value), f"{operation} rejected a valid request: {value}"


@pytest.mark.parametrize(("operation", "model", "shape_name"), INPUTS, ids=[i[0] for i in INPUTS])
@PROPERTY
@given(data=st.data())
def test_mutated_requests_are_judged_like_the_botocore_model(
    operation: str, model: type, shape_name: str, data: st.DataObject
) -> None:
    value = data.draw(mutated(shape_name))
    assert _ours_accepts(model, value) == oracle_valid(shape_name, value), value


@PROPERTY
@given(data=st.data())
def test_describe_response_round_trips(data: st.DataObject) -> None:
    from optjob.api.shapes import DescribeOptimizationJobResponse

    value = data.draw(valid_value("DescribeOptimizationJobResponse"))
    parsed = parse(DescribeOptimizationJobResponse, value)
    assert parse(DescribeOptimizationJobResponse, parsed.dump()) == parsed
