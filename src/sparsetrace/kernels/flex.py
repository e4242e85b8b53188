"""Block-sparse attention on the GPU: FlexAttention over the kept blocks, then the mass of each block.

With ``sparsetrace.ops.sparse_attention`` (which calls these in turn) this has the contract of
``attention.blockwise.sparse_attention_torch``:
1. ``flex_block_mask`` turns ``BlockMask.indices [B, Hq, nQ, top_k]`` into a FlexAttention ``BlockMask``.
   Blocks every query of query block i sees whole (before its first query, inside its sliding window if
   any) become ``full_kv_indices`` (no mask_mod), the rest ``kv_indices`` (causal, windowed mask_mod with
   ``q_offset = S - T``). Index arrays stay ``top_k`` wide (the kernel reads them by
   stride and count), and the transposed q-side indices (backward only) are not built, so the mask costs
   ``O(T * top_k)`` memory, never ``O(T * S / block^2)``.
2. ``flex_attention`` (compiled once, GQA via ``enable_gqa``) returns the output and the natural-log
   logsumexp ``lse [B, Hq, T]`` of the scaled logits over the kept keys.
3. ``block_mass`` (Triton) recomputes ``q . k`` over the kept blocks: the mass of kept block j for query t is
   ``sum over allowed keys of block j of exp(scale * q_t . k - lse_t)``, averaged over the block's real
   queries. Rows sum to 1 up to rounding; slots padded with -1 get 0. A second QK pass, no PV.
"""

import inspect
import math

import torch
import triton
import triton.language as tl
from torch.nn.attention.flex_attention import AuxRequest, flex_attention
from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

from ..selection.blocks import BlockMask, gather_kept, may_attend, pack_rows
from .tiles import load_query_tile, logit_tile, program_row, triton_supported

_HAS_COMPUTE_Q_BLOCKS = "compute_q_blocks" in inspect.signature(FlexBlockMask.from_kv_blocks).parameters
_FLEX = None  # torch.compile(flex_attention), built on first use
_MASK_MODS: dict = {}  # device -> (mask_mod, [q_offset, window] tensor): one object per device


def _pow2_divisor(n: int) -> int:
    return n & -n


def flex_kernel_options(block_q: int, block_k: int, head_dim: int, dtype: torch.dtype) -> dict:
    """FlexAttention tile sizes (override by reassigning ``kernels.attention.flex_kernel_options``).

    The kernel's BLOCK_M / BLOCK_N must divide the mask's block_q / block_k; capped at 128 x 64 for
    head_dim 128 in 16-bit (the shared-memory budget of H100), smaller for float32.
    """
    cap_m = 64 if dtype == torch.float32 else 128
    cap_n = 64 if head_dim >= 128 or dtype == torch.float32 else 128
    return {"BLOCK_M": min(_pow2_divisor(block_q), cap_m), "BLOCK_N": min(_pow2_divisor(block_k), cap_n)}


def flex_unsupported(q: torch.Tensor, mask: BlockMask) -> str | None:
    """None if FlexAttention takes this dtype, these block sizes and head dim, else the reason."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype}"
    if min(_pow2_divisor(mask.block_q), _pow2_divisor(mask.block_k)) < 16:
        return f"block_q={mask.block_q} / block_k={mask.block_k} need a power-of-two divisor >= 16"
    if q.shape[-1] < 16:
        return f"head_dim={q.shape[-1]} < 16"
    return None


# A window wider than any sequence: global layers use the windowed mask_mod too (see below).
_NO_WINDOW = 2**62


def _causal_mask_mod(q_offset: int, window: int | None, device):
    """mask_mod ``kv <= q + q_offset`` and ``kv > q + q_offset - window`` (global layers: a window wider
    than any sequence). The numbers live in a tensor and one function object serves every layer, so new
    offsets, windows or layer kinds never recompile the kernel (alternating two mask_mods, as Gemma's
    sliding and global layers would, exhausts dynamo's recompile limit)."""
    key = str(device)
    if key not in _MASK_MODS:
        params = torch.zeros(2, dtype=torch.int64, device=device)  # [q_offset, window]

        def causal_window(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx + params[0]) & (kv_idx > q_idx + params[0] - params[1])

        _MASK_MODS[key] = (causal_window, params)
    mask_mod, params = _MASK_MODS[key]
    params.copy_(torch.tensor([q_offset, _NO_WINDOW if window is None else window]))
    return mask_mod


def _first(ids: torch.Tensor, keep: torch.Tensor):
    """Entries of ``ids`` where ``keep``, moved to the front of each row in order: (indices, counts)."""
    return pack_rows(ids, keep, fill=0).contiguous(), keep.sum(-1, dtype=torch.int32).contiguous()


def flex_block_mask(mask: BlockMask, T: int, S: int, window: int | None = None, *,
                    pad_to_kv_blocks: bool = False) -> FlexBlockMask:
    """FlexAttention BlockMask of ``mask`` for T queries (the last T of S keys).

    ``full_kv_indices``: kept blocks every query of the query block sees whole (every key before its first
    query, inside S, and newer than ``last query - window``); ``kv_indices``: the other kept blocks, which
    the causal (windowed) mask_mod cuts. Shapes ``[B, Hq, nQ, top_k]`` int32, counts ``[B, Hq, nQ]`` int32;
    ``pad_to_kv_blocks`` pads the index arrays to ``[B, Hq, nQ, ceil(S / block_k)]`` (the CPU lowering of
    FlexAttention needs that; the CUDA one reads the rows by stride and count).
    """
    idx = mask.indices.to(torch.int32)
    nQ = idx.shape[2]
    bq, bk = mask.block_q, mask.block_k
    device = idx.device
    first_q = torch.arange(nQ, device=device) * bq + (S - T)  # [nQ] absolute position of the first query
    j = idx.long()
    valid = j >= 0
    full = valid & ((j + 1) * bk - 1 <= first_q[:, None]) & ((j + 1) * bk <= S)  # [B, H, nQ, K]
    if window is not None:
        last_q = torch.clamp(first_q + bq, max=S) - 1
        full = full & (j * bk > last_q[:, None] - window)
    full_ids, n_full = _first(idx, full)
    partial_ids, n_partial = _first(idx, valid & ~full)
    if pad_to_kv_blocks:
        pad = max(0, math.ceil(S / bk) - idx.shape[-1])
        full_ids = torch.nn.functional.pad(full_ids, (0, pad)).contiguous()
        partial_ids = torch.nn.functional.pad(partial_ids, (0, pad)).contiguous()
    extra = {"compute_q_blocks": False} if _HAS_COMPUTE_Q_BLOCKS else {}
    return FlexBlockMask.from_kv_blocks(
        n_partial,
        partial_ids,
        n_full,
        full_ids,
        BLOCK_SIZE=(bq, bk),
        mask_mod=_causal_mask_mod(S - T, window, device),
        seq_lengths=(T, S),
        **extra,
    )


@triton.jit
def _block_mass_kernel(
    Q, K, LSE, IDX, MASS,
    sqb, sqh, sqt, sqd, skb, skh, sks, skd, slb, slh, slt,
    T, S, nQ, Hq, Hkv, window, scale,
    TOP_K: tl.constexpr, TOP_KP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BQ: tl.constexpr,
    BK: tl.constexpr, D: tl.constexpr, IEEE: tl.constexpr, WINDOW: tl.constexpr,
):
    b, h, i = program_row(tl.program_id(0), Hq, Hkv, nQ)
    group = Hq // Hkv
    row = ((b * Hq + h) * nQ + i).to(tl.int64) * TOP_K  # indices and mass are contiguous [B, Hq, nQ, K]

    rows = tl.arange(0, BQ)
    t = i * BLOCK_Q + rows
    row_ok = (rows < BLOCK_Q) & (t < T)
    q_pos = t + (S - T)
    d = tl.arange(0, D)
    q = load_query_tile(Q, b.to(tl.int64) * sqb + h.to(tl.int64) * sqh, t.to(tl.int64), row_ok, d,
                         sqt, sqd)
    lse = tl.load(LSE + b.to(tl.int64) * slb + h.to(tl.int64) * slh + t.to(tl.int64) * slt,
                  mask=row_ok, other=0.0)
    n_real = tl.sum(row_ok.to(tl.float32), axis=0)
    k_base = b.to(tl.int64) * skb + (h // group).to(tl.int64) * skh
    cols = tl.arange(0, BK)
    slot = tl.arange(0, TOP_KP)
    ids = tl.load(IDX + row + slot, mask=slot < TOP_K, other=-1)  # [TOP_KP] kept blocks, -1 = none
    masses = tl.zeros([TOP_KP], tl.float32)
    for x in range(TOP_K):  # straight-line body, so the key-tile loads pipeline across blocks
        pick = slot == x
        j = tl.sum(tl.where(pick, ids, 0), axis=0)
        s, k_pos, col_ok = logit_tile(q, K, k_base, j, j >= 0, cols, d, sks, skd, S, BLOCK_K, IEEE)
        allowed = row_ok[:, None] & col_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - window)
        p = tl.where(allowed, tl.exp(s * scale - lse[:, None]), 0.0)
        masses = tl.where(pick, tl.sum(tl.sum(p, axis=1), axis=0) / n_real, masses)
    tl.store(MASS + row + slot, masses, mask=slot < TOP_K)


def block_mass(q, k, lse, indices, block_q: int, block_k: int, scale: float,
               window: int | None = None) -> torch.Tensor:
    """Mass of every kept block (Triton).

    Args:
        q: ``[B, Hq, T, D]``, k: ``[B, Hkv, S, D]`` (bf16, fp16 or fp32, CUDA, same dtype).
        lse: float32 ``[B, Hq, T]``, natural-log logsumexp of ``scale * q . k`` over each query's kept keys.
        indices: int32 ``[B, Hq, nQ, top_k]`` (sorted, -1 padded).
        window: sliding window of the layer (keys ``> query - window``), None for a global layer.
    Returns:
        float32 ``[B, Hq, nQ, top_k]``: mean over the block's real queries of the probability in each block.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    nQ, top_k = indices.shape[2], indices.shape[3]
    assert lse.shape == (B, Hq, T), f"lse {tuple(lse.shape)} must be [B, Hq, T] = {(B, Hq, T)}"
    assert q.dtype == k.dtype, f"q is {q.dtype} and k {k.dtype}; cast one"
    reason = triton_supported(block_q, block_k, D)
    assert reason is None, reason
    idx = indices.to(torch.int32).contiguous()
    out = torch.empty(idx.shape, dtype=torch.float32, device=q.device)
    lse = lse.float()
    big = triton.next_power_of_2(block_q) * triton.next_power_of_2(block_k) * D >= 64 * 64 * 128
    _block_mass_kernel[(B * Hq * nQ,)](
        q, k, lse, idx, out,
        *q.stride(), *k.stride(), *lse.stride(),
        T, S, nQ, Hq, Hkv, window or 0, float(scale),
        TOP_K=top_k, TOP_KP=triton.next_power_of_2(top_k), BLOCK_Q=block_q, BLOCK_K=block_k,
        BQ=triton.next_power_of_2(block_q), BK=triton.next_power_of_2(block_k), D=D,
        IEEE=q.dtype == torch.float32, WINDOW=window is not None, num_warps=8 if big else 4, num_stages=2,
    )
    return out


def block_mass_torch(q, k, lse, indices, block_q: int, block_k: int, scale: float,
                     window: int | None = None, *, max_elements: int = 2**27) -> torch.Tensor:
    """``block_mass`` in torch (any device), chunked over query blocks so the logit tile stays small."""
    B, Hq, T, D = q.shape
    S = k.shape[2]
    nQ, top_k = indices.shape[2], indices.shape[3]
    bq, bk = block_q, block_k
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_blocks = torch.nn.functional.pad(q, (0, 0, 0, nQ * bq - T)).view(B, Hq, nQ, bq, D)
    lse_blocks = torch.nn.functional.pad(lse, (0, nQ * bq - T)).view(B, Hq, nQ, bq).to(compute)
    t = torch.arange(nQ * bq, device=q.device).view(nQ, bq)
    real, q_pos = t < T, t + (S - T)  # [nQ, bq]
    step = max(1, max_elements // (B * Hq * bq * top_k * bk))
    out = []
    for i in range(0, nQ, step):
        sl = slice(i, min(i + step, nQ))
        ids = indices[:, :, sl]
        keys = gather_kept(k, ids, bk).to(compute)  # [B, Hq, c, top_k*bk, D]
        logits = q_blocks[:, :, sl].to(compute) @ keys.transpose(-1, -2) * scale  # [B, Hq, c, bq, top_k*bk]
        k_pos = (ids.long()[..., None] * bk + torch.arange(bk, device=q.device)).flatten(3)
        valid = (ids >= 0).repeat_interleave(bk, dim=-1)  # [B, Hq, c, top_k*bk]
        allowed = may_attend(k_pos[..., None, :], q_pos[sl][:, :, None], window) & valid[..., None, :]
        allowed = allowed & real[sl][:, :, None]  # [B, Hq, c, bq, top_k*bk]
        p = torch.exp(logits - lse_blocks[:, :, sl, :, None]).masked_fill(~allowed, 0.0)
        per_block = p.view(*p.shape[:4], top_k, bk).sum(-1).sum(3)  # [B, Hq, c, top_k]
        out.append(per_block / real[sl].sum(1).to(compute)[:, None])
    return torch.cat(out, dim=2).float()


def _flex():
    global _FLEX
    if _FLEX is None:
        _FLEX = torch.compile(flex_attention)
    return _FLEX


def flex_attention_lse(q, k, v, mask: BlockMask, *, scale: float, window: int | None = None,
                       return_lse: bool = False):
    """Softmax attention of ``q`` over the blocks ``mask`` keeps, on CUDA (FlexAttention).

    Args:
        q: ``[B, Hq, T, D]``; k, v: ``[B, Hkv, S, D]`` (GQA: head h reads kv head ``h // (Hq // Hkv)``);
            bf16, fp16 or fp32 (see :func:`flex_unsupported`).
        mask: ``BlockMask`` with int32 ``indices [B, Hq, nQ, top_k]`` built for these q and k.
        window: sliding window of the layer (keys ``> position - window``), None for a global layer.
        return_lse: also return the float32 natural-log logsumexp ``[B, Hq, T]`` of the scaled logits over
            each query's kept keys (what :func:`block_mass` needs).
    Returns:
        ``out [B, Hq, T, D]`` in q's dtype, or ``(out, lse)``.
    """
    Hq, T, D = q.shape[1:]
    Hkv, S = k.shape[1], k.shape[2]
    k, v = k.to(q.dtype), v.to(q.dtype)
    # Past dynamo's recompile limit flex_attention would silently run its unfused implementation, which
    # applies the mask_mod but not the block indices: dense causal attention. Fail loudly instead, with
    # room for the shapes of several models in one process.
    with torch._dynamo.config.patch(recompile_limit=64, fail_on_recompile_limit_hit=True):
        result = _flex()(
            q, k, v,
            block_mask=flex_block_mask(mask, T, S, window, pad_to_kv_blocks=not q.is_cuda),
            scale=scale,
            enable_gqa=Hq != Hkv,
            kernel_options=flex_kernel_options(mask.block_q, mask.block_k, D, q.dtype),
            return_aux=AuxRequest(lse=True) if return_lse else None,
        )
    if not return_lse:
        return result
    out, aux = result
    return out, aux.lse
