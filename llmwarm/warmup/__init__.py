"""Running a warm-up: its HTTP client, the KV-cache fill and the prefill sweep, measured rounds
until each bucket converges, and its progress."""
