"""Live requests seen: their shapes (a body's skeleton, an access log), their coverage by the
warm-ups, and profiles learned from them."""
