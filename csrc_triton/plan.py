"""The per-step plan shared by the store and attention kernels (built once per step, used by every layer).

A step computes, for each request ``r``, ``q_len_r`` new tokens (rows ``query_start_loc[r]`` to
``query_start_loc[r+1]`` of the flat ``query/key/value`` arrays) after ``past_len_r`` tokens already cached.
Whole blocks of ``B`` tokens live quantized in pages (``block_table[r, j]`` is the page of tokens
``j*B .. j*B+B-1``); the newest ``past_len_r % B`` tokens wait at full precision in the request's tail slot
``tail_slot[r]`` (``tail_k/tail_v[slot, head, pos % B]``).

Attention reads the cache as it was *before* the step (past-only) plus the chunk itself; the store runs after
it, in two launches: first every block that this step completes is quantized (its first ``full_tail_count``
tokens come from the tail, the rest from the step's rows), then the rows that remain in a partial block are
written to the tail. The order matters because a completed block's tail slot is reused by the next block.

A decode step (one token per row) needs none of the store's index arrays: each row completes its block exactly
when ``past % B == B - 1``, which the store kernel decides on the device (``device_store``). Such a plan is made
of fixed-address buffers only, so a CUDA graph can capture the layers that read it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class StepPlan:
    block_size: int
    query_start_loc: torch.Tensor  # int32 [R+1]
    past_lens: torch.Tensor  # int32 [R]
    block_table: torch.Tensor  # int32 [R, max_blocks]
    tail_slot: torch.Tensor  # int32 [R]
    # store: blocks completed this step
    full_block_ids: torch.Tensor  # int32 [NF]
    full_tail_slot: torch.Tensor  # int32 [NF]
    full_tail_count: torch.Tensor  # int32 [NF] tokens of the block taken from the tail
    full_row_start: torch.Tensor  # int32 [NF] row of the block's first new token
    # store: rows that stay in the tail
    tail_rows: torch.Tensor  # int32 [NT]
    tail_dst: torch.Tensor  # int32 [NT] slot * B + position in block
    max_query_len: int
    max_past_len: int
    device_store: bool = False  # the store decides per row on the device; full_* and tail_* are empty

    @property
    def num_reqs(self) -> int:
        return self.past_lens.shape[0]

    def to(self, device: torch.device, block_table: torch.Tensor | None = None) -> StepPlan:
        """The plan on ``device`` in one host-to-device copy (every host index array packed into one buffer).

        Built on the host from what the scheduler already knows, a step's plan costs one copy instead of ~25 small
        kernels and ~6 device-to-host syncs. Arrays already on ``device`` stay where they are. ``block_table``:
        the device copy vLLM already holds, if any.
        """
        device = torch.device(device)
        arrays = {
            f.name: value
            for f in fields(self)
            if isinstance(value := getattr(self, f.name), torch.Tensor) and value.device.type != device.type
        }
        if block_table is not None:
            arrays.pop("block_table", None)
        if not arrays:
            return self if block_table is None else replace(self, block_table=block_table)
        flat = torch.cat([a.reshape(-1) for a in arrays.values()])
        if flat.device.type == "cpu" and device.type == "cuda":
            flat = flat.pin_memory()
        flat = flat.to(device, non_blocking=True)
        moved, offset = {}, 0
        for name, a in arrays.items():
            moved[name] = flat[offset : offset + a.numel()].view(a.shape)
            offset += a.numel()
        if block_table is not None:
            moved["block_table"] = block_table
        return replace(self, **moved)


def build_step_plan(
    query_start_loc: torch.Tensor,
    past_lens: torch.Tensor,
    block_table: torch.Tensor,
    tail_slot: torch.Tensor,
    block_size: int,
) -> StepPlan:
    """Derive the store plan from the batch description (vectorized, on the device of ``query_start_loc``).

    ``block_table`` may live elsewhere (vLLM's device copy while the rest is on the host): the ids of the completed
    blocks are gathered there, so the host never needs the table.
    """
    B = block_size
    qsl = query_start_loc.long()
    past = past_lens.long()
    q_lens = qsl[1:] - qsl[:-1]
    req = torch.repeat_interleave(torch.arange(q_lens.numel(), device=qsl.device), q_lens)
    rows = torch.arange(int(qsl[-1]), device=qsl.device)
    pos = past[req] + rows - qsl[req]
    seq_after = past + q_lens

    completes = pos % B == B - 1
    f_req, f_blk = req[completes], pos[completes] // B
    first_pos = torch.maximum(f_blk * B, past[f_req])
    table = block_table.long()
    full_ids = table[f_req.to(table.device), f_blk.to(table.device)]

    stays = pos >= (seq_after[req] // B) * B
    t_rows = rows[stays]
    t_dst = tail_slot.long()[req[stays]] * B + pos[stays] % B

    i32 = lambda t: t.to(torch.int32).contiguous()  # noqa: E731
    return StepPlan(
        block_size=B,
        query_start_loc=i32(qsl),
        past_lens=i32(past),
        block_table=i32(block_table),
        tail_slot=i32(tail_slot),
        full_block_ids=i32(full_ids),
        full_tail_slot=i32(tail_slot.long()[f_req]),
        full_tail_count=i32(past[f_req] - f_blk * B).clamp_(min=0),
        full_row_start=i32(qsl[f_req] + first_pos - past[f_req]),
        tail_rows=i32(t_rows),
        tail_dst=i32(t_dst),
        max_query_len=int(q_lens.max()) if q_lens.numel() else 0,
        max_past_len=int(past.max()) if past.numel() else 0,
    )
