"""Errors llmwarm raises; the CLI renders them and picks the exit code.

    LlmwarmError
    ├── UsageError            bad input from the user: exit 2
    │   ├── ProfileError      the profile file is unreadable, malformed or invalid
    │   ├── VllmArgsError     a vLLM flag is unknown or has a bad value
    │   ├── ModelNotFound     MODEL names a local path that is not a model directory
    │   ├── PortInUse         the HTTP port (or socket path) cannot be bound
    │   └── WriteError        a file llmwarm writes (--report, --plot, ...) cannot be written
    ├── StartupError          the vLLM engine could not be started: exit 3
    ├── WarmupError           a warm-up request failed, or the engine died before the gate
    │                         opened: exit 4
    ├── EngineDied            the engine died after the gate opened: exit 5
    ├── ServerStopped         the HTTP server stopped while serving, unasked: exit 5
    ├── Unconverged           a bucket did not converge and the policy is `fail`: exit 6
    ├── Unreachable           `llmwarm bench`: the server cannot be reached or asked: exit 7
    └── Interrupted           SIGINT/SIGTERM before the server was ready: exit 130

Each carries `problems`: one `Problem(where, message)` per problem, where `where` names the
field path, flag or file the problem is in. A pydantic `ValidationError` becomes problems
through `from_validation` only; `render` is the one text form (the CLI, `profile check`), and
`Problem.as_dict` the one JSON form (the report, `/warmup/*`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from pydantic import ValidationError

# Exit codes, documented in `llmwarm --help`.
EXIT_USAGE = 2
EXIT_STARTUP_FAILURE = 3
EXIT_WARMUP_FAILURE = 4
EXIT_ENGINE_DIED = 5  # or the HTTP server stopped: serving ended unasked
EXIT_UNCONVERGED = 6
EXIT_UNREACHABLE = 7
EXIT_INTERRUPTED = 130


class Problem(NamedTuple):
    """One problem: where it is (a field path, flag, file or part) and what is wrong."""

    where: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"where": self.where, "message": self.message}


def dotted(loc: tuple[int | str, ...]) -> str:
    """A pydantic location as a field path: `buckets.0.prompt_tokens`."""
    return ".".join(str(part) for part in loc)


def from_validation(
    exc: ValidationError,
    *,
    root: str,
    echo: bool,
    where: Callable[[tuple[int | str, ...]], str] = dotted,
) -> list[Problem]:
    """The problems of a pydantic `ValidationError`, one per error.

    `root` names the whole input (for errors at its top level). `echo` says whether the
    input may be repeated back: yes for the user's own file or flags (the bad value, when
    short, and an unknown key's name help most), never for an HTTP body (it may carry
    secrets), where an unknown key is reported without its name.
    """
    problems = []
    for err in exc.errors():
        loc: tuple[int | str, ...] = tuple(err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and not echo:
            loc, message = loc[:-1], "unknown field"
        value: Any = err.get("input")
        if echo and err["type"] != "missing" and not isinstance(value, (dict, list)):
            message += f" (got {value!r})"
        problems.append(Problem(where(loc) or root if loc else root, message))
    return problems


def render(message: str, problems: Iterable[Problem]) -> list[str]:
    """An error as text lines: the message, then one `• where: message` line per problem."""
    return [message, *(f"  • {p.where}: {p.message}" for p in problems)]


class LlmwarmError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, problems: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.problems = [Problem(*p) for p in problems]


class UsageError(LlmwarmError):
    """Bad input from the user."""

    exit_code = EXIT_USAGE


class ProfileError(UsageError):
    """The profile file is unreadable, malformed or invalid."""


class VllmArgsError(UsageError):
    """A vLLM flag is unknown or has a bad value."""


class ModelNotFound(UsageError):
    """MODEL names a local path that is not a model directory."""


class PortInUse(UsageError):
    """The HTTP port (or socket path) cannot be bound."""


class WriteError(UsageError):
    """A file llmwarm writes cannot be written there (full disk, read-only): the previous
    file, if any, is intact."""


class StartupError(LlmwarmError):
    """The vLLM engine could not be started."""

    exit_code = EXIT_STARTUP_FAILURE


class WarmupError(LlmwarmError):
    """A warm-up request failed, or the engine died warming."""

    exit_code = EXIT_WARMUP_FAILURE


class EngineDied(LlmwarmError):
    """The engine died while serving."""

    exit_code = EXIT_ENGINE_DIED


class ServerStopped(LlmwarmError):
    """The HTTP server stopped while serving, though no one asked it to."""

    exit_code = EXIT_ENGINE_DIED


class Unconverged(LlmwarmError):
    """A bucket did not converge and the policy is `fail`."""

    exit_code = EXIT_UNCONVERGED


class Unreachable(LlmwarmError):
    """`llmwarm bench`: the server cannot be reached, or cannot tell its model name."""

    exit_code = EXIT_UNREACHABLE


class Interrupted(LlmwarmError):
    """SIGINT/SIGTERM before the server was ready."""

    exit_code = EXIT_INTERRUPTED
