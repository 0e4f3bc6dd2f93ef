"""vLLM end to end on a GPU: the plugin against vLLM's own caches, in as few GPU runs as possible.

Suites (``--suite``, repeatable; each writes ``<suite>.json`` into ``--out``):

* ``smoke``: SmolLM2, every preset starts and generates; ``xquant``'s greedy tokens and prompt log-probabilities
  with the Triton kernels against the same engine on the PyTorch path (``XQUANT_KERNELS=torch``).
* ``capacity``: vLLM's KV cache size (tokens) and maximum concurrency per ``kv_cache_dtype``, every dtype given
  the same KV memory: what ``auto`` gets at ``--gpu-memory-utilization`` in the same process.
* ``quality``: teacher-forced NLL through the engine (prompt log-probabilities, chunked prefill of ``--chunk``
  tokens, one sequence at a time, the windows of ``benchmarks/quality.py``) for every dtype.
* ``throughput``: offline generation on a memory-bound load (fixed KV memory, token-id prompts, fixed output
  lengths): output tokens/s, requests/s, the decode batch sizes the scheduler reached, preemptions.

Every engine runs in a process of its own, forked from the driver after vLLM is imported (imports cost ~25 s on
the GPU machine, once): two engines in one process crashed PyTorch's caching allocator on the H200 (issue 15).
An engine that fails is recorded with its error and the suite goes on. Model shapes, dtypes and the workload are
arguments, so the tensor-parallel issue reuses this file (``--tp``).

    python benchmarks/gpu/run.py --suite capacity --shape llama3-8b --out /tmp/r    # see benchmarks/gpu/README.md
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing
import os
import random
import re
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

OURS = ("kivi-4", "kivi-2", "asymkv-1.5", "xquant", "xquant-1.25", "xquant-max", "xquant-paper")
PEERS = ("auto", "fp8", "turboquant_3bit_nc", "turboquant_k3v4_nc", "int4_per_token_head")

# Model shapes written as config.json and run with dummy weights (no checkpoint needed).
SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=64, vocab_size=32000, max_position_embeddings=16384,
                 rope_theta=10000.0),
}  # fmt: skip


# ---- engines ------------------------------------------------------------------------------------------------


class LogTap(logging.Handler):
    """Keeps vLLM's own log lines of one engine: the capacity figures are read from what vLLM printed.

    It listens on the modules that print them: vLLM re-applies its logging config while an engine starts,
    which drops handlers of the ``vllm`` logger itself but leaves its children's alone.
    """

    SOURCES = ("vllm.v1.core.kv_cache_utils", "vllm.v1.worker.gpu_worker", "vllm.v1.worker.cpu_worker",
               "vllm.platforms.cuda", "vllm.v1.attention.selector", "vllm.xquant", "xquant_vllm.kernels",
               "vllm.config.compilation", "vllm.v1.worker.gpu_model_runner", "vllm.v1.worker.gpu.model_runner")  # fmt: skip

    PATTERNS = {
        "kv_cache_tokens": re.compile(r"KV cache size: ([\d,]+) tokens"),
        "max_concurrency": re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x"),
        "available_kv_gib": re.compile(r"Available KV cache memory: ([\d.]+) GiB"),
        "attention_backend": re.compile(r"Using (\S+) attention backend"),
        "xquant_summary": re.compile(r"(xquant-vllm: .*)"),
        "xquant_kernels": re.compile(r"xquant kernels on \w+: (\w+) implementation"),
        "cudagraph_downgrade": re.compile(r"(CUDAGraphMode\.\w+ is not supported.*)"),
        "graph_capture_s": re.compile(r"Graph capturing finished in ([\d.]+) sec"),
    }

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def parsed(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for line in self.lines:
            for key, pattern in self.PATTERNS.items():
                if key in found or not (m := pattern.search(line)):
                    continue
                if key == "kv_cache_tokens":
                    found[key] = int(m.group(1).replace(",", ""))
                elif key == "max_concurrency":
                    found[key] = float(m.group(2))
                    found["concurrency_at_len"] = int(m.group(1).replace(",", ""))
                elif key in ("available_kv_gib", "graph_capture_s"):
                    found[key] = float(m.group(1))
                else:
                    found[key] = m.group(1)
        return found


@contextmanager
def engine(model: str, kv_cache_dtype: str, **kwargs) -> Iterator[tuple[Any, LogTap]]:
    """One ``vllm.LLM`` in this process, and its log; torn down (GPU memory freed) on exit."""
    import torch
    import vllm.logger
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    vllm.logger._print_info_once.cache_clear()  # vLLM logs its capacity "once" per process
    tap = LogTap()
    for name in tap.SOURCES:
        logging.getLogger(name).addHandler(tap)
    logging.getLogger("xquant_vllm.kernels").setLevel(logging.INFO)  # not under vLLM's logger: no level of its own
    llm = None
    try:
        llm = LLM(model=model, kv_cache_dtype=kv_cache_dtype, seed=0, **kwargs)
        yield llm, tap
    finally:
        for name in tap.SOURCES:
            logging.getLogger(name).removeHandler(tap)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        cleanup_dist_env_and_memory()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def engine_capacity(llm, tap: LogTap) -> dict[str, Any]:
    """Capacity as vLLM logged it, with the config values it came from (they must agree)."""
    cache = llm.llm_engine.vllm_config.cache_config
    row = tap.parsed()
    mode = llm.llm_engine.vllm_config.compilation_config.cudagraph_mode  # as the worker resolved it (in-process)
    row.update(num_blocks=cache.num_gpu_blocks, block_size=cache.block_size, cudagraph_mode=str(mode),
               config_kv_tokens=getattr(cache, "kv_cache_size_tokens", None),
               config_max_concurrency=getattr(cache, "kv_cache_max_concurrency", None))  # fmt: skip
    return row


DEADLINE = [float("inf")]  # perf_counter() after which no new engine starts (--budget-s)


class ChildError(RuntimeError):
    pass


def in_child(fn, *args, **kwargs) -> Any:
    """``fn(*args, **kwargs)`` in a forked process (a fresh CUDA context and allocator); its JSON-able result.

    Forked, not spawned: the closures of the suites need no pickling and vLLM stays imported. The driver itself
    never touches CUDA, or the children could not: if something did, the engine runs here, as before, with a warning.
    """
    import torch

    if torch.cuda.is_initialized():
        print("warning: CUDA was initialized in the driver process: this engine runs in it", flush=True)
        return fn(*args, **kwargs)
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def target() -> None:
        try:
            reply = {"value": fn(*args, **kwargs)}
        except BaseException as exc:  # noqa: BLE001 (sent to the driver, which records it)
            reply = {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()}
        send.send(json.dumps(reply))
        send.close()

    child = ctx.Process(target=target)
    child.start()
    send.close()
    try:
        reply = json.loads(recv.recv())
    except EOFError:
        reply = {"error": "the engine process died without a result", "traceback": ""}
    child.join()
    if "error" in reply:
        print(reply["traceback"], flush=True)
        raise ChildError(f"{reply['error']} (exit code {child.exitcode})")
    return reply["value"]


def attempt(name: str, fn, *args, **kwargs) -> dict[str, Any]:
    """Run one engine's measurement in its own process; a failure becomes a row with the error (the suite goes on)."""
    start = time.perf_counter()
    if start > DEADLINE[0]:
        print(f"== {name}: skipped (--budget-s spent)", flush=True)
        return {"ok": False, "error": "skipped: the run's --budget-s was spent before this engine"}
    print(f"== {name}", flush=True)
    try:
        row = in_child(fn, *args, **kwargs)
        row["ok"] = True
    except Exception as exc:  # noqa: BLE001 (recorded, printed, and the next engine runs)
        if not isinstance(exc, ChildError):
            traceback.print_exc()
        row = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    row["seconds"] = round(time.perf_counter() - start, 1)
    print(f"   {name}: {json.dumps(row)[:600]}", flush=True)
    return row


def write_shape(shape: str, folder: Path) -> Path:
    """A Llama ``config.json`` of a named shape, for ``load_format="dummy"`` (no tokenizer: prompts are ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, **SHAPES[shape]}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def model_args(args, shape: str | None) -> tuple[str, dict[str, Any]]:
    """The model path and the engine arguments every suite shares."""
    common = dict(tensor_parallel_size=args.tp, max_num_seqs=args.max_num_seqs)
    if shape is None:
        return str(args.smollm2), common
    folder = write_shape(shape, Path(args.work) / shape)
    return str(folder), {**common, "load_format": "dummy", "skip_tokenizer_init": True}


# ---- suites -------------------------------------------------------------------------------------------------


def load_windows(args) -> list[list[int]]:
    data = json.loads(Path(args.windows).read_text())
    return [w[: args.context + args.continuation] for w in data["windows"][: args.num_windows]]


def suite_smoke(args) -> dict[str, Any]:
    """Every preset starts and generates; Triton kernels against the PyTorch path on the same engine."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    model, common = model_args(args, None)
    windows = load_windows(args)
    lengths = [33, 100, 257, 511, 640, 1000, 1200, 1500]  # ragged: tails only, partial and many blocks
    prompts = [TokensPrompt(prompt_token_ids=windows[i % len(windows)][:n]) for i, n in enumerate(lengths)]
    greedy = SamplingParams(max_tokens=args.smoke_tokens, temperature=0.0, ignore_eos=True)
    scored = [TokensPrompt(prompt_token_ids=w) for w in windows[:2]]
    teacher = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    engine_kw = dict(common, max_model_len=4096, enforce_eager=True, gpu_memory_utilization=0.5)

    def run(dtype: str, kernels: str, graphs: bool = False) -> dict[str, Any]:
        os.environ["XQUANT_KERNELS"] = kernels  # in the engine's own process
        with engine(model, dtype, **{**engine_kw, "enforce_eager": not graphs}) as (llm, tap):
            t = time.perf_counter()
            outs = llm.generate(prompts, greedy, use_tqdm=False)
            seconds = time.perf_counter() - t
            lps = llm.generate(scored, teacher, use_tqdm=False)
            cap = engine_capacity(llm, tap)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        logprobs = [[o.prompt_logprobs[p][w[p]].logprob for p in range(1, len(w))] for w, o in zip(windows, lps)]
        return {"kernels": kernels, "token_ids": ids, "prompt_logprobs": logprobs, "text0": outs[0].outputs[0].text,
                "generate_s": round(seconds, 2), **cap}

    rows = {}
    for dtype in args.dtypes or ("auto", *OURS):
        rows[dtype] = attempt(f"smoke {dtype} triton", run, dtype, "auto")
    rows["xquant/torch"] = attempt("smoke xquant torch", run, "xquant", "torch")
    rows["xquant/graphs"] = attempt("smoke xquant triton, CUDA graphs", run, "xquant", "auto", True)
    compared = agreement(rows.get("xquant", {}), rows["xquant/torch"])
    graphs = agreement(rows.get("xquant", {}), rows["xquant/graphs"])
    for row in rows.values():  # bulky: the comparison above is what the report needs
        row.pop("prompt_logprobs", None)
    return {"rows": rows, "agreement": compared, "graphs_vs_eager": graphs, "prompt_lengths": lengths}


def agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """How far two engines' greedy tokens agree, and their prompt log-probabilities' gap."""
    if not (a.get("ok") and b.get("ok")):
        return {}
    prefix = []
    for x, y in zip(a["token_ids"], b["token_ids"]):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        prefix.append(n)
    gaps = [abs(p - q) for x, y in zip(a["prompt_logprobs"], b["prompt_logprobs"]) for p, q in zip(x, y)]
    return {"identical_sequences": sum(x == y for x, y in zip(a["token_ids"], b["token_ids"])),
            "sequences": len(prefix), "common_prefix_tokens": prefix,
            "prompt_logprob_mean_abs_gap": sum(gaps) / len(gaps), "prompt_logprob_max_abs_gap": max(gaps)}  # fmt: skip


def suite_capacity(args, shape: str | None) -> dict[str, Any]:
    """KV tokens per dtype at one KV memory: what ``auto`` gets at the given gpu_memory_utilization."""
    model, common = model_args(args, shape)
    engine_kw = dict(common, max_model_len=args.max_model_len, enforce_eager=True)

    def measure(dtype: str, **extra) -> dict[str, Any]:
        with engine(model, dtype, **engine_kw, **extra) as (llm, tap):
            return engine_capacity(llm, tap)

    rows = {}
    if not args.kv_bytes:  # the budget: what auto gets at this utilization (vLLM prints it in GiB, 2 decimals)
        rows["auto@util"] = attempt("capacity auto (util)", measure, "auto",
                                    gpu_memory_utilization=args.gpu_memory_utilization)  # fmt: skip
    kv_bytes = args.kv_bytes or int(rows["auto@util"].get("available_kv_gib", 0) * 2**30)
    if not kv_bytes:
        raise RuntimeError("no KV budget: auto failed at the given gpu_memory_utilization and --kv-bytes is unset")
    for dtype in args.dtypes or (*PEERS, *OURS):
        rows[dtype] = attempt(f"capacity {dtype}", measure, dtype, kv_cache_memory_bytes=kv_bytes)
    return {"model": shape or "SmolLM2-135M-Instruct", "kv_cache_memory_bytes": kv_bytes,
            "gpu_memory_utilization": args.gpu_memory_utilization, "max_model_len": args.max_model_len,
            "rows": rows}  # fmt: skip


def suite_quality(args) -> dict[str, Any]:
    """Teacher-forced NLL of each window's continuation, read from vLLM's prompt log-probabilities."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    model, common = model_args(args, None)
    windows = load_windows(args)
    engine_kw = dict(common, max_model_len=len(windows[0]) + 1, max_num_seqs=1, max_num_batched_tokens=args.chunk,
                     enable_chunked_prefill=True, enable_prefix_caching=False, enforce_eager=True,
                     gpu_memory_utilization=0.5)  # fmt: skip

    def measure(dtype: str) -> dict[str, Any]:
        with engine(model, dtype, **engine_kw) as (llm, tap):
            prompts = [TokensPrompt(prompt_token_ids=w) for w in windows]
            outs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
                                use_tqdm=False)  # fmt: skip
            cap = engine_capacity(llm, tap)
        nll = [-sum(o.prompt_logprobs[p][w[p]].logprob for p in range(args.context, len(w))) / (len(w) - args.context)
               for w, o in zip(windows, outs)]  # fmt: skip
        return {"nll": sum(nll) / len(nll), "nll_per_window": nll, **cap}

    rows = {dtype: attempt(f"quality {dtype}", measure, dtype) for dtype in args.dtypes or (*PEERS, *OURS)}
    return {"windows": len(windows), "context": args.context, "continuation": args.continuation,
            "chunk": args.chunk, "rows": rows}  # fmt: skip


def workload(args, requests: int | None = None, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request; seeded, so every dtype gets the same load.

    ``requests`` defaults to the first ``--requests``; the first ``n`` requests of a fixed mix are the same for any
    larger count. Another ``seed`` gives the same lengths (fixed mix) with other token ids: the warm-up's load.
    """
    rng = random.Random(seed)
    n_req = requests if requests is not None else args.requests[0]
    vocab = SHAPES[args.shape]["vocab_size"] if args.shape else 32000
    if args.mix == "long":  # a long-context mix: prompts of 4k to 12k tokens
        lengths = [rng.randint(4096, 12288) for _ in range(n_req)]
    else:
        lengths = [args.prompt_len] * n_req
    return [([rng.randrange(100, vocab - 100) for _ in range(n)], args.output_len) for n in lengths]


def triton_cache_entries() -> int:
    """Kernels in Triton's on-disk cache (one folder per compiled variant): its growth over a timed window counts
    the JIT compiles inside it (a variant already on disk loads without one)."""
    folder = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    try:
        return len(os.listdir(folder))
    except OSError:
        return 0


def throughput_name(args, shape: str, requests: int) -> str:
    """``throughput-<shape>-<mix>``; with several ``--requests`` the count follows the mix; then ``-<tag>``."""
    name = f"throughput-{shape}-{args.mix}{requests if len(args.requests) > 1 else ''}"
    return f"{name}-{args.tag}" if args.tag else name


def suite_throughput(args, shape: str) -> dict[str, Any]:
    """Offline generation of each workload per dtype, same engine settings, same fixed KV memory.

    One engine per dtype runs, in order: a tiny warm-up, ``--warmup-requests`` requests of the workload's lengths
    with other token ids (untimed: Triton's JIT compiles and vLLM's lazy set-up stay out of the timed windows), then
    each ``--requests`` workload timed, the prefix cache reset before each (no request's prompt is cached from an
    earlier run). Each finished workload row is written at once into ``--out`` (``"partial": true``), so a run cut
    off by the call's limit keeps what it measured. Returns ``{requests: suite result}``.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    model, common = model_args(args, shape)
    loads = {n: workload(args, n) for n in args.requests}
    longest = max(len(p) for load in loads.values() for p, _ in load) + args.output_len
    engine_kw = dict(common, max_model_len=max(longest, 4096), kv_cache_memory_bytes=args.kv_bytes,
                     disable_log_stats=False, enforce_eager=args.eager)  # fmt: skip
    warm_load = workload(args, args.warmup_requests, seed=1) if args.warmup_requests else []

    def header(n: int) -> dict[str, Any]:
        return {"model": shape, "requests": n, "mix": args.mix, "prompt_len": args.prompt_len,
                "output_len": args.output_len, "kv_cache_memory_bytes": args.kv_bytes, "max_num_seqs": args.max_num_seqs,
                "enforce_eager": args.eager, "warmup_requests": args.warmup_requests}  # fmt: skip

    def save(n: int, dtype: str, row: dict[str, Any], partial: bool) -> None:
        path = args.out / f"{throughput_name(args, shape, n)}.json"
        data = json.loads(path.read_text()) if path.is_file() else {**header(n), "rows": {}}
        data["rows"][dtype] = row
        data["partial"] = partial
        path.write_text(json.dumps(data, indent=1) + "\n")

    def generate(engine_, load, prefix: str) -> tuple[list[int], int, int, float | None, float]:
        for i, (ids, out_len) in enumerate(load):
            sp = SamplingParams(max_tokens=out_len, min_tokens=out_len, ignore_eos=True, temperature=0.0,
                                detokenize=False, output_kind=RequestOutputKind.DELTA)  # fmt: skip
            engine_.add_request(f"{prefix}{i}", TokensPrompt(prompt_token_ids=ids), sp)
        batches, out_tokens, done, first_done = [], 0, 0, None
        start = time.perf_counter()
        while engine_.has_unfinished_requests():
            step = engine_.step()
            growing = [o for o in step if o.outputs and o.outputs[0].token_ids]
            if growing:
                batches.append(len(growing))
                out_tokens += sum(len(o.outputs[0].token_ids) for o in growing)
            done += sum(o.finished for o in step)
            if done and first_done is None:
                first_done = time.perf_counter() - start
        return batches, out_tokens, done, first_done, time.perf_counter() - start

    def measure(dtype: str) -> dict[str, Any]:
        runs: dict[int, dict[str, Any]] = {}
        with engine(model, dtype, **engine_kw) as (llm, tap):
            cap = engine_capacity(llm, tap)
            warm = SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False)
            llm.generate([TokensPrompt(prompt_token_ids=warm_load[0][0][:512] if warm_load else [7] * 512)] * 4, warm,
                         use_tqdm=False)  # fmt: skip
            engine_ = llm.llm_engine
            warmup: dict[str, Any] = {"requests": len(warm_load)}
            if warm_load:
                t0, c0 = time.perf_counter(), triton_cache_entries()
                _, tokens, done, _, _ = generate(engine_, warm_load, "w")
                warmup.update(seconds=round(time.perf_counter() - t0, 2), output_tokens=tokens, finished=done,
                              triton_compiles=triton_cache_entries() - c0)  # fmt: skip
                print(f"   {dtype} warm-up: {json.dumps(warmup)}", flush=True)
            for k, (n, load) in enumerate(loads.items()):
                if k and dtype not in (args.full_dtypes or args.dtypes):
                    continue
                if k and time.perf_counter() > DEADLINE[0]:
                    runs[n] = {"ok": False, "error": "skipped: the run's --budget-s was spent before this workload"}
                    print(f"   {dtype} {n} requests: skipped (--budget-s spent)", flush=True)
                    continue
                try:
                    reset = llm.reset_prefix_cache()
                    base = {m: metric(llm, m) for m in ("vllm:num_preemptions", "vllm:prefix_cache_hits")}
                    c0 = triton_cache_entries()
                    batches, out_tokens, done, first_done, seconds = generate(engine_, load, f"r{n}-")
                    compiles = triton_cache_entries() - c0
                    delta = {m: metric(llm, m) - v for m, v in base.items()}
                    expected = sum(o for _, o in load)
                    if out_tokens != expected or done != len(load):
                        raise RuntimeError(f"{dtype}: {done}/{len(load)} requests and {out_tokens}/{expected} tokens came back")
                    row = {"seconds_total": round(seconds, 2), "output_tokens_per_s": out_tokens / seconds,
                           "requests_per_s": len(load) / seconds,
                           "total_tokens_per_s": (out_tokens + sum(len(p) for p, _ in load)) / seconds,
                           "batch_max": max(batches), "batch_mean": sum(batches) / len(batches),
                           "batch_p50": sorted(batches)[len(batches) // 2], "steps": len(batches),
                           "preemptions": delta["vllm:num_preemptions"], "first_finish_s": first_done,
                           "triton_compiles_timed": compiles, "prefix_cache_hit_tokens": delta["vllm:prefix_cache_hits"],
                           "prefix_cache_reset": reset, "warmup": warmup, **cap, "ok": True}  # fmt: skip
                except Exception as exc:  # noqa: BLE001 (recorded; the engine's later workloads still run)
                    traceback.print_exc()
                    row = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
                runs[n] = row
                save(n, dtype, row, partial=True)
                print(f"   {dtype} {n} requests: {json.dumps(row)[:600]}", flush=True)
        return {str(n): row for n, row in runs.items()}

    per_dtype = {dtype: attempt(f"throughput {dtype}", measure, dtype) for dtype in args.dtypes}
    results = {}
    for n in args.requests:
        rows = {}
        for dtype, got in per_dtype.items():
            if str(n) in got:
                rows[dtype] = got[str(n)]
            elif not got.get("ok"):  # the engine itself failed (or was skipped): its error, for every workload
                rows[dtype] = {k: v for k, v in got.items() if k in ("ok", "error")}
        results[n] = {**header(n), "engine_seconds": {d: got.get("seconds") for d, got in per_dtype.items()},
                      "rows": rows}  # fmt: skip
    return results


KERNEL_KINDS = (  # (category, substrings of CUDA kernel names), first match wins
    ("xquant attention", ("_attention_kernel", "_combine_kernel")),
    ("xquant store", ("_store_blocks_kernel", "_store_tail_kernel")),
    ("vLLM attention", ("flash", "fmha", "unified_attention", "turboquant")),
    ("GEMM (linear layers)", ("gemm", "nvjet", "cutlass", "cublas", "xmma", "splitk")),
)


def kernel_breakdown(prof, steps: int) -> dict[str, Any]:
    """GPU time per step by kernel category, and the top kernels (self device time, from torch.profiler)."""
    from torch.autograd import DeviceType

    kernels = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    by_kind: dict[str, float] = {}
    for name, us, _ in kernels:
        kind = next((k for k, subs in KERNEL_KINDS if any(s in name.lower() for s in subs)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + us
    busy = sum(by_kind.values())
    top = sorted(kernels, key=lambda k: -k[1])[:10]
    return {"gpu_ms_per_step": busy / steps / 1e3,
            "ms_per_step_by_kind": {k: v / steps / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": n[:120], "ms_per_step": us / steps / 1e3, "calls": c} for n, us, c in top]}  # fmt: skip


def suite_profile(args, shape: str) -> dict[str, Any]:
    """Where a step's time goes: pure decode steps at one batch size, then prefill-only steps (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    model, common = model_args(args, shape)
    load = workload(args)
    engine_kw = dict(common, max_model_len=4096, kv_cache_memory_bytes=args.kv_bytes, enforce_eager=args.eager)

    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]

    def timed_steps(engine_, n: int) -> tuple[Any, float, int, float]:
        """Profile up to ``n`` steps; also the mean number of requests that got a token per step."""
        sync()
        with profile(activities=activities) as prof:
            start, done, rows = time.perf_counter(), 0, 0
            while done < n and engine_.has_unfinished_requests():
                rows += len(engine_.step())
                done += 1
            sync()
        return prof, time.perf_counter() - start, done, rows / max(done, 1)

    def measure(dtype: str) -> dict[str, Any]:
        with engine(model, dtype, **engine_kw) as (llm, tap):
            engine_ = llm.llm_engine
            for i, (ids, _) in enumerate(load):
                engine_.add_request(f"d{i}", TokensPrompt(prompt_token_ids=ids),
                                    SamplingParams(max_tokens=10_000, min_tokens=10_000, ignore_eos=True, detokenize=False))
            started: set[str] = set()
            while len(started) < len(load):  # every request prefilled and decoding
                started |= {o.request_id for o in engine_.step() if o.outputs and o.outputs[0].token_ids}
            for _ in range(3):
                engine_.step()
            prof, seconds, n, batch = timed_steps(engine_, args.profile_steps)
            decode = {"batch": batch, "steps": n, "wall_ms_per_step": seconds / n * 1e3, **kernel_breakdown(prof, n)}
            for i in range(len(load)):
                engine_.abort_request([f"d{i}"])
            for i, (ids, _) in enumerate(load):  # other ids than the decode phase's: no prefix-cache hits
                fresh = [t + 1 for t in ids]
                engine_.add_request(f"p{i}", TokensPrompt(prompt_token_ids=fresh), SamplingParams(max_tokens=1, detokenize=False))
            prof, seconds, n, _ = timed_steps(engine_, 10_000)
            tokens = sum(len(ids) for ids, _ in load)
            prefill = {"prompt_tokens": tokens, "steps": n, "prompt_tokens_per_s": tokens / seconds,
                       "wall_ms_per_step": seconds / n * 1e3, **kernel_breakdown(prof, n)}  # fmt: skip
            return {"decode": decode, "prefill": prefill, **engine_capacity(llm, tap)}

    rows = {dtype: attempt(f"profile {dtype}", measure, dtype) for dtype in args.dtypes}
    return {"model": shape, "requests": len(load), "prompt_len": args.prompt_len, "kv_cache_memory_bytes": args.kv_bytes,
            "enforce_eager": args.eager, "rows": rows}  # fmt: skip


def metric(llm, name: str) -> float:
    """A counter of vLLM's Prometheus metrics (0 when absent)."""
    total = 0.0
    for m in llm.get_metrics():
        if m.name == name:
            total += getattr(m, "value", 0) or 0
    return total


# ---- driver -------------------------------------------------------------------------------------------------


def device_facts() -> dict[str, Any]:
    """Versions and the GPU, without initializing CUDA here (the engines' forked processes need it untouched)."""
    import subprocess

    import torch
    import vllm

    facts = {"vllm": vllm.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}
    query = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
    try:
        name, mib = subprocess.run(query, check=True, capture_output=True, text=True).stdout.splitlines()[0].split(", ")
        facts.update(gpu=name, gpu_memory_gib=round(int(mib) / 1024, 1))
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError):
        pass  # no NVIDIA GPU
    return facts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", action="append", required=True, choices=["smoke", "capacity", "quality", "throughput", "profile"],
                   help="what to measure (repeat for several, run in the order given)")
    p.add_argument("--out", type=Path, required=True, help="folder for <suite>[-<shape>].json")
    p.add_argument("--shape", choices=sorted(SHAPES), help="dummy-weight model shape (capacity, throughput); "
                   "without it capacity runs the SmolLM2 checkpoint")
    p.add_argument("--smollm2", type=Path, help="the bundled SmolLM2 checkpoint folder (smoke, quality, capacity)")
    p.add_argument("--windows", type=Path, help="windows.json written by benchmarks/gpu/stage.py (token ids)")
    p.add_argument("--work", type=Path, default=Path("/tmp/xquant-gpu"), help="scratch folder for model configs")
    p.add_argument("--dtypes", nargs="+", help="kv_cache_dtype values (default: per suite, every peer and preset)")
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel_size")
    p.add_argument("--max-num-seqs", type=int, default=256, help="the scheduler's max running sequences")
    p.add_argument("--max-model-len", type=int, default=8192, help="capacity: max_model_len (sets max concurrency)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="capacity: auto's memory share")
    p.add_argument("--kv-bytes", type=int, help="KV cache memory in bytes (capacity: default auto's; throughput: required)")
    p.add_argument("--num-windows", type=int, default=20, help="quality/smoke: windows used")
    p.add_argument("--context", type=int, default=1536, help="quality: context tokens per window")
    p.add_argument("--continuation", type=int, default=256, help="quality: scored tokens per window")
    p.add_argument("--chunk", type=int, default=128, help="quality: chunked-prefill chunk (max_num_batched_tokens)")
    p.add_argument("--smoke-tokens", type=int, default=64, help="smoke: greedy tokens per prompt")
    p.add_argument("--requests", type=int, nargs="+", default=[256],
                   help="throughput: number of requests; several: one workload each, in order, in the same engine")
    p.add_argument("--warmup-requests", type=int, default=0,
                   help="throughput: untimed warm-up of this many requests of the same lengths (other token ids)")
    p.add_argument("--full-dtypes", nargs="+",
                   help="throughput: the dtypes that run every --requests workload (default: all); the others run the first")
    p.add_argument("--tag", help="throughput: suffix of the JSON names (throughput-<shape>-<mix>[N]-<tag>.json)")
    p.add_argument("--prompt-len", type=int, default=2048, help="throughput: prompt tokens (fixed mix)")
    p.add_argument("--output-len", type=int, default=256, help="throughput: output tokens per request")
    p.add_argument("--mix", choices=["fixed", "long"], default="fixed", help="throughput: fixed lengths or 4k-12k prompts")
    p.add_argument("--eager", action="store_true", help="throughput: enforce_eager (default: vLLM's compiled graphs)")
    p.add_argument("--profile-steps", type=int, default=20, help="profile: decode steps profiled")
    p.add_argument("--budget-s", type=float, help="start no new engine (nor a later throughput workload) after this many seconds")
    args = p.parse_args(argv)
    if {"throughput", "profile"} & set(args.suite) and (not args.shape or not args.kv_bytes or not args.dtypes):
        p.error("--suite throughput/profile need --shape, --kv-bytes and --dtypes")
    if {"smoke", "quality"} & set(args.suite) and not (args.smollm2 and args.windows):
        p.error("--suite smoke/quality need --smollm2 and --windows")
    if "capacity" in args.suite and not (args.shape or args.smollm2):
        p.error("--suite capacity needs --shape or --smollm2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process, torn down in turn
    if args.tp > 1:
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast off: the multi-GPU machines require it
    args.out.mkdir(parents=True, exist_ok=True)
    if args.budget_s:
        DEADLINE[0] = time.perf_counter() + args.budget_s
    facts = device_facts()  # imports vLLM once, here: every engine's process inherits it
    print(json.dumps(facts), flush=True)
    start = time.perf_counter()

    def write(result: dict[str, Any], name: str) -> None:
        result.update(device=facts, seconds=round(time.perf_counter() - start, 1), argv=sys.argv[1:], partial=False)
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out / name}.json in {result['seconds']} s", flush=True)

    for suite in args.suite:
        start = time.perf_counter()
        if suite == "smoke":
            result, name = suite_smoke(args), "smoke"
        elif suite == "capacity":
            result, name = suite_capacity(args, args.shape), f"capacity-{args.shape or 'smollm2'}"
        elif suite == "quality":
            result, name = suite_quality(args), "quality"
        elif suite == "profile":
            result, name = suite_profile(args, args.shape), f"profile-{args.shape}"
        else:
            for n, result in suite_throughput(args, args.shape).items():
                write(result, throughput_name(args, args.shape, n))
            continue
        write(result, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
