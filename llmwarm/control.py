"""llmwarm's own endpoints, behind vLLM's `--api-key` (or `VLLM_API_KEY`) like `/v1/*`.

    GET  /warmup/report   the last warm-up report (JSON), 404 before the first one ends
    POST /warmup/run      re-run a warm-up on the serving engine, e.g. after a LoRA adapter
                          was loaded (every adapter listed is warmed too) or after sleep/wake.
                          JSON body, every field optional:
                            {"profile": "chat",     a shipped profile (default: the served one)
                             "close_gate": false,   503 to users (and /ready) while it runs
                             "wait": true}          answer with the report when it is done
                          (202 at once when wait is false); 409 while one runs; 503 before
                          the server is ready.

Errors name the field, never echo the request body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmwarm.errors import LlmwarmError, Problem, UsageError, from_validation
from llmwarm.profile import shipped_names
from llmwarm.state import RunState, Stage

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from llmwarm.report import Report

logger = logging.getLogger(__name__)

PREFIX = "/warmup/"
# Whether a request's headers carry a valid API key (always true without --api-key).
Authorized = Callable[[Request], bool]


class RewarmRequest(BaseModel):
    """The body of `POST /warmup/run`."""

    model_config = ConfigDict(extra="forbid")

    profile: str | None = Field(
        default=None, description="A shipped profile name; default: the profile being served."
    )
    close_gate: bool = Field(
        default=False,
        description="Answer 503 to users (and /ready) while the re-warm runs, as at start-up.",
    )
    wait: bool = Field(default=True, description="Answer only when the re-warm is done.")

    @field_validator("profile")
    @classmethod
    def _shipped(cls, name: str | None) -> str | None:
        if name is not None and name not in shipped_names():
            raise ValueError(f"not a shipped profile (one of: {', '.join(shipped_names())})")
        return name


Rewarm = Callable[[RewarmRequest], Coroutine[Any, Any, "Report"]]


def _error(status: int, message: str, problems: Iterable[Problem] = ()) -> Response:
    body = {"error": message, "problems": [p.as_dict() for p in problems]}
    return JSONResponse(body, status_code=status)


def _failed(exc: BaseException) -> Response:
    if isinstance(exc, LlmwarmError):
        return _error(400 if isinstance(exc, UsageError) else 500, exc.message, exc.problems)
    return _error(500, f"re-warm failed: {type(exc).__name__}")


class Control:
    """The `/warmup/*` endpoints and the one re-warm that may run at a time."""

    def __init__(self, state: RunState, authorized: Authorized, rewarm: Rewarm) -> None:
        self.state = state
        self.authorized = authorized
        self.rewarm = rewarm
        self.task: asyncio.Task[Report] | None = None
        self.app = Starlette(
            routes=[
                Route("/warmup/report", self._get_report, methods=["GET"]),
                Route("/warmup/coverage", self._get_coverage, methods=["GET"]),
                Route("/warmup/run", self._run, methods=["POST"]),
            ]
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.authorized(Request(scope)):
            response: Response = _error(401, "Unauthorized")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    async def _get_report(self, request: Request) -> Response:
        report = self.state.report
        if report is None:
            return _error(404, "no warm-up has finished yet")
        return Response(report.model_dump_json(indent=2), media_type="application/json")

    async def _get_coverage(self, request: Request) -> Response:
        """Live traffic since this process started, against the last warm-up."""
        return JSONResponse(self.state.coverage.summary())

    async def _run(self, request: Request) -> Response:
        if self.state.stage is not Stage.SERVING:
            return JSONResponse(
                {"error": "a re-warm can run once the server is ready"},
                status_code=503,
                headers={"retry-after": "5"},
            )
        if self.task is not None and not self.task.done():
            return _error(409, "a re-warm is already running")
        raw = await request.body()
        try:
            data: Any = json.loads(raw) if raw.strip() else {}
            body = RewarmRequest.model_validate(data)
        except json.JSONDecodeError:
            return _error(400, "the body is not JSON", [Problem("body", "not JSON")])
        except ValidationError as exc:
            return _error(400, "bad re-warm request", from_validation(exc, root="body", echo=False))
        logger.info("re-warm requested (profile %s, close_gate %s)", body.profile, body.close_gate)
        self.task = asyncio.create_task(self.rewarm(body))
        self.task.add_done_callback(_log_failure)
        if not body.wait:
            return JSONResponse({"status": "started"}, status_code=202)
        task = self.task
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

    async def close(self) -> None:
        """Cancel a running re-warm (the server is stopping)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task


def _log_failure(task: asyncio.Task[Report]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        message = exc.message if isinstance(exc, LlmwarmError) else repr(exc)
        logger.error("re-warm failed: %s", message)
