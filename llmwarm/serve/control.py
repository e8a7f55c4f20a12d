"""llmwarm's own endpoints (`llmwarm.serve.access` says who may call which):

    GET  /warmup/report     the last finished warm-up's report (JSON), 404 before the first;
                            behind vLLM's `--api-key` (or `VLLM_API_KEY`) like `/v1/*`
    GET  /warmup/coverage   live traffic against what the warm-ups made warm; the same key
    POST /warmup/run        re-run a warm-up on the serving engine, e.g. after a LoRA adapter
                            was loaded (every adapter listed is warmed too) or after sleep/wake.
                            Admin only: `--admin-key` as a bearer token, or without one a
                            Unix-socket client (and the API key, if the server has one).
                            A JSON body (Content-Type: application/json), every field optional:
                              {"profile": "chat",     a shipped profile (default: the served one)
                               "close_gate": false,   503 to users (and /ready) while it runs
                               "wait": true}          answer with the report when it is done
                            (202 at once when wait is false); 409 while one runs; 429 sooner
                            than --rewarm-min-interval after the last; 503 before the server
                            is ready and once it stops (`llmwarm.serve.rewarm` holds these rules).

Errors name the field, never echo the request body.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmwarm.errors import LlmwarmError, Problem, UsageError, from_validation
from llmwarm.serve.access import Admin, cross_origin, machine_host
from llmwarm.serve.rewarm import Refused, RewarmRequest, Rewarms
from llmwarm.serve.state import RunState

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

PREFIX = "/warmup/"
RUN = "/warmup/run"
MAX_BODY = 65536  # a re-warm request is a few fields
# Whether a request's headers carry a valid API key (always true without --api-key).
Authorized = Callable[[Request], bool]


def _error(
    status: int, message: str, problems: Iterable[Problem] = (), retry_after: float | None = None
) -> Response:
    body = {"error": message, "problems": [p.as_dict() for p in problems]}
    headers = {"retry-after": str(math.ceil(retry_after))} if retry_after is not None else None
    return JSONResponse(body, status_code=status, headers=headers)


def _failed(exc: BaseException) -> Response:
    if isinstance(exc, LlmwarmError):
        return _error(400 if isinstance(exc, UsageError) else 500, exc.message, exc.problems)
    return _error(500, f"re-warm failed: {type(exc).__name__}")


async def _body(request: Request) -> bytes | None:
    """The body, or None when it is larger than a re-warm request can be."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _json_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"content-type":
            return bool(value.split(b";")[0].strip().lower() == b"application/json")
    return False


class Control:
    """The `/warmup/*` endpoints: HTTP only; `Rewarms` owns what a re-warm does."""

    def __init__(
        self,
        state: RunState,
        authorized: Authorized,
        rewarms: Rewarms,
        admin: Admin,
        host_check: bool = False,
    ) -> None:
        self.state = state
        self.authorized = authorized
        self.rewarms = rewarms
        self.admin = admin
        self.host_check = host_check  # no API key: only a Host that names this machine
        self.app = Starlette(
            routes=[
                Route("/warmup/report", self._get_report, methods=["GET"]),
                Route("/warmup/coverage", self._get_coverage, methods=["GET"]),
                Route(RUN, self._run, methods=["POST"]),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = self._refuses(scope)
        if refused is not None:
            response = _error(*refused)
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _refuses(self, scope: Scope) -> tuple[int, str] | None:
        """Why a request may not ask (`llmwarm.serve.access`), or None."""
        run = scope["path"] == RUN
        if cross_origin(scope):
            return 403, "a request from a web page of another origin"
        if self.host_check and not machine_host(scope):
            return 403, (
                "without an API key, llmwarm's endpoints answer a Host that is an address, "
                "localhost or this machine's name only"
            )
        if run and (refused := self.admin.refuses(scope)) is not None:
            return refused
        if (not run or self.admin.key is None) and not self.authorized(Request(scope)):
            return 401, "Unauthorized"
        if run and scope["method"] == "POST" and not _json_body(scope):
            return 415, "a re-warm request is JSON: Content-Type: application/json"
        return None

    async def _get_report(self, request: Request) -> Response:
        report = self.state.report
        if report is None:
            return _error(404, "no warm-up has finished yet")
        return Response(report.model_dump_json(indent=2), media_type="application/json")

    async def _get_coverage(self, request: Request) -> Response:
        """Live traffic since this process started, against what its warm-ups warmed."""
        return JSONResponse(self.state.coverage.summary())

    async def _run(self, request: Request) -> Response:
        try:
            raw = await _body(request)
        except ClientDisconnect:
            return _error(400, "the client went away")
        if raw is None:
            return _error(413, f"the body is larger than {MAX_BODY} bytes")
        try:
            data: Any = json.loads(raw) if raw.strip() else {}
            body = RewarmRequest.model_validate(data)
        except json.JSONDecodeError:
            return _error(400, "the body is not JSON", [Problem("body", "not JSON")])
        except ValidationError as exc:
            return _error(400, "bad re-warm request", from_validation(exc, root="body", echo=False))
        try:
            task = self.rewarms.start(body)
        except Refused as refused:
            return _error(refused.status, refused.message, retry_after=refused.retry_after)
        if not body.wait:
            return JSONResponse({"status": "started"}, status_code=202)
        try:
            # shielded: a client that hangs up does not cancel the re-warm
            report = await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise  # this request was cancelled, not the re-warm
            return _error(503, "the server is stopping; the re-warm was cancelled")
        except Exception as exc:
            return _failed(exc)
        return Response(report.model_dump_json(indent=2), media_type="application/json")
