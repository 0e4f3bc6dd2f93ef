"""Compile csrc_triton/decode.py's _decode_kernel for sm_90 on the CPU (no GPU): registers, spills and the SASS
instruction mix of the main loop (the largest backward branch), per warp per loop step.

Run 6 (kernels_gpu_notes.md) used it with the local Triton 3.9 (its ptxas and cuobjdump), e.g.
    TRITON_DEFAULT_FP_FUSION=1 .venv/bin/python benchmarks/results/kernels_gpu_sass.py --bits 2,2 \
        --knob KEY_SUBNORMAL=True
    ... --knob KEY_INT8=1 --knob K_WORD_BITS=32 --knob KEY_SUBNORMAL=False
The device runs Triton 3.6: counts differ by a few percent; compare variants compiled by the same Triton.
"""
import argparse
import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
ap = argparse.ArgumentParser()
ap.add_argument("--bits", default="2,2")
ap.add_argument("--block", type=int, default=32)
ap.add_argument("--meta", type=int, default=16)
ap.add_argument("--vgroup", type=int, default=32)
ap.add_argument("--D", type=int, default=128)
ap.add_argument("--G", type=int, default=4)
ap.add_argument("--warps", type=int, default=4)
ap.add_argument("--tile", type=int, default=128)
ap.add_argument("--maxnreg", type=int, default=0)
ap.add_argument("--knob", action="append", default=[], help="NAME=VALUE extra constexpr")
ap.add_argument("--dump", default="")
args = ap.parse_args()
from kernel_cases import layer_pair
from xquant_vllm.layout import page_layout
import torch
dec = importlib.import_module("csrc_triton.decode")
kb, vb = map(int, args.bits.split(","))
lq, _ = layer_pair(kb, vb, head_size=args.D, block=args.block, v_group=args.vgroup, meta_bits=args.meta)
layout = page_layout(lq, torch.bfloat16)
B, D, G = args.block, args.D, args.G
GP = triton.next_power_of_2(G)
tokens = min(args.tile, dec.MAX_TILE_ELEMENTS // D)
NB = max(1, tokens // B)
M = max(16, NB * GP)
const = dict(SPLIT=True, MIN_BLOCKS=dec.MIN_BLOCKS_PER_SPLIT, H=8, G=G, GP=GP, M=M, SL=M // GP, D=D, B=B, NB=NB,
             NV=layout.v_groups, K_BITS=kb, K_WORD_BITS=dec.key_word_bits(B, kb), V_BITS=vb, META_BITS=args.meta,
             KEY_CODES_OFF=layout.k_codes_off, VALUE_CODES_OFF=layout.v_codes_off, KEY_META_OFF=layout.k_meta_off,
             VALUE_META_OFF=layout.v_meta_off, SUPER_OFF=max(layout.super_off, 0), PREFETCH=True,
             KEY_CODE_BIAS=False, KEY_INT8=0, KEY_SUBNORMAL=dec.KEY_SUBNORMAL, DOT_F32=False)
for kv in args.knob:
    k, v = kv.split("=")
    const[k] = int(v) if v.lstrip("-").isdigit() else (v == "True")
fn = dec._decode_kernel
sig = {}
for name in fn.arg_names:
    if name in const:
        sig[name] = "constexpr"
    elif name.endswith("_ptr"):
        sig[name] = {"partial_ptr": "*fp32", "partial_ml_ptr": "*fp32", "key_codes_ptr": "*u8",
                     "value_codes_ptr": "*u8", "meta_ptr": "*u8", "query_start_loc_ptr": "*i32",
                     "past_lens_ptr": "*i32",
                     "block_table_ptr": "*i32", "tail_slot_ptr": "*i32"}.get(name, "*bf16")
    elif name in ("qk_scale", "key_eta", "key_one_minus_2eta", "value_eta", "value_one_minus_2eta"):
        sig[name] = "fp32"
    else:
        sig[name] = "i32"
opts = dict(num_warps=args.warps)
if args.maxnreg:
    opts["maxnreg"] = args.maxnreg
k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32), options=opts)
cubin = k.asm["cubin"]
path = os.path.join(tempfile.mkdtemp(), "k.cubin")
open(path, "wb").write(cubin)
cuobj = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
sass = subprocess.run([cuobj, "-sass", path], capture_output=True, text=True).stdout
if args.dump:
    open(args.dump, "w").write(sass)
    open(args.dump + ".ttgir", "w").write(k.asm["ttgir"])
    open(args.dump + ".ptx", "w").write(k.asm["ptx"])
lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
ops = []
for l in lines:
    m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", l)
    if m:
        ops.append((int(m.group(1), 16), m.group(3)))
loops = []
for l in lines:
    m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?BRA\s+(0x[0-9a-f]+)", l)
    if m and int(m.group(3), 16) < int(m.group(1), 16):
        loops.append((int(m.group(3), 16), int(m.group(1), 16)))
res = subprocess.run([cuobj, "-res-usage", path], capture_output=True, text=True).stdout
m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", res)
print(f"regs={m.group(1)} stack={m.group(2)} local={m.group(4)} shared={k.metadata.shared} total_instr={len(ops)}")
if loops:
    lo, hi = max(loops, key=lambda x: x[1] - x[0])
    body = [o for a, o in ops if lo <= a <= hi]
    c = collections.Counter(op.split(".")[0] for op in body)
    print(f"main loop: {len(body)} instructions per warp-step")
    print("  " + ", ".join(f"{k}:{v}" for k, v in c.most_common(40)))
