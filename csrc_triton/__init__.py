"""Triton kernels (quantize-and-store, paged attention) and their PyTorch twins."""
