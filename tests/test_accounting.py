"""Bit accounting against figures computed by hand from the page layout (spec section 6).

Per (layer, block, KV head) page, bf16 metadata, G_v = 32 unless noted:
  SmolLM2 (D = 64, B = 32):   2-bit 1536, 1-bit 1024, shared 512 bytes   (see tests/test_layout.py)
  Llama-3-8B (D = 128, B = 32): 2-bit 3072, 1-bit 2048, shared 1024 bytes
  ours (B = 64, G_v = 64, 8-bit meta, keys 2-bit): 2-bit values / 1-bit values / 1-bit values shared / both shared:
  SmolLM2 2320 / 1808 / 1296 / 272, Llama-3-8B 4624 / 3600 / 2576 / 528
Layers: SmolLM2 (30) has 14 layers at 2 bits; xquant-paper shares odd layers from 23 (4 of them); xquant keeps
2-bit values in 14 layers, xquant-max in none, neither shares; xquant-max with sharing (shared_max) shares values
from 15 and keys from 23 (4 odd layers share values only, 4 both). Llama-3-8B (32) has 16 at 2 bits;
xquant-paper shares from 24 (4 layers); xquant 2-bit values in 16 layers; shared_max values from 16, keys from
24 (4 + 4).
"""

from __future__ import annotations

import math

import pytest

from xquant_vllm.accounting import LLAMA3_8B, SMOLLM2, BitsReport, ModelShape, bits_report
from xquant_vllm.config import make_config

GIB2 = 2 * 1024**3


def shared_max(shape: ModelShape) -> dict:
    """xquant-max with cross-layer sharing: keys from ceil(3L/4), values from ceil(L/2), not rotated."""
    L = shape.num_layers
    return {
        "k_share_from": math.ceil(3 * L / 4), "v_share_from": math.ceil(L / 2), "rotate_keys": False, "rotate_values": False,
    }  # fmt: skip


# (shape, preset, sharing xquant-max, block size, bytes of one block of all layers for one KV head, by hand)
BY_HAND = [
    (SMOLLM2, "kivi-2", False, 32, 30 * 1536),
    (SMOLLM2, "xquant-paper", False, 32, 14 * 1536 + 12 * 1024 + 4 * 512),
    (SMOLLM2, "xquant", False, 64, 22 * 2320 + 8 * 1808),
    (SMOLLM2, "xquant-max", False, 64, 30 * 1808),
    (SMOLLM2, "xquant-max", True, 64, 22 * 1808 + 4 * 1296 + 4 * 272),
    (LLAMA3_8B, "kivi-2", False, 32, 32 * 3072),
    (LLAMA3_8B, "xquant-paper", False, 32, 16 * 3072 + 12 * 2048 + 4 * 1024),
    (LLAMA3_8B, "xquant", False, 64, 24 * 4624 + 8 * 3600),
    (LLAMA3_8B, "xquant-max", False, 64, 32 * 3600),
    (LLAMA3_8B, "xquant-max", True, 64, 24 * 3600 + 4 * 2576 + 4 * 528),
]


def report(shape: ModelShape, preset: str, shared: bool = False) -> BitsReport:
    overrides = shared_max(shape) if shared else {}
    cfg = make_config(preset, num_layers=shape.num_layers, head_size=shape.head_size, overrides=overrides)
    return bits_report(cfg, shape)


def test_shapes() -> None:
    assert SMOLLM2.elements_per_token == 2 * 30 * 3 * 64 and SMOLLM2.dtype_bytes == 2
    assert LLAMA3_8B.elements_per_token == 2 * 32 * 8 * 128


@pytest.mark.parametrize(("shape", "preset", "shared", "block", "block_bytes"), BY_HAND)
def test_bytes_and_page_bits(shape: ModelShape, preset: str, shared: bool, block: int, block_bytes: int) -> None:
    r = report(shape, preset, shared)
    assert r.block_size == block
    assert sum(r.page_bytes_per_layer) == block_bytes
    per_token = block_bytes * shape.num_kv_heads / block
    assert r.bytes_per_token == per_token
    elements = 2 * shape.num_layers * shape.num_kv_heads * shape.head_size
    assert r.page_bits == pytest.approx(8 * per_token / elements)


@pytest.mark.parametrize(
    ("shape", "preset", "page_bits"),
    [
        # spec section 6: code bits + 1 bit of 16-bit (scale, zero) per element at G = 32
        (SMOLLM2, "kivi-2", 2 + 1),
        (SMOLLM2, "xquant-paper", 40 / 30 + 1),
        (LLAMA3_8B, "kivi-2", 2 + 1),
        (LLAMA3_8B, "xquant-paper", 1.375 + 1),
        (LLAMA3_8B, "asymkv-1.5", 1.5 + 1),
        (LLAMA3_8B, "kivi-4", 4 + 1),
    ],
)
def test_page_bits_are_code_bits_plus_one(shape: ModelShape, preset: str, page_bits: float) -> None:
    assert report(shape, preset).page_bits == pytest.approx(page_bits)


@pytest.mark.parametrize(
    ("shape", "preset", "code_bits"),
    [
        (SMOLLM2, "xquant", 112 / 60),  # keys 30 * 2, values 22 * 2 + 8 * 1, over 60
        (SMOLLM2, "xquant-max", 1.5),
        (LLAMA3_8B, "xquant", 1.875),  # keys 32 * 2, values 24 * 2 + 8 * 1, over 64
        (LLAMA3_8B, "xquant-max", 1.5),
    ],
)
def test_page_bits_of_8_bit_meta(shape: ModelShape, preset: str, code_bits: float) -> None:
    """uint8 (min, max) per 64 elements is 1/4 bit; the 16-byte super range adds 128 bits per 2 * D * 64 elements."""
    r = report(shape, preset)
    assert r.equivalent_bits == pytest.approx(code_bits)
    assert r.page_bits == pytest.approx(code_bits + 0.25 + 128 / (2 * shape.head_size * 64))


@pytest.mark.parametrize(("shape", "preset", "shared", "block", "block_bytes"), BY_HAND)
@pytest.mark.parametrize("context", [1024, 4096, 32768])
def test_true_bits_add_one_tail_slot(
    shape: ModelShape, preset: str, shared: bool, block: int, block_bytes: int, context: int
) -> None:
    """A sequence of ``context`` tokens holds its pages plus one bf16 tail slot of B tokens: +16 * B / T bits."""
    r = report(shape, preset, shared)
    page_bits = 8 * block_bytes * shape.num_kv_heads / block / shape.elements_per_token
    assert r.true_bits(context) == pytest.approx(page_bits + 16 * block / context)
    assert r.tail_bytes_per_seq == block * shape.elements_per_token * 2


@pytest.mark.parametrize(("shape", "preset", "shared", "block", "block_bytes"), BY_HAND)
@pytest.mark.parametrize("running", [1, 16, 64])
def test_capacity_at_2_gib(
    shape: ModelShape, preset: str, shared: bool, block: int, block_bytes: int, running: int
) -> None:
    r = report(shape, preset, shared)
    bf16_per_token = shape.elements_per_token * 2
    tails = running * block * bf16_per_token
    whole_blocks = (GIB2 - tails) // (block_bytes * shape.num_kv_heads)
    tokens = whole_blocks * block
    assert r.capacity_tokens(GIB2, running) == tokens
    assert r.capacity_ratio(GIB2, running) == pytest.approx(tokens / (GIB2 // bf16_per_token))
    assert r.capacity_ratio(GIB2, running, baseline_bits=8) == pytest.approx(tokens / (GIB2 // shape.elements_per_token))


def test_capacity_is_zero_when_tails_fill_memory() -> None:
    r = report(LLAMA3_8B, "xquant-max")  # 256 tail slots of 64 bf16 tokens are 256 * 64 * 128 KiB = 2 GiB
    assert r.capacity_tokens(GIB2, 256) == 0


@pytest.mark.parametrize(
    ("shared", "running"), [(False, 1), (False, 16), (False, 64), (True, 64), (True, 128), (True, 256)]
)
def test_xquant_max_reaches_8_5x_on_smollm2(shared: bool, running: int) -> None:
    """The spec's capacity goal: >= 8.5x the bf16 tokens at 2 GiB, each running sequence holding a 64-token bf16
    tail slot. Without sharing (1808-byte pages) that holds up to 64 running sequences; with sharing up to 256
    (vLLM's default max_num_seqs)."""
    r = report(SMOLLM2, "xquant-max", shared)
    assert r.capacity_ratio(GIB2, running) >= 8.5
    # and with a single sequence (pages dominate) the ordering of the presets by capacity follows their page bits;
    # with many running sequences the 64-token tails of the groups-of-64 presets cost more than 32-token ones
    presets = ("kivi-4", "kivi-2", "asymkv-1.5", "xquant-paper", "xquant", "xquant-max")
    ratios = [report(SMOLLM2, p).capacity_ratio(GIB2, 1) for p in presets]
    assert ratios == sorted(ratios) and ratios[-1] < report(SMOLLM2, "xquant-max", True).capacity_ratio(GIB2, 1)


def test_report_rejects_a_config_for_another_model() -> None:
    cfg = make_config("xquant", num_layers=32, head_size=128)
    with pytest.raises(ValueError, match="layers"):
        bits_report(cfg, SMOLLM2)
