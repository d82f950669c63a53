"""CommonLM."""
