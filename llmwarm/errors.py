"""Errors llmwarm raises; the CLI renders them and picks the exit code.

    LlmwarmError
    ├── UsageError            bad input from the user: exit 2
    │   ├── ProfileError      the profile file is unreadable, malformed or invalid
    │   ├── VllmArgsError     a vLLM flag is unknown or has a bad value
    │   ├── ModelNotFound     MODEL names a local path that is not a model directory
    │   └── PortInUse         the HTTP port (or socket path) cannot be bound
    ├── StartupError          the vLLM engine could not be started: exit 3
    ├── WarmupError           a warm-up request failed, or the engine died warming: exit 4
    ├── EngineDied            the engine died while serving: exit 5
    ├── Unconverged           a bucket did not converge and the policy is `fail`: exit 6
    └── Interrupted           SIGINT/SIGTERM before the server was ready: exit 130

Each carries `problems`: one `(where, message)` pair per problem, where `where` names the
field path, flag or file the problem is in.
"""

from __future__ import annotations

# Exit codes, documented in `llmwarm --help`.
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_STARTUP_FAILURE = 3
EXIT_WARMUP_FAILURE = 4
EXIT_ENGINE_DIED = 5
EXIT_UNCONVERGED = 6
EXIT_INTERRUPTED = 130


class LlmwarmError(Exception):
    exit_code = 1

    def __init__(self, message: str, *, problems: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.message = message
        self.problems = problems or []


class UsageError(LlmwarmError):
    exit_code = EXIT_USAGE


class ProfileError(UsageError):
    pass


class VllmArgsError(UsageError):
    pass


class ModelNotFound(UsageError):
    pass


class PortInUse(UsageError):
    pass


class StartupError(LlmwarmError):
    exit_code = EXIT_STARTUP_FAILURE


class WarmupError(LlmwarmError):
    exit_code = EXIT_WARMUP_FAILURE


class EngineDied(LlmwarmError):
    exit_code = EXIT_ENGINE_DIED


class Unconverged(LlmwarmError):
    exit_code = EXIT_UNCONVERGED


class Interrupted(LlmwarmError):
    exit_code = EXIT_INTERRUPTED
