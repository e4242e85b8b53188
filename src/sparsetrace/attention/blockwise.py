"""Softmax attention restricted to a BlockMask, and the attention mass each kept block receives.

CPU path (the reference for every other path): gather the kept key and value blocks of every query block
and run a small dense softmax over them, so memory is ``O(T * top_k * block_k * D)``, never ``O(T * S)``.
``sparsetrace.ops.sparse_attention`` chooses between this path, the GPU path (``sparsetrace.kernels``) and
the dense reference (``attention.dense``).
"""

from __future__ import annotations

import math

import torch

from ..errors import UsageError
from ..selection.blocks import BlockMask, gather_kept, may_attend


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask) -> None:
    """Shapes of ``q [B, Hq, T, D]``, ``k``/``v [B, Hkv, S, D]`` and the mask rows that must fit them."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise UsageError(
            f"need q [B, Hq, T, D], k and v [B, Hkv, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}."
        )
    B, Hq, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise UsageError(f"{Hq} query heads are not a multiple of {Hkv} kv heads.")
    expected = (B, Hq, math.ceil(T / mask.block_q))
    if tuple(mask.indices.shape[:3]) != expected:
        raise UsageError(
            f"mask indices {tuple(mask.indices.shape)} do not fit q {tuple(q.shape)}: expected "
            f"{expected + (mask.top_k,)} for block_q={mask.block_q}; build the mask from these q and k."
        )
    if T > S:
        raise UsageError(f"queries are the last T of S keys; got T={T} > S={S}.")


def sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    *,
    scale: float | None = None,
    return_mass: bool = False,
    return_lse: bool = False,
    window: int | None = None,
):
    """Vectorised implementation (any device); see ``sparsetrace.sparse_attention``."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    bq, bk, top_k = mask.block_q, mask.block_k, mask.top_k
    nQ = mask.indices.shape[2]
    scale = D**-0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32

    q_blocks = torch.nn.functional.pad(q, (0, 0, 0, nQ * bq - T)).view(B, Hq, nQ, bq, D).to(compute)
    keys = gather_kept(k, mask.indices, bk).to(compute)  # [B, Hq, nQ, top_k*bk, D]
    values = gather_kept(v, mask.indices, bk).to(compute)  # [B, Hq, nQ, top_k*bk, D]

    q_pos = torch.arange(nQ * bq, device=q.device).view(nQ, bq) + (S - T)  # [nQ, bq]
    k_pos = (mask.indices.long()[..., None] * bk + torch.arange(bk, device=q.device)).flatten(3)
    valid = (mask.indices >= 0).repeat_interleave(bk, dim=-1)  # [B, Hq, nQ, top_k*bk]
    allowed = may_attend(k_pos[..., None, :], q_pos[:, :, None], window) & valid[..., None, :]

    logits = torch.matmul(q_blocks, keys.transpose(-1, -2)) * scale  # [B, Hq, nQ, bq, top_k*bk]
    logits = logits.masked_fill(~allowed, -math.inf)
    # A query that sees no kept key (possible only without sink blocks) gets zero output and mass.
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    out = torch.matmul(probs, values)  # [B, Hq, nQ, bq, D]
    results = [out.view(B, Hq, nQ * bq, D)[:, :, :T].to(q.dtype)]
    if return_mass:
        # Mass: mean over the block's real queries of the probability falling in each kept block.
        per_block = probs.view(B, Hq, nQ, bq, top_k, bk).sum(-1)  # [B, Hq, nQ, bq, top_k]
        real = (torch.arange(nQ * bq, device=q.device) < T).view(nQ, bq, 1).to(compute)
        results.append(((per_block * real).sum(3) / real.sum(1)).float())  # [B, Hq, nQ, top_k]
    if return_lse:
        results.append(logits.logsumexp(-1).view(B, Hq, nQ * bq)[:, :, :T].float())  # [B, Hq, T]
    return results[0] if len(results) == 1 else tuple(results)
