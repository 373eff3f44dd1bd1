"""AWS JSON 1.1 over HTTP with SigV4: transport only. Every decision is the job service's.

``POST /`` with ``X-Amz-Target: SageMaker.<Operation>``; answers ``application/x-amz-json-1.1``
with an ``x-amzn-RequestId`` on every response. Errors are HTTP 400 ``{"__type", "message"}``
with the model's codes (auth failures use AWS's codes and statuses); 5xx only for real faults.

The signature says who is calling: the key's principal and account, and the region of its
credential scope. That caller goes to the service with every operation, and every call, allowed
or not, is one line of the audit log.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from optjob.api.audit import AuditLog
from optjob.api.errors import (
    ApiError,
    InternalFailure,
    SerializationException,
    UnknownOperationException,
    ValidationException,
    load_json,
    truncate,
)
from optjob.api.observability import observability
from optjob.api.principals import Principal
from optjob.api.shapes import OPERATIONS
from optjob.api.sigv4 import IncomingRequest, check_headers, verify
from optjob.console.routes import console_routes
from optjob.jobs.tenancy import Caller
from optjob.limits import limits

CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "SageMaker."
log = logging.getLogger("optjob.server")
_CREDENTIAL_KEY = re.compile(r"Credential=([^/,\s]+)/")


class Service(Protocol):
    def handle(self, operation: str, request: dict[str, Any], caller: Caller | None = None) -> dict[str, Any]: ...


def _response(status: int, payload: dict[str, Any], request_id: str) -> Response:
    return Response(
        json.dumps(payload, separators=(",", ":")),
        status_code=status,
        media_type=CONTENT_TYPE,
        headers={"x-amzn-RequestId": request_id},
    )


def _error(exc: ApiError, request_id: str) -> Response:
    return _response(exc.http_status, exc.to_wire(), request_id)


def create_app(
    service_factory: Callable[[], Service],
    principals: dict[str, Principal] | None,
    audit: AuditLog | None = None,
    anonymous: Caller | None = None,
    *,
    home_region: str = "us-east-1",
    executor_running: Callable[[], bool] | None = None,
) -> Starlette:
    """The ASGI app. ``principals`` maps access key ids to callers; ``None`` disables authentication
    and every request is ``anonymous`` (None: the service's home caller).

    Beside the API at ``POST /``: the web console under ``/console/`` (``home_region``: the sign-in
    form's default) and ``/metrics``, ``/healthz``, ``/readyz`` (``executor_running``: see
    ``optjob.api.observability``)."""
    service_holder: list[Service] = []
    secrets = {key: p.secret_access_key for key, p in (principals or {}).items()}

    def service() -> Service:
        if not service_holder:
            service_holder.append(service_factory())
        return service_holder[0]

    async def endpoint(request: Request) -> Response:
        request_id = str(uuid.uuid4())
        target = request.headers.get("x-amz-target", "")
        operation = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else ""
        caller: Caller | None = anonymous
        data: Any = None
        outcome = "Success"
        try:
            raw_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
            if principals is not None:  # who is asking, before a byte of the body is read
                check_headers(raw_headers, secrets)
            body = await _read_body(request, limits().api.max_body_bytes)
            if principals is not None:
                signer = verify(
                    IncomingRequest(
                        method=request.method,
                        path=request.url.path,
                        query=request.url.query,
                        headers=raw_headers,
                        body=body,
                    ),
                    secrets,
                )
                principal = principals[signer.access_key_id]
                caller = Caller(principal.account_id, signer.region, principal.name)
            if operation not in OPERATIONS:
                known = ", ".join(f"{TARGET_PREFIX}{op}" for op in OPERATIONS)
                raise UnknownOperationException(
                    f"Unknown operation '{truncate(target)}'; this endpoint serves {known}"
                    if target
                    else f"Missing X-Amz-Target header; expected one of {known}"
                )
            data = load_json(body)
            if not isinstance(data, dict):
                raise SerializationException("Request body must be a JSON object")
            result = await run_in_threadpool(service().handle, operation, data, caller)
            return _response(200, result or {}, request_id)
        except ApiError as exc:
            outcome = exc.code
            return _error(exc, request_id)
        except Exception:  # a real fault: log it with the request id, answer 500 without internals
            outcome = InternalFailure.code
            log.exception("request %s failed", request_id)
            return _error(InternalFailure(f"Internal server error (request id {request_id})"), request_id)
        finally:
            if audit is not None:
                _audit(audit, request, operation or target, outcome, request_id, caller, data)

    routes, timing = observability(service, executor_running=executor_running or (lambda: False))
    routes += console_routes(service, principals, anonymous=anonymous, home_region=home_region)
    return Starlette(routes=[Route("/", endpoint, methods=["POST"]), *routes], middleware=[timing])


class RequestTooLarge(ValidationException):
    http_status = 413


async def _read_body(request: Request, cap: int) -> bytes:
    """The body, refused unread when its Content-Length is over ``cap`` and cut off as soon as a body
    without one passes it: a request can never make the server hold more than ``cap`` bytes of it."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise SerializationException("Content-Length must be a number of bytes")
        if int(declared) > cap:
            raise RequestTooLarge(_too_large(cap))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise RequestTooLarge(_too_large(cap))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(cap: int) -> str:
    return f"Request body is larger than {cap} bytes; no SageMaker optimization-job request is"


def _audit(
    audit: AuditLog, request: Request, operation: str, outcome: str, request_id: str, caller: Caller | None, data: Any
) -> None:
    key = _CREDENTIAL_KEY.search(request.headers.get("authorization", ""))
    name = data.get("OptimizationJobName") if isinstance(data, dict) else None
    audit.record(
        operation=operation or "(none)",
        outcome=outcome,
        request_id=request_id,
        account_id=caller.account_id if caller else None,
        principal=caller.principal if caller else None,
        access_key_id=key.group(1) if key else None,
        region=caller.region if caller else None,
        job_name=name if isinstance(name, str) else None,
        source_ip=request.client.host if request.client else None,
    )
