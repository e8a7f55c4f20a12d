"""`llmwarm serve`: the lifecycle, the gate in front of vLLM's app, the control endpoints,
re-warms and LoRA adapters, the run state and what reads it (metrics, summaries)."""
