"""Quantization config: the presets of shared/spec/algorithms.md section 7 as one pydantic model.

A config is always resolved against a model (its layer count and head size), because the presets are
written in terms of the layer count (``L/2`` layers at 2 bits, sharing from ``3L/4``) and the value group
must divide the head size. Every field can be overridden; a bad value raises a ``pydantic.ValidationError``
whose message names the field and its allowed range.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Bits = Literal[1, 2, 4]
MetaBits = Literal[8, 16]
ResidualRule = Literal["paged", "reference"]

PRESETS = ("xquant", "xquant-max", "xquant-paper", "xquant-1.25", "asymkv-1.5", "kivi-2", "kivi-4")
DEFAULT_PRESET = "xquant"
SUPPORTED_HEAD_SIZES = (64, 128, 256)


class QuantConfig(BaseModel):
    """One KV-cache quantization method, resolved for a model with ``num_layers`` attention layers.

    Layer-wise bits (AsymKV): layer ``l`` stores keys at ``k_bits_high`` bits if ``l < k_high_layers``,
    else ``k_bits_low`` (values likewise). Cross-layer sharing (XQuant): layers are paired (2i, 2i+1);
    every odd layer ``>= k_share_from`` stores no key codes and dequantizes the lower layer's codes with
    its own scale and zero-point (values: ``v_share_from``). ``None`` turns sharing off.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: str = Field(description="preset this config started from")
    num_layers: int = Field(ge=1, description="attention layers of the model")
    head_size: int = Field(ge=1, description="channels per KV head")

    k_bits_high: Bits = Field(2, description="key bits of the early layers (< k_high_layers)")
    k_bits_low: Bits = Field(1, description="key bits of the late layers")
    k_high_layers: int = Field(ge=0, description="L_k: how many leading layers use k_bits_high")
    v_bits_high: Bits = Field(2, description="value bits of the early layers (< v_high_layers)")
    v_bits_low: Bits = Field(1, description="value bits of the late layers")
    v_high_layers: int = Field(ge=0, description="L_v: how many leading layers use v_bits_high")

    k_share_from: int | None = Field(None, ge=1, description="M_k: odd layers >= this reuse layer-1's key codes")
    v_share_from: int | None = Field(None, ge=1, description="M_v: odd layers >= this reuse layer-1's value codes")

    k_group: int = Field(32, ge=2, description="G_k: tokens per key group (per channel); also the paged block size")
    v_group: int = Field(32, ge=2, description="G_v: channels per value group (per token)")

    eta_1: float = Field(1 / 6, ge=0.0, lt=0.5, description="calibration of 1-bit tensors, in [0, 0.5)")
    eta_2: float = Field(0.045, ge=0.0, lt=0.5, description="calibration of 2-bit tensors, in [0, 0.5)")
    eta_4: float = Field(0.0, ge=0.0, lt=0.5, description="calibration of 4-bit tensors, in [0, 0.5)")

    rotate_keys: bool = Field(
        False, description="quantize keys after a Hadamard rotation of each head's channels (queries rotated alike)"
    )
    rotate_values: bool = Field(
        False, description="quantize values after a Hadamard rotation of each head's channels (output rotated back)"
    )
    meta_bits: MetaBits = Field(16, description="16: scale/zero-point in the model dtype; 8: uint8 min/max per group")
    residual_rule: ResidualRule = Field(
        "paged", description="paged: the partial last block stays full precision; reference: KIVI's R-token rule"
    )
    residual: int = Field(128, ge=1, description="R of the reference rule (a multiple of k_group)")

    @model_validator(mode="after")
    def _check(self) -> QuantConfig:
        L = self.num_layers
        if self.k_high_layers > L:
            raise ValueError(f"k_high_layers={self.k_high_layers} must lie in [0, num_layers={L}]")
        if self.v_high_layers > L:
            raise ValueError(f"v_high_layers={self.v_high_layers} must lie in [0, num_layers={L}]")
        if self.head_size % self.v_group:
            raise ValueError(f"v_group={self.v_group} must divide head_size={self.head_size}")
        if (self.rotate_keys or self.rotate_values) and self.head_size & (self.head_size - 1):
            raise ValueError(f"rotate_keys/rotate_values need a power-of-two head_size, got {self.head_size}")
        if self.k_group % 8:
            raise ValueError(f"k_group={self.k_group} must be a multiple of 8 (whole bytes of 1-bit codes)")
        if self.residual_rule == "reference" and self.meta_bits == 8:
            raise ValueError("meta_bits=8 needs residual_rule='paged' (its super range spans one paged block)")
        if self.residual_rule == "reference" and self.residual % self.k_group:
            raise ValueError(f"residual={self.residual} must be a multiple of k_group={self.k_group}")
        for name in ("k", "v"):
            start = getattr(self, f"{name}_share_from")
            if start is None:
                continue
            if start > L - 1:
                raise ValueError(
                    f"{name}_share_from={start} is beyond the last layer (num_layers={L}): allowed 1..{L - 1} or null"
                )
            for upper in range(start | 1, L, 2):
                lo, hi = self.bits(name, upper - 1), self.bits(name, upper)
                if lo != hi:
                    raise ValueError(
                        f"{name}_share_from={start}: layer {upper} would share the {lo}-bit codes of layer {upper - 1} "
                        f"with {hi} bits of its own; a sharing pair needs equal bits (move {name}_share_from or "
                        f"{name}_high_layers)"
                    )
        return self

    # ---- per-layer view -------------------------------------------------------------------------------
    def bits(self, tensor: Literal["k", "v"], layer: int) -> int:
        high = getattr(self, f"{tensor}_high_layers")
        return getattr(self, f"{tensor}_bits_high") if layer < high else getattr(self, f"{tensor}_bits_low")

    def shares(self, tensor: Literal["k", "v"], layer: int) -> bool:
        """True when ``layer`` stores no codes of ``tensor`` and reads those of ``layer - 1``."""
        start = getattr(self, f"{tensor}_share_from")
        return start is not None and layer % 2 == 1 and layer >= start

    def eta(self, bits: int) -> float:
        return {1: self.eta_1, 2: self.eta_2, 4: self.eta_4}[bits]

    def layer(self, index: int) -> LayerQuant:
        if not 0 <= index < self.num_layers:
            raise IndexError(f"layer {index} outside [0, {self.num_layers})")
        kb, vb = self.bits("k", index), self.bits("v", index)
        return LayerQuant(
            index=index,
            k_bits=kb,
            v_bits=vb,
            k_shared=self.shares("k", index),
            v_shared=self.shares("v", index),
            k_eta=self.eta(kb),
            v_eta=self.eta(vb),
            k_group=self.k_group,
            v_group=self.v_group,
            head_size=self.head_size,
            meta_bits=self.meta_bits,
            rotate_k=self.rotate_keys,
            rotate_v=self.rotate_values,
        )

    def layers(self) -> list[LayerQuant]:
        return [self.layer(i) for i in range(self.num_layers)]

    @property
    def block_size(self) -> int:
        """Paged block = one key group: a block's bytes are final exactly when it fills."""
        return self.k_group

    def describe(self) -> str:
        """One line for start-up logs: preset, bits per layer, sharing, groups."""
        ks = "".join(str(self.bits("k", i)) for i in range(self.num_layers))
        vs = "".join(str(self.bits("v", i)) for i in range(self.num_layers))
        kshare = [i for i in range(self.num_layers) if self.shares("k", i)]
        vshare = [i for i in range(self.num_layers) if self.shares("v", i)]
        return (
            f"preset={self.preset} k_bits={ks} v_bits={vs} k_shared_layers={kshare or 'none'} "
            f"v_shared_layers={vshare or 'none'} G_k={self.k_group} G_v={self.v_group} "
            f"eta(1b,2b,4b)=({self.eta_1:.4g},{self.eta_2:.4g},{self.eta_4:.4g}) meta_bits={self.meta_bits} "
            f"rotated={'+'.join(n for n, on in (('keys', self.rotate_keys), ('values', self.rotate_values)) if on) or 'none'}"
        )


@dataclass(frozen=True)
class LayerQuant:
    """What one layer stores: bits of its K and V codes, whether it borrows them from layer-1, its etas."""

    index: int
    k_bits: int
    v_bits: int
    k_shared: bool
    v_shared: bool
    k_eta: float
    v_eta: float
    k_group: int
    v_group: int
    head_size: int
    meta_bits: int
    rotate_k: bool = False  # codes are of ``rotate(k)``: attention runs on rotated queries
    rotate_v: bool = False  # codes are of ``rotate(v)``: the attention output is rotated back


def _pair_floor(x: float) -> int:
    """Round a layer split down to a whole pair, so that no sharing pair straddles it."""
    return 2 * math.floor(x / 2)


def preset_fields(name: str, num_layers: int) -> dict[str, Any]:
    """The fields a preset sets for a model of ``num_layers`` layers (spec section 7 and 9)."""
    L = num_layers
    half = _pair_floor(L / 2)
    low_bits_xquant = dict(k_bits_high=2, k_bits_low=1, v_bits_high=2, v_bits_low=1, k_high_layers=half, v_high_layers=half)
    no_eta = dict(eta_1=0.0, eta_2=0.0, eta_4=0.0)
    # Ours, chosen on SmolLM2 and Qwen2.5-0.5B (benchmarks/results/quality-sweep/): keys need 2 bits everywhere;
    # 8-bit min/max over groups of 64 nearly halves the metadata of 16-bit groups of 32 at almost no cost;
    # cross-layer sharing costs more than the bits it saves on small models, so none. A Hadamard rotation
    # (rotate_keys / rotate_values) is opt-in: values rotated help SmolLM2 by 0.03 nats and cost Qwen2.5 0.01-0.05;
    # rotated keys cost Qwen2.5 0.7 nats.
    ours = dict(
        k_bits_high=2, k_high_layers=L, v_bits_high=2, v_bits_low=1,
        k_group=64, v_group=64, meta_bits=8,
    )  # fmt: skip
    table: dict[str, dict[str, Any]] = {
        "kivi-4": dict(k_bits_high=4, v_bits_high=4, k_high_layers=L, v_high_layers=L, **no_eta),
        "kivi-2": dict(k_bits_high=2, v_bits_high=2, k_high_layers=L, v_high_layers=L, **no_eta),
        # No sharing, so no pair constraint: exactly half the (layer, tensor) slots at 2 bits, keys first.
        "asymkv-1.5": dict(low_bits_xquant, k_high_layers=math.ceil(L / 2), v_high_layers=L // 2, **no_eta),
        # The paper's layout (spec section 7): half the layers at 1 bit, odd layers from 3L/4 share codes.
        "xquant-paper": dict(low_bits_xquant, k_share_from=math.ceil(3 * L / 4), v_share_from=math.ceil(3 * L / 4)),
        "xquant-1.25": dict(low_bits_xquant, k_share_from=math.ceil(L / 2), v_share_from=math.ceil(L / 2)),
        # The default: values keep 2 bits in the leading three quarters of the layers.
        "xquant": dict(ours, v_high_layers=_pair_floor(3 * L / 4)),
        # Capacity: values at 1 bit everywhere.
        "xquant-max": dict(ours, v_high_layers=0),
    }
    if name not in table:
        raise ValueError(f"preset={name!r} is unknown; choose one of {', '.join(PRESETS)}")
    fields = dict(table[name])
    for key in ("k_share_from", "v_share_from"):
        if fields.get(key) is not None and fields[key] > L - 1:
            fields[key] = None  # too few layers to share anything
    return fields


def make_config(
    preset: str = DEFAULT_PRESET, *, num_layers: int, head_size: int, overrides: dict[str, Any] | None = None
) -> QuantConfig:
    """Build a preset for a model, then apply ``overrides`` (any field); errors name the field."""
    fields = preset_fields(preset, num_layers)
    fields.update(overrides or {})
    if "preset" in (overrides or {}):
        raise ValueError("overrides: 'preset' cannot be overridden; pass it as the preset argument")
    for key in ("num_layers", "head_size"):
        if key in (overrides or {}):
            raise ValueError(f"overrides: {key!r} cannot be overridden; it comes from the model")
    return QuantConfig(preset=preset, num_layers=num_layers, head_size=head_size, **fields)


def parse_overrides(text: str | None) -> dict[str, Any]:
    """Parse the JSON object of overrides (the ``XQUANT_CONFIG`` channel); errors say what is wrong."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"overrides must be a JSON object of config fields: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"overrides must be a JSON object of config fields, got {type(value).__name__}")
    unknown = sorted(set(value) - set(QuantConfig.model_fields))
    if unknown:
        raise ValueError(f"unknown config field(s) {unknown}; known: {sorted(QuantConfig.model_fields)}")
    return value


def first_error(exc: ValidationError) -> str:
    """A one-line message naming the field, for CLI and start-up errors."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    return f"{loc}: {err['msg']}"
