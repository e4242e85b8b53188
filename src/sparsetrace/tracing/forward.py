"""Running a model over a long input: chunked prefill through a KV cache, and greedy decoding after it.

Chunk c's queries attend to the cached keys of every earlier chunk, so the attention sees the whole causal
prefix while activations stay ``O(chunk)``. Works with whatever attention the model is set to (sdpa for
dense references, ``"sparsetrace"`` inside :func:`sparsetrace.tracing.backend.sparse_model`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from transformers import DynamicCache

from .backend import SparseSession, mark_input_end


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
    mark_input_end(cache.get_seq_length() + T)  # a sparse session scores the input's tail exactly
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
                  ) -> tuple[torch.Tensor, list[int], list[dict]]:
    """Greedy decoding on one KV cache: :func:`chunked_forward` prefill, then one token per forward.

    Runs with whatever attention the model is set to; with ``session`` (the :class:`SparseSession` of
    an active :func:`sparse_model` block) the prefill's per-chunk records (``take_chunk``) are collected
    and decode steps are not recorded, so the chunks are the trace of ``input_ids`` alone. Decoding
    ends after ``max_new`` tokens, at EOS (unless ``stop_at_eos`` is False), or when ``stop(tokens)``
    holds (asked from the second token on: the two-token criterion always gets two). Returns the
    prefill's last ``keep_logits`` logits ``[keep, V]``, the tokens and the chunks.
    """
    cache = new_cache()
    chunks: list[dict] = []
    if session is not None and session.num_tokens is None:
        session.num_tokens = int(input_ids.shape[0])  # the prefill's trace audits rows of this input
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
