"""Random batches for the kernel tests (PyTorch path and Triton kernels alike), with reference expectations.

A :class:`KernelCase` is one step of a batch of requests with ragged past lengths: random non-zero histories,
the cache state before the step filled through the *reference* path (``quantize_layer`` + ``write_pages`` for
whole blocks, a plain copy for the tail), shuffled non-contiguous block ids and tail slots, unused pages and
tail rows poisoned, and the step's plan. It knows the expected attention output (``reference_attention`` per
request) and the expected cache after the store. :class:`CacheSim` drives several steps through the
implementation under test, so that store -> attend is checked over a growing history.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from xquant_vllm.kernels import StepPlan, build_step_plan

from xquant_vllm.config import LayerQuant, make_config
from xquant_vllm.layout import PageLayout, page_layout, write_pages
from xquant_vllm.quant.attention import reference_attention
from xquant_vllm.quant.kv import quantize_layer

PAGE_POISON = 0xA5  # byte of every page the reference did not write
TAIL_POISON = 77.0  # finite, so a kernel that reads an unused tail row gets a visibly wrong answer


def ragged_past_lens(B: int) -> list[int]:
    """Past lengths every attention test covers: 0, 1, a partial block, a block, blocks plus a tail."""
    return [0, 1, B // 2 + 1, B, 2 * B + 3]


def layer_pair(
    k_bits: int = 2,
    v_bits: int = 2,
    *,
    head_size: int = 64,
    block: int = 16,
    v_group: int = 16,
    meta_bits: int = 16,
    k_shared: bool = False,
    v_shared: bool = False,
) -> tuple[LayerQuant, LayerQuant]:
    """``(layer 1, layer 0)`` of a two-layer xquant config; layer 1 borrows layer 0's codes where asked."""
    cfg = make_config(
        "xquant",
        num_layers=2,
        head_size=head_size,
        overrides=dict(
            k_bits_high=k_bits, k_bits_low=k_bits, k_high_layers=2,
            v_bits_high=v_bits, v_bits_low=v_bits, v_high_layers=2,
            k_share_from=1 if k_shared else None, v_share_from=1 if v_shared else None,
            k_group=block, v_group=v_group, meta_bits=meta_bits,
        ),
    )  # fmt: skip
    return cfg.layer(1), cfg.layer(0)


def random_kv(n: int, H: int, D: int, dtype: torch.dtype, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with per-channel offsets and spreads (as after RoPE), values roughly standard; no constant groups."""
    offset = torch.randn(1, H, D, generator=gen) * 2
    spread = 0.25 + torch.rand(1, H, D, generator=gen) * 2
    k = torch.randn(n, H, D, generator=gen) * spread + offset
    v = torch.randn(n, H, D, generator=gen)
    return k.to(dtype), v.to(dtype)


HistoryFn = Callable[[int, int, int, torch.dtype, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class KernelCase:
    """One step of a batch; the cache tensors hold the state *before* the step."""

    lq: LayerQuant
    layout: PageLayout
    dtype: torch.dtype
    past_lens: list[int]
    q_lens: list[int]
    hist_k: list[torch.Tensor]  # per request [past + q, H, D]: the whole history including this step
    hist_v: list[torch.Tensor]
    query: torch.Tensor  # [T, Hq, D]
    key: torch.Tensor  # [T, H, D] this step's rows
    value: torch.Tensor
    pages: torch.Tensor  # [num_blocks, H, page_bytes]
    tail_k: torch.Tensor  # [slots, H, B, D]
    tail_v: torch.Tensor
    plan: StepPlan
    scale: float
    lower_lq: LayerQuant | None = None  # set when lq borrows codes from its lower partner
    lower_layout: PageLayout | None = None
    lower_pages: torch.Tensor | None = None
    lower_hist_k: list[torch.Tensor] = field(default_factory=list)
    lower_hist_v: list[torch.Tensor] = field(default_factory=list)

    @property
    def block(self) -> int:
        return self.lq.k_group

    def to(self, device: torch.device | str) -> KernelCase:
        """A copy with every tensor (the plan's too) on ``device``."""

        def move(x):
            if isinstance(x, torch.Tensor):
                return x.to(device)
            return [move(t) for t in x] if isinstance(x, list) else x

        plan = replace(self.plan, **{f.name: move(getattr(self.plan, f.name)) for f in fields(self.plan)})
        return replace(
            self, plan=plan, **{f.name: move(getattr(self, f.name)) for f in fields(self) if f.name != "plan"}
        )

    def poisoned_out(self) -> torch.Tensor:
        return torch.full_like(self.query, float("nan"))

    def attention_args(self, out: torch.Tensor) -> tuple:
        """Positional arguments of ``paged_attention`` for this case."""
        return (
            self.query, self.key, self.value, self.pages, self.tail_k, self.tail_v, self.plan, self.lq,
            self.layout, self.scale, out, self.lower_pages, self.lower_layout,
        )  # fmt: skip

    def store_args(self) -> tuple:
        """Positional arguments of ``store_kv``: the tensors it writes are this case's own (clone first)."""
        return self.key, self.value, self.pages, self.tail_k, self.tail_v, self.plan, self.lq, self.layout

    def expected_attention(self) -> torch.Tensor:
        outs = []
        for r, (p, n) in enumerate(zip(self.past_lens, self.q_lens)):
            qs = sum(self.q_lens[:r])
            lower = (self.lower_hist_k[r], self.lower_hist_v[r]) if self.lower_lq is not None else None
            q = self.query[qs : qs + n]
            outs.append(reference_attention(q, self.hist_k[r], self.hist_v[r], p, self.lq, self.scale, lower))
        return torch.cat(outs)

    def expected_store(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(pages, tail_k, tail_v)`` after the step's store, from the reference quantizer."""
        B = self.block
        pages, tail_k, tail_v = self.pages.clone(), self.tail_k.clone(), self.tail_v.clone()
        for r, (p, n) in enumerate(zip(self.past_lens, self.q_lens)):
            end = p + n
            first, last = p // B, end // B
            if last > first:
                ids = self.plan.block_table[r, first:last].long()
                pages[ids] = _reference_pages(
                    self.hist_k[r][first * B : last * B], self.hist_v[r][first * B : last * B], self.lq, self.layout
                )
            slot, left = int(self.plan.tail_slot[r]), end % B
            tail_k[slot, :, :left] = self.hist_k[r][last * B : end].transpose(0, 1)
            tail_v[slot, :, :left] = self.hist_v[r][last * B : end].transpose(0, 1)
        return pages, tail_k, tail_v


def _reference_pages(k: torch.Tensor, v: torch.Tensor, lq: LayerQuant, layout: PageLayout) -> torch.Tensor:
    return write_pages(quantize_layer(k, v, lq), layout, k.dtype)


def make_case(
    lq: LayerQuant,
    *,
    past_lens: list[int],
    q_lens: list[int],
    num_kv_heads: int = 1,
    num_q_heads: int = 1,
    dtype: torch.dtype = torch.float16,
    lower_lq: LayerQuant | None = None,
    spare_blocks: int = 3,
    seed: int = 0,
    history: HistoryFn = random_kv,
) -> KernelCase:
    """A random step; ``lower_lq`` is required when ``lq`` shares codes (pass ``layer_pair``'s second item).

    ``history(n, H, D, dtype, generator)`` makes a request's keys and values (default :func:`random_kv`).
    """
    if (lq.k_shared or lq.v_shared) and lower_lq is None:
        raise ValueError(f"lower_lq: layer {lq.index} shares codes, the case needs its lower partner")
    gen = torch.Generator().manual_seed(seed)
    B, H, D = lq.k_group, num_kv_heads, lq.head_size
    totals = [p + n for p, n in zip(past_lens, q_lens)]
    hist = [history(t, H, D, dtype, gen) for t in totals]
    lower_hist = [history(t, H, D, dtype, gen) for t in totals] if lower_lq is not None else []

    block_table, tail_slot, num_blocks = _allocate(totals, B, spare_blocks, gen)
    plan = build_step_plan(_start_locs(q_lens), torch.tensor(past_lens, dtype=torch.int32), block_table, tail_slot, B)

    layout = page_layout(lq, dtype)
    pages, tail_k, tail_v = _fill_cache(lq, layout, hist, past_lens, plan, num_blocks)
    lower_layout = lower_pages = None
    if lower_lq is not None:
        lower_layout = page_layout(lower_lq, dtype)
        lower_pages = _fill_cache(lower_lq, lower_layout, lower_hist, past_lens, plan, num_blocks)[0]

    rows = lambda t: torch.cat([h[p:] for h, p in zip(t, past_lens)])  # noqa: E731
    Hq = num_q_heads
    return KernelCase(
        lq=lq, layout=layout, dtype=dtype, past_lens=list(past_lens), q_lens=list(q_lens),
        hist_k=[k for k, _ in hist], hist_v=[v for _, v in hist],
        query=torch.randn(sum(q_lens), Hq, D, generator=gen).to(dtype),
        key=rows([k for k, _ in hist]), value=rows([v for _, v in hist]),
        pages=pages, tail_k=tail_k, tail_v=tail_v, plan=plan, scale=D**-0.5,
        lower_lq=lower_lq, lower_layout=lower_layout, lower_pages=lower_pages,
        lower_hist_k=[k for k, _ in lower_hist], lower_hist_v=[v for _, v in lower_hist],
    )  # fmt: skip


def _start_locs(q_lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)


def _allocate(totals: list[int], B: int, spare: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Shuffled, non-contiguous block ids (room for each whole history) and tail slots (two spare ones)."""
    R, need = len(totals), [-(-t // B) for t in totals]
    ids = torch.randperm(sum(need) + spare, generator=gen).to(torch.int32)
    block_table = torch.zeros(R, max(need + [1]), dtype=torch.int32)
    starts = torch.tensor([0] + need).cumsum(0).tolist()
    for r in range(R):
        block_table[r, : need[r]] = ids[starts[r] : starts[r + 1]]
    return block_table, torch.randperm(R + 2, generator=gen)[:R].to(torch.int32), int(ids.numel())


def _fill_cache(
    lq: LayerQuant,
    layout: PageLayout,
    hist: list[tuple[torch.Tensor, torch.Tensor]],
    past_lens: list[int],
    plan: StepPlan,
    num_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pages and tails holding each request's past, written by the reference; everything else poisoned."""
    B, D = lq.k_group, lq.head_size
    H, dtype = hist[0][0].shape[1], hist[0][0].dtype
    pages = torch.full((num_blocks, H, layout.page_bytes), PAGE_POISON, dtype=torch.uint8)
    slots = plan.tail_slot.numel() + 2
    tail_k = torch.full((slots, H, B, D), TAIL_POISON, dtype=dtype)
    tail_v = torch.full((slots, H, B, D), TAIL_POISON, dtype=dtype)
    for r, ((k, v), p) in enumerate(zip(hist, past_lens)):
        nb = p // B
        if nb:
            pages[plan.block_table[r, :nb].long()] = _reference_pages(k[: nb * B], v[: nb * B], lq, layout)
        slot = int(plan.tail_slot[r])
        tail_k[slot, :, : p - nb * B] = k[nb * B : p].transpose(0, 1)
        tail_v[slot, :, : p - nb * B] = v[nb * B : p].transpose(0, 1)
    return pages, tail_k, tail_v


StoreFn = Callable[..., None]
AttentionFn = Callable[..., None]


class CacheSim:
    """A batch growing over several steps through the store and attention functions under test.

    Every step attends (past-only) and then stores, for ``lq`` and, when it shares codes, for its lower partner
    first (so the borrowed codes are also the implementation's). :meth:`step` returns the output and the
    reference on the whole history so far.
    """

    def __init__(
        self,
        lq: LayerQuant,
        store: StoreFn,
        attend: AttentionFn,
        *,
        total_lens: list[int],
        num_kv_heads: int = 1,
        num_q_heads: int = 1,
        dtype: torch.dtype = torch.float16,
        lower_lq: LayerQuant | None = None,
        seed: int = 0,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.lq, self.lower_lq, self.store, self.attend, self.dtype = lq, lower_lq, store, attend, dtype
        B, D, H = lq.k_group, lq.head_size, num_kv_heads
        self.hist = [random_kv(t, H, D, dtype, gen) for t in total_lens]
        self.lower_hist = [random_kv(t, H, D, dtype, gen) for t in total_lens] if lower_lq else None
        self.queries = [torch.randn(t, num_q_heads, D, generator=gen).to(dtype) for t in total_lens]
        self.block_table, self.tail_slot, num_blocks = _allocate(total_lens, B, 2, gen)
        self.lens = [0] * len(total_lens)
        self.scale = D**-0.5
        empty = build_step_plan(
            _start_locs([0] * len(total_lens)), torch.tensor(self.lens), self.block_table, self.tail_slot, B
        )

        def cache(layer: LayerQuant, hist: list) -> tuple[PageLayout, torch.Tensor, torch.Tensor, torch.Tensor]:
            layout = page_layout(layer, dtype)
            return layout, *_fill_cache(layer, layout, hist, self.lens, empty, num_blocks)

        self.cache = cache(lq, self.hist)
        self.lower_cache = cache(lower_lq, self.lower_hist) if lower_lq else None

    def step(self, q_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance every request by ``q_lens`` tokens; ``(output, reference)`` of this step's rows."""
        past = self.lens
        plan = build_step_plan(
            _start_locs(q_lens),
            torch.tensor(past, dtype=torch.int32),
            self.block_table,
            self.tail_slot,
            self.lq.k_group,
        )
        chunk = lambda seqs: torch.cat([s[p : p + n] for s, p, n in zip(seqs, past, q_lens)])  # noqa: E731
        key, value, query = chunk([k for k, _ in self.hist]), chunk([v for _, v in self.hist]), chunk(self.queries)
        layout, pages, tail_k, tail_v = self.cache
        lower_layout = lower_pages = None
        if self.lower_cache is not None:
            lower_layout, lower_pages, ltk, ltv = self.lower_cache
            lk, lv = chunk([k for k, _ in self.lower_hist]), chunk([v for _, v in self.lower_hist])

        out = torch.full_like(query, float("nan"))
        self.attend(
            query, key, value, pages, tail_k, tail_v, plan, self.lq, layout, self.scale, out, lower_pages, lower_layout
        )
        if self.lower_cache is not None:
            self.store(lk, lv, lower_pages, ltk, ltv, plan, self.lower_lq, lower_layout)
        self.store(key, value, pages, tail_k, tail_v, plan, self.lq, layout)

        expected = []
        for r, (p, n) in enumerate(zip(past, q_lens)):
            k, v = self.hist[r][0][: p + n], self.hist[r][1][: p + n]
            lower = None
            if self.lower_hist is not None:
                lower = (self.lower_hist[r][0][: p + n], self.lower_hist[r][1][: p + n])
            expected.append(reference_attention(self.queries[r][p : p + n], k, v, p, self.lq, self.scale, lower))
        self.lens = [p + n for p, n in zip(past, q_lens)]
        return out, torch.cat(expected)
