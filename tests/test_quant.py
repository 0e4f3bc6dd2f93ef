"""Reference quantizers: bit packing, group quantization, KIVI grouping, cross-layer pairs, rotation, attention.

Expected values are computed here from the spec's formulas (shared/spec/algorithms.md sections 1-5), never
taken from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from xquant_vllm.config import LayerQuant, make_config
from xquant_vllm.quant.attention import reference_attention, rotated_reference_attention
from xquant_vllm.quant.groups import dequantize_groups, meta_params, quantize_groups
from xquant_vllm.quant.kv import (
    dequantize_keys,
    dequantize_layer,
    dequantize_values,
    quantize_keys,
    quantize_layer,
    quantize_values,
)
from xquant_vllm.quant.packing import pack_bits, packed_len, unpack_bits
from xquant_vllm.quant.rotation import hadamard, rotate

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def layer(preset: str = "kivi-2", index: int = 0, num_layers: int = 2, head_size: int = 64, **overrides) -> LayerQuant:
    return make_config(preset, num_layers=num_layers, head_size=head_size, overrides=overrides).layer(index)


def kivi(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain KIVI on groups [..., G] in fp32: (codes, x_hat, min, step)."""
    x = x.float()
    mn, mx = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    s = (mx - mn) / (2**bits - 1)
    q = torch.round((x - mn) / s).clamp(0, 2**bits - 1)
    return q, q * s + mn, mn, s


# ---- packing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "codes", "expected"),
    [
        (2, [1, 2, 3, 0], [0b00111001]),
        (1, [1, 0, 1, 1, 0, 0, 0, 1], [0b10001101]),
        (4, [0x3, 0xA], [0xA3]),
        (2, [3, 1, 2, 1, 1], [0b01100111, 0b00000001]),  # ragged: unused high bits stay zero
        (4, [0xF], [0x0F]),
    ],
)
def test_pack_documented_layout(bits: int, codes: list[int], expected: list[int]) -> None:
    packed = pack_bits(torch.tensor(codes, dtype=torch.uint8), bits)
    assert packed.dtype == torch.uint8
    assert packed.tolist() == expected


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("m", [1, 3, 7, 8, 13, 64])
def test_pack_roundtrip(bits: int, m: int) -> None:
    g = torch.Generator().manual_seed(bits * 100 + m)
    codes = torch.randint(0, 2**bits, (3, 2, m), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    per_byte = 8 // bits
    assert packed.shape == (3, 2, math.ceil(m / per_byte)) and packed_len(m, bits) == packed.shape[-1]
    assert torch.equal(unpack_bits(packed, bits, m), codes)
    # every byte, rebuilt bit by bit from the documented rule (element j at bits b*(j%n), LSB first)
    row = codes[1, 0].tolist()
    want = [sum(c << (bits * (j % per_byte)) for j, c in enumerate(row) if j // per_byte == i) for i in range(packed.shape[-1])]
    assert packed[1, 0].tolist() == want


@pytest.mark.parametrize("bits", [0, 3, 8])
def test_pack_rejects_bits(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.zeros(8, dtype=torch.uint8), bits)


# ---- group quantizer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_roundtrip_within_half_step(bits: int) -> None:
    x = torch.randn(5, 7, 32, generator=torch.Generator().manual_seed(bits)) * 3 + 1
    codes, meta = quantize_groups(x, bits, eta=0.0)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    x_hat = dequantize_groups(codes, meta, bits, eta=0.0)
    s = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**bits - 1)
    tiny = 1e-5 * x.abs().amax()
    assert ((x - x_hat).abs() <= s / 2 + tiny).all()
    # the bound is tight: some element of a random tensor sits near half a step away
    assert ((x - x_hat).abs() > 0.3 * s).any()


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_values_on_the_grid_are_exact(bits: int) -> None:
    g = torch.Generator().manual_seed(7 + bits)
    top = 2**bits - 1
    q = torch.randint(0, top + 1, (6, 4, 16), generator=g)
    q[..., 0], q[..., 1] = 0, top  # each group spans the whole grid, so min = z and max = z + top * s
    s = 2.0 ** torch.randint(-4, 2, (6, 4, 1), generator=g).float()
    z = torch.randint(-64, 64, (6, 4, 1), generator=g).float() / 8
    x = q * s + z  # exactly representable in fp32
    codes, meta = quantize_groups(x, bits, eta=0.0)
    assert torch.equal(codes.long(), q)
    assert torch.equal(dequantize_groups(codes, meta, bits, eta=0.0), x)


def test_rounding_is_half_to_even() -> None:
    # 2 bits over [0, 3]: step 1, so x is its own ratio; ties at .5 go to the even code
    x = torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.0, 1.0, 2.0, 0.25]])
    codes, _ = quantize_groups(x, 2, eta=0.0)
    assert codes.tolist() == [[0, 0, 2, 2, 3, 1, 2, 0]]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_eta_zero_is_kivi(bits: int) -> None:
    x = torch.randn(4, 9, 32, generator=torch.Generator().manual_seed(11)) * 2 - 0.5
    codes, meta = quantize_groups(x, bits, eta=0.0)
    q, x_hat, mn, s = kivi(x, bits)
    assert torch.equal(codes.float(), q)
    assert torch.equal(meta.zero, mn.squeeze(-1)) and torch.equal(meta.scale, s.squeeze(-1))
    torch.testing.assert_close(dequantize_groups(codes, meta, bits, eta=0.0), x_hat, rtol=0, atol=0)


@pytest.mark.parametrize(("bits", "eta"), [(1, 1 / 6), (1, 1 / 3), (2, 0.045), (2, 0.09)])
def test_calibration_moves_levels_inward(bits: int, eta: float) -> None:
    x = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(3)) * 2
    codes, meta = quantize_groups(x, bits, eta)
    q, _, mn, s = kivi(x, bits)
    assert torch.equal(codes.float(), q), "calibration must not change the codes"
    top = 2**bits - 1
    rng = s * top
    levels = mn + eta * rng + torch.arange(top + 1).float() * (1 - 2 * eta) * rng / top  # [..., 1, 2^b]
    x_hat = dequantize_groups(codes, meta, bits, eta)
    want = torch.gather(levels.squeeze(-2), -1, codes.long())
    torch.testing.assert_close(x_hat, want, rtol=1e-5, atol=1e-5)
    if bits == 1:  # two levels: min + eta*range and max - eta*range
        mx = mn + rng
        torch.testing.assert_close(levels[..., 0], mn.squeeze(-1) + eta * rng.squeeze(-1))
        torch.testing.assert_close(levels[..., 1], mx.squeeze(-1) - eta * rng.squeeze(-1))
        assert set(codes.unique().tolist()) == {0, 1}
    assert not torch.allclose(x_hat, dequantize_groups(*quantize_groups(x, bits, 0.0), bits, 0.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_dtypes_store_meta_in_input_dtype(dtype: torch.dtype, bits: int) -> None:
    eta = {1: 1 / 6, 2: 0.045, 4: 0.0}[bits]
    x = (torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(5)) * 4 + 2).to(dtype)
    codes, meta = quantize_groups(x, bits, eta)
    assert meta.scale.dtype == dtype and meta.zero.dtype == dtype
    xf = x.float()
    mn, mx = xf.amin(-1), xf.amax(-1)
    top = 2**bits - 1
    s_cal = (1 - 2 * eta) * ((mx - mn) / top)
    z_cal = mn + eta * (mx - mn)
    torch.testing.assert_close(meta.scale, s_cal.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(meta.zero, z_cal.to(dtype), rtol=0, atol=0)
    x_hat = dequantize_groups(codes, meta, bits, eta)
    # half a (calibrated-grid) step, plus the rounding of the stored meta to the dtype
    eps = torch.finfo(dtype).eps
    step = (mx - mn) / top
    bound = step / 2 + eta * (mx - mn) + eps * (z_cal.abs() + top * s_cal.abs() + xf.abs().amax(-1)) + 1e-6
    assert ((xf - x_hat).abs() <= bound.unsqueeze(-1)).all()


# ---- KIVI grouping (kv.py) -----------------------------------------------------------------------------


def test_keys_grouped_per_channel_along_tokens() -> None:
    lq = layer(v_group=16)
    T, H, D, G = 64, 2, 64, lq.k_group
    k = torch.randn(T, H, D, generator=torch.Generator().manual_seed(1))
    codes, meta = quantize_keys(k, lq)
    assert codes.shape == (T // G, H, D, G) and meta.scale.shape == (T // G, H, D)
    blocks = k.reshape(T // G, G, H, D)  # group = G consecutive tokens of one (head, channel)
    mn, mx = blocks.amin(1), blocks.amax(1)
    torch.testing.assert_close(meta.zero, mn, rtol=0, atol=0)
    torch.testing.assert_close(meta.scale, (mx - mn) / 3, rtol=0, atol=0)
    # an outlier channel does not disturb any other channel
    k2 = k.clone()
    k2[:, 0, 5] *= 100
    x_hat = dequantize_keys(*quantize_keys(k, lq), lq, torch.float32)
    x_hat2 = dequantize_keys(*quantize_keys(k2, lq), lq, torch.float32)
    other = torch.ones(H, D, dtype=torch.bool)
    other[0, 5] = False
    assert torch.equal(x_hat[:, other], x_hat2[:, other])
    assert not torch.equal(x_hat[:, 0, 5], x_hat2[:, 0, 5])
    assert ((k - x_hat).abs() <= (mx - mn).repeat_interleave(G, 0) / 6 + 1e-5).all()


def test_values_grouped_per_token_along_channels() -> None:
    lq = layer(v_group=16)
    T, H, D, Gv = 40, 2, 64, 16
    v = torch.randn(T, H, D, generator=torch.Generator().manual_seed(2))
    codes, meta = quantize_values(v, lq)
    assert codes.shape == (T, H, D // Gv, Gv) and meta.scale.shape == (T, H, D // Gv)
    groups = v.reshape(T, H, D // Gv, Gv)  # group = Gv consecutive channels of one (token, head)
    mn, mx = groups.amin(-1), groups.amax(-1)
    torch.testing.assert_close(meta.zero, mn, rtol=0, atol=0)
    torch.testing.assert_close(meta.scale, (mx - mn) / 3, rtol=0, atol=0)
    # changing the channels of one group changes that group's stats only
    v2 = v.clone()
    v2[3, 1, 16:32] *= 50
    meta2 = quantize_values(v2, lq)[1]
    changed = (meta.scale != meta2.scale) | (meta.zero != meta2.zero)
    assert changed.nonzero().tolist() == [[3, 1, 1]]
    x_hat = dequantize_values(codes, meta, lq, torch.float32)
    assert ((v - x_hat).abs() <= (mx - mn).repeat_interleave(Gv, -1).reshape(T, H, D) / 6 + 1e-5).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("preset", ["kivi-2", "xquant-paper"])
def test_constant_groups(dtype: torch.dtype, preset: str) -> None:
    lq = layer(preset, index=2, num_layers=4)  # xquant-paper: a 1-bit layer with eta = 1/6
    T, H, D = 32, 2, 64
    g = torch.Generator().manual_seed(4)
    k = torch.randn(T, H, D, generator=g).to(dtype)
    v = torch.randn(T, H, D, generator=g).to(dtype)
    k[:, 1, 7] = 0.75  # one key channel constant over the block
    v[5, 0, 32:] = -1.25  # one value group constant over its channels
    kc, km = quantize_keys(k, lq)
    vc, vm = quantize_values(v, lq)
    assert km.scale[0, 1, 7] == 0 and (kc[0, 1, 7] == 0).all()
    assert vm.scale[5, 0, 1] == 0 and (vc[5, 0, 1] == 0).all()
    k_hat = dequantize_keys(kc, km, lq, dtype)
    v_hat = dequantize_values(vc, vm, lq, dtype)
    assert (k_hat[:, 1, 7] == 0.75).all() and (v_hat[5, 0, 32:] == -1.25).all()
    assert torch.isfinite(k_hat).all() and torch.isfinite(v_hat).all()
    assert km.scale.count_nonzero() == km.scale.numel() - 1 and vm.scale.count_nonzero() == vm.scale.numel() - 1


# ---- cross-layer pairs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("high_layers", [0, 4])  # 1-bit pair with eta 1/6, or 2-bit pair with eta 0.045
def test_upper_layer_reads_lower_codes_with_own_stats(high_layers: int) -> None:
    cfg = make_config("xquant-paper", num_layers=4, head_size=64, overrides={"k_high_layers": high_layers, "v_high_layers": high_layers})
    lower, upper = cfg.layer(2), cfg.layer(3)
    assert (lower.k_shared, lower.v_shared, upper.k_shared, upper.v_shared) == (False, False, True, True)
    bits, eta = upper.k_bits, upper.k_eta
    g = torch.Generator().manual_seed(9)
    k_lo, v_lo = torch.randn(64, 2, 64, generator=g), torch.randn(64, 2, 64, generator=g)
    k_up, v_up = 2 * torch.randn(64, 2, 64, generator=g) + 1, 3 * torch.randn(64, 2, 64, generator=g)
    q_lo = quantize_layer(k_lo, v_lo, lower)
    q_up = quantize_layer(k_up, v_up, upper)
    assert q_up.k_codes is None and q_up.v_codes is None
    k_hat, v_hat = dequantize_layer(q_up, upper, torch.float32, lower=q_lo)

    def own_params(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mn, mx = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        return (1 - 2 * eta) * (mx - mn) / (2**bits - 1), mn + eta * (mx - mn)

    s_k, z_k = own_params(k_up.reshape(2, 32, 2, 64).permute(0, 2, 3, 1))  # [nb, H, D, G]
    want_k = (q_lo.k_codes.float() * s_k + z_k).permute(0, 3, 1, 2).reshape(64, 2, 64)
    s_v, z_v = own_params(v_up.reshape(64, 2, 2, 32))
    want_v = (q_lo.v_codes.float() * s_v + z_v).reshape(64, 2, 64)
    torch.testing.assert_close(k_hat, want_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_hat, want_v, rtol=1e-5, atol=1e-5)
    lower_k, lower_v = dequantize_layer(q_lo, lower, torch.float32)
    assert (k_hat - lower_k).abs().max() > 0.5 and (v_hat - lower_v).abs().max() > 0.5
    with pytest.raises(ValueError, match="layer 3"):
        dequantize_layer(q_up, upper, torch.float32)


# ---- 8-bit metadata ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_eight_bit_meta_covers_every_group(bits: int) -> None:
    lq = layer(k_bits_high=bits, v_bits_high=bits, meta_bits=8, eta_1=0.0, eta_2=0.0)
    B, H, D = lq.k_group, 3, 64
    g = torch.Generator().manual_seed(10 + bits)
    scale = torch.logspace(-2, 1, D)[torch.randperm(D, generator=g)]  # channels of very different ranges
    k = torch.randn(2 * B, H, D, generator=g) * scale + torch.randn(D, generator=g)
    v = torch.randn(2 * B, H, D, generator=g) * scale + 5
    for x, quant, deq, grouped in (
        (k, quantize_keys, dequantize_keys, k.reshape(2, B, H, D).permute(0, 2, 3, 1)),  # [nb, H, D, B]
        (v, quantize_values, dequantize_values, v.reshape(2, B, H, 2, 32).permute(0, 2, 1, 3, 4).reshape(2, H, -1, 32)),
    ):
        codes, meta = quant(x, lq)
        # one super range per (block, head): lo is the block's min, hi its max; code 255 decodes to hi exactly
        assert meta.lo.shape == (2, H) and meta.min_q.dtype == torch.uint8
        assert torch.equal(meta.lo, grouped.amin((-2, -1))) and torch.equal(meta.hi, grouped.amax((-2, -1)))
        mn, mx = grouped.amin(-1), grouped.amax(-1)
        step = (meta.hi - meta.lo).unsqueeze(-1) / 255
        dmn = meta.lo.unsqueeze(-1) + meta.min_q.float() * step
        dmx = torch.where(meta.max_q == 255, meta.hi.unsqueeze(-1), meta.lo.unsqueeze(-1) + meta.max_q.float() * step)
        assert (dmn <= mn).all() and (dmx >= mx).all(), "decoded range must cover every group"
        assert (dmn > mn - 1.01 * step).all() and (dmx < mx + 1.01 * step).all(), "and be at most one step wider"
        s = ((dmx - dmn) / (2**bits - 1)).unsqueeze(-1)
        ratio = (grouped - dmn.unsqueeze(-1)) / s
        assert (ratio >= -1e-4).all() and (ratio <= 2**bits - 1 + 1e-4).all(), "no code clipped beyond rounding"
        x_hat = deq(codes, meta, lq, torch.float32)
        if quant is quantize_keys:
            err = (x - x_hat).reshape(2, B, H, D).permute(0, 2, 3, 1)
        else:
            err = (x - x_hat).reshape(2, B, H, 2, 32).permute(0, 2, 1, 3, 4).reshape(2, H, -1, 32)
        assert (err.abs() <= s / 2 * (1 + 1e-4) + 1e-5).all()


def test_eight_bit_meta_with_eta_matches_decoded_range() -> None:
    lq = layer("xquant-paper", index=2, num_layers=4, meta_bits=8)  # 1 bit, eta 1/6
    k = torch.randn(32, 2, 64, generator=torch.Generator().manual_seed(12))
    codes, meta = quantize_keys(k, lq)
    s_cal, z_cal = meta_params(meta, 1, lq.k_eta)
    step = ((meta.hi - meta.lo) / 255).unsqueeze(-1)
    dmn = meta.lo.unsqueeze(-1) + meta.min_q.float() * step
    dmx = meta.lo.unsqueeze(-1) + meta.max_q.float() * step
    torch.testing.assert_close(z_cal, dmn + (dmx - dmn) / 6)
    torch.testing.assert_close(s_cal, (dmx - dmn) * 2 / 3)


# ---- reference attention -------------------------------------------------------------------------------


def plain_attention(query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_len: int, scale: float) -> torch.Tensor:
    """Causal softmax attention written out: query i sees keys 0..past_len+i; GQA by repeating KV heads."""
    rep = query.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
    out = torch.empty(query.shape)
    for i in range(query.shape[0]):
        n = past_len + i + 1
        w = torch.softmax(torch.einsum("hd,thd->ht", query[i].float(), k[:n]) * scale, dim=-1)
        out[i] = torch.einsum("ht,thd->hd", w, v[:n])
    return out


@pytest.mark.parametrize("q_len", [1, 5])
def test_attention_before_a_full_block_is_plain(q_len: int) -> None:
    lq = layer("xquant-paper", index=2, num_layers=4)  # 1 bit: any quantization would show at once
    g = torch.Generator().manual_seed(13)
    for past_len in (0, 7, lq.k_group - 1):
        T = past_len + q_len
        query, k, v = torch.randn(q_len, 4, 64, generator=g), torch.randn(T, 2, 64, generator=g), torch.randn(T, 2, 64, generator=g)
        out = reference_attention(query, k, v, past_len, lq, 0.125)
        torch.testing.assert_close(out, plain_attention(query, k, v, past_len, 0.125), rtol=1e-5, atol=1e-5)


def test_attention_prefill_is_past_only() -> None:
    lq = layer()
    g = torch.Generator().manual_seed(14)
    query, k, v = torch.randn(80, 4, 64, generator=g), torch.randn(80, 2, 64, generator=g), torch.randn(80, 2, 64, generator=g)
    out = reference_attention(query, k, v, 0, lq, 0.125)  # a chunk longer than two blocks, nothing in the past
    torch.testing.assert_close(out, plain_attention(query, k, v, 0, 0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("past_len", [32, 45, 70])
def test_attention_reads_full_blocks_quantized(past_len: int) -> None:
    cfg = make_config("xquant-paper", num_layers=4, head_size=64)
    lower, upper = cfg.layer(2), cfg.layer(3)
    g = torch.Generator().manual_seed(past_len)
    q_len, T, B = 3, past_len + 3, cfg.block_size
    query = torch.randn(q_len, 4, 64, generator=g)
    k, v, k_lo, v_lo = (torch.randn(T, 2, 64, generator=g) for _ in range(4))
    n = past_len // B * B
    plain = plain_attention(query, k, v, past_len, 0.125)
    out = reference_attention(query, k, v, past_len, upper, 0.125, lower=(k_lo, v_lo))
    assert (out - plain).abs().max() > 1e-3
    # what it should be: the whole past blocks dequantized (upper's stats on lower's codes), the rest exact
    k_hat, v_hat = dequantize_layer(
        quantize_layer(k[:n], v[:n], upper), upper, torch.float32, lower=quantize_layer(k_lo[:n], v_lo[:n], lower)
    )
    want = plain_attention(query, torch.cat([k_hat, k[n:]]), torch.cat([v_hat, v[n:]]), past_len, 0.125)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="lower"):
        reference_attention(query, k, v, past_len, upper, 0.125)


# ---- rotation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 128, 256])
def test_hadamard_is_orthogonal_and_its_own_inverse(size: int) -> None:
    h = hadamard(size, torch.float64)
    assert h.shape == (size, size) and torch.equal(h, h.T)
    torch.testing.assert_close(h.abs(), torch.full_like(h, size**-0.5))  # every entry is +-1/sqrt(D)
    torch.testing.assert_close(h @ h, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)
    assert hadamard(size).dtype == torch.float32


@pytest.mark.parametrize("size", [0, 3, 96, 100])
def test_hadamard_refuses_a_size_that_is_not_a_power_of_two(size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        hadamard(size)
    with pytest.raises(ValueError, match="power of two"):
        rotate(torch.ones(2, size))


@pytest.mark.parametrize("size", [64, 128, 256])
def test_rotate_keeps_dot_products_and_undoes_itself(size: int) -> None:
    g = torch.Generator().manual_seed(size)
    q, k = torch.randn(5, 4, size, generator=g), torch.randn(5, 4, size, generator=g) * 3 + 1
    rq, rk = rotate(q), rotate(k)
    assert (rk - k).abs().max() > 1.0 and rk.dtype == k.dtype
    torch.testing.assert_close((rq * rk).sum(-1), (q * k).sum(-1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(rotate(rk), k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rk, k @ hadamard(size), rtol=0, atol=0)
    assert rotate(k.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("head_size", [64, 128, 256])
def test_rotation_spreads_an_outlier_channel_over_value_groups(head_size: int) -> None:
    """Per-token value groups: one large channel stretches its group's range; rotated, every group shares it."""
    lq = layer("xquant", num_layers=32, head_size=head_size)  # layer 0: 2-bit values, groups of 64, 8-bit meta
    g = torch.Generator().manual_seed(head_size + 1)
    v = torch.randn(128, 2, head_size, generator=g)
    v[..., 5] += 20
    plain = dequantize_values(*quantize_values(v, lq), lq, torch.float32)
    rotated = rotate(dequantize_values(*quantize_values(rotate(v), lq), lq, torch.float32))
    assert ((rotated - v) ** 2).mean() < 0.5 * ((plain - v) ** 2).mean()


def by_hand_rotated(
    query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_len: int, lq: LayerQuant, lower: tuple | None
) -> torch.Tensor:
    """Rotation written out with the Hadamard matrix: q, k (and lower's k) times H if keys are rotated, v (and
    lower's v) if values are, then the plain reference, then the output times H again if values are rotated."""
    h = hadamard(query.shape[-1])
    hk, hv = (h if lq.rotate_k else None), (h if lq.rotate_v else None)
    by = lambda x, m: x if m is None else x @ m  # noqa: E731
    low = None if lower is None else (by(lower[0], hk), by(lower[1], hv))
    return by(reference_attention(by(query, hk), by(k, hk), by(v, hv), past_len, lq, 0.125, low), hv)


ROTATIONS = [(True, False), (False, True), (True, True)]


@pytest.mark.parametrize("head_size", [64, 128])
@pytest.mark.parametrize(("rotate_keys", "rotate_values"), ROTATIONS)
def test_rotated_attention_is_attention_on_rotated_inputs(head_size: int, rotate_keys: bool, rotate_values: bool) -> None:
    rotation = {"rotate_keys": rotate_keys, "rotate_values": rotate_values}
    cfg = make_config("xquant-paper", num_layers=4, head_size=head_size, overrides=rotation)
    g = torch.Generator().manual_seed(head_size + 2 * rotate_keys + rotate_values)
    past_len, q_len = 70, 3  # two whole 32-token blocks quantized, a 6-token tail, a 3-token chunk, GQA 4:2
    query = torch.randn(q_len, 4, head_size, generator=g)
    k, v, k_lo, v_lo = (torch.randn(past_len + q_len, 2, head_size, generator=g) for _ in range(4))
    k[..., 3] += 8  # an outlier channel, so that rotating changes what quantization loses
    for lq, lower in ((cfg.layer(2), None), (cfg.layer(3), (k_lo, v_lo))):  # own codes; codes of layer 2
        out = rotated_reference_attention(query, k, v, past_len, lq, 0.125, lower)
        assert torch.equal(out, by_hand_rotated(query, k, v, past_len, lq, lower))
        assert (out - reference_attention(query, k, v, past_len, lq, 0.125, lower)).abs().max() > 1e-3


@pytest.mark.parametrize(("rotate_keys", "rotate_values"), ROTATIONS)
def test_rotated_attention_before_a_full_block_is_plain(rotate_keys: bool, rotate_values: bool) -> None:
    """Nothing quantized yet: the rotation must cancel exactly (q R . k R = q . k, P (V R) R = P V)."""
    lq = layer("xquant-paper", index=2, num_layers=4, rotate_keys=rotate_keys, rotate_values=rotate_values)
    g = torch.Generator().manual_seed(15)
    query = torch.randn(5, 4, 64, generator=g)
    k, v = torch.randn(25, 2, 64, generator=g), torch.randn(25, 2, 64, generator=g)
    out = rotated_reference_attention(query, k, v, 20, lq, 0.125)
    torch.testing.assert_close(out, plain_attention(query, k, v, 20, 0.125), rtol=1e-5, atol=1e-5)


def test_rotated_attention_without_rotation_is_the_reference() -> None:
    cfg = make_config("xquant-paper", num_layers=4, head_size=64)
    g = torch.Generator().manual_seed(16)
    query = torch.randn(2, 4, 64, generator=g)
    k, v, k_lo, v_lo = (torch.randn(66, 2, 64, generator=g) for _ in range(4))
    for lq, lower in ((cfg.layer(2), None), (cfg.layer(3), (k_lo, v_lo))):
        assert not (lq.rotate_k or lq.rotate_v)
        out = rotated_reference_attention(query, k, v, 64, lq, 0.125, lower)
        assert torch.equal(out, reference_attention(query, k, v, 64, lq, 0.125, lower))
