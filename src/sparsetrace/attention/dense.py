"""Dense references: attention over every allowed key, in float64, built without the fast paths' helpers.

- :func:`sparse_attention_reference`: softmax attention under a BlockMask, from a token mask rebuilt here
  by a plain loop over the kept blocks (not ``BlockMask.to_dense`` nor ``selection.blocks.may_attend``), so
  a bug in the shared block operations cannot hide in both the implementation and its reference;
- :func:`dense_probs` / :func:`dense_block_mass`: the model's full causal (windowed) attention pattern and
  its per-block masses, the ground truth of recall, coverage, anchors and audits.

All O(T * S): tests, references and small inputs only.
"""

from __future__ import annotations

import math

import torch

from ..selection.blocks import BlockMask


def kept_token_mask(mask: BlockMask, T: int, S: int, window: int | None = None) -> torch.Tensor:
    """bool ``[B, Hq, T, S]``: key s is visible to query t when s's block is in t's row, s <= t + S - T,
    and (with a window) s > t + S - T - window. One loop step per (batch, head, query)."""
    B, H, nQ, _ = mask.indices.shape
    out = torch.zeros(B, H, T, S, dtype=torch.bool)
    keys = torch.arange(S)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                row = mask.indices[b, h, t // mask.block_q].cpu()
                position = t + S - T
                visible = torch.isin(keys // mask.block_k, row[row >= 0]) & (keys <= position)
                if window is not None:
                    visible &= keys > position - window
                out[b, h, t] = visible
    return out.to(mask.indices.device)


def sparse_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask, *,
                               scale: float | None = None, return_mass: bool = False,
                               return_lse: bool = False, window: int | None = None):
    """Dense float64 attention under :func:`kept_token_mask`; same signature and result as
    ``sparsetrace.sparse_attention``. A query that sees no key gets zero output and mass."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    group = Hq // Hkv
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    visible = kept_token_mask(mask, T, S, window)  # [B, Hq, T, S]
    logits = ((q.double() @ kk.transpose(-1, -2)) * scale).masked_fill(~visible, -math.inf)
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)  # [B, Hq, T, S]
    results = [(probs @ vv).to(q.dtype)]
    if return_mass:
        n_kb = math.ceil(S / mask.block_k)
        block_mass = torch.stack([dense_block_mass(probs[b], mask.block_q, mask.block_k, n_kb)
                                  for b in range(B)])  # [B, Hq, nQ, nKB]
        ids = mask.indices.long()
        results.append(block_mass.gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, 0.0).float())
    if return_lse:
        results.append(logits.logsumexp(-1).float())  # [B, Hq, T]
    return results[0] if len(results) == 1 else tuple(results)


def dense_probs(q: torch.Tensor, k: torch.Tensor, scaling: float | None = None,
                window: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Causal softmax attention probabilities ``[Hq, T, S]`` (queries are the last T of S positions;
    GQA: head h reads kv head ``h // (Hq // Hkv)``). O(T * S) memory: references only."""
    Hq, T, D = q.shape
    Hkv, S, _ = k.shape
    scaling = D**-0.5 if scaling is None else scaling
    logits = (q.to(dtype) @ k.to(dtype).repeat_interleave(Hq // Hkv, dim=0).transpose(-1, -2)) * scaling
    q_pos = torch.arange(T)[:, None] + (S - T)
    k_pos = torch.arange(S)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)


def dense_block_mass(probs: torch.Tensor, block_q: int, block_k: int, num_key_blocks: int) -> torch.Tensor:
    """``probs [H, c, S]`` (c queries starting at a query-block boundary) -> ``[H, ceil(c / block_q),
    num_key_blocks]``: for each query block, the mean over its real queries of the probability that falls
    in each key block. The exact counterpart of a trace's block masses, with every key block kept."""
    H, c, S = probs.shape
    nq = math.ceil(c / block_q)
    padded = torch.nn.functional.pad(probs, (0, num_key_blocks * block_k - S, 0, nq * block_q - c))
    per_key_block = padded.view(H, nq * block_q, num_key_blocks, block_k).sum(-1)
    real = torch.clamp(c - torch.arange(nq) * block_q, max=block_q).to(probs.dtype)  # queries per block
    return per_key_block.view(H, nq, block_q, num_key_blocks).sum(2) / real[None, :, None]
