"""The exact audit's dense pass on the GPU: one fused scan over every causal key of the audited rows.

``audit.exact.audit_rows`` needs, for each audited query block, three things from a pass over all of its
causal keys: every query's log-sum-exp over all allowed keys, the same over the kept keys only, and the
block score of every key block (for the oracle's row). In torch that pass materialises the logits of the
audited queries against all keys, about eight float32 passes over ``r * block_q * S`` values per head: at
1M tokens it took half a second a layer on an H200, +74 % of the trace (2026-12-02). ``_audit_scan_kernel``
keeps each ``block_q x block_k`` logit tile in registers and reduces it at once, as the STREAM scorer does.

Work is split over key blocks as well as rows (``SPLIT`` key blocks a program) so a few audited rows still
fill the GPU; each program keeps per-query running maxima and sums over its split (one online softmax
pass: the kept sum shares the running maximum of the all-keys sum, so it never overflows), and torch
merges the splits. Scores are the contract's block score, exactly as ``kernels.scoring`` reduces a tile.
"""

import math

import torch
import triton
import triton.language as tl

from ..config import MaskConfig
from .tiles import load_query_tile, logit_tile, reduce_tile

SPLIT = 32  # key blocks per program


@triton.jit
def _audit_scan_kernel(
    Q, K, ROWS, KEPT, SCORES, MAX, SUM_ALL, SUM_KEPT,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd,
    T, S, n_kb, r, Hq, Hkv, window, scale,
    SPLIT: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    D: tl.constexpr, LSE: tl.constexpr, IEEE: tl.constexpr, WINDOW: tl.constexpr,
):
    x = tl.program_id(0) % r  # audited row
    bh = tl.program_id(0) // r
    h = bh % Hq
    b = bh // Hq
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    i = tl.load(ROWS + x)  # query block in q

    rows = tl.arange(0, BQ)
    t = i * BLOCK_Q + rows
    row_ok = (rows < BLOCK_Q) & (t < T)
    q_pos = t + (S - T)
    last = tl.minimum(T - 1, i * BLOCK_Q + BLOCK_Q - 1) + (S - T)
    n = last // BLOCK_K + 1  # causal key blocks of the row
    lo = 0
    if WINDOW:  # the first key block the row's first query still reaches
        lo = tl.maximum(i * BLOCK_Q + (S - T) - window + 1, 0) // BLOCK_K
    j0 = tl.maximum(split * SPLIT, lo)
    j1 = tl.minimum(split * SPLIT + SPLIT, n)

    d = tl.arange(0, D)
    q = load_query_tile(Q, b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, t.to(tl.int64), row_ok, d, sqt, sqd)
    k_base = b.to(tl.int64) * skb + (h // (Hq // Hkv)).to(tl.int64) * skh
    cols = tl.arange(0, BK)
    row_id = (bh * r + x).to(tl.int64)
    top = tl.full([BQ], float("-inf"), tl.float32)  # running max of each query's scaled logits
    total = tl.zeros([BQ], tl.float32)  # sum of exp(logit - top) over all allowed keys
    kept_total = tl.zeros([BQ], tl.float32)  # the same over the kept blocks' keys
    for j in range(j0, j1):
        s, k_pos, col_ok = logit_tile(q, K, k_base, j, True, cols, d, sks, skd, S, BLOCK_K, IEEE)
        allowed = row_ok[:, None] & col_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        tl.store(SCORES + row_id * n_kb + j, reduce_tile(s, allowed, scale, LSE))
        logits = tl.where(allowed, s * scale, float("-inf"))
        new_top = tl.maximum(top, tl.max(logits, axis=1))
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)  # a query with nothing allowed yet
        rescale = tl.exp(top - safe)
        block_sum = tl.sum(tl.exp(logits - safe[:, None]), axis=1)
        kept = tl.load(KEPT + row_id * n_kb + j).to(tl.float32)
        total = total * rescale + block_sum
        kept_total = kept_total * rescale + kept * block_sum
        top = new_top
    out = (row_id * n_splits + split) * BQ + rows
    tl.store(MAX + out, top)
    tl.store(SUM_ALL + out, total)
    tl.store(SUM_KEPT + out, kept_total)


def audit_scan(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, kept: torch.Tensor, config: MaskConfig,
               scale: float, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dense pass of the exact audit for the query blocks ``rows`` (Triton).

    Args:
        q: ``[B, Hq, T, D]``, k: ``[B, Hkv, S, D]`` (bf16, fp16 or fp32, CUDA, same dtype).
        rows: int64 ``[r]`` query blocks of q to audit; kept: bool ``[B, Hq, r, nKB]``, the blocks each row keeps.
        window: sliding window of the layer (keys ``> query - window``), None for a global layer.
    Returns:
        ``lse_all, lse_kept`` float32 ``[B, Hq, r, bq]`` (natural-log log-sum-exp of each query's scaled logits
        over all allowed keys / over the allowed keys of kept blocks; -inf where none) and ``scores`` float32
        ``[B, Hq, r, nKB]``, the block score of every causal key block (-inf elsewhere), as
        ``audit.exact.scan_torch`` returns them.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    bq, bk = config.block_q, config.block_k
    r, n_kb = rows.numel(), math.ceil(S / bk)
    BQ, BK = triton.next_power_of_2(bq), triton.next_power_of_2(bk)
    n_splits = math.ceil(n_kb / SPLIT)
    scores = torch.full((B, Hq, r, n_kb), -math.inf, dtype=torch.float32, device=q.device)
    partial = torch.empty(3, B * Hq * r, n_splits, BQ, dtype=torch.float32, device=q.device)
    big = BQ * BK * D >= 64 * 64 * 128
    _audit_scan_kernel[(B * Hq * r, n_splits)](
        q, k, rows.to(device=q.device, dtype=torch.int64).contiguous(), kept.to(torch.int8).contiguous(),
        scores, partial[0], partial[1], partial[2],
        *q.stride(), *k.stride(),
        T, S, n_kb, r, Hq, Hkv, window or 0, float(scale),
        SPLIT=SPLIT, BLOCK_Q=bq, BLOCK_K=bk, BQ=BQ, BK=BK, D=D, LSE=config.score == "lse",
        IEEE=q.dtype == torch.float32, WINDOW=window is not None, num_warps=8 if big else 4, num_stages=2,
    )
    top, total, kept_total = partial.view(3, B, Hq, r, n_splits, BQ)[..., :bq].unbind(0)
    overall = top.amax(3, keepdim=True)  # [B, Hq, r, 1, bq]
    shift = torch.where(torch.isinf(overall), 0.0, overall)
    weight = torch.exp(top - shift)  # 0 for splits that saw nothing
    lse_all = (total * weight).sum(3).log() + shift[:, :, :, 0]
    lse_kept = (kept_total * weight).sum(3).log() + shift[:, :, :, 0]
    return lse_all, lse_kept, scores
