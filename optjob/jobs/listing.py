"""ListOptimizationJobs: filters, sorting and an opaque NextToken, as SQL over the store.

Pagination is keyset, not offset: the token holds the sort value and name of the last job
returned, and the next page starts strictly after that pair. Names are unique, so (sort value,
name) is a total order; a job created while a caller pages through is either before the cursor
(not shown) or after it (shown once), and nothing already listed repeats or is skipped. The
token also carries a fingerprint of the filters and sort; reusing it with different ones is a
ValidationException, as SageMaker rejects a token from another request. MaxResults may change
between pages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Any

from optjob.api.errors import ValidationException
from optjob.api.shapes import ListOptimizationJobsRequest
from optjob.jobs.store import JobRecord, Store

DEFAULT_MAX_RESULTS = 50
DEFAULT_SORT_BY = "CreationTime"
DEFAULT_SORT_ORDER = "Ascending"  # the API reference's documented default
_SORT_COLUMNS = {"Name": "name", "CreationTime": "creation_time", "Status": "status"}


def list_jobs(
    store: Store, request: ListOptimizationJobsRequest, tenant: tuple[str, str]
) -> tuple[list[JobRecord], str | None]:
    """One page of the tenant's (account, region) jobs and the token for the next page (None on the
    last page). The tenant is part of the token's fingerprint: another account's token is invalid."""
    column = _SORT_COLUMNS[request.sort_by or DEFAULT_SORT_BY]
    descending = (request.sort_order or DEFAULT_SORT_ORDER) == "Descending"
    limit = request.max_results or DEFAULT_MAX_RESULTS
    fingerprint = _fingerprint(request, tenant)

    where, params = _filters(request)
    if request.next_token:
        last_value, last_name = _decode_token(request.next_token, fingerprint)
        op = "<" if descending else ">"
        if column == "name":
            where.append(f"name {op} ?")
            params.append(last_name)
        else:
            where.append(f"({column} {op} ? OR ({column} = ? AND name {op} ?))")
            params.extend([last_value, last_value, last_name])

    direction = "DESC" if descending else "ASC"
    order_by = f"{column} {direction}" + ("" if column == "name" else f", name {direction}")
    rows = store.select(tenant, " AND ".join(where), params, order_by, limit + 1)
    if len(rows) <= limit:
        return rows, None
    page = rows[:limit]
    last = page[-1]
    return page, _encode_token(getattr(last, column), last.name, fingerprint)


def _filters(request: ListOptimizationJobsRequest) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for moment, clause in (
        (request.creation_time_after, "creation_time > ?"),
        (request.creation_time_before, "creation_time < ?"),
        (request.last_modified_time_after, "last_modified_time > ?"),
        (request.last_modified_time_before, "last_modified_time < ?"),
    ):
        if moment is not None:
            where.append(clause)
            params.append(moment.timestamp())
    # Both *Contains filters are case-insensitive substring matches (SageMaker's other
    # NameContains filters behave the same way); OptimizationContains searches the
    # OptimizationTypes literals, e.g. "quant" matches Quantization.
    if request.name_contains:
        where.append("instr(lower(name), lower(?)) > 0")
        params.append(request.name_contains)
    if request.optimization_contains:
        where.append("instr(lower(optimization_types), lower(?)) > 0")
        params.append(request.optimization_contains)
    if request.status_equals:
        where.append("status = ?")
        params.append(request.status_equals)
    return where, params


def _fingerprint(request: ListOptimizationJobsRequest, tenant: tuple[str, str]) -> str:
    """Hash of everything that defines the sequence being paged (not MaxResults, not the token)."""
    wire = request.dump()
    wire.pop("NextToken", None)
    wire.pop("MaxResults", None)
    wire.setdefault("SortBy", DEFAULT_SORT_BY)
    wire.setdefault("SortOrder", DEFAULT_SORT_ORDER)
    wire["_tenant"] = list(tenant)
    return hashlib.sha256(json.dumps(wire, sort_keys=True).encode()).hexdigest()[:16]


def _encode_token(value: Any, name: str, fingerprint: str) -> str:
    payload = json.dumps({"v": 1, "k": value, "n": name, "f": fingerprint}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def _decode_token(token: str, fingerprint: str) -> tuple[Any, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        value, name, token_fingerprint = data["k"], data["n"], data["f"]
        if data.get("v") != 1 or not isinstance(name, str):
            raise ValueError("unknown token version")
        if isinstance(value, bool) or not isinstance(value, str | int | float | None):
            raise ValueError("a token holds a sort key, never a structure")  # a forged one: SQL binds scalars
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ValueError("a sort key beyond SQLite's integers")
    except (ValueError, KeyError, TypeError, binascii.Error, RecursionError):
        raise ValidationException("The NextToken is not valid: pass the token a previous List returned") from None
    if token_fingerprint != fingerprint:
        raise ValidationException(
            "The NextToken was issued for a request with different filters or sort order; "
            "repeat the original filters, or start again without NextToken"
        )
    return value, name
