"""Plain-loop references of the STREAM contract (shared/DESIGN.md section 1), for tests and audits.

Written independently of ``stream.py``, ``oracle.py``, ``shortlist.py`` and ``blocks.py``: one Python loop
per (batch, head, query block), float64 scores from the raw positions, no shared helpers, so a bug in the
vectorised path cannot hide in both. Slow; small inputs only.
"""

from __future__ import annotations

import math

import torch

from ..config import MaskConfig
from .blocks import BlockMask  # the container only: every number below is computed here
from .shortlist import EXACT_TAIL, ONE_PICK_WIDTH  # the rule's constants


def _used_rows(i, T, block_q, query_stride) -> list[int]:
    """The queries of block i that score: every ``query_stride``-th row and the block's last real one."""
    q_rows = list(range(i * block_q, min((i + 1) * block_q, T)))
    return [t for r, t in enumerate(q_rows) if r % query_stride == 0 or t == q_rows[-1]]


def _block_score(q, k, b, h, group, i, j, T, S, block_q, block_k, score, scale, query_stride, window):
    """Score of key block j for query block i (float64), over causally allowed (query, key) pairs."""
    used = _used_rows(i, T, block_q, query_stride)
    qs = q[b, h, used].double()  # [u, D]
    keys = k[b, h // group, j * block_k : min((j + 1) * block_k, S)].double()  # [w, D]
    logits = qs @ keys.T  # [u, w]
    q_pos = torch.tensor(used, dtype=torch.long)[:, None] + (S - T)
    k_pos = torch.arange(j * block_k, j * block_k + keys.shape[0])[None, :]
    blocked = k_pos > q_pos
    if window is not None:
        blocked |= k_pos <= q_pos - window
    logits = logits.masked_fill(blocked, -math.inf)
    if score == "max":
        return logits.max().item()
    return torch.logsumexp((logits * scale).flatten(), 0).item()


def _pre_score(q, k, b, h, group, i, j, T, S, block_q, block_k, query_stride, z):
    """SHORTLIST's pooled guess for key block j and query block i (float64): ``qsum . mean(keys)`` plus z
    times ``sqrt(qsum^2 . var(keys))``, qsum the sum of the block's used queries, var per dimension."""
    q_sum = q[b, h, _used_rows(i, T, block_q, query_stride)].double().sum(0)  # [D]
    keys = k[b, h // group, j * block_k : min((j + 1) * block_k, S)].double()  # [w, D]
    mean = keys.mean(0)
    var = torch.clamp((keys * keys).mean(0) - mean * mean, min=0.0)
    return (q_sum @ mean + z * torch.sqrt(q_sum * q_sum @ var)).item()


def _rows(q, k, block_q, block_k, top_k, sink_blocks, local_blocks, choose, window=None):
    """Loop over (b, h, i); ``choose(score_of, lo, hi, m, pre_score_of, last)`` returns the m middle blocks of
    one row (``last``: the position of block i's last query)."""
    B, Hq, T, _ = q.shape
    S = k.shape[2]
    group = Hq // k.shape[1]
    nQ = math.ceil(T / block_q)
    out = torch.full((B, Hq, nQ, top_k), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hq):
            for i in range(nQ):
                first = i * block_q + (S - T)
                last = min((i + 1) * block_q, T) - 1 + (S - T)
                n = last // block_k + 1
                lo = 0 if window is None else max(0, (first - window + 1) // block_k)
                sinks = sink_blocks if window is None else 0
                if n - lo <= top_k:
                    row = list(range(lo, n))
                else:
                    m = top_k - sinks - local_blocks

                    def score_of(j, b=b, h=h, i=i):
                        return choose.score(q, k, b, h, group, i, j, T, S)

                    def pre_score_of(j, z, b=b, h=h, i=i):
                        return _pre_score(q, k, b, h, group, i, j, T, S, block_q, block_k, choose.stride, z)

                    middle = choose(score_of, lo + sinks, n - local_blocks, m, pre_score_of, last)
                    row = list(range(sinks)) + sorted(middle) + list(range(n - local_blocks, n))
                out[b, h, i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return out


class _Chooser:
    """Chooses one row's middle blocks by ``search``: "stream" (halving), "oracle" (exact top-m) or
    "shortlist" (the best pre-scores rescored exactly)."""

    def __init__(self, block_q, block_k, score, scale, query_stride, search, window, size=None, z=3.0,
                 exact_from=None):
        self.block_q, self.block_k, self.kind, self.window = block_q, block_k, score, window
        self.scale, self.stride, self.search = scale, query_stride, search
        self.size, self.z = size, z  # SHORTLIST's C (None: the default rule) and pre-score weight
        self.exact_from = exact_from  # SHORTLIST: a row whose last query is at or past it takes every candidate

    def score(self, q, k, b, h, group, i, j, T, S):
        scale = q.shape[-1] ** -0.5 if self.scale is None else self.scale
        return _block_score(
            q, k, b, h, group, i, j, T, S, self.block_q, self.block_k, self.kind, scale, self.stride,
            self.window,
        )

    def __call__(self, score_of, lo, hi, m, pre_score_of, last):
        if self.search == "shortlist":  # C best pre-scores, then the m best exact scores among them
            levels = math.ceil(math.log2(math.ceil((hi - lo) / m)))
            per_level = m if m > 1 else ONE_PICK_WIDTH
            size = min(hi - lo, per_level * max(2, levels) if self.size is None else max(self.size, m))
            if self.size is None and self.exact_from is not None and last >= self.exact_from:  # the input's tail
                size = hi - lo
            short = sorted(range(lo, hi), key=lambda j: (-pre_score_of(j, self.z), j))[:size]
            return sorted(short, key=lambda j: (-score_of(j), j))[:m]
        if self.search == "oracle":  # exact top-m, ties to the lower index
            ranked = sorted(range(lo, hi), key=lambda j: (-score_of(j), j))
            return ranked[:m]
        count = hi - lo
        groups = [(lo + g * count // m, lo + (g + 1) * count // m) for g in range(m)]
        while any(e - s > 1 for s, e in groups):
            halves = []
            for s, e in groups:
                mid = s + (e - s + 1) // 2
                halves += [(s, mid), (mid, e)]
            real = [(s, e) for s, e in halves if e > s]
            ranked = sorted(real, key=lambda se: (-score_of((se[0] + se[1] - 1) // 2), se[0]))
            groups = sorted(ranked[:m])
        return [s for s, _ in groups]


def stream_reference(q, k, config: MaskConfig, *, scale=None, window=None) -> BlockMask:
    """The hierarchical search, one row at a time (same signature as ``stream.stream_select``)."""
    chooser = _Chooser(config.block_q, config.block_k, config.score, scale, config.query_stride, "stream", window)
    return _mask(q, k, config, chooser, window)


def oracle_reference(q, k, config: MaskConfig, *, scale=None, window=None) -> BlockMask:
    """The exact top-m selection, one row at a time (same signature as ``oracle.oracle_select``)."""
    chooser = _Chooser(config.block_q, config.block_k, config.score, scale, config.query_stride, "oracle", window)
    return _mask(q, k, config, chooser, window)


def shortlist_reference(q, k, config: MaskConfig, *, scale=None, window=None, size=None, z=3.0,
                        input_end=None) -> BlockMask:
    """SHORTLIST, one row at a time (same signature as ``shortlist.shortlist_select``). Without ``size``, a
    row whose last query is one of the input's last ``EXACT_TAIL`` tokens (the input ends at ``input_end``,
    default S) shortlists every candidate."""
    end = k.shape[2] if input_end is None else input_end
    chooser = _Chooser(config.block_q, config.block_k, config.score, scale, config.query_stride, "shortlist",
                       window, size, z, end - EXACT_TAIL)
    return _mask(q, k, config, chooser, window)


def _mask(q, k, config: MaskConfig, chooser, window) -> BlockMask:
    indices = _rows(q.cpu(), k.cpu(), config.block_q, config.block_k, config.top_k, config.sink_blocks,
                    config.local_blocks, chooser, window)
    return BlockMask(indices.to(q.device), config.block_q, config.block_k)
