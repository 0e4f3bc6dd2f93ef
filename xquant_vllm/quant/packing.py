"""Bit packing of b-bit codes (b in 1, 2, 4) into bytes, along the last axis.

Byte layout (the Triton kernels follow it exactly): with ``n = 8 // b`` codes per byte, element ``j`` of
a packed row lives in byte ``j // n`` at bits ``[b * (j % n), b * (j % n) + b)``, least significant bits
first. For b = 2 the byte ``0b_dd_cc_bb_aa`` holds elements a (bits 0-1), b, c, d (bits 6-7). A row of
``m`` codes takes ``ceil(m / n)`` bytes; the unused high bits of a ragged last byte are zero.
"""

from __future__ import annotations

import torch

VALID_BITS = (1, 2, 4)


def _check_bits(bits: int) -> int:
    if bits not in VALID_BITS:
        raise ValueError(f"bits={bits} not supported; allowed: {VALID_BITS}")
    return 8 // bits


def packed_len(num_codes: int, bits: int) -> int:
    """Bytes taken by a row of ``num_codes`` codes of ``bits`` bits."""
    per_byte = _check_bits(bits)
    return -(-num_codes // per_byte)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2**bits)`` along the last axis into uint8."""
    per_byte = _check_bits(bits)
    m = codes.shape[-1]
    pad = packed_len(m, bits) * per_byte - m
    c = codes.to(torch.uint8)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, per_byte).to(torch.int32)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=c.device) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``num_codes`` codes of each row, as uint8."""
    per_byte = _check_bits(bits)
    # One full-size shift per code position, then interleave: much faster on CPU than broadcasting a short
    # trailing axis of shifts (the CPU serving path dequantizes every step).
    mask = (1 << bits) - 1
    codes = torch.stack([(packed >> (bits * e)) & mask for e in range(per_byte)], dim=-1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :num_codes]
