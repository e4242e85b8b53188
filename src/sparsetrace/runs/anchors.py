"""Dense reference for thought anchors: sentence x sentence attention from full softmax attention.

The same quantities as :mod:`sparsetrace.analysis.anchors`, computed from every layer's full causal
attention pattern instead of a trace. One dense forward runs under :func:`sparsetrace.tracing.probe.probing`;
each layer's ``[Hq, T, T]`` probabilities are built in query chunks and reduced to sentence sums at
once, so at most one chunk of one layer's pattern is alive (``Hq * chunk * T`` floats). O(T^2) time:
a reference for inputs where dense attention fits (a few thousand tokens on a CPU).

Optionally also the *block-spread* reference: the exact block masses of the dense pattern (every key
block kept), put through the sparse path's uniform-spread approximation. It isolates the error of
that approximation from the error of pruning: a trace that keeps every block reproduces it up to
float16 mass rounding.
"""

from __future__ import annotations

import math

import torch

from ..analysis.anchors import block_sentence_sums, normalize_sums
from ..analysis.sentences import Sentence, sentence_ids
from ..attention.dense import dense_block_mass, dense_probs
from ..tracing.probe import probing


def dense_sentence_matrices(model, input_ids: torch.Tensor, sentences: list[Sentence], *,
                            chunk: int = 512, block: tuple[int, int] | None = None,
                            sink_prior: bool = False):
    """Sentence matrices ``M [L, H, nS, nS]`` float64 from dense attention over ``input_ids [T]``.

    With ``block=(block_q, block_k)`` returns ``(M, M_block)``: ``M_block`` is the block-spread
    reference described in the module docstring.
    """
    ids = torch.as_tensor(input_ids).flatten().long()
    T = ids.shape[0]
    nS = len(sentences)
    sid = sentence_ids(sentences, T)
    inside = sid >= 0
    sums: dict[int, torch.Tensor] = {}
    block_mass: dict[int, torch.Tensor] = {}
    if block is not None:
        bq, bk = block
        chunk = max(bq, chunk // bq * bq)  # chunks of whole query blocks
        n_kb = math.ceil(T / bk)

    def reduce(layer, query, key, scaling, window):
        q, k = query[0].float().cpu(), key[0].float().cpu()  # [Hq, T, D], [Hkv, T, D]
        H = q.shape[0]
        out = torch.zeros(H, nS, nS, dtype=torch.float64)
        masses = []
        for a in range(0, T, chunk):
            b = min(a + chunk, T)
            p = dense_probs(q[:, a:b], k[:, :b], scaling, window)  # [H, c, b]
            rows = inside[a:b]
            if rows.any():
                per_row = torch.zeros(H, nS, b, dtype=torch.float64)
                per_row.index_add_(1, sid[a:b][rows], p[:, rows].double())  # [H, nS, b]
                cols = inside[:b]
                out.index_add_(2, sid[:b][cols], per_row[:, :, cols])  # [H, nS, nS]
            if block is not None:
                masses.append(dense_block_mass(p, bq, bk, n_kb).double())  # [H, nq, nKB]
            del p
        sums[layer] = out
        if block is not None:
            block_mass[layer] = torch.cat(masses, dim=1)  # [H, nQ, nKB]

    device = next(model.parameters()).device
    with probing(model, reduce), torch.no_grad():
        model(input_ids=ids.view(1, -1).to(device), use_cache=False, logits_to_keep=1)
    M = normalize_sums(torch.stack([sums[i] for i in sorted(sums)]), sentences)
    if block is None:
        return M
    spread = []
    for layer in sorted(block_mass):
        mass = block_mass[layer]
        H, nQ, nKB = mass.shape
        last = torch.clamp((torch.arange(nQ) + 1) * bq, max=T) - 1
        causal = torch.arange(nKB)[None, :] <= (last // bk)[:, None]  # [nQ, nKB]
        idx = torch.where(causal, torch.arange(nKB)[None, :], -1).expand(H, nQ, nKB)
        spread.append(block_sentence_sums(idx.int(), mass * causal, sentences, T, bq, bk,
                                          sink_prior))
    return M, normalize_sums(torch.stack(spread), sentences)
