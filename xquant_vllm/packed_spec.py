"""vLLM 0.26's KV spec of one packed layer (0.32 describes such pages natively; see ``vllm_compat``).

A module of its own, imported only on 0.26: the class must be importable by name, because tensor-parallel
workers send their specs to the engine core pickled.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.kv_cache_interface import FullAttentionSpec


@dataclass(frozen=True, kw_only=True)
class PackedAttentionSpec(FullAttentionSpec):
    """A full-attention layer whose block is ``head_page_bytes`` per KV head (codes, metadata and padding).

    It stays a ``FullAttentionSpec`` for vLLM's block manager and grouping (which walk the MRO), so layers of
    different page sizes share one block table, as vLLM's own ``TQFullAttentionSpec`` does for turboquant.
    """

    head_page_bytes: int = 0

    @property
    def real_page_size_bytes(self) -> int:
        return self.num_kv_heads * self.head_page_bytes

    @classmethod
    def merge(cls, specs: list[PackedAttentionSpec]) -> PackedAttentionSpec:
        # FullAttentionSpec.merge rebuilds the spec from its own fields and would drop head_page_bytes.
        if any(spec != specs[0] for spec in specs[1:]):
            raise AssertionError("layers merged into one KV-cache spec must have the same page")  # vLLM catches it
        return specs[0]
