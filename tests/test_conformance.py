"""Our API shapes carry exactly the installed botocore model's members and constraints.

A botocore upgrade that adds a member, an instance type or changes a bound fails here instead of
drifting silently.
"""

from __future__ import annotations

import types
import typing
from typing import Annotated, Any, get_args, get_origin

import pytest

from optjob.api import shapes
from optjob.api.constraints import BoolRule, EnumRule, IntRule, ListRule, MapRule, StrRule, TimestampRule
from tests.support.botocore_model import operation_shapes, reachable_shapes, shape

SHAPE_CLASSES = {
    cls.__shape__: cls
    for cls in vars(shapes).values()
    if isinstance(cls, type) and issubclass(cls, shapes.Shape) and "__shape__" in cls.__dict__
}


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        assert len(args) == 1
        return args[0]
    return annotation


def _split(annotation: Any) -> tuple[Any, list[Any]]:
    annotation = _strip_optional(annotation)
    if get_origin(annotation) is Annotated:
        base, *meta = get_args(annotation)
        return base, meta
    return annotation, []


def _check_scalar_rule(rule: Any, botocore_name: str, where: str) -> None:
    s = shape(botocore_name)
    assert rule.shape == botocore_name, f"{where}: marker names {rule.shape}, botocore says {botocore_name}"
    kind = s["type"]
    if "enum" in s:
        assert isinstance(rule, EnumRule), where
        assert list(rule.values) == s["enum"], f"{where}: enum differs"
    elif kind == "string":
        assert isinstance(rule, StrRule), where
        assert (rule.min, rule.max, rule.pattern) == (s.get("min"), s.get("max"), s.get("pattern")), where
    elif kind == "integer":
        assert isinstance(rule, IntRule), where
        assert (rule.min, rule.max) == (s.get("min"), s.get("max")), where
    elif kind == "boolean":
        assert isinstance(rule, BoolRule), where
    elif kind == "timestamp":
        assert isinstance(rule, TimestampRule), where
    else:
        raise AssertionError(f"{where}: unexpected scalar kind {kind}")


def _check_member(annotation: Any, botocore_name: str, where: str, visited: set[str]) -> None:
    base, meta = _split(annotation)
    s = shape(botocore_name)
    if s["type"] == "structure":
        assert isinstance(base, type) and issubclass(base, shapes.Shape), (
            f"{where}: expected a structure model"
        )
        assert base.__shape__ == botocore_name, f"{where}: {base.__shape__} != {botocore_name}"
        check_structure(base, visited)
        return
    assert len(meta) == 1, f"{where}: expected exactly one constraint marker, got {meta}"
    rule = meta[0]
    if s["type"] == "list":
        assert isinstance(rule, ListRule) and rule.shape == botocore_name, where
        assert (rule.min, rule.max) == (s.get("min"), s.get("max")), f"{where}: list bounds differ"
        (item,) = get_args(base)
        _check_member(item, s["member"]["shape"], f"{where}[]", visited)
    elif s["type"] == "map":
        assert isinstance(rule, MapRule) and rule.shape == botocore_name, where
        assert (rule.min, rule.max) == (s.get("min"), s.get("max")), f"{where}: map bounds differ"
        _check_scalar_rule(rule.key, s["key"]["shape"], f"{where}.key")
        _check_scalar_rule(rule.value, s["value"]["shape"], f"{where}.value")
    else:
        _check_scalar_rule(rule, botocore_name, where)


def check_structure(cls: type[shapes.Shape], visited: set[str]) -> None:
    name = cls.__shape__
    if name in visited:
        return
    visited.add(name)
    s = shape(name)
    fields = {field.alias: field for field in cls.model_fields.values()}
    assert set(fields) == set(s["members"]), (
        f"{name}: members differ: ours {sorted(fields)} vs {sorted(s['members'])}"
    )
    required = {alias for alias, field in fields.items() if field.is_required()}
    assert required == set(s.get("required", [])), f"{name}: required differs"
    assert cls.__union__ == bool(s.get("union")), f"{name}: union flag differs"
    for alias, field in fields.items():
        _check_member(
            field.annotation if not field.metadata else Annotated[(field.annotation, *field.metadata)],
            s["members"][alias]["shape"],
            f"{name}.{alias}",
            visited,
        )


def test_every_operation_is_modelled_with_its_shapes() -> None:
    for operation, (inp, out, errors) in operation_shapes().items():
        request, response = shapes.OPERATIONS[operation]
        assert request.__shape__ == inp
        assert (response.__shape__ if response else None) == out
        for error in errors:
            assert error in SHAPE_CLASSES, f"{operation}: error shape {error} not modelled"


def test_every_reachable_shape_is_covered_member_by_member() -> None:
    visited: set[str] = set()
    for request, response in shapes.OPERATIONS.values():
        check_structure(request, visited)
        if response:
            check_structure(response, visited)
    for error in shapes.ERROR_SHAPES:
        check_structure(error, visited)
    reachable_structures = {n for n in reachable_shapes() if shape(n)["type"] == "structure"}
    assert visited == reachable_structures


def test_instance_enum_has_55_values_matching_botocore() -> None:
    enum = shape("OptimizationJobDeploymentInstanceType")["enum"]
    assert len(enum) == 55
    assert list(shapes.INSTANCE_TYPES) == enum


@pytest.mark.parametrize("name", sorted(SHAPE_CLASSES))
def test_shape_classes_reject_unknown_members(name: str) -> None:
    cls = SHAPE_CLASSES[name]
    assert cls.model_config["extra"] == "forbid"
