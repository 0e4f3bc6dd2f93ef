"""xquant-vllm: ultra-low-bit KV-cache quantization (XQuant, KIVI, AsymKV) for vLLM."""

__version__ = "0.1.0"
