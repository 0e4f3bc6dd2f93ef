"""Asymmetric group quantization with XQuant's data-free calibration (spec sections 1 and 3).

Everything here works on a tensor shaped ``[..., n_groups, G]``: each row of ``G`` numbers is one group.
Statistics are fp32; what is *stored* is either

* 16-bit metadata: the calibrated scale ``s_cal`` and zero-point ``z_cal`` of each group, in the model dtype;
* 8-bit metadata: each group's min and max as uint8 codes against a *super range* ``[lo, hi]`` (fp32) shared
  by all groups of the same leading index (``[...]``), rounded outward so the decoded range still covers the
  group; scale and zero-point are derived from them when reading.

The exact fp32 operations, in order (a kernel that follows them gets the same bits):

    range_b = 2**b - 1
    s       = (mx - mn) / range_b                         # 0 for a constant group
    q       = clamp(rint((x - mn) / s), 0, range_b)        # rint = round half to even; q = 0 where s == 0
    z_cal   = mn + eta * (mx - mn)                         # eta, (1 - 2 eta) rounded once to fp32
    s_cal   = (1 - 2 * eta) * s
    x_hat   = q * s_cal + z_cal                            # s_cal, z_cal as stored (16-bit: model dtype)

8-bit metadata decodes ``step = (hi - lo) / 255``, ``mn = lo + min_q * step``, ``mx = lo + max_q * step``
first, and quantizes against that decoded range. ``lo`` / ``hi`` are the least group min and the greatest
group max; code 255 decodes to ``hi`` itself (``lo + 255 * step`` can land an ulp below it in fp32), so the
decoded range of every group covers the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupMeta:
    """Stored metadata of a tensor of groups; exactly one of the two forms is set."""

    scale: torch.Tensor | None = None  # [..., n] model dtype: s_cal         (16-bit form)
    zero: torch.Tensor | None = None  # [..., n] model dtype: z_cal          (16-bit form)
    min_q: torch.Tensor | None = None  # [..., n] uint8                       (8-bit form)
    max_q: torch.Tensor | None = None  # [..., n] uint8                       (8-bit form)
    lo: torch.Tensor | None = None  # [...] fp32 super range                  (8-bit form)
    hi: torch.Tensor | None = None  # [...] fp32

    @property
    def eight_bit(self) -> bool:
        return self.min_q is not None


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _range_of(mn: torch.Tensor, mx: torch.Tensor, bits: int) -> torch.Tensor:
    return (mx - mn) / _f32(float(2**bits - 1))


def _decode_minmax(meta: GroupMeta) -> tuple[torch.Tensor, torch.Tensor]:
    step = ((meta.hi - meta.lo) / _f32(255.0)).unsqueeze(-1)
    lo, hi = meta.lo.unsqueeze(-1), meta.hi.unsqueeze(-1)
    mx = torch.where(meta.max_q == 255, hi, lo + meta.max_q.float() * step)
    return lo + meta.min_q.float() * step, mx


def _encode_minmax(mn: torch.Tensor, mx: torch.Tensor) -> GroupMeta:
    lo, hi = mn.amin(dim=-1), mx.amax(dim=-1)
    step = ((hi - lo) / _f32(255.0)).unsqueeze(-1)
    safe = torch.where(step > 0, step, torch.ones_like(step))
    min_q = torch.floor((mn - lo.unsqueeze(-1)) / safe).clamp(0, 255)
    max_q = torch.ceil((mx - lo.unsqueeze(-1)) / safe).clamp(0, 255)
    meta = GroupMeta(min_q=min_q.to(torch.uint8), max_q=max_q.to(torch.uint8), lo=lo, hi=hi)
    # The decoded range must still cover the group: step the codes outward where fp32 rounding fell inside.
    dmn, dmx = _decode_minmax(meta)
    meta.min_q = torch.where((dmn > mn) & (min_q > 0), min_q - 1, min_q).to(torch.uint8)
    meta.max_q = torch.where((dmx < mx) & (max_q < 255), max_q + 1, max_q).to(torch.uint8)
    return meta


def group_minmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    return xf.amin(dim=-1), xf.amax(dim=-1)


def quantizer_range(meta_bits: int, mn: torch.Tensor, mx: torch.Tensor) -> tuple[GroupMeta | None, torch.Tensor, torch.Tensor]:
    """The (min, max) the codes are computed against: exact for 16-bit meta, decoded for 8-bit meta."""
    if meta_bits == 16:
        return None, mn, mx
    meta = _encode_minmax(mn, mx)
    dmn, dmx = _decode_minmax(meta)
    return meta, dmn, dmx


def calibrated_params(mn: torch.Tensor, mx: torch.Tensor, bits: int, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(s_cal, z_cal)`` from a group's (min, max) (spec section 3)."""
    s = _range_of(mn, mx, bits)
    return _f32(1.0 - 2.0 * eta) * s, mn + _f32(eta) * (mx - mn)


def compute_meta(x: torch.Tensor, bits: int, eta: float, meta_bits: int = 16) -> GroupMeta:
    """Metadata of ``x`` [..., n, G] alone: what the upper layer of a cross-layer pair stores."""
    mn, mx = group_minmax(x)
    meta, mn, mx = quantizer_range(meta_bits, mn, mx)
    if meta is not None:
        return meta
    s_cal, z_cal = calibrated_params(mn, mx, bits, eta)
    return GroupMeta(scale=s_cal.to(x.dtype), zero=z_cal.to(x.dtype))


def quantize_groups(x: torch.Tensor, bits: int, eta: float, meta_bits: int = 16) -> tuple[torch.Tensor, GroupMeta]:
    """Quantize ``x`` [..., n, G] group-wise: uint8 codes (unpacked, one per element) and stored metadata."""
    mn, mx = group_minmax(x)
    meta8, qmn, qmx = quantizer_range(meta_bits, mn, mx)
    s = _range_of(qmn, qmx, bits).unsqueeze(-1)
    ratio = (x.float() - qmn.unsqueeze(-1)) / torch.where(s > 0, s, torch.ones_like(s))
    codes = torch.where(s > 0, torch.round(ratio).clamp(0, 2**bits - 1), torch.zeros_like(ratio))
    if meta8 is not None:
        return codes.to(torch.uint8), meta8
    s_cal, z_cal = calibrated_params(qmn, qmx, bits, eta)
    return codes.to(torch.uint8), GroupMeta(scale=s_cal.to(x.dtype), zero=z_cal.to(x.dtype))


def meta_params(meta: GroupMeta, bits: int, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(s_cal, z_cal)`` [..., n] used for dequantization, from stored metadata."""
    if meta.eight_bit:
        mn, mx = _decode_minmax(meta)
        return calibrated_params(mn, mx, bits, eta)
    return meta.scale.float(), meta.zero.float()


def dequantize_groups(
    codes: torch.Tensor, meta: GroupMeta, bits: int, eta: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``x_hat = q * s_cal + z_cal`` for codes [..., n, G] (codes may come from another layer)."""
    s_cal, z_cal = meta_params(meta, bits, eta)
    return (codes.float() * s_cal.unsqueeze(-1) + z_cal.unsqueeze(-1)).to(dtype)
