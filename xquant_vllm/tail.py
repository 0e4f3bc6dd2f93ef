"""Tail slots: where each running sequence keeps its newest tokens that do not yet fill a block.

The attention backend sees no request ids and hears of no finished, aborted or preempted request: each step
it gets only, per batch row, the tokens already cached (``past``), the tokens after the step (``seq``) and the
row's block table. A partially filled block belongs to exactly one running request (prefix caching shares
full blocks only), so a tail slot is keyed by the id of the partial block it shadows:

* a row whose ``past % B != 0`` continues a block: that block id must already own a slot
  (else :class:`TailLostError`, never a silent wrong answer);
* when the row completes that block and starts another, the slot moves to the new block id;
* a block first written at in-block offset 0 is new by definition: a stale mapping of the same id (left by a
  request that ended) is taken over;
* slots of ended requests are reclaimed that way, or, when no slot is free, the least recently used slot that
  no row of the current step touches. A slot released in a step becomes free at the next step, so the store
  of the current step can still read it.

Sizing: one slot per running sequence (``max_num_seqs``) plus :data:`SLOT_MARGIN`.
"""

from __future__ import annotations

from collections.abc import Sequence

SLOT_MARGIN = 4
NO_SLOT = -1


class TailLostError(RuntimeError):
    pass


class TailSlotsExhaustedError(RuntimeError):
    pass


class TailAllocator:
    """Maps partial block ids to tail slots, one step at a time (pure Python, no tensors)."""

    def __init__(self, num_slots: int, block_size: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        self.num_slots = num_slots
        self.block_size = block_size
        self._slot_of: dict[int, int] = {}  # partial block id -> slot
        self._block_of: list[int | None] = [None] * num_slots
        self._last_step = [-1] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest slot first
        self._released: list[int] = []  # free from the next step on
        self._step = 0

    @property
    def mapped(self) -> dict[int, int]:
        """Partial block id -> slot, for every slot that still holds a (possibly ended) request's tail."""
        return dict(self._slot_of)

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._released)

    def assign(self, past_lens: Sequence[int], seq_lens: Sequence[int], block_table: Sequence[Sequence[int]]) -> list[int]:
        """Slots for one step's rows (``NO_SLOT`` where a row has no tail before or after the step)."""
        B = self.block_size
        self._step += 1
        self._free.extend(self._released)
        self._released.clear()
        slots = [NO_SLOT] * len(past_lens)
        for r, past in enumerate(past_lens):  # first, every tail the step reads: those are never evicted
            if past % B:
                block = int(block_table[r][past // B])
                slot = self._slot_of.get(block)
                if slot is None:
                    raise TailLostError(
                        f"batch row {r}: positions {past - past % B}..{past - 1} of block {block} are not in any tail "
                        f"slot ({len(self._slot_of)} of {self.num_slots} slots mapped); this is a bug: please report it"
                    )
                slots[r] = slot
                self._last_step[slot] = self._step
        for r, (past, seq) in enumerate(zip(past_lens, seq_lens)):
            if seq == past:
                continue
            new_block = int(block_table[r][seq // B]) if seq % B else None
            if past % B and seq // B == past // B:
                continue  # the same partial block grows
            if past % B:  # the old partial block completes this step: its slot moves on or is released
                slot = slots[r]
                del self._slot_of[int(block_table[r][past // B])]
                self._block_of[slot] = None
                if new_block is None:
                    self._released.append(slot)
                    continue
                self._drop_stale(new_block)
            elif new_block is None:
                continue
            else:  # a block written from offset 0: new, whatever the id meant before
                slot = self._slot_of.get(new_block)
                if slot is None:
                    slot = self._take()
                slots[r] = slot
            self._slot_of[new_block] = slot
            self._block_of[slot] = new_block
            self._last_step[slot] = self._step
        return slots

    def _drop_stale(self, block: int) -> None:
        slot = self._slot_of.pop(block, None)
        if slot is not None:
            self._block_of[slot] = None
            self._released.append(slot)

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        idle = [s for s in range(self.num_slots) if self._last_step[s] < self._step and self._block_of[s] is not None]
        if not idle:
            raise TailSlotsExhaustedError(
                f"all {self.num_slots} tail slots hold tails of this step's rows; num_tail_slots must be at least "
                "max_num_seqs (it is max_num_seqs + SLOT_MARGIN unless changed)"
            )
        slot = min(idle, key=self._last_step.__getitem__)
        del self._slot_of[self._block_of[slot]]
        self._block_of[slot] = None
        return slot
