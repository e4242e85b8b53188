"""Thought anchors from sparse traces: sentence attention, vertical scores, receiver heads.

After "Thought Anchors: Which LLM Reasoning Steps Matter?" (Bogdan, Macar, Nanda, Conmy 2025), whose
receiver-head analysis reads full T x T attention. Here the same quantities come from a STREAM trace
(O(T * top_k) numbers per head), never from a T x T pattern:

  1. split the reasoning text into sentences and map them to token spans through the trace's character
     offsets (:mod:`.sentences`);
  2. per layer and head, the sentence x sentence matrix ``M[a, b]`` = mean token-to-token attention
     from sentence a's tokens to sentence b's tokens (:func:`sentence_matrices`), rebuilt from the kept
     blocks and their masses (the approximation is stated there);
  3. vertical score of sentence j = mean of ``M[i, j]`` over the sentences ``i >= j + 4``
     (:func:`vertical_scores`; Thought Anchors' ``proximity_ignore = 4``);
  4. kurtosis of each head's vertical scores (:func:`head_kurtosis`; Fisher / excess, biased,
     NaNs omitted = ``scipy.stats.kurtosis(v, fisher=True, bias=True, nan_policy="omit")``;
     optionally leaving out the first / last sentences, as Thought Anchors' code can);
  5. receiver heads = the ``top`` heads by kurtosis (averaged over traces when given several);
     receiver score of a sentence = its vertical score averaged over the receiver heads.

:func:`analyze` runs all five over one or several traces. This module reads traces only.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import UsageError
from .sentences import Sentence, sentence_ids, sentence_lengths, trace_sentences

PROXIMITY_IGNORE = 4  # Thought Anchors: a sentence's vertical score ignores the next 3 sentences
TOP_HEADS = 20
# compare_traces calls two traces' anchors the same above these (16 of 20 heads, Spearman 0.9)
STABLE_OVERLAP, STABLE_RHO = 0.8, 0.9

# --------------------------------------------------------------------------- 2. sentence matrices

@dataclass
class _Segments:
    """Tokens cut at block and sentence boundaries, sorted by block: ``block``, ``sentence``,
    ``start``, ``end`` ``[G]`` and CSR pointers ``ptr [n_blocks + 1]``. Tokens outside sentences are
    left out."""

    block: torch.Tensor
    sentence: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    ptr: torch.Tensor


def _segments(sid: torch.Tensor, block: int) -> _Segments:
    T = sid.shape[0]
    n_blocks = -(-T // block)
    change = torch.nonzero(sid[1:] != sid[:-1]).flatten() + 1
    cuts = torch.cat([torch.arange(0, T, block), change, torch.tensor([T])]).unique()  # sorted
    start, end = cuts[:-1], cuts[1:]
    sent = sid[start]
    keep = sent >= 0
    start, end, sent = start[keep], end[keep], sent[keep]
    blk = start // block
    ptr = torch.zeros(n_blocks + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(torch.bincount(blk, minlength=n_blocks), 0)
    return _Segments(blk, sent, start, end, ptr)


def _expand(ptr: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged expansion: for each of ``rows`` (block ids) every segment of that block. Returns
    ``(which row, which segment)``, both ``[sum of segment counts]``."""
    counts = ptr[rows + 1] - ptr[rows]
    owner = torch.repeat_interleave(torch.arange(rows.shape[0]), counts)
    first = torch.repeat_interleave(ptr[rows], counts)
    within = torch.arange(owner.shape[0]) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts,
                                                                    counts)
    return owner, first + within


def block_sentence_sums(indices: torch.Tensor, mass: torch.Tensor, sentences: list[Sentence], T: int,
                        block_q: int, block_k: int, sink_prior: bool = False) -> torch.Tensor:
    """Token-pair attention summed over sentence pairs, ``[H, nS, nS]`` float64, from kept blocks.

    ``indices`` / ``mass`` ``[H, nQ, k]`` (a trace layer). The approximation: every query of query
    block i gets the block's mean mass ``m`` on key block j (the trace keeps only the mean), spread
    uniformly over the keys of j that query may see (causal inside the diagonal). A query that sees no
    key of j (only when block_q != block_k) gets none, and the block's total ``m * |i|`` goes to the
    queries that see some. Blocks straddling sentences are apportioned by token overlap on both sides.

    ``sink_prior``: key block 0, off the diagonal, is taken to be the attention sink: its mass goes
    to token 0 (usually outside every sentence, e.g. the chat template's first token) instead of being
    spread over the block. Without it, the sink's large mass smears onto the first sentence whenever
    that sentence shares block 0 with token 0.

    Cost: off-diagonal blocks are summed per (query segment, key segment) pair, O(H * nQ * k * P^2)
    with P the sentences per block (1-3); blocks straddling the causal diagonal per query token,
    O(H * T * P). Never a T x T or nQ x nKB tensor.
    """
    H, nQ, k = indices.shape
    nS = len(sentences)
    sid = sentence_ids(sentences, T)
    qs, ks = _segments(sid, block_q), _segments(sid, block_k)
    out = torch.zeros(H * nS * nS, dtype=torch.float64)

    valid = indices >= 0
    head = torch.arange(H)[:, None, None].expand(H, nQ, k)[valid]
    qb = torch.arange(nQ)[None, :, None].expand(H, nQ, k)[valid]
    kb = indices[valid].long()
    m = mass[valid].double()
    k_lo = kb * block_k
    k_hi = torch.clamp(k_lo + block_k, max=T)
    q_lo = qb * block_q
    q_hi = torch.clamp(q_lo + block_q, max=T)
    full = k_hi - 1 <= q_lo  # every query of the block sees every key of the block
    straddle = ~full
    if sink_prior:
        to_sink = full & (kb == 0)
        full = full & ~to_sink
        e = torch.nonzero(to_sink).flatten()
        if e.numel() and sid[0] >= 0:  # all of m on token 0: |a∩i| * m to (a, sentence of token 0)
            pair_of, qseg = _expand(qs.ptr, qb[e])
            w = m[e][pair_of] * (qs.end[qseg] - qs.start[qseg]).double()
            where = (head[e][pair_of] * nS + qs.sentence[qseg]) * nS + sid[0]
            out.index_add_(0, where, w)

    # Off-diagonal entries: sum_{t in a∩i, s in b∩j} m/|j| = |a∩i| * m * |b∩j| / |j|.
    e = torch.nonzero(full).flatten()
    if e.numel():
        w = m[e] / (k_hi[e] - k_lo[e]).double()
        e_of, kseg = _expand(ks.ptr, kb[e])  # entry x key segment
        w = w[e_of] * (ks.end[kseg] - ks.start[kseg]).double()
        pair_of, qseg = _expand(qs.ptr, qb[e][e_of])  # (entry, key segment) x query segment
        w = w[pair_of] * (qs.end[qseg] - qs.start[qseg]).double()
        h = head[e][e_of][pair_of]
        where = (h * nS + qs.sentence[qseg]) * nS + ks.sentence[kseg][pair_of]
        out.index_add_(0, where, w)

    # Entries straddling the causal diagonal: per query token t, m / n_allowed(t) per visible key.
    e = torch.nonzero(straddle).flatten()
    if e.numel():
        t = (q_lo[e][:, None] + torch.arange(block_q)[None, :])  # [E, bq]
        n_allowed = torch.clamp(torch.minimum(k_hi[e][:, None], t + 1) - k_lo[e][:, None], min=0)
        real = (t < q_hi[e][:, None]) & (n_allowed > 0)
        scale = (q_hi[e] - q_lo[e]).double() / real.sum(1).clamp(min=1).double()  # see docstring
        keep = real & (sid[t.clamp(max=T - 1)] >= 0)
        rows, cols = torch.nonzero(keep, as_tuple=True)  # (entry, query token) pairs
        tt = t[rows, cols]
        w = m[e][rows] * scale[rows] / n_allowed[rows, cols].double()
        tok_of, kseg = _expand(ks.ptr, kb[e][rows])  # x key segments of block j
        seen = torch.clamp(torch.minimum(ks.end[kseg], tt[tok_of] + 1) - ks.start[kseg], min=0)
        h = head[e][rows][tok_of]
        where = (h * nS + sid[tt[tok_of]]) * nS + ks.sentence[kseg]
        out.index_add_(0, where, w[tok_of] * seen.double())
    return out.view(H, nS, nS)


def normalize_sums(sums: torch.Tensor, sentences: list[Sentence]) -> torch.Tensor:
    """Sums over token pairs ``[..., nS, nS]`` -> means (divide by ``|a| * |b|``)."""
    n = sentence_lengths(sentences)
    return sums / (n[:, None] * n[None, :])


def layer_sentence_matrices(trace, layer: int, sentences: list[Sentence],
                            sink_prior: bool = False) -> torch.Tensor:
    """``M [H, nS, nS]`` float64 of one layer: mean token-to-token attention, sentence a -> b."""
    indices, mass = trace.layer(layer)
    sums = block_sentence_sums(indices, mass, sentences, trace.num_tokens, trace.block_q,
                               trace.block_k, sink_prior)
    return normalize_sums(sums, sentences)


def sentence_matrices(trace, sentences: list[Sentence], layers=None,
                      sink_prior: bool = False) -> torch.Tensor:
    """``M [L, H, nS, nS]`` for ``layers`` (default all). Memory L * H * nS^2: for many sentences
    prefer :func:`analyze`, which keeps only the vertical scores."""
    layers = range(trace.num_layers) if layers is None else layers
    return torch.stack([layer_sentence_matrices(trace, layer, sentences, sink_prior)
                        for layer in layers])


# --------------------------------------------------------------------------- 3-5. scores

def vertical_scores(matrices: torch.Tensor, proximity_ignore: int = PROXIMITY_IGNORE) -> torch.Tensor:
    """``[..., nS]``: column means of ``M[..., i, j]`` over rows ``i >= j + proximity_ignore``; NaN for
    the last ``proximity_ignore`` sentences (nothing far enough after them)."""
    nS = matrices.shape[-1]
    i = torch.arange(nS)
    band = (i[:, None] - i[None, :] >= proximity_ignore).to(matrices.dtype)  # [nS, nS]
    count = band.sum(0)
    total = (matrices * band).sum(-2)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Fisher (excess) kurtosis over the last axis, biased, NaNs omitted: ``m4 / m2^2 - 3``, the
    ``scipy.stats.kurtosis`` default (``fisher=True, bias=True``) with ``nan_policy="omit"``."""
    x = x.double()
    ok = ~torch.isnan(x)
    n = ok.sum(-1).clamp(min=1)
    mean = torch.where(ok, x, 0.0).sum(-1) / n
    d = torch.where(ok, x - mean[..., None], 0.0)
    m2 = (d**2).sum(-1) / n
    m4 = (d**4).sum(-1) / n
    return m4 / m2**2 - 3.0


def head_kurtosis(vertical: torch.Tensor, drop_first: int = 0, drop_last: int = 0) -> torch.Tensor:
    """``[L, H]`` kurtosis of each head's vertical scores ``[L, H, nS]``, over the sentences
    ``drop_first <= j < nS - drop_last`` (Thought Anchors' code has these two knobs: the first sentences
    of a text act as attention sinks, and the vertical scores of the last ones average over a few later
    sentences only; both can decide a head's kurtosis on their own). Default: every sentence.

    Raises UsageError when fewer than 4 sentences with a vertical score are left.
    """
    nS = vertical.shape[-1]
    if drop_first < 0 or drop_last < 0:
        raise UsageError(f"drop_first and drop_last must be >= 0; got {drop_first}, {drop_last}.")
    kept = vertical[..., drop_first: max(nS - drop_last, drop_first)]
    scored = int((~torch.isnan(kept)).sum(-1).max()) if kept.numel() else 0
    if scored < 4:
        raise UsageError(f"dropping the first {drop_first} and last {drop_last} of {nS} sentences leaves "
                         f"{scored} with a vertical score; kurtosis needs at least 4: lower --drop-first "
                         "/ --drop-last or give a longer text.")
    return kurtosis(kept)


def receiver_heads(kurtoses: torch.Tensor | list[torch.Tensor], top: int = TOP_HEADS
                   ) -> list[tuple[int, int]]:
    """The ``top`` (layer, head) pairs by kurtosis ``[L, H]``, averaged first when given a list (one
    per trace); NaN kurtosis (a constant head) never wins. Sorted by decreasing kurtosis."""
    k = torch.stack(list(kurtoses)).nanmean(0) if isinstance(kurtoses, (list, tuple)) else kurtoses
    L, H = k.shape
    flat = torch.nan_to_num(k.flatten(), nan=-float("inf"))
    order = torch.sort(flat, descending=True, stable=True).indices[: min(top, L * H)]
    return [(int(i) // H, int(i) % H) for i in order]


def receiver_scores(vertical: torch.Tensor, heads: list[tuple[int, int]]) -> torch.Tensor:
    """``[nS]``: each sentence's vertical score averaged over the receiver ``heads``."""
    rows = torch.stack([vertical[layer, head] for layer, head in heads])
    return rows.mean(0)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman correlation of two score vectors over the entries where both are finite (ranks by
    order, ties broken by position); NaN with fewer than three such entries."""
    ok = ~(torch.isnan(a) | torch.isnan(b))
    a, b = a[ok].double(), b[ok].double()
    if a.numel() < 3:
        return float("nan")
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def compare(ours: list[torch.Tensor], reference: list[torch.Tensor], *, top: int = TOP_HEADS,
            drop_first: int = 0, drop_last: int = 0) -> dict:
    """How far two analyses of the same texts agree. ``ours`` and ``reference`` hold one vertical-score
    tensor ``[L, H, nS]`` per text (same texts, same sentences, same order): a sparse trace against the
    dense reference, or a trace at ``top_k`` against one at ``2 * top_k`` where dense cannot run.

    Returns ``overlap`` (receiver heads in common, each side's chosen from its kurtosis averaged over
    the texts), ``rho_heads`` (Spearman of the vertical scores, averaged over the texts and the
    reference's receiver heads) and ``rho_receiver`` (Spearman of the receiver scores, each side with
    its own heads, averaged over the texts), plus both head lists.
    """
    if len(ours) != len(reference) or not ours:
        raise UsageError(f"compare needs the same texts on both sides; got {len(ours)} and "
                         f"{len(reference)} vertical-score tensors.")
    for a, b in zip(ours, reference):
        if a.shape != b.shape:
            raise UsageError(f"vertical scores of shape {tuple(a.shape)} and {tuple(b.shape)}: the two "
                             "analyses must cover the same model and the same sentences.")
    heads_ours = receiver_heads([head_kurtosis(v, drop_first, drop_last) for v in ours], top)
    heads_ref = receiver_heads([head_kurtosis(v, drop_first, drop_last) for v in reference], top)

    def mean(values: list[float]) -> float:
        values = [x for x in values if x == x]  # a constant head has no ranks
        return sum(values) / len(values) if values else float("nan")

    return {
        "overlap": len(set(heads_ours) & set(heads_ref)),
        "top": len(heads_ref),
        "rho_heads": mean([spearman(a[layer, head], b[layer, head])
                           for a, b in zip(ours, reference) for layer, head in heads_ref]),
        "rho_receiver": mean([spearman(receiver_scores(a, heads_ours), receiver_scores(b, heads_ref))
                              for a, b in zip(ours, reference)]),
        "heads": heads_ours, "reference_heads": heads_ref,
    }


def compare_traces(trace, result: Anchors, other, *, top: int = TOP_HEADS, drop_first: int = 0,
                   drop_last: int = 0, sink_prior: bool = False) -> dict:
    """How far ``result`` (of ``trace``) moves against ``other``, a trace of the same tokens (e.g. at
    twice the top_k): the check for inputs too long for the dense reference. JSON-able, with ``stable``
    when at least ``STABLE_OVERLAP`` of the receiver heads are shared and the Spearman of the vertical
    scores on them is at least ``STABLE_RHO``."""
    if (not torch.equal(other.tokens, trace.tokens) or other.num_layers != trace.num_layers
            or other.num_heads != trace.num_heads):
        where = "" if other.path is None else f" {other.path}"
        raise UsageError(f"the trace{where} to compare with holds other tokens or another model; give a "
                         "trace of the same text and model (e.g. traced again at twice --top-k).")
    found = compare([result.vertical],
                    [trace_vertical(other, result.sentences, result.proximity_ignore, sink_prior)],
                    top=top, drop_first=drop_first, drop_last=drop_last)
    return {"trace": None if other.path is None else str(other.path), "top_k": other.top_k,
            "sparsity": other.sparsity, "receiver_heads_in_common": found["overlap"], "of": found["top"],
            "spearman_vertical_on_its_heads": found["rho_heads"],
            "spearman_receiver_scores": found["rho_receiver"],
            "stable": found["overlap"] >= STABLE_OVERLAP * found["top"] and found["rho_heads"] >= STABLE_RHO}


# --------------------------------------------------------------------------- everything

@dataclass
class Anchors:
    """What :func:`analyze` finds in one trace. ``vertical [L, H, nS]`` (NaN for the last
    ``proximity_ignore`` sentences), ``kurtosis [L, H]``, ``heads`` the receiver heads (by decreasing
    kurtosis, possibly chosen over several traces), ``scores [nS]`` the receiver scores."""

    sentences: list[Sentence]
    vertical: torch.Tensor
    kurtosis: torch.Tensor
    heads: list[tuple[int, int]]
    scores: torch.Tensor
    proximity_ignore: int = PROXIMITY_IGNORE
    drop_first: int = 0
    drop_last: int = 0
    extra: dict = field(default_factory=dict)

    def summary(self, n: int = 5) -> dict:
        """A small JSON-able summary: receiver heads and the top sentences."""
        order = torch.argsort(torch.nan_to_num(self.scores, nan=-float("inf")), descending=True)
        return {
            "num_sentences": len(self.sentences),
            "proximity_ignore": self.proximity_ignore,
            "kurtosis": "fisher (excess), biased, NaNs omitted",
            "kurtosis_drop_first": self.drop_first,
            "kurtosis_drop_last": self.drop_last,
            "receiver_heads": [{"layer": layer, "head": head,
                                "kurtosis": round(float(self.kurtosis[layer, head]), 4)}
                               for layer, head in self.heads],
            "top_sentences": [{"index": int(i), "receiver_score": float(self.scores[i]),
                               "text": self.sentences[i].text[:200]} for i in order[:n]],
            **self.extra,
        }

    def write_tables(self, out: Path, kl: dict | None = None) -> None:
        """``sentences.csv`` (vertical score averaged over all heads, receiver score, and with ``kl`` the
        suppression KL of ``sparsetrace.runs.suppression``) and ``heads.csv`` (kurtosis, receiver rank)."""
        with open(out / "sentences.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["index", "text", "token_start", "token_end", "vertical_score", "receiver_score"]
                       + (["suppression_kl", "suppressed_blocks"] if kl is not None else []))
            vertical = self.vertical.nanmean((0, 1))  # mean over all heads
            for s in self.sentences:
                row = [s.index, s.text, s.token_start, s.token_end, _csv_number(vertical[s.index]),
                       _csv_number(self.scores[s.index])]
                if kl is not None:
                    row += [_csv_number(kl["kl"][s.index]), int(kl["blocks"][s.index])]
                w.writerow(row)
        receivers = {h: rank for rank, h in enumerate(self.heads)}
        with open(out / "heads.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["layer", "head", "kurtosis", "receiver_rank"])
            L, H = self.kurtosis.shape
            for layer in range(L):
                for head in range(H):
                    rank = receivers.get((layer, head))
                    w.writerow([layer, head, _csv_number(self.kurtosis[layer, head]),
                                "" if rank is None else rank + 1])


def _csv_number(x) -> str:
    x = float(x)
    return "" if math.isnan(x) else f"{x:.6g}"


def suppression_summary(result: Anchors, kl: dict, heads: str) -> dict:
    """JSON-able summary of a suppression run (``sparsetrace.runs.suppression``) beside ``result``: the
    mean KL and its Spearman against the receiver scores."""
    finite = kl["kl"][~torch.isnan(kl["kl"])]
    out = {"heads": heads, "rule": "majority", "mean_kl": float(finite.mean()) if finite.numel() else None}
    ok = ~torch.isnan(kl["kl"]) & ~torch.isnan(result.scores)
    if ok.sum() > 2:
        out["spearman_kl_vs_receiver"] = spearman(kl["kl"], result.scores)
    return out


def trace_vertical(trace, sentences: list[Sentence], proximity_ignore: int = PROXIMITY_IGNORE,
                   sink_prior: bool = False) -> torch.Tensor:
    """``[L, H, nS]`` vertical scores, one layer's matrices alive at a time."""
    return torch.stack([vertical_scores(layer_sentence_matrices(trace, layer, sentences,
                                                                sink_prior), proximity_ignore)
                        for layer in range(trace.num_layers)])


def analyze(traces, *, sentences=None, top: int = TOP_HEADS,
            proximity_ignore: int = PROXIMITY_IGNORE,
            sink_prior: bool = False, drop_first: int = 0,
            drop_last: int = 0) -> Anchors | list[Anchors]:
    """Thought-anchor analysis of a trace (or a list: receiver heads then come from the kurtosis
    averaged over all of them, and a list of results is returned). ``sentences`` default to
    :func:`trace_sentences` (one list per trace when several are given); ``drop_first`` /
    ``drop_last`` go to :func:`head_kurtosis`."""
    many = isinstance(traces, (list, tuple))
    traces = list(traces) if many else [traces]
    if sentences is None:
        sentences = [trace_sentences(t) for t in traces]
    elif not many:
        sentences = [sentences]
    verticals = [trace_vertical(t, s, proximity_ignore, sink_prior)
                 for t, s in zip(traces, sentences)]
    kurts = [head_kurtosis(v, drop_first, drop_last) for v in verticals]
    heads = receiver_heads(kurts, top)
    results = [Anchors(s, v, k, heads, receiver_scores(v, heads), proximity_ignore, drop_first, drop_last)
               for s, v, k in zip(sentences, verticals, kurts)]
    return results if many else results[0]
