"""The kernel interface in plain PyTorch: the CPU serving path, and a readable twin of the Triton kernels.

Quantization and page (de)serialisation are the reference code itself (``quantize_layer``/``write_pages`` to
store, ``read_pages``/``dequantize_layer`` to read), so the numbers are the reference's by construction. What
this module adds is batching, to keep Python overhead per layer small:

* store: one gather of every block the step completes, one quantizer call, one page scatter, one tail scatter;
* attention: requests are split into groups once per step (all decode requests, sorted by length and cut to a
  token budget; each prefill chunk alone); per layer and group, only the blocks the group reads are
  dequantized, the keys/values are gathered into a padded ``[R, L, H, D]`` batch and one masked
  ``scaled_dot_product_attention`` call (fp32, like the reference) computes every row.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from xquant_vllm.config import LayerQuant
from xquant_vllm.layout import PageLayout, read_pages, write_pages
from xquant_vllm.quant.kv import dequantize_layer, quantize_layer

from .plan import StepPlan

# Padded tokens (requests x longest history) of one decode group: bounds the fp32 K/V gather.
GROUP_TOKEN_BUDGET = 1 << 15


# ---- store ----------------------------------------------------------------------------------------------------


def store_kv_torch(
    key: torch.Tensor,
    value: torch.Tensor,
    pages: torch.Tensor,
    tail_k: torch.Tensor,
    tail_v: torch.Tensor,
    plan: StepPlan,
    lq: LayerQuant,
    layout: PageLayout,
) -> None:
    """Quantize the blocks this step completes into ``pages``, then move the leftover rows into the tail."""
    if plan.full_block_ids.numel():
        q = quantize_layer(_completed_blocks(key, tail_k, plan), _completed_blocks(value, tail_v, plan), lq)
        pages[plan.full_block_ids.long()] = write_pages(q, layout, key.dtype)
    if plan.tail_rows.numel():
        B = plan.block_size
        dst, rows = plan.tail_dst.long(), plan.tail_rows.long()
        tail_k[dst // B, :, dst % B] = key[rows]
        tail_v[dst // B, :, dst % B] = value[rows]


def _completed_blocks(new: torch.Tensor, tail: torch.Tensor, plan: StepPlan) -> torch.Tensor:
    """The tokens of every completed block, [NF * B, H, D]: the first ``full_tail_count`` from the tail slot."""
    B = plan.block_size
    pos = torch.arange(B, device=new.device)
    count = plan.full_tail_count.long().unsqueeze(1)
    rows = (plan.full_row_start.long().unsqueeze(1) + pos - count).clamp(0, new.shape[0] - 1)  # [NF, B]
    slots = plan.full_tail_slot.long().unsqueeze(1).expand_as(rows)
    old = tail[slots, :, pos.expand_as(rows)]  # [NF, B, H, D]
    from_tail = (pos < count)[..., None, None]
    return torch.where(from_tail, old, new[rows]).flatten(0, 1)


# ---- attention ------------------------------------------------------------------------------------------------


@dataclass
class _Group:
    """Index tensors of one padded attention batch (derived from the plan once, shared by all layers).

    Keys/values of the group are gathered from ``src = cat(dequantized blocks, tail rows, new rows)``.
    """

    block_ids: torch.Tensor  # [NB] pages to dequantize, in the order of src
    tail_slot: torch.Tensor  # [NT] tail rows of src: slot ...
    tail_pos: torch.Tensor  # [NT] ... and position in the slot
    new_rows: torch.Tensor  # [NN] rows of key/value in src
    kv_index: torch.Tensor  # [R, L] row of src for each history position (padding: any valid row)
    q_rows: torch.Tensor  # [R, Q] row of query/out (padding repeats the last row)
    q_valid: torch.Tensor  # [R, Q] bool
    mask: torch.Tensor  # [R, 1, Q, L] bool: what each query row attends to


_last_plan: tuple[weakref.ref | None, list[_Group]] = (None, [])


def _groups_of(plan: StepPlan) -> list[_Group]:
    """Attention groups of ``plan``, memoized for the latest plan (every layer of a step passes the same one)."""
    global _last_plan
    ref, groups = _last_plan
    if ref is None or ref() is not plan:
        groups = _build_groups(plan)
        _last_plan = (weakref.ref(plan), groups)
    return groups


def _build_groups(plan: StepPlan) -> list[_Group]:
    qsl = plan.query_start_loc.tolist()
    past = plan.past_lens.tolist()
    q_lens = [qsl[r + 1] - qsl[r] for r in range(plan.num_reqs)]
    decode = sorted((r for r in range(plan.num_reqs) if q_lens[r] == 1), key=lambda r: past[r])
    chunks: list[list[int]] = [[r] for r in range(plan.num_reqs) if q_lens[r] > 1]
    batch: list[int] = []
    for r in decode:  # ascending length: the last request of a batch is its longest
        if batch and (len(batch) + 1) * (past[r] + 1) > GROUP_TOKEN_BUDGET:
            chunks.append(batch)
            batch = []
        batch.append(r)
    if batch:
        chunks.append(batch)
    return [_build_group(plan, reqs, qsl, past) for reqs in chunks]


def _build_group(plan: StepPlan, reqs: list[int], qsl: list[int], past: list[int]) -> _Group:
    B = plan.block_size
    dev = plan.block_table.device
    n_blocks = [past[r] // B for r in reqs]
    n_tail = [past[r] % B for r in reqs]
    q_lens = [qsl[r + 1] - qsl[r] for r in reqs]
    tail_base, new_base = B * sum(n_blocks), B * sum(n_blocks) + sum(n_tail)
    L, Q = max(p + q for p, q in zip((past[r] for r in reqs), q_lens)), max(q_lens)

    kv_index = torch.zeros(len(reqs), L, dtype=torch.long)
    q_rows = torch.zeros(len(reqs), Q, dtype=torch.long)
    seen = torch.zeros(len(reqs), Q, dtype=torch.long)  # history positions each query row sees
    block_ids, tail_slot, tail_pos, new_rows = [], [], [], []
    nb_off = nt_off = nn_off = 0
    for i, r in enumerate(reqs):
        nb, nt, nq = n_blocks[i], n_tail[i], q_lens[i]
        block_ids.append(plan.block_table[r, :nb].long().cpu())
        tail_slot.append(torch.full((nt,), int(plan.tail_slot[r])))
        tail_pos.append(torch.arange(nt))
        new_rows.append(torch.arange(qsl[r], qsl[r] + nq))
        kv_index[i, : nb * B] = torch.arange(nb_off, nb_off + nb * B)
        kv_index[i, nb * B : nb * B + nt] = torch.arange(tail_base + nt_off, tail_base + nt_off + nt)
        kv_index[i, nb * B + nt : nb * B + nt + nq] = torch.arange(new_base + nn_off, new_base + nn_off + nq)
        rows = torch.arange(Q).clamp(max=nq - 1)
        q_rows[i] = qsl[r] + rows
        seen[i] = past[r] + rows + 1
        nb_off, nt_off, nn_off = nb_off + nb * B, nt_off + nt, nn_off + nq
    q_valid = torch.arange(Q).unsqueeze(0) < torch.tensor(q_lens).unsqueeze(1)
    mask = torch.arange(L).view(1, 1, L) < seen.unsqueeze(-1)
    to = lambda t: t.to(dev)  # noqa: E731
    return _Group(
        block_ids=to(torch.cat(block_ids)),
        tail_slot=to(torch.cat(tail_slot)),
        tail_pos=to(torch.cat(tail_pos)),
        new_rows=to(torch.cat(new_rows)),
        kv_index=to(kv_index),
        q_rows=to(q_rows),
        q_valid=to(q_valid),
        mask=to(mask.unsqueeze(1)),
    )


def paged_attention_torch(
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
    """Past-only paged attention (see the interface in ``xquant_vllm.kernels``); writes every row of ``out``."""
    num_rows = int(plan.query_start_loc[-1])
    out[num_rows:].zero_()  # rows past the batch (padding) belong to no request
    for g in _groups_of(plan):
        k_hat, v_hat = _dequantized_blocks(g.block_ids, pages, lq, layout, key.dtype, lower_pages, lower_layout)
        k_src = torch.cat([k_hat, tail_k[g.tail_slot, :, g.tail_pos], key[g.new_rows]])
        v_src = torch.cat([v_hat, tail_v[g.tail_slot, :, g.tail_pos], value[g.new_rows]])
        res = F.scaled_dot_product_attention(
            query[g.q_rows].float().transpose(1, 2),  # [R, Hq, Q, D]
            k_src[g.kv_index].float().transpose(1, 2),  # [R, H, L, D]
            v_src[g.kv_index].float().transpose(1, 2),
            attn_mask=g.mask,
            scale=scale,
            enable_gqa=True,
        ).transpose(1, 2)  # [R, Q, Hq, D]
        out[g.q_rows[g.q_valid]] = res[g.q_valid].to(out.dtype)


def _dequantized_blocks(
    block_ids: torch.Tensor,
    pages: torch.Tensor,
    lq: LayerQuant,
    layout: PageLayout,
    dtype: torch.dtype,
    lower_pages: torch.Tensor | None,
    lower_layout: PageLayout | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(K_hat, V_hat)`` [len(block_ids) * B, H, D] in ``dtype``, the blocks in the given order."""
    H, D = pages.shape[1], layout.head_size
    if not block_ids.numel():
        empty = torch.empty(0, H, D, dtype=dtype, device=pages.device)
        return empty, empty
    lower = None
    if lq.k_shared or lq.v_shared:
        if lower_pages is None or lower_layout is None:
            raise ValueError(f"lower_pages/lower_layout: layer {lq.index} shares codes with layer {lq.index - 1}")
        lower = read_pages(lower_pages[block_ids], lower_layout, dtype)
    return dequantize_layer(read_pages(pages[block_ids], layout, dtype), lq, dtype, lower)
