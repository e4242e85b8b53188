"""Trace a Hugging Face causal LM: run it with sparse attention over a long input and record the trace.

Long inputs run as chunked prefill with a KV cache (:mod:`.forward`); after every chunk the per-layer
selections and block masses the registered attention recorded (:mod:`.backend`) are written to the store as
one shard, so a killed run resumes after its last complete chunk. Chunks are whole query blocks, so the
trace does not depend on the chunk size.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict

import torch

from ..config import TraceConfig
from ..errors import UsageError
from ..store import Trace, TraceWriter
from .backend import sparse_model
from .cpu import keep_freed_memory
from .forward import chunked_forward
from .models import context_window, model_devices


def model_summary(model) -> dict:
    """The facts about a model that a trace manifest keeps."""
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = text_cfg.num_attention_heads
    return {
        "architecture": (cfg.architectures or [type(model).__name__])[0],
        "num_layers": text_cfg.num_hidden_layers,
        "num_heads": heads,
        "num_kv_heads": getattr(text_cfg, "num_key_value_heads", heads),
        "head_dim": getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads,
        "context_window": context_window(model),
        "sliding_window": getattr(text_cfg, "sliding_window", None),
        "layer_types": getattr(text_cfg, "layer_types", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def device_name(model) -> str:
    """Where ``model`` runs, for the manifest: ``"cpu"``, ``"cuda: <GPU name>"``, or for a model spread by a
    device map ``"cuda: <GPU name> x2 (cuda:0, cuda:1)"``."""
    devices = model_devices(model)
    gpus = [d for d in devices if d.type == "cuda"]
    if not gpus:
        return devices[0].type
    name = f"cuda: {torch.cuda.get_device_name(gpus[0])}"
    return name if len(devices) == 1 else f"{name} x{len(gpus)} ({', '.join(map(str, devices))})"


def trace_meta(model, config: TraceConfig, model_id: str = "") -> dict:
    """The manifest meta of a trace of ``model`` under ``config`` (``device`` is volatile: a trace begun on
    one device may be resumed on another)."""
    return {
        "model_id": model_id,
        "device": device_name(model),
        "model": model_summary(model),
        "trace_config": asdict(config),
    }


def join_chunks(chunks: list[dict]) -> dict:
    """The records of ``SparseSession.take_chunk`` calls joined along query blocks: the keyword arguments
    of ``Trace.from_arrays`` (``indices``, ``mass`` and, when recorded, ``missed``, ``capped`` and ``audit``)."""
    joined = {name: torch.cat([c[name] for c in chunks], dim=2)
              for name in ("indices", "mass", "missed", "capped") if name in chunks[0]}
    if "audit" in chunks[0]:
        joined["audit"] = {"query_block": torch.cat([c["audit"]["query_block"] for c in chunks]),
                           **{key: torch.cat([c["audit"][key] for c in chunks], dim=-1)
                              for key in ("missed", "recall")}}
    return joined


def trace_ids(
    model,
    input_ids: torch.Tensor,
    config: TraceConfig = TraceConfig(),
    *,
    out=None,
    model_id: str = "",
    text: str | None = None,
    token_offsets: torch.Tensor | None = None,
    keep_logits: int = 0,
    progress: bool = False,
):
    """Trace ``input_ids [T]`` through ``model`` with sparse attention selected by ``config.mask``.

    Writes the trace to ``out`` chunk by chunk (a rerun with the same input and config resumes after
    the last complete chunk) or keeps it in memory when ``out`` is None. Returns the :class:`Trace`, or
    ``(trace, logits)`` with the last ``keep_logits`` positions' logits when ``keep_logits > 0``.
    """
    input_ids = torch.as_tensor(input_ids).flatten().long()
    T = input_ids.shape[0]
    if next(model.parameters()).device.type == "cpu":
        keep_freed_memory()
    if T == 0:
        raise UsageError("the input has no tokens; give a non-empty text.")
    window = context_window(model)
    if window is not None and T > window:
        warnings.warn(
            f"{T} tokens exceed the model's trained context window of {window}; tracing anyway "
            "(positions past it are extrapolation).",
            stacklevel=2,
        )
    meta = trace_meta(model, config, model_id)
    summary = meta["model"]
    mask = config.mask
    n_query_blocks = math.ceil(T / mask.block_q)
    writer = None
    chunks: list[dict] = []
    if out is not None:
        writer = TraceWriter(
            out, meta=meta, tokens=input_ids, token_offsets=token_offsets, text=text,
            num_layers=summary["num_layers"], num_heads=summary["num_heads"], top_k=mask.width,
            block_q=mask.block_q, block_k=mask.block_k, mass_encoding=config.mass_encoding,
            budget=mask.budget(),
        )
        if writer.completed_query_blocks >= n_query_blocks and keep_logits == 0:
            writer.finish()
            return Trace.load(out, verify=False)

    bar = _progress_bar(T, progress)
    with sparse_model(model, config, num_tokens=T) as session:

        def save_chunk(start: int, end: int) -> None:
            chunk = session.take_chunk()
            q_block = start // mask.block_q
            if writer is None:
                chunks.append(chunk)
            elif q_block >= writer.completed_query_blocks:  # resume: finished chunks are not rewritten
                writer.write(q_block, **chunk)

        logits = chunked_forward(
            model, input_ids, config.chunk_size, keep_logits=keep_logits, on_chunk=save_chunk,
            progress=bar.update if bar is not None else None,
        )
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.finish()
        trace = Trace.load(out, verify=False)  # the writer hashed every shard it wrote
    else:
        trace = Trace.from_arrays(**join_chunks(chunks), block_q=mask.block_q, block_k=mask.block_k,
                                  meta=meta, tokens=input_ids, token_offsets=token_offsets, text=text,
                                  budget=mask.budget())
    return (trace, logits) if keep_logits else trace


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[T]`` and character spans ``[T, 2]`` of ``text`` (no special tokens added)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    offsets = torch.tensor(enc["offset_mapping"], dtype=torch.long).view(-1, 2)
    if max_tokens is not None:
        ids, offsets = ids[:max_tokens], offsets[:max_tokens]
    return ids, offsets


def trace_text(model, tokenizer, text: str, config: TraceConfig = TraceConfig(), *,
               max_tokens: int | None = None, **kwargs):
    """Tokenize ``text`` (keeping character offsets) and :func:`trace_ids` it."""
    if not text.strip():
        raise UsageError("the text is empty; give a file with some text in it.")
    ids, offsets = tokenize(tokenizer, text, max_tokens)
    return trace_ids(model, ids, config, text=text, token_offsets=offsets, **kwargs)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="tracing", dynamic_ncols=True)
