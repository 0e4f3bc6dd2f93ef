"""Quality experiments (not committed): rotation, sink block, per-group optimal 1-bit levels, via patches."""
import argparse, json, math, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
import torch
import quality as Q
from xquant_vllm import hf_cache
from xquant_vllm.hf_cache import XQuantLayer, StoredRun, _fold, _unfold, _OPS
from xquant_vllm.quant.rotation import rotate
from xquant_vllm.accounting import ModelShape
from transformers import AutoModelForCausalLM, AutoTokenizer

FLAGS = {"rk": False, "rv": False, "sink": 0, "lloyd_v": False, "lloyd_k": False}

def lloyd_quant(x, bits):
    # x [..., n, G]; 2-level (1-bit) or 2^b-level uniform with MSE-ish levels: one Lloyd step for 1 bit.
    xf = x.float()
    if bits == 1:
        m = xf.mean(-1, keepdim=True)
        hi = xf > m
        cnt_hi = hi.sum(-1, keepdim=True).clamp(min=1)
        cnt_lo = (~hi).sum(-1, keepdim=True).clamp(min=1)
        l1 = (xf * hi).sum(-1, keepdim=True) / cnt_hi
        l0 = (xf * ~hi).sum(-1, keepdim=True) / cnt_lo
        q = hi.float()
        return (l0 + q * (l1 - l0)).to(x.dtype)
    raise NotImplementedError

def patched_quantize(self, tensor, a, b):
    quantize, meta_of, dequantize = _OPS[tensor]
    buf = self._buf(tensor)
    orig = buf[:, :, a:b].clone()
    x = _fold(buf[:, :, a:b])
    rot = FLAGS["rk"] if tensor == "k" else FLAGS["rv"]
    if rot:
        x = rotate(x)
    if getattr(self.lq, f"{tensor}_shared"):
        codes, meta = None, meta_of(x, self.lq)
        read = self.lower.run_codes(tensor, a, b)
    else:
        codes, meta = quantize(x, self.lq)
        read = codes
    self._runs(tensor).append(StoredRun(a, b, codes, meta))
    deq = dequantize(read, meta, self.lq, self.dtype)
    if FLAGS["lloyd_v"] and tensor == "v" and self.lq.v_bits == 1 and not self.lq.v_shared:
        T, H, D = x.shape
        deq = lloyd_quant(x.reshape(T, H, D // self.lq.v_group, self.lq.v_group), 1).reshape(T, H, D)
    if rot:
        deq = rotate(deq)
    buf[:, :, a:b] = _unfold(deq, buf.shape[0])
    s = FLAGS["sink"]
    if s and a < s:
        n = min(b, s) - a
        keep = orig[:, :, :n]
        if FLAGS.get("sink_bits"):
            from dataclasses import replace as _r
            lq4 = _r(self.lq, k_bits=FLAGS["sink_bits"], v_bits=FLAGS["sink_bits"], k_eta=0.0, v_eta=0.0, meta_bits=16, k_shared=False, v_shared=False)
            xs = _fold(orig[:, :, :self.lq.k_group])
            if rot:
                xs = rotate(xs)
            c, m = quantize(xs, lq4)
            d = dequantize(c, m, lq4, self.dtype)
            if rot:
                d = rotate(d)
            keep = _unfold(d, buf.shape[0])[:, :, :n]
        buf[:, :, a:a + n] = keep

XQuantLayer._quantize = patched_quantize

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", required=True)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--exps", required=True, help="json list of [name, preset|null, overrides, flags]")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    args = Q.parse_args(["--windows", str(a.windows), "--batch", str(a.batch)])
    tok = AutoTokenizer.from_pretrained(a.model_dir)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    mc = model.config
    hd = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    shape = ModelShape("m", mc.num_hidden_layers, mc.num_key_value_heads, hd, model.dtype)
    texts = Q.load_texts(None)
    windows, _ = Q.make_windows(tok, texts, a.windows, args.context + args.continuation)
    first = args.context - 1
    kvs = [Q.first_chunk_kv(model, windows[i:i + a.batch, :first]) for i in range(0, a.windows, a.batch)]
    L = shape.num_layers
    window_kv = [(torch.cat([p[i][0] for p in kvs]), torch.cat([p[i][1] for p in kvs])) for i in range(L)]
    results = []
    for name, preset, over, flags in json.loads(a.exps):
        t0 = time.time()
        FLAGS.update({"rk": False, "rv": False, "sink": 0, "lloyd_v": False, "sink_bits": 0}); FLAGS.update(flags)
        cfg = None if preset is None else Q.make_config(preset, num_layers=L, head_size=hd, overrides=over)
        nll = []
        for i in range(0, a.windows, a.batch):
            nll += Q.window_nll(model, windows[i:i + a.batch], [(k[i:i + a.batch], v[i:i + a.batch]) for k, v in window_kv], cfg, args)
        eq, true = Q.bits_of(cfg, shape, args.bits_context)
        r = dict(name=name, nll=sum(nll) / len(nll), eq=eq, true=true, per_window=nll, flags=flags, sec=time.time() - t0)
        results.append(r)
        print(f"{name:40s} nll={r['nll']:.4f} eq={eq:.3f} true={true:.3f} ({r['sec']:.0f}s)", flush=True)
        json.dump(results, open(a.out, "w"), indent=1)

main()
