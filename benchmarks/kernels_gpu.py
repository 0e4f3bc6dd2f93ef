"""Check, then time, the Triton kernels on one GPU (issues 5 and 14), in one call.

1. Checks every kernel against the reference on random inputs on the GPU: paged attention (bits 1/2/4, mixed,
   shared upper layers, 8-bit metadata, head sizes 64/128/256, GQA 1/3/4, fp16/bf16, decode and chunked
   prefill; decode through the decode kernel and through the generic one), a decode launch captured in a CUDA
   graph and replayed over a batch of other lengths, the bf16 baseline kernel, and quantize-and-store
   (bit-exact) when ``csrc_triton/store.py`` exists.
2. Measures the copy bandwidth (device-to-device copy, bytes read + written).
3. Times decode attention (``triton.testing.do_bench``: CUDA events, median, warm-up excluded, L2 flushed
   before every call) for every preset against (a) the same kernel over a bf16 paged cache and (b) PyTorch SDPA
   (flash backend) over a contiguous bf16 cache; a preset's time is the mean over the model's layers, each
   layer kind timed once. Effective bandwidth counts the bytes a call must read.
4. Times quantize-and-store (prefill and worst-case decode).

``--targets`` times only issue 14's points (and sweeps the decode kernel's launch knobs at 8B, 32 x 32k) and
prints the table against the targets last. Writes ``kernels_gpu.json``, ``kernels_gpu.png`` and
``kernels_gpu.cmd.txt`` into ``--out``.
``--replot JSON`` redraws the PNG from a JSON written earlier (for machines without matplotlib).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import shlex
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _import_kernels():
    """``xquant_vllm.kernels`` when the package is installed, else ``csrc_triton`` under that name."""
    try:
        import xquant_vllm.kernels as kernels
    except ModuleNotFoundError:
        import csrc_triton as kernels

        sys.modules["xquant_vllm.kernels"] = kernels
    return kernels


kernels = _import_kernels()
attention = __import__(f"{kernels.__name__}.attention", fromlist=["_"])
decode_mod = __import__(f"{kernels.__name__}.decode", fromlist=["_"])
try:
    store_mod = __import__(f"{kernels.__name__}.store", fromlist=["_"])
except ModuleNotFoundError:
    store_mod = None

from kernel_cases import KernelCase, layer_pair, make_case, ragged_past_lens  # noqa: E402

from xquant_vllm.accounting import LLAMA3_8B, SMOLLM2, ModelShape  # noqa: E402
from xquant_vllm.config import PRESETS, LayerQuant, make_config  # noqa: E402
from xquant_vllm.layout import PageLayout, page_layout  # noqa: E402

MODELS = {"llama3-8b": (LLAMA3_8B, 32), "smollm2": (SMOLLM2, 9)}  # shape, query heads
TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
MAX_BF16_CACHE = 24e9  # skip (batch, context) points whose bf16 K+V cache of one layer exceeds this
DEV = "cuda"  # "cpu" for --dry-run (interpreted kernels, host timer, tiny sizes)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- checks -----------------------------------------------------------------------------------------------


def on_device(case: KernelCase, dev: str) -> KernelCase:
    """The case with every tensor (plan included) moved to ``dev``; histories stay for the reference."""
    moved = {}
    for f in dataclasses.fields(case):
        v = getattr(case, f.name)
        if isinstance(v, torch.Tensor):
            moved[f.name] = v.to(dev)
        elif isinstance(v, kernels.StepPlan):
            moved[f.name] = dataclasses.replace(
                v,
                **{
                    g.name: getattr(v, g.name).to(dev)
                    for g in dataclasses.fields(v)
                    if torch.is_tensor(getattr(v, g.name))
                },
            )
    return dataclasses.replace(case, **moved)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    return float("nan") if out.isnan().any() else ((out - ref).norm() / ref.norm()).item()


def attention_cases() -> list[tuple[str, KernelCase, tuple[int | None, int | None]]]:
    """(name, case, (num_splits, tile_tokens)); None leaves the launch default."""
    cases = []
    for bits, D, G, dtype, splits, tile in [
        ((1, 1), 64, 4, torch.float16, None, None), ((2, 2), 128, 3, torch.bfloat16, 4, 32),
        ((4, 4), 256, 1, torch.bfloat16, None, 256), ((2, 4), 128, 4, torch.float16, 8, 64),
        ((4, 1), 64, 3, torch.bfloat16, None, 128), ((1, 1), 128, 4, torch.bfloat16, 3, None),
    ]:  # fmt: skip
        lq, _ = layer_pair(*bits, head_size=D, block=32, v_group=32)
        past = ragged_past_lens(32) + [40 * 32 + 7, 300]
        q = [1] * (len(past) - 1) + [0]
        case = make_case(lq, past_lens=past, q_lens=q, num_kv_heads=2, num_q_heads=2 * G, dtype=dtype, seed=len(cases))
        cases.append(
            (f"decode bits={bits} D={D} G={G} {str(dtype)[6:]} splits={splits} tile={tile}", case, (splits, tile))
        )
    for dtype in (torch.float16, torch.bfloat16):
        lq, _ = layer_pair(2, 1, head_size=128, block=32, v_group=32)
        past = ragged_past_lens(32) + [9 * 32 + 4]
        case = make_case(lq, past_lens=past, q_lens=[5, 70, 1, 33, 129, 0], num_kv_heads=2, num_q_heads=8, dtype=dtype)
        cases.append((f"prefill bits=(2,1) D=128 G=4 {str(dtype)[6:]}", case, (None, None)))
    for shared, meta, B, qn in [
        ((True, True), 16, 32, 1),
        ((True, False), 16, 32, 17),
        ((True, True), 8, 64, 1),
        ((True, False), 8, 64, 9),
    ]:
        lq, lower = layer_pair(
            1, 1, head_size=128, block=B, v_group=B, meta_bits=meta, k_shared=shared[0], v_shared=shared[1]
        )
        past = ragged_past_lens(B) + [20 * B + 3]
        case = make_case(
            lq,
            past_lens=past,
            q_lens=[qn] * len(past),
            num_kv_heads=8,
            num_q_heads=32,
            dtype=torch.bfloat16,
            lower_lq=lower,
        )
        cases.append((f"shared={shared} meta={meta} B={B} q_len={qn}", case, (None, None)))
    return cases


# Decode key paths checked besides the default (label, decode-module settings, tolerance; None: the dtype's).
# int8 x int8 with the query rounded to 127 steps per row is an approximation: its own bound
# (tests/test_decode_variants.py).
# The default (subnormal keys) runs in every check above; the int8 knobs on the first three decode cases.
KEY_PATH_CHECKS = [
    ("keys fp16 + bias", dict(subnormal=False, int8=0), None, 6),
    ("keys int8, query int8", dict(int8=1), 1e-2, 3),
    ("keys int8, query int8 + residual", dict(int8=2), None, 3),
]


def run_checks() -> list[dict]:
    results = []
    for name, case, (splits, tile) in attention_cases():
        ref = case.expected_attention()
        dcase = on_device(case, DEV)
        for generic in (False, True) if max(case.q_lens) <= 1 else (False,):
            out = dcase.poisoned_out()
            attention.paged_attention_triton(
                *dcase.attention_args(out), num_splits=splits, tile_tokens=tile, generic=generic
            )
            err = rel_err(out, ref)
            kernel = "paged_attention (generic kernel)" if generic else "paged_attention (decode kernel)"
            results.append(dict(kernel=kernel, case=name, rel_err=err, ok=bool(err < TOL[case.dtype])))
    name, case, (splits, tile) = attention_cases()[1]
    out = on_device(case, DEV).poisoned_out()
    attention.paged_attention_triton(*on_device(case, DEV).attention_args(out), prefetch=False)
    err = rel_err(out, case.expected_attention())
    results.append(dict(kernel="paged_attention (decode, no prefetch)", case=name, rel_err=err,
                        ok=bool(err < TOL[case.dtype])))  # fmt: skip
    for name, case, (splits, tile) in attention_cases():
        if max(case.q_lens) <= 1:
            out = on_device(case, DEV).poisoned_out()
            attention.paged_attention_triton(
                *on_device(case, DEV).attention_args(out), num_splits=splits, tile_tokens=tile, key_code_bias=True
            )
            err = rel_err(out, case.expected_attention())
            results.append(dict(kernel="paged_attention (decode, key code bias)", case=name, rel_err=err,
                                ok=bool(err < TOL[case.dtype])))  # fmt: skip
    for label, path, tol, n_cases in KEY_PATH_CHECKS:
        decode_cases = [c for c in attention_cases() if max(c[1].q_lens) <= 1]
        for name, case, (splits, tile) in decode_cases[:n_cases]:
            ref = case.expected_attention()
            dcase = on_device(case, DEV)
            out = dcase.poisoned_out()
            with key_path_set(**path):
                attention.paged_attention_triton(*dcase.attention_args(out), num_splits=splits, tile_tokens=tile)
            err = rel_err(out, ref)
            results.append(dict(kernel=f"paged_attention (decode, {label})", case=name, rel_err=err,
                                tol=tol or TOL[case.dtype], ok=bool(err < (tol or TOL[case.dtype]))))  # fmt: skip
    results.append(check_graph_replay())
    # the public dispatcher picks Triton on CUDA
    name, case, _ = attention_cases()[0]
    dcase = on_device(case, DEV)
    out = dcase.poisoned_out()
    kernels.paged_attention(*dcase.attention_args(out))
    err = rel_err(out, case.expected_attention())
    impl = kernels._impl(DEV).name
    want = "triton" if DEV == "cuda" else "torch"
    results.append(
        dict(kernel="dispatch", case=f"{name} via {impl}", rel_err=err, ok=bool(err < TOL[case.dtype]) and impl == want)
    )
    results.append(check_fp_baseline())
    if store_mod is not None:
        results += check_store()
    for r in results:
        log(f"check {'ok  ' if r['ok'] else 'FAIL'} {r['kernel']}: {r['case']} err={r.get('rel_err', '')}")
    return results


def check_graph_replay() -> dict:
    """Capture one decode launch in a CUDA graph, then replay it over another batch of the same shapes (other
    lengths, pages, tails, queries copied into the captured tensors): the launch must not bake in host values."""
    lq, _ = layer_pair(2, 1, head_size=128, block=32, v_group=32)
    past = ragged_past_lens(32) + [40 * 32 + 7, 300]
    first, second = (
        make_case(lq, past_lens=p, q_lens=[1] * len(p), num_kv_heads=2, num_q_heads=8, dtype=torch.bfloat16, seed=s)
        for p, s in ((past, 21), (past[::-1], 22))
    )
    live, other = on_device(first, DEV), on_device(second, DEV)
    out = live.poisoned_out()
    name = "decode captured, replayed over reversed lengths"
    if DEV != "cuda":
        return dict(kernel="cuda graph", case=name + " (skipped on cpu)", ok=True)
    attention.paged_attention_triton(*live.attention_args(out))  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        attention.paged_attention_triton(*live.attention_args(out))
    for f in ("query", "key", "value", "pages", "tail_k", "tail_v"):
        getattr(live, f).copy_(getattr(other, f))
    for f in ("query_start_loc", "past_lens", "block_table", "tail_slot"):
        getattr(live.plan, f).copy_(getattr(other.plan, f))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    err = rel_err(out, second.expected_attention())
    return dict(kernel="cuda graph", case=name, rel_err=err, ok=bool(err < TOL[torch.bfloat16]))


def check_fp_baseline() -> dict:
    B, H, D, G = 32, 8, 128, 4
    past = [0, 1, 17, 32, 40 * 32 + 5]
    gen = torch.Generator().manual_seed(11)
    nblk = [-(-p // B) for p in past]
    ids = torch.randperm(sum(nblk) + 3, generator=gen).to(torch.int32)
    bt = torch.zeros(len(past), max(nblk), dtype=torch.int32)
    starts = [0] + list(torch.tensor(nblk).cumsum(0))
    for r in range(len(past)):
        bt[r, : nblk[r]] = ids[int(starts[r]) : int(starts[r + 1])]
    k_cache = torch.randn(ids.numel(), H, B, D, generator=gen).bfloat16()
    v_cache = torch.randn(ids.numel(), H, B, D, generator=gen).bfloat16()
    q = torch.randn(len(past), H * G, D, generator=gen).bfloat16()
    kn, vn = (
        torch.randn(len(past), H, D, generator=gen).bfloat16(),
        torch.randn(len(past), H, D, generator=gen).bfloat16(),
    )
    plan = kernels.build_step_plan(
        torch.arange(len(past) + 1, dtype=torch.int32),
        torch.tensor(past, dtype=torch.int32),
        bt,
        torch.arange(len(past), dtype=torch.int32),
        B,
    )
    refs = []
    for r, p in enumerate(past):
        ks = torch.cat([k_cache[bt[r, j]].transpose(0, 1) for j in range(nblk[r])] + [torch.empty(0, H, D).bfloat16()])[
            :p
        ]
        vs = torch.cat([v_cache[bt[r, j]].transpose(0, 1) for j in range(nblk[r])] + [torch.empty(0, H, D).bfloat16()])[
            :p
        ]
        ks, vs = torch.cat([ks, kn[r : r + 1]]).float(), torch.cat([vs, vn[r : r + 1]]).float()
        o = F.scaled_dot_product_attention(
            q[r : r + 1].float().transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1), scale=D**-0.5, enable_gqa=True
        )
        refs.append(o.transpose(0, 1))
    dev = lambda t: t.to(DEV)  # noqa: E731
    dplan = dataclasses.replace(
        plan,
        **{
            f.name: dev(getattr(plan, f.name))
            for f in dataclasses.fields(plan)
            if torch.is_tensor(getattr(plan, f.name))
        },
    )
    out = torch.full_like(dev(q), float("nan"))
    attention.paged_attention_fp_triton(dev(q), dev(kn), dev(vn), dev(k_cache), dev(v_cache), dplan, D**-0.5, out)
    err = rel_err(out, torch.cat(refs))
    return dict(
        kernel="paged_attention_fp (bf16 baseline)",
        case="decode ragged, D=128 G=4",
        rel_err=err,
        ok=bool(err < TOL[torch.bfloat16]),
    )


def check_store() -> list[dict]:
    results = []
    for bits, meta, B, shared, dtype in [
        ((1, 1), 16, 32, (False, False), torch.bfloat16), ((2, 4), 16, 32, (False, False), torch.float16),
        ((4, 2), 16, 32, (False, False), torch.bfloat16), ((1, 1), 16, 32, (True, True), torch.bfloat16),
        ((1, 2), 8, 64, (True, False), torch.float16), ((2, 2), 8, 64, (False, False), torch.bfloat16),
    ]:  # fmt: skip
        lq, lower = layer_pair(
            *bits,
            head_size=128,
            block=B,
            v_group=32 if meta == 16 else 64,
            meta_bits=meta,
            k_shared=shared[0],
            v_shared=shared[1],
        )
        past = ragged_past_lens(B) + [3 * B - 1]
        for q_lens in ([1] * len(past), [B + 3, 2 * B, B - 1, 1, 5 * B + 7, 1]):
            case = make_case(
                lq,
                past_lens=past,
                q_lens=q_lens,
                num_kv_heads=4,
                num_q_heads=4,
                dtype=dtype,
                lower_lq=lower if any(shared) else None,
            )
            exp_pages, exp_tk, exp_tv = case.expected_store()
            d = on_device(case, DEV)
            store_mod.store_kv_triton(*d.store_args())
            same = (
                torch.equal(d.pages.cpu(), exp_pages)
                and torch.equal(d.tail_k.cpu(), exp_tk)
                and torch.equal(d.tail_v.cpu(), exp_tv)
            )
            diff = int((d.pages.cpu() != exp_pages).sum())
            name = f"bits={bits} meta={meta} B={B} shared={shared} {str(dtype)[6:]} q_lens={q_lens[:3]}..."
            results.append(dict(kernel="store_kv (bit-exact)", case=name, bytes_differing=diff, ok=bool(same)))
    return results


# ---- timing -----------------------------------------------------------------------------------------------


def bench(fn, rep_ms: int) -> float:
    if DEV == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median"))


def copy_bandwidth(rep_ms: int) -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read and written."""
    n = 2**30 if DEV == "cuda" else 2**24
    src, dst = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV), torch.empty(n, dtype=torch.uint8, device=DEV)
    ms = bench(lambda: dst.copy_(src), rep_ms)
    return 2 * n / ms / 1e6


def random_pages(layout: PageLayout, n: int, H: int, dtype: torch.dtype) -> torch.Tensor:
    """Random codes with valid metadata (small positive scales, finite zero-points, a real super range)."""
    pages = torch.randint(0, 256, (n, H, layout.page_bytes), dtype=torch.uint8, device=DEV)
    for off, size in ((layout.k_meta_off, layout.k_meta_bytes), (layout.v_meta_off, layout.v_meta_bytes)):
        if layout.meta_bits == 16:
            view = pages[:, :, off : off + size].view(dtype)
            half = view.shape[-1] // 2
            view[..., :half] = (torch.rand(n, H, half, device=DEV) * 0.2 + 0.01).to(dtype)
            view[..., half:] = torch.randn(n, H, half, device=DEV).to(dtype)
    if layout.super_off >= 0:
        pages[:, :, layout.super_off : layout.super_off + 16].view(torch.float32)[:] = torch.tensor(
            [-2.0, 2.0, -2.0, 2.0], device=DEV
        )
    return pages


def page_read_bytes(layout: PageLayout) -> int:
    """Bytes read per (block, head): both code sections (a shared layer reads its lower partner's, same bits)
    and the layer's own metadata."""
    codes = layout.head_size * layout.k_row_bytes + layout.block * layout.v_row_bytes
    return codes + layout.k_meta_bytes + layout.v_meta_bytes + (16 if layout.meta_bits == 8 else 0)


@dataclasses.dataclass
class DecodeBatch:
    """One decode step: ``batch`` requests of ``ctx - 1`` past tokens, shuffled block ids."""

    shape: ModelShape
    hq: int
    batch: int
    ctx: int
    block: int

    def __post_init__(self) -> None:
        H, D, B = self.shape.num_kv_heads, self.shape.head_size, self.block
        self.past = self.ctx - 1
        self.nblk = -(-self.ctx // B)
        self.num_blocks = self.batch * self.nblk
        ids = torch.randperm(self.num_blocks, device=DEV).to(torch.int32).reshape(self.batch, self.nblk)
        self.plan = kernels.build_step_plan(
            torch.arange(self.batch + 1, dtype=torch.int32, device=DEV),
            torch.full((self.batch,), self.past, dtype=torch.int32, device=DEV),
            ids, torch.arange(self.batch, dtype=torch.int32, device=DEV), B,
        )  # fmt: skip
        dt = self.shape.dtype
        self.query = torch.randn(self.batch, self.hq, D, device=DEV, dtype=dt)
        self.key = torch.randn(self.batch, H, D, device=DEV, dtype=dt)
        self.value = torch.randn(self.batch, H, D, device=DEV, dtype=dt)
        self.tail_k = torch.randn(self.batch, H, B, D, device=DEV, dtype=dt)
        self.tail_v = torch.randn(self.batch, H, B, D, device=DEV, dtype=dt)
        self.out = torch.empty_like(self.query)
        self.scale = D**-0.5

    def tail_bytes(self) -> int:
        H, D = self.shape.num_kv_heads, self.shape.head_size
        return self.batch * H * (self.past % self.block) * D * 2 * self.shape.dtype_bytes

    def io_bytes(self) -> int:
        return 2 * self.query.numel() * self.query.element_size() + 2 * self.key.numel() * self.key.element_size()


def layer_kinds(cfg) -> collections.Counter:
    return collections.Counter((lq.k_bits, lq.v_bits, lq.k_shared, lq.v_shared) for lq in cfg.layers())


def time_quant_kind(
    db: DecodeBatch,
    lq: LayerQuant,
    rep_ms: int,
    splits: int | None = None,
    tile: int | None = None,
    warps: int | None = None,
    generic: bool = False,
    regs: int | None = None,
    prefetch: bool = True,
    key_code_bias: bool = False,
    key_path: dict | None = None,
) -> tuple[float, int]:
    """One layer kind's decode time and bytes read; ``key_path`` sets ``decode.KEY_SUBNORMAL`` / ``KEY_INT8`` for
    this timing only (module defaults, read at launch)."""
    with key_path_set(**(key_path or {})):
        return _time_quant_kind(db, lq, rep_ms, splits, tile, warps, generic, regs, prefetch, key_code_bias)


@contextlib.contextmanager
def key_path_set(subnormal: bool | None = None, int8: int | None = None):
    """Temporarily set the decode kernel's key path (``None`` keeps the module default)."""
    saved = decode_mod.KEY_SUBNORMAL, decode_mod.KEY_INT8
    if subnormal is not None:
        decode_mod.KEY_SUBNORMAL = subnormal
    if int8 is not None:
        decode_mod.KEY_INT8 = int8
    try:
        yield
    finally:
        decode_mod.KEY_SUBNORMAL, decode_mod.KEY_INT8 = saved


def _time_quant_kind(db, lq, rep_ms, splits, tile, warps, generic, regs, prefetch, key_code_bias):
    H, dt = db.shape.num_kv_heads, db.shape.dtype
    layout = page_layout(lq, dt)
    pages = random_pages(layout, db.num_blocks, H, dt)
    lower_pages = lower_layout = None
    if lq.k_shared or lq.v_shared:
        lower_lq = dataclasses.replace(lq, index=lq.index - 1, k_shared=False, v_shared=False)
        lower_layout = page_layout(lower_lq, dt)
        lower_pages = random_pages(lower_layout, db.num_blocks, H, dt)
    args = (
        db.query,
        db.key,
        db.value,
        pages,
        db.tail_k,
        db.tail_v,
        db.plan,
        lq,
        layout,
        db.scale,
        db.out,
        lower_pages,
        lower_layout,
    )
    ms = bench(
        lambda: attention.paged_attention_triton(
            *args, num_splits=splits, tile_tokens=tile, num_warps=warps, generic=generic, max_registers=regs,
            **({} if prefetch else {"prefetch": False}), **({"key_code_bias": True} if key_code_bias else {}),
        ),
        rep_ms,
    )
    read = db.batch * (db.past // db.block) * H * page_read_bytes(layout) + db.tail_bytes() + db.io_bytes()
    del pages, lower_pages
    return ms, read


def time_bf16_paged(
    db: DecodeBatch, rep_ms: int, splits: int | None = None, tile: int | None = None
) -> tuple[float, int]:
    H, D, B = db.shape.num_kv_heads, db.shape.head_size, db.block
    k_cache = torch.randn(db.num_blocks, H, B, D, device=DEV, dtype=db.shape.dtype)
    v_cache = torch.randn_like(k_cache)
    args = (db.query, db.key, db.value, k_cache, v_cache, db.plan, db.scale, db.out)
    ms = bench(
        functools.partial(attention.paged_attention_fp_triton, *args, num_splits=splits, tile_tokens=tile), rep_ms
    )
    return ms, db.batch * db.past * H * D * 2 * db.shape.dtype_bytes + db.io_bytes()


def time_sdpa_flash(db: DecodeBatch, rep_ms: int) -> tuple[float, int]:
    """Decode as flash attention: the G query heads of a KV head become G query rows (no GQA expansion)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, D = db.shape.num_kv_heads, db.shape.head_size
    k = torch.randn(db.batch, H, db.ctx, D, device=DEV, dtype=db.shape.dtype)
    v = torch.randn_like(k)
    q = db.query.view(db.batch, H, db.hq // H, D)

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION if DEV == "cuda" else SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, scale=db.scale)

    return bench(run, rep_ms), 2 * k_bytes(db) + db.io_bytes()


def k_bytes(db: DecodeBatch) -> int:
    return db.batch * db.ctx * db.shape.num_kv_heads * db.shape.head_size * db.shape.dtype_bytes


def time_decode(args, copy_gbs: float) -> list[dict]:
    rows = []
    presets = args.presets or list(PRESETS)
    for model in args.models:
        shape, hq = MODELS[model]
        for batch in args.batches:
            for ctx in args.contexts:
                if 2 * batch * ctx * shape.num_kv_heads * shape.head_size * shape.dtype_bytes > MAX_BF16_CACHE:
                    log(f"skip {model} batch={batch} ctx={ctx}: bf16 cache over {MAX_BF16_CACHE / 1e9:.0f} GB")
                    continue
                rows += time_point(args, shape, hq, model, batch, ctx, presets, copy_gbs)
                if DEV == "cuda":
                    torch.cuda.empty_cache()
    return rows


def time_point(args, shape, hq, model, batch, ctx, presets, copy_gbs, generic_presets=()) -> list[dict]:
    point = dict(model=model, batch=batch, ctx=ctx)

    def row(method: str, ms: float, read: int, **extra) -> dict:
        gbs = read / ms / 1e6
        r = dict(point, method=method, ms=ms, bytes_read=read, gbs=gbs, frac_copy_bw=gbs / copy_gbs, **extra)
        log(f"{model} b={batch} ctx={ctx} {method}: {ms * 1e3:.1f} us, {gbs:.0f} GB/s ({gbs / copy_gbs:.0%} of copy)")
        return r

    rows = []
    dbs = {}
    db32 = dbs[32] = DecodeBatch(shape, hq, batch, ctx, 32)
    bf16_ms, read = time_bf16_paged(db32, args.rep_ms)
    rows.append(row("bf16-paged-triton", bf16_ms, read))
    sdpa_ms, read = time_sdpa_flash(db32, args.rep_ms)
    rows.append(row("sdpa-flash-contiguous", sdpa_ms, read))
    kind_cache: dict[tuple, tuple[float, int]] = {}
    methods = [(preset, False) for preset in presets] + [(preset, True) for preset in generic_presets]
    for preset, generic in methods:
        cfg = make_config(preset, num_layers=shape.num_layers, head_size=shape.head_size)
        B = cfg.block_size
        if B not in dbs:
            dbs[B] = DecodeBatch(shape, hq, batch, ctx, B)
        total_ms = total_read = 0.0
        kinds = {}
        for kind, count in layer_kinds(cfg).items():
            lq = next(lq for lq in cfg.layers() if (lq.k_bits, lq.v_bits, lq.k_shared, lq.v_shared) == kind)
            key = (kind, B, cfg.v_group, cfg.meta_bits, generic)
            if key not in kind_cache:
                kind_cache[key] = time_quant_kind(dbs[B], lq, args.rep_ms, generic=generic)
            ms, read = kind_cache[key]
            kinds[str(kind)] = dict(layers=count, ms=ms, bytes_read=read)
            total_ms += count * ms / cfg.num_layers
            total_read += count * read / cfg.num_layers
        rows.append(
            row(
                f"{preset} (generic kernel)" if generic else preset,
                total_ms,
                int(total_read),
                speedup_vs_bf16=bf16_ms / total_ms,
                speedup_vs_sdpa=sdpa_ms / total_ms,
                kinds=kinds,
                config=cfg.describe(),
            )
        )
    return rows


def tile_sweep(args, copy_gbs: float) -> list[dict]:
    """Llama-3-8B at the run's first batch and last context: tokens per loop step x context splits (x warps per
    program for xquant), for the 1-bit xquant layer and the bf16 baseline (what the launch defaults should be)."""
    shape, hq = MODELS["llama3-8b"]
    batch, ctx = args.batches[0], args.contexts[-1]
    db = DecodeBatch(shape, hq, batch, ctx, 32)
    lq = make_config("xquant", num_layers=shape.num_layers, head_size=shape.head_size).layer(shape.num_layers - 2)
    points = [("bf16", tile, s, None) for tile in (32, 64, 128, 256) for s in (None, 16, 64)]
    points += [("xquant 1-bit", tile, s, w) for tile in (32, 64, 128, 256) for s in (None, 16, 64) for w in (4, 8)]
    rows = []
    for kernel, tile, s, warps in points:
        if kernel == "bf16":
            ms, read = time_bf16_paged(db, args.rep_ms, splits=s, tile=tile)
        else:
            ms, read = time_quant_kind(db, lq, args.rep_ms, splits=s, tile=tile, warps=warps)
        gbs = read / ms / 1e6
        rows.append(
            dict(
                kernel=kernel, tile_tokens=tile, splits=s or "auto", num_warps=warps or "auto", ms=ms, gbs=gbs,
                frac_copy_bw=gbs / copy_gbs,
            )
        )  # fmt: skip
        log(f"sweep {kernel} b={batch} ctx={ctx} tile={tile} splits={s or 'auto'} warps={warps or 'auto'}: "
            f"{ms * 1e3:.1f} us {gbs:.0f} GB/s")  # fmt: skip
    return rows


# Issue 14: (model, batch, context) -> minimum speed-up over the bf16 paged kernel, per preset.
TARGETS = {
    ("llama3-8b", 32, 32768): {"xquant": 4.0, "kivi-2": 3.5},
    ("llama3-8b", 8, 32768): {"xquant": 4.0, "kivi-2": 3.5},
    ("llama3-8b", 128, 32768): {"xquant": 4.0, "kivi-2": 3.5},
    ("llama3-8b", 32, 4096): {"xquant": 3.0},
    ("smollm2", 32, 32768): {"xquant": 3.0},
}
MIN_FRAC_COPY_BW = 0.6  # xquant at the 8B points of 32k


def time_targets(args, copy_gbs: float) -> list[dict]:
    """Issue 14's points: bf16 paged, SDPA-flash, xquant and kivi-2 (decode kernel); at 8B 32 x 32k also xquant
    through the generic kernel (the kernel before the decode path)."""
    rows = []
    for (model, batch, ctx), want in TARGETS.items():
        shape, hq = MODELS[model]
        generic = ["xquant"] if (model, batch) == ("llama3-8b", 32) or DEV == "cpu" else []
        presets = sorted(want) + [p for p in ("xquant-paper",) if p in PRESETS]
        rows += time_point(args, shape, hq, model, batch, ctx, presets, copy_gbs, generic)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return rows


def decode_sweep(args, copy_gbs: float) -> list[dict]:
    """The decode kernel's key paths (fp16 codes with the +1024 bias subtracted; fp16 subnormal codes; int8 codes
    times an int8 query, with or without its residual) and a 168-register cap (3 programs per SM) at Llama-3-8B,
    32 x 32k, on four layer kinds: the ``xquant`` preset's two (keys 2-bit, values 2/1-bit, block 64, 8-bit
    metadata) and a 2-bit and a 1-bit layer of block 32 with 16-bit metadata (the notes' earlier runs)."""
    shape, hq = MODELS["llama3-8b"]
    batch, ctx = (32, 32768) if DEV == "cuda" else (2, 256)
    dbs = {B: DecodeBatch(shape, hq, batch, ctx, B) for B in (32, 64)}
    layers = (("k2v1 B64 meta8", layer_pair(2, 1, head_size=128, block=64, v_group=64, meta_bits=8)[0]),
              ("k2v2 B64 meta8", layer_pair(2, 2, head_size=128, block=64, v_group=64, meta_bits=8)[0]),
              ("2-bit B32 meta16", layer_pair(2, 2, head_size=128, block=32, v_group=32)[0]),
              ("1-bit B32 meta16", layer_pair(1, 1, head_size=128, block=32, v_group=32)[0]))  # fmt: skip
    points = [  # label, key path, register cap
        ("fp16+bias", dict(subnormal=False, int8=0), None),
        ("subnormal", dict(subnormal=True, int8=0), None),
        ("subnormal, 168 regs", dict(subnormal=True, int8=0), 168),
        ("int8", dict(int8=1), None),
        ("int8+residual", dict(int8=2), None),
        ("fp16+bias again", dict(subnormal=False, int8=0), None),  # run-to-run spread
    ]
    rows = []
    for name, lq in layers:
        db = dbs[lq.k_group]
        auto = decode_mod.decode_splits(batch, shape.num_kv_heads, db.plan.block_table.shape[1], torch.device(DEV))
        for label, path, regs in points:
            ms, read = time_quant_kind(db, lq, args.rep_ms, regs=regs, key_path=path)
            gbs = read / ms / 1e6
            rows.append(
                dict(layer=name, key_path=label, tile_tokens=128, num_warps=4, max_registers=regs, splits=auto,
                     prefetch=True, key_code_bias=False, auto_splits=auto, ms=ms, gbs=gbs,
                     frac_copy_bw=gbs / copy_gbs)
            )  # fmt: skip
            log(f"sweep {name} {label} regs={regs}: {ms * 1e3:.1f} us {gbs:.0f} GB/s")
    bf16_ms, _ = time_bf16_paged(dbs[32], args.rep_ms)
    rows.append(dict(layer="bf16 paged B32", key_path="-", ms=bf16_ms))
    log(f"sweep bf16 paged (same sweep): {bf16_ms * 1e3:.1f} us")
    return rows


def time_prefill(args, copy_gbs: float) -> list[dict]:
    """Chunked prefill at Llama-3-8B: ``R`` requests, each a 2,048-token chunk over 32k of past (issue 14's
    prefill target), through the generic kernel: a 2- and a 1-bit layer (block 32) against the bf16 paged cache."""
    shape, hq = MODELS["llama3-8b"]
    H, D, B, dt = shape.num_kv_heads, shape.head_size, 32, shape.dtype
    R, chunk, past = (2, 2048, 32768) if DEV == "cuda" else (1, 8, 64)
    nblk = (past + chunk) // B
    ids = torch.randperm(R * nblk, device=DEV).to(torch.int32).reshape(R, nblk)
    plan = kernels.build_step_plan(
        torch.arange(R + 1, dtype=torch.int32, device=DEV) * chunk,
        torch.full((R,), past, dtype=torch.int32, device=DEV),
        ids, torch.arange(R, dtype=torch.int32, device=DEV), B,
    )  # fmt: skip
    query = torch.randn(R * chunk, hq, D, device=DEV, dtype=dt)
    key, value = (torch.randn(R * chunk, H, D, device=DEV, dtype=dt) for _ in range(2))
    tail_k, tail_v = (torch.randn(R, H, B, D, device=DEV, dtype=dt) for _ in range(2))
    out = torch.empty_like(query)
    k_cache, v_cache = (torch.randn(R * nblk, H, B, D, device=DEV, dtype=dt) for _ in range(2))
    bf16_ms = bench(
        lambda: attention.paged_attention_fp_triton(query, key, value, k_cache, v_cache, plan, D**-0.5, out),
        args.rep_ms,
    )
    del k_cache, v_cache
    rows = [dict(method="bf16-paged-triton", requests=R, chunk=chunk, past=past, ms=bf16_ms)]
    log(f"prefill {R}x{chunk} over {past}: bf16 paged {bf16_ms * 1e3:.1f} us")
    for name, bits in (("2-bit layer", (2, 2)), ("1-bit layer", (1, 1))):
        lq = layer_pair(*bits, head_size=D, block=B, v_group=32)[0]
        layout = page_layout(lq, dt)
        pages = random_pages(layout, R * nblk, H, dt)
        ms = bench(
            lambda: attention.paged_attention_triton(
                query, key, value, pages, tail_k, tail_v, plan, lq, layout, D**-0.5, out
            ),
            args.rep_ms,
        )
        del pages
        rows.append(dict(method=name, requests=R, chunk=chunk, past=past, ms=ms, vs_bf16=ms / bf16_ms))
        log(f"prefill {R}x{chunk} over {past}: {name} {ms * 1e3:.1f} us = {ms / bf16_ms:.2f}x bf16 (target <= 1.25x)")
    return rows


def target_table(rows: list[dict], copy_gbs: float) -> tuple[list[str], dict]:
    """The printed table (one line per point and preset) and the targets met / missed."""
    at = collections.defaultdict(dict)
    for r in rows:
        at[(r["model"], r["batch"], r["ctx"])][r["method"]] = r
    lines = [
        f"copy bandwidth {copy_gbs:.0f} GB/s",
        f"{'model':9s} {'batch':>5s} {'ctx':>6s} {'method':24s} {'us':>8s} {'bf16 us':>8s} {'sdpa us':>8s} "
        f"{'vs bf16':>7s} {'vs sdpa':>7s} {'% copy':>6s} {'target':>6s}",
    ]
    verdict = {}
    for point, want in TARGETS.items():
        methods = at.get(point, {})
        if "bf16-paged-triton" not in methods:
            continue
        bf16, sdpa = methods["bf16-paged-triton"]["ms"] * 1e3, methods["sdpa-flash-contiguous"]["ms"] * 1e3
        for method, r in methods.items():
            if "speedup_vs_bf16" not in r:
                continue
            goal = want.get(method)
            met = None if goal is None else r["speedup_vs_bf16"] >= goal
            if goal is not None:
                verdict[f"{point[0]} {point[1]}x{point[2]} {method} >= {goal}x bf16"] = met
            if method == "xquant" and point[0] == "llama3-8b" and point[2] == 32768:
                bw_ok = r["frac_copy_bw"] >= MIN_FRAC_COPY_BW
                verdict[f"{point[0]} {point[1]}x{point[2]} xquant >= 60% copy bw"] = bw_ok
            lines.append(
                f"{point[0]:9s} {point[1]:5d} {point[2]:6d} {method:24s} {r['ms'] * 1e3:8.1f} {bf16:8.1f} {sdpa:8.1f} "
                f"{r['speedup_vs_bf16']:6.2f}x {r['speedup_vs_sdpa']:6.2f}x {r['frac_copy_bw']:6.0%} "
                f"{'' if goal is None else ('met' if met else 'MISSED'):>6s}"
            )
    return lines, verdict


def profile_one(args) -> None:
    """One launch each of a 2-bit and a 1-bit xquant layer and of the bf16 baseline (run under ``ncu``)."""
    shape, hq = MODELS["llama3-8b"]
    db = DecodeBatch(shape, hq, args.batches[0], args.contexts[-1], 32)
    for bits in ((2, 2), (1, 1)):  # a 2-bit and a 1-bit layer, block 32: the fp16-bias path, then subnormal keys
        lq = layer_pair(*bits, head_size=shape.head_size, block=32, v_group=32)[0]
        layout = page_layout(lq, shape.dtype)
        pages = random_pages(layout, db.num_blocks, shape.num_kv_heads, shape.dtype)
        for subnormal in (False, True):
            with key_path_set(subnormal=subnormal, int8=0):
                attention.paged_attention_triton(
                    db.query, db.key, db.value, pages, db.tail_k, db.tail_v, db.plan, lq, layout, db.scale, db.out
                )
        del pages
    k_cache = torch.randn(db.num_blocks, shape.num_kv_heads, 32, shape.head_size, device=DEV, dtype=shape.dtype)
    attention.paged_attention_fp_triton(
        db.query, db.key, db.value, k_cache, torch.randn_like(k_cache), db.plan, db.scale, db.out
    )
    if DEV == "cuda":
        torch.cuda.synchronize()


def time_store(args) -> list[dict]:
    if store_mod is None:
        return []
    shape = LLAMA3_8B
    H, D, dt = shape.num_kv_heads, shape.head_size, shape.dtype
    rows = []
    cfg = make_config("xquant", num_layers=shape.num_layers, head_size=D)
    for name, lq in (
        ("2-bit layer", cfg.layer(0)),
        ("1-bit layer", cfg.layer(shape.num_layers - 2)),
        ("shared layer", cfg.layer(shape.num_layers - 1)),
    ):
        B = lq.k_group
        sizes = ((8, 4096), (128, 1)) if DEV == "cuda" else ((2, 40), (3, 1))
        (pb, pq), (db_, _) = sizes
        for mode, batch, q_len, past in (
            (f"prefill {pb}x{pq}", pb, pq, 0),
            (f"decode {db_}, every request completes a block", db_, 1, B - 1),
        ):
            nblk = -(-(past + q_len) // B)
            ids = torch.randperm(batch * nblk, device=DEV).to(torch.int32).reshape(batch, nblk)
            qsl = torch.arange(batch + 1, dtype=torch.int32, device=DEV) * q_len
            plan = kernels.build_step_plan(
                qsl,
                torch.full((batch,), past, dtype=torch.int32, device=DEV),
                ids,
                torch.arange(batch, dtype=torch.int32, device=DEV),
                B,
            )
            layout = page_layout(lq, dt)
            pages = torch.zeros(batch * nblk, H, layout.page_bytes, dtype=torch.uint8, device=DEV)
            tail_k = torch.randn(batch, H, B, D, device=DEV, dtype=dt)
            tail_v = torch.randn_like(tail_k)
            key = torch.randn(batch * q_len, H, D, device=DEV, dtype=dt) * 2 + 1
            value = torch.randn_like(key)
            store = functools.partial(store_mod.store_kv_triton, key, value, pages, tail_k, tail_v, plan, lq, layout)
            ms = bench(store, args.rep_ms)
            tokens = batch * q_len
            rows.append(
                dict(
                    layer=name,
                    mode=mode,
                    ms=ms,
                    tokens_per_s=tokens / ms * 1e3,
                    input_gbs=2 * key.numel() * 2 / ms / 1e6,
                )
            )
            log(f"store {name} {mode}: {ms * 1e3:.1f} us, {tokens / ms * 1e3 / 1e6:.2f} M tokens/s")
    return rows


# ---- report -----------------------------------------------------------------------------------------------


def targets(rows: list[dict]) -> dict:
    """Issue 5's targets at Llama-3-8B, batch 32, 32k context."""
    at = {r["method"]: r for r in rows if (r["model"], r["batch"], r["ctx"]) == ("llama3-8b", 32, 32768)}
    if "xquant" not in at:
        return {}
    x = at["xquant"]
    return dict(
        xquant_us=x["ms"] * 1e3, bf16_paged_us=at["bf16-paged-triton"]["ms"] * 1e3,
        sdpa_flash_us=at["sdpa-flash-contiguous"]["ms"] * 1e3,
        speedup_vs_bf16=x["speedup_vs_bf16"], speedup_vs_bf16_met=x["speedup_vs_bf16"] >= 4,
        speedup_vs_sdpa=x["speedup_vs_sdpa"], faster_than_sdpa_met=x["speedup_vs_sdpa"] > 1,
        frac_copy_bw=x["frac_copy_bw"], frac_copy_bw_met=x["frac_copy_bw"] >= 0.6, kinds=x["kinds"],
    )  # fmt: skip


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["decode"] if "speedup_vs_bf16" in r]
    panels = sorted({(r["model"], r["batch"]) for r in rows})
    if not panels:
        return
    cols = min(4, len(panels))
    fig, axes = plt.subplots(
        -(-len(panels) // cols), cols, figsize=(4.2 * cols, 3.4 * -(-len(panels) // cols)), squeeze=False
    )
    for ax, (model, batch) in zip(axes.flat, panels):
        sel = [r for r in rows if (r["model"], r["batch"]) == (model, batch)]
        for preset in sorted({r["method"] for r in sel}):
            pts = sorted((r["ctx"], r["speedup_vs_bf16"]) for r in sel if r["method"] == preset)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=preset)
        sd = sorted(
            (r["ctx"], r["ms"])
            for r in result["decode"]
            if (r["model"], r["batch"], r["method"]) == (model, batch, "sdpa-flash-contiguous")
        )
        bf = {
            r["ctx"]: r["ms"]
            for r in result["decode"]
            if (r["model"], r["batch"], r["method"]) == (model, batch, "bf16-paged-triton")
        }
        ax.plot([c for c, _ in sd], [bf[c] / ms for c, ms in sd], "k--", label="sdpa-flash (bf16)")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{model}, batch {batch}", fontsize=9)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("speed-up over bf16 paged")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"decode attention on {result['env']['device']}: speed-up over the bf16 paged kernel", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=False, help="folder for kernels_gpu.{json,png,cmd.txt}")
    ap.add_argument("--quick", action="store_true", help="smoke run: checks, Llama-3-8B batch 32 at 4k/32k, sweep")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 128])
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 16384, 32768, 131072])
    ap.add_argument("--presets", nargs="+", default=None, choices=list(PRESETS))
    ap.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition window per timing (ms)")
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--replot", type=Path, help="redraw the PNG from this JSON and exit")
    ap.add_argument("--sweep", action="store_true", help="also sweep tokens per step x splits (with --quick: on)")
    ap.add_argument("--targets", action="store_true", help="issue 14: its points only, a decode-knob sweep, the table")
    ap.add_argument("--profile-one", action="store_true", help="launch the two decode kernels once (for ncu) and exit")
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes: test this script")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    if args.quick:
        args.models, args.batches, args.contexts = ["llama3-8b"], [32], [4096, 32768]
        args.presets = args.presets or ["xquant", "kivi-2"]
        args.sweep = True
    if args.dry_run:
        global DEV, TARGETS
        DEV = "cpu"
        args.batches, args.contexts = [2], [128, 256]
        TARGETS = {(model, 2, 256): {"xquant": 3.0, "kivi-2": 3.0} for model, _, _ in TARGETS}
    if args.profile_one:
        profile_one(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    cmd = "python3 benchmarks/kernels_gpu.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    (args.out / "kernels_gpu.cmd.txt").write_text(cmd + "\n")

    import triton

    props = torch.cuda.get_device_properties(0) if DEV == "cuda" else None
    env = dict(
        device=props.name if props else "cpu (dry run)",
        sms=props.multi_processor_count if props else 0,
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        command=cmd,
    )
    log(f"env: {env}")
    result: dict = dict(env=env)
    torch.manual_seed(0)
    sections = [
        ("checks", lambda: [] if args.skip_checks else run_checks()),
        ("copy_gbs", lambda: copy_bandwidth(args.rep_ms)),
    ]
    if args.targets:
        sections += [
            ("decode", lambda: time_targets(args, result["copy_gbs"])),
            ("decode_sweep", lambda: decode_sweep(args, result["copy_gbs"])),
            ("prefill", lambda: time_prefill(args, result["copy_gbs"])),
        ]
    else:
        sections += [
            ("tile_sweep", lambda: tile_sweep(args, result["copy_gbs"]) if args.sweep else []),
            ("decode", lambda: time_decode(args, result["copy_gbs"])),
            ("store", lambda: time_store(args)),
        ]
    for name, fn in sections:
        t0 = time.time()
        try:
            result[name] = fn()
        except Exception:  # keep what the other sections measure; the log says what broke
            result[name] = dict(error=traceback.format_exc())
            log(f"{name} FAILED:\n{result[name]['error']}")
        log(f"{name} done in {time.time() - t0:.0f} s")
        (args.out / "kernels_gpu.json").write_text(json.dumps(result, indent=1, default=str))
    if isinstance(result.get("decode"), list):
        result["targets"] = targets(result["decode"])
        log(f"targets: {json.dumps(result['targets'], default=str)}")
        if args.targets:
            lines, result["issue14_targets"] = target_table(result["decode"], result["copy_gbs"])
    (args.out / "kernels_gpu.json").write_text(json.dumps(result, indent=1, default=str))
    try:
        plot(result, args.out / "kernels_gpu.png")
    except ImportError as exc:
        log(f"no plot here ({exc}); run --replot on the JSON")
    checks = result.get("checks")
    if isinstance(checks, list):
        log(f"checks: {sum(c['ok'] for c in checks)}/{len(checks)} ok")
    if args.targets and isinstance(result.get("decode"), list):
        sweep = result.get("decode_sweep")
        if isinstance(sweep, list) and sweep:
            bf16 = next((r["ms"] for r in sweep if r["layer"].startswith("bf16")), None)
            for r in sweep:
                vs = f" = {bf16 / r['ms']:.2f}x bf16" if bf16 and not r["layer"].startswith("bf16") else ""
                print(f"sweep {r['layer']:18s} {r['key_path']:20s} {r['ms'] * 1e3:8.1f} us{vs}")
        for line in lines:
            print(line)
        for r in result.get("prefill") or []:
            if isinstance(r, dict) and "vs_bf16" in r:
                print(f"prefill {r['requests']}x{r['chunk']} over {r['past']} {r['method']}: {r['ms'] * 1e3:.0f} us, "
                      f"{r['vs_bf16']:.2f}x bf16 (target <= 1.25x)")  # fmt: skip
        for name, met in result["issue14_targets"].items():
            print(f"  {'met   ' if met else 'MISSED'} {name}")
        return
    if isinstance(result.get("decode"), list):
        log("summary (us, speed-up vs bf16 paged, vs sdpa, fraction of copy bw):")
        for r in result["decode"]:
            if "speedup_vs_bf16" in r and r["method"] in ("xquant", "xquant-max", "kivi-2"):
                point = f"{r['model']:9s} b={r['batch']:<3d} ctx={r['ctx']:<6d} {r['method']:10s}"
                log(
                    f"  {point} {r['ms'] * 1e3:8.1f} {r['speedup_vs_bf16']:5.2f}x {r['speedup_vs_sdpa']:5.2f}x "
                    f"{r['frac_copy_bw']:.0%}"
                )


if __name__ == "__main__":
    main()
