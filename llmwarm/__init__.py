"""llmwarm: serve vLLM warm."""

__version__ = "0.1.0"
