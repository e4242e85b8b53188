"""The per-row estimate's three heavy steps on the GPU, each fused: the block draw, the keys' draw inside the
drawn blocks, and the sample step.

**Block draw** (``block_draw``): one fused pass pair over each row's unkept key blocks.

``audit.estimate.estimate_missed`` (block proposal) takes each row's exact head (its best pre-scored unkept
blocks) and draws blocks from the mixture ``(1 - mix) * softmax(pre-score) + mix * uniform`` over the other
unkept causal blocks, by inverting the mixture's CDF at stratified points. In torch that is about twenty
passes over a ``[rows, n_blocks]`` matrix (masks, a topk for the head, the softmax, a float64 cumsum,
searchsorted, the census's topk): at 1M tokens the estimate cost +70 % of the trace on an H200
(2026-12-02). ``_block_draw_kernel`` reads each row's pre-scores twice and writes only the draws: pass 1 is
an online softmax (maximum, normaliser, support size, the first unkept blocks for the census, the head),
pass 2 accumulates the CDF of the tail tile by tile and records where it crosses each point. Weights and
the CDF are float64, as in torch, so a draw's probability is the probability of drawing it.

**Keys' draw** (``keys_in_blocks``): inside each drawn block, one key by ``qbar . k`` (mixed with uniform).
The draws are sorted by block, and one program takes a block's draws (up to ``KEYS_CHUNK`` of them): it
reads the block's keys once and scores 16 draws' mean queries against them in one product. One program a
row, reading each of its drawn blocks, read every block ~24 times a call at 1M tokens (12.9 GB of keys
for 0.5 GB of K; 3.5 of the estimate's 8.1 ms a chunk on an H200); torch gathers ``[rows, r * block_k,
D]`` first (``audit.estimate.keys_in_blocks_torch`` is the reference).

**Sample step** (``sample_rows``): for every row, the logits of its queries against its head and its r
drawn keys, the Hansen-Hurwitz terms, the units' spread and the interval, in one program a row; torch
materialised ``[rows, block_q, r]`` float32 tensors a dozen times over (``audit.estimate.sample_rows_torch``
is the reference).
"""

import math

import torch
import triton
import triton.language as tl

from .tiles import load_query_tile

TILE = 512  # key blocks a step
WARPS = 2  # few warps a row: the loop is latency-bound (its reductions cross warps), rows are many
KEYS_TILE = 16  # the keys' draw: draws scored together (one [16, D] x [D, block_k] product)
KEYS_CHUNK = 64  # the keys' draw: most draws a program takes, so a block many rows draw is split over programs


@triton.jit
def _block_draw_kernel(
    SCORES, LO, N, U, IDX, PROB, COUNT, FIRST, HEAD_OUT,
    stride, c, mix,
    TILE: tl.constexpr, M: tl.constexpr, NEED: tl.constexpr, HEAD: tl.constexpr, HP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (batch, head, query block of the slab), flattened
    i = row % c
    lo = tl.load(LO + i)
    n = tl.load(N + i)
    need = tl.arange(0, NEED)
    hslot = tl.arange(0, HP)
    start = (lo // TILE) * TILE
    base = SCORES + row * stride  # kept blocks hold -inf (block_draw puts it there)

    # Pass 1: maximum and normaliser of the pre-scores over the support (the unkept candidates), its size,
    # its first NEED blocks (all a census needs) and its HEAD best blocks (the exact head). 0-d loop carries
    # are made by reducing a tile, which every Triton version types the same way.
    top = tl.max(tl.full([TILE], -1e30, tl.float32), 0)
    total = tl.sum(tl.zeros([TILE], tl.float64), 0)
    count = tl.sum(tl.zeros([TILE], tl.int32), 0)
    first = tl.full([NEED], 2**30, tl.int32)
    head_s = tl.where(hslot < HEAD, float("-inf"), float("inf"))  # slots past HEAD are never replaced
    head_j = tl.full([HP], -1, tl.int32)
    for j0 in range(start, n, TILE):
        j = j0 + tl.arange(0, TILE)
        s = tl.load(base + j, mask=(j >= lo) & (j < n), other=float("-inf")).to(tl.float32)
        support = s > float("-inf")
        new_top = tl.maximum(top, tl.max(s, 0))
        total = total * tl.exp(top - new_top).to(tl.float64) + tl.sum(tl.exp(s - new_top).to(tl.float64), 0)
        top = new_top
        if count < NEED:  # the first support blocks: only while fewer than NEED were seen
            rank = count + tl.cumsum(support.to(tl.int32), 0)  # 1-based rank of each support block
            hit = support[:, None] & (rank[:, None] == need[None, :] + 1)  # [TILE, NEED]
            first = tl.minimum(first, tl.min(tl.where(hit, j[:, None], 2**30), 0))
        count += tl.sum(support.to(tl.int32), 0)
        # the tile's HEAD best, each replacing the head's weakest if better (ties: the lower block first)
        for _ in tl.static_range(HEAD):
            best = tl.max(s, 0)
            at = tl.min(tl.where(s == best, j, 2**30), 0)
            s = tl.where(j == at, float("-inf"), s)
            weakest = tl.min(head_s, 0)
            slot = tl.min(tl.where(head_s == weakest, hslot, HP), 0)
            take = ((hslot == slot).to(tl.int32) * (best > weakest).to(tl.int32)) > 0
            head_s = tl.where(take, best, head_s)
            head_j = tl.where(take, at, head_j)
    tl.store(COUNT + row, count)
    tl.store(FIRST + row * NEED + need, first)
    in_head = (hslot < HEAD) & (head_s > float("-inf"))
    head_j = tl.where(in_head, head_j, -1)
    tl.store(HEAD_OUT + row * HP + hslot, head_j)

    # Pass 2: the CDF over the tail (the support less the head) of w = (1 - mix) * exp(s - top) / total +
    # mix / count (exp in float32 as torch's mixture, sums in float64), crossed at the ascending points U in
    # [0, 1). Only a tile that the next pending point falls in is scanned, and there each point in it costs
    # one pass over the tile (not a [TILE, M] comparison, which at M = 64 points made this kernel 12x
    # slower); a draw's probability is its w over the CDF's end.
    total -= tl.sum(tl.where(in_head, tl.exp(head_s - top).to(tl.float64), 0.0), 0)
    total = tl.maximum(total, 1e-300)
    tail_count = count - tl.sum(in_head.to(tl.int32), 0)
    slots = tl.arange(0, M)
    uniform = mix / tl.maximum(tail_count, 1).to(tl.float64)
    below = tl.sum(tl.zeros([TILE], tl.float64), 0)  # CDF before the tile
    idx = tl.full([M], -1, tl.int64)
    prob = tl.zeros([M], tl.float64)
    last = tl.max(tl.full([TILE], -1, tl.int32), 0)  # the last tail block
    p = tl.sum(tl.zeros([TILE], tl.int32), 0)  # the next pending point
    u_next = tl.load(U + row * M)
    for j0 in range(start, n, TILE):
        j = j0 + tl.arange(0, TILE)
        s = tl.load(base + j, mask=(j >= lo) & (j < n), other=float("-inf")).to(tl.float32)
        tail = (s > float("-inf")) & (tl.sum(((j[:, None] == head_j[None, :]) & in_head[None, :]).to(tl.int32), 1) == 0)
        w = tl.where(tail, (1 - mix) * tl.exp(s - top).to(tl.float64) / total + uniform, 0.0)
        tile_sum = tl.sum(w, 0)
        last = tl.maximum(last, tl.max(tl.where(tail, j, -1), 0))
        if u_next < below + tile_sum:
            cdf = below + tl.cumsum(w, 0)
            while u_next < below + tile_sum:  # points are ascending; past M, u_next is 2 (never crossed)
                at = j0 + tl.sum((cdf <= u_next).to(tl.int32), 0)  # the first block whose CDF passes it
                idx = tl.where(slots == p, at.to(tl.int64), idx)
                prob = tl.where(slots == p, tl.sum(tl.where(j == at, w, 0.0), 0), prob)
                p += 1
                u_next = tl.load(U + row * M + tl.minimum(p, M - 1))
                u_next = tl.where(p < M, u_next, 2.0)
        below += tile_sum
    # A point that rounding left past the CDF's end takes the last tail block.
    s_last = tl.load(base + tl.maximum(last, 0)).to(tl.float32)
    w_last = (1 - mix) * tl.exp(s_last - top).to(tl.float64) / total + uniform
    missing = idx < 0
    idx = tl.where(missing, tl.maximum(last, 0).to(tl.int64), idx)
    prob = tl.where(missing, w_last, prob)
    tl.store(IDX + row * M + tl.arange(0, M), idx)
    tl.store(PROB + row * M + tl.arange(0, M), tl.where(below > 0, prob / below, 1.0))


def block_draw(scores: torch.Tensor, lo: torch.Tensor, n: torch.Tensor, indices: torch.Tensor, u: torch.Tensor,
               mix: float, need: int, head: int = 0) -> tuple[torch.Tensor, ...]:
    """Each row's exact head and blocks drawn from ``(1 - mix) * softmax(scores) + mix * uniform`` over the
    rest of its unkept candidate blocks (Triton; ``audit.estimate.draw_blocks_torch`` is the reference).

    Args:
        scores: float32 or bf16 ``[B, H, c, nKB]`` pre-scores, read as float32 (overwritten: kept blocks
            become -inf); lo, n: ``[c]``
        candidate ranges ``[lo, n)``; indices: kept blocks ``[B, H, c, width]`` (-1 padded); u: float64
        ``[B, H, c, m]`` ascending points in [0, 1); mix: the uniform share; need: how many of the first unkept
        blocks to return; head: the exact head's size.
    Returns:
        ``blocks`` int64 and ``prob`` float64 ``[B, H, c, m]`` (the tail block whose CDF first passes each point,
        and its probability), ``count`` int64 ``[B, H, c]`` (unkept candidate blocks, head included),
        ``first`` int64 ``[B, H, c, need]`` (the first unkept blocks, ascending, ``nKB`` past the last), the
        head int64 ``[B, H, c, head]`` (-1 where a row has fewer unkept blocks).
    """
    B, H, c, n_kb = scores.shape
    m = u.shape[-1]
    M, NEED, HP = triton.next_power_of_2(m), triton.next_power_of_2(need), triton.next_power_of_2(max(head, 1))
    rows = B * H * c
    # Kept blocks become -inf in place; a -1 padding entry writes +inf, which the minimum ignores.
    flat = scores.contiguous().view(rows, n_kb)  # any float dtype: the kernel reads float32
    kept = indices.reshape(rows, -1).long()
    flat.scatter_reduce_(1, kept.clamp(min=0), torch.where(kept >= 0, -math.inf, math.inf).to(flat.dtype), "amin")
    u_pad = torch.nn.functional.pad(u.reshape(rows, m).double(), (0, M - m), value=2.0)  # never crossed
    blocks = torch.empty(rows, M, dtype=torch.int64, device=scores.device)
    prob = torch.empty(rows, M, dtype=torch.float64, device=scores.device)
    count = torch.empty(rows, dtype=torch.int32, device=scores.device)
    first = torch.empty(rows, NEED, dtype=torch.int32, device=scores.device)
    head_blocks = torch.empty(rows, HP, dtype=torch.int32, device=scores.device)
    _block_draw_kernel[(rows,)](
        flat, lo.to(torch.int32).contiguous(), n.to(torch.int32).contiguous(), u_pad, blocks, prob, count,
        first, head_blocks, n_kb, c, float(mix), TILE=TILE, M=M, NEED=NEED, HEAD=head, HP=HP, num_warps=WARPS,
    )
    shape = (B, H, c)
    first = first[:, :need].long().clamp(max=n_kb)
    return (blocks[:, :m].view(*shape, m), prob[:, :m].view(*shape, m), count.long().view(shape),
            first.view(*shape, need), head_blocks[:, :head].long().view(*shape, head))


@triton.jit
def _keys_in_blocks_kernel(
    Q_MEAN, K_BLOCKS, GROUP, DRAW, START, P_BLOCK, U, POS, PROB,
    N, n_kb, S, scale, mix,
    BK: tl.constexpr, BK_P2: tl.constexpr, D: tl.constexpr, UNITS: tl.constexpr, PER: tl.constexpr,
    PT: tl.constexpr, CHUNK: tl.constexpr, IEEE: tl.constexpr,
):
    # One program a chunk of the draws of one key block (the draws sorted by block): the block is read once,
    # then its draws PT at a time. START is N for the programs past the last chunk (they do nothing).
    start = tl.load(START + tl.program_id(0))  # int64, into the sorted draws
    end = tl.minimum(start + CHUNK, N)
    g = tl.load(GROUP + start, mask=start < N, other=0)  # (batch, kv head) * n_kb + block
    blk = g % n_kb
    d = tl.arange(0, D)
    t = tl.arange(0, BK_P2)
    per = tl.arange(0, PER)
    inside = (t < BK) & (blk * BK + t < S)
    count = tl.sum(inside.to(tl.float32), 0)
    rows = tl.where(start < N, BK, 0)  # a program past the last chunk reads nothing
    keys = tl.load(K_BLOCKS + (g * BK + t)[:, None] * D + d[None, :],
                   mask=(t < rows)[:, None], other=0.0)  # [BK_P2, D], the keys' dtype
    for i0 in range(start, end, PT):
        i = i0 + tl.arange(0, PT)
        ok = (i < end) & (tl.load(GROUP + i, mask=i < end, other=-1) == g)  # the chunk ends at its block's end
        draw = tl.load(DRAW + i, mask=ok, other=0)  # row * UNITS + unit, the draw's original slot
        # the mean queries in the keys' dtype, as torch's product takes them [PT, D]
        q = tl.load(Q_MEAN + (draw // UNITS)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        q = q.to(K_BLOCKS.dtype.element_ty)
        # float32 sums of exact products, as the per-draw float32 sum it replaced (float32 keys: no tf32)
        if IEEE:
            s = tl.dot(q, tl.trans(keys), input_precision="ieee")  # [PT, BK_P2] float32
        else:
            s = tl.dot(q, tl.trans(keys))
        # the score rounded to the keys' dtype, as torch's product returns it (it only shapes the draw)
        s = s.to(K_BLOCKS.dtype.element_ty).to(tl.float32) * scale
        s = tl.where(inside[None, :], s, float("-inf"))
        e = tl.exp(s - tl.max(s, 1)[:, None])  # 0 off the block's keys
        w = tl.where(inside[None, :], e * ((1 - mix) / tl.sum(e, 1))[:, None] + mix / count, 0.0).to(tl.float64)
        cdf = tl.cumsum(w, 1)
        total = tl.sum(w, 1)[:, None]  # [PT, 1]
        out = draw[:, None] * PER + per[None, :]  # [PT, PER]
        u = tl.load(U + out, mask=ok[:, None], other=0.0)  # ascending in [0, 1) along PER
        u = tl.minimum(u * total, total * (1 - 1e-12))  # never past the last positive weight
        at = tl.sum((cdf[:, :, None] <= u[:, None, :]).to(tl.int32), 1)  # searchsorted(right=True) [PT, PER]
        at = tl.minimum(at, BK - 1)
        p_key = tl.sum(tl.where(t[None, :, None] == at[:, None, :], w[:, :, None], 0.0), 1) / total
        p_block = tl.load(P_BLOCK + draw, mask=ok, other=0.0)
        tl.store(POS + out, blk * BK + at, mask=ok[:, None])
        tl.store(PROB + out, p_block[:, None] * p_key, mask=ok[:, None])


def keys_in_blocks(q_mean: torch.Tensor, k_blocks: torch.Tensor, blk: torch.Tensor, p_block: torch.Tensor, S: int,
                   scale: float, mix: float, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The block proposal's second stage fused (Triton; ``audit.estimate.keys_in_blocks_torch`` is the
    reference, same arguments and results): inside each drawn block, keys by ``qbar . k`` mixed with
    ``mix`` uniform, at the points ``u``.

    Args:
        q_mean: ``[B, Hq, c, D]`` mean queries (any float dtype); k_blocks: ``[B, Hkv, nKB, block_k, D]``
        keys (bf16, fp16 or fp32; scores are rounded to this dtype); blk: int64 ``[B, Hq, c, units]`` drawn
        blocks, p_block: float64 their probabilities; u: float64 ``[B, Hq, c, units, per]`` ascending points.
    Returns:
        positions int64 and probabilities float64 ``[B, Hq, c, units * per]``.

    The draws are sorted by (batch, kv head, block), and one program reads a block once for up to KEYS_CHUNK
    of its draws: a block is drawn by many rows (at 1M tokens about 24 times a call), and reading it once a
    draw moved 25x the keys. Chunks bound a program's work where many rows draw the same block.
    """
    B, Hq, c, units = blk.shape
    Hkv, n_kb, bk, D = k_blocks.shape[1:]
    per = u.shape[-1]
    PER, BK_P2 = triton.next_power_of_2(per), max(16, triton.next_power_of_2(bk))  # tl.dot tiles: >= 16
    u_pad = torch.nn.functional.pad(u.double(), (0, PER - per), value=0.0).contiguous()
    pos = torch.empty(B, Hq, c, units, PER, dtype=torch.int64, device=blk.device)
    prob = torch.empty(B, Hq, c, units, PER, dtype=torch.float64, device=blk.device)
    # each draw's block among all (batch, kv head, block), in row order (batch, q head, query block)
    dev = blk.device
    kv_head = torch.arange(Hq, device=dev) // (Hq // Hkv)
    bh = torch.arange(B, device=dev)[:, None] * Hkv + kv_head  # [B, Hq]
    group, draw = torch.sort((bh[:, :, None, None] * n_kb + blk).flatten(), stable=True)  # [N] each
    # chunks: a block's sorted draws in runs of KEYS_CHUNK; START[j] is where chunk j begins in the sorted
    # draws, N past the last chunk (the grid is an upper bound of their number: no sync with the host)
    n = group.numel()
    rank = torch.arange(n, device=dev) - torch.searchsorted(group, group)  # the draw's rank in its block
    begins = rank % KEYS_CHUNK == 0
    programs = min(B * Hkv * n_kb, n) + n // KEYS_CHUNK
    start = torch.full((programs + 1,), n, dtype=torch.int64, device=dev)
    start.scatter_(0, torch.where(begins, begins.cumsum(0) - 1, programs), torch.arange(n, device=dev))
    _keys_in_blocks_kernel[(programs,)](
        q_mean.float().contiguous(), k_blocks.contiguous(), group, draw, start, p_block.double().contiguous(),
        u_pad, pos, prob, n, n_kb, S, float(scale), float(mix),
        BK=bk, BK_P2=BK_P2, D=D, UNITS=units, PER=PER, PT=KEYS_TILE, CHUNK=KEYS_CHUNK,
        IEEE=k_blocks.dtype == torch.float32, num_warps=4,
    )
    return pos[..., :per].flatten(-2), prob[..., :per].flatten(-2)


def sample_supported(q: torch.Tensor, samples: int, block_q: int, head: int = 0) -> str | None:
    """None if ``sample_rows`` takes these shapes, else the reason (the caller samples in torch)."""
    if samples < 16 or samples & (samples - 1):
        return f"samples={samples} is not a power of two >= 16"
    if head and (head < 16 or head & (head - 1)):
        return f"an exact head of {head} keys is not a power of two >= 16"
    if not 16 <= triton.next_power_of_2(block_q) <= 128:
        return f"block_q={block_q} is not in [9, 128]"
    if q.shape[-1] not in (16, 32, 64, 128, 256):
        return f"head_dim={q.shape[-1]} is not a power of two in [16, 256]"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    return None


@triton.jit
def _terms(q, K, k_base, POS, WEIGHT, slot, d, sks, skd, S, q_pos, real, lam, window, scale,
           WINDOW: tl.constexpr, IEEE: tl.constexpr):
    """``weight_s * exp(scale * q_t . k_s - lam_t)`` of the keys at ``POS[slot]`` for the tile's queries,
    0 where a query may not attend the key; exp is capped at e^60 (an unkept key e^60 times the kept mass
    means M = 1 anyway)."""
    pos = tl.load(POS + slot)  # int64
    weight = tl.load(WEIGHT + slot).to(tl.float32)
    # a census position past S (the last block's padding) reads key S - 1; no query may attend it
    kt = tl.load(K + k_base + tl.minimum(pos, S - 1)[None, :] * sks + d[:, None] * skd)  # [D, n]
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    ok = real[:, None] & (pos[None, :] <= q_pos[:, None])
    if WINDOW:
        ok = ok & (pos[None, :] > q_pos[:, None] - window)
    return tl.where(ok, tl.exp(tl.minimum(s * scale - lam[:, None], 60.0)), 0.0) * weight[None, :]


@triton.jit
def _sample_kernel(
    Q, K, POS, WEIGHT, EXACT, LAM, OUT,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd,
    T, S, Hq, Hkv, c, first, window, scale, z,
    BLOCK_Q: tl.constexpr, BQ: tl.constexpr, R: tl.constexpr, D: tl.constexpr, UNIT: tl.constexpr,
    HEAD: tl.constexpr, PER_QUERY: tl.constexpr, WINDOW: tl.constexpr, IEEE: tl.constexpr,
):
    row = tl.program_id(0)  # (batch, head, query block of the slab), flattened
    i = row % c
    h = (row // c) % Hq
    b = row // (c * Hq)
    rows = tl.arange(0, BQ)
    t = (first + i) * BLOCK_Q + rows
    real = (rows < BLOCK_Q) & (t < T)
    q_pos = t + (S - T)
    d = tl.arange(0, D)
    q = load_query_tile(Q, b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, t.to(tl.int64), real, d, sqt, sqd)
    k_base = b.to(tl.int64) * skb + (h // (Hq // Hkv)).to(tl.int64) * skh
    lam = tl.load(LAM + row.to(tl.int64) * BLOCK_Q + rows, mask=rows < BLOCK_Q, other=0.0)
    columns = row.to(tl.int64) * (HEAD + R)
    tail = _terms(q, K, k_base, POS + columns + HEAD, WEIGHT + columns + HEAD, tl.arange(0, R), d, sks, skd,
                  S, q_pos, real, lam, window, scale, WINDOW, IEEE)  # [BQ, R]: y_ts / r
    tail_est = tl.sum(tail, 1)  # the sampled part of R_t^ [BQ]
    est = tail_est
    if HEAD:  # keys summed exactly, outside the units
        head = _terms(q, K, k_base, POS + columns, WEIGHT + columns, tl.arange(0, HEAD), d, sks, skd,
                      S, q_pos, real, lam, window, scale, WINDOW, IEEE)
        est = est + tl.sum(head, 1)
    units = tl.sum(tl.reshape(tail, [BQ, R // UNIT, UNIT]), 2)  # unit estimates / n_units
    n_units = R // UNIT
    rel = units * n_units / tl.maximum(tail_est, 1.1754943508222875e-38)[:, None] - 1
    sd = tail_est * tl.sqrt(tl.sum(rel * rel, 1) / (n_units * (n_units - 1)))
    sd = tl.where((tl.load(EXACT + row) != 0) | (tail_est == 0), 0.0, sd)
    no_kept = lam == float("-inf")  # such a query's missed mass is 1
    low = tl.maximum(est - z * sd, 0.0)
    high = est + z * sd
    m_est = tl.where(no_kept, 1.0, 1 / (1 + 1 / est))  # M = R / (1 + R), also at R = 0, inf
    m_low = tl.where(no_kept, 1.0, 1 / (1 + 1 / low))
    m_high = tl.where(no_kept, 1.0, 1 / (1 + 1 / high))
    if PER_QUERY:
        out = OUT + (row.to(tl.int64) * BLOCK_Q + rows) * 3
        keep = rows < BLOCK_Q
        tl.store(out, m_est, mask=keep)
        tl.store(out + 1, m_low, mask=keep)
        tl.store(out + 2, m_high, mask=keep)
    else:
        n_real = tl.maximum(tl.sum(real.to(tl.float32), 0), 1.0)
        out = OUT + row.to(tl.int64) * 3
        tl.store(out, tl.sum(tl.where(real, m_est, 0.0), 0) / n_real)
        tl.store(out + 1, tl.sum(tl.where(real, m_low, 0.0), 0) / n_real)
        tl.store(out + 2, tl.sum(tl.where(real, m_high, 0.0), 0) / n_real)


def sample_rows(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, exact: torch.Tensor,
                lam: torch.Tensor, first: int, scale: float, window: int | None, z: float, m: int,
                per_query: bool, head: int = 0) -> torch.Tensor:
    """``audit.estimate.sample_rows_torch`` fused (Triton): same arguments, same float32 ``[B, Hq, c, bq or 1,
    3]``; ``q``, ``k`` of one dtype (bf16, fp16 or fp32) and shapes ``sample_supported`` takes."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    c, r, bq = pos.shape[2], pos.shape[3] - head, lam.shape[-1]
    out = torch.empty(B, Hq, c, bq if per_query else 1, 3, dtype=torch.float32, device=q.device)
    _sample_kernel[(B * Hq * c,)](
        q, k, pos.contiguous(), weight.contiguous(), exact.to(torch.int8).contiguous(),
        lam.float().contiguous(), out, *q.stride(), *k.stride(),
        T, S, Hq, Hkv, c, first, window or 0, float(scale), float(z),
        BLOCK_Q=bq, BQ=triton.next_power_of_2(bq), R=r, D=D, UNIT=m, HEAD=head, PER_QUERY=per_query,
        WINDOW=window is not None, IEEE=q.dtype == torch.float32, num_warps=4,
    )
    return out
