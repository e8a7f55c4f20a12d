"""What a warm-up is, as data: endpoints, request features and kinds, profiles (and their
YAML), the corpus of requests, convergence, the fit to an engine, the report (and its JSON)."""
