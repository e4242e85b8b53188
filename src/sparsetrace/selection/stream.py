"""STREAM: hierarchical top-k pruning of key blocks (the paper's estimator).

After "Stream: Scaling up Mechanistic Interpretability to Long Context in LLMs via Sparse Attention"
(Rosser et al. 2025, arXiv 2510.19875), which builds on HiP attention (arXiv 2406.09827).

For every query block i of every query head (queries are the last T of S positions, so block i covers
absolute positions ``q_offset + [i*block_q, (i+1)*block_q)``), with ``n`` causal key blocks:

  0. if ``n <= top_k`` keep all of them; otherwise keep the sinks ``[0, sink_blocks)`` and the local blocks
     ``[n - local_blocks, n)`` and choose ``m = top_k - sink_blocks - local_blocks`` middle blocks:
  1. split the middle candidates ``[sink_blocks, n - local_blocks)`` into m contiguous groups;
  2. while a group has more than one block: split every group into halves, score each half by its centre
     (representative) block, keep the m best halves (ties: the lower block index);
  3. the m surviving single blocks are the selection.

The block score of key block j for query block i is the max of ``q . k`` over the queries of i and the
causally allowed keys of j ("max"), or the log-sum-exp of the scaled logits over the same tile ("lse",
an estimate of attention mass rather than of the peak).

Every step is vectorised over batch, heads and query blocks; the only Python loop is over the
``ceil(log2(n / m))`` levels. Each level scores ``2m`` tiles per query block, so the cost is
``O(T * m * log(S / m) * block_q * block_k * D)`` and memory ``O(T * m * block_k * D)``: no
``[nQ, n_key_blocks]`` or ``[T, S]`` tensor is ever built. :mod:`.oracle` is the same contract with
steps 1-3 replaced by the exact top-m block scores.

:func:`hierarchical_search` runs the steps given a scorer of halves; :func:`stream_select` is the torch
scorer (any device). The GPU scorer (``sparsetrace.kernels.scoring``) plugs into the same search, and
``sparsetrace.ops.stream_mask`` chooses between them.
"""

from __future__ import annotations

import math

import torch

from ..config import MaskConfig
from .blocks import (
    BlockMask,
    assemble,
    candidate_range,
    centre_blocks,
    check_qk,
    forced_sinks,
    key_blocks,
    middle_is_visible,
    query_blocks,
    tile_scores,
)


def split_into_groups(lo: torch.Tensor, count: torch.Tensor, m: int):
    """Step 1: m contiguous, nearly equal groups over ``[lo, lo + count)``: ``(starts, ends)`` ``[nQ, m]``."""
    g = torch.arange(m + 1, device=count.device)
    edges = lo[:, None] + (g[None, :] * count[:, None]) // m  # [nQ, m+1]
    return edges[:, :-1], edges[:, 1:]


def halves(starts: torch.Tensor, ends: torch.Tensor):
    """Step 2a: every group ``[a, b)`` -> left ``[a, a + ceil(size/2))`` and right half; ``[..., 2m]`` each.

    A group of one block yields itself and an empty right half. Halves stay in block order.
    """
    mid = starts + (ends - starts + 1) // 2
    half_starts = torch.stack([starts, mid], dim=-1).flatten(-2)  # [..., 2m]
    half_ends = torch.stack([mid, ends], dim=-1).flatten(-2)  # [..., 2m]
    return half_starts, half_ends


def keep_best(starts, ends, scores, m: int):
    """Step 2b: the m best halves by score, ties to the lower block index, returned in block order."""
    scores = scores.masked_fill(ends <= starts, -math.inf)  # an empty half never wins over a real one
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :m]  # [B, Hq, nQ, m]
    order = torch.sort(order, dim=-1).values  # back to block order
    return starts.gather(-1, order), ends.gather(-1, order)


def hierarchical_search(q: torch.Tensor, k: torch.Tensor, config: MaskConfig, window: int | None,
                        score_halves) -> BlockMask:
    """Steps 0-3 of the module docstring, given ``score_halves(half_starts, half_ends) -> [B, Hq, nQ, 2m]``
    (the score of each half's representative block). Shared by the torch path and the GPU scorer."""
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    sinks = forced_sinks(config, window)
    m = config.top_k - sinks - config.local_blocks
    lo, n = candidate_range(T, S, config, q.device, window)  # [nQ] each
    n_kb = math.ceil(S / config.block_k)
    # Rows that keep everything run the search on a dummy range of m blocks; assemble discards them.
    count = torch.clamp(n - lo - sinks - config.local_blocks, min=m)  # [nQ] middle candidates
    starts, ends = split_into_groups(lo + sinks, count, m)  # [nQ, m]
    starts, ends = starts.expand(B, Hq, -1, -1), ends.expand(B, Hq, -1, -1)  # [B, Hq, nQ, m]
    largest_group = math.ceil(max(n_kb - sinks - config.local_blocks, m) / m)
    for _ in range(math.ceil(math.log2(largest_group))):  # one pass per level; extra passes are no-ops
        half_starts, half_ends = halves(starts, ends)  # [B, Hq, nQ, 2m]
        scores = score_halves(half_starts, half_ends)  # [B, Hq, nQ, 2m]
        starts, ends = keep_best(half_starts, half_ends, scores, m)  # [B, Hq, nQ, m]
    return BlockMask(assemble(starts, lo, n, sinks, config), config.block_q, config.block_k)


def stream_select(q: torch.Tensor, k: torch.Tensor, config: MaskConfig, *, scale: float | None = None,
                  window: int | None = None) -> BlockMask:
    """STREAM with the torch tile scorer: post-RoPE ``q [B, Hq, T, D]``, ``k [B, Hkv, S, D]`` ->
    :class:`BlockMask` with int32 ``indices [B, Hq, nQ, top_k]``. ``scale`` (default ``D ** -0.5``) is the
    logit scale of the ``"lse"`` score; ``window`` the layer's sliding window (None = global)."""
    check_qk(q, k)
    T, D, S = q.shape[2], q.shape[3], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    n_kb = math.ceil(S / config.block_k)
    q_blocks, q_pos, q_used = query_blocks(q, config, S)  # [B, Hq, nQ, bq, D], [nQ, bq], [nQ, bq]
    k_blocks = key_blocks(k, config.block_k)  # [B, Hkv, nKB, bk, D]
    visible = middle_is_visible(T, S, config, window)

    def score_halves(half_starts: torch.Tensor, half_ends: torch.Tensor) -> torch.Tensor:
        centre = centre_blocks(half_starts, half_ends, n_kb)  # [B, Hq, nQ, 2m]
        return tile_scores(q_blocks, q_pos, q_used, k_blocks, centre, config, scale, window, visible)

    return hierarchical_search(q, k, config, window, score_halves)
