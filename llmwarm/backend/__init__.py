"""The vLLM side, the only modules that import vLLM: its command line, its engine and HTTP
server, hooks that run in its workers, and its compile caches."""
