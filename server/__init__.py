"""OpenAI-compatible server on vLLM's async engine."""
