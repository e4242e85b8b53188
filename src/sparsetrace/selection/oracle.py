"""The oracle: STREAM's contract with the search replaced by the exact block top-k.

For every query block: the same forced sinks and local blocks as STREAM, plus the ``m`` middle candidates
with the highest exact block score (ties: the lower block index). O(T * S): the reference for tests, audits
and small inputs. :func:`block_scores` computes the score of every (query block, key block) pair a few query
blocks at a time, so memory stays bounded.
"""

from __future__ import annotations

import math

import torch

from ..config import MaskConfig
from .blocks import (
    BlockMask,
    assemble,
    candidate_range,
    check_qk,
    chunked_tile_scores,
    forced_sinks,
    in_middle,
    key_blocks,
    query_blocks,
)


def block_scores(q: torch.Tensor, k: torch.Tensor, config: MaskConfig, *, scale: float | None = None,
                 window: int | None = None, max_elements: int = 2**25) -> torch.Tensor:
    """Exact block score of every (query block, key block): ``[B, Hq, nQ, nKB]`` float32 (-inf = not causal).

    Computed a few query blocks at a time so the logit tile stays under ``max_elements`` floats.
    """
    check_qk(q, k)
    B, Hq, T, D = q.shape
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    q_blocks, q_pos, q_used = query_blocks(q, config, S)  # [B, Hq, nQ, bq, D]
    k_blocks = key_blocks(k, config.block_k)  # [B, Hkv, nKB, bk, D]
    nQ, n_kb = q_blocks.shape[2], k_blocks.shape[2]
    every_block = torch.arange(n_kb, device=q.device).expand(B, Hq, nQ, -1)  # [B, Hq, nQ, nKB], a view
    return chunked_tile_scores(q_blocks, q_pos, q_used, k_blocks, every_block, config, scale, window,
                               max_elements=max_elements)


def top_middle(scores: torch.Tensor, T: int, S: int, config: MaskConfig, window: int | None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """The exact contract row from block ``scores [B, Hq, nQ, nKB]``: forced blocks plus the top-m middle
    candidates, int32 ``[B, Hq, nQ, top_k]`` (sorted, -1 padded). With ``rows`` (query-block ids), the
    scores are those rows' only, ``[B, Hq, len(rows), nKB]``."""
    sinks = forced_sinks(config, window)
    lo, n = candidate_range(T, S, config, scores.device, window)  # [nQ] each
    if rows is not None:
        lo, n = lo.index_select(0, rows), n.index_select(0, rows)
    middle = in_middle(torch.arange(scores.shape[-1], device=scores.device)[None, :], lo, n, sinks, config)
    scores = scores.masked_fill(~middle, -math.inf)
    m = config.top_k - sinks - config.local_blocks
    if scores.shape[-1] < m:  # every row keeps everything; give assemble a well-shaped dummy
        selected = torch.zeros(*scores.shape[:-1], m, dtype=torch.long, device=scores.device)
    else:
        selected = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :m]
        selected = torch.sort(selected, dim=-1).values  # [B, Hq, nQ, m]
    return assemble(selected, lo, n, sinks, config)


def oracle_select(q: torch.Tensor, k: torch.Tensor, config: MaskConfig, *, scale: float | None = None,
                  window: int | None = None) -> BlockMask:
    """The exact contract on post-RoPE ``q [B, Hq, T, D]``, ``k [B, Hkv, S, D]`` (any device)."""
    scores = block_scores(q, k, config, scale=scale, window=window)  # [B, Hq, nQ, nKB]
    indices = top_middle(scores, q.shape[2], k.shape[2], config, window)
    return BlockMask(indices, config.block_q, config.block_k)
