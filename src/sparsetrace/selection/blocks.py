"""Block operations shared by every selection of key blocks (STREAM, the oracle, the GPU scorer).

The vocabulary: T queries are the last T of S positions (``q_offset = S - T``); query block i holds query
tokens ``[i*block_q, (i+1)*block_q)``, key block j key tokens ``[j*block_k, (j+1)*block_k)``. A kept block
is attended causally (and inside a sliding window when the layer has one): :func:`may_attend` is that rule,
the only copy of it. Padding to whole blocks, gathering kept blocks per query head (GQA), the candidate
range of each query block and the tile score (max or log-sum-exp of ``q . k`` over a block pair) live here
so that the CPU estimators, the references' callers and the GPU kernels all use the same pieces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import MaskConfig
from ..errors import UsageError


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
            raise UsageError(f"T={T} does not give {nQ} query blocks of {self.block_q}.")
        n_kb = math.ceil(S / self.block_k)
        kept = kept_blocks(self.indices, n_kb)  # [B, H, nQ, nKB]
        kept = kept.repeat_interleave(self.block_q, dim=2)[:, :, :T]  # [B, H, T, nKB]
        kept = kept.repeat_interleave(self.block_k, dim=3)[..., :S]  # [B, H, T, S]
        q_pos = torch.arange(T, device=kept.device)[:, None] + (S - T)
        return kept & may_attend(torch.arange(S, device=kept.device)[None, :], q_pos, window)


def kept_blocks(indices: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """``indices [..., k]`` (-1 padded) -> bool ``[..., num_key_blocks]``: which key blocks each row keeps."""
    kept = torch.zeros(*indices.shape[:-1], num_key_blocks + 1, dtype=torch.bool, device=indices.device)
    kept.scatter_(-1, indices.long().masked_fill(indices < 0, num_key_blocks), True)  # -1 -> spare column
    return kept[..., :num_key_blocks]


def pack_rows(ids: torch.Tensor, keep: torch.Tensor, fill: int = -1) -> torch.Tensor:
    """The entries of ``ids`` where ``keep``, ascending at the front of each row, ``fill`` after them: how a
    row of block indices is re-packed after dropping some (``BlockMask`` rows, FlexAttention's index rows)."""
    big = torch.iinfo(ids.dtype).max
    packed = torch.sort(torch.where(keep, ids, big), dim=-1).values
    return packed.masked_fill(packed == big, fill)


def may_attend(k_pos: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which (query, key) positions may attend: causal, and within ``window`` keys when one is given
    (transformers' convention: key > query - window)."""
    ok = k_pos <= q_pos
    return ok if window is None else ok & (k_pos > q_pos - window)


def check_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    """Shapes, devices and GQA of post-RoPE ``q [B, Hq, T, D]`` and ``k [B, Hkv, S, D]``."""
    if q.dim() != 4 or k.dim() != 4:
        raise UsageError(
            f"q and k must be [B, H, T, D] and [B, Hkv, S, D]; got shapes {tuple(q.shape)} and "
            f"{tuple(k.shape)} (transpose from [B, T, H, D] with .transpose(1, 2))."
        )
    if q.device != k.device:
        raise UsageError(f"q is on {q.device} and k on {k.device}; move both to one device.")
    (B, Hq, T, D), (Bk, Hkv, S, Dk) = q.shape, k.shape
    if B != Bk or D != Dk:
        raise UsageError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head dim.")
    if Hkv == 0 or Hq % Hkv:
        raise UsageError(f"{Hq} query heads are not a multiple of {Hkv} kv heads (GQA needs Hq % Hkv == 0).")
    if T == 0 or T > S:
        raise UsageError(f"need 0 < T <= S (queries are the last T of S keys); got T={T}, S={S}.")


def query_blocks(q: torch.Tensor, config: MaskConfig, S: int):
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


def key_blocks(k: torch.Tensor, block_k: int) -> torch.Tensor:
    """Pad k to whole blocks: ``[B, Hkv, nKB, bk, D]``; padded keys sit past S, so causality hides them.
    Contiguous; a view of k where k is contiguous and S a whole number of blocks (a zero pad would copy all
    of k: at 1M tokens that copy was a tenth of the per-row estimate's GPU time)."""
    B, H, S, D = k.shape
    n_kb = math.ceil(S / block_k)
    if n_kb * block_k != S:
        k = torch.nn.functional.pad(k, (0, 0, 0, n_kb * block_k - S))
    return k.contiguous().view(B, H, n_kb, block_k, D)


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


def gather_kept(x: torch.Tensor, indices: torch.Tensor, block_k: int) -> torch.Tensor:
    """Kept key (or value) blocks of every query block: ``[B, Hq, nQ, top_k * bk, D]`` (-1 reads block 0)."""
    return gather_blocks(key_blocks(x, block_k), indices.long().clamp(min=0))


def candidate_range(T: int, S: int, config: MaskConfig, device, window: int | None = None):
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


def middle_is_visible(T: int, S: int, config: MaskConfig, window: int | None) -> bool:
    """True when no pair mask is needed to score middle candidates: every used query row is real and
    sees every key of every middle candidate (no window, no stride, whole blocks, candidates entirely
    before the block's first query). Then the score skips building a ``[.., bq, R*bk]`` boolean tile."""
    if window is not None or config.query_stride > 1 or T % config.block_q:
        return False
    lo, n = candidate_range(T, S, config, "cpu")
    first = torch.arange(n.shape[0]) * config.block_q + (S - T)
    searched = n - lo > config.top_k
    return bool(((n - config.local_blocks) * config.block_k - 1 <= first)[searched].all())


def centre_blocks(half_starts: torch.Tensor, half_ends: torch.Tensor, num_key_blocks: int) -> torch.Tensor:
    """The representative of every half ``[start, end)``: its centre block (the lower of two middle ones)."""
    return torch.clamp((half_starts + half_ends - 1) // 2, 0, num_key_blocks - 1)


def in_middle(block_ids: torch.Tensor, lo: torch.Tensor, n: torch.Tensor, sinks: int,
              config: MaskConfig) -> torch.Tensor:
    """Whether each key block of ``block_ids [..., nQ, w]`` is a middle candidate of its query block, i.e. in
    ``[lo + sinks, n - local_blocks)`` with ``lo, n [nQ]``: the blocks a search chooses among (forced sinks
    and locals, and -1 padding, are not)."""
    return (block_ids >= (lo + sinks)[:, None]) & (block_ids < (n - config.local_blocks)[:, None])


def tile_scores(q_blocks, q_pos, q_used, k_blocks, block_ids, config: MaskConfig, scale: float,
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
        allowed = may_attend(k_pos[..., :, None], q_pos[:, None, :], window) & q_used[:, None, :]
        logits = logits.masked_fill(~allowed, -math.inf)  # [B, Hq, nQ, R*bk, bq]
    if config.score == "max":
        return logits.amax(dim=-1).view(B, Hq, nQ, R, bk).amax(dim=-1)
    return logits.view(B, Hq, nQ, R, -1).logsumexp(dim=-1)  # [B, Hq, nQ, R]


def chunked_tile_scores(q_blocks, q_pos, q_used, k_blocks, block_ids, config: MaskConfig, scale: float,
                        window: int | None = None, visible: bool = False, *, max_elements: int,
                        sizes: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`tile_scores` a few query blocks at a time, so each ``[B, Hq, c, R * bk, bq]`` logit tile stays
    under ``max_elements`` floats; same arguments and result.

    With ``sizes [nQ]`` only a row's first ``sizes`` block ids are scored and the rest come back ``-inf``:
    SHORTLIST's rows shortlist C of a width that is the largest row's C, and on the CPU the gather and matmul
    of the unused tiles were a quarter to two fifths of the rescoring (the rows of a 4k-32k causal input use
    60-75 % of the width). Rows of one size are scored together, each run in chunks as above.
    """
    B, Hq, nQ, R = block_ids.shape
    widths = [R] * nQ if sizes is None else sizes.clamp(0, R).tolist()
    scores = torch.full((B, Hq, nQ, R), -math.inf, dtype=torch.float32, device=block_ids.device)
    i = 0
    while i < nQ:
        width = widths[i]
        step = max(1, max_elements // (B * Hq * max(width, 1) * config.block_k * config.block_q))
        end = i + 1
        while end < nQ and end - i < step and widths[end] == width:
            end += 1
        if width:
            scores[:, :, i:end, :width] = tile_scores(
                q_blocks[:, :, i:end], q_pos[i:end], q_used[i:end], k_blocks, block_ids[:, :, i:end, :width],
                config, scale, window, visible)
        i = end
    return scores


def forced_sinks(config: MaskConfig, window: int | None) -> int:
    """Sinks are forced only without a sliding window: a windowed layer cannot reach them at long range,
    so there the whole budget minus the local blocks goes to the search inside the window."""
    return config.sink_blocks if window is None else 0


def assemble(selected: torch.Tensor, lo: torch.Tensor, n: torch.Tensor, sinks: int,
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
