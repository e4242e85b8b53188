"""The estimated mass of every kept block, and a selection cut to a coverage budget with it.

A coverage budget (``MaskConfig.coverage`` = P; the rule is :mod:`sparsetrace.selection.budget`) needs, for
every kept block of a row, an estimate of the share of the model's *whole* attention it holds. The search's
block scores are not that (a max of q.k is a peak, not a mass), and the sparse attention's block masses are
shares of the kept attention only (rows sum to 1 whatever was dropped). The estimate used here combines two
things the trace computes anyway:

- per query t and kept block j, the exact ``lse_tj`` (log-sum-exp of the block's allowed logits; the tiles
  the sparse attention forms), so ``s_tj = exp(lse_tj) / K_t`` with ``K_t = sum_j exp(lse_tj)`` is the exact
  share of the *kept* attention block j gets;
- per query, the audit's estimate ``M_t`` of the mass the whole max-k selection misses (importance sampling
  of the unkept keys, calibrated against the exact audit: ``estimate_missed``, docs/audit.md), so ``1 - M_t``
  is the share of the model's attention that the selection holds.

The estimated mass of block j in the row is ``mass_j = mean_t (1 - M_t) * s_tj`` over the row's real
queries: exact where the selection holds every candidate (``M_t = 0``), and otherwise only as uncertain as
the one number per query the audit already estimates with an interval. Cutting the row to blocks ``C``
leaves the missed mass ``1 - mean_t (1 - M_t) * sum_{j in C} s_tj`` exactly when ``M_t`` is exact, so the
cut row's estimated missed mass (and its interval, through ``M_t``'s) follows from the same numbers without
another sampling pass; the kept mass it implies is what the budget compared with P.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..config import MaskConfig
from ..selection.blocks import BlockMask, candidate_range, forced_sinks
from ..selection.budget import coverage_rows, forced_entries
from .estimate import estimate_missed, kept_block_logsumexp


class Covered(NamedTuple):
    """A selection cut to a coverage budget: ``mask`` (the cut rows at the selection's width),
    ``capped`` bool ``[B, Hq, nQ]`` (rows whose whole selection held less than P by the estimate),
    ``missed`` float32 ``[B, Hq, nQ, 3]`` (estimated missed mass of the cut rows, low, high) and
    ``block_mass`` float32 ``[B, Hq, nQ, W]`` (the estimated mass of every entry of the uncut selection)."""

    mask: BlockMask
    capped: torch.Tensor
    missed: torch.Tensor
    block_mass: torch.Tensor


def row_mean(x: torch.Tensor, T: int, block_q: int) -> torch.Tensor:
    """Mean over each query block's real queries: ``x [B, H, T, ...]`` -> ``[B, H, nQ, ...]``."""
    B, H = x.shape[:2]
    nQ = math.ceil(T / block_q)
    pad = [0, 0] * (x.dim() - 3) + [0, nQ * block_q - T]
    blocks = torch.nn.functional.pad(x, pad).unflatten(2, (nQ, block_q))  # [B, H, nQ, bq, ...]
    counts = torch.clamp(T - torch.arange(nQ, device=x.device) * block_q, max=block_q)  # [nQ]
    return blocks.sum(3) / counts.view(nQ, *[1] * (x.dim() - 3)).to(x.dtype)


def cover(q: torch.Tensor, k: torch.Tensor, mask: BlockMask, config: MaskConfig, *, scale: float | None = None,
          window: int | None = None, samples: int = 64, first_query_block: int = 0,
          max_elements: int = 2**23, pieces: tuple | None = None) -> Covered:
    """Cut ``mask`` (the selection at ``config.width``, e.g. ``select_blocks(q, k, config.search())``) to the
    coverage budget ``config.coverage``: see the module docstring for the estimate.

    Args:
        q: post-RoPE queries ``[B, Hq, T, D]`` (the last T of S positions); k: keys ``[B, Hkv, S, D]``.
        mask: the uncut selection, ``[B, Hq, nQ, W]``.
        config: a :class:`MaskConfig` with a coverage budget (``coverage``, ``min_k``, ``max_k``).
        samples, first_query_block: as :func:`~sparsetrace.audit.estimate.estimate_missed` (the draws
            depend on the absolute query block, so a chunked prefill cuts rows the same at any chunk size).
        max_elements: the largest temporary tile, in floats, of the log-sum-exp pass and of the estimate.
        pieces: the estimate's heavy steps (``sparsetrace.ops.estimate_pieces``; None: torch).
    """
    assert config.coverage is not None, "cover() needs a MaskConfig with a coverage budget"
    search = config.search()
    T, S = q.shape[2], k.shape[2]
    lse = kept_block_logsumexp(q, k, mask.indices, search, scale=scale, window=window,
                               max_elements=max_elements)  # [B, Hq, T, W]
    log_k = lse.logsumexp(-1)  # [B, Hq, T]
    share = torch.exp(lse - log_k[..., None]).nan_to_num_(0.0)  # [B, Hq, T, W]; a query seeing nothing: 0
    missed_q = estimate_missed(q, k, mask.indices, search, scale=scale, window=window, samples=samples,
                               kept_lse=log_k, first_query_block=first_query_block, max_elements=max_elements,
                               per_query=True, pieces=pieces)  # [B, Hq, T, 3]
    held = 1 - missed_q.double()  # [B, Hq, T, 3]: share of the model's attention the selection holds
    block_mass = row_mean(share.double() * held[..., :1], T, config.block_q)  # [B, Hq, nQ, W]

    lo, n = candidate_range(T, S, search, q.device, window)
    forced = forced_entries(mask.indices, lo, n, forced_sinks(search, window), search)
    rows = coverage_rows(mask.indices, block_mass, forced, config.coverage, config.min_k)

    # The cut row's missed mass per query: 1 - (1 - M_t) * (share of the kept attention the cut keeps).
    keep_q = rows.keep.repeat_interleave(config.block_q, dim=2)[:, :, :T]  # [B, Hq, T, W]
    kept_share = (share.double() * keep_q).sum(-1, keepdim=True)  # [B, Hq, T, 1]
    missed = row_mean(1 - kept_share * held, T, config.block_q)  # [B, Hq, nQ, 3]
    return Covered(BlockMask(rows.indices, mask.block_q, mask.block_k), rows.capped, missed.float().clamp_(0, 1),
                   block_mass.float())
