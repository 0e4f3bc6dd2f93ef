"""Fast checks of the plugin without an engine: tail slots, dtype registration, selection, the CLI shim."""

from __future__ import annotations

from importlib.metadata import distributions
from pathlib import Path

import pytest

from xquant_vllm.tail import NO_SLOT, TailAllocator, TailLostError, TailSlotsExhaustedError

B = 32


def step(alloc: TailAllocator, rows: list[tuple[int, int, list[int]]]) -> list[int]:
    """rows: (past, seq, block table row)."""
    return alloc.assign([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def test_slot_follows_a_sequence_through_chunks_and_completed_blocks() -> None:
    alloc = TailAllocator(4, B)
    table = [7, 3, 9]
    (s,) = step(alloc, [(0, 40, table)])  # block 7 full, 8 tokens of block 3 in the tail
    assert s != NO_SLOT and alloc.mapped == {3: s}
    assert step(alloc, [(40, 41, table)]) == [s]  # decode inside block 3
    assert step(alloc, [(41, 70, table)]) == [s]  # block 3 completes; 6 tokens of block 9 take over the slot
    assert alloc.mapped == {9: s}
    assert step(alloc, [(70, 96, table)]) == [s]  # block 9 completes, nothing left over: slot released next step
    assert alloc.mapped == {} and alloc.num_free == 4


def test_rows_without_a_tail_get_no_slot() -> None:
    alloc = TailAllocator(2, B)
    assert step(alloc, [(0, 64, [1, 2]), (32, 32, [4]), (0, 0, [])]) == [NO_SLOT, NO_SLOT, NO_SLOT]


def test_a_continued_block_without_a_slot_is_an_error_not_garbage() -> None:
    with pytest.raises(TailLostError, match="block 5"):
        step(TailAllocator(2, B), [(10, 11, [5])])


def test_a_block_written_from_offset_zero_takes_over_a_stale_slot() -> None:
    alloc = TailAllocator(2, B)
    (old,) = step(alloc, [(0, 10, [5])])  # a request that will end (abort) with block 5 partial
    (new,) = step(alloc, [(0, 3, [5])])  # block 5 reused by another request from offset 0
    assert new == old and alloc.mapped == {5: old} and alloc.num_free == 1


def test_ended_requests_slots_are_reclaimed_least_recently_used_first() -> None:
    alloc = TailAllocator(2, B)
    a, b = step(alloc, [(0, 5, [1]), (0, 6, [2])])
    step(alloc, [(6, 7, [2])])  # the request of block 1 ended; block 2's keeps running
    c, d = step(alloc, [(7, 8, [2]), (0, 4, [8])])
    assert (c, d) == (b, a) and alloc.mapped == {2: b, 8: a}


def test_exhaustion_names_the_setting() -> None:
    alloc = TailAllocator(1, B)
    with pytest.raises(TailSlotsExhaustedError, match="max_num_seqs"):
        step(alloc, [(0, 5, [1]), (0, 6, [2])])


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
