"""Fast checks of the plugin without an engine: tail slots, dtype registration, selection, the CLI shim."""

from __future__ import annotations

from importlib.metadata import distributions
from pathlib import Path

import pytest

from xquant_vllm.tail import RunnerFeed, TailSlots, TailSlotsExhaustedError


def test_a_request_keeps_its_slot_until_vllm_drops_it() -> None:
    slots = TailSlots(3)
    assert slots.assign(["a", "b"]) == [0, 1]
    assert slots.assign(["b", "c", "a"]) == [1, 2, 0]  # rows move (reordering, condensing): slots do not
    slots.release(["b", "gone-before"])  # finished; an id without a slot is no error
    assert slots.owners == {"a": 0, "c": 2} and slots.num_free == 1
    assert slots.assign(["d", "a"]) == [1, 0]  # a new request takes the freed slot


def test_a_resubmitted_id_restarts_with_a_fresh_slot() -> None:
    slots = TailSlots(2)
    slots.assign(["x", "y"])
    slots.release(["x"])
    assert slots.assign(["y", "x"]) == [1, 0] and slots.num_free == 0


def test_exhaustion_names_the_setting() -> None:
    slots = TailSlots(1)
    slots.assign(["a"])
    with pytest.raises(TailSlotsExhaustedError, match="max_num_seqs"):
        slots.assign(["a", "b"])


class _Config:  # stands in for a VllmConfig: the feed only compares identities
    pass


def test_the_runner_feed_frees_dropped_requests_at_once_and_gives_rows_once() -> None:
    config, other = _Config(), _Config()
    slots, feed = TailSlots(2), RunnerFeed()
    feed.bind(config, slots)
    feed.report(config, ["a", "b"], set(), None)
    assert feed.take() == [0, 1]
    feed.report(config, [], {"a"}, {"b"})  # a step that builds no metadata still frees its dropped requests
    assert slots.owners == {} and slots.num_free == 2 and feed.take() == []
    feed.report(other, ["x"], set(), None)  # another engine of the process (e.g. auto): not ours
    assert feed.take() is None and slots.owners == {}  # and a dummy run after a step sees no rows


# ---- registration in a vLLM process -------------------------------------------------------------------

vllm = pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def registered() -> None:
    from xquant_vllm.plugin import register

    register()
    register()  # idempotent


def test_every_preset_is_a_cache_dtype_and_others_are_still_refused(registered) -> None:
    from pydantic import ValidationError
    from vllm.config import CacheConfig

    from xquant_vllm.config import PRESETS

    for name in (*PRESETS, "auto", "fp8"):
        assert CacheConfig(cache_dtype=name).cache_dtype == name
    with pytest.raises(ValidationError, match="cache_dtype"):
        CacheConfig(cache_dtype="xquant-bogus")


def test_cli_choices_list_the_presets(registered) -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    assert parser.parse_args(["--kv-cache-dtype", "xquant-max"]).kv_cache_dtype == "xquant-max"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "bogus"])


def test_selection_routes_presets_and_leaves_auto_alone(registered) -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.selector import AttentionSelectorConfig

    import torch

    from xquant_vllm.plugin import BACKEND_PATH, XQuantConfigError

    def pick(dtype: str, **kw) -> str:
        config = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype=dtype, block_size=32, **kw)
        return current_platform.get_attn_backend_cls(None, attn_selector_config=config)

    assert pick("xquant") == BACKEND_PATH
    assert pick("auto") != BACKEND_PATH
    with pytest.raises(XQuantConfigError, match="has_sliding_window"):
        pick("kivi-2", has_sliding_window=True)


def test_cli_shim_makes_vllm_a_known_distribution(tmp_path: Path) -> None:
    from xquant_vllm.vllm_compat import install_cli_shim

    info = install_cli_shim(tmp_path)
    assert info is not None and info.name.endswith("+cpu.dist-info")
    (dist,) = [d for d in distributions(path=[str(tmp_path)]) if d.metadata["Name"] == "vllm"]
    assert "cpu" in dist.version
    assert sorted(Path(f).name for f in dist.files) == ["INSTALLER", "METADATA", "RECORD"]
    assert install_cli_shim(tmp_path) is None  # already there


# ---- version shims (the vLLM 0.26 GPU build's interface, exercised on this vLLM) --------------------------


def test_backend_is_registered_under_a_name_vllm_resolves(registered) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from xquant_vllm.backend import XQuantBackend
    from xquant_vllm.plugin import BACKEND_PATH

    # vLLM looks each layer's backend up by get_name(): on 0.32 our own member, on 0.26 the reserved CUSTOM
    assert AttentionBackendEnum[XQuantBackend.get_name()].get_path() == BACKEND_PATH


def test_kv_cache_shape_views_a_layer_allocation_as_block_head_page() -> None:
    import torch

    from xquant_vllm.backend import XQuantBackend, _pages

    blocks, heads, page = 5, 3, 136  # 0.26 hands over each layer's bytes and infers the page size (-1)
    raw = torch.arange(blocks * heads * page, dtype=torch.int64).to(torch.uint8)
    shape = XQuantBackend.get_kv_cache_shape(blocks, 32, heads, 64, cache_dtype_str="xquant")
    assert shape.index(blocks) == 0  # how 0.26 finds the block dimension
    pages = _pages(raw.view(shape))
    assert pages.shape == (blocks, heads, page)
    assert torch.equal(pages[2, 1], raw[(2 * heads + 1) * page : (2 * heads + 2) * page])


def test_packed_spec_pages_are_what_the_layout_says_and_survive_pickling() -> None:
    import pickle

    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from xquant_vllm.packed_spec import PackedAttentionSpec
    from xquant_vllm.vllm_compat import packed_page_spec

    base = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.uint8)
    native = packed_page_spec(base, 32, 1000)  # this vLLM describes opaque pages natively
    assert (native.block_size, native.page_size_bytes) == (32, 8 * 1000)
    fields = {f: getattr(base, f) for f in ("num_kv_heads", "head_size", "dtype")}
    a = PackedAttentionSpec(block_size=32, head_page_bytes=1000, **fields)  # what 0.26 gets
    b = PackedAttentionSpec(block_size=32, head_page_bytes=600, **fields)
    assert (a.real_page_size_bytes, b.real_page_size_bytes) == (8000, 4800)  # 0.26's page_size_bytes reads this
    assert pickle.loads(pickle.dumps(a)) == a  # tensor-parallel workers send specs pickled
    assert PackedAttentionSpec.merge([a, a]) == a
    with pytest.raises(AssertionError):  # vLLM probes uniformity by catching AssertionError
        PackedAttentionSpec.merge([a, b])


def test_both_vllm_builds_in_use_are_checked_and_others_refused(monkeypatch) -> None:
    from xquant_vllm import vllm_compat

    assert {"0.32.0", "0.26.0"} <= set(vllm_compat.CHECKED_VERSIONS)
    monkeypatch.setattr(vllm_compat, "vllm_version", lambda: "0.30.1")
    with pytest.raises(vllm_compat.UnsupportedVLLMError, match="this is vLLM 0.30.1"):
        vllm_compat.require_checked_version()


def test_where_vllm_takes_no_new_backend_names_we_take_custom_and_never_steal_it(monkeypatch) -> None:
    import enum

    import vllm.v1.attention.backends.registry as registry

    from xquant_vllm import vllm_compat

    overrides: dict = {}

    class Backends(enum.Enum):  # vLLM 0.26's registry: fixed members, CUSTOM empty until registered
        FLASH_ATTN = "vllm.FlashAttentionBackend"
        CUSTOM = ""

        def get_path(self) -> str:
            if not (path := overrides.get(self, self.value)):
                raise ValueError(f"Backend {self.name} must be registered before use")
            return path

    def register_backend(backend, class_path=None, is_mamba=False):  # 0.26 stores a string key without error
        overrides[backend] = class_path

    monkeypatch.setattr(registry, "AttentionBackendEnum", Backends)
    monkeypatch.setattr(registry, "register_backend", register_backend)
    vllm_compat.register_attention_backend("XQUANT", "xquant_vllm.backend.XQuantBackend")
    vllm_compat.register_attention_backend("XQUANT", "xquant_vllm.backend.XQuantBackend")  # every process, again
    assert Backends.CUSTOM.get_path() == "xquant_vllm.backend.XQuantBackend"
    assert vllm_compat.attention_backend_name("XQUANT") == "CUSTOM"
    overrides[Backends.CUSTOM] = "other_plugin.Backend"
    with pytest.raises(vllm_compat.UnsupportedVLLMError, match="other_plugin.Backend"):
        vllm_compat.register_attention_backend("XQUANT", "xquant_vllm.backend.XQuantBackend")


def test_platforms_without_our_kernels_are_refused_by_name(monkeypatch) -> None:
    from vllm.platforms import current_platform

    from xquant_vllm import vllm_compat

    vllm_compat.require_supported_platform()  # this machine: CPU
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False)
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self=None: False)
    monkeypatch.setattr(type(current_platform), "device_name", "rocm-test")
    with pytest.raises(vllm_compat.UnsupportedVLLMError, match="rocm-test"):
        vllm_compat.require_supported_platform()


def test_decode_plans_refill_fixed_buffers_from_host_copies_and_runner_slots() -> None:
    """The planner reads no device array: past lengths from vLLM's host copies, slots from the runner's report;
    a decode plan (``device_store``) reuses the same buffers every step (what a captured graph reads)."""
    from itertools import accumulate
    from types import SimpleNamespace

    import torch

    from xquant_vllm.backend import StepPlanner
    from xquant_vllm.tail import FEED

    def step(past: list[int], q: list[int], table: torch.Tensor) -> SimpleNamespace:
        qsl = torch.tensor([0, *accumulate(q)], dtype=torch.int32)
        seq = torch.tensor(past, dtype=torch.int32) + torch.tensor(q, dtype=torch.int32)
        device_only = torch.full_like(seq, -1)  # reading it would show as a wrong past length
        return SimpleNamespace(num_reqs=len(q), query_start_loc_cpu=qsl, query_start_loc=qsl.clone(),
                               seq_lens_cpu_upper_bound=seq, seq_lens=device_only, block_table_tensor=table,
                               max_query_len=max(q))  # fmt: skip

    planner = StepPlanner(block_size=16, max_rows=8, scratch_slot=4, device=torch.device("cpu"))
    planner.device_store = True  # as on CUDA with the Triton kernels
    config, slots = _Config(), TailSlots(4)
    FEED.bind(config, slots)
    table = torch.tensor([[3, 4], [5, 6], [7, 8]], dtype=torch.int32)
    FEED.report(config, ["a", "b", "c"], set(), None)
    first = planner.plan(step([15, 3, 0], [1, 1, 1], table))
    assert first.device_store and first.past_lens.tolist() == [15, 3, 0] and first.tail_slot.tolist() == [0, 1, 2]
    FEED.report(config, ["c", "a"], {"b"}, None)  # b finished, rows reordered
    second = planner.plan(step([1, 16], [1, 1], table[[2, 0]]))
    assert (second.past_lens.data_ptr(), second.tail_slot.data_ptr()) == (first.past_lens.data_ptr(), first.tail_slot.data_ptr())
    assert second.tail_slot.tolist() == [2, 0] and second.full_block_ids.numel() == 0
    FEED.report(config, ["d"], set(), None)
    prefill = planner.plan(step([0], [20], table[:1]))  # not a decode: the store's arrays, b's freed slot
    assert not prefill.device_store and prefill.full_block_ids.tolist() == [3] and prefill.tail_slot.tolist() == [1]
    dummy = planner.plan(step([0, 0], [1, 1], table[:2]))  # a dummy run: no report, rows on the scratch slot
    assert dummy.tail_slot.tolist() == [4, 4]
