"""SHORTLIST: every candidate pre-scored from pooled keys, the best few rescored exactly.

STREAM (``stream.py``) judges each half of a group by one representative block, so a peak anywhere else in
the half is invisible until the half is chosen: on a haystack it loses the needle that the exact block
top-k (``oracle.py``) keeps at the same k (issue 16). SHORTLIST looks at every candidate, cheaply, and
spends the exact tiles only on the plausible ones. The first stage is the pooled block estimate of
MInference (arXiv 2407.02490) and SpargeAttn (arXiv 2502.18137); the second re-ranks by the contract's
exact block score (shared/DESIGN.md section 1), so a row equals the oracle's whenever the shortlist holds
the oracle's picks.

Same contract as STREAM: forced sinks and locals, the ``n <= top_k`` rule, windows, GQA, ragged T, queries
the last T of S positions. For every query block with more than ``top_k`` causal key blocks, the
``m = top_k - sinks - locals`` middle blocks are chosen among the candidates ``[lo + sinks, n - locals)``:

  1. pool: per key block j the mean ``kbar_j`` and per-dimension variance ``var_j`` of its real keys; per
     query block the sum ``qsum_i`` of its used queries (the mean times a constant of the row: same ranking);
  2. pre-score every candidate: ``qsum_i . kbar_j + z * sqrt(qsum_i^2 . var_j)``, the block's mean logit plus
     z standard deviations (a Gaussian guess at its top logit; one D-dot per block pair, 1/(bq*bk) of the
     oracle's work). z = 3: of 0, 2 and 3 it kept the most oracle picks and needles on SmolLM2;
  3. shortlist the C best by pre-score (ties: the lower block), ``C = min(count, w * max(L, 2))`` with
     ``L = ceil(log2(ceil(count / m)))`` the levels STREAM runs over the same ``count`` candidates and
     ``w = m``: half of STREAM's ``2m * L`` tiles. A row that searches one block (``m = 1``: k 3 with the
     default sink and local) takes ``w = ONE_PICK_WIDTH = 4``, twice STREAM's tiles: its one middle block is
     all the search keeps, so one slip loses the row. On SmolLM2 the shortlist held the oracle's block in
     0.97 of such rows with w = 4, 0.84 with w = m = 1 (bench/RESULTS.md, issue 16);
  4. rescore the shortlist with the exact block score (one ``bq x bk`` tile per block, as the oracle);
  5. keep the m best exact scores (ties: the lower block).

Cost per query block: ``2 * count * D`` multiply-adds for the pre-score plus C tiles (STREAM: ``2m * L``
tiles); the ``[nQ, nKB]`` pre-scores are made a few query blocks at a time, so memory stays bounded. With
``size >= count`` every row is the oracle's. The GPU rescorer (``sparsetrace.kernels.scoring.score_blocks``)
plugs into step 4 through ``rescore``; ``sparsetrace.ops`` chooses.

**The input's last ``EXACT_TAIL`` tokens** (every step of greedy decoding, and the query blocks that hold
the end of a prompt): C is every candidate, so their rows are the oracle's. The pre-pass saves the exact
tiles of ``T^2 / (bq * bk)`` pairs in a prefill; for one query block the exact scores over S keys cost what
its dense attention scores cost, so there is little to save there. And these rows decide what a model
answers: the first answer token is read from the prefill's last row, the others from decode steps, and the
rows just before it hold the question, which reads the haystack for the needle. 64 tokens (two or three
query blocks of 32) hold the end of a RULER question and its chat template; on two NIAH grids 64 answered
at least as many of the oracle's cases as 128 at every k (bench/RESULTS.md, issue 16). ``input_end`` (the
position after the input's last token, set by the tracer) says where the tail is, so a chunk of a chunked
prefill scores exactly only the tail's blocks it holds and a trace does not depend on the chunk size.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..config import MaskConfig
from ..errors import UsageError
from .blocks import (
    BlockMask,
    assemble,
    candidate_range,
    check_qk,
    chunked_tile_scores,
    forced_sinks,
    in_middle,
    key_blocks,
    middle_is_visible,
    query_blocks,
)

Z = 3.0  # step 2's weight of the pooled standard deviation
EXACT_TAIL = 64  # tokens at the end of the input whose query blocks take every candidate (see above)
ONE_PICK_WIDTH = 4  # step 3's candidates per level when a row searches one block (m = 1; see above)


def exact_tail_blocks(T: int, S: int, block_q: int, input_end: int | None = None) -> int:
    """How many of the last query blocks of q (the last T of S positions) hold one of the input's last
    ``EXACT_TAIL`` tokens; ``input_end`` is the position after the input's last token (default S)."""
    first = (S if input_end is None else input_end) - EXACT_TAIL - (S - T)  # first exact position, in q
    if first > T - 1:  # q ends before the tail starts
        return 0
    return math.ceil(T / block_q) - max(0, first // block_q)  # the block holding `first`, and those after it


def pool_keys(k: torch.Tensor, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1, keys: mean and per-dimension variance of the real keys of every block, float32
    ``[B, Hkv, nKB, D]`` each (the ragged last block averages over its real keys only)."""
    S = k.shape[2]
    blocks = key_blocks(k.float() if k.dtype == torch.float64 else k, block_k)  # [B, Hkv, nKB, bk, D], 0 padded
    real = torch.clamp(S - torch.arange(blocks.shape[2], device=k.device) * block_k, max=block_k)
    real = real.float()[:, None]  # [nKB, 1]
    # sums in float32 straight from k's dtype: no float32 copy of a bf16 k, nor of its squares (they were
    # most of this step's time on a GPU at 1M tokens); a float32 k squares directly (vector_norm is 5x slower
    # on the CPU)
    mean = torch.sum(blocks, 3, dtype=torch.float32).div_(real)
    if blocks.dtype == torch.float32:
        sq = blocks.square().sum(3)
    else:
        sq = torch.linalg.vector_norm(blocks, 2, dim=3, dtype=torch.float32).square_()
    var = sq.div_(real).sub_(mean.square()).clamp_(min=0.0)
    return mean, var


def pool_queries(q: torch.Tensor, q_used: torch.Tensor) -> torch.Tensor:
    """Step 1, queries: the sum of the used rows ``q_used [nQ, bq]`` of every query block, float32
    ``[B, Hq, nQ, D]`` (no float32 copy of q is made)."""
    B, H, T, D = q.shape
    nQ, bq = q_used.shape
    blocks = torch.nn.functional.pad(q, (0, 0, 0, nQ * bq - T)).view(B, H, nQ, bq, D)
    return (blocks * q_used[:, :, None].to(q.dtype)).sum(3, dtype=torch.float32)


def pre_scores(q_sum: torch.Tensor, k_mean: torch.Tensor, k_var: torch.Tensor, z: float) -> torch.Tensor:
    """Step 2 for a chunk of query blocks: ``[B, Hq, c, D]`` x ``[B, Hkv, nKB, D]`` -> ``[B, Hq, c, nKB]``.
    GQA without copying keys: the query heads of one kv head are stacked into one matmul."""
    B, Hq, c, D = q_sum.shape
    Hkv, n_kb = k_mean.shape[1], k_mean.shape[2]
    qs = q_sum.reshape(B * Hkv, (Hq // Hkv) * c, D)
    means = k_mean.reshape(B * Hkv, n_kb, D).mT
    if not z:
        return torch.bmm(qs, means).reshape(B, Hq, c, n_kb)  # [B*Hkv, g*c, nKB]
    # in place, and the sum inside the product: each pass over [rows, nKB] is a share of the GPU estimate
    spread = torch.bmm(qs.square(), k_var.reshape(B * Hkv, n_kb, D).mT).clamp_(min=0.0).sqrt_().mul_(z)
    return torch.baddbmm(spread, qs, means).reshape(B, Hq, c, n_kb)


def shortlist_sizes(count: torch.Tensor, m: int, size: int | None = None) -> torch.Tensor:
    """Step 3's C per query block ``[nQ]`` from the middle-candidate counts: ``min(count, w * max(L, 2))``
    with ``w = m``, or ``ONE_PICK_WIDTH`` when ``m = 1``; ``min(count, max(size, m))`` when ``size`` is given."""
    if size is not None:
        return torch.clamp(count, max=max(size, m))
    largest_group = torch.clamp(count, min=1).add(m - 1).div(m, rounding_mode="floor")  # ceil(count / m)
    levels = torch.ceil(torch.log2(largest_group.double())).long().clamp(min=2)
    return torch.minimum(count, (m if m > 1 else ONE_PICK_WIDTH) * levels)


def top_columns(scores: torch.Tensor, width: int) -> torch.Tensor:
    """The ``width`` best columns of every row, best first, ties to the lower column: ``[..., width]``.

    ``torch.topk`` breaks ties arbitrarily, so each float and its column are packed into one int64 key
    (the float's order-preserving bits above, ``n - 1 - column`` below) and the keys are ranked instead.
    On CUDA the floats are ranked directly: the int64 ranking cost 3.3x as much at 1M tokens (150 ms of a
    403 ms layer on an H200, 2026-12-02), and the two differ only where pre-scores tie exactly at the cut,
    which ``bench/gpu_check.py`` allows as it allows the Triton scorer's float32 ties.
    """
    if scores.is_cuda:
        return torch.topk(scores, width, dim=-1).indices
    bits = (scores.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # monotone in the float
    n = scores.shape[-1]
    keys = (ordered << 32) | (n - 1 - torch.arange(n, device=scores.device))
    return n - 1 - (torch.topk(keys, width, dim=-1).values & 0xFFFFFFFF)


def chunk_candidates(q_sum: torch.Tensor, k_mean: torch.Tensor, k_var: torch.Tensor, lo: torch.Tensor,
                     n: torch.Tensor, sinks: int, config: MaskConfig, width: int, z: float, col_lo: int,
                     col_hi: int) -> torch.Tensor:
    """Steps 2-3 for a chunk of query blocks: the ``width`` best middle candidates of each, best first,
    ``[B, Hq, c, width]``.

    Only the columns ``[col_lo, col_hi)`` that hold some row's middle are scored: under causality a chunk
    of the prefill sees at most the key blocks up to its last row, so scoring every key block did about twice
    the work on average (at 1M tokens the pre-score and its ranking were 133 of SHORTLIST's 297 ms on an
    H200). A row keeps at most ``count <= col_hi - col_lo`` of its columns (step 3's C), so when the chunk
    has fewer than ``width`` columns the rest is padding (block ``col_lo``) that step 4 masks out.
    """
    B, Hq, c, _ = q_sum.shape
    cols = col_hi - col_lo
    if cols <= 0:  # no row of the chunk has a middle candidate
        return torch.zeros(B, Hq, c, width, dtype=torch.long, device=q_sum.device)
    ids = torch.arange(col_lo, col_hi, device=q_sum.device)
    scores = pre_scores(q_sum, k_mean[:, :, col_lo:col_hi], k_var[:, :, col_lo:col_hi], z)
    scores.masked_fill_(~in_middle(ids[None, :], lo, n, sinks, config), -math.inf)
    best = top_columns(scores, min(width, cols)) + col_lo
    if cols < width:
        best = torch.cat([best, best.new_full((B, Hq, c, width - cols), col_lo)], dim=-1)
    return best


def keep_best(candidates: torch.Tensor, exact: torch.Tensor, m: int) -> torch.Tensor:
    """Step 5: the m best exact scores among the candidates, ties to the lower block, in block order."""
    by_block = torch.sort(candidates, dim=-1).indices
    candidates, exact = candidates.gather(-1, by_block), exact.gather(-1, by_block)
    best = torch.sort(exact, dim=-1, descending=True, stable=True).indices[..., :m]
    return torch.sort(candidates.gather(-1, best), dim=-1).values


def shortlist_select(q: torch.Tensor, k: torch.Tensor, config: MaskConfig, *, scale: float | None = None,
                     window: int | None = None, rescore: Callable[..., torch.Tensor] | None = None,
                     size: int | None = None, z: float = Z, max_elements: int = 2**26,
                     input_end: int | None = None) -> BlockMask:
    """SHORTLIST on post-RoPE ``q [B, Hq, T, D]``, ``k [B, Hkv, S, D]``: :class:`BlockMask` with int32
    ``indices [B, Hq, nQ, top_k]``.

    ``rescore(q, candidates [B, Hq, nQ, width], sizes [nQ]) -> float32 [B, Hq, nQ, width]`` gives step 4's
    exact scores (default: the torch tile scorer), where only a row's first ``sizes`` entries count;
    ``size`` fixes C (every row's: the input's tail is then not made exact); ``max_elements`` bounds each
    chunk's float32 slab; ``input_end`` (default S: q ends the input) is the position after the input's
    last token, past S for a chunk inside a prefill, so that only the tail's blocks are exact.
    """
    check_qk(q, k)
    if size is not None and (not isinstance(size, int) or size <= 0):
        raise UsageError(f"size={size!r} must be a positive integer (or None for the default C).")
    B, Hq, T, D = q.shape
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    sinks = forced_sinks(config, window)
    m = config.top_k - sinks - config.local_blocks
    lo, n = candidate_range(T, S, config, q.device, window)  # [nQ] each
    nQ, n_kb = lo.shape[0], math.ceil(S / config.block_k)
    count = torch.clamp(n - lo - sinks - config.local_blocks, min=0)  # [nQ] middle candidates
    tail_blocks = 0 if size is not None else exact_tail_blocks(T, S, config.block_q, input_end)
    if tail_blocks == nQ:  # every query block is in the input's tail (a decode step): see above
        size = n_kb
    sizes = shortlist_sizes(count, m, size)  # [nQ]
    width = min(int(sizes.max()), n_kb)
    if width < m:  # no row searches (a searched row has count > m); assemble keeps everything
        selected = torch.zeros(B, Hq, nQ, m, dtype=torch.long, device=q.device)
        return BlockMask(assemble(selected, lo, n, sinks, config), config.block_q, config.block_k)

    if bool((sizes == count).all()):  # every row shortlists all its candidates (a last block): no pre-score
        # a row's middle in order; past its count the ids are padding that step 4 masks out
        candidates = torch.clamp((lo + sinks)[:, None] + torch.arange(width, device=q.device), max=n_kb - 1)
        candidates = candidates.expand(B, Hq, nQ, width)
    else:  # Steps 1-3, a few query blocks at a time: [B, Hq, c, nKB] pre-scores -> the width best blocks.
        _, q_pos, q_used = query_blocks(q[:1, :1, :, :1], config, S)  # [nQ, bq] each: they depend on T, S only
        k_mean, k_var = pool_keys(k, config.block_k)
        q_sum = pool_queries(q, q_used)
        step = max(1, max_elements // (B * Hq * n_kb))
        first, end = (lo + sinks).tolist(), (n - config.local_blocks).tolist()  # middle: [first, end) per row
        candidates = torch.cat([
            chunk_candidates(q_sum[:, :, i:i + step], k_mean, k_var, lo[i:i + step], n[i:i + step], sinks,
                             config, width, z, min(first[i:i + step]), max(end[i:i + step]))
            for i in range(0, nQ, step)
        ], dim=2)  # [B, Hq, nQ, width], best pre-score first

    # Step 4; entries past a row's C, or outside its middle (rows with fewer candidates), never win.
    if rescore is None:
        rescore = _torch_rescorer(k, config, scale, window, max_elements)
    exact = rescore(q, candidates, sizes)
    in_shortlist = torch.arange(width, device=q.device) < sizes[:, None]  # [nQ, width]
    exact = exact.masked_fill(~(in_shortlist & in_middle(candidates, lo, n, sinks, config)), -math.inf)
    selected = keep_best(candidates, exact, m)  # [B, Hq, nQ, m]
    indices = assemble(selected, lo, n, sinks, config)
    if 0 < tail_blocks < nQ:  # the tail's blocks alone (see above), every candidate: the others stay narrow
        tail = shortlist_select(q[:, :, (nQ - tail_blocks) * config.block_q:], k, config, scale=scale, window=window,
                                rescore=rescore, size=n_kb, z=z, max_elements=max_elements)
        indices[:, :, -tail_blocks:] = tail.indices
    return BlockMask(indices, config.block_q, config.block_k)


def _torch_rescorer(k, config: MaskConfig, scale: float, window: int | None, max_elements: int):
    """Step 4 with ``tile_scores`` (the CPU path), chunked over query blocks to bound the logit tiles; only a
    row's first ``sizes`` candidates are scored."""
    S = k.shape[2]
    k_blocks = key_blocks(k, config.block_k)

    def rescore(q: torch.Tensor, candidates: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        q_blocks, q_pos, q_used = query_blocks(q, config, S)  # [B, Hq, nQ, bq, D] float32
        visible = middle_is_visible(q.shape[2], S, config, window)
        return chunked_tile_scores(q_blocks, q_pos, q_used, k_blocks, candidates, config, scale, window, visible,
                                   max_elements=max_elements, sizes=sizes)

    return rescore
