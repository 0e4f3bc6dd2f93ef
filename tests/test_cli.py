"""The ``xquant-vllm`` command line: help, the bits table, errors, the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xquant_vllm import cli
from xquant_vllm.accounting import SMOLLM2, bits_report, equivalent_bits
from xquant_vllm.config import PRESETS, make_config


def _subcommands() -> dict:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if a.dest == "command"]
    return action.choices


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _rows(table: str) -> dict[str, list[str]]:
    """The data rows of a printed table, keyed by their first cell."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---")) + 1
    return {cells[0]: cells[1:] for cells in (line.split() for line in lines[start:]) if cells}


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_help_mentions_every_option(name: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([name, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for action in _subcommands()[name]._actions:
        for option in action.option_strings or [action.metavar or action.dest]:
            assert option in text, f"{name} --help does not mention {option}"
        assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"


def test_top_level_help_does_not_import_vllm() -> None:
    code = "import sys; from xquant_vllm.cli import build_parser; build_parser(); print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_bits_xquant_on_smollm2(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "bits", "smollm2", "--preset", "xquant", "--kv-gib", "1", "--seqs", "4")
    assert code == 0
    rows = _rows(out)
    assert set(rows) == {"bfloat16", "fp8", "xquant"}
    eq, page, true, per_token, tokens, x_dtype, x_fp8 = rows["xquant"]
    cfg = make_config("xquant", num_layers=30, head_size=64)
    assert float(eq) == pytest.approx(112 / 60, abs=5e-4)  # keys 2 bits in 30 layers, values 2 in 22 and 1 in 8
    assert float(eq) == pytest.approx(equivalent_bits(cfg), abs=5e-4)
    report = bits_report(cfg, SMOLLM2)
    assert int(tokens.replace(",", "")) == report.capacity_tokens(2**30, 4)
    assert float(page) < float(true)  # the tail costs bits
    dtype_tokens = int(rows["bfloat16"][4].replace(",", ""))
    assert dtype_tokens == 2**30 // (2 * SMOLLM2.elements_per_token)
    assert float(x_dtype) == pytest.approx(int(tokens.replace(",", "")) / dtype_tokens, abs=5e-3)
    assert float(x_fp8) == pytest.approx(float(x_dtype) / 2, abs=5e-3)


def test_bits_all_presets(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "bits", "llama3-8b")
    assert code == 0
    assert set(_rows(out)) == {"bfloat16", "fp8", *PRESETS}
    assert "32 layers x 8 KV heads x head size 128" in out


@pytest.mark.parametrize(
    "override, field",
    [('{"v_group": 48}', "v_group"), ('{"k_bits_low": 3}', "k_bits_low"), ('{"kgroup": 64}', "kgroup"),
     ('{"num_layers": 5}', "num_layers"), ("[1]", "override")],
)
def test_bad_override_exits_2_naming_the_field(override: str, field: str, capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(capsys, "bits", "smollm2", "--override", override)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and field in err


def test_unknown_preset_names_preset(capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys, "bits", "smollm2", "--preset", "kivi-3")
    assert code == 2
    assert "preset" in err and "kivi-3" in err


def test_bad_model_names_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys, "bits", str(tmp_path))
    assert code == 2
    assert "MODEL" in err


def test_model_shape_from_checkpoints(smollm2_dir: Path, tiny_llama_factory) -> None:
    shape = cli.model_shape(str(smollm2_dir))
    assert (shape.num_layers, shape.num_kv_heads, shape.head_size, shape.dtype) == (
        SMOLLM2.num_layers, SMOLLM2.num_kv_heads, SMOLLM2.head_size, SMOLLM2.dtype)
    tiny = cli.model_shape(str(tiny_llama_factory(num_layers=6, num_kv_heads=1, head_size=128, num_heads=2)))
    assert (tiny.num_layers, tiny.num_kv_heads, tiny.head_size) == (6, 1, 128)


def test_model_shape_without_head_dim(tmp_path: Path) -> None:
    config = {"num_hidden_layers": 8, "num_attention_heads": 4, "hidden_size": 512, "torch_dtype": "float16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = cli.model_shape(str(tmp_path))
    assert (shape.num_layers, shape.num_kv_heads, shape.head_size, str(shape.dtype)) == (8, 4, 128, "torch.float16")


def test_report_prints_capacity_and_quality(smollm2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    quality = tmp_path / "quality.json"
    code, out, _ = _run(capsys, "report", "--quiet", "--quality", str(quality))
    assert code == 0
    assert str(smollm2_dir) in out and "no readable rows" in out
    assert set(PRESETS) <= set(_rows(out.split("Quality")[0]))

    rows = [{"preset": "xquant", "nll": 2.34567}, {"preset": "kivi-2", "nll": 2.1, "needle": 0.75}]
    quality.write_text(json.dumps({"rows": rows}))
    code, out, _ = _run(capsys, "report", "--quiet", "--quality", str(quality))
    assert code == 0
    table = out.split("Quality (")[1]
    assert "needle" in table
    assert _rows(table)["xquant"] == ["2.346"]
    assert _rows(table)["kivi-2"] == ["2.1", "0.75"]


def test_prepare_builds_the_named_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    from xquant_vllm import bundled

    built = []
    monkeypatch.setattr(bundled, "ensure_model", lambda cache_dir, progress, model: built.append(model) or tmp_path)
    assert _run(capsys, "prepare", "--quiet")[:2] == (0, f"{tmp_path}\n")
    assert _run(capsys, "prepare", "qwen2.5-coder-0.5b", "--quiet")[0] == 0
    assert built == ["smollm2", "qwen2.5-coder-0.5b"]
    with pytest.raises(SystemExit):
        cli.main(["prepare", "llama"])
    assert "invalid choice: 'llama'" in capsys.readouterr().err


def test_bits_knows_qwen_without_building_it(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "bits", "qwen2.5-coder-0.5b", "--preset", "kivi-2")
    assert code == 0
    assert "Qwen2.5-Coder-0.5B-Instruct: 24 layers x 2 KV heads x head size 64, bfloat16" in out


def test_report_bad_model_names_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(capsys, "report", "--quiet", "--model", str(tmp_path))
    assert code == 2 and out == ""
    assert str(tmp_path) in err and "config.json" in err
