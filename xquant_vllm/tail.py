"""Tail slots: where each running request keeps its newest tokens that do not yet fill a block.

A slot belongs to a request for its whole life: vLLM's model runner reports, each step, the request id of every
batch row and the ids it finished, aborted or preempted since the last step (:func:`install_runner_hooks`), and
:class:`TailSlots` maps ids to slots on the host from that alone: no block ids, no device reads, and a slot is free
again the step vLLM drops its request. A preempted request restarts from a block boundary (its recompute, or a
prefix-cache hit of whole blocks), so it never needs the tail it lost; a new owner of a slot reads only the
positions it wrote itself (attention reads ``past % B`` tail rows, all written after the request started).

Sizing: one slot per running sequence (``max_num_seqs``) plus :data:`SLOT_MARGIN`, one of which is the backend's
scratch slot (rows of dummy runs, which belong to no request).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterable, Sequence

SLOT_MARGIN = 4


class TailSlotsExhaustedError(RuntimeError):
    pass


class TailSlots:
    """Request id -> tail slot, assigned at a request's first step and released when vLLM drops it."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots={num_slots} must be >= 1")
        self.num_slots = num_slots
        self._slot_of: dict[str, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest slot first

    @property
    def owners(self) -> dict[str, int]:
        """Request id -> slot, for every request that holds one."""
        return dict(self._slot_of)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def release(self, req_ids: Iterable[str]) -> None:
        for req_id in req_ids:
            slot = self._slot_of.pop(req_id, None)
            if slot is not None:
                self._free.append(slot)

    def assign(self, req_ids: Sequence[str]) -> list[int]:
        """The slot of each batch row's request (new requests take a free slot)."""
        slots = []
        for req_id in req_ids:
            slot = self._slot_of.get(req_id)
            if slot is None:
                if not self._free:
                    raise TailSlotsExhaustedError(
                        f"all {self.num_slots} tail slots are held by running requests; num_tail_slots must be at "
                        "least max_num_seqs (it is max_num_seqs + SLOT_MARGIN unless changed)"
                    )
                slot = self._slot_of[req_id] = self._free.pop()
            slots.append(slot)
        return slots


class RunnerFeed:
    """The model runner's report of each step, applied to the tail slots of the engine it belongs to.

    Slots are released the step vLLM reports a request finished, aborted or preempted (before any new request of
    that step takes one); the rows' slots wait for the step's planner (:meth:`take`).
    """

    def __init__(self) -> None:
        self._config: weakref.ref | None = None
        self._slots: TailSlots | None = None
        self._rows: list[int] | None = None

    def bind(self, vllm_config, slots: TailSlots) -> None:
        """Feed ``slots`` from the runner of the engine whose config is ``vllm_config`` (the newest engine wins)."""
        self._config, self._slots, self._rows = weakref.ref(vllm_config), slots, None

    @property
    def slots(self) -> TailSlots | None:
        """The tail slots this feed serves (the newest xquant engine's of the process)."""
        return self._slots

    def _ours(self, vllm_config) -> bool:
        return self._slots is not None and self._config is not None and self._config() is vllm_config

    def drop(self, vllm_config, finished: Iterable[str], preempted: Iterable[str] | None) -> None:
        """Free the slots of requests vLLM finished, aborted or preempted (whether or not the step runs)."""
        if self._ours(vllm_config):  # else an engine without an xquant cache
            self._slots.release(finished)
            self._slots.release(preempted or ())

    def rows(self, vllm_config, req_ids: Sequence[str]) -> None:
        """The request ids of this step's batch rows, in order."""
        if self._ours(vllm_config):
            self._rows = self._slots.assign(req_ids)

    def report(
        self, vllm_config, req_ids: Sequence[str], finished: Iterable[str], preempted: Iterable[str] | None
    ) -> None:
        self.drop(vllm_config, finished, preempted)
        self.rows(vllm_config, req_ids)

    def take(self) -> list[int] | None:
        """The slots of this step's rows, once; None in dummy runs (profiling, warm-up), which no step reported."""
        rows, self._rows = self._rows, None
        return rows


FEED = RunnerFeed()  # one model runner per worker process


def install_runner_hooks() -> None:
    """Report every step's rows and dropped requests to :data:`FEED`, on both of vLLM's model runners (idempotent).

    The batch knows rows, not requests; vLLM offers no public hook for either, so the runners' step entries are
    wrapped (checked on vLLM 0.32 and 0.26).

    V1 (``gpu_model_runner.GPUModelRunner``, also the CPU runner's base): after ``_update_states`` the persistent
    batch holds this step's rows in order. V2 (``gpu.model_runner.GPUModelRunner``, 0.26's GPU default):
    ``finish_requests`` gets the dropped ids, ``prepare_inputs`` returns the step's ``InputBatch``. Dummy runs (profiling, warm-up, graph capture) pass
    through neither, so they report no rows: the backend puts them on its scratch slot.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as RunnerV1

    from xquant_vllm.vllm_compat import _wrap

    def v1(original: Callable) -> Callable:
        @functools.wraps(original)
        def _update_states(self, scheduler_output, *args, **kwargs):
            result = original(self, scheduler_output, *args, **kwargs)
            FEED.report(self.vllm_config, self.input_batch.req_ids, scheduler_output.finished_req_ids, scheduler_output.preempted_req_ids)
            return result

        return _update_states

    _wrap(RunnerV1, "_update_states", v1)
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as RunnerV2
    except ImportError:  # builds without the V2 runner (it needs Triton)
        return

    def v2_drop(original: Callable) -> Callable:
        @functools.wraps(original)
        def finish_requests(self, scheduler_output, *args, **kwargs):
            FEED.drop(self.vllm_config, scheduler_output.finished_req_ids, scheduler_output.preempted_req_ids)
            return original(self, scheduler_output, *args, **kwargs)

        return finish_requests

    def v2_rows(original: Callable) -> Callable:
        @functools.wraps(original)
        def prepare_inputs(self, scheduler_output, *args, **kwargs):
            batch = original(self, scheduler_output, *args, **kwargs)
            FEED.rows(self.vllm_config, batch.req_ids)
            return batch

        return prepare_inputs

    # V2 frees in finish_requests even in steps that run nothing (its warm-up ends with such a step)
    _wrap(RunnerV2, "finish_requests", v2_drop)
    _wrap(RunnerV2, "prepare_inputs", v2_rows)
