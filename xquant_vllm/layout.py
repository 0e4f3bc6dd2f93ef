"""The paged block layout: where every byte of one quantized block lives.

A paged block holds ``B = k_group`` tokens (one key group: a block's bytes are final exactly when it fills,
which is what vLLM's prefix cache needs). For one layer, one block and one KV head the *page* is a run of
``page_bytes`` bytes, laid out as follows (offsets in bytes from the page start; ``D`` = head size,
``n_v = D / G_v`` value groups per token, ``m`` = metadata element size = model dtype size (2) for 16-bit
metadata):

==============  ==========================================  =================================================
section         present when                                contents
==============  ==========================================  =================================================
super           ``meta_bits == 8``                          fp32 ``k_lo, k_hi, v_lo, v_hi`` (16 bytes)
key codes       the layer stores key codes (not shared)     ``D`` rows, one per channel, each the ``B`` token
                                                            codes packed along tokens (``B * b_k / 8`` bytes)
value codes     the layer stores value codes (not shared)   ``B`` rows, one per token, each the ``D`` channel
                                                            codes packed along channels (``D * b_v / 8`` bytes)
key meta        always                                      16-bit: ``s_cal[D]`` then ``z_cal[D]`` (model dtype);
                                                            8-bit: ``min_q[D]`` then ``max_q[D]`` (uint8)
value meta      always                                      16-bit: ``s_cal[B, n_v]`` then ``z_cal[B, n_v]``;
                                                            8-bit: ``min_q[B, n_v]`` then ``max_q[B, n_v]``
padding         to a multiple of ``PAGE_ALIGN`` bytes       zeros
==============  ==========================================  =================================================

Bit packing inside a code row follows :mod:`xquant_vllm.quant.packing` (LSB first). Every section size is a
multiple of 16 bytes for the supported shapes (``D`` in 64/128/256, ``B`` a multiple of 8), so model-dtype
metadata is naturally aligned. The upper layer of a cross-layer pair has no code section for the shared
tensor: its page holds only its own metadata, and it reads its lower partner's page at the same block id.

Not in the page: the newest tokens of a sequence that do not yet fill a block (the full-precision tail).
They live in a separate tail buffer in the model dtype; :mod:`xquant_vllm.accounting` counts its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from xquant_vllm.config import LayerQuant
from xquant_vllm.quant.groups import GroupMeta
from xquant_vllm.quant.kv import QuantizedKV
from xquant_vllm.quant.packing import pack_bits, packed_len, unpack_bits

PAGE_ALIGN = 16
SUPER_BYTES = 16


@dataclass(frozen=True)
class PageLayout:
    """Byte offsets of one (layer, block, head) page; ``-1`` marks an absent section."""

    block: int
    head_size: int
    v_group: int
    k_bits: int
    v_bits: int
    meta_bits: int
    meta_size: int  # bytes per stored metadata element (model dtype size, or 1)
    super_off: int
    k_codes_off: int
    v_codes_off: int
    k_meta_off: int
    v_meta_off: int
    page_bytes: int

    @property
    def k_row_bytes(self) -> int:
        return packed_len(self.block, self.k_bits)

    @property
    def v_row_bytes(self) -> int:
        return packed_len(self.head_size, self.v_bits)

    @property
    def v_groups(self) -> int:
        return self.head_size // self.v_group

    @property
    def k_meta_bytes(self) -> int:
        return 2 * self.head_size * self.meta_size

    @property
    def v_meta_bytes(self) -> int:
        return 2 * self.block * self.v_groups * self.meta_size


def page_layout(lq: LayerQuant, dtype: torch.dtype) -> PageLayout:
    """The layout of one page of layer ``lq`` for a model in ``dtype``."""
    block, D = lq.k_group, lq.head_size
    meta_size = 1 if lq.meta_bits == 8 else torch.empty((), dtype=dtype).element_size()
    off = 0
    super_off = -1
    if lq.meta_bits == 8:
        super_off, off = 0, SUPER_BYTES
    k_codes_off = -1
    if not lq.k_shared:
        k_codes_off, off = off, off + D * packed_len(block, lq.k_bits)
    v_codes_off = -1
    if not lq.v_shared:
        v_codes_off, off = off, off + block * packed_len(D, lq.v_bits)
    k_meta_off, off = off, off + 2 * D * meta_size
    v_meta_off, off = off, off + 2 * block * (D // lq.v_group) * meta_size
    page = -(-off // PAGE_ALIGN) * PAGE_ALIGN
    return PageLayout(
        block, D, lq.v_group, lq.k_bits, lq.v_bits, lq.meta_bits, meta_size,
        super_off, k_codes_off, v_codes_off, k_meta_off, v_meta_off, page,
    )  # fmt: skip


def page_bytes(lq: LayerQuant, dtype: torch.dtype) -> int:
    """Bytes of one (block, KV head) page of this layer: what vLLM allocates per block and head."""
    return page_layout(lq, dtype).page_bytes


# ---- PyTorch packing of pages (the reference the store kernel is checked against) -------------------------


def _as_bytes(x: torch.Tensor, nb: int, H: int) -> torch.Tensor:
    return x.contiguous().view(torch.uint8).reshape(nb, H, -1)


def write_pages(q: QuantizedKV, layout: PageLayout, dtype: torch.dtype) -> torch.Tensor:
    """Lay out whole blocks of one layer as pages: uint8 ``[nb, H, page_bytes]``."""
    B, D = layout.block, layout.head_size
    ref = q.k_meta.lo if layout.meta_bits == 8 else q.k_meta.scale
    nb, H = ref.shape[:2]
    pages = torch.zeros(nb, H, layout.page_bytes, dtype=torch.uint8, device=ref.device)

    def put(off: int, data: torch.Tensor) -> None:
        data = _as_bytes(data, nb, H)
        pages[:, :, off : off + data.shape[-1]] = data

    if layout.super_off >= 0:
        put(layout.super_off, torch.stack([q.k_meta.lo, q.k_meta.hi, q.v_meta.lo, q.v_meta.hi], dim=-1))
    if layout.k_codes_off >= 0:
        put(layout.k_codes_off, pack_bits(q.k_codes, layout.k_bits))  # [nb, H, D, B/n]
    if layout.v_codes_off >= 0:
        v = q.v_codes.reshape(nb, B, H, D).permute(0, 2, 1, 3)  # [nb, H, B, D]
        put(layout.v_codes_off, pack_bits(v, layout.v_bits))
    put(layout.k_meta_off, _meta_rows(q.k_meta, nb, H, layout.meta_bits))
    v_meta = _value_meta_per_block(q.v_meta, nb, H, B, layout)
    put(layout.v_meta_off, _meta_rows(v_meta, nb, H, layout.meta_bits))
    return pages


def _meta_rows(meta: GroupMeta, nb: int, H: int, meta_bits: int) -> torch.Tensor:
    """The two metadata arrays of a page, concatenated as bytes: [nb, H, 2 * n * size]."""
    first, second = (meta.min_q, meta.max_q) if meta_bits == 8 else (meta.scale, meta.zero)
    return torch.cat([_as_bytes(first, nb, H), _as_bytes(second, nb, H)], dim=-1)


def _value_meta_per_block(meta: GroupMeta, nb: int, H: int, B: int, layout: PageLayout) -> GroupMeta:
    """Value metadata is produced per token [T, H, n_v] (16-bit) or per block [nb, H, B*n_v] (8-bit)."""
    if layout.meta_bits == 8:
        return meta
    per_block = lambda t: t.reshape(nb, B, H, layout.v_groups).permute(0, 2, 1, 3)  # noqa: E731
    return GroupMeta(scale=per_block(meta.scale), zero=per_block(meta.zero))


def read_pages(pages: torch.Tensor, layout: PageLayout, dtype: torch.dtype) -> QuantizedKV:
    """Inverse of :func:`write_pages`: codes unpacked, metadata as the reference quantizer returns it."""
    nb, H, _ = pages.shape
    B, D, nv = layout.block, layout.head_size, layout.v_groups

    def take(off: int, count: int, as_dtype: torch.dtype) -> torch.Tensor:
        size = torch.empty((), dtype=as_dtype).element_size()
        return pages[:, :, off : off + count * size].contiguous().view(as_dtype)

    k_codes = v_codes = None
    if layout.k_codes_off >= 0:
        packed = take(layout.k_codes_off, D * layout.k_row_bytes, torch.uint8).reshape(nb, H, D, -1)
        k_codes = unpack_bits(packed, layout.k_bits, B)
    if layout.v_codes_off >= 0:
        packed = take(layout.v_codes_off, B * layout.v_row_bytes, torch.uint8).reshape(nb, H, B, -1)
        v = unpack_bits(packed, layout.v_bits, D)  # [nb, H, B, D]
        v_codes = v.permute(0, 2, 1, 3).reshape(nb * B, H, nv, layout.v_group)
    meta_dtype = torch.uint8 if layout.meta_bits == 8 else dtype
    km = take(layout.k_meta_off, 2 * D, meta_dtype)
    vm = take(layout.v_meta_off, 2 * B * nv, meta_dtype)
    if layout.meta_bits == 8:
        sup = take(layout.super_off, 4, torch.float32)
        k_meta = GroupMeta(min_q=km[..., :D], max_q=km[..., D:], lo=sup[..., 0], hi=sup[..., 1])
        v_meta = GroupMeta(min_q=vm[..., : B * nv], max_q=vm[..., B * nv :], lo=sup[..., 2], hi=sup[..., 3])
    else:
        k_meta = GroupMeta(scale=km[..., :D], zero=km[..., D:])
        per_token = lambda t: t.reshape(nb, H, B, nv).permute(0, 2, 1, 3).reshape(nb * B, H, nv)  # noqa: E731
        v_meta = GroupMeta(scale=per_token(vm[..., : B * nv]), zero=per_token(vm[..., B * nv :]))
    return QuantizedKV(k_codes, k_meta, v_codes, v_meta)
