"""``/console/``: the pages, their live fragments and the two actions, on the API's own port.

Pages are server-rendered (Jinja2); the list and the job page refresh their live parts with htmx
and draw charts with Chart.js, both vendored under ``static/vendor`` so no page needs the
internet. Every response carries a Content-Security-Policy that allows only this origin: no
inline script, no CDN, no framing. Reads and actions go through ``JobService.handle`` as the
signed-in caller, so tenancy, validation and error texts are the API's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from optjob.api.errors import ApiError
from optjob.api.principals import Principal
from optjob.api.shapes import TERMINAL_STATUSES
from optjob.console.config import observability_config
from optjob.console.sessions import COOKIE, SignedIn, check_secret, open_session, signed_in
from optjob.console.views import JobRow, job_detail
from optjob.jobs.tenancy import Caller

_HERE = Path(__file__).resolve().parent
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)
_STATUSES = ("INPROGRESS", "COMPLETED", "FAILED", "STARTING", "STOPPING", "STOPPED")
_SORT_BY = ("CreationTime", "Name", "Status")
# The list's filters: query parameter -> ListOptimizationJobs member (times are converted below).
_TEXT_FILTERS = {
    "name": "NameContains",
    "status": "StatusEquals",
    "technique": "OptimizationContains",
    "sort_by": "SortBy",
    "sort_order": "SortOrder",
    "next": "NextToken",
}
_TIME_FILTERS = {
    "created_after": "CreationTimeAfter",
    "created_before": "CreationTimeBefore",
    "modified_after": "LastModifiedTimeAfter",
    "modified_before": "LastModifiedTimeBefore",
}


class _Service:
    """What the console needs of the job service (``optjob.jobs.service.JobService``)."""

    store: Any

    def handle(self, operation: str, request: dict[str, Any], caller: Caller | None = None) -> dict[str, Any]: ...

    def get(self, name: str, caller: Caller | None = None) -> Any: ...


def console_routes(
    service: Callable[[], _Service],
    principals: dict[str, Principal] | None,
    *,
    anonymous: Caller | None,
    home_region: str,
) -> list[BaseRoute]:
    """The console's routes. ``principals`` None: no authentication (``--no-auth``), every visitor is
    ``anonymous`` and the console is read-only."""
    config = observability_config().console
    templates = Jinja2Templates(directory=str(_HERE / "templates"))
    templates.env.globals.update(refresh_s=config.refresh_seconds, terminal_statuses=TERMINAL_STATUSES)

    def page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> Response:
        response = templates.TemplateResponse(request, name, context, status_code=status_code)
        return _secure(response)

    def who(request: Request) -> SignedIn | None:
        if principals is None:
            caller = anonymous or Caller("000000000000", home_region, "anonymous")
            return SignedIn(caller=caller, principal="anonymous", can_write=False, csrf_token="", token_sha256=None)
        return signed_in(service().store, principals, request.cookies.get(COOKIE), now=time.time())

    def need_sign_in(request: Request) -> Response:
        if request.headers.get("hx-request"):
            # A live fragment whose session ended: send the whole page to the sign-in form.
            return _secure(Response(status_code=204, headers={"HX-Redirect": "/console/login"}))
        return _secure(RedirectResponse("/console/login", status_code=303))

    def login_form(request: Request) -> Response:
        if principals is None:
            return _secure(RedirectResponse("/console/", status_code=303))
        return page(request, "login.html", {"error": "", "region": home_region, "key": ""})

    def login(request: Request) -> Response:
        if principals is None:
            return _secure(RedirectResponse("/console/", status_code=303))
        form = _form(request)
        key, secret = form.get("access_key_id", ""), form.get("secret_access_key", "")
        region = form.get("region", "").strip() or home_region
        principal = check_secret(principals, key, secret)
        if principal is None:
            context = {"error": "That access key and secret do not match a principal of this server.",
                       "region": region, "key": key[:128]}  # fmt: skip
            return page(request, "login.html", context, status_code=401)
        token = open_session(service().store, principal, region, now=time.time(), hours=config.session_hours)
        response = RedirectResponse("/console/", status_code=303)
        response.set_cookie(COOKIE, token, max_age=int(config.session_hours * 3600), path="/console",
                            httponly=True, samesite="strict")  # fmt: skip
        return _secure(response)

    def logout(request: Request) -> Response:
        viewer = who(request)
        form = _form(request)
        if viewer is not None and viewer.token_sha256 and form.get("csrf") == viewer.csrf_token:
            service().store.delete_session(viewer.token_sha256)
        response = RedirectResponse("/console/login", status_code=303)
        response.delete_cookie(COOKIE, path="/console")
        return _secure(response)

    def listing(request: Request, viewer: SignedIn) -> dict[str, Any]:
        params = request.query_params
        wire, error = _list_request(params, config.page_size)
        rows: list[JobRow] = []
        next_token = ""
        if not error:
            try:
                result = service().handle("ListOptimizationJobs", wire, viewer.caller)
                now = time.time()
                rows = [JobRow.from_summary(s, now) for s in result.get("OptimizationJobSummaries", [])]
                next_token = result.get("NextToken") or ""
            except ApiError as exc:
                error = f"{exc.code}: {exc}"
        query = {k: v for k, v in params.items() if v and k != "next"}
        return {
            "viewer": viewer,
            "rows": rows,
            "error": error,
            "filters": dict(params),
            "query": urlencode(query),
            "next_query": urlencode({**query, "next": next_token}) if next_token else "",
            "statuses": _STATUSES,
            "sort_by": _SORT_BY,
        }

    def jobs_page(template: str) -> Callable[[Request], Response]:
        """The job list, or (``jobs_table.html``) its table, which refreshes itself."""

        def show(request: Request) -> Response:
            viewer = who(request)
            if viewer is None:
                return need_sign_in(request)
            return page(request, template, listing(request, viewer))

        return show

    def detail_context(request: Request, viewer: SignedIn) -> dict[str, Any] | Response:
        name = request.path_params["name"]
        try:
            service().handle("DescribeOptimizationJob", {"OptimizationJobName": name}, viewer.caller)
            record = service().get(name, viewer.caller)
        except ApiError as exc:
            return page(request, "missing.html", {"viewer": viewer, "name": name, "error": f"{exc.code}: {exc}"},
                        status_code=404)  # fmt: skip
        detail = job_detail(record, now=time.time(), log_records=config.log_tail_records,
                            secret_words=config.secret_key_words)  # fmt: skip
        return {"viewer": viewer, "job": detail, "notice": request.query_params.get("notice", "")}

    def job_page(template: str) -> Callable[[Request], Response]:
        """The job page, or (``job_live.html``) the part of it that refreshes itself."""

        def show(request: Request) -> Response:
            viewer = who(request)
            if viewer is None:
                return need_sign_in(request)
            context = detail_context(request, viewer)
            return context if isinstance(context, Response) else page(request, template, context)

        return show

    def action(operation: str, done: str) -> Callable[[Request], Response]:
        def act(request: Request) -> Response:
            viewer = who(request)
            if viewer is None:
                return need_sign_in(request)
            name = request.path_params["name"]
            form = _form(request)
            if not viewer.can_write or form.get("csrf") != viewer.csrf_token:
                message = (
                    f"{viewer.principal} may not change jobs from the console: its credentials-file section "
                    "needs optjob_console = read-write"
                    if not viewer.can_write
                    else "The form was stale; reload the page and try again"
                )
                return page(request, "missing.html", {"viewer": viewer, "name": name, "error": message},
                            status_code=403)  # fmt: skip
            try:
                service().handle(operation, {"OptimizationJobName": name}, viewer.caller)
            except ApiError as exc:
                notice = f"{exc.code}: {exc}"
            else:
                notice = done
            if operation == "DeleteOptimizationJob" and notice == done:
                return _secure(RedirectResponse("/console/?" + urlencode({"notice": f"{name}: {done}"}), 303))
            return _secure(RedirectResponse(f"/console/jobs/{name}?" + urlencode({"notice": notice}), 303))

        return act

    return [
        Route("/console", lambda request: _secure(RedirectResponse("/console/", status_code=308))),
        Route("/console/", jobs_page("jobs.html")),
        Route("/console/login", login_form, methods=["GET"]),
        Route("/console/login", _posted(login), methods=["POST"]),
        Route("/console/logout", _posted(logout), methods=["POST"]),
        Route("/console/jobs/table", jobs_page("jobs_table.html")),
        Route("/console/jobs/{name}", job_page("job.html")),
        Route("/console/jobs/{name}/live", job_page("job_live.html")),
        Route("/console/jobs/{name}/stop", _posted(action("StopOptimizationJob", "stop requested")), methods=["POST"]),
        Route("/console/jobs/{name}/delete", _posted(action("DeleteOptimizationJob", "deleted")), methods=["POST"]),
        Mount("/console/static", app=StaticFiles(directory=str(_HERE / "static")), name="console-static"),
    ]


def _secure(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = _CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Cache-Control"] = "no-store"
    return response


_MAX_FORM_BYTES = 16 * 1024  # a sign-in or an action form is a few hundred bytes


def _posted(handler: Callable[[Request], Response]) -> Callable[[Request], Any]:
    """Read a form body (refusing one over ``_MAX_FORM_BYTES`` before reading it), then run the
    handler on a worker thread: it reads the store and the job's log, which block."""

    async def endpoint(request: Request) -> Response:
        declared = request.headers.get("content-length", "")
        if declared and (not declared.isdigit() or int(declared) > _MAX_FORM_BYTES):
            return _secure(Response("form too large", status_code=413))
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_FORM_BYTES:
                return _secure(Response("form too large", status_code=413))
        request.scope["_console_body"] = body
        return await run_in_threadpool(handler, request)

    return endpoint


def _form(request: Request) -> dict[str, str]:
    """An urlencoded form body (the console's only kind), parsed without a multipart library."""
    body = request.scope.get("_console_body", b"")
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), max_num_fields=16).items()}


def _list_request(params: Any, page_size: int) -> tuple[dict[str, Any], str]:
    """The list's query parameters as a ListOptimizationJobs request, or an error naming the field."""
    wire: dict[str, Any] = {"MaxResults": page_size}
    for param, member in _TEXT_FILTERS.items():
        value = (params.get(param) or "").strip()
        if value:
            wire[member] = value
    for param, member in _TIME_FILTERS.items():
        value = (params.get(param) or "").strip()
        if not value:
            continue
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return wire, f"{member}: '{value[:64]}' is not a date and time (YYYY-MM-DDTHH:MM, UTC)"
        wire[member] = (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    return wire, ""
