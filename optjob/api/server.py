"""AWS JSON 1.1 over HTTP with SigV4: transport only. Every decision is the job service's.

``POST /`` with ``X-Amz-Target: SageMaker.<Operation>``; answers ``application/x-amz-json-1.1``
with an ``x-amzn-RequestId`` on every response. Errors are HTTP 400 ``{"__type", "message"}``
with the model's codes (auth failures use AWS's codes and statuses); 5xx only for real faults.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from optjob.api.errors import ApiError, InternalFailure, SerializationException, UnknownOperationException
from optjob.api.shapes import OPERATIONS
from optjob.api.sigv4 import IncomingRequest, verify

CONTENT_TYPE = "application/x-amz-json-1.1"
TARGET_PREFIX = "SageMaker."
log = logging.getLogger("optjob.server")


class Service(Protocol):
    def handle(self, operation: str, request: dict[str, Any]) -> dict[str, Any]: ...


def _response(status: int, payload: dict[str, Any], request_id: str) -> Response:
    return Response(
        json.dumps(payload, separators=(",", ":")),
        status_code=status,
        media_type=CONTENT_TYPE,
        headers={"x-amzn-RequestId": request_id},
    )


def _error(exc: ApiError, request_id: str) -> Response:
    return _response(exc.http_status, exc.to_wire(), request_id)


def create_app(service_factory: Callable[[], Service], keys: dict[str, str] | None) -> Starlette:
    """The ASGI app. ``keys`` maps access key ids to secrets; ``None`` disables authentication."""
    service_holder: list[Service] = []

    def service() -> Service:
        if not service_holder:
            service_holder.append(service_factory())
        return service_holder[0]

    async def endpoint(request: Request) -> Response:
        request_id = str(uuid.uuid4())
        body = await request.body()
        try:
            if keys is not None:
                verify(
                    IncomingRequest(
                        method=request.method,
                        path=request.url.path,
                        query=request.url.query,
                        headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                        body=body,
                    ),
                    keys,
                )
            target = request.headers.get("x-amz-target", "")
            operation = target[len(TARGET_PREFIX) :] if target.startswith(TARGET_PREFIX) else ""
            if operation not in OPERATIONS:
                known = ", ".join(f"{TARGET_PREFIX}{op}" for op in OPERATIONS)
                raise UnknownOperationException(
                    f"Unknown operation '{target}'; this endpoint serves {known}"
                    if target
                    else f"Missing X-Amz-Target header; expected one of {known}"
                )
            try:
                data = json.loads(body or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise SerializationException(f"Request body is not valid JSON: {exc}") from None
            if not isinstance(data, dict):
                raise SerializationException("Request body must be a JSON object")
            result = await run_in_threadpool(service().handle, operation, data)
            return _response(200, result or {}, request_id)
        except ApiError as exc:
            return _error(exc, request_id)
        except Exception:  # a real fault: log it with the request id, answer 500 without internals
            log.exception("request %s failed", request_id)
            return _error(InternalFailure(f"Internal server error (request id {request_id})"), request_id)

    return Starlette(routes=[Route("/", endpoint, methods=["POST"])])
