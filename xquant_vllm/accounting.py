"""Bit accounting (spec section 6): equivalent bits, true bits and capacity, from the page layout.

*Equivalent bits* count only code bits per cached element (the papers' convention). *True bits* count every
byte the cache holds: pages (codes, metadata, padding: :func:`xquant_vllm.layout.page_bytes`, the same
function vLLM's block manager is given) plus the full-precision tail buffer, one slot of ``B`` tokens per
running sequence. Capacity is what fits in a fixed KV memory, tails reserved first, against the model dtype
and fp8 holding the same memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xquant_vllm.config import QuantConfig
from xquant_vllm.layout import page_bytes


@dataclass(frozen=True)
class ModelShape:
    """The KV-cache-relevant shape of a model."""

    name: str
    num_layers: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def dtype_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def elements_per_token(self) -> int:
        """K and V elements of one token over all layers and KV heads."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_size


SMOLLM2 = ModelShape("SmolLM2-135M", num_layers=30, num_kv_heads=3, head_size=64)
LLAMA3_8B = ModelShape("Llama-3-8B", num_layers=32, num_kv_heads=8, head_size=128)


@dataclass(frozen=True)
class BitsReport:
    preset: str
    shape: ModelShape
    block_size: int
    equivalent_bits: float
    page_bytes_per_layer: tuple[int, ...]  # per (block, KV head)
    bytes_per_token: float  # pages only, all layers and heads
    tail_bytes_per_seq: int  # the full-precision tail slot of one running sequence

    def true_bits(self, tokens_per_seq: int) -> float:
        """Bits per cached element with every sequence ``tokens_per_seq`` long and holding one tail slot."""
        total = self.bytes_per_token * tokens_per_seq + self.tail_bytes_per_seq
        return 8 * total / (tokens_per_seq * self.shape.elements_per_token)

    @property
    def page_bits(self) -> float:
        """True bits of full blocks alone (no tail)."""
        return 8 * self.bytes_per_token / self.shape.elements_per_token

    def capacity_tokens(self, kv_bytes: int, running_seqs: int) -> int:
        """Tokens that fit in ``kv_bytes`` once ``running_seqs`` tail slots are reserved (whole blocks)."""
        bytes_per_block = self.bytes_per_token * self.block_size
        usable = kv_bytes - running_seqs * self.tail_bytes_per_seq
        return max(0, int(usable // bytes_per_block)) * self.block_size

    def capacity_ratio(self, kv_bytes: int, running_seqs: int, baseline_bits: int | None = None) -> float:
        """Tokens held against a cache of ``baseline_bits`` per element (default: the model dtype)."""
        bits = baseline_bits or 8 * self.shape.dtype_bytes
        baseline = kv_bytes // (self.shape.elements_per_token * bits // 8)
        return self.capacity_tokens(kv_bytes, running_seqs) / baseline


def equivalent_bits(cfg: QuantConfig) -> float:
    """Code bits per element, averaged over layers and over K and V; shared tensors count 0."""
    total = 0
    for lq in cfg.layers():
        total += 0 if lq.k_shared else lq.k_bits
        total += 0 if lq.v_shared else lq.v_bits
    return total / (2 * cfg.num_layers)


def bits_report(cfg: QuantConfig, shape: ModelShape) -> BitsReport:
    if (cfg.num_layers, cfg.head_size) != (shape.num_layers, shape.head_size):
        raise ValueError(f"config is for {cfg.num_layers} layers x head size {cfg.head_size}, model is {shape}")
    pages = tuple(page_bytes(lq, shape.dtype) for lq in cfg.layers())
    B = cfg.block_size
    per_token = sum(pages) * shape.num_kv_heads / B
    tail = B * shape.elements_per_token * shape.dtype_bytes
    return BitsReport(cfg.preset, shape, B, equivalent_bits(cfg), pages, per_token, tail)
