"""Quantize-and-store and paged attention over the quantized cache: Triton kernels and their PyTorch twins.

``store_kv`` and ``paged_attention`` pick the implementation from the device of the page tensor: Triton on
CUDA; on the CPU the C++ attention over the packed pages and store (:mod:`.cpu_attention`, built once per
machine), falling back to the PyTorch path with one log line if the extension cannot be built.
``XQUANT_KERNELS=torch`` selects the PyTorch path everywhere (the reference, to check the others against it
inside an engine); ``XQUANT_KERNELS=cpu`` insists on the C++ path on the CPU (a failed build is an error).
Each choice is logged once. The per-step batch description shared by both
is :class:`StepPlan` (built by :func:`build_step_plan`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

from xquant_vllm.config import LayerQuant
from xquant_vllm.layout import PageLayout

from .plan import StepPlan, build_step_plan
from .torch_ops import paged_attention_torch, store_kv_torch

__all__ = ["StepPlan", "build_step_plan", "paged_attention", "store_kv"]

logger = logging.getLogger("xquant_vllm.kernels")


class _Impl(NamedTuple):
    name: str
    store_kv: Callable[..., None]
    paged_attention: Callable[..., None]


KERNELS_ENV = "XQUANT_KERNELS"
KERNEL_CHOICES = ("auto", "torch", "cpu")


def _impl(device_type: str) -> _Impl:
    choice = os.environ.get(KERNELS_ENV, "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNELS_ENV}={choice!r}: expected one of {', '.join(KERNEL_CHOICES)}")
    return _pick(device_type, choice)


@functools.cache
def _pick(device_type: str, choice: str) -> _Impl:
    impl = _Impl("torch", store_kv_torch, paged_attention_torch)
    if device_type == "cuda" and choice == "auto":
        from .attention import paged_attention_triton
        from .store import store_kv_triton

        impl = _Impl("triton", store_kv_triton, paged_attention_triton)
    elif device_type == "cpu" and choice in ("auto", "cpu"):
        from . import cpu_attention

        try:
            cpu_attention.load_extension()
            impl = _Impl("cpu", cpu_attention.store_kv_cpu, cpu_attention.paged_attention_cpu)
        except Exception as e:  # no compiler, no ninja, a failed build: the reference path still serves
            if choice == "cpu":
                raise RuntimeError(f"{KERNELS_ENV}=cpu: the CPU attention extension did not build: {e}") from e
            logger.warning("xquant CPU attention extension unavailable (%s: %s); using the PyTorch path",
                           type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
    logger.info("xquant kernels on %s: %s implementation (%s=%s)", device_type, impl.name, KERNELS_ENV, choice)
    return impl


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    pages: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    plan: StepPlan,
    lq: LayerQuant,
    layout: PageLayout,
) -> None:
    """Quantize the blocks this step completes into ``pages``; write the rows left over into the tail."""
    _impl(pages.device.type).store_kv(key, value, pages, tail_k, tail_v, plan, lq, layout)


def paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pages: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    plan: StepPlan,
    lq: LayerQuant,
    layout: PageLayout,
    scale: float,
    out: torch.Tensor,
    lower_pages: torch.Tensor | None = None,
    lower_layout: PageLayout | None = None,
) -> None:
    """Past-only attention of this step's rows over the quantized pages, the tail and the chunk; fills ``out``."""
    _impl(pages.device.type).paged_attention(
        query, key, value, pages, tail_k, tail_v, plan, lq, layout, scale, out, lower_pages, lower_layout
    )
