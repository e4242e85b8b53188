"""STREAM: hierarchical top-k pruning of key blocks, and the exact oracle it approximates.

After "Stream: Scaling up Mechanistic Interpretability to Long Context in LLMs via Sparse Attention"
(Rosser et al. 2025, arXiv 2510.19875), which builds on HiP attention (arXiv 2406.09827).

For every query block i of every query head (queries are the last T of S positions, so block i covers
absolute positions ``q_offset + [i*block_q, (i+1)*block_q)``), with ``n`` causal key blocks:

  0. if ``n <= top_k`` keep all of them; otherwise keep the sinks ``[0, sink_blocks)`` and the local blocks
     ``[n - local_blocks, n)`` and choose ``m = top_k - sink_blocks - local_blocks`` middle blocks:
  1. split the middle candidates ``[sink_blocks, n - local_blocks)`` into m contiguous groups;
  2. while a group has more than one block: split every group into halves, score each half by its centre
     (representative) block, keep the m best halves (ties: the lower block index);
  3. the m surviving single blocks are the selection.

The block score of key block j for query block i is the max of ``q . k`` over the queries of i and the
causally allowed keys of j ("max"), or the log-sum-exp of the scaled logits over the same tile ("lse",
an estimate of attention mass rather than of the peak).

Every step is vectorised over batch, heads and query blocks; the only Python loop is over the
``ceil(log2(n / m))`` levels. Each level scores ``2m`` tiles per query block, so the cost is
``O(T * m * log(S / m) * block_q * block_k * D)`` and memory ``O(T * m * block_k * D)``: no
``[nQ, n_key_blocks]`` or ``[T, S]`` tensor is ever built. ``oracle_mask`` is the same contract with steps
1-3 replaced by the exact top-m block scores (O(T * S), chunked over query blocks to bound memory).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCORES = ("max", "lse")


@dataclass(frozen=True)
class MaskConfig:
    """The knobs of one STREAM selection; validated once, written into trace manifests with ``asdict``."""

    block_q: int = 32
    block_k: int = 32
    top_k: int = 16
    sink_blocks: int = 1
    local_blocks: int = 1
    score: str = "max"
    query_stride: int = 1

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k", "top_k", "query_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        for name in ("sink_blocks", "local_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer.")
        if self.top_k < self.sink_blocks + self.local_blocks + 1:
            raise ValueError(
                f"top_k={self.top_k} leaves no room to choose: it must exceed sink_blocks + local_blocks "
                f"= {self.sink_blocks + self.local_blocks}; raise top_k or lower the forced blocks."
            )
        if self.score not in SCORES:
            raise ValueError(f"score={self.score!r} is not one of {SCORES}.")

    @property
    def middle(self) -> int:
        """m: the number of blocks the search chooses (top_k minus the forced sinks and locals)."""
        return self.top_k - self.sink_blocks - self.local_blocks


@dataclass
class BlockMask:
    """Kept key blocks per query block: ``indices`` int32 ``[B, Hq, nQ, top_k]``.

    Rows are sorted ascending, unique and ``-1``-padded at the end; entries are key-block indices (key token
    ``j`` lies in block ``j // block_k``). Query block i holds query tokens ``[i*block_q, (i+1)*block_q)``
    of the T queries, which sit at absolute positions ``q_offset + t`` among the S keys.
    """

    indices: torch.Tensor
    block_q: int
    block_k: int

    @property
    def top_k(self) -> int:
        return self.indices.shape[-1]

    def to_dense(self, T: int, S: int, window: int | None = None) -> torch.Tensor:
        """Token-level boolean mask ``[B, Hq, T, S]``: kept blocks, causal inside them (and inside the
        sliding ``window`` when given). Small inputs only."""
        B, H, nQ, _ = self.indices.shape
        if nQ != math.ceil(T / self.block_q):
            raise ValueError(f"T={T} does not give {nQ} query blocks of {self.block_q}.")
        n_kb = math.ceil(S / self.block_k)
        kept = torch.zeros(B, H, nQ, n_kb + 1, dtype=torch.bool, device=self.indices.device)
        idx = self.indices.long().masked_fill(self.indices < 0, n_kb)  # -1 -> spare column
        kept.scatter_(-1, idx, True)
        kept = kept[..., :n_kb]  # [B, H, nQ, nKB]
        kept = kept.repeat_interleave(self.block_q, dim=2)[:, :, :T]  # [B, H, T, nKB]
        kept = kept.repeat_interleave(self.block_k, dim=3)[..., :S]  # [B, H, T, S]
        q_pos = torch.arange(T, device=kept.device)[:, None] + (S - T)
        return kept & _allowed(torch.arange(S, device=kept.device)[None, :], q_pos, window)


def pack_rows(ids: torch.Tensor, keep: torch.Tensor, fill: int = -1) -> torch.Tensor:
    """The entries of ``ids`` where ``keep``, ascending at the front of each row, ``fill`` after them: how a
    row of block indices is re-packed after dropping some (``BlockMask`` rows, FlexAttention's index rows)."""
    big = torch.iinfo(ids.dtype).max
    packed = torch.sort(torch.where(keep, ids, big), dim=-1).values
    return packed.masked_fill(packed == big, fill)


def _allowed(k_pos: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which (query, key) positions may attend: causal, and within ``window`` keys when one is given
    (transformers' convention: key > query - window)."""
    ok = k_pos <= q_pos
    return ok if window is None else ok & (k_pos > q_pos - window)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, config: MaskConfig) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(
            f"q and k must be [B, H, T, D] and [B, Hkv, S, D]; got shapes {tuple(q.shape)} and "
            f"{tuple(k.shape)} (transpose from [B, T, H, D] with .transpose(1, 2))."
        )
    if q.device != k.device:
        raise ValueError(f"q is on {q.device} and k on {k.device}; move both to one device.")
    (B, Hq, T, D), (Bk, Hkv, S, Dk) = q.shape, k.shape
    if B != Bk or D != Dk:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head dim.")
    if Hkv == 0 or Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads (GQA needs Hq % Hkv == 0).")
    if T == 0 or T > S:
        raise ValueError(f"need 0 < T <= S (queries are the last T of S keys); got T={T}, S={S}.")


def _query_blocks(q: torch.Tensor, config: MaskConfig, S: int):
    """Pad q to whole blocks; return q blocks, absolute query positions and which rows count.

    Returns ``q_blocks [B, Hq, nQ, bq, D]`` (float32), ``q_pos [nQ, bq]`` and ``q_used [nQ, bq]``: padded
    rows never count, and with ``query_stride`` s only every s-th row plus each block's last real query
    (which keeps every causal key block reachable, so no candidate scores -inf).
    """
    B, H, T, D = q.shape
    bq = config.block_q
    nQ = math.ceil(T / bq)
    q_pad = torch.nn.functional.pad(q, (0, 0, 0, nQ * bq - T))
    q_blocks = q_pad.view(B, H, nQ, bq, D).float()  # [B, Hq, nQ, bq, D]
    t = torch.arange(nQ * bq, device=q.device).view(nQ, bq)
    q_pos = t + (S - T)  # [nQ, bq] absolute positions
    last_row = torch.clamp(T - 1 - torch.arange(nQ, device=q.device) * bq, max=bq - 1)  # [nQ]
    rows = torch.arange(bq, device=q.device)
    q_used = ((rows % config.query_stride == 0)[None, :] & (t < T)) | (rows[None, :] == last_row[:, None])
    return q_blocks, q_pos, q_used


def _key_blocks(k: torch.Tensor, block_k: int) -> torch.Tensor:
    """Pad k to whole blocks: ``[B, Hkv, nKB, bk, D]``; padded keys sit past S, so causality hides them."""
    B, H, S, D = k.shape
    n_kb = math.ceil(S / block_k)
    return torch.nn.functional.pad(k, (0, 0, 0, n_kb * block_k - S)).view(B, H, n_kb, block_k, D)


def gather_blocks(blocks: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Key/value blocks ``[B, Hkv, nKB, bk, D]`` picked per query head: ``[B, Hq, nQ, R * bk, D]``.

    ``block_ids [B, Hq, nQ, R]`` (must be in range); GQA: query head h reads kv head ``h // (Hq // Hkv)``.
    One ``index_select`` of whole rows, the cheapest gather on CPU.
    """
    B, Hkv, n_kb, bk, D = blocks.shape
    Hq, nQ, R = block_ids.shape[1:]
    kv_head = torch.arange(Hq, device=block_ids.device) // (Hq // Hkv)
    base = (torch.arange(B, device=block_ids.device)[:, None] * Hkv + kv_head) * n_kb  # [B, Hq]
    rows = (base[:, :, None, None] + block_ids).flatten()  # [B*Hq*nQ*R]
    return blocks.reshape(B * Hkv * n_kb, bk * D).index_select(0, rows).view(B, Hq, nQ, R * bk, D)


def _causal_block_counts(T: int, S: int, config: MaskConfig, device, window: int | None = None):
    """Candidate range ``[lo, n)`` of every query block, ``[nQ]`` each.

    n: key blocks up to the one holding the block's last query. lo: 0, or with a sliding window the first
    block any of the block's queries can still reach.
    """
    nQ = math.ceil(T / config.block_q)
    first = torch.arange(nQ, device=device) * config.block_q + (S - T)
    last = torch.clamp(first + config.block_q, max=S) - 1
    n = last // config.block_k + 1
    if window is None:
        return torch.zeros_like(n), n
    return torch.clamp((first - window + 1) // config.block_k, min=0), n


def _middle_is_visible(T: int, S: int, config: MaskConfig, window: int | None) -> bool:
    """True when no pair mask is needed to score middle candidates: every used query row is real and
    sees every key of every middle candidate (no window, no stride, whole blocks, candidates entirely
    before the block's first query). Then the score skips building a ``[.., bq, R*bk]`` boolean tile."""
    if window is not None or config.query_stride > 1 or T % config.block_q:
        return False
    lo, n = _causal_block_counts(T, S, config, "cpu")
    first = torch.arange(n.shape[0]) * config.block_q + (S - T)
    searched = n - lo > config.top_k
    return bool(((n - config.local_blocks) * config.block_k - 1 <= first)[searched].all())


def _tile_scores(q_blocks, q_pos, q_used, k_blocks, block_ids, config: MaskConfig, scale: float,
                 window: int | None = None, visible: bool = False):
    """Score key blocks ``block_ids [B, Hq, nQ, R]`` for every query block: ``[B, Hq, nQ, R]`` float32.

    Forms the ``(R*bk) x bq`` logit tile of each query block against its R gathered key blocks and
    reduces it by max (peak) or log-sum-exp (mass) over the allowed pairs (all pairs when ``visible``).
    """
    B, Hq, nQ, R = block_ids.shape
    bk = config.block_k
    keys = gather_blocks(k_blocks, block_ids).float()  # [B, Hq, nQ, R*bk, D]
    logits = torch.matmul(keys, q_blocks.transpose(-1, -2))  # [B, Hq, nQ, R*bk, bq]
    if config.score == "lse":
        logits = logits * scale
    if not visible:
        k_pos = (block_ids[..., None] * bk + torch.arange(bk, device=block_ids.device)).flatten(3)
        allowed = _allowed(k_pos[..., :, None], q_pos[:, None, :], window) & q_used[:, None, :]
        logits = logits.masked_fill(~allowed, -math.inf)  # [B, Hq, nQ, R*bk, bq]
    if config.score == "max":
        return logits.amax(dim=-1).view(B, Hq, nQ, R, bk).amax(dim=-1)
    return logits.view(B, Hq, nQ, R, -1).logsumexp(dim=-1)  # [B, Hq, nQ, R]


def _split_into_groups(lo: torch.Tensor, count: torch.Tensor, m: int):
    """Step 1: m contiguous, nearly equal groups over ``[lo, lo + count)``: ``(starts, ends)`` ``[nQ, m]``."""
    g = torch.arange(m + 1, device=count.device)
    edges = lo[:, None] + (g[None, :] * count[:, None]) // m  # [nQ, m+1]
    return edges[:, :-1], edges[:, 1:]


def _halves(starts: torch.Tensor, ends: torch.Tensor):
    """Step 2a: every group ``[a, b)`` -> left ``[a, a + ceil(size/2))`` and right half; ``[..., 2m]`` each.

    A group of one block yields itself and an empty right half. Halves stay in block order.
    """
    mid = starts + (ends - starts + 1) // 2
    half_starts = torch.stack([starts, mid], dim=-1).flatten(-2)  # [..., 2m]
    half_ends = torch.stack([mid, ends], dim=-1).flatten(-2)  # [..., 2m]
    return half_starts, half_ends


def _keep_best(starts, ends, scores, m: int):
    """Step 2b: the m best halves by score, ties to the lower block index, returned in block order."""
    scores = scores.masked_fill(ends <= starts, -math.inf)  # an empty half never wins over a real one
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :m]  # [B, Hq, nQ, m]
    order = torch.sort(order, dim=-1).values  # back to block order
    return starts.gather(-1, order), ends.gather(-1, order)


def _assemble(selected: torch.Tensor, lo: torch.Tensor, n: torch.Tensor, sinks: int,
              config: MaskConfig) -> torch.Tensor:
    """Sinks + selection + locals where the search ran, all of ``[lo, n)`` (``-1``-padded) elsewhere."""
    B, H, nQ, m = selected.shape
    device = selected.device
    sink_ids = torch.arange(sinks, device=device).expand(B, H, nQ, -1)
    locals_ = n[:, None] - config.local_blocks + torch.arange(config.local_blocks, device=device)  # [nQ, l]
    searched = torch.cat([sink_ids, selected, locals_.expand(B, H, nQ, -1)], dim=-1)  # [B, H, nQ, top_k]
    everything = lo[:, None] + torch.arange(config.top_k, device=device)  # [nQ, top_k]
    everything = torch.where(everything < n[:, None], everything, -1)
    return torch.where((n - lo > config.top_k)[:, None], searched, everything).to(torch.int32)


def _forced_sinks(config: MaskConfig, window: int | None) -> int:
    """Sinks are forced only without a sliding window: a windowed layer cannot reach them at long range,
    so there the whole budget minus the local blocks goes to the search inside the window."""
    return config.sink_blocks if window is None else 0


def hierarchical_search(q: torch.Tensor, k: torch.Tensor, config: MaskConfig, window: int | None,
                        score_halves) -> BlockMask:
    """Steps 0-3 of the module docstring, given ``score_halves(half_starts, half_ends) -> [B, Hq, nQ, 2m]``
    (the score of each half's representative block). Shared by the torch path and the GPU scorer."""
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    sinks = _forced_sinks(config, window)
    m = config.top_k - sinks - config.local_blocks
    lo, n = _causal_block_counts(T, S, config, q.device, window)  # [nQ] each
    n_kb = math.ceil(S / config.block_k)
    # Rows that keep everything run the search on a dummy range of m blocks; _assemble discards them.
    count = torch.clamp(n - lo - sinks - config.local_blocks, min=m)  # [nQ] middle candidates
    starts, ends = _split_into_groups(lo + sinks, count, m)  # [nQ, m]
    starts, ends = starts.expand(B, Hq, -1, -1), ends.expand(B, Hq, -1, -1)  # [B, Hq, nQ, m]
    largest_group = math.ceil(max(n_kb - sinks - config.local_blocks, m) / m)
    for _ in range(math.ceil(math.log2(largest_group))):  # one pass per level; extra passes are no-ops
        half_starts, half_ends = _halves(starts, ends)  # [B, Hq, nQ, 2m]
        scores = score_halves(half_starts, half_ends)  # [B, Hq, nQ, 2m]
        starts, ends = _keep_best(half_starts, half_ends, scores, m)  # [B, Hq, nQ, m]
    return BlockMask(_assemble(starts, lo, n, sinks, config), config.block_q, config.block_k)


def stream_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int = 32,
    block_k: int = 32,
    top_k: int = 16,
    sink_blocks: int = 1,
    local_blocks: int = 1,
    score: str = "max",
    query_stride: int = 1,
    scale: float | None = None,
    window: int | None = None,
    impl: str = "auto",
) -> BlockMask:
    """STREAM selection of ``top_k`` key blocks per query block (see the module docstring).

    Args:
        q: post-RoPE queries ``[B, Hq, T, D]`` (the last T of S positions).
        k: post-RoPE keys ``[B, Hkv, S, D]``; ``Hq`` must be a multiple of ``Hkv``.
        score: ``"max"`` (contract default) or ``"lse"`` block score.
        query_stride: score with every s-th query of a block (plus its last); 1 = all.
        scale: logit scale for the ``"lse"`` score, default ``D ** -0.5``.
        window: sliding-window size of the layer (None = global). With a window the candidates are the
            blocks the window reaches, ``[lo, n)``; no sinks are forced and the search picks
            ``top_k - local_blocks`` (the same contract on the shifted range).
        impl: ``"auto"`` (Triton scorer on CUDA, torch elsewhere), ``"torch"``, ``"triton"``, or
            ``"reference"`` (the plain-loop reference of ``sparsetrace.reference``; tiny inputs only).
    Returns:
        BlockMask with ``indices`` int32 ``[B, Hq, nQ, top_k]``.
    """
    config = MaskConfig(block_q, block_k, top_k, sink_blocks, local_blocks, score, query_stride)
    _check_inputs(q, k, config)
    if impl == "auto":
        impl = "triton" if q.is_cuda else "torch"
    if impl == "triton":
        from .kernels import gpu_stream_mask  # lazy: Triton only on CUDA machines

        return gpu_stream_mask(q, k, config, scale=scale, window=window)
    if impl == "reference":
        from .reference import loop_stream_mask

        indices = loop_stream_mask(q.cpu(), k.cpu(), block_q=block_q, block_k=block_k, top_k=top_k,
                                   sink_blocks=sink_blocks, local_blocks=local_blocks, score=score,
                                   query_stride=query_stride, scale=scale, window=window)
        return BlockMask(indices.to(q.device), block_q, block_k)
    if impl != "torch":
        raise ValueError(f"impl={impl!r} is not one of 'auto', 'torch', 'triton', 'reference'.")
    T, D, S = q.shape[2], q.shape[3], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    n_kb = math.ceil(S / block_k)
    q_blocks, q_pos, q_used = _query_blocks(q, config, S)
    k_blocks = _key_blocks(k, block_k)
    visible = _middle_is_visible(T, S, config, window)

    def score_halves(half_starts: torch.Tensor, half_ends: torch.Tensor) -> torch.Tensor:
        centre = torch.clamp((half_starts + half_ends - 1) // 2, 0, n_kb - 1)  # representative blocks
        return _tile_scores(q_blocks, q_pos, q_used, k_blocks, centre, config, scale, window, visible)

    return hierarchical_search(q, k, config, window, score_halves)


def block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    config: MaskConfig,
    *,
    scale: float | None = None,
    window: int | None = None,
    max_elements: int = 2**25,
) -> torch.Tensor:
    """Exact block score of every (query block, key block): ``[B, Hq, nQ, nKB]`` float32 (-inf = not causal).

    O(T * S): the oracle's ground truth, for tests, audits and small inputs. Computed a few query blocks
    at a time so the logit tile stays under ``max_elements`` floats.
    """
    _check_inputs(q, k, config)
    B, Hq, T, D = q.shape
    S = k.shape[2]
    scale = D**-0.5 if scale is None else scale
    q_blocks, q_pos, q_used = _query_blocks(q, config, S)
    k_blocks = _key_blocks(k, config.block_k)
    nQ, n_kb = q_blocks.shape[2], k_blocks.shape[2]
    all_blocks = torch.arange(n_kb, device=q.device)
    step = max(1, max_elements // (B * Hq * config.block_q * n_kb * config.block_k))
    out = []
    for i in range(0, nQ, step):  # chunks of query blocks bound the [bq, S] logit tiles
        sl = slice(i, min(i + step, nQ))
        ids = all_blocks.expand(B, Hq, sl.stop - sl.start, -1)
        out.append(
            _tile_scores(q_blocks[:, :, sl], q_pos[sl], q_used[sl], k_blocks, ids, config, scale, window)
        )
    return torch.cat(out, dim=2)


def oracle_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int = 32,
    block_k: int = 32,
    top_k: int = 16,
    sink_blocks: int = 1,
    local_blocks: int = 1,
    score: str = "max",
    query_stride: int = 1,
    scale: float | None = None,
    window: int | None = None,
) -> BlockMask:
    """The exact contract: forced blocks plus the top-m block scores among the middle candidates.

    Same arguments and output as :func:`stream_mask`; ties go to the lower block index. O(T * S) time,
    memory bounded by chunking over query blocks.
    """
    config = MaskConfig(block_q, block_k, top_k, sink_blocks, local_blocks, score, query_stride)
    scores = block_scores(q, k, config, scale=scale, window=window)  # [B, Hq, nQ, nKB]
    T, S = q.shape[2], k.shape[2]
    sinks = _forced_sinks(config, window)
    lo, n = _causal_block_counts(T, S, config, q.device, window)  # [nQ] each
    j = torch.arange(scores.shape[-1], device=q.device)
    middle = (j[None, :] >= (lo + sinks)[:, None]) & (j[None, :] < (n - local_blocks)[:, None])  # [nQ,nKB]
    scores = scores.masked_fill(~middle, -math.inf)
    m = config.top_k - sinks - local_blocks
    if scores.shape[-1] < m:  # every row keeps everything; give _assemble a well-shaped dummy
        selected = torch.zeros(*scores.shape[:-1], m, dtype=torch.long, device=q.device)
    else:
        selected = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :m]
        selected = torch.sort(selected, dim=-1).values  # [B, Hq, nQ, m]
    return BlockMask(_assemble(selected, lo, n, sinks, config), block_q, block_k)
