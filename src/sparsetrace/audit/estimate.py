"""An estimate of the missed attention mass of every row, with a confidence interval.

See :func:`estimate_missed` for the estimator (importance sampling of the unkept keys, shared by a row's
queries), the interval and what it does not guarantee.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import NamedTuple

import torch

from ..config import MaskConfig
from ..errors import UsageError
from ..selection.blocks import candidate_range, gather_blocks, kept_blocks, key_blocks, may_attend
from ..selection.shortlist import pool_keys, pool_queries, pre_scores

# --------------------------------------------------------------------------- estimate for every row

PROPOSALS = ("auto", "key", "block")
# "auto" scores every unkept key (proposal "key") up to this many key blocks, then samples blocks first:
# the key proposal's proxy costs O(S) per row, which stops being a small share of the trace past a few
# thousand tokens; the block proposal costs O(S / block_k + (samples + HEAD_BLOCKS) * block_k) per row.
KEY_PROPOSAL_MAX_BLOCKS = 128
# proposal="block", first stage: a block is scored by the pooled estimate of its top logit, mean key plus
# BLOCK_Z standard deviations (SHORTLIST's pre-score), so a block with one heavy key among weak ones is
# drawn; the uniform part of the block mixture is BLOCK_MIX (the block score is a cruder proxy than the
# key-level one). Then PER_BLOCK keys are drawn inside each drawn block.
BLOCK_Z = 2.0
BLOCK_MIX = 0.5
PER_BLOCK = 1
# proposal="block", exact head: the HEAD_BLOCKS unkept blocks of highest pre-score are computed exactly
# (a census stratum, weight 1) and the r draws come from the other unkept blocks (vAttention's
# deterministic top plus sampled tail, arXiv 2510.05688).
HEAD_BLOCKS = 2
# proposal="block", the torch draw inside the drawn blocks: up to this many keys it scores every key with one
# dense product per kv head (O(S * D) a row, but a GEMM) and picks the drawn blocks' scores; past it, it
# gathers the drawn blocks' keys (O(samples * block_k * D) a row, but copies and a product a row, about 3x
# slower per key scored on the CPU). The fused GPU step reads the drawn blocks in place either way.
SCORE_EVERY_KEY_MAX = 65536


def kept_block_logsumexp(q: torch.Tensor, k: torch.Tensor, indices: torch.Tensor, config: MaskConfig, *,
                         scale: float | None = None, window: int | None = None,
                         max_elements: int = 2**24) -> torch.Tensor:
    """The log-sum-exp of every query's scaled logits over the allowed keys of each kept block, float32
    ``[B, Hq, T, top_k]`` (-inf for padding and for a block with no key the query may attend). Its
    log-sum-exp over the last axis is :func:`kept_logsumexp`; ``exp`` of it over ``exp(kept_logsumexp)``
    is the share of the sparse attention each kept block receives, per query (``top_k * block_k`` logits
    a query, about the cost of the attention's ``q @ k`` step)."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    nQ, top_k, bq, bk = indices.shape[2], indices.shape[3], config.block_q, config.block_k
    scale = D**-0.5 if scale is None else scale
    k_blocks = key_blocks(k, bk).float()  # [B, Hkv, nKB, bk, D]
    q_blocks = torch.nn.functional.pad(q, (0, 0, 0, nQ * bq - T)).view(B, Hq, nQ, bq, D).float()
    out = []
    step = max(1, max_elements // max(1, B * Hq * bq * top_k * bk))
    for i0 in range(0, nQ, step):
        i1 = min(i0 + step, nQ)
        ids = indices[:, :, i0:i1].long()  # [B, Hq, c, top_k]
        keys = gather_blocks(k_blocks, ids.clamp(min=0))  # [B, Hq, c, top_k*bk, D]
        logits = torch.matmul(q_blocks[:, :, i0:i1], keys.transpose(-1, -2)) * scale  # [B,Hq,c,bq,top_k*bk]
        k_pos = (ids[..., None] * bk + torch.arange(bk, device=q.device)).flatten(3)  # [B, Hq, c, top_k*bk]
        q_pos = torch.arange(i0 * bq, i1 * bq, device=q.device).view(i1 - i0, bq) + (S - T)  # [c, bq]
        ok = may_attend(k_pos[..., None, :], q_pos[:, :, None], window)
        ok &= (ids >= 0).repeat_interleave(bk, dim=-1)[..., None, :]  # [B, Hq, c, bq, top_k*bk]
        logits = logits.masked_fill(~ok, -math.inf).unflatten(-1, (top_k, bk))  # [B, Hq, c, bq, top_k, bk]
        out.append(logits.logsumexp(-1))  # [B, Hq, c, bq, top_k]
    return torch.cat(out, dim=2).flatten(2, 3)[:, :, :T]


def kept_logsumexp(q: torch.Tensor, k: torch.Tensor, indices: torch.Tensor, config: MaskConfig, *,
                   scale: float | None = None, window: int | None = None,
                   max_elements: int = 2**24) -> torch.Tensor:
    """``log K_t``: the log-sum-exp of every query's scaled logits over its kept, allowed keys, float32
    ``[B, Hq, T]`` (-inf where a query sees no kept key). The sparse attention forms the same logits on
    its way to the softmax (``sparse_attention(..., return_lse=True)``); this recomputes it (``top_k * block_k``
    logits a query, about the cost of the attention's ``q @ k`` step)."""
    return kept_block_logsumexp(q, k, indices, config, scale=scale, window=window,
                                max_elements=max_elements).logsumexp(-1)


def estimate_missed(q: torch.Tensor, k: torch.Tensor, indices: torch.Tensor, config: MaskConfig, *,
                    scale: float | None = None, window: int | None = None, samples: int = 64,
                    level: float = 0.9, mix: float = 0.25, proposal: str = "auto", seed: int = 0,
                    kept_lse: torch.Tensor | None = None, first_query_block: int = 0,
                    max_elements: int = 2**23, per_query: bool = False,
                    pieces: tuple | None = None) -> torch.Tensor:
    """Estimated missed mass of every row, with a confidence interval: float32 ``[B, Hq, nQ, 3]``
    = (estimate, low, high); with ``per_query``, the same for every query, ``[B, Hq, T, 3]`` (the row's
    values are the means of its real queries' ones).

    Estimator. Row i (one query block, one head) has the unkept keys U_i (every key of the causal
    candidate blocks ``[lo, n)`` that the row does not keep). All queries of the row share one sample of
    r = ``samples`` keys j_1..j_r drawn from U_i with probabilities

        w_i(j) = (1 - mix) * softmax_{j in U_i}(scale * qbar_i . k_j) + mix / |U_i|

    (``proposal="key"``, what ``"auto"`` uses up to ``KEY_PROPOSAL_MAX_BLOCKS`` key blocks; qbar_i = mean
    query of the row; the uniform part is the defensive mixture of Hesterberg 1995: no key is drawn with
    probability below mix/|U_i|). The draws are stratified: the s-th draw inverts w_i's CDF (keys in
    position order) at (s + V_s) / r, V_s ~ U(0, 1), so each draw has marginal w_i and the sample is spread
    over positions. For every query t, with ``lambda_t = log K_t`` (:func:`kept_logsumexp`), the Hansen-
    Hurwitz estimate of R_t = U_t / K_t is

        R_t^ = 1/r sum_s y_ts,   y_ts = exp(s_t,j_s - lambda_t) 1[j_s allowed for t] / w_i(j_s),

    unbiased for R_t; its variance is estimated by v_t = sample variance of y_t. / r (the
    with-replacement formula; stratification lowers the true variance, so this errs wide).

    Interval. R_t in [max(0, R^ - z sqrt(v)), R^ + z sqrt(v)], z the normal quantile of ``level``
    (two-sided), is mapped through the increasing M = R / (1 + R); the row's estimate and bounds are the
    means over its real queries of the per-query ones. Averaging bounds is conservative against the
    joint (the sd of a mean is at most the mean of the sds).

    Guaranteed: exact (zero width) where the unkept keys fit in r slots (``|unkept blocks| * block_k <=
    r``; the sample is then the whole set), with ``proposal="block"`` also where the exact head holds
    every unkept block (below), and 0 where nothing is unkept. Not guaranteed: the interval
    is a CLT interval; a heavy key the proxy ranks low and the sample misses is invisible to it. Measured
    (bench/audit_calibration.py, 4k tokens, block 32, r = 64, level 0.9): the interval holds the exact
    missed mass on 97-99 % of audited rows for SmolLM2-135M and 95-99 % for Gemma 3 270M, k = 4..32,
    stream and oracle selections; uniform sampling of U_i gave 63-91 %. M^ = f(R^) with f concave is
    biased low by Jensen's inequality (slightly, at r = 64).

    Cost per row ``~ S * D`` for the proxy (a ``[nQ, D] x [D, S]`` product, 1/block_q of a dense pass)
    plus ``r * block_q * D`` for the sample; the proxy's O(S) pass is ~70 % of it.

    ``proposal="block"`` scales to long inputs: an exact head plus a sampled tail (the stratification of
    vAttention, arXiv 2510.05688). Every unkept block b is scored by ``scale * (qbar_i . kbar_b + BLOCK_Z *
    sqrt(qbar_i^2 . var_b))`` (kbar_b, var_b the mean and per-dimension variance of the block's keys:
    SHORTLIST's pooled estimate of the block's top logit, :func:`~sparsetrace.selection.shortlist.pre_scores`).
    The ``HEAD_BLOCKS`` = 2 best-scored unkept blocks (the head) are summed exactly, every key for every
    query (weight 1). From the other unkept blocks (the tail) r blocks are drawn, stratified as above, by
    the softmax of the score mixed with ``BLOCK_MIX`` = 0.5 uniform, and ``PER_BLOCK`` = 1 key inside each
    by the key-level rule within the block (two-stage sampling). R_t^ = the head's sum + the tail's
    Hansen-Hurwitz estimate is unbiased (the head is a fixed function of q and k, the tail the disjoint
    rest); the interval's variance is the tail's, estimated from its r unit estimates, so it is also exact
    (zero width) where the head holds every unkept block. Cost per row ``O(n_blocks * D)`` for the scores,
    ``r * block_k * D`` for scoring the drawn blocks' keys and ``(HEAD_BLOCKS * block_k + r) * block_q * D``
    for the logits, instead of ``O(S * D)``.

    Why (measured on real Q/K, stream rows, r = 64, level 0.9; bench/RESULTS.md, issue 15): the block
    proposal's misses are low (the exact value above ``high``): unkept mass sits in a block the score ranks
    low, one heavy key among weak ones, and no drawn block holds it, so neither the estimate nor the
    spread of the sample sees it. With 16 drawn blocks of 4 keys and no head (the previous rule) coverage
    was 0.94 for Gemma 3 270M at 4k tokens, k = 4 (proposal forced), and 0.88 for SmolLM2-135M at 16k and
    32k tokens, k = 4..16. What raised it: more units (64 blocks of 1 key: 0.97 for Gemma; 0.89-0.93
    for SmolLM2 at 16k and 32k), and the exact head on top of it: 0.98 for Gemma, 0.97-0.98 for SmolLM2 at
    4k (proposal forced), 0.92-0.93 at 16k and 0.91-0.93 at 32k (k = 4..16), with half the median error
    and half the interval width of the previous rule; at 1.75x (16k) to 2.3x (32k) its CPU time inside a
    real trace (+7 % / +21 % of the audited trace's CPU time on loaded cores; over the 25 % overhead
    budget at 32k). A better block score
    (the row's query spread in the pooled variance, or the max over 4 sub-block mean queries) did not help;
    drawing the key inside a block uniformly instead of by ``qbar . k`` fell to 0.7. Not guaranteed: past
    the head, a heavy key in a block the score ranks low can still be missed.

    Args:
        q: ``[B, Hq, T, D]``; k: ``[B, Hkv, S, D]``; indices: kept blocks ``[B, Hq, nQ, top_k]``.
        samples: r, keys drawn per row (shared by the row's queries); level: two-sided confidence.
        mix: weight of the uniform part of the key-level proposal, in (0, 1] (the block proposal's first
            stage mixes ``BLOCK_MIX``).
        seed: the draws of a row depend on it and on the row's (batch, head, absolute query block) only,
            so a chunked prefill draws the same keys whatever its chunk size.
        first_query_block: the absolute index of q's first query block (chunked prefill).
        kept_lse: ``log K_t`` ``[B, Hq, T]`` if the attention has it; recomputed otherwise.
        pieces: ``(draw_blocks, sample_rows, keys_in_blocks)`` (:class:`Pieces`; None or a None step: torch);
            ``sparsetrace.ops.estimate_pieces`` gives the fused GPU ones.
    """
    if proposal not in PROPOSALS:
        raise UsageError(f"proposal={proposal!r} is not one of {PROPOSALS}.")
    if samples < 2 * (PER_BLOCK if proposal != "key" else 1) or (proposal != "key" and samples % PER_BLOCK) \
            or not 0 < level < 1 or not 0 < mix <= 1:
        raise UsageError(f"need samples >= 2 (a multiple of PER_BLOCK = {PER_BLOCK} for proposal='block'), "
                         f"0 < level < 1, 0 < mix <= 1; got samples={samples}, level={level}, mix={mix}.")
    B, Hq, T, D = q.shape
    S = k.shape[2]
    bq, bk, r = config.block_q, config.block_k, samples
    if proposal == "auto":
        proposal = "key" if math.ceil(S / bk) <= KEY_PROPOSAL_MAX_BLOCKS else "block"
    nQ, n_kb = math.ceil(T / bq), math.ceil(S / bk)
    scale = D**-0.5 if scale is None else scale
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    if kept_lse is None:
        kept_lse = kept_logsumexp(q, k, indices, config, scale=scale, window=window)
    lam = torch.nn.functional.pad(kept_lse.float(), (0, nQ * bq - T)).view(B, Hq, nQ, bq)
    real = torch.arange(nQ * bq, device=q.device).view(nQ, bq) < T  # [nQ, bq]
    q_mean = pool_queries(q, real) / real.sum(1)[:, None].clamp(min=1)  # [B, Hq, nQ, D] float32
    # Keys stay in their dtype: the sample's gathers read them once and convert only what they took (a
    # float32 copy of every key, then of every drawn block, was a fifth of the estimate's GPU time at 1M).
    # Contiguous once: the gathers of every slab would otherwise copy all of k (a model's k is usually a
    # transposed view).
    k = k.contiguous()
    k_blocks = key_blocks(k, bk)  # [B, Hkv, nKB, bk, D], contiguous
    if proposal == "block":
        # mean and per-dimension variance of every block's keys, [B, Hkv, nKB, D] each; the pre-scores in the
        # keys' dtype (bf16 on a GPU: the products over [rows, nKB] were a fifth of the estimate at 1M tokens)
        pooled = [x.to(k.dtype) for x in pool_keys(k, bk)] if k.dtype == torch.bfloat16 else pool_keys(k, bk)
    lo, n = candidate_range(T, S, config, q.device, window)  # [nQ] each
    j = torch.arange(n_kb, device=q.device)
    # One random stream per row: (seed, batch, head, absolute query block) -> counter-based uniforms.
    row_ids = (torch.arange(B, device=q.device)[:, None, None] * Hq + torch.arange(Hq, device=q.device)[:, None]
               ) * (1 << 32) + first_query_block + torch.arange(nQ, device=q.device)  # [B, Hq, nQ]
    row_ids = row_ids * 1_000_003 + seed

    out = torch.empty(B, Hq, nQ, bq if per_query else 1, 3, device=q.device)
    m = 1 if proposal == "key" else PER_BLOCK  # draws per sampled unit (the block, for "block")
    head_blocks = 0 if proposal == "key" else min(HEAD_BLOCKS, n_kb)
    # the exact head's columns, padded with weight-0 ones to a power of two >= 16 (what the fused step takes)
    h = 0 if head_blocks == 0 else max(16, 1 << (head_blocks * bk - 1).bit_length())
    need = min(-(-r // bk), n_kb)  # a census never needs more than the first ceil(r / bk) unkept blocks
    steps = Pieces(*(pieces or ()))
    draw_blocks = steps.draw_blocks or draw_blocks_torch
    keys_in_blocks = steps.keys_in_blocks or keys_in_blocks_torch
    sample_rows = steps.sample_rows or sample_rows_torch
    # a slab's largest temporary, per row
    if proposal == "key" or (not steps.keys_in_blocks and n_kb * bk <= SCORE_EVERY_KEY_MAX):
        per_row = n_kb * bk  # the key proxy, or every key's score
    elif steps.keys_in_blocks:
        per_row = n_kb  # the block scores (the fused step reads the drawn blocks in place)
    else:
        per_row = (r // m + head_blocks) * bk * D  # the drawn blocks' keys
    step = max(1, max_elements // max(1, B * Hq * max(per_row, bq * (h + r))))
    for i0 in range(0, nQ, step):
        sl = slice(i0, min(i0 + step, nQ))
        if proposal == "key":
            candidate = (j >= lo[sl, None]) & (j < n[sl, None])  # [c, nKB]
            unkept = candidate & ~kept_blocks(indices[:, :, sl], n_kb)  # [B, Hq, c, nKB]
            count, first = _unkept_census(unkept, need)
            pos, prob = _draw_keys(q_mean[:, :, sl], k_blocks, unkept, S, scale, mix, r, row_ids[:, :, sl])
            weight = 1.0 / (r * prob)
        else:
            proxy = pre_scores((q_mean[:, :, sl] * scale).to(pooled[0].dtype), *pooled, BLOCK_Z)  # [B, Hq, c, nKB]
            if not steps.draw_blocks:  # the torch draw's softmax and CDF want float32 scores
                proxy = proxy.float()
            # the head, and the tail's blocks drawn by the pooled top-logit score; then keys inside them
            blk, p_block, count, first, head_blk = draw_blocks(proxy, lo[sl], n[sl], indices[:, :, sl],
                                                               _strata(row_ids[:, :, sl], r // m), BLOCK_MIX,
                                                               need, head_blocks)
            inner_rows = (row_ids[:, :, sl, None] * 1024 + torch.arange(r // m, device=q.device)) * 7 + 1
            pos, prob = keys_in_blocks(q_mean[:, :, sl], k_blocks, blk, p_block, S, scale, mix,
                                       _strata(inner_rows, m))  # [B, Hq, c, r] each
            # weight 0 where the head holds every unkept block (the tail is empty; prob is then 0/0)
            in_head = head_blk >= 0
            weight = (1.0 / (r * prob)).masked_fill_((count == in_head.sum(-1))[..., None], 0.0)
        pos, weight, exact = _census(pos, weight, count, first, r, bk, n_kb)
        if h:  # the head's keys first (weight 1, 0 for padding; summed by the census where it is exact)
            head_pos, head_weight = _head_keys(head_blk, bk, S, h)
            pos = torch.cat([head_pos, pos], -1)  # [B, Hq, c, h + r]
            weight = torch.cat([head_weight.masked_fill_(exact[..., None], 0.0), weight], -1)
        out[:, :, sl] = sample_rows(q, k, pos, weight, exact, lam[:, :, sl], sl.start, scale, window, z, m,
                                    per_query, h)
    return out.flatten(2, 3)[:, :, :T] if per_query else out[:, :, :, 0]


def sample_rows_torch(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor,
                      exact: torch.Tensor, lam: torch.Tensor, first: int, scale: float, window: int | None,
                      z: float, m: int, per_query: bool, head: int = 0) -> torch.Tensor:
    """The estimate's sample step for the slab of c query blocks from ``first``: every query's Hansen-Hurwitz
    estimate of ``R_t`` from the drawn keys, its sd from the r/m units, and the missed mass with its interval
    (:func:`estimate_missed`). ``pos``, ``weight`` (float64, ``1 / (r p)`` or a census's 1/0)
    ``[B, Hq, c, head + r]``: the first ``head`` columns are keys summed exactly (weight 1 or 0), outside the
    units and the sd;
    ``exact [B, Hq, c]``; ``lam`` = ``log K_t`` ``[B, Hq, c, bq]``. Returns float32 ``[B, Hq, c, bq or 1, 3]``
    (per query, or the means over each row's real queries). ``kernels.estimate.sample_rows`` is the same
    step fused on the GPU."""
    B, Hq, T, D = q.shape
    S, c, r, bq = k.shape[2], pos.shape[2], pos.shape[3] - head, lam.shape[-1]
    t = torch.arange(first * bq, (first + c) * bq, device=q.device).view(c, bq)
    real, q_pos = t < T, t + (S - T)  # [c, bq] each
    q_rows = q[:, :, first * bq:(first + c) * bq]
    q_rows = torch.nn.functional.pad(q_rows, (0, 0, 0, c * bq - q_rows.shape[2]))  # [B, Hq, c * bq, D]
    q_rows = q_rows.reshape(-1, bq, D).float() * scale  # [B * Hq * c, bq, D]
    keys = _gather_keys(k, pos).flatten(0, 2)  # [B * Hq * c, head + r, D] float32
    # scale * q . k - lambda_t in one batched product; then in place (the CPU step is memory-bound)
    logits = torch.baddbmm(-lam.reshape(-1, bq, 1).float(), q_rows, keys.mT).view(B, Hq, c, bq, -1)
    ok = may_attend(pos[..., None, :], q_pos[:, :, None], window) & real[:, :, None]
    # y_ts / r; exp is capped at e^60 (an unkept key e^60 times the kept mass means M = 1 anyway)
    terms = logits.clamp_(max=60).masked_fill_(~ok, -math.inf).exp_()
    terms.mul_(weight.float()[..., None, :])  # [B, Hq, c, bq, head + r]
    tail = terms[..., head:]
    R_tail = tail.sum(-1)  # [B, Hq, c, bq]: the sampled part
    R = terms[..., :head].sum(-1) + R_tail if head else R_tail
    n_units = r // m
    # [B, Hq, c, bq, r/m]: unit estimates / n_units
    units = tail if m == 1 else tail.unflatten(-1, (n_units, m)).sum(-1)
    rel = units * (n_units / R_tail.clamp(min=torch.finfo(R.dtype).tiny))[..., None]  # relative deviations + 1
    sd = R_tail * (rel.sub_(1).square_().sum(-1) / (n_units * (n_units - 1))).sqrt()  # sd of R^, relative form
    sd = torch.where(exact[..., None] | (R_tail == 0), 0.0, sd)
    no_kept = torch.isinf(lam)  # such a query's missed mass is 1
    out = torch.empty(B, Hq, c, bq if per_query else 1, 3, device=q.device)
    for slot, value in enumerate((R, (R - z * sd).clamp(min=0), R + z * sd)):
        missed = torch.where(no_kept, 1.0, 1 / (1 + 1 / value))  # M = R / (1 + R), also at R = 0, inf
        if per_query:
            out[..., slot] = missed.float()
        else:
            out[..., 0, slot] = ((missed * real).sum(-1) / real.sum(-1).clamp(min=1)).float()
    return out


def counter_uniform(keys: torch.Tensor) -> torch.Tensor:
    """float64 uniforms in [0, 1) from int64 ``keys`` (SplitMix64's finaliser): the same key gives the same
    number on any device and in any batch, which makes the draws independent of how rows are chunked."""
    z = keys * -7046029254386353131  # 0x9E3779B97F4A7C15, wrapping int64 arithmetic
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * -7723592293110705685  # 0x94D049BB133111EB
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    return ((z >> 11) & ((1 << 53) - 1)).double() / 2.0**53


def _strata(keys: torch.Tensor, r: int) -> torch.Tensor:
    """r stratified points in [0, 1), ascending: the s-th is ``(s + V_s) / r``, ``V_s`` the counter uniform of
    ``(keys [...], s)``; float64 ``[..., r]``."""
    slot = torch.arange(r, device=keys.device)
    return (slot + counter_uniform(keys[..., None] * 1024 + slot)) / r


def _inverse_cdf(w: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws from the weights ``w [..., N]`` (float64, not normalised) at the points ``u [..., r]`` of
    :func:`_strata`: the CDF inverted at each. Returns indices ``[..., r]`` and their probabilities
    ``w / sum(w)``."""
    cdf = w.cumsum(-1)
    total = cdf[..., -1:]
    u = torch.minimum(u * total, total * (1 - 1e-12))  # never past the last positive weight
    idx = torch.searchsorted(cdf, u, right=True).clamp(max=w.shape[-1] - 1)
    return idx, w.gather(-1, idx) / total


def _proxy_dtype(keys: torch.Tensor) -> torch.dtype:
    """The dtype the proposals' ``q̄ · k`` scores are computed in: the keys' own, except float32 on the CPU,
    which is scored in bf16. The scores only shape the draw (a draw's weight is its probability under the
    same scores, so the estimate stays unbiased); their product writes a value per key and row and is
    memory-bound on the CPU, where bf16 halves it (2 cores, SmolLM2 shapes, 32k keys: 12 against 32 ms)."""
    return torch.bfloat16 if keys.dtype == torch.float32 and keys.device.type == "cpu" else keys.dtype


def _mixture(scores: torch.Tensor, support: torch.Tensor, mix: float) -> torch.Tensor:
    """``(1 - mix) * softmax(scores over support) + mix * uniform(support)`` over the last two dims (key
    blocks x keys, or 1 x keys), 0 off support. Overwrites ``scores`` (in-place passes: this runs on
    ``[.., S]`` per row)."""
    off = ~support
    scores.masked_fill_(off, -math.inf)
    top = scores.amax(dim=(-2, -1), keepdim=True).clamp_(min=torch.finfo(scores.dtype).min)
    e = scores.sub_(top).exp_()  # 0 off support
    e.mul_((1 - mix) / e.sum(dim=(-2, -1), keepdim=True).clamp_(min=1e-30))
    count = support.sum(dim=(-2, -1), keepdim=True).clamp_(min=1)
    return e.add_(mix / count).masked_fill_(off, 0.0)


def _draw_keys(q_mean, k_blocks, unkept, S, scale, mix, r, rows):
    """proposal="key": every unkept key scored by ``qbar . k``; ``(positions, probabilities) [B,Hq,c,r]``."""
    B, Hkv, n_kb, bk, D = k_blocks.shape
    Hq, c = q_mean.shape[1], q_mean.shape[2]
    dtype = _proxy_dtype(k_blocks)
    q_scaled = (q_mean * scale).reshape(B, Hkv, Hq // Hkv * c, D).to(dtype)
    proxy = torch.matmul(q_scaled, k_blocks.view(B, Hkv, n_kb * bk, D).to(dtype).mT).view(B, Hq, c, n_kb, bk)
    proxy = proxy.float()
    in_range = (torch.arange(n_kb * bk, device=proxy.device) < S).view(n_kb, bk)
    support = unkept[..., None] & in_range  # [B, Hq, c, nKB, bk]
    return _inverse_cdf(_mixture(proxy, support, mix).flatten(-2).double(), _strata(rows, r))


def draw_blocks_torch(scores: torch.Tensor, lo: torch.Tensor, n: torch.Tensor, indices: torch.Tensor,
                      u: torch.Tensor, mix: float, need: int, head: int = 0):
    """The block proposal's first stage: each row's exact head, its ``head`` unkept candidate blocks of highest
    score, and blocks drawn from ``(1 - mix) * softmax(scores) + mix * uniform`` over the other unkept
    candidate blocks (the tail), at the points ``u`` (:func:`_strata`).

    Args: scores float32 ``[B, H, c, nKB]`` (overwritten); lo, n ``[c]`` candidate ranges; indices kept blocks
    ``[B, H, c, width]`` (-1 padded); u float64 ``[B, H, c, m]``; need: how many of the first unkept blocks to
    return; head: the exact head's size.
    Returns ``(blocks, prob)`` ``[B, H, c, m]`` (the tail's draws), :func:`_unkept_census`'s ``(count, first)``
    of every unkept block (head and tail), and the head ``[B, H, c, head]`` (-1 where a row has fewer unkept
    blocks). ``kernels.estimate.block_draw`` is the same in one fused pass pair on the GPU."""
    j = torch.arange(scores.shape[-1], device=scores.device)
    unkept = (j >= lo[:, None]) & (j < n[:, None]) & ~kept_blocks(indices, scores.shape[-1])
    scores.masked_fill_(~unkept, -math.inf)
    top, head_blocks = torch.topk(scores, head, dim=-1)
    in_head = torch.isfinite(top)  # fewer than `head` unkept blocks: the rest is padding
    tail = unkept.scatter(-1, head_blocks, ~in_head & unkept.gather(-1, head_blocks))
    blk, p_block = _inverse_cdf(_mixture(scores[..., None, :], tail[..., None, :], mix).flatten(-2).double(), u)
    return (blk, p_block, *_unkept_census(unkept, need), head_blocks.masked_fill(~in_head, -1))


def keys_in_blocks_torch(q_mean: torch.Tensor, k_blocks: torch.Tensor, blk: torch.Tensor, p_block: torch.Tensor,
                         S: int, scale: float, mix: float, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block proposal's second stage: keys inside each drawn block ``blk [B, Hq, c, units]`` by ``qbar . k``
    mixed with ``mix`` uniform, at the stratified points ``u [B, Hq, c, units, m]`` (two-stage sampling; draws
    ``[.., b*m : (b+1)*m]`` share block b). Returns positions and probabilities ``[B, Hq, c, units * m]``;
    ``kernels.estimate.keys_in_blocks`` is the same step fused on the GPU."""
    B, Hkv, n_kb, bk, D = k_blocks.shape
    Hq, c, units = q_mean.shape[1], q_mean.shape[2], blk.shape[-1]
    k_blocks = k_blocks.to(_proxy_dtype(k_blocks))
    q_key = q_mean.to(k_blocks.dtype)
    if n_kb * bk <= SCORE_EVERY_KEY_MAX:  # one dense product a kv head, then the drawn blocks' scores
        every = torch.matmul(q_key.reshape(B, Hkv, Hq // Hkv * c, D), k_blocks.view(B, Hkv, n_kb * bk, D).mT)
        inner = every.view(B, Hq, c, n_kb, bk).gather(3, blk[..., None].expand(-1, -1, -1, -1, bk))
    else:  # the drawn blocks' keys gathered, one [1, D] x [D, units * bk] product a row
        keys = gather_blocks(k_blocks, blk)  # [B, Hq, c, units * bk, D]
        inner = torch.matmul(q_key[..., None, :], keys.mT).view(B, Hq, c, units, bk)
    inner = inner.float() * scale
    inside = (blk[..., None] * bk + torch.arange(bk, device=blk.device)) < S  # [B, Hq, c, units, bk]
    w_key = _mixture(inner[..., None, :], inside[..., None, :], mix).flatten(-2).double()
    offset, p_key = _inverse_cdf(w_key, u)  # [B, Hq, c, units, m]
    pos = blk[..., None] * bk + offset
    return pos.flatten(-2), (p_block[..., None] * p_key).flatten(-2)


def _head_keys(head_blk, bk: int, S: int, width: int):
    """Positions and weights (float64: 1, or 0 for padding and keys past S) of the keys of the head's blocks
    ``head_blk [B, Hq, c, head]`` (-1: none), ``[B, Hq, c, width]``, zero-weight columns past ``head * bk``.
    A position past S stays as it is: the sample step reads key S - 1 there and no query may attend it."""
    pos = (head_blk.clamp(min=0)[..., None] * bk + torch.arange(bk, device=head_blk.device)).flatten(-2)
    weight = (((head_blk >= 0)[..., None] & (pos.view(*head_blk.shape, bk) < S)).flatten(-2)).double()
    pad = width - pos.shape[-1]
    return torch.nn.functional.pad(pos, (0, pad)), torch.nn.functional.pad(weight, (0, pad))


def _unkept_census(unkept: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
    """How many blocks each row leaves unkept, ``[B, Hq, c]``, and its first ``need`` unkept blocks, ascending
    (``nKB`` past the last), ``[B, Hq, c, need]``: all a census needs."""
    n_kb = unkept.shape[-1]
    # A topk, not a sort of every row, which took 27 of 62 ms of the estimate's GPU time at 1M tokens (H200).
    candidates = torch.where(unkept, torch.arange(n_kb, device=unkept.device), n_kb)
    first = torch.topk(candidates, need, dim=-1, largest=False, sorted=True).values
    return unkept.sum(-1), first


def _census(pos, weight, count, first, r: int, bk: int, n_kb: int):
    """Rows whose unkept blocks fit in r slots take every unkept key once (weight 1, exact); rows with
    nothing unkept get weight 0 (``count``, ``first``: :func:`_unkept_census`). Returns ``(pos, weight)
    [B, Hq, c, r]`` and ``exact [B, Hq, c]``."""
    exact = count * bk <= r
    slot = torch.arange(r, device=pos.device)
    need = first.shape[-1]
    blk = first.gather(-1, (slot // bk).clamp(max=need - 1).expand(*first.shape[:-1], r))  # [B, Hq, c, r]
    all_pos = blk.clamp(max=n_kb - 1) * bk + slot % bk
    pos = torch.where(exact[..., None], all_pos, pos)
    weight = torch.where(exact[..., None], (blk < n_kb).double(), weight)
    return pos, weight.masked_fill(count[..., None] == 0, 0.0), exact


def _gather_keys(k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Keys ``k [B, Hkv, S, D]`` at token positions ``pos [B, Hq, c, r]`` (GQA: head h reads kv head
    ``h // (Hq // Hkv)``): float32 ``[B, Hq, c, r, D]``. A census position past S (the last block's
    padding) reads key S - 1; no query may attend it, so its term is 0 whatever it reads."""
    B, Hkv, S, D = k.shape
    Hq = pos.shape[1]
    kv_head = torch.arange(Hq, device=pos.device) // (Hq // Hkv)
    base = (torch.arange(B, device=pos.device)[:, None] * Hkv + kv_head) * S  # [B, Hq]
    flat = (base[:, :, None, None] + pos.clamp(max=S - 1)).flatten()
    return k.reshape(B * Hkv * S, D).index_select(0, flat).view(*pos.shape, D).float()


class Pieces(NamedTuple):
    """The estimate's heavy steps, None for the torch one (:func:`draw_blocks_torch`,
    :func:`sample_rows_torch`, :func:`keys_in_blocks_torch`); ``sparsetrace.ops.estimate_pieces`` gives the
    fused GPU ones."""

    draw_blocks: Callable | None = None
    sample_rows: Callable | None = None
    keys_in_blocks: Callable | None = None
