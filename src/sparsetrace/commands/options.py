"""Options shared by the commands: flags generated from the configuration dataclasses, input files,
the model and device.

:func:`add_config_flags` turns every field of :class:`~sparsetrace.config.TraceConfig` (and of its
:class:`~sparsetrace.config.MaskConfig`) into a flag, with the help text and choices of the field's
metadata, so a new field is a new flag everywhere at once. Flags default to "not given" (None);
:func:`config_from_args` fills what was not given from a base config (a trace's own, or the defaults).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..config import MaskConfig, TraceConfig
from ..errors import UsageError


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    return _int(text, 1)


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int(text, 0)


def _int(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} must be {'a positive integer' if minimum else 'zero or more'}")
    return value


def number(text: str) -> float:
    """argparse type: a float (its range is checked by the configuration, in one sentence)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _config_fields():
    """(field, default) of every configurable field: the mask's, then the trace's own."""
    mask_defaults, trace_defaults = MaskConfig(), TraceConfig()
    for f in dataclasses.fields(MaskConfig):
        yield f, getattr(mask_defaults, f.name)
    for f in dataclasses.fields(TraceConfig):
        if f.name != "mask":
            yield f, getattr(trace_defaults, f.name)


def _flag(f) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def flag_of(name: str) -> str:
    """The command-line flag of configuration field ``name`` (``block_q`` -> ``--block-size``)."""
    return next(_flag(f) for f, _ in _config_fields() if f.name == name)


def add_config_flags(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
    """One flag per configuration field (fields that share a flag share one value), except ``skip``."""
    group = parser.add_argument_group("selection and tracing (defaults from sparsetrace.config)")
    seen = set()
    for f, default in _config_fields():
        flag = _flag(f)
        if f.name in skip or flag in seen:
            continue
        seen.add(flag)
        if "choices" in f.metadata:
            kwargs = {"choices": f.metadata["choices"]}
        elif f.metadata.get("kind") == "fraction":
            kwargs = {"type": number, "metavar": "P"}
        else:
            kwargs = {"type": nonnegative_int if f.metadata.get("minimum") == 0 else positive_int}
        shown = "off" if default is None and f.name == "coverage" else default
        help_text = f.metadata["help"].replace("%", "%%") + ("" if default is None and f.name != "coverage"
                                                             else f" (default {shown})")
        group.add_argument(flag, dest=flag[2:].replace("-", "_"), default=None, help=help_text, **kwargs)


def given_config_options(args: argparse.Namespace) -> dict:
    """The configuration fields set on the command line, by field name."""
    out = {}
    for f, _ in _config_fields():
        value = getattr(args, _flag(f)[2:].replace("-", "_"), None)
        if value is not None:
            out[f.name] = value
    return out


def config_from_args(args: argparse.Namespace, base: TraceConfig | None = None, **override) -> TraceConfig:
    """The :class:`TraceConfig` the flags describe: the given flags, then ``override``, over ``base``
    (default: the dataclass defaults). Validated by the dataclasses (one sentence on bad values)."""
    base = TraceConfig() if base is None else base
    return base.replace(**{**given_config_options(args), **override})


def add_model_options(parser: argparse.ArgumentParser, *, text: bool = True) -> None:
    """``--model``, ``--dtype``, ``--device``, ``--device-map`` and (with ``text``) ``--text-file``,
    ``--max-tokens``."""
    parser.add_argument("--model", default=None,
                        help="model alias (smollm2-135m, gemma-3-270m), HF folder or .gguf file "
                             "(default: the embedded SmolLM2-135M-Instruct)")
    if text:
        parser.add_argument("--text-file", type=Path, help="UTF-8 text to run the model on")
        parser.add_argument("--max-tokens", type=positive_int, default=None,
                            help="use only the first N tokens of the text")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="model dtype (default float32)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                        help="where the model runs: auto = the GPU when PyTorch sees one (the FlexAttention "
                             "+ Triton path), else the CPU (default auto)")
    parser.add_argument("--device-map", default=None, metavar="auto|balanced|FILE",
                        help="spread the model's layers over several devices (accelerate's device map, "
                             "instead of --device): auto or balanced split the decoder layers evenly over "
                             "the GPUs PyTorch sees; FILE is a JSON object {module name: device}, e.g. "
                             '{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": 1}')


def read_text(path: Path | None, flag: str = "--text-file") -> str:
    """The text of the file given to ``flag``: one-sentence errors for a missing, unreadable, binary or
    empty file."""
    if path is None:
        raise UsageError(f"no input text: pass {flag} FILE.")
    what = flag.lstrip("-").replace("-", " ")  # "--haystack-file" -> "haystack file"
    if not path.exists():
        raise UsageError(f"{what} {path} does not exist; check the {flag} path.")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; {flag} needs a UTF-8 text file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text; convert it (e.g. iconv -t utf-8) and retry.") from None
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}.") from None
    if not text.strip():
        raise UsageError(f"{path} is empty; give a file with some text in it.")
    return text


def output_dir(path: Path, flag: str = "--out") -> Path:
    """``path`` as an output directory: refused if it is a file."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file; give a directory path.")
    return path


def output_file(path: Path, suffixes: tuple[str, ...], flag: str = "--out") -> Path:
    """``path`` as an output file with one of ``suffixes`` in an existing folder."""
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name such as out{suffixes[0]}.")
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: give a {', '.join(suffixes)} file name.")
    if not path.parent.is_dir():
        raise UsageError(f"the folder of {flag} {path} does not exist; create it first.")
    return path


def device_of(choice: str | None) -> str:
    """The torch device ``--device`` names (``auto``, the default: ``cuda`` when PyTorch sees a GPU)."""
    import torch

    if choice in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: PyTorch sees no CUDA GPU here (a CPU-only torch, or no driver); "
                         "use --device cpu.")
    return choice


def device_map_of(text: str | None):
    """The device map ``--device-map`` names: None, a name accelerate knows (``auto``, ``balanced``, ...)
    or the ``{module: device}`` object of a JSON file (checked against the model when it loads)."""
    from ..tracing.models import DEVICE_MAP_NAMES

    if text is None or text in DEVICE_MAP_NAMES:
        return text
    path = Path(text)
    if not path.is_file():
        raise UsageError(f"--device-map {text}: no such file; give {', '.join(DEVICE_MAP_NAMES[:2])} or a "
                         "JSON file {module name: device}.")
    try:
        device_map = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"--device-map {path} is not JSON ({err}); give a JSON object such as "
                         '{"": "cpu"}.') from None
    if not isinstance(device_map, dict) or not device_map:
        raise UsageError(f"--device-map {path} holds a JSON {type(device_map).__name__}, not a non-empty "
                         '{module name: device} object such as {"": "cpu"}.')
    return device_map


def placement(args: argparse.Namespace, ranks=None) -> tuple[str | None, object]:
    """``(device, device_map)`` from ``--device`` / ``--device-map``: exactly one of them is not None.
    Under torchrun (``ranks`` of several processes) each process takes the GPU of its local rank, and a
    device map (one model over several GPUs) is refused: the two ways of using GPUs do not mix; a command
    that does not share its work over ranks (no ``ranks``) is refused under torchrun."""
    from ..runs.ranks import Ranks

    if ranks is None and Ranks.from_env().world > 1:
        raise UsageError("this command runs in one process; of the commands only niah shares its work over "
                         "torchrun's processes (run this one without torchrun).")
    device_map = device_map_of(getattr(args, "device_map", None))
    if device_map is None:
        device = device_of(args.device)
        return (device if ranks is None else ranks.device(device)), None
    if args.device is not None:
        raise UsageError("--device and --device-map both place the model; give only one of them.")
    if ranks is not None and ranks.world > 1:
        raise UsageError(f"--device-map spreads one model over the GPUs, but {ranks.world} processes were "
                         "started (torchrun); use one process with --device-map, or drop it.")
    return None, device_map


def load(args: argparse.Namespace, ranks=None):
    """``(model, tokenizer, model_id)`` for ``--model`` / ``--dtype`` / ``--device`` / ``--device-map``
    (each torchrun process on its own GPU with ``ranks``), with the loading noise muted."""
    import torch
    from transformers.utils import logging as hf_logging

    from ..tracing.models import load_model, model_id

    device, device_map = placement(args, ranks)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model, tokenizer = load_model(args.model, dtype=dtype, device_map=device_map)
    return (model if device is None else model.to(device)), tokenizer, model_id(args.model)
