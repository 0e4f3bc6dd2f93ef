"""The quality harness: its pieces (needles, matching, Pareto front, method plan) and one --quick run end to end."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from xquant_vllm.config import make_config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import quality


class WordTokenizer:
    """A stand-in tokenizer: one token per whitespace-separated word (enough for the needle builder)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.words: list[str] = []

    def _id(self, w: str) -> int:
        if w not in self.vocab:
            self.vocab[w] = len(self.words)
            self.words.append(w)
        return self.vocab[w]

    def __call__(self, text: str, add_special_tokens: bool = False):
        return type("Enc", (), {"input_ids": [self._id(w) for w in text.split()]})

    def decode(self, ids) -> str:
        ids = [ids] if isinstance(ids, int) else ids
        return " ".join(self.words[i] for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        return f"<user> {messages[0]['content']} <assistant> "


def test_needles_are_planted_at_their_depths_with_equal_lengths():
    tok = WordTokenizer()
    text = " ".join(f"w{i}." for i in range(400))  # every word ends a sentence: the needle lands exactly
    sets = quality.make_needles(tok, [("a", text)], [100, 200], depths=3)
    for ns in sets:
        needle_len = 5  # "The secret passphrase is <word>."
        assert ns.depths == [0.0, 0.5, 1.0]
        for row, word, frac in zip(ns.prompts.tolist(), ns.answers, ns.depths):
            words = tok.decode(row).split()
            at = words.index("passphrase") - 3  # after "<user>", "The", "secret"
            assert at == round(frac * (ns.length - needle_len))
            assert words[at + 1 : at + 6] == ["The", "secret", "passphrase", "is", f"{word}."]
            assert words[1 : at + 1] == text.split()[:at]  # haystack before the needle is the text, in order
            assert words[-5:] == ["<assistant>", *quality.PRIMER.split()]
        assert len({len(r) for r in ns.prompts.tolist()}) == 1


@pytest.mark.parametrize(
    "answer,word,ok",
    [
        (' "falcon."\n', "falcon", True),
        (" Falcon", "falcon", True),
        (' "fle', "falcon", False),
        (" the falcon", "falcon", False),
    ],
)
def test_exact_match(answer, word, ok):
    assert quality.exact_match(answer, word) is ok


def test_pareto_front_keeps_only_undominated_points():
    pts = [(2.0, 3.0, "a"), (3.0, 2.5, "b"), (2.5, 3.5, "c"), (4.0, 2.6, "d"), (1.5, 5.0, "e")]
    assert quality.pareto(pts) == ["e", "a", "b"]


def test_plan_resolves_for_smollm2_and_labels_are_unique():
    methods = quality.plan(30)
    assert len({m.name for m in methods}) == len(methods)
    for m in methods:
        if m.preset is not None:
            make_config(m.preset, num_layers=30, head_size=64, overrides=m.overrides)  # raises if invalid
    groups = {m.group for m in methods}
    assert groups == {"main", "ablation", "sink", "eta", "layers"}
    assert {m.preset for m in methods if m.group == "main"} >= {None, "xquant", "xquant-max", "xquant-paper", "kivi-2"}
    assert all(m.sink > 0 for m in methods if m.group == "sink")


def test_sink_tokens_are_counted_in_true_bits():
    """A harness sink keeps tokens at full precision beside their codes: 16 more bits per sink element."""
    shape = quality.ModelShape("m", 30, 3, 64, quality.torch.bfloat16)
    cfg = make_config("xquant", num_layers=30, head_size=64)
    eq0, true0 = quality.bits_of(cfg, shape, 2048)
    eq1, true1 = quality.bits_of(cfg, shape, 2048, sink=16)
    assert eq1 == eq0 and math.isclose(true1 - true0, 16 * 16 / 2048)


@pytest.mark.model
@pytest.mark.parametrize("model", ["smollm2", "qwen2.5-coder-0.5b"])
def test_quick_run_writes_valid_json(tmp_path, model, request):
    """End to end on both bundled models (Qwen2's config has no head_dim: it is derived as vLLM does)."""
    request.getfixturevalue("smollm2_dir" if model == "smollm2" else "qwen_dir")  # built once per session
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--quick", "--model", model, "--out", str(tmp_path)]
    needle = model == "smollm2"  # Qwen runs without the needle test: the path that divided by zero
    cmd += [] if needle else ["--needle-lengths"]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=900, capture_output=True)
    stem = f"quality-{model}"  # the model's whole name: qwen2.5-... holds a dot
    result = json.loads((tmp_path / f"{stem}.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == set(quality.QUICK_METHODS)
    for r in rows.values():
        assert math.isfinite(r["nll"]) and r["nll"] > 0 and math.isclose(r["ppl"], math.exp(r["nll"]), rel_tol=1e-3)
        assert (0.0 <= r["needle_acc"] <= 1.0) if needle else r["needle_acc"] is None
        assert r["windows"] == result["windows"]
    assert rows["model dtype"]["true_bits"] == 16
    assert rows["xquant"]["true_bits"] < rows["kivi-2"]["true_bits"] < 16
    assert rows["xquant"]["equivalent_bits"] < rows["kivi-2"]["equivalent_bits"] == 2
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
    assert "--quick" in (tmp_path / f"{stem}.cmd.txt").read_text()
