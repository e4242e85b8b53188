"""Triton pieces shared by the GPU kernels: which tile sizes they take, and loading/scoring one tile.

Both kernels (the STREAM scorer in ``scoring.py`` and the block-mass pass in ``flex.py``) read a block of
queries once and then one ``block_q x block_k`` logit tile per key block; these helpers are that step.
"""

import torch  # noqa: F401  (triton needs torch initialised first)
import triton
import triton.language as tl


def triton_supported(block_q: int, block_k: int, head_dim: int) -> str | None:
    """None if the Triton kernels take these sizes, else the reason (the caller falls back to torch)."""
    BQ, BK = triton.next_power_of_2(block_q), triton.next_power_of_2(block_k)
    if min(BQ, BK) < 16:
        return f"block_q={block_q} and block_k={block_k} must be at least 16 (tensor-core tiles)"
    if BQ * BK > 128 * 128 or max(BQ, BK) > 256:
        return f"a {BQ}x{BK} score tile does not fit in registers (at most 128x128)"
    if head_dim not in (16, 32, 64, 128, 256):
        return f"head_dim={head_dim} must be a power of two in [16, 256]"
    return None



@triton.jit
def program_row(pid, Hq, Hkv, nQ):
    """(batch, query head, query block) of program ``pid``. Order: the query heads of one kv head fastest,
    then query blocks, so programs running together read the same key blocks (GQA groups share them)."""
    group = Hq // Hkv
    hh = pid % group
    i = (pid // group) % nQ
    bg = pid // (group * nQ)
    b = bg // Hkv
    h = (bg % Hkv) * group + hh
    return b, h, i


@triton.jit
def load_query_tile(Q, q_base, t, row_ok, d, stride_t, stride_d):
    """[BQ, D] queries of one block (rows past the block or past T read 0)."""
    ptrs = Q + q_base + t[:, None] * stride_t + d[None, :] * stride_d
    return tl.load(ptrs, mask=row_ok[:, None], other=0.0)



@triton.jit
def logit_tile(q, K, k_base, j, live, cols, d, stride_s, stride_d, S, BLOCK_K: tl.constexpr,
                IEEE: tl.constexpr):
    """``q . k^T`` of key block j: [BQ, BK] float32, the absolute key positions [BK] and which of them
    exist (inside the block and S; none unless ``live``)."""
    k_pos = j * BLOCK_K + cols
    col_ok = (cols < BLOCK_K) & (k_pos < S) & (k_pos >= 0) & live
    ptrs = K + k_base + k_pos[None, :].to(tl.int64) * stride_s + d[:, None] * stride_d
    kt = tl.load(ptrs, mask=col_ok[None, :], other=0.0)  # [D, BK]
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    return s, k_pos, col_ok



@triton.jit
def reduce_tile(s, allowed, scale, LSE: tl.constexpr):
    """Block score of one tile: max of the allowed logits, or log-sum-exp of the scaled ones."""
    if LSE:
        x = tl.where(allowed, s * scale, float("-inf"))
        top = tl.max(tl.max(x, axis=1), axis=0)
        total = tl.sum(tl.sum(tl.exp(x - top), axis=1), axis=0)
        value = tl.where(top == float("-inf"), float("-inf"), top + tl.log(total))
    else:
        value = tl.max(tl.max(tl.where(allowed, s, float("-inf")), axis=1), axis=0)
    return value
