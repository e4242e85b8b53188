"""What did a span of text read? Its sources, propagated back through every layer of a trace.

Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers") on block traces
instead of T x T patterns. Positions are BLOCKS (query and key blocks have one size, as the tracer writes
them: block i holds tokens ``[i*block, (i+1)*block)``); the span's flow starts at the last layer and moves
down to the input:

  1. start: ``p_L[i]`` = the share of the span's tokens in query block i (default span: the last query
     block, where the next token is read). A trace row is the mean over ALL queries of its block, so a
     span that covers part of a block reads the whole block's row;
  2. per layer l, a block-to-block matrix ``A_l[i, j]`` from the trace rows (-1 entries anywhere at the
     row end are skipped, so rows of any width work; each head's row is renormalised to sum to 1):
       "mean": the mean over heads of the mass query block i put on key block j (0 where a head did not
               keep j): the head mix the residual stream receives; rows sum to 1;
       "max":  the max over heads, rows renormalised to 1: a head that reads j strongly counts fully
               even when the other heads look elsewhere.
     The sink: with ``sink="no-op"`` (default) what a row outside the sink puts on the sink block(s) stays
     at the row's own block. Heads park attention on token 0 when they have nothing to read; counted as a
     source (``sink="source"``, plain rollout) the sink takes nearly all the flow (0.996 of it on a
     2k-token SmolLM2 trace) and leaves noise-sized scores to everything else. Sliding-window layers need
     nothing special: their rows hold only blocks inside the window;
  3. residual share r (rollout's 0.5): ``p_l = r * p_{l+1} + (1 - r) * A_l^T p_{l+1}``. r = 0 is the
     plain product of attention matrices; r > 0 lets information stay at its position, as the residual
     stream does (without it, flow leaves the span at the first layer whatever the span attends to);
  4. the score of key block j is ``p_0[j]``: the share of the span's flow that ends in j. Scores sum to 1
     (less the unattributed share, below);
  5. passages: a sentence or paragraph (:mod:`.sentences`) gets the scores of its tokens, each block's
     score spread evenly over its tokens. Rankings leave out the span's own blocks (trivially their own
     source through the residual) and the sink block(s) (where heads park attention they do not use);
  6. by layer: the score of j splits exactly into the flow that entered j from ANOTHER block at layer l
     and stayed at j down to the input, ``entry[l, j] = (1-r) (A_l^T p_{l+1} - A_l[j,j] p_{l+1}[j])[j] *
     prod_{l' < l} (r + (1-r) A_{l'}[j, j])``, plus the span's own share that never left (``origin``):
     ``score = origin + entry.sum(0)`` (tested). "Where a passage enters" = its layers of largest entry;
  7. path: for each top source, the chain of blocks ``b_0 = source, b_1, ..., b_L`` (in the span) where
     ``b_{l+1}`` is the biggest contributor to the flow at ``b_l`` across layer l (residual included):
     the route along which most of the source's score came.

Missed mass (the dense attention the mask dropped): with a per-row source ``missed[l, h]`` -> float32
``[nQ, 3]`` (estimate, low, high: ``trace.missed`` where the trace has it), the dense model's attention
on the kept blocks is ``(1 - mu) *`` the trace's (the trace holds the sparse model's renormalised rows),
and the dropped ``mu`` went to unkept causal blocks, place unknown. Scores then count the flow along
kept edges only: ``score`` uses the estimate of mu, ``low`` its upper end (kept scaled by ``1 - high``;
the dropped mass assumed to reach nothing) and ``high`` its lower end plus every unit of flow that left
through a dropped edge at a query block that could reach the block (key blocks ``<= i``): a bound, since
flow only moves to earlier blocks. ``unattributed`` = 1 - sum(score). Without missed mass the bars are
zero and the scores are the sparse model's own flow. Under "max" a row's dropped share is the mean of its
heads' mu. Both ``low <= score <= high`` and ``low <= dense flow <= high`` (the latter when mu lies in its
interval) are tested on synthetic traces whose dense rows are known.

Cost: two passes over the trace, one layer alive at a time: ``O(L * H * nQ * k)`` time (plus a sort per
layer under "max"), ``O(L * nQ)`` memory; never an ``nQ x nQ`` matrix. Device-agnostic torch
(``device="cuda"`` moves each layer's rows there). This module reads traces only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from .sentences import Sentence, text_passages

AGGREGATES = ("mean", "max")
SINKS = ("no-op", "source")
KINDS = ("sentence", "paragraph", "block")
RESIDUAL = 0.5  # attention rollout's share of the residual stream
TOP = 10
CPU_THREADS = 1  # see sources(): the thread pool costs more than it gives on a shared CPU
HEAD_GROUP = 2**19  # on the CPU, a layer's rows are read and propagated about this many entries at a time


# --------------------------------------------------------------------------- inputs

def parse_span(text: str) -> tuple[int | None, int | None]:
    """``"START:END"`` (Python slice syntax, ends optional, negatives count from the end) -> ints."""
    parts = text.split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return tuple(int(p) if p.strip() else None for p in parts)
    except ValueError:
        raise UsageError(f"span {text!r} is not START:END in tokens (e.g. 1990:2048, -32:, or :100).") from None


def resolve_span(trace, span) -> tuple[int, int]:
    """``[start, end)`` in tokens: ``span`` None (the last query block), a ``(start, end)`` pair or a
    slice, Python-style (None = open end, negatives count from the end). UsageError when empty."""
    T = trace.num_tokens
    if span is None:
        return (trace.num_query_blocks - 1) * trace.block_q, T
    if isinstance(span, str):
        span = parse_span(span)
    start, end = (span.start, span.stop) if isinstance(span, slice) else span
    a, b, _ = slice(start, end).indices(T)
    if b <= a:
        raise UsageError(f"the span {start}:{end} holds no token of this {T}-token trace; give START:END with "
                         f"0 <= START < END <= {T}.")
    return a, b


def _block_size(trace) -> int:
    if trace.block_q != trace.block_k:
        raise UsageError(f"sources need one block size for queries and keys; this trace has block_q="
                         f"{trace.block_q}, block_k={trace.block_k}.")
    return trace.block_k


def _missed_source(trace, missed):
    """``(layer) -> [H, nQ, 3] float64 or None`` from what the caller gave (see :func:`sources`)."""
    if missed is False:
        return None
    if missed is None:  # the trace's own estimates (Trace.missed), where it was recorded with them
        if not getattr(trace, "has_missed", False):
            return None
        missed = trace.missed
    if isinstance(missed, torch.Tensor):
        want = (trace.num_layers, trace.num_heads, trace.num_query_blocks, 3)
        if tuple(missed.shape) != want:
            raise UsageError(f"missed mass of shape {tuple(missed.shape)}; want [L, H, nQ, 3] = {list(want)} "
                             "(estimate, low, high per row).")
        return lambda layer: missed[layer].double()
    if not callable(missed):
        raise UsageError(f"missed= takes None, False, a callable (layer, head) -> [nQ, 3] or a [L, H, nQ, 3] "
                         f"tensor; got {type(missed).__name__}.")

    def per_layer(layer):
        rows = [missed(layer, head) for head in range(trace.num_heads)]
        if any(r is None for r in rows):
            return None
        out = torch.stack([torch.as_tensor(r) for r in rows]).double()  # [H, nQ, 3]
        if tuple(out.shape) != (trace.num_heads, trace.num_query_blocks, 3):
            raise UsageError(f"missed({layer}, head) gave rows of shape {tuple(out.shape[1:])}; want "
                             f"[nQ, 3] = [{trace.num_query_blocks}, 3].")
        return out
    if per_layer(0) is None:  # the callable has no estimates (and a wrong shape fails here, before any work)
        return None
    return per_layer


def _kept_shares(mu: torch.Tensor) -> torch.Tensor:
    """``[H, nQ, 3]`` missed (estimate, low, high) -> kept shares for the (score, low, high) columns:
    ``1 - estimate``, ``1 - high``, ``1 - low``. Unknown (NaN) counts as 0 missed for the estimate and
    as the widest interval [0, 1] for the bounds."""
    est = torch.nan_to_num(mu[..., 0], nan=0.0)
    lo = torch.nan_to_num(mu[..., 1], nan=0.0)
    hi = torch.nan_to_num(mu[..., 2], nan=1.0)
    return 1 - torch.stack([est, hi, lo], -1).clamp(0, 1)


# --------------------------------------------------------------------------- one layer

@dataclass
class _Edges:
    """A layer's block matrix as entries ``A[qi, kj - 1] += w``: ``kj`` holds key block + 1, and 0 for a -1
    entry (a spare slot with weight 0, so no entry is ever compacted away). Under "mean" in the trace's own
    layout: ``kj`` ``[H, nQ, k]``, ``qi`` the broadcastable ``[1, nQ, 1]`` row index (the heads' entries add
    up), ``w [H, nQ, k, 1]`` the masses, ``scale [H, nQ, C]`` one factor per head row and score column
    (1 / (row total * H), times the kept share) and ``own [H, nQ]`` each head row's mass on its own block
    (the sink's included under "no-op"). Under "max" one flat entry per (row, key block) pair: ``qi``,
    ``kj`` ``[U]``, ``w [U, C]``. ``lost``: the dropped share of each row ``[nQ]`` (at the missed mass's
    upper end), or None."""

    qi: torch.Tensor
    kj: torch.Tensor
    w: torch.Tensor
    lost: torch.Tensor | None
    scale: torch.Tensor | None = None
    own: torch.Tensor | None = None

    def flat(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(qi, key block, w)`` flattened, ``w`` scaled: ``[E]``, ``[E]`` (-1 for padding), ``[E, C]``."""
        w = self.w if self.scale is None else self.w * self.scale[:, :, None, :]
        qi = torch.broadcast_to(self.qi, self.kj.shape).reshape(-1)
        return qi, self.kj.reshape(-1) - 1, w.reshape(-1, w.shape[-1])

    def pull(self, p: torch.Tensor, num_key_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A^T p [nK, C], diag(A) [nQ])`` for the flow ``p [nQ, C]`` (float32 in, float64 out)."""
        u = torch.zeros(num_key_blocks + 1, p.shape[1], device=p.device)
        diag = self.add_pull(p.float(), u)
        return u[1:].double(), (diag.sum(0) if self.scale is not None else diag).double()

    def add_pull(self, p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Add ``A^T p`` to ``u [nK + 1, C]`` (float32; row 0 takes the -1 entries) for the flow ``p [nQ, C]``
        (float32); return the diagonal: per head row ``[H, nQ]`` under "mean" (their sum over heads is
        ``diag(A)``), ``diag(A) [nQ]`` under "max". The entries add up in their order, so heads pulled a
        few at a time into one ``u`` give the same float32 sums as all at once."""
        C = p.shape[1]
        if self.scale is not None:  # one factor per head row first, then one pass over the entries
            values = self.w * (self.scale * p[None])[:, :, None, :]                       # [H, nQ, k, C]
            diag = self.own * self.scale[..., 0]                                           # [H, nQ]
        else:
            values = self.w * p[self.qi]                                                   # [U, C]
            own = torch.where(self.kj == self.qi + 1, self.w[:, 0], 0.0)
            diag = torch.zeros(u.shape[0], device=p.device).index_add_(0, self.kj, own)[1:]
        if C == 1:  # the same sums; a 1-D index_add_ runs 3x faster on the CPU
            u.view(-1).index_add_(0, self.kj.reshape(-1), values.reshape(-1))
        else:
            u.index_add_(0, self.kj.reshape(-1), values.reshape(-1, C))
        return diag


def layer_edges(indices: torch.Tensor, mass: torch.Tensor, aggregate: str, mu: torch.Tensor | None,
                num_key_blocks: int, sink_blocks: int = 0, *, num_heads: int | None = None) -> _Edges:
    """The matrix ``A_l`` of one layer from its rows ``indices``/``mass`` ``[H, nQ, k]`` (see the module
    docstring, step 2), with the kept shares of ``mu [H, nQ, 3]`` (or None) in three columns. With
    ``sink_blocks`` S > 0, what a row outside the sink puts on the sink blocks stays at the row's own block
    (the sink read as a no-op). Under "mean" the rows may be some of the layer's ``num_heads`` heads
    (default: all of them, H): their entries, a part of ``A_l``.

    Rows are sorted ascending (the trace's contract), so a row's sink blocks can only sit in its first S
    entries and its own (diagonal) block only in its last valid one: both are read there, not searched
    for in every entry. Weights are float32, like the trace's masses (float16 on disk); indices int64
    (CPU ``index_add_`` with int32 ones took 25x longer: 1.0 s against 0.04 s per 1M-token layer)."""
    H, nQ, k = indices.shape
    S = min(sink_blocks, k)
    valid = indices >= 0                                                    # [H, nQ, k]
    m = torch.where(valid, mass.float(), 0.0)                               # junk behind -1 never counts
    total = m.sum(-1, keepdim=True)                                         # [H, nQ, 1]
    row = torch.arange(nQ, device=indices.device).view(1, nQ, 1)            # [1, nQ, 1]
    kj = indices.long() + 1                                                 # [H, nQ, k]; -1 -> slot 0
    kept = None if mu is None else _kept_shares(mu).float()                 # [H, nQ, 3]
    lost = None if mu is None else (1 - kept[..., 1].double()).mean(0)      # [nQ]: mean over heads of mu high
    if aggregate == "mean":
        last = (valid.sum(-1, keepdim=True) - 1).clamp(min=0)               # [H, nQ, 1]: last valid entry
        own = torch.where(indices.gather(-1, last) == row, m.gather(-1, last), 0.0)[..., 0]   # [H, nQ]
        if S > 0:
            head = kj[..., :S]                                              # where sorted rows keep sinks
            to_sink = (head >= 1) & (head <= sink_blocks) & (row >= sink_blocks)
            kj[..., :S] = torch.where(to_sink, row + 1, head)
            own = own + (m[..., :S] * to_sink).sum(-1)
        scale = 1 / (torch.where(total > 0, total, 1.0) * (num_heads or H))  # each head's row sums to 1 / H
        scale = scale if kept is None else scale * kept                     # [H, nQ, C]
        return _Edges(row, kj, m[..., None], lost, scale, own)
    # "max": one entry per (query block, key block) pair, the max over heads, rows renormalised
    nK = num_key_blocks
    m = m / torch.where(total > 0, total, 1.0)
    qi = torch.broadcast_to(row, kj.shape).reshape(-1)
    pair, inverse = torch.unique(qi * (nK + 1) + kj.reshape(-1), return_inverse=True)   # [U], [E]
    U, mv = pair.shape[0], m.reshape(-1)
    top = torch.zeros(U, device=mv.device).scatter_reduce(0, inverse, mv, "amax")
    uq, uk = pair // (nK + 1), pair % (nK + 1)
    z = torch.zeros(nQ, device=mv.device).index_add_(0, uq, top)[uq]       # row sums
    z = torch.where(z > 0, z, 1.0)
    if kept is None:
        w = (top / z)[:, None]
    else:
        share = kept[:, :, None, :].expand(H, nQ, k, 3).reshape(-1, 3)
        cols = [torch.zeros(U, device=mv.device).scatter_reduce(0, inverse, mv * share[:, c], "amax")
                for c in range(3)]
        w = torch.stack(cols, -1) / z[:, None]                             # [U, 3]
    if sink_blocks > 0:  # after the max: the sink's share adds to the diagonal's
        uk = torch.where((uk >= 1) & (uk <= sink_blocks) & (uq >= sink_blocks), uq + 1, uk)
    return _Edges(uq, uk, w, lost)


# --------------------------------------------------------------------------- the result

class _Blocks(Sequence):
    """The key blocks as passages (records made when asked for: a 1M-token trace has 32k blocks)."""

    def __init__(self, n: int, block: int, num_tokens: int):
        self.n, self.block, self.num_tokens = n, block, num_tokens
        self.token_start = torch.arange(n) * block                                # [n] each, int64
        self.token_end = torch.clamp(self.token_start + block, max=num_tokens)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j):
        if isinstance(j, slice):
            return [self[i] for i in range(*j.indices(self.n))]
        if not 0 <= j < self.n:
            raise IndexError(j)
        return Sentence(j, "", -1, -1, j * self.block, min(self.num_tokens, (j + 1) * self.block))


@dataclass
class Units:
    """Scores of a set of passages (sentences, paragraphs or blocks) of one :class:`Sources`.

    ``passages``: the :class:`~sparsetrace.analysis.sentences.Sentence` records (blocks as one record
    each); ``score``/``low``/``high`` ``[n]`` and ``entry [L, n]`` count only blocks outside the span and
    the sink (the ranking's scope); ``block`` ``[n]``: each passage's strongest such block (-1: none)."""

    kind: str
    passages: Sequence[Sentence]
    score: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    entry: torch.Tensor
    block: torch.Tensor

    def order(self) -> list[int]:
        """Passage indices by decreasing score, passages without score (all inside the span or the sink)
        left out; ties keep text order."""
        ranked = torch.sort(-self.score, stable=True).indices
        return ranked[((self.block >= 0) & (self.score > 0))[ranked]].tolist()


@dataclass
class Sources:
    """The sources of one span (see the module docstring). Block arrays are float64 over KEY blocks:
    ``score``, ``low``, ``high`` ``[nK]``, ``entry [L, nK]``, ``origin [nK]``; ``kept_high`` (the kept-edge
    part of ``high``) and ``reach`` (the dropped flow that could reach each block) make up ``high``;
    ``excluded [nK]`` marks the span's and the sink's blocks (left out of rankings); ``paths`` maps a block
    to its chain ``[b_0 = block, ..., b_L]`` and ``path_shares`` to the share of the flow at each step's
    lower end that came along it."""

    span: tuple[int, int]
    block_size: int
    num_tokens: int
    aggregate: str
    residual: float
    sink: str
    sink_blocks: int
    score: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    kept_high: torch.Tensor
    reach: torch.Tensor
    entry: torch.Tensor
    origin: torch.Tensor
    excluded: torch.Tensor
    has_missed: bool
    text: str | None = None
    token_offsets: torch.Tensor | None = None
    paths: dict[int, list[int]] = field(default_factory=dict)
    path_shares: dict[int, list[float]] = field(default_factory=dict)
    _units: dict[str, Units] = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int:
        return self.entry.shape[0]

    @property
    def unattributed(self) -> float:
        """The span's flow that left through dropped (missed) edges: 1 - sum of the scores."""
        return max(0.0, 1.0 - float(self.score.sum()))

    def span_text(self, a: int, b: int) -> str | None:
        """The text of tokens ``[a, b)``, or None for a trace without text."""
        if self.text is None or self.token_offsets is None:
            return None
        return self.text[int(self.token_offsets[a, 0]): int(self.token_offsets[b - 1, 1])]

    def units(self, kind: str = "sentence") -> Units:
        """Scores of every sentence, paragraph or block (``kind``), computed once."""
        if kind not in KINDS:
            raise UsageError(f"unit {kind!r} is not one of {', '.join(KINDS)}.")
        if kind not in self._units:
            self._units[kind] = self._make_units(kind)
        return self._units[kind]

    def _passages(self, kind: str):
        if kind == "block":
            return _Blocks(self.score.shape[0], self.block_size, self.num_tokens)
        if self.text is None or self.token_offsets is None:
            raise UsageError(f"this trace has no text and character offsets, so no {kind}s; use unit "
                             "'block' (--unit block), or trace a text with `sparsetrace trace --text-file`.")
        return text_passages(self.text, self.token_offsets[: self.num_tokens], kind)

    def _make_units(self, kind: str) -> Units:
        passages = self._passages(kind)
        n, bk, nK, T = len(passages), self.block_size, self.score.shape[0], self.num_tokens
        # (passage u, block j, share w of the block's tokens in the passage) for every overlap outside the
        # span and the sink, without a Python loop (a 1M-token text has ~10^5 sentences)
        start, end = passages.token_start, passages.token_end                        # [n] each
        first, count = start // bk, (end - 1) // bk - start // bk + 1              # [n] each
        u = torch.repeat_interleave(torch.arange(n), count)                          # [P]
        j = first[u] + torch.arange(u.shape[0]) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
        w = ((torch.minimum(end[u], (j + 1) * bk) - torch.maximum(start[u], j * bk)).double()
             / (torch.clamp((j + 1) * bk, max=T) - j * bk).double())
        keep = ~self.excluded[j]
        u, j, w = u[keep], j[keep], w[keep]

        def gather(values: torch.Tensor) -> torch.Tensor:  # [..., nK] -> [..., n]
            out = torch.zeros(*values.shape[:-1], n, dtype=torch.float64)
            return out.index_add_(-1, u, values[..., j] * w)

        score = gather(self.score)
        # high: the kept edges' parts add up; the dropped flow that could reach the passage counts once,
        # at its first block (the most any of its blocks can get), not once per block
        first = torch.full((n,), nK, dtype=torch.long).scatter_reduce(0, u, j, "amin")
        reach = torch.cat([self.reach, torch.zeros(1, dtype=torch.float64)])[first]
        high = (gather(self.kept_high) + reach).clamp(max=1.0).maximum(score)
        contrib = self.score[j] * w
        value = torch.full((n,), -1.0, dtype=torch.float64).scatter_reduce(0, u, contrib, "amax")
        hit = contrib == value[u]
        best = torch.full((n,), nK, dtype=torch.long).scatter_reduce(0, u[hit], j[hit], "amin")
        best[best == nK] = -1  # the strongest block (the first of equals); -1: none outside the span/sink
        return Units(kind, passages, score, gather(self.low), high, gather(self.entry), best)

    # -- tables

    def top(self, n: int = TOP, kind: str = "sentence") -> list[dict]:
        """The ``n`` strongest passages of ``kind`` as dicts (see :meth:`rows`)."""
        units = self.units(kind)
        return [self._row(units, i, rank) for rank, i in enumerate(units.order()[:n], 1)]

    def rows(self, kind: str = "sentence") -> list[dict]:
        """Every passage of ``kind``, ranked ones first (rank 0: not ranked: inside the span or the sink,
        or no flow reached it), as dicts: ``rank, kind, index, token_start, token_end, score, low, high,
        layers`` (entry layers, strongest first, with their share of the score), ``block`` (the strongest),
        ``path`` (its chain, where computed), ``text``."""
        units = self.units(kind)
        ranked = units.order()
        rest = sorted(set(range(len(units.passages))) - set(ranked))
        return ([self._row(units, i, rank) for rank, i in enumerate(ranked, 1)]
                + [self._row(units, i, 0) for i in rest])

    @staticmethod
    def entry_layers(units: Units, i: int, n: int = 3) -> list[tuple[int, float]]:
        """The ``n`` layers where most of passage i's score entered it, with their share of its score."""
        e, total = units.entry[:, i], float(units.score[i])
        if total <= 0:
            return []
        order = torch.sort(-e, stable=True).indices[:n].tolist()
        return [(layer, float(e[layer]) / total) for layer in order if e[layer] > 0]

    def _row(self, units: Units, i: int, rank: int) -> dict:
        p = units.passages[i]
        block = int(units.block[i])
        return {"rank": rank, "kind": units.kind, "index": p.index, "token_start": p.token_start,
                "token_end": p.token_end, "score": float(units.score[i]), "low": float(units.low[i]),
                "high": float(units.high[i]),
                "layers": [[layer, round(share, 4)] for layer, share in self.entry_layers(units, i)],
                "block": block, "path": self.paths.get(block),
                "text": p.text if units.kind != "block" else self.span_text(p.token_start, p.token_end)}

    def summary(self, n: int = TOP, kind: str = "sentence") -> dict:
        """JSON-able: the settings, the span, and the top ``n`` passages with their entry per layer."""
        units = self.units(kind)
        return {"span": list(self.span), "span_text": self.span_text(*self.span), "aggregate": self.aggregate,
                "residual": self.residual, "sink": self.sink, "sink_blocks": self.sink_blocks,
                "block_size": self.block_size, "num_layers": self.num_layers,
                "unit": kind, "missed_mass": self.has_missed, "unattributed": self.unattributed,
                "excluded_blocks": torch.nonzero(self.excluded).flatten().tolist(),
                "top": [{**row, "entry": units.entry[:, row["index"]].tolist()} for row in self.top(n, kind)]}


# --------------------------------------------------------------------------- the two passes

def sources(trace, span=None, *, aggregate: str = "mean", residual: float = RESIDUAL, missed=None,
            sink: str = "no-op", sink_blocks: int | None = None, top: int = TOP, device="cpu") -> Sources:
    """The sources of a token ``span`` of ``trace`` (see the module docstring for the definitions).

    ``span``: ``(start, end)`` tokens, a slice or ``"START:END"`` (negatives count from the end; default
    the last query block). ``aggregate``: "mean" or "max" over heads. ``residual``: the residual share r
    in [0, 1). ``missed``: per-row missed mass: None = ``trace.missed`` where the trace has it, False =
    none, a callable ``(layer, head) -> [nQ, 3]`` (estimate, low, high; None = none) or a ``[L, H, nQ,
    3]`` tensor. ``sink_blocks``: blocks at the start left out of rankings (default: the trace's forced
    sink blocks, at least 1: models park attention on token 0). ``top``: how many of the strongest blocks
    (and of the strongest sentences' and paragraphs' blocks) get a path. ``device``: where to compute.
    """
    # One CPU thread: the work is a few passes over each layer's rows, and on a shared CPU the thread
    # pool's wake-ups cost more than they give (2 loaded cores: a 2k-token trace's layer took 33 ms on
    # 2 threads, 0.8 ms on 1; a 1M-token trace 161 s against 70 s).
    with _threads(CPU_THREADS if torch.device(device).type == "cpu" else None):
        return _sources(trace, span, aggregate, residual, missed, sink, sink_blocks, top, device)


@contextlib.contextmanager
def _threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sources(trace, span, aggregate, residual, missed, sink, sink_blocks, top, device) -> Sources:
    if aggregate not in AGGREGATES:
        raise UsageError(f"aggregate={aggregate!r} is not one of {', '.join(AGGREGATES)}.")
    if not 0 <= residual < 1:
        raise UsageError(f"residual={residual} must lie in [0, 1) (rollout uses 0.5).")
    if sink not in SINKS:
        raise UsageError(f"sink={sink!r} is not one of {', '.join(SINKS)}.")
    bk = _block_size(trace)
    a, b = resolve_span(trace, span)
    L, nK, T = trace.num_layers, trace.num_key_blocks, trace.num_tokens
    device = torch.device(device)
    mu_of = _missed_source(trace, missed)
    if sink_blocks is None:
        config = trace.trace_config
        sink_blocks = max(1, config.mask.sink_blocks if config is not None else 1)
    if sink_blocks < 0:
        raise UsageError(f"sink_blocks={sink_blocks} must be >= 0.")
    no_op = sink_blocks if sink == "no-op" else 0
    C = 1 if mu_of is None else 3
    r = float(residual)

    # 1. the span's share per query block (nQ == nK: one block size)
    tokens = torch.zeros(nK, dtype=torch.float64)
    tokens.index_add_(0, torch.arange(a, b) // bk, torch.ones(b - a, dtype=torch.float64))
    p = (tokens / (b - a)).to(device)[:, None].expand(nK, C).clone()       # [nK, C]

    flow = torch.zeros(L + 1, nK, dtype=torch.float64, device=device)      # flow[l]: p below layer l
    arrive = torch.zeros(L, nK, dtype=torch.float64, device=device)
    stay = torch.zeros(L, nK, dtype=torch.float64, device=device)
    lost = torch.zeros(nK, dtype=torch.float64, device=device)             # dropped flow per query block
    flow[L] = p[:, 0]
    rows = _Rows(trace, device)
    for layer in range(L - 1, -1, -1):                                     # 2-3. down through the layers
        mu = None if mu_of is None else mu_of(layer).to(device)            # [H, nQ, 3]
        u, diag = _pull_layer(rows, layer, p, aggregate, mu, no_op)
        if mu is not None:                                                 # leaves through dropped edges
            lost += (1 - r) * p[:, 2] * (1 - _kept_shares(mu)[..., 1].float().double()).mean(0)
        arrive[layer] = (1 - r) * (u[:, 0] - diag * p[:, 0])
        stay[layer] = r + (1 - r) * diag
        p = r * p + (1 - r) * u
        flow[layer] = p[:, 0]

    # 6. entry by layer: arrival times what stays at the block below it
    below = torch.cumprod(torch.cat([torch.ones(1, nK, dtype=torch.float64, device=device), stay]), 0)
    entry = arrive * below[:-1]
    origin = flow[L] * below[-1]

    # 8. the bars: the dropped flow could reach any block at or before its query block
    reach = torch.flip(torch.cumsum(torch.flip(lost, [0]), 0), [0])        # [nK]: sum over i >= j
    score = p[:, 0]
    low = p[:, 1] if C == 3 else score
    kept_high = p[:, 2] if C == 3 else score
    high = (kept_high + reach).clamp(max=1.0).maximum(score)

    excluded = torch.zeros(nK, dtype=torch.bool)
    excluded[a // bk: (b - 1) // bk + 1] = True
    excluded[:no_op] = True

    arrays = (x.cpu() for x in (score, low, high, kept_high, reach, entry, origin))
    result = Sources((a, b), bk, T, aggregate, r, sink, int(sink_blocks), *arrays, excluded, C == 3,
                     trace.text, trace.token_offsets)

    # 7. paths of the strongest blocks, and of the strongest sentences' and paragraphs' blocks
    targets = _path_targets(result, top)
    if targets:
        blocks, shares = _paths(rows, targets, flow, aggregate, mu_of, r, no_op, device)
        result.paths = dict(zip(targets, blocks))
        result.path_shares = dict(zip(targets, shares))
    return result


def _keeps_layers(trace, device: torch.device) -> bool:
    """Whether all layers' rows (int32 + float32: 8 bytes an entry) fit in a quarter of the GPU's free memory."""
    if device.type != "cuda":
        return False
    size = trace.num_layers * trace.num_heads * trace.num_query_blocks * trace.top_k * 8
    return size <= torch.cuda.mem_get_info(device)[0] // 4


class _Rows:
    """A layer's rows ``(indices int32, mass float32)`` ``[H, nQ, k]`` on the device, for both passes. On a
    GPU with room for all layers (a quarter of its free memory) they stay there after the first pass, so the
    path pass reads nothing again (a 1M-token trace: 1.4 GB); on the CPU the memory-mapped shards are read
    again (the page cache holds them)."""

    def __init__(self, trace, device: torch.device):
        self.trace, self.device = trace, device
        self.kept = {} if _keeps_layers(trace, device) else None

    def heads(self, layer: int, together: bool = False):
        """``(h0, indices, mass)`` for the layer's heads ``h0 ...`` a few at a time on the CPU: about
        ``HEAD_GROUP`` entries each, so temporaries stay small (a 1M-token layer's [H, nQ, k] int64 block
        indices take 50 MB, allocated fresh, page by page, for each layer); all together on a GPU or with
        ``together``."""
        trace, H = self.trace, self.trace.num_heads
        per = max(1, HEAD_GROUP // max(1, trace.num_query_blocks * trace.top_k))
        if together or self.kept is not None or self.device.type != "cpu" or per >= H:
            yield 0, *self(layer)
            return
        for h0 in range(0, H, per):
            yield h0, *trace.layer(layer, heads=slice(h0, min(H, h0 + per)))

    def __call__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kept is not None and layer in self.kept:
            return self.kept[layer]
        trace, device = self.trace, self.device   # on a GPU the stored (narrow) values move and decode there
        rows = trace.layer(layer) if device.type == "cpu" else trace.layer(layer, device=device)
        if self.kept is not None:
            self.kept[layer] = rows
        return rows

    @property
    def num_key_blocks(self) -> int:
        return self.trace.num_key_blocks


def _pull_layer(rows: _Rows, layer: int, p: torch.Tensor, aggregate: str, mu: torch.Tensor | None,
                sink_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A_l^T p [nK, C], diag(A_l) [nQ])``, float64, for the flow ``p [nQ, C]``: step 3 of one layer,
    its heads a few at a time (see :meth:`_Rows.heads`; "max" needs all heads of a row at once)."""
    nK, H = rows.num_key_blocks, rows.trace.num_heads
    u = torch.zeros(nK + 1, p.shape[1], device=p.device)                   # row 0: the -1 entries
    p32, diags = p.float(), []
    for h0, indices, mass in rows.heads(layer, together=aggregate == "max"):
        part = None if mu is None else mu[h0:h0 + indices.shape[0]]
        e = layer_edges(indices, mass, aggregate, part, nK, sink_blocks, num_heads=H)
        diags.append(e.add_pull(p32, u))
    diag = torch.cat(diags).sum(0) if aggregate == "mean" else diags[0]   # "mean": [H, nQ] -> [nQ]
    return u[1:].double(), diag.double()


def _read_edges(rows: _Rows, layer: int, aggregate: str, mu_of, sink_blocks: int, device) -> _Edges:
    indices, mass = rows(layer)                                            # [H, nQ, k] each
    mu = None if mu_of is None else mu_of(layer)
    return layer_edges(indices, mass, aggregate, None if mu is None else mu.to(device), rows.num_key_blocks,
                       sink_blocks)


def _path_targets(result: Sources, top: int) -> list[int]:
    kinds = ["block"] + ([k for k in ("sentence", "paragraph")] if result.text is not None
                         and result.token_offsets is not None else [])
    targets: list[int] = []
    for kind in kinds:
        units = result.units(kind)
        for i in units.order()[:top]:
            j = int(units.block[i])
            if j >= 0 and j not in targets:
                targets.append(j)
    return targets


def _paths(rows: _Rows, targets: list[int], flow: torch.Tensor, aggregate: str, mu_of, r: float,
           sink_blocks: int, device):
    """Step 7: for each target block, layer by layer from the input up, the biggest contributor."""
    L, nK = rows.trace.num_layers, rows.num_key_blocks
    cur = list(targets)
    blocks = [[j] for j in targets]
    shares: list[list[float]] = [[] for _ in targets]
    for layer in range(L):
        want = torch.zeros(nK, dtype=torch.bool, device=device)             # the current blocks
        want[torch.tensor(cur, dtype=torch.long, device=device)] = True
        q, j, w = _in_edges(rows, layer, want, aggregate, mu_of, sink_blocks, device)
        c = (1 - r) * w * flow[layer + 1][q]                               # contributions into j from q
        key, inverse = torch.unique(j * nK + q, return_inverse=True)       # heads summed per (j, q)
        total = torch.zeros(key.shape[0], dtype=torch.float64, device=device).index_add_(0, inverse, c)
        kj, kq = (key // nK).cpu(), (key % nK).cpu()
        total = total.cpu()
        below = flow[layer].cpu()
        above = flow[layer + 1].cpu()
        for s, block in enumerate(cur):
            hit = kj == block
            cand_q, cand_v = kq[hit], total[hit].clone()
            cand_v[cand_q == block] += r * above[block]                    # the residual stays put
            if not bool((cand_q == block).any()):
                cand_q = torch.cat([cand_q, torch.tensor([block])])
                cand_v = torch.cat([cand_v, torch.tensor([r * float(above[block])], dtype=torch.float64)])
            best = int(torch.argmax(cand_v))                               # ties: the first (lowest q)
            nxt = int(cand_q[best])
            shares[s].append(float(cand_v[best]) / float(below[block]) if below[block] > 0 else 0.0)
            blocks[s].append(nxt)
            cur[s] = nxt
    return blocks, shares


def _in_edges(rows: _Rows, layer: int, want: torch.Tensor, aggregate: str, mu_of, sink_blocks: int, device):
    """The entries of ``A_l`` into the blocks marked in ``want [nK]``: ``(q, j, w)``, long, long, float64.
    Under "mean" the layer is only searched for those entries, and weighted as :func:`layer_edges` does;
    under "max" the whole matrix is built."""
    if aggregate == "max":
        qi, kj, w = _read_edges(rows, layer, aggregate, mu_of, sink_blocks, device).flat()
        sel = want[kj] & (kj >= 0)
        return qi[sel], kj[sel], w[sel, 0].double()
    H, nQ, k = rows.trace.num_heads, rows.trace.num_query_blocks, rows.trace.top_k
    S = min(sink_blocks, k)
    marked = torch.cat([torch.zeros(1, dtype=torch.bool, device=device), want])   # slot 0: the -1 entries
    # the rows >= S that are wanted: a sink entry among their first S (sorted rows) counts for the row itself
    sink_rows = torch.nonzero(want[:nQ] & (torch.arange(nQ, device=device) >= sink_blocks)).flatten()
    found: list[list[torch.Tensor]] = [[], []]                             # (h, i, j, w): entries, sink entries
    for h0, indices, mass in rows.heads(layer):                            # [h, nQ, k] each
        hit = torch.index_select(marked, 0, (indices + 1).reshape(-1)).view(indices.shape)  # 4x marked[...]
        h, i, r = torch.nonzero(hit, as_tuple=True)                        # entries into a wanted block
        j = indices[h, i, r].long()
        keep = ~((j < sink_blocks) & (i >= sink_blocks))                   # those are the row's own under no-op
        parts = [(h[keep], i[keep], r[keep], j[keep])]
        if S > 0:
            hh, rr, ss = torch.nonzero((indices[:, sink_rows, :S] >= 0) & (indices[:, sink_rows, :S] < sink_blocks),
                                       as_tuple=True)                      # [h, R, S] -> entries
            parts.append((hh, sink_rows[rr], ss, sink_rows[rr]))
        for out, (h, i, r, j) in zip(found, parts):
            row_mass = torch.where(indices[h, i] >= 0, mass[h, i].float(), 0.0).sum(-1)   # the rows' totals
            w = mass[h, i, r].float() / (torch.where(row_mass > 0, row_mass, 1.0) * H)
            out.append((h + h0, i, j, w))
    h, i, j, w = (torch.cat([x[c] for x in found[0] + found[1]]) for c in range(4))
    if mu_of is not None:
        w = w * _kept_shares(mu_of(layer).to(device))[h, i, 0].float()
    return i, j, w.double()


def dense_scores(matrices: list[torch.Tensor], span_weights: torch.Tensor, residual: float = RESIDUAL):
    """Plain rollout over explicit block matrices ``A_l [nQ, nK]`` (one per layer, index 0 = first layer):
    ``p_l = r p_{l+1} + (1 - r) A_l^T p_{l+1}`` from ``span_weights [nQ]``; returns ``p_0 [nK]``. The
    definition :func:`sources` computes without building the matrices (tests and references)."""
    p = span_weights.double()
    for a in reversed(matrices):
        p = residual * p + (1 - residual) * (a.double().T @ p)
    return p


def spearman_top_overlap(ours: torch.Tensor, reference: torch.Tensor, keep: torch.Tensor, n: int = 10):
    """``(Spearman, top-n overlap)`` of two block-score vectors over the blocks in ``keep``."""
    from .anchors import spearman

    a, b = ours[keep], reference[keep]
    top_a = set(torch.sort(-a, stable=True).indices[:n].tolist())
    top_b = set(torch.sort(-b, stable=True).indices[:n].tolist())
    return spearman(a, b), len(top_a & top_b) / max(1, min(n, int(keep.sum())))


def rank_of(result: Sources, blocks) -> int:
    """The best rank (1 = first) among ranked blocks of any of ``blocks``; ``math.inf`` when none ranks."""
    order = result.units("block").order()
    where = {j: rank for rank, j in enumerate(order, 1)}
    ranks = [where[j] for j in blocks if j in where]
    return min(ranks) if ranks else math.inf
