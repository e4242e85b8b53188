"""STREAM on the GPU: a fused Triton scorer for the halves of every level, with the search kept in torch.

The hot loop of STREAM (``selection.stream``) is the tile score (``selection.blocks.tile_scores``): per query
block, gather the 2m representative key blocks and reduce the ``block_q x (2m * block_k)`` logit tile by max
(or log-sum-exp). In torch that tile is materialised (``[B, Hq, nQ, bq, 2m * bk]`` float32 per level: 44 GB at
1M tokens, 12 heads, blocks of 64). ``_score_halves_kernel`` keeps it in registers: one program per (batch,
head, query block) loads its query tile once and loops over the 2m halves, one ``q . k^T`` tile per half.
Everything else (groups, halves, keeping the m best, assembling sinks and locals) is
``selection.stream.hierarchical_search`` unchanged (``sparsetrace.ops`` plugs :func:`score_halves` into it),
so the GPU path can only differ from the CPU path in the scores themselves.

Two shortcuts that cannot change the result:
- an empty half (the right half of a one-block group) scores -inf without a tile, as ``keep_best`` does;
- a row whose halves hold at most m non-empty ones keeps exactly those whatever their scores, so its tiles
  are skipped (every non-empty half is causal, so its real score is finite and beats the empty ones).

Exactness: bf16/fp16 inputs go through tensor-core dots with float32 accumulation (bf16 products are exact
in float32, so this is the float32 reference up to summation order); float32 inputs use IEEE float32 dots
(no TF32), so indices match the CPU path up to ties of float32 scores.
"""

import math

import torch
import triton
import triton.language as tl

from ..config import MaskConfig
from ..selection.blocks import centre_blocks, chunked_tile_scores, key_blocks, query_blocks
from .tiles import load_query_tile, logit_tile, program_row, reduce_tile, triton_supported

SPREAD_QUERY_BLOCKS = 8  # score_blocks: up to this many query blocks, each alone (the 128-token tail at block 16)


def scorer_launch(block_q: int, block_k: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Launch settings of the scorer (override by reassigning ``scoring.scorer_launch``).

    The tile shape itself is fixed by the mask (``block_q x block_k``, padded to powers of two); only the
    warps per program and the software-pipelining depth are free. 16-bit defaults are the fastest of
    ``bench/gpu.py --sweep-launch`` at 1M tokens (64x64 tiles: 4 warps, 3 stages; 128x64: 4 warps, 1 stage;
    figures in bench/RESULTS.md); float32 (IEEE dots, tests only) keeps 8 warps.
    """
    if dtype == torch.float32:
        return {"num_warps": 8, "num_stages": 2}
    small = triton.next_power_of_2(block_q) * triton.next_power_of_2(block_k) <= 64 * 64
    return {"num_warps": 4, "num_stages": 3 if small else 1}


@triton.jit
def _score_halves_kernel(
    Q, K, HS, HE, OUT,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd,
    T, S, n_kb, nQ, Hq, Hkv, query_stride, window, scale,
    SKIP_UP_TO: tl.constexpr, R: tl.constexpr, RP: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
    D: tl.constexpr, LSE: tl.constexpr, IEEE: tl.constexpr, WINDOW: tl.constexpr,
):
    # At the first level every head of a GQA group has the same halves: program_row runs them together.
    b, h, i = program_row(tl.program_id(0), Hq, Hkv, nQ)
    group = Hq // Hkv
    row = ((b * Hq + h) * nQ + i).to(tl.int64) * R  # halves are contiguous [B, Hq, nQ, R]

    r = tl.arange(0, RP)
    hs = tl.load(HS + row + r, mask=r < R, other=0)
    he = tl.load(HE + row + r, mask=r < R, other=0)
    nonempty = (he > hs) & (r < R)
    # A row with at most m non-empty halves keeps all of them whatever they score (SKIP_UP_TO = m
    # without a window, where every non-empty half scores finite; -1, never, with one).
    if tl.sum(nonempty.to(tl.int32), axis=0) <= SKIP_UP_TO:
        tl.store(OUT + row + r, tl.where(nonempty, 0.0, float("-inf")), mask=r < R)
    else:
        rows = tl.arange(0, BQ)
        t = i * BLOCK_Q + rows
        row_ok = (rows < BLOCK_Q) & (t < T)
        last_row = tl.minimum(T - 1 - i * BLOCK_Q, BLOCK_Q - 1)
        used = (row_ok & (rows % query_stride == 0)) | (rows == last_row)
        q_pos = t + (S - T)
        d = tl.arange(0, D)
        q = load_query_tile(Q, b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, t.to(tl.int64), row_ok,
                             d, sqt, sqd)
        k_base = b.to(tl.int64) * skb + (h // group).to(tl.int64) * skh
        cols = tl.arange(0, BK)
        centre = tl.minimum(tl.maximum((hs + he - 1) // 2, 0), n_kb - 1)  # [RP] representatives
        scores = tl.full([RP], float("-inf"), tl.float32)
        for x in range(R):  # straight-line body, so the key-tile loads pipeline across halves
            pick = r == x
            j = tl.sum(tl.where(pick, centre, 0), axis=0)
            live = tl.sum(tl.where(pick & nonempty, 1, 0), axis=0) > 0  # empty halves load nothing
            s, k_pos, col_ok = logit_tile(q, K, k_base, j, live, cols, d, sks, skd, S, BLOCK_K, IEEE)
            allowed = used[:, None] & col_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
            if WINDOW:  # transformers' sliding window: key > query - window
                allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
            scores = tl.where(pick, reduce_tile(s, allowed, scale, LSE), scores)
        tl.store(OUT + row + r, tl.where(nonempty, scores, float("-inf")), mask=r < R)


def score_halves(q, k, half_starts, half_ends, config: MaskConfig, scale: float,
                 window: int | None = None) -> torch.Tensor:
    """Score every half by its representative block with the Triton kernel.

    Args:
        q: ``[B, Hq, T, D]`` (bf16, fp16 or fp32, CUDA); k: ``[B, Hkv, S, D]``, same dtype.
        half_starts, half_ends: int64 ``[B, Hq, nQ, 2m]``, the block ranges ``[start, end)`` of the halves.
        window: sliding window of the layer (keys ``> query - window``), None for a global layer.
    Returns:
        float32 ``[B, Hq, nQ, 2m]``: the block score of each half's centre block (-inf for empty halves;
        0 for the non-empty halves of rows where all of them survive anyway).
    """
    m = half_starts.shape[-1] // 2
    return _launch(q, k, half_starts, half_ends, config, scale, window, m if window is None else -1)


def score_blocks(q, k, block_ids, config: MaskConfig, scale: float, window: int | None = None, *,
                 sizes: torch.Tensor | None = None, columns: int = 32) -> torch.Tensor:
    """The exact score of the given key blocks ``block_ids [B, Hq, nQ, W]`` (in range) of every query block:
    float32 ``[B, Hq, nQ, W]``, SHORTLIST's rescoring (``selection.shortlist``).

    Block b is the one-block half ``[b, b + 1)`` of the halves kernel (its centre is b), without the
    keep-all shortcut (every block needs its score). ``columns`` blocks per program, so one compiled kernel
    serves every W (the last columns are padded with the first).

    The kernel runs one program per (batch, head, query block). A few query blocks (SHORTLIST's exact tail
    of the input, every candidate of each) would leave the GPU nearly idle and take W / columns launches in
    a row (41 ms for one block at 1M tokens on an H200, 2026-12-03), so there each query block's columns
    are spread over the batch axis instead: stride-0 views of q and k, one program per (column group,
    head), one launch per query block.

    ``sizes [nQ]`` (optional): only a row's first ``sizes[i]`` columns are needed. A launch of columns
    ``[c, c + columns)`` then starts at the first query block that needs one of them (the rows are the last
    of q, so a suffix of q is still the last queries of S) and the rows before it score -inf: in a prefill
    early rows have fewer candidates, so SHORTLIST's last columns serve only the later rows.
    """
    B, Hq, nQ, W = block_ids.shape
    pad = (-W) % columns
    ids = torch.cat([block_ids, block_ids[..., :1].expand(B, Hq, nQ, pad)], dim=-1) if pad else block_ids
    if nQ <= SPREAD_QUERY_BLOCKS:
        T, S = q.shape[2], k.shape[2]
        groups = ids.shape[-1] // columns
        out = []
        for i in range(nQ):  # block i is the last block of q over the keys it can see: a prefix of k
            seen = S - T + min((i + 1) * config.block_q, T)
            q_i, k_i = q[:, :, i * config.block_q:(i + 1) * config.block_q], k[:, :, :seen]
            ids_i = ids[:, :, i].clamp(max=math.ceil(seen / config.block_k) - 1)  # padding ids stay in range
            for b in range(B):  # a batch of one in practice; more would need k repeated per group
                spread = ids_i[b].reshape(Hq, groups, columns).transpose(0, 1)[:, :, None]  # [groups, Hq, 1, c]
                scores = _launch(q_i[b:b + 1].expand(groups, -1, -1, -1), k_i[b:b + 1].expand(groups, -1, -1, -1),
                                 spread, spread + 1, config, scale, window, -1)  # [groups, Hq, 1, c]
                out.append(scores[:, :, 0].transpose(0, 1).reshape(1, Hq, 1, groups * columns))
        return torch.cat(out).view(nQ, B, Hq, 1, -1)[:, :, :, 0].permute(1, 2, 0, 3)[..., :W]
    starts = [0] * math.ceil(W / columns)
    if sizes is not None:  # the first row whose size exceeds each launch's first column (nQ if none)
        starts = torch.searchsorted(torch.cummax(sizes, 0).values,
                                    torch.arange(0, W, columns, device=sizes.device), right=True).tolist()
    out = torch.full(ids.shape, -math.inf, dtype=torch.float32, device=q.device)
    for g, i in enumerate(starts):
        if i < nQ:
            part = ids[:, :, i:, g * columns:(g + 1) * columns]
            out[:, :, i:, g * columns:(g + 1) * columns] = _launch(
                q[:, :, i * config.block_q:], k, part, part + 1, config, scale, window, -1)
    return out[..., :W]


def _launch(q, k, half_starts, half_ends, config: MaskConfig, scale: float, window: int | None,
            skip_up_to: int) -> torch.Tensor:
    """One launch of the halves kernel; rows with at most ``skip_up_to`` non-empty halves skip their tiles."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    R = half_starts.shape[-1]
    nQ = half_starts.shape[2]
    assert q.dtype == k.dtype, f"q is {q.dtype} and k {k.dtype}; cast one"
    assert triton_supported(config.block_q, config.block_k, D) is None, triton_supported(
        config.block_q, config.block_k, D
    )
    hs = half_starts.contiguous()
    he = half_ends.contiguous()
    out = torch.empty(hs.shape, dtype=torch.float32, device=q.device)
    launch = scorer_launch(config.block_q, config.block_k, D, q.dtype)
    grid = (B * Hq * nQ,)
    _score_halves_kernel[grid](
        q, k, hs, he, out,
        *q.stride(), *k.stride(),
        T, S, math.ceil(S / config.block_k), nQ, Hq, Hkv, config.query_stride, window or 0, float(scale),
        SKIP_UP_TO=skip_up_to, R=R, RP=triton.next_power_of_2(R),
        BLOCK_Q=config.block_q, BLOCK_K=config.block_k,
        BQ=triton.next_power_of_2(config.block_q), BK=triton.next_power_of_2(config.block_k),
        D=D, LSE=config.score == "lse", IEEE=q.dtype == torch.float32, WINDOW=window is not None,
        **launch,
    )
    return out


def score_halves_torch(q, k, half_starts, half_ends, config: MaskConfig, scale: float,
                       window: int | None = None, *, max_elements: int = 2**28) -> torch.Tensor:
    """The same scores with ``selection.blocks.tile_scores`` (the CPU path), chunked over query blocks so the
    ``[B, Hq, chunk, bq, 2m * bk]`` float32 tile stays under ``max_elements``. Any device."""
    S = k.shape[2]
    q_blocks, q_pos, q_used = query_blocks(q, config, S)  # [B, Hq, nQ, bq, D] float32
    k_blocks = key_blocks(k, config.block_k)  # [B, Hkv, nKB, bk, D]
    centre = centre_blocks(half_starts, half_ends, math.ceil(S / config.block_k))  # [B, Hq, nQ, R]
    # half the budget: the masked copy of each tile doubles it
    return chunked_tile_scores(q_blocks, q_pos, q_used, k_blocks, centre, config, scale, window,
                               max_elements=max_elements // 2)
