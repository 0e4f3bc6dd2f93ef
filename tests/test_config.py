"""Config: every bad value is refused with an error naming its field; presets give the spec's bit counts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from xquant_vllm.accounting import equivalent_bits
from xquant_vllm.config import PRESETS, QuantConfig, first_error, make_config, parse_overrides


def refused(overrides: dict, *, num_layers: int = 32, head_size: int = 64, preset: str = "xquant") -> str:
    """The error text of a refused config; both the raw message and the CLI one-liner are checked."""
    with pytest.raises(ValidationError) as info:
        make_config(preset, num_layers=num_layers, head_size=head_size, overrides=overrides)
    return str(info.value) + "\n" + first_error(info.value)


@pytest.mark.parametrize("field", ["k_bits_high", "k_bits_low", "v_bits_high", "v_bits_low"])
@pytest.mark.parametrize("value", [0, 3, 8])
def test_bits_outside_1_2_4(field: str, value: int) -> None:
    assert field in refused({field: value})


@pytest.mark.parametrize("field", ["eta_1", "eta_2", "eta_4"])
@pytest.mark.parametrize("value", [-0.01, 0.5, 0.7])
def test_eta_outside_range(field: str, value: float) -> None:
    assert field in refused({field: value})


@pytest.mark.parametrize(("v_group", "head_size"), [(48, 64), (96, 128), (256, 128)])
def test_value_group_must_divide_head_size(v_group: int, head_size: int) -> None:
    assert "v_group" in refused({"v_group": v_group}, head_size=head_size)


@pytest.mark.parametrize("tensor", ["k", "v"])
def test_sharing_pair_with_different_bits(tensor: str) -> None:
    # 15 layers at 2 bits: the pair (14, 15) would hold a 2-bit lower and a 1-bit upper layer
    msg = refused({f"{tensor}_high_layers": 15, f"{tensor}_share_from": 15})
    assert f"{tensor}_share_from" in msg and "layer 15" in msg


@pytest.mark.parametrize("tensor", ["k", "v"])
@pytest.mark.parametrize("start", [32, 40])
def test_sharing_start_beyond_layers(tensor: str, start: int) -> None:
    assert f"{tensor}_share_from" in refused({f"{tensor}_share_from": start})


@pytest.mark.parametrize("field", ["rotate_keys", "rotate_values"])
def test_rotation_needs_a_power_of_two_head_size(field: str) -> None:
    # v_group 32 divides 96, so the rotation is the only thing wrong with this config
    msg = refused({field: True, "v_group": 32}, head_size=96, preset="kivi-2")
    assert "rotate_keys/rotate_values" in msg and "96" in msg
    assert "rotate_keys/rotate_values" in refused({"v_group": 32, "rotate_values": True}, head_size=96)
    assert not make_config("kivi-2", num_layers=32, head_size=96, overrides={"v_group": 32}).rotate_keys
    with pytest.raises(ValidationError, match="rotate_keys/rotate_values"):
        QuantConfig(
            preset="custom", num_layers=4, head_size=48, k_high_layers=4, v_high_layers=4, v_group=16, **{field: True}
        )


@pytest.mark.parametrize(("field", "value"), [("k_high_layers", 33), ("v_high_layers", 40), ("k_group", 36), ("k_group", 1)])
def test_other_out_of_range_fields(field: str, value: int) -> None:
    assert field in refused({field: value})


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="preset") as info:
        make_config("xquant-9", num_layers=32, head_size=64)
    assert "xquant-9" in str(info.value)


def test_unknown_override_field() -> None:
    with pytest.raises(ValueError, match="k_bitz"):
        parse_overrides('{"k_bitz": 2, "eta_1": 0.2}')
    assert "k_bitz" in refused({"k_bitz": 2})  # the same through make_config directly


@pytest.mark.parametrize("text", ['{"eta_1": }', "eta_1=0.2", '{"eta_1": 0.2'])
def test_malformed_override_json(text: str) -> None:
    with pytest.raises(ValueError, match="overrides"):
        parse_overrides(text)


@pytest.mark.parametrize("text", ["[1, 2]", "0.5", '"eta_1"'])
def test_override_json_must_be_an_object(text: str) -> None:
    with pytest.raises(ValueError, match="JSON object"):
        parse_overrides(text)


@pytest.mark.parametrize("field", ["preset", "num_layers", "head_size"])
def test_fixed_fields_cannot_be_overridden(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        make_config("xquant", num_layers=32, head_size=64, overrides={field: 4 if field != "preset" else "kivi-2"})


def test_overrides_apply() -> None:
    cfg = make_config("xquant-paper", num_layers=32, head_size=128, overrides=parse_overrides('{"eta_1": 0.2, "k_group": 64, "v_share_from": null}'))
    assert (cfg.eta_1, cfg.k_group, cfg.block_size, cfg.v_share_from) == (0.2, 64, 64, None)
    assert cfg.layer(31).k_eta == 0.2 and cfg.layer(31).k_shared and not cfg.layer(31).v_shared
    assert parse_overrides("") == {} and parse_overrides(None) == {}
    keys = make_config("xquant", num_layers=32, head_size=128, overrides=parse_overrides('{"rotate_keys": true, "rotate_values": true}'))
    assert keys.layer(0).rotate_k and keys.layer(0).rotate_v and keys.describe().endswith(" rotated=keys+values")


# ---- presets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_layers", [30, 32])
@pytest.mark.parametrize("preset", PRESETS)
def test_sharing_rule_and_bits_per_layer(preset: str, num_layers: int) -> None:
    """Odd layers >= M share with layer - 1; every sharing pair has equal bits; early layers get more bits."""
    cfg = make_config(preset, num_layers=num_layers, head_size=64)
    for t in ("k", "v"):
        start = getattr(cfg, f"{t}_share_from")
        shared = {i for i in range(num_layers) if cfg.shares(t, i)}
        assert shared == (set() if start is None else {i for i in range(num_layers) if i % 2 and i >= start})
        for i in shared:
            assert cfg.bits(t, i) == cfg.bits(t, i - 1)
        bits = [cfg.bits(t, i) for i in range(num_layers)]
        assert bits == sorted(bits, reverse=True)
    assert make_config(preset, num_layers=num_layers, head_size=64).describe().startswith(f"preset={preset} ")


def test_xquant_paper_on_smollm2_by_hand() -> None:
    # 30 layers: L/2 = 15 is rounded down to a whole pair, so layers 0-13 hold 2 bits and 14-29 hold 1 bit;
    # sharing from ceil(3 * 30 / 4) = 23: odd layers 23, 25, 27, 29 keep no codes (all 1-bit pairs).
    # Per tensor (K and V alike): (14 * 2 + 16 * 1 - 4 * 1) / 30 = 40 / 30.
    cfg = make_config("xquant-paper", num_layers=30, head_size=64)
    assert [i for i in range(30) if cfg.layer(i).k_shared and cfg.layer(i).v_shared] == [23, 25, 27, 29]
    assert [cfg.bits("k", i) for i in (13, 14)] == [2, 1]
    assert equivalent_bits(cfg) == pytest.approx(40 / 30)
    assert equivalent_bits(cfg) <= 1.4


@pytest.mark.parametrize(
    ("preset", "v_high", "by_hand"), [("xquant", 22, (60 + 22 * 2 + 8) / 60), ("xquant-max", 0, 90 / 60)]
)
def test_ours_on_smollm2_by_hand(preset: str, v_high: int, by_hand: float) -> None:
    # Keys at 2 bits in all 30 layers; values at 2 bits in the leading pair-floored 3L/4 (22 layers) for xquant,
    # in none for xquant-max; nothing shared. Equivalent bits: (30 * 2 + value bits) / 60.
    cfg = make_config(preset, num_layers=30, head_size=64)
    assert [cfg.bits("k", i) for i in range(30)] == [2] * 30
    assert [cfg.bits("v", i) for i in range(30)] == [2] * v_high + [1] * (30 - v_high)
    assert not any(cfg.shares(t, i) for t in ("k", "v") for i in range(30))
    assert equivalent_bits(cfg) == pytest.approx(by_hand)


def test_asymkv_is_exactly_one_and_a_half_bits_on_an_odd_half() -> None:
    # No sharing, so the split need not fall on a pair: 15 key layers and 15 value layers at 2 bits of 30.
    cfg = make_config("asymkv-1.5", num_layers=30, head_size=64)
    assert (cfg.k_high_layers, cfg.v_high_layers) == (15, 15)
    assert equivalent_bits(cfg) == pytest.approx(1.5)
    odd = make_config("asymkv-1.5", num_layers=5, head_size=64)
    assert (odd.k_high_layers, odd.v_high_layers) == (3, 2)  # keys get the extra 2-bit layer
    assert equivalent_bits(odd) == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("preset", "overrides", "by_hand"),
    [
        ("xquant", {}, 1.875),  # keys 32 * 2 + values (24 * 2 + 8 * 1), over 64
        ("xquant-max", {}, 1.5),  # keys 32 * 2 + values 32 * 1, over 64
        ("xquant-paper", {}, 1.375),  # (16 * 2 + 16 * 1 - 4 * 1) / 32: sharing from 24, odd layers 25..31 keep no codes
        ("xquant-1.25", {}, 1.25),  # (16 * 2 + 16 * 1 - 8 * 1) / 32: sharing from 16, odd layers 17..31
        # xquant-max with sharing (keys from 3L/4, values from L/2): keys (32 * 2 - 4 * 2) + values (32 - 8): 80 / 64
        ("xquant-max", {"k_share_from": 24, "v_share_from": 16, "rotate_keys": False, "rotate_values": False}, 1.25),
        ("asymkv-1.5", {}, 1.5),  # (16 * 2 + 16 * 1) / 32
        ("kivi-2", {}, 2.0),
        ("kivi-4", {}, 4.0),
    ],
)
def test_equivalent_bits_at_32_layers(preset: str, overrides: dict, by_hand: float) -> None:
    cfg = make_config(preset, num_layers=32, head_size=128, overrides=overrides)
    assert equivalent_bits(cfg) == pytest.approx(by_hand)


def test_reproduction_presets_match_the_reference_setup() -> None:
    """G = 32 for keys and values, 16-bit metadata; KIVI/AsymKV uncalibrated, XQuant eta 1/6 and 0.045."""
    for preset in ("kivi-2", "kivi-4", "asymkv-1.5", "xquant-paper", "xquant-1.25"):
        cfg = make_config(preset, num_layers=32, head_size=128)
        assert (cfg.k_group, cfg.v_group, cfg.meta_bits) == (32, 32, 16)
        etas = (cfg.eta_1, cfg.eta_2, cfg.eta_4)
        assert etas == ((1 / 6, 0.045, 0.0) if preset.startswith("xquant") else (0.0, 0.0, 0.0))
        assert not (cfg.rotate_keys or cfg.rotate_values) and cfg.describe().endswith(" rotated=none")
    assert make_config("kivi-4", num_layers=32, head_size=128).layer(31).k_bits == 4


@pytest.mark.parametrize("preset", ["xquant", "xquant-max"])
def test_our_presets_groups_meta_rotation_and_etas(preset: str) -> None:
    """Groups of 64, 8-bit min/max, nothing rotated, no sharing; the XQuant etas (1/6 and 0.045)."""
    cfg = make_config(preset, num_layers=32, head_size=128)
    assert (cfg.k_group, cfg.v_group, cfg.meta_bits, cfg.block_size) == (64, 64, 8, 64)
    assert (cfg.eta_1, cfg.eta_2, cfg.eta_4) == (1 / 6, 0.045, 0.0)
    assert (cfg.k_share_from, cfg.v_share_from) == (None, None)
    assert not any(lq.rotate_v or lq.rotate_k for lq in cfg.layers())
    assert (cfg.layer(31).k_eta, cfg.layer(31).v_eta) == (0.045, 1 / 6)  # 2-bit keys, 1-bit values
    assert cfg.describe().endswith(" rotated=none")


def test_too_few_layers_to_share() -> None:
    cfg = make_config("xquant-paper", num_layers=2, head_size=64)
    assert cfg.k_share_from is None and not any(cfg.shares("k", i) or cfg.shares("v", i) for i in range(2))
