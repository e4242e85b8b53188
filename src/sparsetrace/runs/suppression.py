"""Causal check of thought anchors: suppress a sentence inside the sparse attention, measure the KL.

For each sentence s, rerun the model with STREAM attention whose masks lose the key blocks of s (in
every head, or in the receiver heads only) and compare the next-token distributions with an unedited
sparse run: ``KL(p_base || p_suppressed)`` per position, averaged over the tokens of the later
sentences. Thought Anchors suppresses attention to a sentence token by token; block masks work in
blocks, so here:

- a key block belongs to sentence s when the MAJORITY of its tokens lie in s (``rule="majority"``,
  the default; each block then belongs to at most one sentence) or when ALL of them do
  (``rule="whole"``). A sentence shorter than half a block may own no block; its KL is then 0 and its
  ``blocks`` count 0 says so. Smaller blocks (16) resolve more sentences.
- a block is removed only from query blocks strictly after it (never from its own query block's
  diagonal), so no query row is ever left empty; positions before the sentence are untouched, which
  makes their KL exactly 0 (checked by the tests).

Cost: one sparse forward per suppressed sentence, plus the baseline; the baseline's log-probabilities
of the measured positions are kept in memory (``T * vocab`` float32: 200 MB at 1k tokens for SmolLM2).
"""

from __future__ import annotations

import torch

from ..analysis.sentences import Sentence
from ..config import TraceConfig
from ..selection.blocks import BlockMask, pack_rows
from ..tracing.backend import sparse_model
from ..tracing.forward import chunked_forward, new_cache

RULES = ("majority", "whole")


def sentence_blocks(sentence: Sentence, block: int, T: int, rule: str = "majority") -> list[int]:
    """Key blocks of ``sentence`` under ``rule`` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"rule={rule!r} is not one of {RULES}.")
    blocks = []
    for j in range(sentence.token_start // block, (sentence.token_end - 1) // block + 1):
        lo, hi = j * block, min((j + 1) * block, T)
        inside = min(hi, sentence.token_end) - max(lo, sentence.token_start)
        if (rule == "whole" and inside == hi - lo) or (rule == "majority" and 2 * inside > hi - lo):
            blocks.append(j)
    return blocks


def remove_blocks(mask: BlockMask, blocks: torch.Tensor, first_query_block: int,
                  heads: list[int] | None = None) -> BlockMask:
    """``mask`` without key ``blocks`` in query blocks that start after the block ends; only in query
    ``heads`` when given. Rows are re-packed: sorted, -1 at the end."""
    idx = mask.indices  # [B, H, nQ, k]
    H, nQ = idx.shape[1], idx.shape[2]
    q_start = (first_query_block + torch.arange(nQ, device=idx.device)) * mask.block_q  # [nQ]
    after = (idx.long() + 1) * mask.block_k <= q_start[:, None]  # block wholly before the query block
    drop = torch.isin(idx, blocks.to(idx.device, idx.dtype)) & after & (idx >= 0)
    if heads is not None:
        chosen = torch.zeros(H, dtype=torch.bool, device=idx.device)
        chosen[heads] = True
        drop &= chosen[None, :, None, None]
    if not drop.any():
        return mask
    packed = pack_rows(idx, ~drop & (idx >= 0)).to(torch.int32)
    return BlockMask(packed, mask.block_q, mask.block_k)


def _log_probs(model, ids: torch.Tensor, config: TraceConfig, edit, start: int) -> torch.Tensor:
    """Sparse forward over ``ids``; log-softmax of the next-token logits of positions ``start..T-1``
    (float32 ``[T - start, V]``), kept chunk by chunk. ``edit(layer, mask, first_query_block)``."""
    T, chunk = ids.shape[0], config.chunk_size
    cache, out = new_cache(), []
    state = {"q_block": 0}

    def edit_mask(layer: int, mask: BlockMask) -> BlockMask:
        return edit(layer, mask, state["q_block"]) if edit is not None else mask

    with sparse_model(model, config, edit=edit_mask, record=False):
        for a in range(0, T, chunk):
            b = min(a + chunk, T)
            state["q_block"] = a // config.mask.block_q
            keep = max(0, b - max(a, start))
            logits = chunked_forward(model, ids[a:b], chunk, keep_logits=max(keep, 1), cache=cache)
            if keep:
                out.append(torch.log_softmax(logits[-keep:].float(), dim=-1))
    return torch.cat(out)


def suppression_kl(model, input_ids: torch.Tensor, sentences: list[Sentence],
                   config: TraceConfig | None = None, *, which: list[int] | None = None,
                   heads: list[tuple[int, int]] | None = None, rule: str = "majority",
                   progress=None) -> dict:
    """Suppress each sentence in ``which`` (default all) and measure the KL on later sentences.

    ``heads``: (layer, head) pairs to edit (the receiver heads), None = every head of every layer.
    Returns ``{"kl": [nS] mean KL over the tokens of sentences after s (NaN when not suppressed or no
    later sentence), "blocks": [nS] removed key blocks, "per_position": {s: [T] KL per position (0
    before the measured range)}}``. ``progress(i, n)`` is called after each sentence.
    """
    config = TraceConfig() if config is None else config
    ids = torch.as_tensor(input_ids).flatten().long()
    T, nS = ids.shape[0], len(sentences)
    which = list(range(nS)) if which is None else list(which)
    start = min(sentences[s].token_start for s in which) if which else T
    base = _log_probs(model, ids, config, None, start)  # [T - start, V]
    by_layer: dict[int, list[int]] | None = None
    if heads is not None:
        by_layer = {}
        for layer, head in heads:
            by_layer.setdefault(layer, []).append(head)
    kl = torch.full((nS,), float("nan"), dtype=torch.float64)
    n_blocks = torch.zeros(nS, dtype=torch.long)
    per_position = {}
    for count, s in enumerate(which):
        blocks = sentence_blocks(sentences[s], config.mask.block_q, T, rule)
        n_blocks[s] = len(blocks)
        later = [x for x in sentences if x.index > s]
        if not later:
            continue
        if not blocks:
            kl[s] = 0.0
            per_position[s] = torch.zeros(T, dtype=torch.float64)
            continue
        ids_blocks = torch.tensor(blocks)

        def edit(layer, mask, q_block, ids_blocks=ids_blocks):
            if by_layer is not None and layer not in by_layer:
                return mask
            return remove_blocks(mask, ids_blocks, q_block,
                                 None if by_layer is None else by_layer[layer])

        lp = _log_probs(model, ids, config, edit, start)
        pos_kl = (base.exp() * (base - lp)).sum(-1).double()  # [T - start]; >= 0 up to rounding
        full = torch.zeros(T, dtype=torch.float64)
        full[start:] = pos_kl
        per_position[s] = full
        tokens = torch.cat([torch.arange(x.token_start, x.token_end) for x in later])
        kl[s] = full[tokens].mean()
        if progress is not None:
            progress(count + 1, len(which))
    return {"kl": kl, "blocks": n_blocks, "per_position": per_position}
