"""The GPU harness's parts that decide what its figures mean (it runs on the GPU machine; these run anywhere)."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", ROOT / "benchmarks" / "gpu" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


run = load("run")


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("vllm.v1.core.kv_cache_utils", logging.INFO, __file__, 0, message, (), None)


@pytest.mark.parametrize(
    "lines",
    [
        # vLLM 0.26 (GPU): two lines
        ["GPU KV cache size: 2,941,216 tokens", "Maximum concurrency for 8,192 tokens per request: 359.04x"],
        # vLLM 0.32 (CPU): one line
        ["CPU KV cache size: 2,941,216 tokens, Maximum concurrency for 8,192 tokens per request: 359.04x"],
    ],
)
def test_capacity_is_read_from_vllm_log_lines_of_either_build(lines) -> None:
    tap = run.LogTap()
    for line in ["Using FLASH_ATTN attention backend out of potential backends", *lines, "KV cache size: 1 tokens"]:
        tap.emit(record(line))
    got = tap.parsed()
    assert (got["kv_cache_tokens"], got["max_concurrency"], got["concurrency_at_len"]) == (2941216, 359.04, 8192)
    assert got["attention_backend"] == "FLASH_ATTN"  # the first match wins, later lines do not overwrite


def test_agreement_counts_common_prefixes_and_logprob_gaps() -> None:
    a = {"ok": True, "token_ids": [[1, 2, 3], [4, 5, 6]], "prompt_logprobs": [[-1.0, -2.0]]}
    b = {"ok": True, "token_ids": [[1, 2, 3], [4, 9, 6]], "prompt_logprobs": [[-1.5, -2.0]]}
    got = run.agreement(a, b)
    assert got["identical_sequences"] == 1 and got["common_prefix_tokens"] == [3, 1]
    assert got["prompt_logprob_mean_abs_gap"] == pytest.approx(0.25) and got["prompt_logprob_max_abs_gap"] == 0.5
    assert run.agreement(a, {"ok": False}) == {}


def test_workload_is_the_same_for_every_dtype(tmp_path) -> None:
    args = run.parse_args(["--suite", "throughput", "--shape", "tiny", "--kv-bytes", "1", "--dtypes", "auto",
                           "--out", str(tmp_path), "--requests", "5", "--prompt-len", "7", "--output-len", "3"])  # fmt: skip
    first, again = run.workload(args), run.workload(args)
    assert first == again and len(first) == 5 and {len(p) for p, _ in first} == {7} and {n for _, n in first} == {3}
    vocab = run.SHAPES["tiny"]["vocab_size"]
    assert all(0 < t < vocab for p, _ in first for t in p)


def test_bad_suite_arguments_are_refused_by_name(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        run.parse_args(["--suite", "throughput", "--out", str(tmp_path)])
    assert "--kv-bytes" in capsys.readouterr().err


def test_kernel_categories_follow_the_kernel_names() -> None:
    class Event:
        def __init__(self, key: str, us: float) -> None:
            from torch.autograd import DeviceType

            self.key, self.self_device_time_total, self.count, self.device_type = key, us, 1, DeviceType.CUDA

    class Prof:
        def key_averages(self):
            return [Event("_attention_kernel", 4000), Event("nvjet_sm90_tst_224x64", 3000),
                    Event("void cutlass::device_kernel<flash::FlashAttnFwdSm90>", 2000), Event("rms_norm_kernel", 1000)]  # fmt: skip

    got = run.kernel_breakdown(Prof(), steps=2)
    assert got["ms_per_step_by_kind"] == {"xquant attention": 2.0, "GEMM (linear layers)": 1.5,
                                          "vLLM attention": 1.0, "other": 0.5}  # fmt: skip
    assert got["gpu_ms_per_step"] == 5.0 and got["top_kernels"][0]["name"] == "_attention_kernel"


def test_report_bits_per_element_are_budget_over_tokens() -> None:
    report = load("report")
    cap = report.capacity("llama3-8b", ("capacity-llama3-8b-peers.json", "capacity-llama3-8b-ours.json"))
    budget = cap["kv_cache_memory_bytes"]
    for row in cap["rows"].values():
        if "kv_cache_tokens" in row:  # 32 layers x K,V x 8 heads x 128 dims per token
            assert row["bits_per_element"] == pytest.approx(budget * 8 / (row["kv_cache_tokens"] * 32 * 2 * 8 * 128))
    assert cap["rows"]["auto"]["bits_per_element"] == pytest.approx(16, rel=1e-3)  # vLLM's bf16: nothing else in it
    assert cap["rows"]["fp8"]["bits_per_element"] == pytest.approx(8, rel=1e-3)
    with pytest.raises(ValueError, match="different KV budgets"):  # rows from two budgets are not comparable
        report.capacity("llama3-8b", ("capacity-llama3-8b-peers.json", "capacity-smollm2-rest.json"))


def _pid_and(value: int) -> dict:
    import os

    return {"pid": os.getpid(), "value": value}


def _fail() -> None:
    raise ValueError("the engine refused")


def test_each_engine_runs_in_a_process_of_its_own() -> None:
    import os

    first, second = run.in_child(_pid_and, 1), run.in_child(_pid_and, 2)
    assert (first["value"], second["value"]) == (1, 2)
    assert len({first["pid"], second["pid"], os.getpid()}) == 3
    row = run.attempt("failing", _fail)
    assert not row["ok"] and "ValueError: the engine refused" in row["error"]


def test_graph_mode_lines_are_read() -> None:
    tap = run.LogTap()
    for line in ["CUDAGraphMode.FULL_AND_PIECEWISE is not supported with XQuantBackend backend (support: NEVER)",
                 "Graph capturing finished in 12 secs, took 0.41 GiB"]:  # fmt: skip
        tap.emit(record(line))
    got = tap.parsed()
    assert got["cudagraph_downgrade"].startswith("CUDAGraphMode.FULL_AND_PIECEWISE") and got["graph_capture_s"] == 12.0
