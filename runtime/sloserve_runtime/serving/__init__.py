"""Serving: vLLM's OpenAI server launched with our scheduler and middleware, SLO metrics, the embedded model."""
