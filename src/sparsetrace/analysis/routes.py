"""Needle-in-a-haystack retrieval in a trace: needle mass per head and the route across layers.

Reads a :class:`sparsetrace.store.Trace` only (never the model). Positions are BLOCKS: token t lies in
block ``t // block`` (query and key blocks must have one size, as the tracer writes them). The answer is
read at the last token, so the *answer block* is the last query block ``nQ - 1``; the *needle blocks*
are the key blocks that overlap the needle's token span(s).

Needle mass. ``m[l, h]`` = the mass that query block ``a`` (the answer block) of layer l, head h puts
on the needle blocks it kept: the sum over kept entries ``r`` with ``indices[l, h, a, r]`` in the
needle blocks of ``mass[l, h, a, r]`` (a trace's mass is the mean over the block's queries of the
softmax probability, so ``m`` is in [0, 1]; 0 where the mask dropped every needle block). Retrieval
heads show up as the few (layer, head) with large m.

Route. A route is a chain of block positions ``b_0, b_1, ..., b_L`` with ``b_0`` a needle block and
``b_L = a``, such that at every layer l = 0..L-1 query block ``b_{l+1}`` kept key block ``b_l`` (in at
least one head). Its edge weight at layer l is ``w_l(b_{l+1} -> b_l)`` = the max over heads of the mass
on that kept block ("max", default) or the mean over heads, with 0 where a head did not keep it
("mean"); its score is ``sum_l log w_l`` (the log of the product of the masses). The route returned
is the highest-scoring one, by dynamic programming forward from the needle:

    V_0[j]       = 0 if j is a needle block else -inf                    (key blocks j)
    V_{l+1}[i]   = max over kept (h, r) with j = indices[l, h, i, r] of  V_l[j] + log w_l(i -> j)
    best score   = V_L[a];  the route follows the arg-max back-pointers from a.

Each layer costs one pass over the trace rows, ``O(H * nQ * k)``, so the route costs ``O(L * H * nQ
* k)`` time and ``O(L * nQ)`` memory, never ``nQ^2``. Since masks are causal, ``b_0 <= b_1 <= ... <=
b_L``. Footguns: the residual stream also carries information along a position for free, which the
route does not count (staying put costs the diagonal block's mass like any other edge); and with
"max" consecutive edges may come from different heads (``heads`` records which).

Success versus failure. Over a sweep, :func:`compare_heads` takes the needle mass ``[L, H]`` of every
case and whether the model answered it, and ranks (layer, head) by how well their mass separates the
two groups: difference of means and the AUC (probability that a success case has more needle mass
than a failure case, ties counted one half).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import UsageError


def _block_size(trace) -> int:
    if trace.block_q != trace.block_k:
        raise UsageError(
            f"routes need one block size for queries and keys; this trace has block_q="
            f"{trace.block_q}, block_k={trace.block_k}."
        )
    return trace.block_k


def needle_blocks(spans, block: int) -> list[int]:
    """Key blocks overlapping any token span ``[start, end)`` in ``spans``, sorted and unique."""
    blocks = set()
    for start, end in spans:
        if end <= start:
            raise UsageError(f"needle token span ({start}, {end}) is empty.")
        blocks.update(range(start // block, (end - 1) // block + 1))
    return sorted(blocks)


def needle_mass(trace, spans, query_block: int = -1) -> torch.Tensor:
    """float32 ``[L, H]``: mass from ``query_block`` (default the answer block, the last) onto the
    key blocks of the needle token ``spans``, per layer and head (see the module docstring)."""
    block = _block_size(trace)
    targets = torch.tensor(needle_blocks(spans, block), dtype=torch.int32)
    if int(targets.max()) >= trace.num_key_blocks:
        raise UsageError(f"needle spans {spans} reach past the trace's {trace.num_tokens} tokens.")
    q = query_block % trace.num_query_blocks
    out = torch.zeros(trace.num_layers, trace.num_heads)
    for layer in range(trace.num_layers):
        idx, mass = trace.layer(layer)  # [H, nQ, k] each
        hit = torch.isin(idx[:, q], targets)  # [H, k]; -1 padding never hits
        out[layer] = (mass[:, q] * hit).sum(-1)
    return out


@dataclass
class NeedleRoute:
    """The best needle-to-answer chain of kept blocks (see the module docstring).

    ``blocks``: ``b_0 .. b_L`` (L + 1 block positions, ``b_0`` a needle block, ``b_L`` the answer
    block); ``masses[l]`` the edge weight at layer l; ``heads[l]`` the head giving it (the arg-max
    head under "max", -1 under "mean"); ``score`` the sum of log masses (-inf: no chain exists).
    """

    blocks: list[int]
    masses: list[float]
    heads: list[int]
    score: float
    needle_blocks: list[int]
    answer_block: int
    block_size: int
    aggregate: str = "max"

    @property
    def found(self) -> bool:
        return math.isfinite(self.score)

    def to_json(self) -> dict:
        data = asdict(self)
        data["score"] = self.score if self.found else None  # strict JSON has no -inf
        return data


def _layer_edges(idx: torch.Tensor, mass: torch.Tensor, aggregate: str):
    """Edges of one layer as flat arrays ``(query block i, key block j, weight, head)``.

    ``idx``/``mass`` are ``[H, nQ, k]``. "max" keeps every (h, i, r) entry (the max over heads is
    taken by the DP's own max); "mean" sums each (i, j) pair over heads and divides by H.
    """
    H, nQ, k = idx.shape
    i = torch.arange(nQ).view(1, nQ, 1).expand(H, nQ, k)
    h = torch.arange(H).view(H, 1, 1).expand(H, nQ, k)
    keep = (idx >= 0) & (mass > 0)
    qi, kj, w, hh = i[keep], idx[keep].long(), mass[keep].double(), h[keep]
    if aggregate == "max":
        return qi, kj, w, hh
    pair = qi * (int(kj.max()) + 1 if kj.numel() else 1) + kj
    uniq, inverse = torch.unique(pair, return_inverse=True)
    total = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, w)
    first = torch.zeros(uniq.numel(), dtype=torch.long).scatter_(0, inverse, torch.arange(pair.numel()))
    return qi[first], kj[first], total / H, torch.full_like(qi[first], -1)


def needle_route(trace, spans, *, answer_block: int = -1, aggregate: str = "max") -> NeedleRoute:
    """The highest-mass chain of kept blocks from the needle (layer 0) to the answer block (last
    layer), by dynamic programming over layers in ``O(L * H * nQ * k)``; see the module docstring."""
    if aggregate not in ("max", "mean"):
        raise UsageError(f"aggregate={aggregate!r} is not 'max' or 'mean'.")
    block = _block_size(trace)
    nQ, L = trace.num_query_blocks, trace.num_layers
    a = answer_block % nQ
    start = needle_blocks(spans, block)
    if start[0] > a:
        raise UsageError(f"the needle (block {start[0]}) lies after the answer block {a}.")
    value = torch.full((nQ,), -math.inf, dtype=torch.float64)  # V_0 over key blocks
    value[[j for j in start if j < nQ]] = 0.0
    back = torch.full((L, nQ), -1, dtype=torch.long)  # arg-max key block per (layer, query block)
    back_w = torch.zeros(L, nQ, dtype=torch.float64)
    back_h = torch.full((L, nQ), -1, dtype=torch.long)
    for layer in range(L):
        qi, kj, w, hh = _layer_edges(*trace.layer(layer), aggregate)
        cand = value[kj] + torch.log(w)  # [E]
        new = torch.full((nQ,), -math.inf, dtype=torch.float64).scatter_reduce(
            0, qi, cand, reduce="amax", include_self=True)
        # Back-pointer: the first edge reaching the max (ties: lowest key block, then head).
        hit = torch.isfinite(cand) & (cand == new[qi])
        order = torch.argsort(qi[hit] * (nQ + 1) * 1024 + kj[hit] * 1024 + hh[hit].clamp(min=0),
                              stable=True)
        qs, ks, ws, hs = qi[hit][order], kj[hit][order], w[hit][order], hh[hit][order]
        firsts = torch.ones_like(qs, dtype=torch.bool)
        firsts[1:] = qs[1:] != qs[:-1]
        back[layer, qs[firsts]] = ks[firsts]
        back_w[layer, qs[firsts]] = ws[firsts]
        back_h[layer, qs[firsts]] = hs[firsts]
        value = new
    score = float(value[a])
    if not math.isfinite(score):
        return NeedleRoute([], [], [], -math.inf, start, a, block, aggregate)
    blocks, masses, heads = [a], [], []
    for layer in range(L - 1, -1, -1):
        i = blocks[-1]
        masses.append(float(back_w[layer, i]))
        heads.append(int(back_h[layer, i]))
        blocks.append(int(back[layer, i]))
    return NeedleRoute(blocks[::-1], masses[::-1], heads[::-1], score, start, a, block, aggregate)


# --------------------------------------------------------------------------- sweeps

@dataclass
class HeadSeparation:
    """Which (layer, head) needle masses separate answered cases from failed ones.

    ``mean_success`` / ``mean_failure`` / ``difference`` / ``auc`` are ``[L][H]`` lists; ``top``
    the best (layer, head) by AUC then difference, as dicts. With no success or no failure the
    statistics are None (nothing to compare).
    """

    num_success: int
    num_failure: int
    mean_success: list | None
    mean_failure: list | None
    difference: list | None
    auc: list | None
    top: list[dict]

    def to_json(self) -> dict:
        return asdict(self)


def auc(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Mann-Whitney AUC along dim 0: P(positive > negative) + P(equal) / 2, per remaining index."""
    p, n = positive.double()[:, None], negative.double()[None, :]
    return ((p > n).double() + 0.5 * (p == n).double()).mean(dim=(0, 1)).float()


def compare_heads(masses, success, top: int = 10) -> HeadSeparation:
    """Compare needle masses ``[L, H]`` (one per case) between answered (``success`` True) and
    failed cases: difference of means and AUC per (layer, head)."""
    if len(masses) != len(success):
        raise UsageError(f"{len(masses)} mass tables but {len(success)} success flags.")
    ok = [m for m, s in zip(masses, success) if s]
    bad = [m for m, s in zip(masses, success) if not s]
    if not ok or not bad:
        return HeadSeparation(len(ok), len(bad), None, None, None, None, [])
    pos, neg = torch.stack(ok), torch.stack(bad)  # [n, L, H]
    mean_pos, mean_neg = pos.mean(0), neg.mean(0)
    diff, area = mean_pos - mean_neg, auc(pos, neg)
    L, H = diff.shape
    ranked = sorted(((float(area[l, h]), float(diff[l, h]), l, h) for l in range(L) for h in range(H)),
                    reverse=True)[:top]
    return HeadSeparation(
        len(ok), len(bad), mean_pos.tolist(), mean_neg.tolist(), diff.tolist(), area.tolist(),
        [{"layer": l, "head": h, "auc": a, "difference": d, "mean_success": float(mean_pos[l, h]),
          "mean_failure": float(mean_neg[l, h])} for a, d, l, h in ranked],
    )


def needle_in_forced_blocks(trace, spans, answer_block: int = -1) -> bool:
    """True when a needle block is one the answer block keeps by force (a sink, or one of the local
    blocks ending at the answer block): then its mass says little about retrieval, since sinks and
    neighbours draw mass whatever they hold (depth 0 and 100 needles at short lengths)."""
    block = _block_size(trace)
    a = answer_block % trace.num_query_blocks
    config = trace.trace_config
    sinks, local = (0, 0) if config is None else (config.mask.sink_blocks, config.mask.local_blocks)
    return any(j < sinks or j > a - local for j in needle_blocks(spans, block))


def case_report(trace, spans, *, aggregate: str = "max") -> dict:
    """JSON-able needle mass ``[L][H]``, its per-layer max over heads, and the route of one case."""
    mass = needle_mass(trace, spans)
    route = needle_route(trace, spans, aggregate=aggregate)
    return {
        "needle_in_forced_blocks": needle_in_forced_blocks(trace, spans),
        "needle_mass": [[round(float(x), 6) for x in row] for row in mass],
        "needle_mass_max": [round(float(x), 6) for x in mass.max(dim=1).values],
        "route": route.to_json(),
    }

