"""The HF quantized cache holds what the reference quantizers produce and reads it back with its semantics."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from xquant_vllm.config import make_config
from xquant_vllm.hf_cache import XQuantCache
from xquant_vllm.quant.attention import cached_history
from xquant_vllm.quant.rotation import rotate
from xquant_vllm.quant.kv import dequantize_keys, dequantize_values, key_meta, quantize_keys, quantize_values

LAYERS, KV_HEADS, HEAD = 4, 2, 64
SHARE_ALL = {"k_share_from": 1, "v_share_from": 1}  # both pairs share keys and values
ROTATED = {"rotate_keys": True, "rotate_values": True}


def cfg_for(preset: str, **overrides):
    return make_config(preset, num_layers=LAYERS, head_size=HEAD, overrides=overrides)


def feed(cache: XQuantCache, chunks: list[int], batch: int = 2, seed: int = 0):
    """Push random K/V chunks through every layer (in layer order, as a forward does).

    Returns the fp history per layer ``[batch, H, T, D]`` and, per chunk and layer, what ``update`` returned.
    """
    g = torch.Generator().manual_seed(seed)
    hist = [(torch.empty(batch, KV_HEADS, 0, HEAD), torch.empty(batch, KV_HEADS, 0, HEAD)) for _ in range(LAYERS)]
    returned = []
    for q in chunks:
        step = []
        for layer in range(LAYERS):
            k = torch.randn(batch, KV_HEADS, q, HEAD, generator=g) * (1 + layer)
            v = torch.randn(batch, KV_HEADS, q, HEAD, generator=g)
            step.append(tuple(t.clone() for t in cache.update(k, v, layer)))
            hist[layer] = (torch.cat([hist[layer][0], k], 2), torch.cat([hist[layer][1], v], 2))
        returned.append(step)
    return hist, returned


def seq(x: torch.Tensor, b: int) -> torch.Tensor:
    """One sequence of a ``[batch, H, T, D]`` tensor in the reference layout ``[T, H, D]``."""
    return x[b].permute(1, 0, 2)


def folded(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(t, b * h, d)


def rotated_history(k, v, lq, lower):
    """``cached_history`` around the layer's rotation: quantized rotated, read back rotated again."""
    rk = lambda t: rotate(t) if lq.rotate_k else t  # noqa: E731
    rv = lambda t: rotate(t) if lq.rotate_v else t  # noqa: E731
    if lower is not None:
        lower = (rk(lower[0]), rv(lower[1]))
    hk, hv = cached_history(rk(k), rv(v), lq, lower)
    n = (k.shape[0] // lq.k_group) * lq.k_group
    return torch.cat([rk(hk[:n]), k[n:]]), torch.cat([rv(hv[:n]), v[n:]])


@pytest.mark.parametrize(
    "preset,over",
    [
        ("kivi-2", {}),
        ("xquant-paper", SHARE_ALL),
        ("xquant-max", SHARE_ALL),
        ("kivi-4", {}),
        ("xquant-max", {**SHARE_ALL, **ROTATED}),
        ("kivi-2", {"rotate_values": True}),
    ],
)
def test_reads_follow_reference_semantics(preset, over):
    """Every chunk sees the reference's cached history (whole blocks dequantized, tail fp) plus itself at fp."""
    cfg = cfg_for(preset, **over)
    chunks = [20, 50, 1, 1, 30, 1]
    hist, returned = feed(XQuantCache(cfg), chunks)
    past = 0
    for q, step in zip(chunks, returned):
        for layer in range(LAYERS):
            lq = cfg.layer(layer)
            for b in range(2):
                k, v = (seq(t[:, :, : past + q], b) for t in hist[layer])
                lower = None
                if lq.k_shared or lq.v_shared:
                    lower = tuple(seq(t[:, :, :past], b) for t in hist[layer - 1])
                hk, hv = rotated_history(k[:past], v[:past], lq, lower)
                assert torch.equal(seq(step[layer][0], b), torch.cat([hk, k[past:]]))
                assert torch.equal(seq(step[layer][1], b), torch.cat([hv, v[past:]]))
        past += q


@pytest.mark.parametrize(
    "preset,over,k_n,v_n",
    [
        ("kivi-2", {}, 64, 64),
        ("xquant-max", {}, 64, 64),
        ("kivi-2", {"residual_rule": "reference", "residual": 32}, 64, 57),
        ("xquant-max", ROTATED, 64, 64),
    ],
)
def test_stored_codes_and_meta_are_the_reference_quantizers(preset, over, k_n, v_n):
    """Quantized incrementally (runs, single tokens), the stored codes and meta equal one reference call
    (on the rotated tensor when the config rotates it)."""
    cfg = cfg_for(preset, k_share_from=None, v_share_from=None, **over)
    cache = XQuantCache(cfg)
    hist, _ = feed(cache, [40, 7, 1, 1, 40])  # 89 tokens
    cache.flush()
    for layer in range(LAYERS):
        lq, lay = cfg.layer(layer), cache.layers[layer]
        assert (lay.k_done, lay.v_done) == (k_n, v_n)
        k, v = folded(hist[layer][0][:, :, :k_n]), folded(hist[layer][1][:, :, :v_n])
        k, v = (rotate(k) if lq.rotate_k else k), (rotate(v) if lq.rotate_v else v)
        for tensor, ref in (("k", quantize_keys(k, lq)), ("v", quantize_values(v, lq))):
            codes, meta = lay.stored(tensor)
            assert torch.equal(codes, ref[0])
            for name in ("scale", "zero", "min_q", "max_q", "lo", "hi"):
                got, want = getattr(meta, name), getattr(ref[1], name)
                assert (got is None and want is None) or torch.equal(got, want), name


@pytest.mark.parametrize(
    "preset,rule",
    [
        ("kivi-2", "paged"),
        ("kivi-2", "reference"),
        ("xquant-paper", "paged"),
        ("xquant-paper", "reference"),
        ("xquant-max", "paged"),
        ("xquant-max rotated", "paged"),
    ],
)
def test_mirror_equals_dequantized_codes(preset, rule):
    name, _, rotated = preset.partition(" ")
    cfg = cfg_for(name, residual_rule=rule, residual=64, **SHARE_ALL, **(ROTATED if rotated else {}))
    cache = XQuantCache(cfg)
    feed(cache, [70, 1, 1, 33, 1, 60])
    cache.flush()
    for lay in cache.layers:
        for tensor in ("k", "v"):
            mirror = lay.mirror(tensor)
            assert mirror.shape[2] > 0
            assert torch.equal(mirror, lay.dequantized(tensor))


def test_upper_layer_of_a_pair_reads_the_lower_codes_with_its_own_meta():
    cfg = cfg_for("xquant-paper", **SHARE_ALL)
    cache = XQuantCache(cfg)
    hist, _ = feed(cache, [64, 1])
    cache.flush()
    lower, upper = cache.layers[0], cache.layers[1]
    lq = cfg.layer(1)
    assert lq.k_shared and lq.v_shared
    assert upper.stored("k")[0] is None and upper.stored("v")[0] is None  # no codes of its own
    k_up = folded(hist[1][0][:, :, :64])
    k_meta = upper.stored("k")[1]
    assert torch.equal(k_meta.scale, key_meta(k_up, lq).scale)
    lower_k, lower_v = lower.stored("k")[0], lower.stored("v")[0]
    want_k = dequantize_keys(lower_k, k_meta, lq, torch.float32)
    want_v = dequantize_values(lower_v, upper.stored("v")[1], lq, torch.float32)
    assert torch.equal(folded(upper.mirror("k")), want_k)
    assert torch.equal(folded(upper.mirror("v")), want_v)
    own = quantize_keys(k_up, lq)[0]
    assert not torch.equal(own, lower_k)  # the borrowed codes are really the lower layer's


@pytest.mark.parametrize("total", [31, 64, 127, 128, 129, 300])
def test_tail_lengths_of_the_residual_rules(total):
    B, R = 32, 128
    first = min(total - 3, 100)
    chunks = [first, 1, 1, 1] + ([total - first - 3] if total > first + 3 else [])
    paged = XQuantCache(cfg_for("kivi-2"))
    ref = XQuantCache(cfg_for("kivi-2", residual_rule="reference", residual=R))
    for cache in (paged, ref):
        feed(cache, chunks)
        cache.flush()
    for lay in paged.layers:
        assert lay.k_done == lay.v_done == total // B * B  # partial block fp
    for lay in ref.layers:
        assert lay.k_done == total // R * R  # keys in whole runs of R: 0..R-1 fp
        assert lay.v_done == max(0, total - R)  # values: exactly the newest R fp


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    conf = LlamaConfig(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(conf).eval()


def run_chunks(model, ids: torch.Tensor, cache, chunks: list[int]) -> torch.Tensor:
    out, a = [], 0
    with torch.no_grad():
        for q in chunks:
            out.append(model(ids[:, a : a + q], past_key_values=cache, use_cache=True).logits)
            a += q
    return torch.cat(out, 1)


def test_model_logits_equal_until_a_block_is_quantized_then_differ():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 60), generator=torch.Generator().manual_seed(1))
    chunks = [20, 10] + [1] * 30
    base = run_chunks(model, ids, DynamicCache(), chunks)
    quant = run_chunks(model, ids, XQuantCache(cfg_for("kivi-2")), chunks)
    # Tokens 0..31 read only fp keys/values; token 32 is the first to find a whole block in its past.
    assert torch.equal(quant[:, :32], base[:, :32])
    assert not torch.allclose(quant[:, 32:], base[:, 32:], atol=1e-3)
