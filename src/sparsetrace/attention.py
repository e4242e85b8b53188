"""Softmax attention restricted to a BlockMask, and the attention mass each kept block receives.

CPU path (the reference for every other path): gather the kept key and value blocks of every query block
and run a small dense softmax over them, so memory is ``O(T * top_k * block_k * D)``, never ``O(T * S)``.
On CUDA tensors ``impl="auto"`` hands over to the GPU path in ``sparsetrace.kernels`` (imported lazily, so
CPU installs never import Triton).
"""

from __future__ import annotations

import math

import torch

from .mask import BlockMask, _allowed, _key_blocks, gather_blocks


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(
            f"need q [B, Hq, T, D], k and v [B, Hkv, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}."
        )
    B, Hq, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} kv heads.")
    expected = (B, Hq, math.ceil(T / mask.block_q))
    if tuple(mask.indices.shape[:3]) != expected:
        raise ValueError(
            f"mask indices {tuple(mask.indices.shape)} do not fit q {tuple(q.shape)}: expected "
            f"{expected + (mask.top_k,)} for block_q={mask.block_q}; build the mask from these q and k."
        )
    if T > S:
        raise ValueError(f"queries are the last T of S keys; got T={T} > S={S}.")


def _gather_blocks(x: torch.Tensor, indices: torch.Tensor, block_k: int) -> torch.Tensor:
    """Kept key (or value) blocks of every query block: ``[B, Hq, nQ, top_k * bk, D]`` (-1 reads block 0)."""
    return gather_blocks(_key_blocks(x, block_k), indices.long().clamp(min=0))


def sparse_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    *,
    scale: float | None = None,
    return_mass: bool = False,
    window: int | None = None,
):
    """Vectorised CPU/any-device implementation; see :func:`sparse_attention`."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    bq, bk, top_k = mask.block_q, mask.block_k, mask.top_k
    nQ = mask.indices.shape[2]
    scale = D**-0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32

    q_blocks = torch.nn.functional.pad(q, (0, 0, 0, nQ * bq - T)).view(B, Hq, nQ, bq, D).to(compute)
    keys = _gather_blocks(k, mask.indices, bk).to(compute)  # [B, Hq, nQ, top_k*bk, D]
    values = _gather_blocks(v, mask.indices, bk).to(compute)  # [B, Hq, nQ, top_k*bk, D]

    q_pos = torch.arange(nQ * bq, device=q.device).view(nQ, bq) + (S - T)  # [nQ, bq]
    k_pos = (mask.indices.long()[..., None] * bk + torch.arange(bk, device=q.device)).flatten(3)
    valid = (mask.indices >= 0).repeat_interleave(bk, dim=-1)  # [B, Hq, nQ, top_k*bk]
    allowed = _allowed(k_pos[..., None, :], q_pos[:, :, None], window) & valid[..., None, :]

    logits = torch.matmul(q_blocks, keys.transpose(-1, -2)) * scale  # [B, Hq, nQ, bq, top_k*bk]
    # A query that sees no kept key (possible only without sink blocks) gets zero output and mass.
    probs = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num_(0.0)
    out = torch.matmul(probs, values)  # [B, Hq, nQ, bq, D]
    out = out.view(B, Hq, nQ * bq, D)[:, :, :T].to(q.dtype)
    if not return_mass:
        return out
    # Mass: mean over the block's real queries of the probability falling in each kept block.
    per_block = probs.view(B, Hq, nQ, bq, top_k, bk).sum(-1)  # [B, Hq, nQ, bq, top_k]
    real = (torch.arange(nQ * bq, device=q.device) < T).view(nQ, bq, 1).to(compute)
    mass = (per_block * real).sum(3) / real.sum(1)  # [B, Hq, nQ, top_k]
    return out, mass.float()


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    *,
    scale: float | None = None,
    return_mass: bool = False,
    window: int | None = None,
):
    """Dense float64 attention under ``mask.to_dense``: the O(T * S) oracle for tests. Small inputs only."""
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    group = Hq // Hkv
    kk = k.double().repeat_interleave(group, dim=1)
    vv = v.double().repeat_interleave(group, dim=1)
    dense = mask.to_dense(T, S, window)  # [B, Hq, T, S]
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    probs = torch.softmax(logits.masked_fill(~dense, -math.inf), dim=-1).nan_to_num_(0.0)  # [B,Hq,T,S]
    out = (probs @ vv).to(q.dtype)
    if not return_mass:
        return out
    bq, bk = mask.block_q, mask.block_k
    nQ, n_kb = mask.indices.shape[2], math.ceil(S / bk)
    per_key_block = torch.nn.functional.pad(probs, (0, n_kb * bk - S)).view(B, Hq, T, n_kb, bk).sum(-1)
    per_key_block = torch.nn.functional.pad(per_key_block, (0, 0, 0, nQ * bq - T))
    counts = torch.nn.functional.pad(torch.ones(T, dtype=torch.float64), (0, nQ * bq - T)).view(nQ, bq)
    block_mass = per_key_block.view(B, Hq, nQ, bq, n_kb).sum(3) / counts.sum(1)[:, None]  # [B,Hq,nQ,nKB]
    ids = mask.indices.long()
    mass = block_mass.gather(-1, ids.clamp(min=0)).masked_fill(ids < 0, 0.0)
    return out, mass.float()


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockMask,
    *,
    scale: float | None = None,
    return_mass: bool = False,
    window: int | None = None,
    impl: str = "auto",
):
    """Softmax attention of ``q`` over the key blocks ``mask`` keeps (causal inside blocks).

    Args:
        q: ``[B, Hq, T, D]``; k, v: ``[B, Hkv, S, D]`` (GQA: head h reads kv head ``h // (Hq // Hkv)``).
        mask: from :func:`sparsetrace.stream_mask` / :func:`sparsetrace.oracle_mask` on these q, k.
        scale: logit scale, default ``D ** -0.5``.
        return_mass: also return the mass ``[B, Hq, nQ, top_k]`` float32: for each query block, the mean
            over its queries of the softmax probability falling in each kept block (rows sum to 1; 0 at -1).
            A query that sees no kept key at all (only possible with ``sink_blocks=0`` and a local
            window narrower than the query block) gets zero output and contributes zero mass.
        window: sliding-window size of the layer (keys ``> position - window`` only), None = global.
        impl: ``"auto"`` (GPU path on CUDA, torch elsewhere), ``"torch"``, ``"gpu"`` or ``"reference"``.
    Returns:
        ``out [B, Hq, T, D]`` in q's dtype, or ``(out, mass)``.
    """
    _check(q, k, v, mask)
    if impl == "auto":
        impl = "gpu" if q.is_cuda else "torch"
    if impl == "torch":
        return sparse_attention_torch(q, k, v, mask, scale=scale, return_mass=return_mass, window=window)
    if impl == "reference":
        return sparse_attention_reference(
            q, k, v, mask, scale=scale, return_mass=return_mass, window=window
        )
    if impl == "gpu":
        from .kernels import gpu_sparse_attention  # lazy: Triton / FlexAttention only on CUDA machines

        return gpu_sparse_attention(q, k, v, mask, scale=scale, return_mass=return_mass, window=window)
    raise ValueError(f"impl={impl!r} is not one of 'auto', 'torch', 'gpu', 'reference'.")
