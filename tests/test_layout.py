"""Page layout: sizes by hand, alignment, disjoint sections, byte placement and write/read round trips."""

from __future__ import annotations

import pytest
import torch

from xquant_vllm.config import PRESETS, LayerQuant, make_config
from xquant_vllm.layout import page_bytes, page_layout, read_pages, write_pages
from xquant_vllm.quant.kv import dequantize_layer, quantize_layer
from xquant_vllm.quant.packing import pack_bits


def layer(preset: str, index: int, num_layers: int = 32, head_size: int = 64, **overrides) -> LayerQuant:
    return make_config(preset, num_layers=num_layers, head_size=head_size, overrides=overrides).layer(index)


# xquant-max's layout with cross-layer sharing at 32 layers: keys from 3L/4, values from L/2 (odd layers only)
SHARED_MAX = {"k_share_from": 24, "v_share_from": 16, "rotate_keys": False, "rotate_values": False}

# (preset, overrides, layer, head size, bytes by hand: key codes + value codes + key meta + value meta [+ 8-bit super])
PAGES_BY_HAND = [
    ("kivi-2", {}, 0, 64, 64 * 8 + 32 * 16 + 2 * 64 * 2 + 2 * 32 * 2 * 2),  # D rows of B*2/8, B rows of D*2/8
    ("kivi-2", {}, 0, 128, 128 * 8 + 32 * 32 + 2 * 128 * 2 + 2 * 32 * 4 * 2),
    ("kivi-4", {}, 0, 64, 64 * 16 + 32 * 32 + 2 * 64 * 2 + 2 * 32 * 2 * 2),
    ("kivi-4", {}, 0, 128, 128 * 16 + 32 * 64 + 2 * 128 * 2 + 2 * 32 * 4 * 2),
    ("xquant-paper", {}, 20, 64, 64 * 4 + 32 * 8 + 2 * 64 * 2 + 2 * 32 * 2 * 2),  # 1-bit layer
    ("xquant-paper", {}, 20, 128, 128 * 4 + 32 * 16 + 2 * 128 * 2 + 2 * 32 * 4 * 2),
    ("xquant-paper", {}, 25, 64, 2 * 64 * 2 + 2 * 32 * 2 * 2),  # K and V shared: metadata only
    ("xquant-paper", {}, 25, 128, 2 * 128 * 2 + 2 * 32 * 4 * 2),
    # ours: B = 64, G_v = 64, uint8 min/max, 16-byte fp32 super range, keys 2-bit; the rotation changes no byte
    ("xquant", {}, 0, 64, 16 + 64 * 16 + 64 * 16 + 2 * 64 + 2 * 64 * 1),  # 2-bit values (layers < 24)
    ("xquant", {}, 0, 128, 16 + 128 * 16 + 64 * 32 + 2 * 128 + 2 * 64 * 2),
    ("xquant", {}, 26, 64, 16 + 64 * 16 + 64 * 8 + 2 * 64 + 2 * 64 * 1),  # 1-bit values
    ("xquant", {}, 26, 128, 16 + 128 * 16 + 64 * 16 + 2 * 128 + 2 * 64 * 2),
    ("xquant-max", {}, 0, 64, 16 + 64 * 16 + 64 * 8 + 2 * 64 + 2 * 64 * 1),  # 1-bit values everywhere
    ("xquant-max", {}, 0, 128, 16 + 128 * 16 + 64 * 16 + 2 * 128 + 2 * 64 * 2),
    ("xquant-max", {}, 25, 64, 16 + 64 * 16 + 64 * 8 + 2 * 64 + 2 * 64 * 1),  # nothing shared
    ("xquant-max", SHARED_MAX, 0, 64, 16 + 64 * 16 + 64 * 8 + 2 * 64 + 2 * 64 * 1),  # nothing shared
    ("xquant-max", SHARED_MAX, 0, 128, 16 + 128 * 16 + 64 * 16 + 2 * 128 + 2 * 64 * 2),
    ("xquant-max", SHARED_MAX, 17, 64, 16 + 64 * 16 + 2 * 64 + 2 * 64 * 1),  # values shared, keys not
    ("xquant-max", SHARED_MAX, 17, 128, 16 + 128 * 16 + 2 * 128 + 2 * 64 * 2),
    ("xquant-max", SHARED_MAX, 25, 64, 16 + 2 * 64 + 2 * 64 * 1),  # both shared: metadata only
    ("xquant-max", SHARED_MAX, 25, 128, 16 + 2 * 128 + 2 * 64 * 2),
]


@pytest.mark.parametrize(("preset", "overrides", "index", "head_size", "by_hand"), PAGES_BY_HAND)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_page_bytes_by_hand(
    preset: str, overrides: dict, index: int, head_size: int, by_hand: int, dtype: torch.dtype
) -> None:
    lq = layer(preset, index, head_size=head_size, **overrides)
    assert by_hand % 16 == 0  # every hand-computed page here is already aligned: no padding expected
    assert page_bytes(lq, dtype) == by_hand


def test_page_bytes_fp32_meta_is_twice_as_large() -> None:
    lq = layer("kivi-2", 0)
    assert page_bytes(lq, torch.float32) - page_bytes(lq, torch.bfloat16) == 2 * 64 * 2 + 2 * 32 * 2 * 2


def sections(lq: LayerQuant, dtype: torch.dtype) -> list[tuple[int, int]]:
    """(offset, size) of every present section, sizes by hand."""
    lay = page_layout(lq, dtype)
    B, D, m = lq.k_group, lq.head_size, 1 if lq.meta_bits == 8 else 2
    sizes = [
        (lay.super_off, 16),
        (lay.k_codes_off, D * B * lq.k_bits // 8),
        (lay.v_codes_off, B * D * lq.v_bits // 8),
        (lay.k_meta_off, 2 * D * m),
        (lay.v_meta_off, 2 * B * (D // lq.v_group) * m),
    ]
    return sorted((off, size) for off, size in sizes if off >= 0)


def all_layers() -> list[tuple[str, int, int]]:
    return [(p, L, D) for p in PRESETS for L, D in ((30, 64), (32, 128))]


@pytest.mark.parametrize(("preset", "num_layers", "head_size"), all_layers())
def test_sections_are_aligned_and_disjoint(preset: str, num_layers: int, head_size: int) -> None:
    cfg = make_config(preset, num_layers=num_layers, head_size=head_size)
    for lq in cfg.layers():
        secs = sections(lq, torch.bfloat16)
        total = page_bytes(lq, torch.bfloat16)
        assert total % 16 == 0
        assert all(off % 16 == 0 for off, _ in secs)
        assert secs[0][0] == 0
        for (off, size), (nxt, _) in zip(secs, secs[1:]):
            assert off + size <= nxt
        end = secs[-1][0] + secs[-1][1]
        assert end <= total < end + 16  # padding only up to the next multiple of 16
        assert (lq.k_shared, lq.v_shared) == (page_layout(lq, torch.bfloat16).k_codes_off < 0, page_layout(lq, torch.bfloat16).v_codes_off < 0)


def history(lq: LayerQuant, blocks: int, heads: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (blocks * lq.k_group, heads, lq.head_size)
    return (torch.randn(shape, generator=g) * 2).to(dtype), (torch.randn(shape, generator=g) + 1).to(dtype)


# every preset, and each layer kind it has: 2-bit (or 4), 1-bit, shared K and V; V shared alone in 8-bit pages
KINDS = [(p, {}, i) for p in PRESETS for i in (0, 20, 25)] + [("xquant-max", SHARED_MAX, i) for i in (17, 25)]


@pytest.mark.parametrize(("preset", "overrides", "index"), KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_write_read_roundtrip(preset: str, overrides: dict, index: int, dtype: torch.dtype) -> None:
    lq = layer(preset, index, **overrides)
    k, v = history(lq, blocks=3, heads=2, dtype=dtype, seed=index)
    q = quantize_layer(k, v, lq)
    layout = page_layout(lq, dtype)
    pages = write_pages(q, layout, dtype)
    assert pages.shape == (3, 2, page_bytes(lq, dtype)) and pages.dtype == torch.uint8
    back = read_pages(pages, layout, dtype)
    for name in ("k_codes", "v_codes"):
        a, b = getattr(q, name), getattr(back, name)
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
    for tensor in ("k_meta", "v_meta"):
        for field in ("scale", "zero", "min_q", "max_q", "lo", "hi"):
            a, b = getattr(getattr(q, tensor), field), getattr(getattr(back, tensor), field)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"{tensor}.{field}"
    if not (lq.k_shared or lq.v_shared):
        for x, y in zip(dequantize_layer(q, lq, dtype), dequantize_layer(back, lq, dtype)):
            assert torch.equal(x, y)


def test_k_only_sharing_roundtrip() -> None:
    cfg = make_config("xquant-paper", num_layers=32, head_size=64, overrides={"v_share_from": None})
    lower, upper = cfg.layer(26), cfg.layer(27)
    assert upper.k_shared and not upper.v_shared
    k, v = history(upper, 2, 2, torch.bfloat16, 3)
    q_up, q_lo = quantize_layer(k, v, upper), quantize_layer(v, k, lower)
    back = read_pages(write_pages(q_up, page_layout(upper, torch.bfloat16), torch.bfloat16), page_layout(upper, torch.bfloat16), torch.bfloat16)
    assert back.k_codes is None and torch.equal(back.v_codes, q_up.v_codes)
    for x, y in zip(dequantize_layer(q_up, upper, torch.float32, q_lo), dequantize_layer(back, upper, torch.float32, q_lo)):
        assert torch.equal(x, y)


def test_documented_byte_placement_16_bit() -> None:
    lq, dtype = layer("kivi-2", 0), torch.bfloat16
    B, D, nv = 32, 64, 2
    k, v = history(lq, blocks=2, heads=3, dtype=dtype, seed=21)
    q = quantize_layer(k, v, lq)
    lay = page_layout(lq, dtype)
    page = write_pages(q, lay, dtype)[1, 2]  # block 1, head 2
    assert (lay.k_codes_off, lay.v_codes_off, lay.k_meta_off, lay.v_meta_off) == (0, 512, 1024, 1280)
    for d in (0, 17, 63):  # key row d: channel d's 32 token codes, packed along tokens
        assert torch.equal(page[d * 8 : d * 8 + 8], pack_bits(q.k_codes[1, 2, d], 2))
    for t in (0, 9, 31):  # value row t: token t's 64 channel codes, packed along channels
        assert torch.equal(page[512 + t * 16 : 512 + t * 16 + 16], pack_bits(q.v_codes[B + t, 2].reshape(D), 2))
    meta = page[1024:1280].view(dtype)
    assert torch.equal(meta[:D], q.k_meta.scale[1, 2]) and torch.equal(meta[D:], q.k_meta.zero[1, 2])
    vmeta = page[1280:1536].view(dtype)
    assert torch.equal(vmeta[: B * nv].reshape(B, nv), q.v_meta.scale[B:, 2])  # s_cal[token, group]
    assert torch.equal(vmeta[B * nv :].reshape(B, nv), q.v_meta.zero[B:, 2])


def test_documented_byte_placement_8_bit() -> None:
    lq, dtype = layer("xquant-max", 16, k_bits_high=1), torch.bfloat16  # 1 bit, B = 64, G_v = 64
    B, D = 64, 64
    k, v = history(lq, blocks=2, heads=2, dtype=dtype, seed=22)
    q = quantize_layer(k, v, lq)
    lay = page_layout(lq, dtype)
    page = write_pages(q, lay, dtype)[0, 1]
    assert (lay.super_off, lay.k_codes_off, lay.v_codes_off, lay.k_meta_off, lay.v_meta_off) == (0, 16, 16 + 512, 16 + 1024, 16 + 1024 + 128)
    sup = page[:16].view(torch.float32)
    assert sup.tolist() == [q.k_meta.lo[0, 1].item(), q.k_meta.hi[0, 1].item(), q.v_meta.lo[0, 1].item(), q.v_meta.hi[0, 1].item()]
    assert torch.equal(page[16 + 5 * 8 : 16 + 6 * 8], pack_bits(q.k_codes[0, 1, 5], 1))
    assert torch.equal(page[528 + 7 * 8 : 528 + 8 * 8], pack_bits(q.v_codes[7, 1].reshape(D), 1))
    assert torch.equal(page[1040 : 1040 + D], q.k_meta.min_q[0, 1]) and torch.equal(page[1040 + D : 1040 + 2 * D], q.k_meta.max_q[0, 1])
    assert torch.equal(page[1168 : 1168 + B], q.v_meta.min_q[0, 1]) and torch.equal(page[1168 + B : 1168 + 2 * B], q.v_meta.max_q[0, 1])
