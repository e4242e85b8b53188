"""The exact audit of sampled rows: what a trace's selection really missed, and how much of the exact block
top-k it kept.

Missed mass of a row (layer, head, query block i; shared/DESIGN.md section 1b) is the mean over the
block's real queries t of ``M_t = 1 - sum_{kept keys j} p_tj``, p_t the model's softmax over every
causal key of t (only keys ``j > t - window`` on sliding-window layers). :func:`audit_rows` computes it
exactly for a few query blocks by a dense pass over every causal key of those queries only (chunked
over key blocks with running log-sum-exps, never a ``[T, S]`` tensor), together with the oracle's row
(the exact block top-k, the same row ``oracle_mask`` gives) and the recall of the kept selection
against it. :func:`audit_query_blocks` chooses the rows: seeded, stratified over positions, the same
for every head of a layer.

Why a count of rows per layer, not a fraction: an audited row costs ``~ S * block_q * D`` per head and
the rows sit at mean position T/2, so N rows cost ``~ N * block_q * T / 2`` against a trace that costs
about linearly in T: the same share of the trace's time at every length. A fixed fraction would cost
``~ T^2`` and its share would grow with T.
"""

from __future__ import annotations

import math

import torch

from ..config import MaskConfig
from ..selection.blocks import candidate_range, forced_sinks, in_middle, kept_blocks, key_blocks, may_attend
from ..selection.oracle import top_middle

# --------------------------------------------------------------------------- which rows to audit

AUDIT_ROWS_PER_LAYER = 32  # default audited query blocks per layer: +1 to +6 % of a CPU trace (see above)


def droppable_query_blocks(T: int, S: int, config: MaskConfig, window: int | None = None) -> torch.Tensor:
    """bool ``[nQ]``: query blocks whose causal candidates ``[lo, n)`` outnumber ``top_k``, i.e. the rows
    where a selection must leave blocks out. Elsewhere every block is kept and the missed mass is 0."""
    lo, n = candidate_range(T, S, config, "cpu", window)  # [nQ] each
    return n - lo > config.top_k


def audit_query_blocks(num_query_blocks: int, count: int, *, seed: int = 0, layer: int = 0,
                       first: int = 0) -> torch.Tensor:
    """A seeded, position-stratified sample of ``count`` query blocks from ``[first, num_query_blocks)``.

    The range is cut into ``count`` contiguous strata of (nearly) equal size and one block is drawn
    uniformly in each, so every part of the sequence is audited at the same rate. The draw depends only
    on ``(seed, layer)``: every head (and batch entry) of a layer audits the same rows, and a rerun audits
    the same rows again. Pass ``first`` = the first droppable block (:func:`droppable_query_blocks`) so no
    audit is spent on rows that keep everything. ``count >= `` the range size audits every block.
    Returns int64 ``[min(count, num_query_blocks - first)]``, ascending.
    """
    available = num_query_blocks - first
    if available <= 0 or count <= 0:
        return torch.zeros(0, dtype=torch.long)
    if count >= available:
        return torch.arange(first, num_query_blocks)
    g = torch.Generator().manual_seed(seed * 1_000_003 + layer)
    edges = first + torch.arange(count + 1) * available // count  # [count+1], strictly increasing
    width = edges[1:] - edges[:-1]  # [count], >= 1
    return edges[:-1] + (torch.rand(count, generator=g) * width).long().clamp(max=width - 1)


# --------------------------------------------------------------------------- exact audit

def _gather_query_blocks(q: torch.Tensor, rows: torch.Tensor, block_q: int) -> torch.Tensor:
    """Queries of the chosen query blocks, ``[B, Hq, r, bq, D]`` (padding rows are zeros)."""
    B, Hq, T, D = q.shape
    nQ = math.ceil(T / block_q)
    q_pad = torch.nn.functional.pad(q, (0, 0, 0, nQ * block_q - T))
    return q_pad.view(B, Hq, nQ, block_q, D).index_select(2, rows)  # [B, Hq, r, bq, D]


def scan_torch(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, kept: torch.Tensor, config: MaskConfig,
               scale: float, window: int | None = None, *, max_elements: int = 2**24):
    """The dense pass of :func:`audit_rows` for the query blocks ``rows [r]`` of q (any device): one pass
    over the keys in chunks of whole key blocks, ``logits [B, Hq, r, bq, chunk]`` reduced at once to
    per-key-block log-sum-exps and block scores; nothing of size ``[T, S]`` is kept.

    Returns ``lse_all, lse_kept [B, Hq, r, bq]`` (each query's log-sum-exp of its scaled logits over all
    allowed keys / the allowed keys of the blocks ``kept [B, Hq, r, nKB]``; -inf where none) and the block
    scores ``[B, Hq, r, nKB]`` (-inf where nothing is allowed), float64 for float64 inputs, else float32.
    ``sparsetrace.kernels.audit.audit_scan`` is the same pass fused on the GPU."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    bq, bk, g = config.block_q, config.block_k, Hq // Hkv
    r, n_kb = rows.numel(), math.ceil(S / bk)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32

    q_rows = _gather_query_blocks(q, rows, bq).to(compute).reshape(B, Hkv, g * r * bq, D)
    k_blocks = key_blocks(k, bk).to(compute)  # [B, Hkv, nKB, bk, D]
    t = rows[:, None] * bq + torch.arange(bq, device=q.device)  # [r, bq] query index in q
    real = t < T  # [r, bq]
    q_pos = t + (S - T)  # [r, bq] absolute positions

    lse_all = torch.full((B, Hq, r, bq), -math.inf, dtype=compute, device=q.device)
    lse_kept = lse_all.clone()
    scores = []
    step = max(1, max_elements // max(1, B * Hq * r * bq * bk))  # key blocks per chunk
    for j0 in range(0, n_kb, step):
        j1 = min(j0 + step, n_kb)
        keys = k_blocks[:, :, j0:j1].reshape(B, Hkv, (j1 - j0) * bk, D)
        raw = torch.matmul(q_rows, keys.transpose(-1, -2))  # [B, Hkv, g*r*bq, w*bk]
        raw = raw.view(B, Hq, r, bq, j1 - j0, bk)  # [B, Hq, r, bq, w, bk]
        k_pos = torch.arange(j0 * bk, j1 * bk, device=q.device).view(j1 - j0, bk)  # [w, bk]
        ok = may_attend(k_pos, q_pos[:, :, None, None], window) & real[:, :, None, None]  # [r, bq, w, bk]
        if not ok.all():  # most chunks lie wholly before the rows' queries: nothing to mask there
            raw.masked_fill_(~ok, -math.inf)
        # In place, a handful of passes over the logits (the CPU pass is memory-bound): block maxima, then
        # exp(scale * (raw - m)) with m each query's maximum over the chunk, summed per block. A block far
        # below m (e^-87 in float32) sums to 0 and its log-sum-exp to -inf: nothing against the chunk's total.
        block_max = raw.amax(-1)  # [B, Hq, r, bq, w]
        m = block_max.amax(-1, keepdim=True).clamp(min=torch.finfo(raw.dtype).min)  # [B, Hq, r, bq, 1]
        per_block = raw.sub_(m[..., None]).mul_(scale).exp_().sum(-1).log_().add_(m * scale)  # [B,Hq,r,bq,w]
        lse_all = torch.logaddexp(lse_all, per_block.logsumexp(-1))
        chunk_kept = kept[:, :, :, None, j0:j1]  # [B, Hq, r, 1, w]
        lse_kept = torch.logaddexp(lse_kept, per_block.masked_fill(~chunk_kept, -math.inf).logsumexp(-1))
        if config.score == "max":
            scores.append(block_max.amax(dim=3))  # [B, Hq, r, w]
        else:
            scores.append(per_block.logsumexp(3))
    return lse_all, lse_kept, torch.cat(scores, dim=-1)


def audit_rows(q: torch.Tensor, k: torch.Tensor, indices: torch.Tensor, query_blocks, config: MaskConfig, *,
               scale: float | None = None, window: int | None = None, max_elements: int = 2**24,
               return_oracle: bool = False, scan=None):
    """Exact missed mass and recall of the kept selection for the query blocks ``query_blocks``.

    Args:
        q: post-RoPE queries ``[B, Hq, T, D]`` (the last T of S positions); k: keys ``[B, Hkv, S, D]``
            (GQA: head h reads kv head ``h // (Hq // Hkv)``).
        indices: the kept key blocks of every query block, int ``[B, Hq, nQ, top_k]`` (a BlockMask's).
        query_blocks: the r query blocks to audit (ints in ``[0, nQ)``), the same for every head.
        config: the selection's contract (block sizes, top_k, forced blocks, score), for the oracle row.
        scale: logit scale (default ``D ** -0.5``); window: sliding window of the layer (None = global).
        max_elements: bound on the logit tile of one key chunk (floats), which bounds memory.
        return_oracle: also return the oracle's rows ``[B, Hq, r, top_k]`` int32.
        scan: the dense pass, ``scan(q, k, rows, kept, config, scale, window)`` with :func:`scan_torch`'s
            contract (default: :func:`scan_torch`; ``sparsetrace.ops.audit_scanner`` gives the GPU one).

    Returns:
        ``missed [B, Hq, r]`` float32: mean over the block's real queries of ``1 - sum_kept p``, with p
        the softmax over every allowed key (causal, inside ``window``); kept keys are the allowed keys
        of the kept blocks, as :func:`sparsetrace.sparse_attention` attends them.
        ``recall [B, Hq, r]`` float32: ``|kept & O| / |O|`` with O the oracle's *searched* blocks (its row
        minus the forced sinks and locals). Forced blocks are left out because every contract-abiding
        selection keeps them, so counting them only pulls recall towards 1 by construction (this is
        also bench/recall.py's "recall (searched blocks)"). NaN where the search does not run (the row
        keeps every candidate, O is empty). O has as many blocks as the row kept middle blocks: ``m`` under
        a fixed ``top_k``, fewer in a row cut to a coverage budget (then O is the exact top of that size).
    """
    T, S = q.shape[2], k.shape[2]
    top_k = config.top_k
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    rows = torch.as_tensor(query_blocks, dtype=torch.long, device=q.device).flatten()
    n_kb = math.ceil(S / config.block_k)
    kept = kept_blocks(indices.index_select(2, rows), n_kb)  # [B, Hq, r, nKB]
    if scan is None:
        lse_all, lse_kept, scores = scan_torch(q, k, rows, kept, config, scale, window, max_elements=max_elements)
    else:
        lse_all, lse_kept, scores = scan(q, k, rows, kept, config, scale, window)

    real = rows[:, None] * config.block_q + torch.arange(config.block_q, device=q.device) < T  # [r, bq]
    missed_q = -torch.expm1(lse_kept - lse_all)  # [B, Hq, r, bq]; no kept key -> 1
    missed_q = torch.where(real, missed_q, 0.0)
    missed = missed_q.sum(-1) / real.sum(-1).clamp(min=1)  # [B, Hq, r]

    scores = scores.float()  # [B, Hq, r, nKB]
    oracle = top_middle(scores, T, S, config, window, rows)  # [B, Hq, r, top_k]
    lo, n = (x.index_select(0, rows) for x in candidate_range(T, S, config, q.device, window))
    sinks = forced_sinks(config, window)
    middle = in_middle(torch.arange(n_kb, device=q.device)[None, :], lo, n, sinks, config)  # [r, nKB]
    # O: the exact top-c middle blocks (top_middle's order: score descending, ties to the lower block), c the
    # row's own count of kept middle blocks (m under a fixed top_k, so O is then the oracle's searched blocks).
    order = torch.sort(scores.masked_fill(~middle, -math.inf), dim=-1, descending=True, stable=True).indices
    picks = (kept & middle).sum(-1) * (n - lo > top_k)  # [B, Hq, r]; 0 where the search does not run
    in_o = torch.arange(n_kb, device=q.device) < picks[..., None]  # [B, Hq, r, nKB] in the sorted order
    hits = (kept.gather(-1, order) & in_o).sum(-1)
    recall = torch.where(picks > 0, hits / picks.clamp(min=1), math.nan)
    out = (missed.float(), recall.float())
    return (*out, oracle) if return_oracle else out


