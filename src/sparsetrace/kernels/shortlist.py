"""SHORTLIST's pre-pass on the GPU: every candidate pre-scored and the best ``width`` kept, in one kernel.

The torch pre-pass (``selection.shortlist.preselect``, steps 2-3) writes the ``[nQ, nKB]`` pre-scores of
a chunk of query blocks and ranks them with ``torch.topk``: at 1M tokens and block 64 that is about 50 ms
of matmuls and elementwise passes over slabs of 6 GB and 28 ms of ranking on an H200, and it does not
shrink with k. Here the slab never exists. One program per (batch, query head, ``QB`` query blocks) walks
the key blocks its rows can see, ``CP`` at a time:

  1. two tensor-core products give every pre-score of the tile, ``qsum . kbar + z * sqrt(qsum^2 . var)``
     (3xTF32 on float32 operands: float32 accuracy, ~1e-6 relative, like the reference up to summation
     order);
  2. each score and its column are packed into one int64 key, the float's order-preserving bits above and
     ``nKB - 1 - column`` below, so ranking keys ranks scores with ties to the lower column (the CPU's
     ``top_columns`` rule); columns outside a row's middle get the smallest key;
  3. the tile's keys are sorted ascending and merged into the row's running best ``CP`` (sorted
     descending): the element-wise maximum of a descending and an ascending sequence is the best ``CP`` of
     both (a bitonic sequence), which one more sort puts in order.

The output equals the torch pre-pass's up to float32 ties at the cut: same scores, same ranking rule.
Rows get their best ``width`` middle columns, best first; entries past a row's candidate count are padding
(its first middle block, or 0) that the rescoring masks out.
"""

import torch
import triton
import triton.language as tl

MAX_WIDTH = 256  # widest shortlist a program keeps in registers (k 16 at 1M tokens and block 64 needs 154)
TILE_ELEMENTS = 2048  # QB * CP: the running best and a tile's keys, int64, per program
NUM_WARPS = 4
NUM_STAGES = 1


@triton.jit
def _preselect_kernel(
    QS, KM, KV, FIRST, END, OUT,
    nQ, n_kb, Hq, Hkv, width, z,
    QB: tl.constexpr, CP: tl.constexpr, D: tl.constexpr, DK: tl.constexpr, SPREAD: tl.constexpr,
):
    bh = tl.program_id(1)
    b, h = bh // Hq, bh % Hq
    kv_head = b * Hkv + h // (Hq // Hkv)
    rows = tl.program_id(0) * QB + tl.arange(0, QB)
    row_ok = rows < nQ
    first = tl.load(FIRST + rows, mask=row_ok, other=0)
    end = tl.load(END + rows, mask=row_ok, other=0)  # a row's middle: [first, end); empty past nQ
    col_lo = tl.min(tl.where(end > first, first, n_kb), axis=0)  # the columns some row of the program searches
    col_hi = tl.max(tl.where(end > first, end, 0), axis=0)

    q_rows = QS + (bh.to(tl.int64) * nQ + rows.to(tl.int64)) * D  # [QB] row starts
    k_base = kv_head.to(tl.int64) * n_kb * D
    c = tl.arange(0, CP)
    dk = tl.arange(0, DK)
    lowest = tl.full([QB, CP], -9223372036854775808, tl.int64)
    best = lowest  # each row's best CP keys so far, descending
    for c0 in range(col_lo, col_hi, CP):
        cols = c0 + c
        col_ok = cols < col_hi
        k_cols = KM + k_base + cols.to(tl.int64)[None, :] * D
        v_cols = KV + k_base + cols.to(tl.int64)[None, :] * D
        mean = tl.zeros([QB, CP], tl.float32)
        spread = tl.zeros([QB, CP], tl.float32)
        for d0 in tl.static_range(0, D, DK):
            qs = tl.load(q_rows[:, None] + d0 + dk[None, :], mask=row_ok[:, None], other=0.0)  # [QB, DK]
            km = tl.load(k_cols + d0 + dk[:, None], mask=col_ok[None, :], other=0.0)  # [DK, CP]
            mean += tl.dot(qs, km, input_precision="tf32x3")
            if SPREAD:
                kv = tl.load(v_cols + d0 + dk[:, None], mask=col_ok[None, :], other=0.0)
                spread += tl.dot(qs * qs, kv, input_precision="tf32x3")
        score = mean
        if SPREAD:
            score = tl.sqrt(tl.maximum(spread, 0.0)) * z + mean
        score = tl.where(score == 0.0, 0.0, score)  # -0.0 ranks as +0.0
        bits = score.to(tl.int32, bitcast=True)
        ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)  # monotone in the float
        key = (ordered << 32) | (n_kb - 1 - cols).to(tl.int64)[None, :]
        live = (cols[None, :] >= first[:, None]) & (cols[None, :] < end[:, None])
        key = tl.where(live, key, lowest)
        best = tl.maximum(best, tl.sort(key, dim=1, descending=False))  # the best CP of both, bitonic
        best = tl.sort(best, dim=1, descending=True)

    pad = tl.where(end > first, first, 0)
    col = tl.where(best == lowest, pad[:, None], n_kb - 1 - (best & 0xFFFFFFFF))
    out = OUT + (bh.to(tl.int64) * nQ + rows.to(tl.int64))[:, None] * width + c[None, :]
    tl.store(out, col, mask=row_ok[:, None] & (c[None, :] < width))


def preselect(q_sum: torch.Tensor, k_mean: torch.Tensor, k_var: torch.Tensor, first: torch.Tensor,
              end: torch.Tensor, width: int, z: float) -> torch.Tensor:
    """Steps 2-3 of SHORTLIST for every query block: the ``width`` best middle columns of each row by
    pre-score, best first, int64 ``[B, Hq, nQ, width]``.

    ``q_sum [B, Hq, nQ, D]``, ``k_mean`` and ``k_var [B, Hkv, nKB, D]`` float32 (step 1); a row's middle
    candidates are the key blocks ``[first, end)`` (``[nQ]`` each). ``width <= MAX_WIDTH``.
    """
    B, Hq, nQ, D = q_sum.shape
    Hkv, n_kb = k_mean.shape[1], k_mean.shape[2]
    assert width <= MAX_WIDTH, f"width {width} > {MAX_WIDTH}: use the torch pre-pass"
    CP = max(16, triton.next_power_of_2(width))
    QB = max(16, TILE_ELEMENTS // CP)
    out = torch.empty(B, Hq, nQ, width, dtype=torch.long, device=q_sum.device)
    grid = (triton.cdiv(nQ, QB), B * Hq)

    _preselect_kernel[grid](
        q_sum.contiguous(), k_mean.contiguous(), k_var.contiguous(), first.to(torch.int32).contiguous(),
        end.to(torch.int32).contiguous(), out, nQ, n_kb, Hq, Hkv, width, float(z),
        QB=QB, CP=CP, D=D, DK=min(32, D), SPREAD=bool(z), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out
