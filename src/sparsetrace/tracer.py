"""Run a Hugging Face causal LM with STREAM attention over a long input and record the trace.

The attention function is registered with transformers' ``AttentionInterface`` under the name
``"sparsetrace"`` (and a mask function under the same name in ``AttentionMaskInterface`` that returns
``None``: our attention applies causality itself, so the model never builds a ``[T, S]`` mask). Nothing in a
model class is patched: :func:`sparse_model` switches the model's ``attn_implementation`` to
``"sparsetrace"`` for the duration of a ``with`` block and puts the active :class:`SparseSession` in a
context variable, restoring both on exit, even on exceptions.

Long inputs run as chunked prefill with a KV cache: chunk c's queries attend to the cached keys of every
earlier chunk, so the estimator sees the whole causal prefix, activations stay ``O(chunk)`` and the trace
does not depend on the chunk size (chunks are whole query blocks, so blocks line up).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

from .attention import sparse_attention
from .cpu import keep_freed_memory
from .mask import BlockMask, MaskConfig, oracle_mask, stream_mask
from .models import context_window

ATTN_NAME = "sparsetrace"
ESTIMATORS = ("stream", "oracle")
MASS_ENCODINGS = ("float16", "log8")


@dataclass(frozen=True)
class TraceConfig:
    """How a model is traced. Maps one-to-one onto ``sparsetrace trace`` flags; stored in the manifest."""

    block_size: int = 32
    top_k: int = 16
    sink_blocks: int = 1
    local_blocks: int = 1
    score: str = "max"
    query_stride: int = 1
    estimator: str = "stream"
    chunk_size: int = 1024
    mass_encoding: str = "float16"

    def __post_init__(self) -> None:
        _ = self.mask_config  # building it validates the mask fields
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator={self.estimator!r} is not one of {ESTIMATORS}.")
        if self.mass_encoding not in MASS_ENCODINGS:
            raise ValueError(f"mass_encoding={self.mass_encoding!r} is not one of {MASS_ENCODINGS}.")
        if not isinstance(self.chunk_size, int) or self.chunk_size <= 0 or self.chunk_size % self.block_size:
            raise ValueError(
                f"chunk_size={self.chunk_size!r} must be a positive multiple of block_size={self.block_size} "
                "so that query blocks never straddle two chunks."
            )

    @property
    def mask_config(self) -> MaskConfig:
        return MaskConfig(
            self.block_size, self.block_size, self.top_k, self.sink_blocks, self.local_blocks,
            self.score, self.query_stride,
        )


MaskEdit = Callable[[int, BlockMask], BlockMask]


@dataclass
class SparseSession:
    """What the registered attention does while active: select, (optionally) edit, attend, record.

    ``edit(layer, mask) -> mask`` may change the selection before attention runs (e.g. suppress a
    sentence's key blocks); ``record`` collects ``(indices, mass)`` per layer for the current chunk.
    """

    config: TraceConfig
    edit: MaskEdit | None = None
    record: bool = True
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def select(self, query: torch.Tensor, key: torch.Tensor, window: int | None) -> BlockMask:
        mc = self.config.mask_config
        estimate = stream_mask if self.config.estimator == "stream" else oracle_mask
        return estimate(
            query, key, block_q=mc.block_q, block_k=mc.block_k, top_k=mc.top_k,
            sink_blocks=mc.sink_blocks, local_blocks=mc.local_blocks, score=mc.score,
            query_stride=mc.query_stride, window=window,
        )

    def take_chunk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices int32 and mass float32, ``[L, H, nQ_chunk, top_k]`` (batch 0), and reset."""
        order = sorted(self.layers)
        assert order == list(range(len(order))), f"layers recorded out of order: {order}"
        indices = torch.stack([self.layers[i][0][0] for i in order]).cpu()
        mass = torch.stack([self.layers[i][1][0] for i in order]).cpu()
        self.layers.clear()
        return indices, mass


_ACTIVE: contextvars.ContextVar[SparseSession | None] = contextvars.ContextVar("sparsetrace", default=None)


def stream_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """AttentionInterface backend: ``query [B, Hq, T, D]``, ``key/value [B, Hkv, S, D]`` (post-RoPE, cache
    included) -> ``([B, T, Hq, D], None)``, like transformers' ``eager_attention_forward``."""
    session = _ACTIVE.get()
    if session is None:
        raise RuntimeError(
            "the 'sparsetrace' attention runs only inside `with sparsetrace.sparse_model(model, config):`."
        )
    window = kwargs.get("sliding_window") or None
    mask = session.select(query, key, window)
    if session.edit is not None:
        mask = session.edit(module.layer_idx, mask)
    out, mass = sparse_attention(query, key, value, mask, scale=scaling, return_mass=True, window=window)
    if session.record:
        session.layers[module.layer_idx] = (mask.indices, mass)
    return out.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    """Mask function for the 'sparsetrace' backend: none, since the attention is causal by construction."""
    return None


AttentionInterface.register(ATTN_NAME, stream_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, _no_mask)


@contextlib.contextmanager
def sparse_model(model, config: TraceConfig, *, edit: MaskEdit | None = None,
                 record: bool = True) -> Iterator[SparseSession]:
    """Run ``model`` with STREAM attention inside the block; yields the :class:`SparseSession`."""
    previous = model.config._attn_implementation
    session = SparseSession(config, edit=edit, record=record)
    token = _ACTIVE.set(session)
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield session
    finally:
        model.set_attn_implementation(previous)
        _ACTIVE.reset(token)


def new_cache() -> DynamicCache:
    """A KV cache for :func:`chunked_forward`.

    A plain cache keeps every key, also on sliding-window layers, so keys sit at their absolute positions
    0..S-1 as the estimator's contract assumes; the window is applied inside the attention.
    """
    return DynamicCache()


def chunked_forward(
    model,
    input_ids: torch.Tensor,
    chunk_size: int,
    *,
    keep_logits: int = 1,
    on_chunk: Callable[[int, int], None] | None = None,
    progress: Callable[[int], None] | None = None,
    cache: DynamicCache | None = None,
) -> torch.Tensor:
    """Prefill ``input_ids [T]`` chunk by chunk through a KV cache; return the last ``keep_logits`` logits.

    Works with whatever attention the model is set to (sdpa for the dense reference, sparsetrace inside
    :func:`sparse_model`). ``on_chunk(start, end)`` runs after each chunk. Pass ``cache`` (a
    :func:`new_cache`) to continue from earlier tokens, e.g. to decode after a prefill; positions
    continue from its length. Returns float32 ``[keep, V]``.
    """
    T = input_ids.shape[0]
    device = next(model.parameters()).device
    cache = new_cache() if cache is None else cache
    # transformers renamed `past_key_values` to `cache` (5.2x); accept both.
    cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    kept: list[torch.Tensor] = []
    with torch.no_grad():
        for start in range(0, T, chunk_size):
            end = min(start + chunk_size, T)
            want = max(0, min(end - start, keep_logits - (T - end)))  # positions of this chunk in the tail
            out = model(
                input_ids=input_ids[None, start:end].to(device),
                **{cache_kwarg: cache},
                use_cache=True,
                logits_to_keep=max(want, 1),
            )
            if want:
                kept.append(out.logits[0, -want:].float().cpu())
            if on_chunk is not None:
                on_chunk(start, end)
            if progress is not None:
                progress(end - start)
    return torch.cat(kept) if kept else torch.empty(0)


def greedy_decode(model, input_ids: torch.Tensor, max_new: int, *, chunk_size: int = 1024,
                  keep_logits: int = 1, session: SparseSession | None = None,
                  stop: Callable[[list[int]], bool] | None = None, stop_at_eos: bool = True
                  ) -> tuple[torch.Tensor, list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Greedy decoding on one KV cache: :func:`chunked_forward` prefill, then one token per forward.

    Runs with whatever attention the model is set to; with ``session`` (the :class:`SparseSession` of
    an active :func:`sparse_model` block) the prefill's per-chunk ``(indices, mass)`` are collected
    and decode steps are not recorded, so the chunks are the trace of ``input_ids`` alone. Decoding
    ends after ``max_new`` tokens, at EOS (unless ``stop_at_eos`` is False), or when ``stop(tokens)``
    holds (asked from the second token on: the two-token criterion always gets two). Returns the
    prefill's last ``keep_logits`` logits ``[keep, V]``, the tokens and the chunks.
    """
    cache = new_cache()
    chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
    on_chunk = (lambda start, end: chunks.append(session.take_chunk())) if session else None
    logits = chunked_forward(model, input_ids, chunk_size, keep_logits=keep_logits, cache=cache,
                             on_chunk=on_chunk)
    if session is not None:
        session.record = False
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) if stop_at_eos else None
    eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < max_new and tokens[-1] not in eos and not (
            len(tokens) >= 2 and stop is not None and stop(tokens)):
        step = chunked_forward(model, torch.tensor([tokens[-1]]), 1, keep_logits=1, cache=cache)
        tokens.append(int(step[-1].argmax()))
    return logits, tokens, chunks


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
    """Where ``model`` runs, for the manifest: ``"cpu"`` or ``"cuda: <GPU name>"``."""
    device = next(model.parameters()).device
    return f"cuda: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type


def trace_meta(model, config: TraceConfig, model_id: str = "") -> dict:
    """The manifest meta of a trace of ``model`` under ``config`` (``device`` is volatile: a trace begun on
    one device may be resumed on another)."""
    return {
        "model_id": model_id,
        "device": device_name(model),
        "model": model_summary(model),
        "trace_config": asdict(config),
        "block_q": config.block_size,
        "block_k": config.block_size,
        "top_k": config.top_k,
        "sink_blocks": config.sink_blocks,
        "local_blocks": config.local_blocks,
        "score": config.score,
    }


def join_chunks(chunks: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(indices, mass)`` of :meth:`SparseSession.take_chunk` calls, joined along query blocks."""
    return torch.cat([c[0] for c in chunks], dim=2), torch.cat([c[1] for c in chunks], dim=2)


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
    """Trace ``input_ids [T]`` through ``model`` with STREAM attention.

    Writes the trace to ``out`` chunk by chunk (a rerun with the same input and config resumes after
    the last complete chunk) or keeps it in memory when ``out`` is None. Returns the :class:`Trace`, or
    ``(trace, logits)`` with the last ``keep_logits`` positions' logits when ``keep_logits > 0``.
    """
    from .store import Trace, TraceWriter

    input_ids = torch.as_tensor(input_ids).flatten().long()
    T = input_ids.shape[0]
    if next(model.parameters()).device.type == "cpu":
        keep_freed_memory()
    if T == 0:
        raise ValueError("the input has no tokens; give a non-empty text.")
    window = context_window(model)
    if window is not None and T > window:
        warnings.warn(
            f"{T} tokens exceed the model's trained context window of {window}; tracing anyway "
            "(positions past it are extrapolation).",
            stacklevel=2,
        )
    meta = trace_meta(model, config, model_id)
    summary = meta["model"]
    n_blocks = math.ceil(T / config.block_size)
    writer = None
    chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
    if out is not None:
        writer = TraceWriter(
            out, meta=meta, tokens=input_ids, token_offsets=token_offsets, text=text,
            num_layers=summary["num_layers"], num_heads=summary["num_heads"], top_k=config.top_k,
            num_query_blocks=n_blocks, num_key_blocks=n_blocks, mass_encoding=config.mass_encoding,
        )
        if writer.completed_query_blocks >= n_blocks and keep_logits == 0:
            return writer.finish()

    bar = _progress_bar(T, progress)
    with sparse_model(model, config) as session:

        def save_chunk(start: int, end: int) -> None:
            indices, mass = session.take_chunk()
            q_block = start // config.block_size
            if writer is None:
                chunks.append((indices, mass))
            elif q_block >= writer.completed_query_blocks:  # resume: finished chunks are not rewritten
                writer.write(q_block, indices, mass)

        logits = chunked_forward(
            model, input_ids, config.chunk_size, keep_logits=keep_logits, on_chunk=save_chunk,
            progress=bar.update if bar is not None else None,
        )
    if bar is not None:
        bar.close()
    if writer is not None:
        trace = writer.finish()
    else:
        trace = Trace.from_arrays(*join_chunks(chunks), meta=meta, tokens=input_ids,
                                  token_offsets=token_offsets, text=text)
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
        raise ValueError("the text is empty; give a file with some text in it.")
    ids, offsets = tokenize(tokenizer, text, max_tokens)
    return trace_ids(model, ids, config, text=text, token_offsets=offsets, **kwargs)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", desc="tracing", dynamic_ncols=True)
