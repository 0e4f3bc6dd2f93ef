"""An orthogonal rotation of each head's channels before quantization (a normalized Hadamard transform).

Per-token value groups and per-channel key groups both suffer from a few channels of large magnitude: one
outlier stretches its group's range and every other number in the group loses its levels. Multiplying each
head's vectors by an orthogonal ``R`` spreads that energy over all channels, so the groups of ``x @ R`` have
similar ranges. ``R`` is the Sylvester Hadamard matrix scaled by ``1 / sqrt(D)``: symmetric, its own inverse,
needs no data and no storage.

Scores and outputs are unchanged in exact arithmetic: ``(q R) . (k R) = q . k`` and, for values,
``P (V R) R = P V``. So a rotated layer stores the codes of ``k R`` / ``v R``; its attention runs on ``q R``
(when keys are rotated) and its output is multiplied by ``R`` once more (when values are rotated).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _hadamard_f64(size: int) -> torch.Tensor:
    if size < 1 or size & (size - 1):
        raise ValueError(f"head_size={size}: a Hadamard rotation needs a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / size**0.5


@functools.cache
def hadamard(size: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``size x size`` normalized Hadamard matrix (symmetric and orthogonal: ``H @ H = I``).

    Cached per device, so a forward pass (and a CUDA graph capturing it) never copies it from the host.
    """
    return _hadamard_f64(size).to(dtype=dtype, device=device)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` over the last axis, computed in fp32 and returned in ``x``'s dtype (its own inverse)."""
    h = hadamard(x.shape[-1], torch.float32, x.device)
    return (x.float() @ h).to(x.dtype)
