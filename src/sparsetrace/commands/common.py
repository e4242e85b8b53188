"""Options and input handling shared by the commands that run a model (trace, fidelity, anchors, niah).

Flags map one-to-one onto :class:`sparsetrace.tracer.TraceConfig` fields.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be a positive integer")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be zero or more")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--text-file``, ``--max-tokens``, ``--dtype``, ``--device``."""
    parser.add_argument("--model", default=None,
                        help="model alias (smollm2-135m, gemma-3-270m), HF folder or .gguf file "
                             "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--text-file", type=Path, help="UTF-8 text to run the model on")
    parser.add_argument("--max-tokens", type=positive_int, default=None,
                        help="use only the first N tokens of the text")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="model dtype (default float32)")
    add_device_option(parser)


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device``: where the model runs."""
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the model runs: auto = the GPU when PyTorch sees one (the FlexAttention "
                             "+ Triton path), else the CPU")


def add_trace_options(parser: argparse.ArgumentParser, *, top_k: bool = True) -> None:
    """The STREAM knobs of :class:`TraceConfig`."""
    if top_k:
        parser.add_argument("--top-k", type=positive_int, default=16,
                            help="key blocks kept per query block, forced ones included (default 16)")
    parser.add_argument("--block-size", type=positive_int, default=32,
                        help="query and key block size in tokens (default 32)")
    parser.add_argument("--chunk-size", type=positive_int, default=1024,
                        help="tokens per prefill chunk, a multiple of --block-size (default 1024)")
    parser.add_argument("--sink-blocks", type=nonnegative_int, default=1, help="forced sink blocks (1)")
    parser.add_argument("--local-blocks", type=nonnegative_int, default=1,
                        help="forced local blocks ending at the diagonal (1)")
    parser.add_argument("--score", choices=("max", "lse"), default="max",
                        help="block score: max (peak q.k, the paper's) or lse (estimates mass)")
    parser.add_argument("--estimator", choices=("stream", "oracle"), default="stream",
                        help="stream (O(T log T)) or the exact oracle (O(T^2), small inputs)")
    parser.add_argument("--mass-encoding", choices=("float16", "log8"), default="float16",
                        help="how block masses are stored (log8: 1 byte, <=3.4%% relative error)")


def trace_config(args: argparse.Namespace, top_k: int | None = None):
    """The :class:`TraceConfig` the flags describe (validated there, with a one-sentence error)."""
    from ..tracer import TraceConfig

    return TraceConfig(
        block_size=args.block_size,
        top_k=args.top_k if top_k is None else top_k,
        sink_blocks=args.sink_blocks,
        local_blocks=args.local_blocks,
        score=args.score,
        estimator=args.estimator,
        chunk_size=args.chunk_size,
        mass_encoding=getattr(args, "mass_encoding", "float16"),
    )


def read_text(path: Path | None, flag: str = "--text-file") -> str:
    """The text of the file given to ``flag``: clear errors for a missing, unreadable, binary or empty
    file."""
    if path is None:
        raise ValueError(f"no input text: pass {flag} FILE.")
    if not path.exists():
        what = flag.lstrip("-").replace("-", " ")  # "--haystack-file" -> "haystack file"
        raise FileNotFoundError(f"{what} {path} does not exist; check the {flag} path.")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; {flag} needs a UTF-8 text file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; convert it (e.g. iconv -t utf-8) and retry.") from None
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}.") from None
    if not text.strip():
        raise ValueError(f"{path} is empty; give a file with some text in it.")
    return text


def device_of(choice: str) -> str:
    """The torch device ``--device`` names (``auto``: ``cuda`` when PyTorch sees a GPU)."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: PyTorch sees no CUDA GPU here (a CPU-only torch, or no driver); "
                         "use --device cpu.")
    return choice


def load(args: argparse.Namespace):
    """``(model, tokenizer, model_id)`` for ``--model`` / ``--dtype`` / ``--device``, with the loading
    noise muted."""
    import torch
    from transformers.utils import logging as hf_logging

    from ..models import load_model, model_id

    device = device_of(args.device)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model, tokenizer = load_model(args.model, dtype=dtype)
    return model.to(device), tokenizer, model_id(args.model)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
