"""``xquant-vllm serve``: vLLM's own OpenAI-compatible server with this package's defaults and HTTP edges."""
