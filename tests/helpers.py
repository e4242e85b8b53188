"""Test helpers: readable float comparisons and plain-loop rebuilds of what the library computes.

Nothing here imports the code under test: token masks, causal block counts and dense attention are
rebuilt from the contract (shared/DESIGN.md section 1) with loops and float64, so a bug cannot hide
in both."""

from __future__ import annotations

import math
import os
import sys

import torch
from hypothesis import strategies as hs

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def child_env() -> dict:
    """This interpreter's import path for child processes (the package under test, not an installed one)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


def assert_close(
    name: str, got: torch.Tensor, want: torch.Tensor, *, rtol: float = 0.0, atol: float = 0.0
):
    """Assert ``|got - want| <= atol + rtol * max|want|`` elementwise; report max and mean
    difference.

    ``rtol`` is relative to the largest magnitude of ``want`` (a norm-wise bound: attention outputs
    have entries near zero where a pointwise relative error means nothing). NaN anywhere fails."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs()
    scale = want.abs().max().item() if want.numel() else 0.0
    bound = atol + rtol * scale
    nan = torch.isnan(got).sum().item() + torch.isnan(want).sum().item()
    worst = diff.max().item() if diff.numel() else 0.0
    report = (
        f"{name}: max |diff| {worst:.3e} (bound {bound:.3e} = atol {atol:.1e} + rtol {rtol:.1e} * "
        f"max|want| {scale:.3e}), mean |diff| {diff.mean().item() if diff.numel() else 0.0:.3e}, "
        f"relative max {worst / scale if scale else float('nan'):.3e}, NaNs {nan}"
    )
    if nan or worst > bound:
        where = (
            tuple(torch.nonzero(diff == worst)[0].tolist()) if diff.numel() and not nan else None
        )
        raise AssertionError(report + (f", worst at {where}" if where else ""))
    return worst


def causal_counts(T: int, S: int, block_q: int, block_k: int) -> list[int]:
    """n per query block: key blocks up to the one holding the block's last (absolute) query
    position."""
    return [
        (min((i + 1) * block_q, T) - 1 + (S - T)) // block_k + 1
        for i in range(math.ceil(T / block_q))
    ]


def loop_token_mask(
    indices: torch.Tensor, block_q: int, block_k: int, T: int, S: int
) -> torch.Tensor:
    """Brute-force token mask ``[B, H, T, S]`` from block indices: kept blocks, causal inside them.

    One loop step per (batch, head, query token, kept block); each query token stops at its own
    position."""
    B, H = indices.shape[:2]
    rows = indices.tolist()
    dense = torch.zeros(B, H, T, S, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                last_key = t + (S - T)  # absolute position of query t
                for j in rows[b][h][t // block_q]:
                    if j >= 0:
                        stop = min((j + 1) * block_k, S, last_key + 1)
                        if stop > j * block_k:
                            dense[b, h, t, j * block_k : stop] = True
    return dense


def dense_attention_f64(q, k, v, token_mask, scale=None):
    """Float64 softmax attention under a token mask ``[B, Hq, T, S]``; GQA by explicit head mapping.

    Returns ``(out [B, Hq, T, D], probs [B, Hq, T, S])``.
    """
    Hq, D = q.shape[1], q.shape[3]
    Hkv = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    kv_of = [h // (Hq // Hkv) for h in range(Hq)]
    kk = torch.stack([k[:, j] for j in kv_of], dim=1).double()  # [B, Hq, S, D]
    vv = torch.stack([v[:, j] for j in kv_of], dim=1).double()
    logits = torch.einsum("bhtd,bhsd->bhts", q.double(), kk) * scale
    logits = torch.where(token_mask, logits, torch.full_like(logits, -math.inf))
    probs = torch.exp(logits - logits.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    return torch.einsum("bhts,bhsd->bhtd", probs, vv), probs


def block_mass_f64(probs, indices, block_q: int, block_k: int) -> torch.Tensor:
    """Per kept block, the mean over the block's real queries of the probability it receives
    (loops)."""
    B, H, T = probs.shape[:3]
    nQ, top_k = indices.shape[2], indices.shape[3]
    out = torch.zeros(B, H, nQ, top_k, dtype=torch.float64)
    rows = indices.tolist()
    for b in range(B):
        for h in range(H):
            for i in range(nQ):
                t0, t1 = i * block_q, min((i + 1) * block_q, T)
                for r, j in enumerate(rows[b][h][i]):
                    if j >= 0:
                        out[b, h, i, r] = probs[
                            b, h, t0:t1, j * block_k : (j + 1) * block_k
                        ].sum() / (t1 - t0)
    return out


def check_mask_invariants(name, indices, *, B, Hq, T, S, block_q, block_k, top_k, sink, local):
    """The BlockMask contract, row by row; the assertion message names the row and what broke."""
    nQ = math.ceil(T / block_q)
    assert indices.dtype == torch.int32, f"{name}: dtype {indices.dtype}, want int32"
    assert tuple(indices.shape) == (B, Hq, nQ, top_k), f"{name}: shape {tuple(indices.shape)}"
    counts = causal_counts(T, S, block_q, block_k)
    rows = indices.tolist()
    for b in range(B):
        for h in range(Hq):
            for i, n in enumerate(counts):
                row = rows[b][h][i]
                where = (
                    f"{name}[b={b}, h={h}, i={i}] = {row} "
                    f"(n={n}, top_k={top_k}, sink={sink}, local={local})"
                )
                valid = [j for j in row if j >= 0]
                assert row == valid + [-1] * (top_k - len(valid)), (
                    f"{where}: -1 not only at the end"
                )
                assert valid == sorted(set(valid)), f"{where}: not sorted and unique"
                assert all(0 <= j < n for j in valid), f"{where}: entry outside [0, n)"
                assert len(valid) == min(n, top_k), (
                    f"{where}: {len(valid)} valid, want {min(n, top_k)}"
                )
                if n <= top_k:
                    assert valid == list(range(n)), f"{where}: should keep all n blocks"
                else:
                    forced = set(range(sink)) | set(range(n - local, n))
                    assert forced <= set(valid), f"{where}: forced blocks {sorted(forced)} missing"


@hs.composite
def mask_cases(draw, *, max_T=150, max_extra=60, max_top_k=12, max_Hkv=3, max_group=3):
    """Random shapes and knobs covering the brief's ranges: ragged T/S, GQA, batch 2, every block
    size."""
    sink = draw(hs.integers(0, 2))
    local = draw(hs.integers(0, 2))
    T = draw(hs.integers(1, max_T))
    return dict(
        B=draw(hs.integers(1, 2)),
        Hkv=draw(hs.integers(1, max_Hkv)),
        group=draw(hs.integers(1, max_group)),
        T=T,
        S=T + draw(hs.integers(0, max_extra)),
        D=draw(hs.sampled_from([4, 8, 16])),
        block_q=draw(hs.sampled_from([4, 8, 16, 32])),
        block_k=draw(hs.sampled_from([4, 8, 16, 32])),
        top_k=draw(hs.integers(sink + local + 1, max(max_top_k, sink + local + 1))),
        sink=sink,
        local=local,
        seed=draw(hs.integers(0, 2**31 - 1)),
    )


def make_qkv(case, dtype=torch.float32, *, v=False):
    """Random q [B, Hq, T, D], k [B, Hkv, S, D] (and v) from ``case['seed']``."""
    g = torch.Generator().manual_seed(case["seed"])
    B, Hkv, T, S, D = case["B"], case["Hkv"], case["T"], case["S"], case["D"]
    Hq = Hkv * case["group"]
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    if not v:
        return q, k
    return q, k, torch.randn(B, Hkv, S, D, generator=g).to(dtype)


def mask_kwargs(case, **extra):
    kw = dict(
        block_q=case["block_q"],
        block_k=case["block_k"],
        top_k=case["top_k"],
        sink_blocks=case["sink"],
        local_blocks=case["local"],
    )
    kw.update(extra)
    return kw


def random_block_rows(L: int, H: int, T: int, block_q: int, block_k: int, k: int, seed: int = 0, *,
                      ragged: bool = False):
    """Random valid trace rows for ``T`` tokens: ``indices`` int32 ``[L, H, nQ, k]`` (each row up to k
    unique causal key blocks, sorted, -1 padded; ``ragged``: a random count of them, as a coverage budget
    leaves) and ``mass`` float32 (skewed, summing to 1 per row)."""
    g = torch.Generator().manual_seed(seed)
    nQ = math.ceil(T / block_q)
    indices = torch.full((L, H, nQ, k), -1, dtype=torch.int32)
    mass = torch.zeros(L, H, nQ, k)
    for layer in range(L):
        for h in range(H):
            for i in range(nQ):
                n = (min((i + 1) * block_q, T) - 1) // block_k + 1  # causal key blocks of row i
                width = int(torch.randint(1, min(n, k) + 1, (1,), generator=g)) if ragged else k
                pick = torch.randperm(n, generator=g)[:width].sort().values
                indices[layer, h, i, :len(pick)] = pick.int()
                w = torch.rand(len(pick), generator=g) ** 3
                mass[layer, h, i, :len(pick)] = w / w.sum()
    return indices, mass
