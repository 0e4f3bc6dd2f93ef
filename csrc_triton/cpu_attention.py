"""The CPU fast path of the kernel interface: a small C++ extension that reads and writes the packed pages.

* ``paged_attention_cpu``: the PyTorch path (:mod:`.torch_ops`) dequantizes each request's whole history into
  the model dtype in every layer and step; this one unpacks the codes and dots them in one pass, with the scales
  and zero-points folded into the query and into the softmax weights (``csrc/cpu_attention.cpp`` explains the
  arithmetic), parallel over requests, KV heads and query tiles. Layers it does not cover (block or value group
  not a multiple of 16, a head size not a multiple of 64) take the PyTorch path, call by call.
* ``store_kv_cpu``: quantize-and-store in one pass per completed block, byte for byte the reference's
  (``csrc/cpu_store.cpp``), instead of some hundred small PyTorch ops per layer.

The extension is built once per machine with ``torch.utils.cpp_extension`` (g++ and ninja; ``-march=native``, so
the build folder is keyed by the CPU's instruction set) into the xquant cache; ``scripts/setup.sh`` builds it
ahead, otherwise the first call does (about a minute on 2 cores).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import platform
from pathlib import Path

import torch

from xquant_vllm.config import LayerQuant
from xquant_vllm.layout import PageLayout

from .plan import StepPlan
from .torch_ops import paged_attention_torch, store_kv_torch

logger = logging.getLogger("xquant_vllm.kernels")

SOURCES = [Path(__file__).resolve().parent / "csrc" / name for name in ("cpu_attention.cpp", "cpu_store.cpp")]
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-Wno-unused-function"]


def _cpu_tag() -> str:
    """What a ``-march=native`` binary depends on: the CPU's flags and the torch it was built against."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    digest = hashlib.sha256(f"{flags} {torch.__version__}".encode()).hexdigest()[:12]
    return f"{platform.machine()}-{digest}"


def build_directory() -> Path:
    from xquant_vllm.bundled import cache_root

    return cache_root() / "torch-extensions" / _cpu_tag()


@functools.cache
def load_extension():
    """``torch.ops.xquant_cpu``, compiled on first use (cached per machine); raises if the build fails."""
    from torch.utils import cpp_extension

    folder = build_directory()
    folder.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="xquant_cpu",
        sources=[str(p) for p in SOURCES],
        extra_cflags=CFLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(folder),
        is_python_module=False,
        verbose=False,
    )
    return torch.ops.xquant_cpu


def supported(lq: LayerQuant) -> bool:
    """Shapes the extension handles (every preset's; the rest take the PyTorch path)."""
    return lq.k_group % 16 == 0 and lq.head_size % 64 == 0 and lq.v_group % 16 == 0


@functools.lru_cache(maxsize=1024)
def _layout_args(layout: PageLayout, lower_layout: PageLayout | None, k_shared: bool, v_shared: bool) -> list[int]:
    """The 13 numbers the extension reads a page with (code offsets of the lower page where codes are borrowed)."""
    if (k_shared or v_shared) and lower_layout is None:
        raise ValueError("lower_layout: a layer that shares codes needs its lower partner's layout")
    k_off = lower_layout.k_codes_off if k_shared else layout.k_codes_off
    v_off = lower_layout.v_codes_off if v_shared else layout.v_codes_off
    return [
        layout.block, layout.head_size, layout.v_group, layout.k_bits, layout.v_bits, layout.meta_bits,
        layout.super_off, k_off, v_off, int(k_shared), int(v_shared), layout.k_meta_off, layout.v_meta_off,
    ]  # fmt: skip


def paged_attention_cpu(
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
    """Same contract as :func:`.torch_ops.paged_attention_torch` (fills every row of ``out``)."""
    if not supported(lq):
        paged_attention_torch(
            query, key, value, pages, tail_k, tail_v, plan, lq, layout, scale, out, lower_pages, lower_layout
        )
        return
    if (lq.k_shared or lq.v_shared) and lower_pages is None:
        raise ValueError(f"lower_pages/lower_layout: layer {lq.index} shares codes with layer {lq.index - 1}")
    load_extension().paged_attention(
        query, key, value, pages, tail_k, tail_v, plan.query_start_loc, plan.past_lens, plan.block_table,
        plan.tail_slot, lower_pages, _layout_args(layout, lower_layout, lq.k_shared, lq.v_shared),
        lq.k_eta, lq.v_eta, scale, out,
    )  # fmt: skip


def store_kv_cpu(
    key: torch.Tensor,
    value: torch.Tensor,
    pages: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    plan: StepPlan,
    lq: LayerQuant,
    layout: PageLayout,
) -> None:
    """Same contract as :func:`.torch_ops.store_kv_torch`, the same bytes."""
    if getattr(plan, "device_store", False):  # a plan without the store's index arrays (GPU decode graphs)
        store_kv_torch(key, value, pages, tail_k, tail_v, plan, lq, layout)
        return
    load_extension().store_kv(
        key, value, pages, tail_k, tail_v, plan.full_block_ids, plan.full_tail_slot, plan.full_tail_count,
        plan.full_row_start, plan.tail_rows, plan.tail_dst, _store_layout(layout), lq.k_eta, lq.v_eta,
    )  # fmt: skip


@functools.lru_cache(maxsize=1024)
def _store_layout(layout: PageLayout) -> list[int]:
    return [
        layout.block, layout.head_size, layout.v_group, layout.k_bits, layout.v_bits, layout.meta_bits,
        layout.super_off, layout.k_codes_off, layout.v_codes_off, layout.k_meta_off, layout.v_meta_off,
        layout.page_bytes,
    ]  # fmt: skip


def main() -> int:
    """Build the extension ahead of the first engine (``python -m xquant_vllm.kernels.cpu_attention``)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load_extension()
    logger.info("xquant CPU extension ready in %s", build_directory())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
